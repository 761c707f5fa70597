"""Sharded and data-parallel tensors: the helpers the Hessian tools and the optimizers share (the guide to DDP
and FSDP2 training: docs/distributed.md)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import ops

__all__ = ["all_reduce_mean_", "is_dtensor"]


def is_dtensor(t: Tensor) -> bool:
    """Whether t is a DTensor (FSDP2 / tensor-parallel parameter, or a buffer shaped like one)."""
    cls = ops.dtensor_type()
    return cls is not None and isinstance(t, cls)


def all_reduce_mean_(tensors: Sequence[Tensor], process_group=None) -> None:
    """Average ``tensors`` in place over the ranks of ``process_group`` (one all-reduce per dtype).

    SUM then divide (gloo has no AVG); every rank receives the same reduced bits, so the
    result is identical on all ranks.
    """
    import torch.distributed as dist

    world = dist.get_world_size(process_group)
    if world == 1:
        return
    by_dtype: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault((t.device, t.dtype), []).append(t)
    for group in by_dtype.values():
        # One flat buffer: a single collective instead of one per parameter.
        buffer = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=process_group)
        buffer.div_(world)
        for t, piece in zip(group, buffer.split([t.numel() for t in group])):
            t.copy_(piece.view_as(t))
