"""The element-wise ops (perturb_, tilted_perturb_, correct_restore_, axpy_, scale_copy_) on every
backend, device and dtype, against flat float64 computations; and their layout handling."""
import pytest
import torch

from xsam import ops
from xsam.ops import accumulation_dtype

from op_cases import ELEMENTWISE, assert_close_to_exact, backend_params, clone, elementwise_exact, f64, make, \
    op_params, reference_result, run_elementwise, scalar, size_cases

@pytest.mark.parametrize("variant", ELEMENTWISE)
@pytest.mark.parametrize("backend,device,dtype,case", op_params())
def test_elementwise_op(backend, device, dtype, case, variant):
    shapes = size_cases(backend, device)[case]
    x0, g, v = (make(shapes, dtype, device, seed) for seed in (1, 2, 3))

    def run(name):
        blank = lambda: [torch.full_like(t, float("nan")) for t in x0]  # noqa: E731
        return f64(run_elementwise(variant, clone(x0), g, v, name, blank)[0])

    exact, magnitude = elementwise_exact(variant, f64(x0), f64(g), f64(v))
    assert_close_to_exact(run(backend), exact, magnitude, dtype, ref=reference_result(backend, run))


@pytest.mark.parametrize("backend,device,dtype,case",
                         [p for p in op_params(cases=["edge"]) if p.values[0] != "reference"])
def test_fused_elementwise_rounds_once_from_the_accumulation_dtype(backend, device, dtype, case):
    """Fused kernels compute in fp32 (fp64) and round once on store: torch's own single rounding, up to
    FMA contraction. (The reference composes foreach ops, which may round between them.)"""
    src, y = make([(61,)], dtype, device, 15), make([(61,)], dtype, device, 16)
    third = scalar(1 / 3, dtype, device)
    acc = accumulation_dtype(dtype)
    dst = [torch.empty_like(src[0])]
    ops.scale_copy_(dst, src, third, backend=backend)
    want = (src[0].to(acc) * third).to(dtype)
    out = clone(y)
    ops.axpy_(out, src, third, backend=backend)
    want_axpy = (y[0].to(acc) + third * src[0].to(acc)).to(dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(dst[0], want, rtol=eps, atol=0)
    torch.testing.assert_close(out[0], want_axpy, rtol=2 * eps, atol=1e-30)


# ---------------------------------------------------------------- layouts the kernels cannot walk directly

@pytest.mark.parametrize("backend,device", backend_params())
def test_strided_views_are_read_and_written_correctly(backend, device):
    gen = torch.Generator().manual_seed(46)

    def views():
        base = torch.randn(2 * 67, generator=gen).to(device)
        mat = torch.randn(9, 13, generator=gen).to(device)
        return [base[::2], mat.t(), torch.randn(21, generator=gen).to(device)], base

    (w, w_base), (g, _), (v, _) = views(), views(), views()
    untouched = w_base[1::2].clone()
    w0 = clone(w)
    saved = [torch.empty_like(t) for t in w]
    s = scalar(0.25, torch.float32, device)
    ops.perturb_(w, g, saved, s, adaptive=True, backend=backend)
    W, G = f64(w0), f64(g)
    torch.testing.assert_close(f64(w), W + 0.25 * W * W * G, rtol=1e-5, atol=1e-6)
    assert torch.equal(f64(saved), W)
    assert torch.equal(w_base[1::2], untouched), "elements between the strided ones must not be written"
    g0 = clone(g)
    ops.correct_restore_(w, g, saved, v, s, s, backend=backend)
    torch.testing.assert_close(f64(g), 0.25 * f64(g0) - 0.25 * f64(v), rtol=1e-5, atol=1e-6)
    assert torch.equal(f64(w), W)
    torch.testing.assert_close(ops.dots([w, g, v], [(0, 1), (2, 2)], backend=backend),
                               ops.dots([w, g, v], [(0, 1), (2, 2)], backend="reference"), rtol=1e-5, atol=1e-6)
    assert torch.equal(w_base[1::2], untouched)


@pytest.mark.parametrize("backend,device", backend_params())
def test_size_one_dimensions_with_other_strides_need_no_copy(backend, device):
    # A contiguous (1, 16) weight has strides (16, 1); its gradient may come back as (1, 1).
    w = torch.randn(1, 16, device=device)
    g = torch.randn(16, 1, device=device).t()
    assert w.is_contiguous() and g.is_contiguous() and w.stride() != g.stride()
    want_w = w + 0.5 * g
    ops.perturb_([w], [g], [torch.empty_like(w)], 0.5, backend=backend)
    torch.testing.assert_close(w, want_w)


@pytest.mark.parametrize("backend,device", backend_params())
def test_mixed_devices_and_dtypes_are_grouped(backend, device):
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32]
    gen = torch.Generator().manual_seed(3)
    y = [torch.randn(5 + i, generator=gen, dtype=torch.float64).to(d).to(device) for i, d in enumerate(dtypes)]
    x = [torch.randn(5 + i, generator=gen, dtype=torch.float64).to(d).to(device) for i, d in enumerate(dtypes)]
    if device == "cuda":  # one group on each device: scalars and partial sums cross devices
        y[0], x[0] = y[0].cpu(), x[0].cpu()
    Y, X = f64(y), f64(x)
    total = ops.dots([y, x], [(0, 1)], backend=backend)
    assert total.dtype == torch.float64
    torch.testing.assert_close(total.cpu(), (Y @ X).reshape(1), rtol=1e-3, atol=1e-3)
    ops.axpy_(y, x, torch.tensor(0.5, device=device), backend=backend)
    torch.testing.assert_close(f64(y), Y + 0.5 * X, rtol=1e-2, atol=1e-2)
