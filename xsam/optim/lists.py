"""The tensor lists a step works on, built once per param-group structure instead of every step.

Building the lists, their (device, dtype) grouping (``Layout``) and the saved-weights buffers once keeps
per-tensor Python work off the hot path: per pass only the gradients are gathered.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..ops import Layout

__all__ = ["GroupLists", "ParamLists", "scratch_like", "structure_key"]

# Consecutive parameters of one device and dtype get their saved copies from one allocation of up
# to this many bytes: fewer allocations make the fused kernels faster on many small tensors, and
# the cap spares a fragmented GPU pool from finding one block the size of the model.
SCRATCH_BUCKET_BYTES = 64 << 20
SCRATCH_ALIGN_BYTES = 64


def scratch_like(tensors: list[Tensor]) -> list[Tensor]:
    """Uninitialised tensors shaped and strided like ``tensors``: contiguous plain tensors are laid end to
    end in buckets of one device and dtype; any other (a DTensor, channels-last) gets its own ``empty_like``."""
    out: list[Tensor | None] = [None] * len(tensors)
    bucket: list[int] = []

    def flush() -> None:
        if not bucket:
            return
        first = tensors[bucket[0]]
        # Every view starts SCRATCH_ALIGN_BYTES-aligned, as a tensor of its own would: the fused
        # kernels take their widest (128-bit) accesses only where every list's tensor is aligned.
        step = max(1, SCRATCH_ALIGN_BYTES // first.element_size())
        padded = [-(-tensors[i].numel() // step) * step for i in bucket]
        buffer = torch.empty(sum(padded), device=first.device, dtype=first.dtype)
        for i, piece in zip(bucket, buffer.split(padded)):
            out[i] = piece[:tensors[i].numel()].view(tensors[i].shape)
        bucket.clear()

    size = 0
    for i, t in enumerate(tensors):
        if type(t) not in (Tensor, torch.nn.Parameter) or not t.is_contiguous():
            out[i] = torch.empty_like(t, memory_format=torch.preserve_format)
            continue
        nbytes = t.numel() * t.element_size()
        if bucket and ((t.device, t.dtype) != (tensors[bucket[0]].device, tensors[bucket[0]].dtype)
                       or size + nbytes > SCRATCH_BUCKET_BYTES):
            flush()
            size = 0
        bucket.append(i)
        size += nbytes
    flush()
    return out


def structure_key(param_groups: list[dict]) -> tuple:
    """What the cached lists depend on: the group dicts and their ``params`` lists (and lengths); the cache
    holds references to them, so their ids cannot be reused while it lives. Replacing an entry of a ``params``
    list in place is not detected (nor supported by torch.optim, whose state is keyed by parameter)."""
    return (id(param_groups), tuple((id(g), id(g["params"]), len(g["params"])) for g in param_groups))


@dataclass
class GroupLists:
    """One param group's slice of the step lists."""

    group: dict  # the live group dict: rho, alpha, lr, ... are read from it every step
    start: int
    stop: int
    layout: Layout

    def of(self, tensors: list[Tensor]) -> list[Tensor]:
        """The group's slice of an aligned list (the list itself when the group is all of it: no copy)."""
        if self.start == 0 and self.stop == len(tensors):
            return tensors
        return tensors[self.start:self.stop]


def _end_to_end(members_of: list[tuple[dict, list[Tensor]]]) -> tuple[list[Tensor], list[GroupLists]]:
    """The members of each group laid end to end, and the slice of every group that has any."""
    params, groups = [], []
    for group, members in members_of:
        if members:
            groups.append(GroupLists(group, len(params), len(params) + len(members), Layout.of(members)))
        params += members
    return params, groups


@dataclass
class ParamLists:
    """Parameters (in param-group order), their saved-weights buffers and layouts."""

    params: list[Tensor]
    saved: list[Tensor]  # saved[i] holds params[i] from before the perturbation (or is params[i] itself)
    layout: Layout
    groups: list[GroupLists]
    anchors: tuple = ()  # keeps the objects of the structure key alive
    sparse_checked: bool = False  # the gradients of a full first pass were checked for sparse layouts

    @classmethod
    def build(cls, param_groups: list[dict]) -> "ParamLists":
        params, groups = _end_to_end([(g, list(g["params"])) for g in param_groups])
        # Scratch: written by the perturbation before it is read, so never initialised.
        saved = scratch_like(params)
        anchors = (param_groups, *param_groups, *(g["params"] for g in param_groups))
        return cls(params, saved, Layout.of(params), groups, anchors)

    def subset(self, keep: list[bool], saved: list[Tensor] | None = None) -> "ParamLists":
        """The lists restricted to the positions where ``keep`` is true (new layouts: the slow path)."""
        saved = self.saved if saved is None else saved
        params, groups = _end_to_end([(g.group, [p for p, k in zip(g.of(self.params), g.of(keep)) if k])
                                      for g in self.groups])
        return ParamLists(params, [s for s, k in zip(saved, keep) if k], Layout.of(params), groups, self.anchors)

    def gradients(self) -> tuple["ParamLists", list[Tensor], list[bool] | None]:
        """(lists of the parameters that have a gradient, their gradients, the mask or None when all do)."""
        grads, missing = ops.gradients(self.params)
        if not missing:
            return self, grads, None
        keep = [g is not None for g in grads]
        return self.subset(keep), [g for g in grads if g is not None], keep

    def for_descent(self, perturbed: "ParamLists") -> tuple["ParamLists", list[Tensor], tuple[list, list] | None]:
        """After the second pass: (lists to correct and restore, their gradients, (params, saved) to restore only).

        A parameter that was not moved (no first-pass gradient) restores from itself and still takes part in
        the normalisation and the correction; one that was moved but has no second-pass gradient is only restored.
        """
        active, grads, keep = self.gradients()
        if perturbed is self and keep is None:
            return active, grads, None
        moved = {id(p): s for p, s in zip(perturbed.params, perturbed.saved)}
        saved = [moved.get(id(p), p) for p in self.params]
        active = self.subset(keep if keep is not None else [True] * len(self.params), saved)
        present = {id(p) for p in active.params}
        rest = [(p, s) for p, s in zip(perturbed.params, perturbed.saved) if id(p) not in present]
        return active, grads, ([p for p, _ in rest], [s for _, s in rest]) if rest else None
