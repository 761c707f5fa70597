"""What the trainer integrations share: a SAM step whose first pass the trainer's loop already ran.

A trainer (Lightning, Hugging Face) runs forward and backward for each micro-batch of an
accumulated batch and then asks the optimizer to step. For SAM that loop IS the first
pass: the accumulated gradient g of the whole batch is in ``.grad``. The step then has to
evaluate the gradient of the same micro-batches at the perturbed weights (second pass).

``optimizer.step(closure, loss_fn)`` calls its closure once per gradient pass and, with
exact Hessian-vector products (``loss_fn`` given), never for the HVPs. So the closure
built here answers its first call with the gradient the trainer already computed (no
recomputation) and its second call by replaying the micro-batches. With
finite-difference HVPs the closure would also be called for the HVPs, at other weights,
and the first call would no longer be the first pass: that combination is refused.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from ..optim import SharpnessAware
from ..optim import EigenvectorBase

# Per-step diagnostics written to the trainer's logs, under "xsam/<name>".
LOGGED_DIAGNOSTICS = ("eigenvalue", "cos_gadv_v", "cos_g_v", "grad_norm", "adv_grad_norm")
_UNKNOWN = object()


def check_sam_optimizer(optimizer, integration: str, ddp_hint: str) -> None:
    """Refuse the optimizer settings the trainer-driven step cannot run correctly."""
    hvp = getattr(getattr(optimizer, "tracker", None), "hvp", None)
    if hvp in ("finite_difference", "forward_difference"):
        raise ValueError(f"{integration} needs exact Hessian-vector products: build the optimizer with hvp='auto' "
                         f"(the default) or hvp='exact', not {hvp!r}. It supplies a forward-only loss built from your "
                         "training step; finite-difference HVPs would re-run the whole training step (logging, "
                         "hooks, gradient clipping) at other weights")
    if getattr(optimizer, "per_replica_perturbation", False):
        raise ValueError(f"{integration} does not support per_replica_perturbation=True: the trainer's own loop "
                         "runs the first pass with DDP's gradient all-reduce. Build the optimizer without it")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if (isinstance(optimizer, EigenvectorBase) and distributed and torch.distributed.get_world_size() > 1
            and getattr(optimizer, "process_group", _UNKNOWN) is None):
        raise ValueError("XSAM's exact Hessian-vector products bypass DDP's gradient all-reduce, so each rank "
                         f"would compute its own eigenvector and the replicas would drift apart. {ddp_hint}")


@contextlib.contextmanager
def running_statistics_untouched(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode normalise by batch statistics but do not update their running ones.

    For the passes after the first and for ``loss_fn``. Unlike ``xsam.batchnorm_statistics_frozen``,
    which copies the saved statistics back in place afterwards, it never writes to the buffers,
    so an autograd graph built in the block (the HVPs' create-graph backward) stays valid.
    Layers in eval mode use their running statistics and do not update them anyway.
    """
    layers = [m for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in layers:
            m.track_running_stats = True


def stash_gradients(optimizer) -> list[tuple[Tensor, Tensor | None]]:
    """Keep references to the current ``.grad`` tensors (no copy): the first pass, done by the trainer."""
    return [(p, p.grad) for group in optimizer.param_groups for p in group["params"]]


def restore_gradients(stash: list[tuple[Tensor, Tensor | None]]) -> None:
    for p, grad in stash:
        p.grad = grad


class TwoPassClosure:
    """The closure for ``optimizer.step``: call 1 restores the trainer's first pass, call 2 replays.

    Args:
        first_pass_loss (Tensor): the loss the trainer's first pass computed, returned by call 1.
        first_pass_gradients (list): ``stash_gradients(optimizer)`` taken right after that pass.
        second_pass (callable): forward and backward of every micro-batch at the current
            (perturbed) weights; returns the loss.
    """

    def __init__(self, first_pass_loss: Tensor | None, first_pass_gradients: list, second_pass: Callable[[], Tensor]):
        self.first_pass_loss = first_pass_loss
        self.first_pass_gradients = first_pass_gradients
        self.second_pass = second_pass
        self.calls = 0

    def __call__(self) -> Tensor | None:
        self.calls += 1
        if self.calls == 1:
            restore_gradients(self.first_pass_gradients)
            return self.first_pass_loss
        if self.calls == 2:
            return self.second_pass()
        raise RuntimeError("the optimizer called the closure a third time in one step; the trainer integrations "
                           "expect exactly two gradient passes per step (exact HVPs come from loss_fn). If the "
                           "optimizer was built with hvp='finite_difference', use hvp='auto' or 'exact'")


def run_sam_step(optimizer: SharpnessAware, closure: Callable[[], Tensor], loss_fn: Callable[[], Tensor] | None,
                 scaler=None) -> Tensor | None:
    """One SAM/X-SAM step, through ``xsam.amp.SAMGradScaler`` when given (fp16); returns the first-pass loss."""
    if not isinstance(optimizer, EigenvectorBase):
        loss_fn = None  # plain SAM has no HVPs
    if scaler is not None:
        loss = scaler.step(optimizer, closure, loss_fn=loss_fn)
        scaler.update()
        return loss
    if isinstance(optimizer, EigenvectorBase):
        return optimizer.step(closure, loss_fn=loss_fn)
    return optimizer.step(closure)


def logged_diagnostics(record: dict) -> dict[str, Tensor]:
    """The scalars of one diagnostics record to log, as 0-d device tensors (copies; no host sync).

    Adds ``angle_gadv_v``: the angle in degrees between the perturbed gradient and the eigenvector.
    """
    out = {}
    for key in LOGGED_DIAGNOSTICS:
        value = record.get(key)
        if isinstance(value, Tensor):
            out[f"xsam/{key}"] = value.detach().reshape(()).float().clone()
    cos = out.get("xsam/cos_gadv_v")
    if cos is not None:
        out["xsam/angle_gadv_v"] = torch.arccos(cos.clamp(-1.0, 1.0)) * (180.0 / math.pi)
    return out
