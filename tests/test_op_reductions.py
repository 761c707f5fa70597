"""dots, weighted_sumsq and residual_sumsq on every backend, device and dtype, against flat float64 sums."""
import pytest
import torch

from xsam import ops
from xsam.ops import accumulation_dtype

from op_cases import MANY_PAIRS, assert_close_to_exact, assert_repeated_pairs_agree, dots_exact, f64, make, \
    op_params, reference_result, scalar, size_cases, summation_roundings, sumsq_exact

PAIRS = [(0, 0), (0, 1), (2, 1), (1, 2), (2, 2)]


def _dots_close(backend, device, dtype, lists, pairs):
    """``dots(lists, pairs)`` of the accumulation dtype on the device, close to the float64 sums."""
    run = lambda name: ops.dots(lists, pairs, backend=name)  # noqa: E731
    got = run(backend)
    acc = accumulation_dtype(dtype)
    assert got.dtype == acc and got.shape == (len(pairs),) and got.device.type == device
    flats = [f64(lst) for lst in lists]
    assert_close_to_exact(got, *dots_exact(flats, pairs), acc, ref=reference_result(backend, run),
                          roundings=summation_roundings(len(flats[0])))
    return got


@pytest.mark.parametrize("backend,device,dtype,case", op_params())
def test_dots(backend, device, dtype, case):
    _dots_close(backend, device, dtype, [make(size_cases(backend, device)[case], dtype, device, seed)
                                         for seed in range(3)], PAIRS)


@pytest.mark.parametrize("op", ["weighted_sumsq", "residual_sumsq"])
@pytest.mark.parametrize("backend,device,dtype,case", op_params())
def test_sum_of_squares(backend, device, dtype, case, op):
    shapes = size_cases(backend, device)[case]
    if op == "weighted_sumsq":
        x, y, lam = make(shapes, dtype, device, 1), make(shapes, dtype, device, 2), ()
    else:
        # x = 0.75 y + a small part off y: the residual is small next to ||x||, where the one-pass
        # formula ||x||^2 - lam^2 ||y||^2 cancels.
        y, noise = make(shapes, dtype, device, 3), make(shapes, dtype, device, 4)
        x = [(0.75 * a.double() + 1e-3 * b.double()).to(dtype) for a, b in zip(y, noise)]
        lam = (scalar(0.75, dtype, device),)
    run = lambda name: getattr(ops, op)(x, y, *lam, backend=name)  # noqa: E731
    got = run(backend)
    acc = accumulation_dtype(dtype)
    assert got.dtype == acc and got.shape == ()
    assert_close_to_exact(got, *sumsq_exact(op, f64(x), f64(y)), acc, ref=reference_result(backend, run),
                          roundings=summation_roundings(sum(t.numel() for t in x)))


@pytest.mark.parametrize("backend,device,dtype,case", op_params(dtypes=[torch.float32], cases=["edge"]))
def test_dots_of_no_pairs_and_of_empty_lists(backend, device, dtype, case):
    x = make([(5,)], dtype, device, 0)
    none = ops.dots([x], [], backend=backend)
    assert none.shape == (0,) and none.dtype == torch.float32
    empty = ops.dots([[], []], [(0, 1), (1, 1)], backend=backend)
    assert empty.tolist() == [0.0, 0.0] and empty.dtype == torch.float32
    assert ops.weighted_sumsq([], [], backend=backend).item() == 0.0
    assert ops.residual_sumsq([], [], 1.0, backend=backend).item() == 0.0
    zeros = make([(0,), (0,)], dtype, device, 0)
    assert ops.dots([zeros, zeros], [(0, 1)], backend=backend).tolist() == [0.0]


@pytest.mark.parametrize("backend,device,dtype,case", op_params(dtypes=[torch.float32], cases=["edge"]))
def test_a_list_named_by_several_pairs_gives_identical_sums(backend, device, dtype, case):
    g = make([(70,), (3,)], dtype, device, 40)
    got = ops.dots([g, g, list(g)], [(0, 1), (2, 2), (1, 0)], backend=backend)
    assert torch.equal(got[0], got[1]) and torch.equal(got[1], got[2])
    torch.testing.assert_close(got.double().cpu(), (f64(g) @ f64(g)).repeat(3), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device,dtype,case", op_params(dtypes=[torch.float32, torch.bfloat16],
                                                                cases=["edge", "chunk"]))
def test_dots_of_many_pairs_and_a_repeated_list(backend, device, dtype, case):
    lists = [make(size_cases(backend, device)[case], dtype, device, seed) for seed in range(5)]
    lists.append(lists[0])
    assert_repeated_pairs_agree(_dots_close(backend, device, dtype, lists, MANY_PAIRS))


@pytest.mark.parametrize("backend,device,dtype,case", op_params(dtypes=[torch.float32, torch.bfloat16],
                                                                cases=["chunk"]))
def test_reductions_are_deterministic(backend, device, dtype, case):
    shapes = size_cases(backend, device)[case]
    x, y = make(shapes, dtype, device, 41), make(shapes, dtype, device, 42)
    first = ops.dots([x, y], [(0, 0), (0, 1), (1, 1)], backend=backend)
    again = ops.dots([[t.clone() for t in x], [t.clone() for t in y]], [(0, 0), (0, 1), (1, 1)], backend=backend)
    assert torch.equal(first, again)
    assert torch.equal(ops.weighted_sumsq(x, y, backend=backend), ops.weighted_sumsq(x, y, backend=backend))
    assert torch.equal(ops.residual_sumsq(x, y, 0.5, backend=backend), ops.residual_sumsq(x, y, 0.5, backend=backend))
