"""Pure-PyTorch implementation of the op set: the fallback everywhere and the oracle.

Each function implements one op of ``xsam.ops.contract`` on ONE (device, dtype) group, with scalars
as 0-d device tensors that are never read on the host. Written as a skilled user writes foreach code,
so that "native vs reference" measures the kernels, not a handicapped baseline: in-place forms
wherever PyTorch has them, and a temporary only where noted below.
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
    # A call gets one group, of one dtype (the contract): the first tensor says it for all.
    if not len(tensors) or tensors[0].dtype == dtype:
        return list(tensors)
    return [t.to(dtype) for t in tensors]


def _sum_of_squares(tensors: Tensors, acc: torch.dtype) -> Tensor:
    # The fused multi-tensor norm (one kernel per list on GPUs), squared back per tensor.
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=acc)).square().sum()


def _dot(xs: Tensors, ys: Tensors, acc: torch.dtype) -> Tensor:
    # One dot per tensor pair (PyTorch has no multi-tensor dot): no concatenated copies. Narrower
    # storage is widened one pair at a time (.to is a no-op otherwise), so no temporary is larger than one tensor.
    return torch.stack([torch.dot(x.reshape(-1).to(acc), y.reshape(-1).to(acc)) for x, y in zip(xs, ys)]).sum()


def _add_scaled_(ys: list[Tensor], xs: Tensors, scale: Tensor) -> None:
    """``y += scale * x`` with ``scale`` a device scalar."""
    if ys[0].device.type == "cpu":
        # CPU foreach ops loop over the tensors anyway; a broadcast 0-d factor needs no temporary.
        torch._foreach_addcmul_(ys, list(xs), [scale] * len(ys))
    else:
        # One scaled temporary: the fused multi-tensor kernels take a device scalar only in
        # _foreach_mul, and the broadcasting _foreach_addcmul_ would launch once per tensor.
        torch._foreach_add_(ys, torch._foreach_mul(list(xs), scale))


def dots(tensors: Tensors, num_lists: int, pairs: Sequence[int]) -> Tensor:
    """``out[k] = sum_i <L[a_k][i], L[b_k][i]>`` (see the contract)."""
    n = len(tensors) // num_lists
    lists = [list(tensors[j * n:(j + 1) * n]) for j in range(num_lists)]
    npairs = len(pairs) // 2
    if n == 0:
        return torch.zeros(npairs)
    acc = accumulation_dtype(tensors[0].dtype)
    if npairs == 0:
        return torch.zeros(0, dtype=acc, device=tensors[0].device)
    out = []
    for k in range(npairs):
        a, b = pairs[2 * k], pairs[2 * k + 1]
        # A pair of one list with itself (or with the same tensors) is a sum of squares: the fused
        # norm, and the same bits however the pair names the list.
        same = a == b or all(x is y for x, y in zip(lists[a], lists[b]))
        out.append(_sum_of_squares(lists[a], acc) if same else _dot(lists[a], lists[b], acc))
    return torch.stack(out)


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    """``sum_i ||weights[i] * xs[i]||^2`` as a 1-element tensor."""
    if len(xs) == 0:
        return torch.zeros(1)
    acc = accumulation_dtype(xs[0].dtype)
    # One temporary: the products.
    products = torch._foreach_mul(_upcast(weights, acc), _upcast(xs, acc))
    return _sum_of_squares(products, acc).reshape(1)


def residual_sumsq(us: Tensors, vs: Tensors, lam: Tensor) -> Tensor:
    """``sum_i ||us[i] - lam * vs[i]||^2`` element by element, as a 1-element tensor."""
    if len(us) == 0:
        return torch.zeros(1)
    acc = accumulation_dtype(us[0].dtype)
    # One temporary: diff = (-lam) * v, then diff += u in place (the same roundings as u - lam * v).
    if vs[0].dtype == acc:
        diff = torch._foreach_mul(list(vs), -lam)
    else:
        diff = _upcast(vs, acc)  # already a copy
        torch._foreach_mul_(diff, -lam)
    torch._foreach_add_(diff, list(us))  # a narrower u is widened exactly
    return _sum_of_squares(diff, acc).reshape(1)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    """``saved = w``; then ``w += scale * g``, or ``w += scale * w * w * g`` when adaptive."""
    if len(params) == 0:
        return
    params = list(params)
    torch._foreach_copy_(saved, params)
    if adaptive:
        # In place on w, reading the original from `saved`: w*g, *w, *scale, +w.
        torch._foreach_mul_(params, list(grads))
        torch._foreach_mul_(params, list(saved))
        torch._foreach_mul_(params, scale)
        torch._foreach_add_(params, list(saved))
    else:
        _add_scaled_(params, grads, scale)


def tilted_perturb_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors, a: Tensor, b: Tensor) -> None:
    """``saved = w``; then ``w += a * g + b * v``."""
    if len(params) == 0:
        return
    params = list(params)
    torch._foreach_copy_(saved, params)
    _add_scaled_(params, grads, a)
    _add_scaled_(params, vecs, b)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a: Tensor,
                     b: Tensor) -> None:
    """``g = a * g - b * v`` (just ``a * g`` when ``vecs`` is None) and ``w = saved``."""
    if len(params) == 0:
        return
    grads = list(grads)
    torch._foreach_mul_(grads, a)
    if vecs is not None:
        _add_scaled_(grads, vecs, -b)
    torch._foreach_copy_(list(params), saved)


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    """``y += alpha * x`` over the lists (finite-difference HVPs, Gram-Schmidt)."""
    if len(ys) == 0:
        return
    _add_scaled_(list(ys), xs, alpha)


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    """``dst = scale * src`` (the normalisation pass of a power-iteration update)."""
    if len(dsts) == 0:
        return
    dsts = list(dsts)
    # Copy, then scale in place: no temporary (dst may be src: the copy is then a no-op).
    torch._foreach_copy_(dsts, list(srcs))
    torch._foreach_mul_(dsts, scale)


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """The reference runs wherever PyTorch runs."""
    return None
