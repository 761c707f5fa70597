"""The functional op set of xsam, over lists of tensors of any devices and dtypes.

Each function groups its aligned tensor lists by the (device, dtype) of the first
list, runs the chosen backend (``xsam.ops.dispatch``) on every group, and, for
reductions, adds the per-group partial results in a fixed order. Scalar
arguments may be Python numbers or 0-d tensors; results stay on the device, so
nothing here synchronises with the host.

Sharded parameters (DTensors: FSDP2 ``fully_shard``, tensor parallelism) are
handled here, above the backends, so every backend serves them unchanged:
element-wise ops run on each rank's local shard (``to_local()`` is a view of the
parameter's storage, so in-place writes land in the parameter), and reductions
add the local partial sums and then all-reduce them (SUM) over the mesh
dimensions on which the tensor is sharded: one collective per distinct
(mesh, sharded dimensions) of the inputs, no host sync. Replicated mesh
dimensions hold the full tensor on every rank and are not reduced over, so
nothing is counted twice. The reduced scalars are plain tensors, identical on
every rank.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .dispatch import BACKEND_NAMES, BackendUnavailableError, check_backend_name, describe, resolve
from .reference import accumulation_dtype



def dtensor_type() -> type | None:
    """The DTensor class, or None while ``torch.distributed.tensor`` is not imported.

    A DTensor cannot exist before its module is imported, so looking it up in sys.modules
    spares every ``import xsam`` the ~0.7 s that importing torch.distributed.tensor costs.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "PowerStats",
    "accumulation_dtype",
    "axpy_",
    "check_backend_name",
    "copy_",
    "correct_restore_",
    "describe",
    "dots",
    "dtensor_type",
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


def _has_dtensor(tensors: Tensors) -> bool:
    cls = dtensor_type()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _local_lists(lists: Sequence[Tensors], names: Sequence[str]) -> list[list[Tensor]]:
    """Each rank's local shards of aligned lists that may hold DTensors (views, not copies).

    A DTensor must be paired with DTensors of the same mesh and placements: their local
    shards then have matching shapes, which is what the backends assume.
    """
    cls = dtensor_type()
    key = lists[0]
    out = [[] for _ in lists]
    for i, t in enumerate(key):
        sharded = isinstance(t, cls)
        for j, lst in enumerate(lists):
            other = lst[i]
            if isinstance(other, cls) != sharded:
                raise ValueError(
                    f"{names[j]}[{i}] is {'a plain tensor' if sharded else 'a DTensor'} but {names[0]}[{i}] is "
                    f"{'a DTensor' if sharded else 'a plain tensor'}; pass DTensors for all lists or for none "
                    "(e.g. build the buffers with torch.zeros_like(param))")
            if sharded and j and (other.placements != t.placements or other.device_mesh != t.device_mesh):
                raise ValueError(
                    f"{names[j]}[{i}] has placements {other.placements} on {other.device_mesh} but {names[0]}[{i}] "
                    f"has {t.placements} on {t.device_mesh}; redistribute it like {names[0]}[{i}] first")
            out[j].append(other.to_local() if sharded else other)
    return out


def _reduction_key(t: Tensor) -> tuple:
    """``(mesh, sharded mesh dims)`` over which t's partial sums must be added; () for a full tensor."""
    cls = dtensor_type()
    if cls is None or not isinstance(t, cls):
        return ()
    dims = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            dims.append(dim)
        elif placement.is_partial():
            # A Partial tensor is the SUM of the local tensors: a norm of it is not a sum of local norms.
            raise ValueError(
                f"a DTensor of shape {tuple(t.shape)} has a Partial placement ({t.placements}); norms and dot "
                "products need Shard or Replicate placements. Call .redistribute(...) with Replicate() first")
    return (t.device_mesh, tuple(dims)) if dims else ()


def _sharded_reduce(lists: Sequence[Tensors], names: Sequence[str], local_reduce) -> Tensor:
    """``local_reduce`` of each class of tensors sharing a reduction key, all-reduced, then added.

    The classes and their order depend only on global DTensor metadata, so every rank
    issues the same collectives in the same order.
    """
    import torch.distributed as dist

    local = _local_lists(lists, names)
    classes: dict[tuple, list[int]] = {}
    for i, t in enumerate(lists[0]):
        classes.setdefault(_reduction_key(t), []).append(i)
    totals = []
    for key, idx in classes.items():
        part = local_reduce([_pick(lst, idx) for lst in local])
        if key and part.numel():
            part = part.contiguous()
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        totals.append(part)
    return _sum_partials(totals, totals[0].numel(), [t for lst in lists[:1] for t in lst])


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
    if _has_dtensor(lists[0]):
        return _sharded_reduce(lists, [f"lists[{j}]" for j in range(len(lists))],
                               lambda local: _local_dots(local, pairs, backend))
    return _local_dots(lists, pairs, backend)


def _local_dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]], backend: str) -> Tensor:
    partials = []
    for (device, dtype), idx in _groups(lists[0]).items():
        impl = resolve(backend, device, dtype)
        partials.append(impl.dots([_pick(lst, idx) for lst in lists], list(pairs)))
    return _sum_partials(partials, len(pairs), lists[0])


def weighted_sumsq(weights: Tensors, xs: Tensors, *, backend: str = "auto") -> Tensor:
    """``sum ||w * x||^2`` over the lists, as a 0-d tensor."""
    if _has_dtensor(xs):
        return _sharded_reduce([xs, weights], ["xs", "weights"],
                               lambda local: _local_weighted_sumsq(local[1], local[0], backend)).reshape(())
    return _local_weighted_sumsq(weights, xs, backend).reshape(())


def _local_weighted_sumsq(weights: Tensors, xs: Tensors, backend: str) -> Tensor:
    partials = []
    for (device, dtype), idx in _groups(xs).items():
        impl = resolve(backend, device, dtype)
        partials.append(impl.weighted_sumsq(_pick(weights, idx), _pick(xs, idx)))
    return _sum_partials(partials, 1, xs).reshape(1)


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale, *, adaptive: bool = False,
             backend: str = "auto") -> None:
    """``saved = w``, then ``w += scale * g`` (``scale * w * w * g`` when adaptive)."""
    if _has_dtensor(params):
        params, grads, saved = _local_lists([params, grads, saved], ["params", "grads", "saved"])
    for (device, dtype), idx in _groups(params).items():
        impl = resolve(backend, device, dtype)
        impl.perturb_(_pick(params, idx), _pick(grads, idx), _pick(saved, idx),
                      _scalar(scale, device, dtype), adaptive)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a, b,
                     *, backend: str = "auto") -> None:
    """``g = a * g - b * v`` (``a * g`` without ``vecs``) and ``w = saved``, in one pass."""
    if _has_dtensor(params):
        if vecs is None:
            params, grads, saved = _local_lists([params, grads, saved], ["params", "grads", "saved"])
        else:
            params, grads, saved, vecs = _local_lists([params, grads, saved, vecs],
                                                      ["params", "grads", "saved", "vecs"])
    for (device, dtype), idx in _groups(params).items():
        impl = resolve(backend, device, dtype)
        impl.correct_restore_(_pick(params, idx), _pick(grads, idx), _pick(saved, idx),
                              None if vecs is None else _pick(vecs, idx),
                              _scalar(a, device, dtype), _scalar(b, device, dtype))


def axpy_(ys: Tensors, xs: Tensors, alpha, *, backend: str = "auto") -> None:
    """``y += alpha * x``."""
    if _has_dtensor(ys):
        ys, xs = _local_lists([ys, xs], ["ys", "xs"])
    for (device, dtype), idx in _groups(ys).items():
        impl = resolve(backend, device, dtype)
        impl.axpy_(_pick(ys, idx), _pick(xs, idx), _scalar(alpha, device, dtype))


def scale_copy_(dsts: Tensors, srcs: Tensors, scale, *, backend: str = "auto") -> None:
    """``dst = scale * src``."""
    if _has_dtensor(dsts):
        dsts, srcs = _local_lists([dsts, srcs], ["dsts", "srcs"])
    for (device, dtype), idx in _groups(dsts).items():
        impl = resolve(backend, device, dtype)
        impl.scale_copy_(_pick(dsts, idx), _pick(srcs, idx), _scalar(scale, device, dtype))


def copy_(dsts: Tensors, srcs: Tensors) -> None:
    """``dst = src`` bit for bit (restoring saved weights); DTensors shard by shard.

    A plain copy needs no backend; it exists here because ``torch._foreach_copy_`` has no
    DTensor sharding rule ("aten._foreach_copy_.default does not have a sharding strategy").
    """
    if len(dsts) != len(srcs):
        raise ValueError(f"dsts has {len(dsts)} tensors but srcs has {len(srcs)}; the lists must be aligned")
    if _has_dtensor(dsts):
        dsts, srcs = _local_lists([dsts, srcs], ["dsts", "srcs"])
    if len(dsts):
        torch._foreach_copy_(list(dsts), list(srcs))


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
