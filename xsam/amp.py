"""Mixed precision for SAM-type optimizers: a gradient scaler that accepts closures.

``torch.amp.GradScaler.step`` refuses closures, and SAM needs one (two gradient passes, plus
the HVPs of an X-SAM refresh). ``SAMGradScaler`` is a GradScaler whose ``step`` runs the
optimizer's whole step with a check attached to every pass: each pass's gradients and every
HVP product are unscaled with GradScaler's own fused kernel before the optimizer uses them; a
non-finite pass skips the whole step (the step transaction undoes it), a non-finite product
rejects that refresh only (``refresh_rejected=True``, retried at the next step); either
lowers the scale at ``update()``. The recipe: docs/training-loops.md, "Mixed precision".

Every rank must take the same decision, or the ranks' step counters and collectives drift
apart (a hang). So the non-finite flag of every check is all-reduced (SUM, > 0 means
non-finite), one collective per distinct group, over:

- the data-parallel group: the DDP module's group when ``model=`` is a
  ``DistributedDataParallel``, else the optimizer's ``process_group`` when it is a group.
  Needed for DDP's per-replica perturbation, whose first pass is not all-reduced, so one
  replica can overflow alone; elsewhere redundant and cheap;
- for sharded parameters (FSDP2; gradients are DTensors), the process groups of the
  non-replicated mesh dimensions (each rank unscales and checks its local shard in place).

Without a known group nothing is reduced: DDP's own all-reduce of both passes already makes
the gradients, and so the flags, the same on every rank. The flag is read on the host after
each pass and once per refresh (the stock ``GradScaler.step`` reads it once per step): skipping
is a host decision.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import ops
from .optim import EigenvectorBase, SharpnessAware

__all__ = ["SAMGradScaler"]


class SAMGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose ``step(optimizer, closure, loss_fn=None)`` drives SAM/X-SAM steps."""

    def unscale_(self, optimizer) -> None:  # noqa: D102 - the stock one would unscale between passes
        raise RuntimeError("SAMGradScaler unscales every pass itself inside step(optimizer, closure); do not "
                           "call unscale_(). To clip, build the optimizer with max_grad_norm=<the norm, in "
                           "unscaled units> (it clips what the base optimizer sees, after unscaling)")

    def step(self, optimizer: SharpnessAware, closure: Callable[[], Tensor] | None = None,  # type: ignore[override]
             loss_fn: Callable[[], Tensor] | None = None) -> Tensor | None:
        """Run one SAM/X-SAM step with every pass unscaled and checked; returns the first-pass loss."""
        if not isinstance(optimizer, SharpnessAware):
            raise TypeError(f"optimizer={type(optimizer).__name__} is not a SAM-type optimizer; use "
                            "torch.amp.GradScaler for ordinary optimizers")
        if closure is None:
            raise ValueError("SAMGradScaler.step needs a closure: step(optimizer, closure) where closure() runs "
                             "forward and scaler.scale(loss).backward() and returns the loss")
        with_eigenvector = isinstance(optimizer, EigenvectorBase)
        if loss_fn is not None and not with_eigenvector:
            raise ValueError("loss_fn is only used by optimizers with an eigenvector (exact HVPs); SAM takes the "
                             "closure only")
        if not self._enabled:
            return optimizer.step(closure, loss_fn=loss_fn) if with_eigenvector else optimizer.step(closure)

        from torch.amp.grad_scaler import OptState  # the stage bookkeeping update() relies on

        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("step() has already been called since the last update(); call scaler.update() "
                               "once per iteration")
        if self._scale is None:  # the scale is created lazily by the first scale() call
            self._lazy_init_scale_growth_tracker(torch.device(self._device))
        scale, _ = self._check_scale_growth_tracker("step")
        # In fp64 then fp32, as GradScaler does: 1/scale is exact for power-of-two scales.
        inv_scale = scale.double().reciprocal().float()
        found_any = torch.zeros((), dtype=torch.float32, device=scale.device)
        data_parallel = _data_parallel_group(optimizer)

        def check(tensors: list[Tensor], kind: str) -> Tensor:
            flag = torch.zeros((), dtype=torch.float32, device=scale.device)
            by_group: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            dtensor = ops.dtensor_type()
            groups = _sharded_groups(tensors, dtensor)
            if data_parallel is not None:
                groups.setdefault(data_parallel, None)
            for t in tensors:
                if dtensor is not None and isinstance(t, dtensor):
                    t = t.to_local()  # a view: the unscale below lands in the gradient's storage
                by_group.setdefault((t.device, t.dtype), []).append(t)
            for (device, _), group in by_group.items():
                local = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(group, local, inv_scale.to(device))
                flag += local.to(scale.device)
            if groups:
                _all_reduce_flag(flag, groups)
            found_any.add_(flag)
            return flag

        scaled_loss_fn = None if loss_fn is None else (lambda: self.scale(loss_fn()))
        with optimizer.gradient_check(check):
            if with_eigenvector:
                loss = optimizer.step(closure, loss_fn=scaled_loss_fn)
            else:
                loss = optimizer.step(closure)
        state["found_inf_per_device"] = {scale.device: found_any}
        state["stage"] = OptState.STEPPED
        return loss


def _data_parallel_group(optimizer: SharpnessAware):
    """The group whose ranks must skip together: the DDP module's, else an explicit ``process_group``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(optimizer.model, torch.nn.parallel.DistributedDataParallel):
        return optimizer.model.process_group
    group = optimizer.process_group
    return None if group is None or isinstance(group, str) else group


def _sharded_groups(tensors: list[Tensor], dtensor: type | None) -> dict:
    """The process groups, in first-seen order, whose ranks hold different parts of some DTensor.

    Unlike the op set's norms (``ops._reduction_key``), a non-finite check also reduces over
    Partial dimensions: the full tensor is the sum of the local ones, so it is non-finite
    whenever a local one is. Only Replicate dimensions, which hold the same values on every
    rank, are left out. The order depends only on global DTensor metadata, so every rank
    issues the same collectives in the same order.
    """
    groups: dict = {}
    if dtensor is None:
        return groups
    for t in tensors:
        if isinstance(t, dtensor):
            for dim, placement in enumerate(t.placements):
                if not placement.is_replicate():
                    groups.setdefault(t.device_mesh.get_group(dim), None)
    return groups


def _all_reduce_flag(flag: Tensor, groups: dict) -> None:
    """All-reduce (SUM) the flag in place over each of ``groups``.

    After the sums, ``flag > 0`` on every rank of these groups iff one of them found a
    non-finite value. No host sync: the collective is queued on the device like the op
    set's reductions.
    """
    import torch.distributed as dist

    for group in groups:
        dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
