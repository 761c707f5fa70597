"""What the trainer integrations share: a SAM step whose first pass the trainer's loop already ran.

Finite-difference HVPs would call the closure at other weights, so they are refused.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..optim import EigenvectorBase, SharpnessAware
from ..optim.model_state import batchnorm_layers

# Per-step diagnostics written to the trainer's logs, under "xsam/<name>".
LOGGED_DIAGNOSTICS = ("eigenvalue", "cos_gadv_v", "cos_g_v", "grad_norm", "adv_grad_norm")


def check_flag(log_diagnostics) -> bool:
    if not isinstance(log_diagnostics, bool):
        raise ValueError(f"log_diagnostics={log_diagnostics!r} is invalid: pass True or False")
    return log_diagnostics


def check_sam_optimizer(optimizer, integration: str, ddp_hint: str) -> None:
    """Refuse the optimizer settings the trainer-driven step cannot run correctly."""
    hvp = getattr(getattr(optimizer, "tracker", None), "hvp", None)
    if hvp in ("finite_difference", "forward_difference"):
        raise ValueError(f"{integration} needs exact Hessian-vector products: build the optimizer with hvp='auto' "
                         f"(the default) or hvp='exact', not {hvp!r}. It supplies a forward-only loss built from your "
                         "training step; finite-difference HVPs would re-run the whole training step (logging, "
                         "hooks, gradient clipping) at other weights")
    if optimizer.per_replica_perturbation:
        raise ValueError(f"{integration} does not support per_replica_perturbation=True: the trainer's own loop "
                         "runs the first pass with DDP's gradient all-reduce. Build the optimizer without it")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (isinstance(optimizer, EigenvectorBase) and distributed and torch.distributed.get_world_size() > 1
            and optimizer.process_group is None):
        raise ValueError("XSAM's exact Hessian-vector products bypass DDP's gradient all-reduce, so each rank "
                         f"would compute its own eigenvector and the replicas would drift apart. {ddp_hint}")


@contextlib.contextmanager
def running_statistics_untouched(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise by batch statistics but leave their running ones alone.

    Unlike ``xsam.batchnorm_statistics_frozen`` it never writes to the buffers, so the HVPs' graph stays valid.
    """
    layers = [m for m in batchnorm_layers(model) if m.training]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


class TwoPassClosure:
    """The closure for ``optimizer.step``: call 1 restores the trainer's first pass (the ``.grad`` tensors it
    left, kept without a copy), call 2 returns ``second_pass()``, run at the perturbed weights."""

    def __init__(self, first_pass_loss: Tensor | None, optimizer, second_pass: Callable[[], Tensor]):
        self.first_pass_loss = first_pass_loss
        self.first_pass_gradients = [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]
        self.second_pass = second_pass
        self.calls = 0

    def __call__(self) -> Tensor | None:
        self.calls += 1
        if self.calls == 1:
            for p, grad in self.first_pass_gradients:
                p.grad = grad
            return self.first_pass_loss
        if self.calls == 2:
            return self.second_pass()
        raise RuntimeError("the optimizer called the closure a third time in one step; the trainer integrations "
                           "expect exactly two gradient passes per step (exact HVPs come from loss_fn). If the "
                           "optimizer was built with hvp='finite_difference', use hvp='auto' or 'exact'")


def run_sam_step(optimizer: SharpnessAware, closure: Callable[[], Tensor], loss_fn: Callable[[], Tensor] | None,
                 scaler=None) -> Tensor | None:
    """One SAM/X-SAM step, through ``xsam.amp.SAMGradScaler`` when given (fp16); returns the first-pass loss."""
    hvp_loss = {"loss_fn": loss_fn} if isinstance(optimizer, EigenvectorBase) else {}  # plain SAM has no HVPs
    if scaler is None:
        return optimizer.step(closure, **hvp_loss)
    loss = scaler.step(optimizer, closure, **hvp_loss)
    scaler.update()
    return loss


def logged_diagnostics(record: dict) -> dict[str, Tensor]:
    """The scalars of one diagnostics record to log, as 0-d device tensors (copies; no host sync), and
    ``angle_gadv_v`` in degrees."""
    out = {f"xsam/{key}": record[key].detach().reshape(()).float().clone() for key in LOGGED_DIAGNOSTICS
           if isinstance(record.get(key), Tensor)}
    cos = out.get("xsam/cos_gadv_v")
    if cos is not None:
        out["xsam/angle_gadv_v"] = torch.arccos(cos.clamp(-1.0, 1.0)) * (180.0 / math.pi)
    return out
