"""The compiled op set (xsam._C through torch.ops.xsam) against the reference backend."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from xsam import XSAM, ops
from xsam.ops import native_backend as native
from xsam.ops import reference

pytestmark = pytest.mark.skipif(
    bool(native.UNAVAILABLE_REASON), reason=f"xsam._C is not built: {native.UNAVAILABLE_REASON}")

CPU_CHUNK = 16384  # kCpuChunk in csrc/xsam_ops.h
CUDA_CHUNK = 32768  # kCudaChunk in csrc/cuda/kernels.cuh
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# Tensor-shape lists: sizes around both chunk lengths, empty and 1-element tensors, and many
# small tensors (more than one CUDA launch's worth of tensor addresses).
CASES = {
    "edge": [(0,), (1,), (7,), (3, 5)],
    "chunk": [(CPU_CHUNK - 1,), (CPU_CHUNK,), (CPU_CHUNK + 1,), (CUDA_CHUNK - 1,), (CUDA_CHUNK + 1,)],
    "one_large_odd": [(3 * CPU_CHUNK + 5,)],
    "many": [(1 + (7 * i) % 23,) for i in range(300)],
}


def _cuda_ready():
    return torch.cuda.is_available() and native.has_kernel("cuda")


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not _cuda_ready(), reason="needs a CUDA GPU and xsam._C built with CUDA")]),
]


def make(shapes, dtype, device, seed, positive=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen, dtype=torch.float64)
        out.append((t.abs() + 0.5 if positive else t).to(dtype).to(device))
    return out


def clone(ts):
    return [t.clone() for t in ts]


def f64(ts):
    return torch.cat([t.reshape(-1).double().cpu() for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def scalar(value, dtype, device):
    return torch.full((), value, dtype=reference.accumulation_dtype(dtype), device=device)


def assert_close_to_exact(got, ref, exact, magnitude, dtype, roundings=2.0):
    """got may be at most about twice as far from the float64 answer as the reference's own
    result, plus a slack of `roundings` roundings in `dtype` relative to the terms' size
    (a sum of n terms may differ by about sqrt(n) roundings with a different summation order)."""
    got, ref = got.double().cpu(), ref.double().cpu()
    eps = torch.finfo(dtype).eps
    bound = 2 * (ref - exact).abs() + roundings * eps * magnitude + 1e-30
    err = (got - exact).abs()
    worst = (err - bound).argmax() if err.numel() else None
    assert err.numel() == 0 or bool((err <= bound).all()), (
        f"error {err[worst].item():.3g} exceeds bound {bound[worst].item():.3g} at {worst.item()} "
        f"(got {got[worst].item()}, exact {exact[worst].item()}, reference {ref[worst].item()})")


# --- reductions -----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dots_matches_reference(device, case, dtype):
    lists = [make(CASES[case], dtype, device, seed) for seed in range(3)]
    pairs = [(0, 0), (0, 1), (2, 1), (1, 2), (2, 2)]
    got = native.dots(lists, pairs)
    ref = reference.dots(lists, pairs)
    assert got.dtype == reference.accumulation_dtype(dtype) and got.shape == (len(pairs),)
    assert got.device.type == device
    flats = [f64(lst) for lst in lists]
    exact = torch.stack([flats[a] @ flats[b] for a, b in pairs])
    magnitude = torch.stack([(flats[a] * flats[b]).abs().sum() for a, b in pairs])
    assert_close_to_exact(got, ref, exact, magnitude, reference.accumulation_dtype(dtype),
                          roundings=max(2.0, len(flats[0]) ** 0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_sumsq_matches_reference(device, case, dtype):
    w, x = make(CASES[case], dtype, device, 1), make(CASES[case], dtype, device, 2)
    got = native.weighted_sumsq(w, x)
    ref = reference.weighted_sumsq(w, x)
    assert got.dtype == reference.accumulation_dtype(dtype) and got.shape == (1,)
    p = f64(w) * f64(x)
    exact = (p @ p).reshape(1)
    assert_close_to_exact(got, ref, exact, exact.abs(), reference.accumulation_dtype(dtype),
                          roundings=max(2.0, len(p) ** 0.5))


def test_dots_of_no_pairs_and_of_empty_lists():
    x = make([(5,)], torch.float32, "cpu", 0)
    assert native.dots([x], []).shape == (0,)
    torch.testing.assert_close(native.dots([[]], [(0, 0)]), reference.dots([[]], [(0, 0)]))


# --- elementwise ops ------------------------------------------------------------------------

def _check_lists(got, ref, exact, magnitude, dtype):
    assert_close_to_exact(f64(got), f64(ref), exact, magnitude, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_perturb_matches_reference(device, case, adaptive, dtype):
    shapes = CASES[case]
    w0, g = make(shapes, dtype, device, 1), make(shapes, dtype, device, 2)
    s = scalar(0.37, dtype, device)
    runs = {}
    for name, impl in (("native", native), ("reference", reference)):
        w, saved = clone(w0), [torch.full_like(t, float("nan")) for t in w0]
        impl.perturb_(w, g, saved, s, adaptive)
        runs[name] = w
        assert all(torch.equal(a, b) for a, b in zip(saved, w0)), "saved must be the exact old weights"
    W, G, S = f64(w0), f64(g), s.double().cpu()
    step = S * W * W * G if adaptive else S * G
    _check_lists(runs["native"], runs["reference"], W + step, W.abs() + step.abs(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("with_vecs", [True, False], ids=["vecs", "novecs"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_correct_restore_matches_reference(device, case, with_vecs, dtype):
    shapes = CASES[case]
    g0, saved, v = (make(shapes, dtype, device, seed) for seed in (1, 2, 3))
    a, b = scalar(1.7, dtype, device), scalar(-0.3, dtype, device)
    runs = {}
    for name, impl in (("native", native), ("reference", reference)):
        w, g = make(shapes, dtype, device, 9), clone(g0)
        impl.correct_restore_(w, g, saved, v if with_vecs else None, a, b)
        runs[name] = g
        assert all(torch.equal(x, y) for x, y in zip(w, saved)), "the restore must be bit-exact"
    A, B, G, V = a.double().cpu(), b.double().cpu(), f64(g0), f64(v)
    exact = A * G - B * V if with_vecs else A * G
    magnitude = (A * G).abs() + ((B * V).abs() if with_vecs else 0)
    _check_lists(runs["native"], runs["reference"], exact, magnitude, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("aliased", [False, True], ids=["distinct", "aliased"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_axpy_matches_reference(device, case, aliased, dtype):
    shapes = CASES[case]
    y0, x = make(shapes, dtype, device, 1), make(shapes, dtype, device, 2)
    alpha = scalar(-0.61, dtype, device)
    runs = {}
    for name, impl in (("native", native), ("reference", reference)):
        y = clone(y0)
        impl.axpy_(y, y if aliased else x, alpha)
        runs[name] = y
    Y, X, A = f64(y0), f64(y0 if aliased else x), alpha.double().cpu()
    _check_lists(runs["native"], runs["reference"], Y + A * X, Y.abs() + (A * X).abs(), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("aliased", [False, True], ids=["distinct", "aliased"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scale_copy_matches_reference(device, case, aliased, dtype):
    shapes = CASES[case]
    src = make(shapes, dtype, device, 2)
    s = scalar(0.123, dtype, device)
    runs = {}
    for name, impl in (("native", native), ("reference", reference)):
        d = clone(src) if aliased else [torch.zeros_like(t) for t in src]
        impl.scale_copy_(d, d if aliased else src, s)
        runs[name] = d
    X, S = f64(src), s.double().cpu()
    _check_lists(runs["native"], runs["reference"], S * X, (S * X).abs(), dtype)


def test_non_contiguous_tensors_are_handled_by_the_adapter():
    base = make([(6, 5), (4, 3)], torch.float32, "cpu", 0)
    ys = [t.t() for t in clone(base)]  # transposed views: dense but not contiguous
    xs = [t.t().contiguous() for t in make([(6, 5), (4, 3)], torch.float32, "cpu", 1)]  # other strides
    want = [y + 2 * x for y, x in zip(ys, xs)]
    native.axpy_(ys, xs, scalar(2.0, torch.float32, "cpu"))
    for y, w in zip(ys, want):
        torch.testing.assert_close(y, w)


def test_size_one_dimensions_with_different_strides_are_accepted():
    # A contiguous (1, 16) weight has strides (16, 1); its gradient may come back as (1, 1).
    w = torch.randn(1, 16)
    g = torch.randn(16, 1).t()
    assert w.is_contiguous() and g.is_contiguous() and w.stride() != g.stride()
    got = ops.dots([[w], [g]], [(0, 1)], backend="native")
    torch.testing.assert_close(got, reference.dots([[w], [g]], [(0, 1)]))
    saved = [torch.empty_like(w)]
    want_w = w + 0.5 * g
    ops.perturb_([w], [g], saved, 0.5, backend="native")
    torch.testing.assert_close(w, want_w)


def test_mismatched_lists_raise_a_clear_error():
    x = make([(3,), (4,)], torch.float32, "cpu", 0)
    with pytest.raises(RuntimeError, match="aligned"):
        torch.ops.xsam.axpy_(x, x[:1], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="same shape"):
        torch.ops.xsam.axpy_(x, x[::-1], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match=r"group the tensors by \(device, dtype\)"):
        torch.ops.xsam.axpy_(x, [t.double() for t in x], scalar(1.0, torch.float32, "cpu"))
    with pytest.raises(RuntimeError, match="num_lists"):
        torch.ops.xsam.dots(x, 3, [0, 0])


# --- determinism ----------------------------------------------------------------------------

def _reductions(dtype):
    lists = [make([(3 * CPU_CHUNK + 5,), (CPU_CHUNK + 1,), (11,)] * 3, dtype, "cpu", seed) for seed in range(2)]
    return torch.cat([native.dots(lists, [(0, 0), (0, 1)]).double(),
                      native.weighted_sumsq(lists[0], lists[1]).double()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reductions_are_bitwise_identical_for_1_and_2_threads(dtype):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _reductions(dtype)
        torch.set_num_threads(2)
        two = _reductions(dtype)
        again = _reductions(dtype)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two) and torch.equal(two, again)


def test_reductions_are_bitwise_identical_across_omp_num_threads():
    # A fresh process per setting, so OpenMP reads OMP_NUM_THREADS at start-up.
    code = textwrap.dedent("""
        import torch, xsam.ops.native_backend as native
        lists = [[torch.randn(n, generator=torch.Generator().manual_seed(s)) for n in (49157, 16385, 11)]
                 for s in range(2)]
        out = native.dots(lists, [(0, 0), (0, 1), (1, 1)])
        print(torch.get_num_threads(), out.numpy().tobytes().hex())
    """)
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        results.append(proc.stdout.split())
    assert [r[0] for r in results] == ["1", "2"]
    assert results[0][1] == results[1][1]


# --- the registered ops ---------------------------------------------------------------------

def _opcheck_cases(device, dtype):
    shapes = [(5,), (3, 4), (0,)]
    w, g, s, v = (make(shapes, dtype, device, seed) for seed in range(4))
    sc = scalar(0.5, dtype, device)
    return {
        "dots": (w + g + v, 3, [0, 0, 0, 1, 2, 1]),
        "weighted_sumsq": (w, g),
        "perturb_": (w, g, s, sc, True),
        "correct_restore_": (w, g, s, v, sc, scalar(0.25, dtype, device)),
        "correct_restore_novecs": (w, g, s, None, sc, sc),
        "axpy_": (w, g, sc),
        "scale_copy_": (w, g, sc),
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["dots", "weighted_sumsq", "perturb_", "correct_restore_",
                                  "correct_restore_novecs", "axpy_", "scale_copy_"])
def test_opcheck(device, dtype, name):
    args = _opcheck_cases(device, dtype)[name]
    op = getattr(torch.ops.xsam, "correct_restore_" if name.startswith("correct_restore_") else name)
    torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile():
    def step(params, grads, saved, vecs):
        sums = torch.ops.xsam.dots(grads + vecs, 2, [0, 0, 0, 1])
        scale = 0.05 / (sums[0].sqrt() + 1e-12)
        torch.ops.xsam.perturb_(params, grads, saved, scale, False)
        torch.ops.xsam.correct_restore_(params, grads, saved, vecs, sums[1], sums[0])
        return sums

    def run(fn):
        p, g, v = (make([(5,), (3, 4)], torch.float32, "cpu", s) for s in range(3))
        saved = [torch.empty_like(t) for t in p]
        sums = fn(p, g, saved, v)
        return [sums] + p + g

    eager = run(step)
    compiled = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


# --- through the optimizer --------------------------------------------------------------------

def _xsam_run(backend, hvp, dtype=torch.float64, steps=5):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(dtype)
    x = torch.randn(32, 6, dtype=dtype)
    y = torch.randint(0, 3, (32,))
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, alpha=0.5,
               eig_interval=2, power_iters=3, hvp=hvp, backend=backend, seed=3)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure, loss_fn=loss_fn if hvp == "exact" else None)
    return [p.detach().clone() for p in model.parameters()], opt.eigenvector()


@pytest.mark.parametrize("hvp", ["exact", "finite_difference"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_xsam_steps_with_native_equal_reference(hvp, dtype):
    w_native, v_native = _xsam_run("native", hvp, dtype)
    w_ref, v_ref = _xsam_run("reference", hvp, dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-5)
    if hvp == "finite_difference" and dtype == torch.float32:
        tol = dict(rtol=2e-3, atol=2e-4)  # FD steps amplify last-bit differences of the reductions
    for a, b in zip(w_native, w_ref):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(v_native, v_ref):
        torch.testing.assert_close(a, b, **tol)


# --- missing extension --------------------------------------------------------------------------

def test_missing_extension_makes_native_raise_with_the_reason():
    # sys.modules[name] = None makes `import xsam._C` fail as if the .so were absent.
    code = textwrap.dedent("""
        import sys
        sys.modules["xsam._C"] = None
        import torch, xsam
        from xsam import ops
        x = [torch.ones(3)]
        assert ops.dots([x], [(0, 0)]).item() == 3.0  # auto still works (reference)
        try:
            ops.dots([x], [(0, 0)], backend="native")
        except ops.BackendUnavailableError as exc:
            print(exc)
        else:
            raise SystemExit("backend='native' did not raise")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "xsam._C is not built" in proc.stdout and "pip install --no-build-isolation" in proc.stdout


def test_availability_reasons():
    assert native.availability(torch.device("cpu"), torch.float32) is None
    assert "not supported" in native.availability(torch.device("cpu"), torch.int32)
    if not native.has_kernel("cuda"):
        assert "without CUDA" in native.availability(torch.device("cuda"), torch.float32)
