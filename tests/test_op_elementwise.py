"""The element-wise ops (perturb_, tilted_perturb_, correct_restore_, axpy_, scale_copy_) on every
backend, device and dtype, against flat float64 computations; and their layout handling."""
import pytest
import torch

from xsam import ops
from xsam.ops import accumulation_dtype

from op_cases import assert_close_to_exact, backend_params, clone, f64, make, op_params, reference_result, scalar, \
    size_cases

VARIANTS = ["sam", "asam", "tilted", "restore-vecs", "restore-novecs", "axpy", "axpy-aliased", "scale_copy",
            "scale_copy-aliased"]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("backend,device,dtype,case", op_params())
def test_elementwise_op(backend, device, dtype, case, variant):
    """Each op on fresh outputs from the same inputs x0, g, v; `aliased`: the written list is read too."""
    shapes = size_cases(backend, device)[case]
    x0, g, v = (make(shapes, dtype, device, seed) for seed in (1, 2, 3))
    a, b = scalar(0.37, dtype, device), scalar(-0.21, dtype, device)
    aliased = variant.endswith("aliased")

    def run(name):
        x = clone(x0)
        if variant in ("sam", "asam", "tilted"):
            saved = [torch.full_like(t, float("nan")) for t in x0]
            if variant == "tilted":
                ops.tilted_perturb_(x, g, saved, v, a, b, backend=name)
            else:
                ops.perturb_(x, g, saved, a, adaptive=variant == "asam", backend=name)
            assert all(torch.equal(s, t) for s, t in zip(saved, x0)), "saved must hold the exact old weights"
        elif variant.startswith("restore"):  # x: the gradients; g: the saved weights
            w = make(shapes, dtype, device, 9)
            ops.correct_restore_(w, x, g, v if variant == "restore-vecs" else None, a, b, backend=name)
            assert all(torch.equal(s, t) for s, t in zip(w, g)), "the restore must be bit-exact"
        elif variant.startswith("axpy"):
            ops.axpy_(x, x if aliased else g, b, backend=name)
        else:
            x = x if aliased else [torch.zeros_like(t) for t in g]
            ops.scale_copy_(x, x if aliased else g, a, backend=name)
        return x

    X, G, V = f64(x0), f64(g), f64(v)
    read = X if aliased else G
    exact, magnitude = {  # the terms' sizes bound the rounding error
        "sam": (X + 0.37 * G, X.abs() + 0.37 * G.abs()),
        "asam": (X + 0.37 * X * X * G, X.abs() + 0.74 * (X * X * G).abs()),
        "tilted": (X + 0.37 * G - 0.21 * V, X.abs() + 0.37 * G.abs() + 0.21 * V.abs()),
        "restore-vecs": (0.37 * X + 0.21 * V, 0.37 * X.abs() + 0.21 * V.abs()),
        "restore-novecs": (0.37 * X, 0.37 * X.abs()),
        "axpy": (X - 0.21 * read, X.abs() + 0.21 * read.abs()),
        "scale_copy": (0.37 * read, 0.37 * read.abs()),
    }[variant.removesuffix("-aliased")]
    got = f64(run(backend))
    assert_close_to_exact(got, exact, magnitude, dtype, ref=reference_result(backend, lambda name: f64(run(name))))


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
