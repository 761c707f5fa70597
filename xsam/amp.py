"""Mixed precision for SAM-type optimizers: a gradient scaler that accepts closures.

``torch.amp.GradScaler.step`` refuses closures, and SAM needs one. ``SAMGradScaler.step`` runs the
optimizer's whole step with every pass's gradients and every HVP product unscaled and checked. The
recipe and the rules under DDP and FSDP2: docs/training-loops.md, "Mixed precision".
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .distributed import is_dtensor
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

        def run_step(loss_fn):
            return optimizer.step(closure, loss_fn=loss_fn) if with_eigenvector else optimizer.step(closure)

        if not self._enabled:
            return run_step(loss_fn)

        import torch.distributed as dist
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

        # Every rank must decide alike (else step counters and collectives drift apart: a hang), so the flag
        # is summed over the data-parallel group and the sharded mesh dimensions; without a known group,
        # DDP's all-reduce of both passes already makes the flags equal.
        def check(tensors: list[Tensor], kind: str) -> Tensor:
            flag = torch.zeros((), dtype=torch.float32, device=scale.device)
            by_group: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
            groups: dict = {}  # first-seen order, from global DTensor metadata: the same on every rank
            for t in tensors:
                if is_dtensor(t):
                    # Partial dimensions count too: the full tensor is non-finite whenever a local one is.
                    for dim, placement in enumerate(t.placements):
                        if not placement.is_replicate():
                            groups.setdefault(t.device_mesh.get_group(dim), None)
                    t = t.to_local()  # a view: the unscale below lands in the gradient's storage
                by_group.setdefault((t.device, t.dtype), []).append(t)
            if data_parallel is not None:
                groups.setdefault(data_parallel, None)
            for (device, _), group in by_group.items():
                local = torch.zeros((), dtype=torch.float32, device=device)
                torch._amp_foreach_non_finite_check_and_unscale_(group, local, inv_scale.to(device))
                flag += local.to(scale.device)
            for group in groups:  # queued on the device like the op set's reductions: no host sync
                dist.all_reduce(flag, op=dist.ReduceOp.SUM, group=group)
            found_any.add_(flag)
            return flag

        scaled_loss_fn = None if loss_fn is None else (lambda: self.scale(loss_fn()))
        with optimizer.gradient_check(check):
            loss = run_step(scaled_loss_fn)
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
