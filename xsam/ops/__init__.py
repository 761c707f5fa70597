"""The functional op set of xsam, over lists of tensors of any devices and dtypes.

Each function groups its aligned tensor lists by the (device, dtype) of the first
list, runs the chosen backend (``xsam.ops.dispatch``) on every group, and, for
reductions, adds the per-group partial results in a fixed order. Scalar
arguments may be Python numbers or 0-d tensors; results stay on the device, so
nothing here synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .dispatch import BACKEND_NAMES, BackendUnavailableError, check_backend_name, describe, resolve
from .reference import accumulation_dtype

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "PowerStats",
    "accumulation_dtype",
    "axpy_",
    "check_backend_name",
    "correct_restore_",
    "describe",
    "dots",
    "perturb_",
    "power_update_",
    "resolve",
    "scale_copy_",
    "weighted_sumsq",
]

Tensors = Sequence[Tensor]


def _groups(key_list: Tensors) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(key_list):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _pick(tensors: Tensors, idx: list[int]) -> list[Tensor]:
    return [tensors[i] for i in idx]


def _scalar(value, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A 0-d tensor of the group's accumulation dtype on its device (no host sync)."""
    acc = accumulation_dtype(dtype)
    if isinstance(value, Tensor):
        return value.reshape(()).to(device=device, dtype=acc, non_blocking=True)
    # torch.full launches a fill; torch.tensor would copy from the host and wait for the device.
    return torch.full((), float(value), device=device, dtype=acc)


def _result_dtype(tensors: Tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _sum_partials(partials: list[Tensor], n: int, like: Tensors) -> Tensor:
    dtype = _result_dtype(like)
    if not partials:
        device = like[0].device if len(like) else torch.device("cpu")
        return torch.zeros(n, dtype=dtype, device=device)
    home = partials[0].device
    total = partials[0].to(dtype)
    for p in partials[1:]:
        total = total + p.to(device=home, dtype=dtype, non_blocking=True)
    return total


def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]], *, backend: str = "auto") -> Tensor:
    """``out[k] = sum over all tensors of <lists[a], lists[b]>`` for ``(a, b) = pairs[k]``.

    All lists are aligned (same length, matching shapes). The result is a 1-d
    fp32 tensor (fp64 when any input is fp64) on the device of the first group.
    """
    n = len(lists[0])
    for j, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"lists[{j}] has {len(lst)} tensors, expected {n} (lists must be aligned)")
    partials = []
    for (device, dtype), idx in _groups(lists[0]).items():
        impl = resolve(backend, device, dtype)
        partials.append(impl.dots([_pick(lst, idx) for lst in lists], list(pairs)))
    return _sum_partials(partials, len(pairs), lists[0])


def weighted_sumsq(weights: Tensors, xs: Tensors, *, backend: str = "auto") -> Tensor:
    """``sum ||w * x||^2`` over the lists, as a 0-d tensor."""
    partials = []
    for (device, dtype), idx in _groups(xs).items():
        impl = resolve(backend, device, dtype)
        partials.append(impl.weighted_sumsq(_pick(weights, idx), _pick(xs, idx)))
    return _sum_partials(partials, 1, xs).reshape(())


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale, *, adaptive: bool = False,
             backend: str = "auto") -> None:
    """``saved = w``, then ``w += scale * g`` (``scale * w * w * g`` when adaptive)."""
    for (device, dtype), idx in _groups(params).items():
        impl = resolve(backend, device, dtype)
        impl.perturb_(_pick(params, idx), _pick(grads, idx), _pick(saved, idx),
                      _scalar(scale, device, dtype), adaptive)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a, b,
                     *, backend: str = "auto") -> None:
    """``g = a * g - b * v`` (``a * g`` without ``vecs``) and ``w = saved``, in one pass."""
    for (device, dtype), idx in _groups(params).items():
        impl = resolve(backend, device, dtype)
        impl.correct_restore_(_pick(params, idx), _pick(grads, idx), _pick(saved, idx),
                              None if vecs is None else _pick(vecs, idx),
                              _scalar(a, device, dtype), _scalar(b, device, dtype))


def axpy_(ys: Tensors, xs: Tensors, alpha, *, backend: str = "auto") -> None:
    """``y += alpha * x``."""
    for (device, dtype), idx in _groups(ys).items():
        impl = resolve(backend, device, dtype)
        impl.axpy_(_pick(ys, idx), _pick(xs, idx), _scalar(alpha, device, dtype))


def scale_copy_(dsts: Tensors, srcs: Tensors, scale, *, backend: str = "auto") -> None:
    """``dst = scale * src``."""
    for (device, dtype), idx in _groups(dsts).items():
        impl = resolve(backend, device, dtype)
        impl.scale_copy_(_pick(dsts, idx), _pick(srcs, idx), _scalar(scale, device, dtype))


@dataclass
class PowerStats:
    """Per-vector results of one power-iteration update (1-d device tensors of length m)."""

    eigenvalues: Tensor  # Rayleigh quotients <v, Hv>, with their sign
    residuals: Tensor  # ||Hv - lambda v||
    norms: Tensor  # ||Hv||


def power_update_(us: Sequence[Tensors], vs: Sequence[Tensors], *, eps: float = 1e-12,
                  backend: str = "auto") -> PowerStats:
    """One power-iteration update for m vectors: ``v_j <- u_j / (||u_j|| + eps)`` with ``u_j = H v_j``.

    One fused reduction gives {<u,u>, <v,u>, <v,v>} for every j (Rayleigh quotient,
    norm and residual), then one scaling pass per vector writes the new v_j. For
    m > 1 the caller re-orthonormalises afterwards (block power iteration).
    """
    m = len(vs)
    lists = list(us) + list(vs)
    pairs = []
    for j in range(m):
        pairs += [(j, j), (m + j, j), (m + j, m + j)]
    sums = dots(lists, pairs, backend=backend).reshape(m, 3)
    uu, vu, vv = sums[:, 0], sums[:, 1], sums[:, 2]
    vv_safe = torch.where(vv > 0, vv, torch.ones_like(vv))
    lam = vu / vv_safe
    # ||u - lam v||^2 = uu - 2 lam vu + lam^2 vv = uu - lam * vu (lam = vu / vv)
    residuals = (uu - lam * vu).clamp_min(0).sqrt()
    norms = uu.sqrt()
    inv = 1.0 / (norms + eps)
    for j in range(m):
        scale_copy_(vs[j], us[j], inv[j], backend=backend)
    return PowerStats(eigenvalues=lam, residuals=residuals, norms=norms)
