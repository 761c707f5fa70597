"""Pure-PyTorch implementation of the op set: the fallback everywhere and the oracle.

Every function here works on ONE group: lists of tensors that share a device and
a dtype (the dispatcher in ``xsam.ops`` does the grouping). Scalars arrive as 0-d
tensors on that device in the group's accumulation dtype (see
``accumulation_dtype``) and results stay on the device: nothing here calls
``.item()`` or otherwise waits for the device.

The Triton (``xsam.kernels``) and native (``torch.ops.xsam``) backends implement
the same functions with the same signatures; their tests compare against these.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

Tensors = Sequence[Tensor]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions accumulate in fp32, or fp64 for fp64 storage (never narrower)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _upcast(tensors: Tensors, dtype: torch.dtype) -> list[Tensor]:
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def _sum_of_squares(tensors: Tensors, acc: torch.dtype) -> Tensor:
    # The fused multi-tensor norm (one kernel per list on GPUs), squared back per tensor.
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=acc)).square().sum()


def _dot(xs: Tensors, ys: Tensors, acc: torch.dtype) -> Tensor:
    # One dot per tensor pair: no concatenated copies of whole lists.
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1))
                        for x, y in zip(_upcast(xs, acc), _upcast(ys, acc))]).sum()


def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]]) -> Tensor:
    """``out[k] = sum_i <lists[a][i], lists[b][i]>`` for ``(a, b) = pairs[k]``.

    Sums of squares are the pairs ``(a, a)``. Returns a 1-d tensor of
    ``len(pairs)`` entries in the accumulation dtype.
    """
    first = lists[0]
    if len(first) == 0:
        return torch.zeros(len(pairs))
    acc = accumulation_dtype(first[0].dtype)
    if not pairs:
        return torch.zeros(0, dtype=acc, device=first[0].device)
    return torch.stack([_sum_of_squares(lists[a], acc) if a == b else _dot(lists[a], lists[b], acc)
                        for a, b in pairs])


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    """``sum_i ||weights[i] * xs[i]||^2`` (the ASAM norm ``||w * g||^2``), 1-element tensor."""
    if len(xs) == 0:
        return torch.zeros(1)
    acc = accumulation_dtype(xs[0].dtype)
    return _sum_of_squares(torch._foreach_mul(_upcast(weights, acc), _upcast(xs, acc)), acc).reshape(1)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    """``saved = w``; then ``w += scale * g``, or ``w += scale * w * w * g`` when adaptive."""
    if len(params) == 0:
        return
    torch._foreach_copy_(saved, params)
    if adaptive:
        step = torch._foreach_mul(params, params)
        torch._foreach_mul_(step, grads)
    else:
        step = list(grads)
    step = torch._foreach_mul(step, scale.to(params[0].dtype))
    torch._foreach_add_(params, step)


def correct_restore_(
    params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a: Tensor, b: Tensor
) -> None:
    """``g = a * g - b * v`` (just ``a * g`` when ``vecs`` is None) and ``w = saved``."""
    if len(params) == 0:
        return
    dtype = grads[0].dtype
    torch._foreach_mul_(grads, a.to(dtype))
    if vecs is not None:
        torch._foreach_sub_(grads, torch._foreach_mul(vecs, b.to(dtype)))
    torch._foreach_copy_(params, saved)


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    """``y += alpha * x`` over the lists (finite-difference HVPs, Gram-Schmidt)."""
    if len(ys) == 0:
        return
    torch._foreach_add_(ys, torch._foreach_mul(xs, alpha.to(ys[0].dtype)))


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    """``dst = scale * src`` (the normalisation pass of a power-iteration update)."""
    if len(dsts) == 0:
        return
    torch._foreach_copy_(dsts, torch._foreach_mul(srcs, scale.to(srcs[0].dtype)))


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """The reference runs wherever PyTorch runs."""
    return None
