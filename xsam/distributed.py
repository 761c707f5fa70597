"""Data-parallel training with SAM and X-SAM (torch.nn.parallel.DistributedDataParallel).

Two modes, chosen at construction (pass ``model=`` the DDP module):

(a) synchronised perturbation (default): both passes are all-reduced by DDP, so
    the perturbation uses the full-batch gradient and every step equals the
    single-process step on the concatenated batch (up to rounding)::

        ddp = DistributedDataParallel(model)
        opt = XSAM(ddp.parameters(), torch.optim.SGD, model=ddp, lr=0.1, momentum=0.9)

(b) per-replica perturbation (``per_replica_perturbation=True``): the first pass
    runs under ``ddp.no_sync()`` (forward and backward), so each replica perturbs
    its weights by its own mini-batch gradient (the SAM paper's m-sharpness, with
    m = the per-replica batch); the second pass is all-reduced as usual, so the
    update, and hence the weights, stay identical on every rank.

The eigenvector is identical on every rank in both modes: exact HVPs
(``torch.autograd.grad``, which bypasses DDP's reducer) are averaged over
``process_group`` (default: the DDP module's group); finite-difference HVPs run
the closure, whose backward DDP already averages. Write ``loss_fn`` with the
unwrapped module (``ddp.module``): the HVP forward needs no DDP bookkeeping.

FSDP2 (``torch.distributed.fsdp.fully_shard``) is not supported yet: its
parameters are sharded DTensors, and the norms and dot products the optimizer
needs would have to be reduced across the shards. The optimizer rejects such
parameters with a clear error instead of computing per-shard norms.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .hessian import all_reduce_mean_

__all__ = ["all_reduce_mean_", "replicas_identical"]


def replicas_identical(tensors: Sequence[Tensor], process_group=None) -> bool:
    """Whether every rank holds bit-identical ``tensors`` (a debugging check; collective, syncs).

    Compares each rank's bytes with rank 0's by broadcasting rank 0's copy.
    """
    import torch.distributed as dist

    mismatch = torch.zeros(1, dtype=torch.int64)
    for t in tensors:
        reference = t.detach().clone().cpu()
        dist.broadcast(reference, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                       group=process_group)
        if not torch.equal(reference, t.detach().cpu()):
            mismatch += 1
    dist.all_reduce(mismatch, group=process_group)
    return mismatch.item() == 0
