"""The op layer (xsam.ops): grouping by device and dtype, Layouts, scalars, dispatch and its errors,
and power_update_, against flat-vector computations (reference backend); and the registered ops of the
fused backends (opcheck, torch.compile tracing, empty lists)."""
import warnings

import pytest
import torch

from xsam import ops
from xsam.ops import dispatch, verify

from helpers import assert_each_close, flat
from op_cases import backend_params, make, opcheck_cases, scalar

SHAPES = [(0,), (1,), (7,), (3, 5), (2, 1, 4)]


def mixed_lists(seed):
    """Aligned lists whose tensors mix fp32, fp64 and bf16, so the dispatcher must group them."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32, torch.float64]
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(d) for s, d in zip(SHAPES, dtypes)]


def test_dots_matches_flat_dot_products_across_mixed_groups():
    a, b, c = mixed_lists(0), mixed_lists(1), mixed_lists(2)
    out = ops.dots([a, b, c], [(0, 0), (0, 1), (2, 1)], backend="reference")
    assert out.dtype == torch.float64  # one fp64 group promotes the result
    want = torch.stack([flat(a) @ flat(a), flat(a) @ flat(b), flat(c) @ flat(b)])
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)  # bf16 inputs are exact in fp32 products


def test_dots_accumulates_low_precision_in_fp32():
    # 4096 values of 1/64 in bf16: a bf16 accumulator would stall; fp32 gives the exact sum.
    x = [torch.full((4096,), 1 / 64, dtype=torch.bfloat16)]
    out = ops.dots([x, [torch.ones(4096, dtype=torch.bfloat16)]], [(0, 1)], backend="reference")
    assert out.dtype == torch.float32 and out.item() == 64.0


def test_weighted_sumsq_is_the_asam_norm():
    w, g = mixed_lists(3), mixed_lists(4)
    out = ops.weighted_sumsq(w, g, backend="reference")
    torch.testing.assert_close(out, ((flat(w) * flat(g)) ** 2).sum(), rtol=1e-5, atol=1e-6)


def test_power_update_gives_rayleigh_quotient_residual_and_unit_vector():
    a = torch.randn(20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a + a.T
    vs = [make([(4,), (16,)], torch.float64, "cpu", s) for s in (13, 14)]
    us = [[u.clone() for u in (a @ flat(v)).split([4, 16])] for v in vs]
    before = [flat(v) for v in vs]
    stats = ops.power_update_(us, vs, backend="reference")
    for j, v0 in enumerate(before):
        u = a @ v0
        lam = (v0 @ u) / (v0 @ v0)
        torch.testing.assert_close(stats.eigenvalues[j], lam, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.residuals[j], (u - lam * v0).norm(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(stats.norms[j], u.norm(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flat(vs[j]), u / (u.norm() + 1e-12), rtol=1e-12, atol=1e-12)


def test_unknown_backend_name_is_a_clear_error():
    with pytest.raises(ValueError, match="backend='cuda'"):
        ops.dots([make(SHAPES, torch.float32, "cpu", 0)], [(0, 0)], backend="cuda")


def test_unavailable_backend_raises_with_reason(monkeypatch):
    from xsam.ops import native_backend

    monkeypatch.setattr(native_backend, "availability", lambda device, dtype: "not built here")
    dispatch.clear_cache()
    try:
        with pytest.raises(ops.BackendUnavailableError, match="backend='native'.*not built here"):
            ops.dots([make(SHAPES, torch.float32, "cpu", 0)], [(0, 0)], backend="native")
        # auto never fails: it uses the next backend that can serve the tensors.
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a backend that loaded but cannot serve a device is no fault
            assert dispatch.resolve("auto", torch.device("cpu"), torch.float32) is ops.reference
        assert verify.outcomes() == {}
    finally:
        dispatch.clear_cache()


def test_misaligned_lists_are_rejected():
    with pytest.raises(ValueError, match="aligned"):
        ops.dots([make(SHAPES, torch.float32, "cpu", 0), make(SHAPES[:2], torch.float32, "cpu", 1)], [(0, 1)])


def test_a_kept_layout_gives_the_same_results_as_a_fresh_one():
    w, g = mixed_lists(5), mixed_lists(6)
    layout = ops.Layout.of(w)
    assert len(layout.groups) == 3 and not layout.sharded
    fresh = ops.dots([w, g], [(0, 1), (1, 1)], backend="reference")
    kept = ops.dots([w, g], [(0, 1), (1, 1)], backend="reference", layout=layout)
    assert torch.equal(fresh, kept)
    with pytest.raises(ValueError, match="aligned"):
        ops.dots([w[:2], g[:2]], [(0, 1)], layout=layout)


def test_a_layout_of_one_group_passes_the_lists_through():
    w = make(SHAPES, torch.float32, "cpu", 0)
    layout = ops.Layout.of(w)
    assert len(layout.groups) == 1 and layout.groups[0].index is None
    assert layout.groups[0].pick(w) == w


def test_power_update_residual_is_accurate_in_fp32():
    # u = 3 v + a 1.4e-4 step off the unit vector v: ||u - lam v|| = 1.4e-4 next to ||u|| = 3, where the
    # one-pass formula uu - lam * vu reads 0 in fp32.
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(3000, generator=gen, dtype=torch.float64)
    v /= v.norm()
    off = torch.randn(3000, generator=gen, dtype=torch.float64)
    off -= (off @ v) * v
    u32, v32 = (3.0 * v + 1.4e-4 * off / off.norm()).float(), v.float()
    lam = (u32.double() @ v32.double()) / (v32.double() @ v32.double())
    want = (u32.double() - lam * v32.double()).norm().item()
    stats = ops.power_update_([[u32.clone()]], [[v32.clone()]], backend="reference")
    assert stats.residuals[0].item() == pytest.approx(want, rel=1e-2)


def test_scalars_may_be_numbers_or_tensors_of_any_dtype():
    w, g = make(SHAPES, torch.float32, "cpu", 1), make(SHAPES, torch.float32, "cpu", 2)
    outs = []
    for scale in (0.25, torch.tensor(0.25, dtype=torch.float64), torch.tensor([0.25])):
        y = [t.clone() for t in w]
        ops.axpy_(y, g, scale, backend="reference")
        outs.append(flat(y))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_the_fakes_follow_the_contract_on_empty_lists():
    # torch.compile traces reductions through these; an empty list used to raise IndexError.
    from xsam.ops.contract import OPS
    from xsam.ops.fakes import _fake_for

    out = _fake_for(OPS["dots"])([], 2, [0, 1, 1, 1])
    assert out.shape == (2,) and out.dtype == torch.float32
    x = [torch.zeros(3, dtype=torch.float64)]
    assert _fake_for(OPS["residual_sumsq"])(x, x, torch.zeros((), dtype=torch.float64)).dtype == torch.float64
    assert _fake_for(OPS["perturb_"])(x, x, x, torch.zeros(()), False) is None


_GRAD_GETTER = torch._C.TensorBase.grad.__get__  # what __torch_function__ receives for `.grad`


class _Recorded(torch.Tensor):
    """A subclass with __torch_function__: its ``.grad`` must be read through Python."""

    reads = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == _GRAD_GETTER:
            cls.reads += 1
        return super().__torch_function__(func, types, args, kwargs or {})


class _CountGradReads(torch.overrides.TorchFunctionMode):
    reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func == _GRAD_GETTER:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_gradients_reads_what_dot_grad_reads():
    params = [torch.nn.Parameter(torch.randn(3)), torch.randn(2, requires_grad=True),
              torch.nn.Parameter(torch.randn(4)), torch.randn(2).as_subclass(_Recorded).requires_grad_()]
    for i in (0, 1, 3):
        params[i].grad = torch.randn(params[i].shape)
    expected = [p.grad for p in params]
    _Recorded.reads = 0
    grads, missing = ops.gradients(params)
    assert missing == 1 and grads[2] is None
    assert all(g is e for g, e in zip(grads, expected))
    assert _Recorded.reads == 1, "a subclass's .grad goes through its __torch_function__"
    with _CountGradReads() as mode:
        grads, missing = ops.gradients(params)
    assert mode.reads == len(params), "under a torch function mode every read is seen by the mode"
    assert missing == 1 and all(g is e for g, e in zip(grads, expected))
    assert ops.gradients([]) == ([], 0)


# ---------------------------------------------------------------- the registered ops of the fused backends

FUSED = backend_params(backends=("native", "triton"))
REGISTERED = {"native": torch.ops.xsam, "triton": torch.ops.xsam_triton}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", FUSED)
@pytest.mark.parametrize("name", list(opcheck_cases("cpu", torch.float32)))
def test_opcheck(backend, device, dtype, name):
    op = getattr(REGISTERED[backend], name.removesuffix("novecs"))
    torch.library.opcheck(op, opcheck_cases(device, dtype)[name])


@pytest.mark.parametrize("backend,device", backend_params())
def test_ops_trace_under_torch_compile(backend, device):
    def step(params, grads, saved, vecs):
        sums = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=backend)
        scale = 0.05 / (sums[0].sqrt() + 1e-12)
        ops.perturb_(params, grads, saved, scale, backend=backend)
        ops.tilted_perturb_(params, grads, saved, vecs, scale, sums[1], backend=backend)
        ops.correct_restore_(params, grads, saved, vecs, sums[1], sums[0], backend=backend)
        return sums

    def run(fn):
        p, g, v = (make([(5,), (3, 4)], torch.float32, device, s) for s in range(3))
        saved = [torch.empty_like(t) for t in p]
        return [fn(p, g, saved, v)] + p + g + saved

    assert_each_close(run(step), run(torch.compile(step, backend="aot_eager", fullgraph=True)))


@pytest.mark.parametrize("backend,device", FUSED)
def test_registered_ops_of_empty_lists_do_nothing_and_give_zeros(backend, device):
    X = REGISTERED[backend]
    s = scalar(0.5, torch.float32, device)
    assert X.perturb_([], [], [], s, True) is None
    X.tilted_perturb_([], [], [], [], s, s)
    X.correct_restore_([], [], [], None, s, s)
    assert X.axpy_([], [], s) is None
    X.scale_copy_([], [], s)
    # No tensor says where to put the zeros: float32 on the CPU, as the fakes say.
    for out, n in ((X.dots([], 2, [0, 1, 1, 1]), 2), (X.weighted_sumsq([], []), 1), (X.residual_sumsq([], [], s), 1)):
        assert out.dtype == torch.float32 and out.device.type == "cpu" and out.tolist() == [0.0] * n
    empties = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    got = X.dots(empties + [torch.empty(0, device=device), torch.empty(0, 3, device=device)], 2, [0, 1, 1, 1])
    assert got.device.type == device and got.dtype == torch.float32 and got.tolist() == [0.0, 0.0]
    assert X.weighted_sumsq(empties, empties).tolist() == [0.0]
    assert X.residual_sumsq(empties, empties, s).tolist() == [0.0]
    assert X.dots(empties, 1, []).shape == (0,)
