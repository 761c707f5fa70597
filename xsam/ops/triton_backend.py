"""Adapter from the op set to the fused multi-tensor Triton kernels in ``xsam.kernels``.

Same functions and signatures as ``xsam.ops.reference``. The kernels need
contiguous tensors of one dtype per call; this adapter makes that true:
- non-contiguous tensors are copied to contiguous scratch and the written ones
  copied back afterwards (correct, just slower);
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


def _group_dtype_mismatch(lists: Sequence[Tensors]) -> bool:
    dtype = lists[0][0].dtype
    return any(t.dtype != dtype for lst in lists[1:] for t in lst)


def _contiguous(lists: list[Tensors], written: Sequence[int]) -> tuple[list[Tensors], list[tuple[Tensor, Tensor]]]:
    """Lists with every tensor contiguous, and the (original, scratch) pairs to copy back.

    The fast path (all contiguous) costs one C-level pass per list and copies nothing.
    """
    if all(all(map(_is_contiguous, lst)) for lst in lists):
        return lists, []
    out, copy_back = [], []
    for k, lst in enumerate(lists):
        if all(map(_is_contiguous, lst)):
            out.append(lst)
            continue
        new = []
        for t in lst:
            if t.is_contiguous():
                new.append(t)
            else:
                scratch = t.contiguous()
                new.append(scratch)
                if k in written:
                    copy_back.append((t, scratch))
        out.append(new)
    return out, copy_back


def _finish(lists: list[Tensors], written: Sequence[int], copy_back: list[tuple[Tensor, Tensor]]) -> None:
    for dst, scratch in copy_back:
        dst.copy_(scratch)  # a real in-place op: it bumps the version itself
    for k in written:
        _increment_version(lists[k])


def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]]) -> Tensor:
    if len(lists[0]) == 0:
        return reference.dots(lists, pairs)
    if _group_dtype_mismatch(lists):
        return reference.dots(lists, pairs)
    ready, _ = _contiguous(list(lists), ())
    return _mt.dots(ready, pairs)


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    if len(xs) == 0:
        return reference.weighted_sumsq(weights, xs)
    if _group_dtype_mismatch([xs, weights]):
        return reference.weighted_sumsq(weights, xs)
    (w, x), _ = _contiguous([weights, xs], ())
    return _mt.weighted_sumsq(w, x)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    if len(params) == 0:
        return
    lists = [params, grads, saved]
    if _group_dtype_mismatch(lists):
        return reference.perturb_(params, grads, saved, scale, adaptive)
    ready, copy_back = _contiguous(lists, (0, 2))
    _mt.perturb_(*ready, scale, adaptive)
    _finish(lists, (0, 2), copy_back)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None,
                     a: Tensor, b: Tensor) -> None:
    if len(params) == 0:
        return
    lists = [params, grads, saved] + ([] if vecs is None else [vecs])
    if _group_dtype_mismatch(lists):
        return reference.correct_restore_(params, grads, saved, vecs, a, b)
    ready, copy_back = _contiguous(lists, (0, 1))
    _mt.correct_restore_(ready[0], ready[1], ready[2], None if vecs is None else ready[3], a, b)
    _finish(lists, (0, 1), copy_back)


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    if len(ys) == 0:
        return
    lists = [ys, xs]
    if _group_dtype_mismatch(lists):
        return reference.axpy_(ys, xs, alpha)
    ready, copy_back = _contiguous(lists, (0,))
    _mt.axpy_(ready[0], ready[1], alpha)
    _finish(lists, (0,), copy_back)


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    if len(dsts) == 0:
        return
    lists = [dsts, srcs]
    if _group_dtype_mismatch(lists):
        return reference.scale_copy_(dsts, srcs, scale)
    ready, copy_back = _contiguous(lists, (0,))
    _mt.scale_copy_(ready[0], ready[1], scale)
    _finish(lists, (0,), copy_back)
