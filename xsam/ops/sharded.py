"""The op set over DTensors (FSDP2 ``fully_shard``, tensor parallelism), above every backend.

Element-wise ops run on each rank's local shard (``to_local()`` is a view of the
parameter's storage, so in-place writes land in the parameter). Reductions add the local
partial sums and then all-reduce them (SUM) over the mesh dimensions on which the tensor is
sharded: one collective per distinct (mesh, sharded dimensions) of the inputs, no host sync.
Replicated mesh dimensions hold the full tensor on every rank and are not reduced over, so
nothing is counted twice. The reduced scalars are plain tensors, identical on every rank.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
from torch import Tensor

from .contract import OpSpec
from .layout import Group, Layout, dtensor_type
from .runner import run_local, sum_partials


def local_lists(lists: Sequence[Sequence[Tensor]], names: Sequence[str]) -> list[list[Tensor]]:
    """Each rank's local shards of aligned lists that may hold DTensors (views, not copies).

    A DTensor must be paired with DTensors of the same mesh and placements: their local
    shards then have matching shapes, which is what the backends assume.
    """
    cls = dtensor_type()
    key = lists[0]
    out: list[list[Tensor]] = [[] for _ in lists]
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


def run(spec: OpSpec, lists: dict, scalars: dict, other: dict, backend: str):
    """``xsam.ops.runner.run`` for lists holding DTensors."""
    import torch.distributed as dist

    names = [name for name, lst in lists.items() if lst is not None]
    local = dict(zip(names, local_lists([lists[n] for n in names], names)))
    local.update({name: None for name, lst in lists.items() if lst is None})
    if not spec.is_reduction:
        return run_local(spec, local, scalars, other, backend, Layout.of(local[names[0]]))
    # Reductions: one class per reduction key, in an order fixed by global DTensor metadata only,
    # so every rank issues the same collectives in the same order.
    classes: dict[tuple, list[int]] = {}
    for i, t in enumerate(lists[names[0]]):
        classes.setdefault(_reduction_key(t), []).append(i)
    totals = []
    for key, idx in classes.items():
        subset = Group(None, None, tuple(idx))
        part_lists = {name: None if lst is None else subset.pick(lst) for name, lst in local.items()}
        part = run_local(spec, part_lists, scalars, other, backend, Layout.of(part_lists[names[0]]))
        if key and part.numel():
            part = part.contiguous()
            mesh, dims = key
            for dim in dims:
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
        totals.append(part)
    return sum_partials(totals, totals[0].numel(), functools.reduce(torch.promote_types, (t.dtype for t in totals)))
