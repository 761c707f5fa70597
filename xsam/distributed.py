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

- Exact HVPs under torch.distributed with more than one rank and neither a DDP
  ``model`` nor a ``process_group`` (``model=ddp.module``, ``model=None``, the
  manual ``refresh_eigenvector`` path) would silently keep each rank's own
  products: refused with a ValueError naming what to pass
  (``EigenvectorTracker.process_group``); ``process_group=None`` keeps them on
  purpose.
- ``gradient_as_bucket_view=True``: the finite-difference HVPs copy each
  closure gradient (``.grad`` is a view into a bucket the next backward
  overwrites).
- Mode (b) and parameters unused in one rank's first pass
  (``find_unused_parameters=True``): their all-reduced second-pass gradient is
  normalised and corrected with the others (``ParamLists.for_descent``).
- Mode (b) with forward-difference HVPs: the base gradient is evaluated again,
  all-reduced (the first pass is each replica's own).
- Mode (b) and ``DistributedDataParallel(static_graph=True)``: refused at
  construction (DDP's static graph cannot skip the first pass's all-reduce).
- ``xsam.amp.SAMGradScaler`` all-reduces its non-finite flag over the DDP
  module's group, so every rank skips the same steps (mode (b)'s first pass
  can overflow on one replica only).

FSDP2 (``torch.distributed.fsdp.fully_shard``): supported. Its parameters are
DTensors sharded on dim 0 (unevenly when the rows do not divide; a rank may hold
no rows). The op set runs the element-wise passes on each rank's shard and
all-reduces the partial sums of every norm and dot product over the mesh (one
small collective per reduction, no host sync), so every rank applies the same
perturbation, correction and eigenvalue, and a step equals the single-process
step on the concatenated batch (FSDP2 averages the gradients)::

    for layer in model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = XSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, momentum=0.9)
    opt.step(closure)

- HVPs are finite differences (``hvp="auto"`` picks them for DTensor parameters);
  they run the closure, whose backward FSDP2 reduce-scatters, so no extra
  averaging. Exact HVPs are refused (``hvp="exact"`` raises a ValueError): FSDP2's
  forward computes with unsharded copies of the parameters, so
  ``torch.autograd.grad`` cannot reach the sharded ones ("The differentiated
  Tensor at index 0 appears to not have been used in the graph").
- The eigenvector and the saved-weights buffers are DTensors laid out like the
  parameters; the random start vector is drawn at full size on every rank and
  split locally, so it is the single-process start vector.
- Shard and Replicate placements are supported: partial sums are all-reduced
  only over the sharded mesh dimensions, so a replicated dimension (HSDP's
  outer one) does not count an element twice. Tested on 1-D meshes (2 ranks,
  gloo, CPU), ``xsam.amp.SAMGradScaler`` included; 2-D meshes and NCCL are
  untested. Partial placements are refused.
  ``per_replica_perturbation`` is a DDP feature (``no_sync``).
- Checkpoints: ``torch.distributed.checkpoint`` (``get_state_dict`` /
  ``dcp.save`` / ``dcp.load`` / ``set_state_dict``) round-trips the sharded
  eigenvector and the counters (xsam/optim/checkpoint.py has the layout).
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
