"""Shared helpers for the op tests: every op x backend x device x dtype through the public op layer, against
flat float64 oracles, on sizes that cross each backend's chunk and block."""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

from xsam import XSAM, ops
from xsam.ops import reference
from xsam.ops.dispatch import unavailable_reason
from xsam.ops.native_backend import CONSTANTS as NATIVE  # None without xsam._C: its cases skip
from xsam.ops.verify.cases import TRITON_INTERPRETER_LAUNCH, launch_context

from helpers import closure_of, make_model, same_bits

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BACKENDS = ("reference", "native", "triton")
DEVICES = ("cpu", "cuda")
# The compiled kernels' chunk by device type, as xsam._C exports it (1 without the extension).
NATIVE_CHUNK = {device: NATIVE.chunk(device) if NATIVE else 1 for device in DEVICES}
TRITON_CPU_CHUNK, TRITON_CPU_BLOCK = TRITON_INTERPRETER_LAUNCH


def why_not(backend: str, device: str, dtype: torch.dtype = torch.float32) -> str | None:
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU (none on this machine)"
    return unavailable_reason(backend, torch.device(device), dtype)


def size_cases(backend: str, device: str) -> dict[str, list[tuple[int, ...]]]:
    """Shape lists: empty and 1-element tensors, many small tensors, and this backend's boundaries."""
    cases = {"edge": [(0,), (1,), (7,), (3, 5), (2, 1, 4)], "many": [(1 + (7 * i) % 23,) for i in range(300)],
             "chunk": [(5000,), (3, 1001)]}
    if backend == "native":
        c = NATIVE_CHUNK[device]
        cases["chunk"] = [(c - 1,), (c,), (c + 1,), (3 * c + 5,)]
    elif backend == "triton" and device == "cpu":
        c, b = TRITON_CPU_CHUNK, TRITON_CPU_BLOCK
        cases["chunk"] = [(b - 1,), (b,), (b + 1,), (c - 1,), (c,), (c + 1,), (0,), (3 * c + 5,)]
        cases["many"] = [(i % 5,) for i in range(300)]  # 300 tiny tensors, empty ones included
    elif backend == "triton":
        c = 65536  # the chunk of the default launch config
        cases["chunk"] = [(c - 1,), (c + 1,), (3 * c + 5,)]
    return cases


def op_params(dtypes=DTYPES, cases=None):
    """(backend, device, dtype, case) for every available combination; the rest are skipped with the reason."""
    out = []
    for backend, device, dtype in itertools.product(BACKENDS, DEVICES, dtypes):
        names = size_cases(backend, device)
        for case in names if cases is None else [c for c in cases if c in names]:
            if (backend, device, case) == ("triton", "cpu", "many") and dtype in (torch.float16, torch.float64):
                continue  # 300 tensors in the interpreter once per accumulation path is enough
            out.append(_param(backend, device, dtype, case, id=f"{backend}-{device}-{str(dtype)[6:]}-{case}"))
    return out


def backend_params(devices=DEVICES, backends=BACKENDS):
    """(backend, device) pairs, skipped with the reason where unavailable."""
    return [_param(backend, device, id=f"{backend}-{device}") for backend in backends for device in devices]


def _param(backend, device, *more, id):
    marks = [pytest.mark.cuda] if device == "cuda" else []
    why = why_not(backend, device, *more[:1])
    if why:
        marks.append(pytest.mark.skip(reason=why))
    return pytest.param(backend, device, *more, marks=marks, id=id)


def launch_config_for(backend: str, device: str):
    """Tiny Triton launches in the interpreter; others unchanged."""
    return launch_context(backend, torch.device(device)) if device else contextlib.nullcontext()


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
    return torch.cat([t.reshape(-1).double().cpu() for t in ts]) if len(ts) else torch.zeros(0, dtype=torch.float64)


def scalar(value, dtype, device):
    return torch.full((), value, dtype=reference.accumulation_dtype(dtype), device=device)


ELEMENTWISE = ["sam", "asam", "tilted", "restore-vecs", "restore-novecs", "axpy", "axpy-aliased", "scale_copy",
               "scale_copy-aliased"]


def run_elementwise(variant, x, g, v, backend, blank):
    """One element-wise case (scalars 0.37 and -0.21) writing ``x`` and new lists ``blank()`` gives; an
    ``aliased`` case reads the list it writes. Returns the result and every list written."""
    a, b = scalar(0.37, x[0].dtype, x[0].device), scalar(-0.21, x[0].dtype, x[0].device)
    aliased = variant.endswith("aliased")
    if variant in ("sam", "asam", "tilted"):
        x0, saved = clone(x), blank()
        if variant == "tilted":
            ops.tilted_perturb_(x, g, saved, v, a, b, backend=backend)
        else:
            ops.perturb_(x, g, saved, a, adaptive=variant == "asam", backend=backend)
        assert same_bits(saved, x0), f"{variant}: saved must hold the exact old weights"
        return x, [x, saved]
    if variant.startswith("restore"):  # x: the gradients; g: the saved weights
        w = blank()
        ops.correct_restore_(w, x, g, v if variant == "restore-vecs" else None, a, b, backend=backend)
        assert same_bits(w, g), f"{variant}: the restore must be bit-exact"
        return x, [w, x]
    if variant.startswith("axpy"):
        ops.axpy_(x, x if aliased else g, b, backend=backend)
        return x, [x]
    out = x if aliased else blank()
    ops.scale_copy_(out, x if aliased else g, a, backend=backend)
    return out, [out]


def elementwise_exact(variant, X, G, V):
    """(float64 result, size of its terms) of ``run_elementwise`` on the flat inputs X, G, V."""
    read = X if variant.endswith("aliased") else G
    return {
        "sam": (X + 0.37 * G, X.abs() + 0.37 * G.abs()),
        "asam": (X + 0.37 * X * X * G, X.abs() + 0.74 * (X * X * G).abs()),
        "tilted": (X + 0.37 * G - 0.21 * V, X.abs() + 0.37 * G.abs() + 0.21 * V.abs()),
        "restore-vecs": (0.37 * X + 0.21 * V, 0.37 * X.abs() + 0.21 * V.abs()),
        "restore-novecs": (0.37 * X, 0.37 * X.abs()),
        "axpy": (X - 0.21 * read, X.abs() + 0.21 * read.abs()),
        "scale_copy": (0.37 * read, 0.37 * read.abs()),
    }[variant.removesuffix("-aliased")]


def opcheck_cases(device, dtype) -> dict[str, tuple]:
    """Arguments of each registered op (``correct_restore_novecs``: correct_restore_ without vectors) for
    ``torch.library.opcheck``: a matrix and an empty tensor among the lists."""
    shapes = [(5,), (3, 4), (0,)]
    w, g, s, v = (make(shapes, dtype, device, seed) for seed in range(4))
    sc, sb = scalar(0.5, dtype, device), scalar(0.25, dtype, device)
    return {
        "dots": (w + g + v, 3, [0, 0, 0, 1, 2, 1]),
        "weighted_sumsq": (w, g),
        "residual_sumsq": (w, g, sc),
        "perturb_": (w, g, s, sc, True),
        "tilted_perturb_": (w, g, s, v, sc, sb),
        "correct_restore_": (w, g, s, v, sc, sb),
        "correct_restore_novecs": (w, g, s, None, sc, sc),
        "axpy_": (w, g, sc),
        "scale_copy_": (w, g, sc),
    }


# Every pair of 5 lists, two reversed, and list 5 = list 0 again (the same tensors under another number).
MANY_PAIRS = [(a, b) for a in range(5) for b in range(a, 5)] + [(1, 0), (4, 2), (5, 0), (5, 5)]


def assert_repeated_pairs_agree(got):
    """A pair of MANY_PAIRS named twice, or through the same tensors under two list numbers: the same bits."""
    assert torch.equal(got[1], got[15]) and torch.equal(got[0], got[17]) and torch.equal(got[0], got[18])


def summation_roundings(n):
    """A sum of n terms may differ by about sqrt(n) roundings with another summation order."""
    return max(2.0, n ** 0.5)


def dots_exact(flats, pairs):
    """(float64 sums, size of their terms) of ``dots`` of the flat lists ``flats``."""
    return (torch.stack([flats[a] @ flats[b] for a, b in pairs]),
            torch.stack([(flats[a] * flats[b]).abs().sum() for a, b in pairs]))


def sumsq_exact(op, X, Y, lam=0.75):
    """(float64 result, size of its terms) of ``weighted_sumsq(X, Y)`` or ``residual_sumsq(X, Y, lam)``."""
    if op == "weighted_sumsq":
        p = X * Y
        return p @ p, p @ p
    r = X - lam * Y
    # Each term (u - lam v) is formed in the accumulation dtype: about one rounding of |u| per element.
    return r @ r, (2 * r.abs() * (X.abs() + lam * Y.abs())).sum()


def assert_close_to_exact(got, exact, magnitude, dtype, *, ref=None, roundings=2.0):
    """``got`` is within ``roundings`` roundings in ``dtype`` (relative to the terms' size) of the
    float64 answer; with ``ref`` (the reference backend's result), also up to twice the
    reference's own error (a fused kernel must be at least about as accurate as the reference)."""
    got = got.double().cpu()
    exact = exact.double().cpu()
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    # Relative to the terms' size, plus the spacing of subnormal numbers (tiny * eps), where
    # rounding errors stop shrinking with the values.
    bound = roundings * eps * (magnitude.double().cpu() + tiny) + 1e-300
    if ref is not None:
        bound = bound + 2 * (ref.double().cpu() - exact).abs()
    err = (got - exact).abs()
    assert got.shape == exact.shape, (got.shape, exact.shape)
    if err.numel() == 0:
        return
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), (
        f"error {err[worst].item():.3g} exceeds bound {bound[worst].item():.3g} at {worst.item()} "
        f"(got {got[worst].item()}, exact {exact[worst].item()})")


def reference_result(backend: str, run):
    """``run("reference")`` for comparison, or None when ``backend`` is the reference itself."""
    return None if backend == "reference" else run("reference")


def xsam_run(backend, hvp, *, dtype=torch.float64, device="cpu", steps=5, adaptive=False):
    """(weights, eigenvector, diagnostics) after ``steps`` X-SAM steps of a small MLP on one fixed batch."""
    model = make_model(6, 8, 3, dtype=dtype).to(device)
    x, y = torch.randn(32, 6, dtype=dtype).to(device), torch.randint(0, 3, (32,)).to(device)
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, rho=0.05, alpha=0.5, adaptive=adaptive,
               eig_interval=2, power_iters=2, hvp=hvp, backend=backend, seed=7)
    for _ in range(steps):
        opt.zero_grad()
        opt.step(closure_of(loss_fn), loss_fn=loss_fn if hvp == "exact" else None)
    return [p.detach().clone() for p in model.parameters()], opt.eigenvector(), opt.diagnostics()
