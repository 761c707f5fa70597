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
    ready, _ = _contiguous(list(lists), ())
    try:
        return _mt.dots(ready, pairs)
    except _mt.MixedDtypeError:
        return reference.dots(lists, pairs)


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    if len(xs) == 0:
        return reference.weighted_sumsq(weights, xs)
    (w, x), _ = _contiguous([weights, xs], ())
    try:
        return _mt.weighted_sumsq(w, x)
    except _mt.MixedDtypeError:
        return reference.weighted_sumsq(weights, xs)


def _run(op, lists: list[Tensors], written: tuple[int, ...], fallback) -> None:
    """Launch ``op`` on contiguous lists; a dtype mix runs ``fallback`` (the reference) instead."""
    ready, copy_back = _contiguous(lists, written)
    try:
        op(ready)
    except _mt.MixedDtypeError:  # raised while planning, before anything was written
        fallback()
        return
    _finish(lists, written, copy_back)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    if len(params) == 0:
        return
    _run(lambda r: _mt.perturb_(r[0], r[1], r[2], scale, adaptive), [params, grads, saved], (0, 2),
         lambda: reference.perturb_(params, grads, saved, scale, adaptive))


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None,
                     a: Tensor, b: Tensor) -> None:
    if len(params) == 0:
        return
    lists = [params, grads, saved] + ([] if vecs is None else [vecs])
    _run(lambda r: _mt.correct_restore_(r[0], r[1], r[2], r[3] if len(r) > 3 else None, a, b), lists, (0, 1),
         lambda: reference.correct_restore_(params, grads, saved, vecs, a, b))


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    if len(ys) == 0:
        return
    _run(lambda r: _mt.axpy_(r[0], r[1], alpha), [ys, xs], (0,), lambda: reference.axpy_(ys, xs, alpha))


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    if len(dsts) == 0:
        return
    _run(lambda r: _mt.scale_copy_(r[0], r[1], scale), [dsts, srcs], (0,),
         lambda: reference.scale_copy_(dsts, srcs, scale))
