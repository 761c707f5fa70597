"""How aligned tensor lists are split into one-device, one-dtype groups, and made flat-addressable.

- ``Layout.of(tensors)`` groups a list by (device, dtype) once; callers keep it for every op on lists
  aligned with that one. The kernels re-check every tensor, so a stale Layout raises instead of
  computing garbage.
- The fused kernels walk tensor i of every list as flat arrays with one index, so the tensors at
  each index must be dense with one memory order (``flat_compatible``). Anything else gets dense
  copies for that index (``dense_copies``; written ones are copied back): backends raise
  ``LayoutError`` when a call needs them.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from operator import attrgetter
from typing import Sequence

import torch
from torch import Tensor

from .contract import OpSpec

__all__ = ["Group", "Layout", "LayoutError", "dense_copies", "dtensor_type", "flat_compatible", "needs_dense"]


class LayoutError(ValueError):
    """A backend cannot address these strides directly; the caller retries with dense copies."""


@dataclass(frozen=True)
class Group:
    """Positions of one (device, dtype) group; ``index`` is None when the group is the whole list."""

    device: torch.device
    dtype: torch.dtype
    index: tuple[int, ...] | None

    def pick(self, tensors: Sequence[Tensor]) -> Sequence[Tensor]:
        """The group's tensors of an aligned list (the list itself, not a copy, for a whole-list group)."""
        return tensors if self.index is None else [tensors[i] for i in self.index]


def dtensor_type() -> type | None:
    """The DTensor class, or None while ``torch.distributed.tensor`` is not imported.

    A DTensor cannot exist before its module is imported, so looking it up in sys.modules
    spares every ``import xsam`` the ~0.7 s that importing torch.distributed.tensor costs.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


_device_and_dtype = attrgetter("device", "dtype")


@dataclass(frozen=True)
class Layout:
    """The (device, dtype) groups of an aligned list, in first-seen order, and whether it holds DTensors."""

    length: int
    groups: tuple[Group, ...]
    sharded: bool  # holds DTensors: the op layer works on their local shards

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> "Layout":
        dtensor = dtensor_type()
        sharded = dtensor is not None and any(isinstance(t, dtensor) for t in tensors)
        if torch.compiler.is_compiling():  # dynamo cannot trace attrgetter
            keys = [(t.device, t.dtype) for t in tensors]
        else:
            keys = list(map(_device_and_dtype, tensors))
        if not keys:
            return cls(0, (), sharded)
        first = keys[0]
        if keys.count(first) == len(keys):
            return cls(len(keys), (Group(first[0], first[1], None),), sharded)
        positions: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, key in enumerate(keys):
            positions.setdefault(key, []).append(i)
        groups = tuple(Group(device, dtype, tuple(idx)) for (device, dtype), idx in positions.items())
        return cls(len(keys), groups, sharded)

    def check_aligned(self, lists: Sequence[Sequence[Tensor]], names: Sequence[str]) -> None:
        for lst, name in zip(lists, names):
            if lst is not None and len(lst) != self.length:
                raise ValueError(f"{name} has {len(lst)} tensors, expected {self.length} (the lists must be "
                                 "aligned: one tensor per parameter, in the same order)")


def _is_dense(t: Tensor) -> bool:
    """Non-overlapping and without gaps (contiguous up to a permutation of the dimensions)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _order(t: Tensor) -> list[int]:
    # Strides of size-1 dimensions are arbitrary; only the others fix the element order.
    return [st for st, sz in zip(t.stride(), t.shape) if sz != 1]


def flat_compatible(tensors: Sequence[Tensor]) -> bool:
    """Whether tensors (position i of every list) can be walked as flat arrays with one index."""
    if all(t.is_contiguous() for t in tensors):
        return True
    order = _order(tensors[0])
    return all(_is_dense(t) and _order(t) == order for t in tensors)


def _lists_of(spec: OpSpec, args: dict) -> tuple[list[Sequence[Tensor]], set[int]]:
    """The aligned lists of a call (``dots``: cut out of ``tensors``) and the ids of written tensors."""
    if spec.name == "dots":
        n = len(args["tensors"]) // args["num_lists"]
        return [args["tensors"][j * n:(j + 1) * n] for j in range(args["num_lists"])], set()
    lists = [args[name] for name in spec.list_args if args[name] is not None]
    return lists, {id(t) for name in spec.written for t in args[name]}


def _positions_needing_copies(lists: list[Sequence[Tensor]]) -> list[int]:
    return [i for i in range(len(lists[0])) if not flat_compatible([lst[i] for lst in lists])]


def needs_dense(spec: OpSpec, args: dict) -> bool:
    """Whether some position of this call is not ``flat_compatible`` (a kernel would refuse it)."""
    return bool(_positions_needing_copies(_lists_of(spec, args)[0]))


def dense_copies(spec: OpSpec, args: dict) -> tuple[dict, list[tuple[Tensor, Tensor]]]:
    """``args`` with dense copies at every position that is not ``flat_compatible``.

    Returns the new arguments and the (original, copy) pairs of written lists to copy back
    after the op. One copy per distinct tensor keeps aliasing intact (``axpy_(y, y)``).
    """
    lists, written = _lists_of(spec, args)
    bad = _positions_needing_copies(lists)
    if not bad:
        return args, []
    copies: dict[int, Tensor] = {}
    copy_back = []
    for i in bad:
        for lst in lists:
            t = lst[i]
            if id(t) not in copies:
                copies[id(t)] = t.contiguous()
                if id(t) in written and copies[id(t)] is not t:
                    copy_back.append((t, copies[id(t)]))
    out = dict(args)
    for name in ("tensors",) if spec.name == "dots" else spec.list_args:
        if args[name] is not None:
            out[name] = [copies.get(id(t), t) for t in args[name]]
    return out, copy_back
