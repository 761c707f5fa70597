"""Adapter from the op set to the compiled extension ``xsam._C`` (``torch.ops.xsam.*``).

Importing ``xsam._C`` runs its ``TORCH_LIBRARY(xsam, ...)`` registrations (CPU always,
CUDA when it was built with nvcc). This module registers the fake (meta) implementations
so ``torch.compile`` can trace through the ops, and exposes the functions of
``xsam.ops.reference`` with the same signatures.

When the extension is not built, ``UNAVAILABLE_REASON`` says why (with the import error),
so ``backend="native"`` raises ``BackendUnavailableError`` with that reason.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import build_info
from .reference import accumulation_dtype

Tensors = Sequence[Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
OP_NAMES = ("dots", "weighted_sumsq", "perturb_", "correct_restore_", "axpy_", "scale_copy_")


def _load_extension() -> str | None:
    """Import xsam._C (running its op registrations); None on success, else why it failed."""
    try:
        from xsam import _C  # noqa: F401  (imported for its TORCH_LIBRARY side effect)
    except ImportError as exc:
        return build_info.missing_extension_reason(exc)  # says why the build failed, if it did
    return None


UNAVAILABLE_REASON = _load_extension()


def has_kernel(device_type: str, op: str = "dots") -> bool:
    """Whether xsam._C registered a kernel for this device type ("cpu", "cuda")."""
    if UNAVAILABLE_REASON:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"xsam::{op}", key)


def _register_fakes() -> None:
    # The fakes describe outputs only (the mutating ops return nothing), which is all
    # FakeTensor propagation and torch.compile need; the schemas declare the mutations.
    @torch.library.register_fake("xsam::dots")
    def _dots_fake(tensors, num_lists, pairs):
        return tensors[0].new_empty((len(pairs) // 2,), dtype=accumulation_dtype(tensors[0].dtype))

    @torch.library.register_fake("xsam::weighted_sumsq")
    def _weighted_sumsq_fake(weights, xs):
        return xs[0].new_empty((1,), dtype=accumulation_dtype(xs[0].dtype))

    @torch.library.register_fake("xsam::perturb_")
    def _perturb_fake(params, grads, saved, scale, adaptive):
        return None

    @torch.library.register_fake("xsam::correct_restore_")
    def _correct_restore_fake(params, grads, saved, vecs, a, b):
        return None

    @torch.library.register_fake("xsam::axpy_")
    def _axpy_fake(ys, xs, alpha):
        return None

    @torch.library.register_fake("xsam::scale_copy_")
    def _scale_copy_fake(dsts, srcs, scale):
        return None


if not UNAVAILABLE_REASON:
    _register_fakes()


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    if UNAVAILABLE_REASON:
        return UNAVAILABLE_REASON
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by xsam._C (float32, float64, float16, bfloat16 are)"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"xsam._C has kernels for cpu and cuda only, not {device.type}"
    if not has_kernel(device.type):
        if device.type == "cuda":
            return ("xsam._C was built without CUDA kernels (XSAM_NO_CUDA=1, a CPU-only torch, or no nvcc "
                    "at build time); rebuild with CUDA_HOME pointing at the CUDA toolkit")
        return f"xsam._C registered no {device.type} kernels"
    # A GPU the build compiled no code for would fail at the first launch ("no kernel image").
    return build_info.native_coverage_reason(device)


# --- layout -------------------------------------------------------------------------------
# The kernels walk tensor i of every list as flat arrays with one index, so they need the
# tensors at each index dense with identical strides. Contiguous tensors (the usual case)
# pass untouched; otherwise that index gets contiguous copies, and written ones are copied
# back after the op.

def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and without gaps (contiguous up to a permutation of the dimensions)."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _compatible(ts: Sequence[Tensor]) -> bool:
    if all(t.is_contiguous() for t in ts):
        return True
    first = ts[0]
    # Strides of size-1 dimensions are arbitrary; the other dimensions must agree.
    order = [st for st, sz in zip(first.stride(), first.shape) if sz != 1]
    return all(_is_dense(t) and [st for st, sz in zip(t.stride(), t.shape) if sz != 1] == order for t in ts)


def _dense(lists: Sequence[Tensors], written: Sequence[bool]):
    """(lists the kernels can take, [(original, temporary)] to copy back afterwards)."""
    n = len(lists[0])
    bad = [i for i in range(n) if not _compatible([lst[i] for lst in lists])]
    if not bad:
        return [list(lst) for lst in lists], []
    out = [list(lst) for lst in lists]
    written_ids = {id(lst[i]) for j, lst in enumerate(lists) if written[j] for i in bad}
    copy_back = []
    temps: dict[int, Tensor] = {}  # one temporary per distinct tensor keeps aliasing (dst is src)
    for i in bad:
        for j, lst in enumerate(lists):
            t = lst[i]
            if id(t) not in temps:
                temps[id(t)] = t.contiguous()  # a copy unless t already is contiguous
                if id(t) in written_ids and temps[id(t)] is not t:
                    copy_back.append((t, temps[id(t)]))
            out[j][i] = temps[id(t)]
    return out, copy_back


def _finish(copy_back) -> None:
    for original, temporary in copy_back:
        original.copy_(temporary)


# --- op set ---------------------------------------------------------------------------------

def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]]) -> Tensor:
    if len(lists[0]) == 0:
        return torch.zeros(len(pairs))
    lists, _ = _dense(lists, [False] * len(lists))
    flat = [t for lst in lists for t in lst]
    return torch.ops.xsam.dots(flat, len(lists), [int(i) for pair in pairs for i in pair])


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    if len(xs) == 0:
        return torch.zeros(1)
    (weights, xs), _ = _dense([weights, xs], [False, False])
    return torch.ops.xsam.weighted_sumsq(weights, xs)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    if len(params) == 0:
        return
    (params, grads, saved), back = _dense([params, grads, saved], [True, False, True])
    torch.ops.xsam.perturb_(params, grads, saved, scale, bool(adaptive))
    _finish(back)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None,
                     a: Tensor, b: Tensor) -> None:
    if len(params) == 0:
        return
    if vecs is None:
        (params, grads, saved), back = _dense([params, grads, saved], [True, True, False])
    else:
        (params, grads, saved, vecs), back = _dense([params, grads, saved, vecs], [True, True, False, False])
    torch.ops.xsam.correct_restore_(params, grads, saved, vecs, a, b)
    _finish(back)


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    if len(ys) == 0:
        return
    (ys, xs), back = _dense([ys, xs], [True, False])
    torch.ops.xsam.axpy_(ys, xs, alpha)
    _finish(back)


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    if len(dsts) == 0:
        return
    (dsts, srcs), back = _dense([dsts, srcs], [True, False])
    torch.ops.xsam.scale_copy_(dsts, srcs, scale)
    _finish(back)
