"""Checks of the CUDA kernels that only a GPU can run: launch boundaries and odd offsets, determinism, mixed
CPU/CUDA lists, streams and graphs. bench/device_check.sh runs them (`test_sanitize_*` under compute-sanitizer)."""
from __future__ import annotations

import functools

import pytest
import torch

from xsam import ops
from xsam.ops import accumulation_dtype

from helpers import same_bits
from op_cases import DTYPES, ELEMENTWISE, MANY_PAIRS, NATIVE_CHUNK, assert_close_to_exact, \
    assert_repeated_pairs_agree, dots_exact, elementwise_exact, f64, run_elementwise, summation_roundings, \
    sumsq_exact, why_not

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(why_not("native", "cuda") is not None,
                                                   reason=str(why_not("native", "cuda")))]

DEVICE = "cuda"
CHUNK = NATIVE_CHUNK["cuda"]
MANY = 1700  # tensors per call: more than one native launch holds (1,624 for one list)
BIG = 321 * CHUNK + 7  # elements of one tensor: more than 320 chunks
GUARD = 7.0  # the element just before each odd-offset view: no kernel may write it
SLEEP_CYCLES = int(2e8)  # about 0.1 s of GPU time queued ahead of an op
REVIEW_SHAPES = [((7 * i) % 23,) for i in range(MANY)] + [(BIG,)]


@functools.lru_cache(maxsize=64)
def _host_values(shapes: tuple, dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def review_lists(shapes, dtype, seed, fill=None) -> list[torch.Tensor]:
    """Tensors of `shapes` on the GPU (random by seed, or `fill`); every third one, shifted by the seed, is a
    view that starts at an odd element of a buffer whose element 0 holds GUARD."""
    shapes = tuple(shapes)
    host = _host_values(shapes, dtype, seed) if fill is None else [torch.full(s, fill, dtype=dtype) for s in shapes]
    out = []
    for i, (shape, values) in enumerate(zip(shapes, host)):
        if (i + seed) % 3 == 0:
            buffer = torch.full((values.numel() + 1,), GUARD, dtype=dtype, device=DEVICE)
            tensor = buffer[1:].view(shape)
            tensor.copy_(values)
        else:
            tensor = values.to(DEVICE, copy=True)
        out.append(tensor)
    return out


def guards_intact(tensors) -> bool:
    guards = [t._base.reshape(-1)[0] for t in tensors if t._base is not None]
    return not guards or bool((torch.stack(guards) == GUARD).all())


# ----- every op across the launch boundaries ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sanitize_elementwise_ops_across_launches_and_odd_offsets(dtype):
    shapes = REVIEW_SHAPES
    g, v = review_lists(shapes, dtype, 2), review_lists(shapes, dtype, 3)
    X, G, V = f64(review_lists(shapes, dtype, 1)), f64(g), f64(v)
    for variant in ELEMENTWISE:
        got, written = run_elementwise(variant, review_lists(shapes, dtype, 1), g, v, "native",
                                       lambda: review_lists(shapes, dtype, 4, fill=float("nan")))
        assert_close_to_exact(f64(got), *elementwise_exact(variant, X, G, V), dtype)
        assert all(guards_intact(t) for t in written), f"{variant} wrote outside a view"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sanitize_reductions_across_launches_and_odd_offsets(dtype):
    shapes = REVIEW_SHAPES
    lists = [review_lists(shapes, dtype, seed) for seed in range(5)]
    lists.append(lists[0])
    acc = accumulation_dtype(dtype)
    flats = [f64(lst) for lst in lists]
    roundings = summation_roundings(len(flats[0]))

    got = ops.dots(lists, MANY_PAIRS, backend="native")
    assert got.dtype == acc and got.shape == (len(MANY_PAIRS),)
    assert_close_to_exact(got, *dots_exact(flats, MANY_PAIRS), acc, roundings=roundings)
    assert_repeated_pairs_agree(got)
    assert_close_to_exact(ops.weighted_sumsq(lists[0], lists[1], backend="native"),
                          *sumsq_exact("weighted_sumsq", flats[0], flats[1]), acc, roundings=roundings)
    assert_close_to_exact(ops.residual_sumsq(lists[2], lists[3], 0.75, backend="native"),
                          *sumsq_exact("residual_sumsq", flats[2], flats[3]), acc, roundings=roundings)


# ----- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reductions_are_bitwise_identical_over_repeated_calls(backend, dtype):
    if why_not(backend, DEVICE, dtype):
        pytest.skip(why_not(backend, DEVICE, dtype))
    shapes = [(5 * CHUNK + 3,), (1000,), (17,), (0,)] * 30 + [(3 * 65536 + 11,)]
    x, y, u, v = (review_lists(shapes, dtype, seed) for seed in range(4))

    def sums():
        return torch.cat([ops.dots([x, y, u], [(0, 0), (0, 1), (1, 1), (2, 0), (2, 2)], backend=backend),
                          ops.weighted_sumsq(x, y, backend=backend).reshape(1),
                          ops.residual_sumsq(u, v, 0.5, backend=backend).reshape(1)])

    first = sums()
    for _ in range(4):
        assert torch.equal(sums(), first)


# ----- mixed CPU/CUDA lists, streams, graphs ------------------------------------------------------------

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_mixed_cpu_and_cuda_lists_see_gpu_work_queued_ahead(backend):
    n = 4096
    # A scalar written by GPU work still queued when the op is called: the CPU group must wait for it.
    y = [torch.ones(n), torch.ones(n, device=DEVICE)]
    x = [torch.full((n,), 2.0), torch.full((n,), 2.0, device=DEVICE)]
    alpha = torch.zeros((), device=DEVICE)
    torch.cuda._sleep(SLEEP_CYCLES)
    alpha.fill_(0.5)
    ops.axpy_(y, x, alpha, backend=backend)
    assert torch.equal(y[0], torch.full((n,), 2.0)) and torch.equal(y[1].cpu(), torch.full((n,), 2.0))

    # A CPU scalar changed right after the call: the copy to the GPU must have taken the old value.
    beta = torch.tensor(0.25)
    torch.cuda._sleep(SLEEP_CYCLES)
    ops.axpy_(y, x, beta, backend=backend)
    beta.fill_(100.0)
    assert torch.equal(y[1].cpu(), torch.full((n,), 2.5)) and torch.equal(y[0], torch.full((n,), 2.5))

    # Partial sums of a CUDA group whose input is written by queued work, added on the CPU (the first
    # group's device), then on the GPU (CUDA group first).
    z = [torch.ones(n), torch.ones(n, device=DEVICE)]
    torch.cuda._sleep(SLEEP_CYCLES)
    z[1].mul_(3.0)
    total = ops.dots([z, z], [(0, 0)], backend=backend)
    assert total.device.type == "cpu" and total.item() == n + 9 * n
    flipped = [z[1], z[0]]
    torch.cuda._sleep(SLEEP_CYCLES)
    flipped[0].mul_(2.0)
    total = ops.dots([flipped, flipped], [(0, 0)], backend=backend)
    assert total.device.type == "cuda" and total.item() == 36 * n + n


def test_native_kernels_run_on_the_current_stream_of_each_of_two_streams():
    shapes = [(CHUNK + 5,)] * 3 + [(100,)] * 800
    results = {}
    for name in ("first", "second"):
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x = [torch.zeros(s, device=DEVICE) for s in shapes]
            y = [torch.ones(s, device=DEVICE) for s in shapes]
            torch.cuda._sleep(SLEEP_CYCLES)  # what follows lands after this, on `side` only
            torch._foreach_add_(x, 2.0 if name == "first" else 3.0)
            ops.axpy_(y, x, torch.full((), 0.5, device=DEVICE), backend="native")
            results[name] = (ops.dots([y], [(0, 0)], backend="native"), y)
    torch.cuda.synchronize()
    for name, value in (("first", 2.0), ("second", 2.5)):
        sums, y = results[name]
        assert all(bool((t == value).all()) for t in y), f"{name}: a kernel ran ahead of its stream's fill"
        assert sums.item() == value * value * sum(s[0] for s in shapes)


def test_native_ops_capture_in_a_cuda_graph_and_replay_bit_for_bit():
    shapes = [((7 * i) % 23 + 1,) for i in range(900)] + [(3 * CHUNK + 5,)]  # several launches per op
    values = [review_lists(shapes, torch.float32, seed) for seed in range(6)]

    def step(w, g, v, saved):
        sums = ops.dots([g, v], [(0, 0), (0, 1)], backend="native")
        ops.perturb_(w, g, saved, 0.05 / (sums[0].sqrt() + 1e-12), backend="native")
        residual = ops.residual_sumsq(g, v, sums[1], backend="native")
        ops.tilted_perturb_(w, g, saved, v, sums[1], -sums[1], backend="native")
        ops.correct_restore_(w, g, saved, v, 1.0 / (sums[0].sqrt() + 1e-12), 0.2 * sums[1], backend="native")
        return torch.cat([sums, residual.reshape(1)])

    def fresh(k):
        return [[t.clone() for t in values[k + i]] for i in range(3)]

    static_w, static_g, static_v = fresh(0)
    static_saved = [torch.empty_like(t) for t in static_w]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(static_w, static_g, static_v, static_saved)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_w, static_g, static_v, static_saved)
    for k in (0, 3):
        w, g, v = fresh(k)
        want = step(w, g, v, [torch.empty_like(t) for t in w])
        for static, new in zip((static_w, static_g, static_v), fresh(k)):
            torch._foreach_copy_(static, new)
        graph.replay()
        assert torch.equal(static_out, want)
        assert same_bits(static_w, w) and same_bits(static_g, g)
