"""Adapter from the op set to the fused multi-tensor Triton kernels in ``xsam.kernels``.

One function per op of ``xsam.ops.contract``, with the schema's arguments. The kernels need
contiguous tensors of one dtype per call:
- a call with a non-contiguous tensor raises ``LayoutError``, and the op layer retries it
  with contiguous copies (correct, just slower);
- a list whose dtype differs from the group's (the dispatcher groups by the
  first list only) runs the whole call on the reference implementation.
Writes through raw pointers are invisible to autograd, so the adapter bumps the
version counters of every written tensor, as PyTorch's own in-place ops do.

Where it runs: CUDA tensors with compiled Triton; CPU tensors only when
``TRITON_INTERPRET=1`` was set before ``xsam.kernels`` was imported (the
interpreter executes the kernels with numpy and can only address host memory).
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .layout import LayoutError

try:
    from xsam.kernels import multi_tensor as _mt
except Exception as exc:  # triton missing or broken: report it, never break `import xsam`
    _mt = None
    UNAVAILABLE_REASON = f"Triton cannot be imported ({type(exc).__name__}: {exc}); install triton"

Tensors = Sequence[Tensor]
_is_contiguous = Tensor.is_contiguous
_increment_version = torch._C._increment_version


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the kernels can run (device, dtype) tensors in this process, else why not."""
    device = torch.device(device)
    if dtype not in _mt.SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in _mt.SUPPORTED_DTYPES)
        return f"the Triton kernels support {names}, not {dtype}"
    if device.type == "cpu":
        if _mt.INTERPRETING:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET was set after xsam.kernels was imported, so the kernels were "
                    "built for a GPU; set it before importing xsam (or triton) to run on CPU tensors")
        return ("Triton runs CPU tensors only in its interpreter; set TRITON_INTERPRET=1 before "
                "importing xsam (slow: for tests), or use a CUDA device")
    if device.type == "cuda":
        if _mt.INTERPRETING:
            return ("xsam.kernels was imported with TRITON_INTERPRET=1, whose interpreter can only "
                    "address host memory; unset TRITON_INTERPRET to run CUDA tensors")
        if not torch.cuda.is_available():
            return "CUDA is not available in this process"
        return None
    return f"the Triton kernels run on CUDA devices (or CPU under the interpreter), not {device.type}"


def _require_contiguous(lists) -> None:
    if not all(all(map(_is_contiguous, lst)) for lst in lists if lst is not None):
        raise LayoutError("the Triton kernels need contiguous tensors", contiguous_only=True)


def _bump_versions(written) -> None:
    for lst in written:
        _increment_version(lst)


def dots(tensors: Tensors, num_lists: int, pairs: Sequence[int]) -> Tensor:
    n = len(tensors) // num_lists
    lists = [list(tensors[j * n:(j + 1) * n]) for j in range(num_lists)]
    if n == 0:
        return reference.dots(tensors, num_lists, pairs)
    _require_contiguous(lists)
    try:
        return _mt.dots(lists, list(zip(pairs[::2], pairs[1::2])))
    except _mt.MixedDtypeError:
        return reference.dots(tensors, num_lists, pairs)


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    if len(xs) == 0:
        return reference.weighted_sumsq(weights, xs)
    _require_contiguous([weights, xs])
    try:
        return _mt.weighted_sumsq(list(weights), list(xs))
    except _mt.MixedDtypeError:
        return reference.weighted_sumsq(weights, xs)


def residual_sumsq(us: Tensors, vs: Tensors, lam: Tensor) -> Tensor:
    # No Triton kernel yet: the reference serves it (refreshes only).
    return reference.residual_sumsq(us, vs, lam)


def _run(op, lists: list, written: tuple[int, ...], fallback) -> None:
    """Launch ``op`` on contiguous lists; a dtype mix runs ``fallback`` (the reference) instead."""
    _require_contiguous(lists)
    try:
        op()
    except _mt.MixedDtypeError:  # raised while planning, before anything was written
        fallback()
        return
    _bump_versions([lists[k] for k in written])


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    if len(params) == 0:
        return
    _run(lambda: _mt.perturb_(params, grads, saved, scale, adaptive), [params, grads, saved], (0, 2),
         lambda: reference.perturb_(params, grads, saved, scale, adaptive))


def tilted_perturb_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors, a: Tensor, b: Tensor) -> None:
    # No Triton kernel yet: the reference serves it.
    reference.tilted_perturb_(params, grads, saved, vecs, a, b)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None,
                     a: Tensor, b: Tensor) -> None:
    if len(params) == 0:
        return
    _run(lambda: _mt.correct_restore_(params, grads, saved, vecs, a, b), [params, grads, saved, vecs], (0, 1),
         lambda: reference.correct_restore_(params, grads, saved, vecs, a, b))


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    if len(ys) == 0:
        return
    _run(lambda: _mt.axpy_(ys, xs, alpha), [ys, xs], (0,), lambda: reference.axpy_(ys, xs, alpha))


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    if len(dsts) == 0:
        return
    _run(lambda: _mt.scale_copy_(dsts, srcs, scale), [dsts, srcs], (0,),
         lambda: reference.scale_copy_(dsts, srcs, scale))
