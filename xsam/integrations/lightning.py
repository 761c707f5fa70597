"""PyTorch Lightning: ``XSAMCallback`` makes automatic optimisation run correct SAM / X-SAM steps.

What goes wrong without it, and the rules in full: docs/training-loops.md, "PyTorch Lightning".
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import DoublePrecision, HalfPrecision, MixedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor

from ..amp import SAMGradScaler
from ..optim import XSAM, SharpnessAware
from ._common import (TwoPassClosure, check_flag, check_sam_optimizer, logged_diagnostics, run_sam_step,
                      running_statistics_untouched)

__all__ = ["XSAMCallback"]

_SUPPORTED_STRATEGIES = (SingleDeviceStrategy, DDPStrategy)
_SUPPORTED_PRECISION = (Precision, DoublePrecision, HalfPrecision, MixedPrecision)
_DDP_HINT = ("In configure_optimizers, build it with model=self.trainer.strategy.model (the DDP module: its "
             "process group averages the HVPs) or process_group=torch.distributed.group.WORLD.")


class XSAMCallback(Callback):
    """Run each step of an ``xsam.SAM`` or ``xsam.XSAM`` optimizer correctly under Lightning's automatic optimisation.

    Return the optimizer from ``configure_optimizers`` as usual (under DDP built with
    ``model=self.trainer.strategy.model``) and add the callback to the Trainer. Precisions, strategies and
    clipping: docs/training-loops.md, "PyTorch Lightning".

    Args:
        log_diagnostics (bool, optional): log the optimizer's per-step diagnostics (``xsam/eigenvalue``,
            ``xsam/cos_gadv_v``, ``xsam/angle_gadv_v`` in degrees, ``xsam/cos_g_v``, ``xsam/grad_norm``,
            ``xsam/adv_grad_norm``) with ``self.log`` after each step (default: True)
    """

    def __init__(self, log_diagnostics: bool = True):
        self.log_diagnostics = check_flag(log_diagnostics)
        self._micro_batches: list[tuple] = []  # (batch, batch_idx) since the last optimizer step
        self._plugin: Precision | None = None
        self._handles: list = []
        self._last_record: dict[str, Tensor] | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise ValueError("XSAMCallback is for automatic optimisation. With automatic_optimization=False, call "
                             "opt.step(closure, loss_fn=...) in training_step yourself (see the README), without "
                             "the callback")
        strategy = trainer.strategy
        if type(strategy) not in _SUPPORTED_STRATEGIES:
            raise ValueError(f"XSAMCallback supports the single-device and DDP strategies, not "
                             f"{type(strategy).__name__}. For FSDP2, write the loop by hand (README, FSDP2)")
        plugin = strategy.precision_plugin
        if type(plugin) not in _SUPPORTED_PRECISION:
            raise ValueError(f"XSAMCallback does not support the {type(plugin).__name__} precision plugin; use "
                             "precision='32-true', '64-true', 'bf16-mixed', '16-mixed', '16-true' or 'bf16-true'")
        # Instance attributes shadow the plugin's methods for this fit only (removed in teardown).
        plugin.optimizer_step = functools.partial(self._optimizer_step, plugin)
        plugin.clip_gradients = functools.partial(_clip_gradients, plugin)
        self._plugin = plugin

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._plugin is not None:
            vars(self._plugin).pop("optimizer_step", None)
            vars(self._plugin).pop("clip_gradients", None)
            self._plugin = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._micro_batches = []

    def on_train_start(self, trainer, pl_module) -> None:
        sam = [optimizer for optimizer in trainer.optimizers if isinstance(optimizer, SharpnessAware)]
        for optimizer in sam:
            check_sam_optimizer(optimizer, "XSAMCallback", _DDP_HINT)
            if self.log_diagnostics:
                self._handles.append(optimizer.register_diagnostics_hook(self._remember_record))
        plugin = self._plugin
        scaler = getattr(plugin, "scaler", None)
        if sam and scaler is not None and not isinstance(scaler, SAMGradScaler):
            # torch's GradScaler refuses closures; this one runs the whole SAM step. Same settings and
            # state (a resumed run's scale has been restored by now).
            plugin.scaler = SAMGradScaler(plugin.device)
            plugin.scaler.load_state_dict(scaler.state_dict())

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._micro_batches = []

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        # Lightning has already moved the batch to the device and converted it for the precision.
        self._micro_batches.append((batch, batch_idx))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        record, self._last_record = self._last_record, None
        if record:
            pl_module.log_dict(record, on_step=True, on_epoch=False)

    def _remember_record(self, optimizer, record: dict) -> None:
        self._last_record = logged_diagnostics(record)

    def _optimizer_step(self, plugin: Precision, optimizer, model, closure, **kwargs):
        """Replaces ``plugin.optimizer_step``: Lightning calls it with the closure of the last micro-batch."""
        if not isinstance(optimizer, SharpnessAware):
            return type(plugin).optimizer_step(plugin, optimizer, model=model, closure=closure, **kwargs)
        trainer = model.trainer
        micro_batches, self._micro_batches = self._micro_batches, []
        # First pass, last micro-batch: Lightning's own closure (training_step with its logging, then
        # backward on top of the gradients the earlier micro-batches accumulated).
        first_loss = closure()
        if first_loss is None:  # training_step returned None: Lightning skips the step, and so do we
            return None
        closure = TwoPassClosure(first_loss, optimizer,
                                 functools.partial(_second_pass, trainer, plugin, optimizer, micro_batches))
        loss_fn = functools.partial(_forward_loss, trainer, plugin, micro_batches)
        own_clipping = optimizer.max_grad_norm
        try:
            return run_sam_step(optimizer, closure, loss_fn, scaler=getattr(plugin, "scaler", None))
        finally:
            optimizer.max_grad_norm = own_clipping  # the clipping _clip_gradients routed lasts one step


def _second_pass(trainer, plugin: Precision, optimizer, micro_batches: list) -> Tensor:
    """Forward and backward of every micro-batch at the perturbed weights, as Lightning's loop does them."""
    strategy, module = trainer.strategy, trainer.lightning_module
    ddp = strategy.model if isinstance(strategy.model, torch.nn.parallel.DistributedDataParallel) else None
    total = None
    with _logging_muted(module), running_statistics_untouched(module):
        for i, (batch, batch_idx) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # DDP all-reduces once, on the last micro-batch, like Lightning's accumulation.
            with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
                output = strategy.training_step(*_step_args(module, batch, batch_idx))
                loss = _loss_of(output) / trainer.accumulate_grad_batches
                strategy.backward(loss, optimizer)
            total = loss.detach() if total is None else total + loss.detach()
    # Hooks and gradient clipping on the gradient the optimizer is about to correct and apply: what
    # Lightning's Precision._wrap_closure runs after a closure (a private method, tested with 2.6).
    plugin._after_closure(module, optimizer)
    return total


def _forward_loss(trainer, plugin: Precision, micro_batches: list) -> Tensor:
    """X-SAM's forward-only loss: the accumulated batch's training loss, for exact HVPs."""
    module = trainer.lightning_module
    with _logging_muted(module), running_statistics_untouched(module), plugin.train_step_context():
        losses = [_loss_of(module.training_step(*_step_args(module, batch, batch_idx)))
                  for batch, batch_idx in micro_batches]
    return sum(losses) / trainer.accumulate_grad_batches


def _clip_gradients(plugin: Precision, optimizer, clip_val=0.0,
                    gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
    """Replaces ``plugin.clip_gradients``, which Lightning calls on the second pass's gradient, inside the step.

    X-SAM normalises that gradient, so clipping it would change nothing: it becomes the optimizer's
    ``max_grad_norm`` for this step. Under 16-mixed the gradients are still scaled here, and so is the threshold.
    """
    if not isinstance(optimizer, XSAM):
        if clip_val and isinstance(getattr(plugin, "scaler", None), SAMGradScaler):
            clip_val = clip_val * plugin.scaler.get_scale()
        type(plugin).clip_gradients(plugin, optimizer, clip_val, gradient_clip_algorithm)
    elif clip_val and clip_val > 0:
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm)
        if algorithm != GradClipAlgorithmType.NORM:
            raise ValueError(f"gradient_clip_algorithm={algorithm.value!r} is not supported with XSAM: it would clip "
                             "the second pass's gradient element by element before X-SAM corrects and normalises it. "
                             "Use gradient_clip_algorithm='norm': XSAMCallback then clips the corrected direction, as "
                             "XSAM(max_grad_norm=...) does")
        if optimizer.max_grad_norm is not None:
            raise ValueError(f"both Trainer(gradient_clip_val={clip_val!r}) and XSAM(max_grad_norm="
                             f"{optimizer.max_grad_norm!r}) ask for clipping; set one of them (they do the same: clip "
                             "the corrected direction)")
        optimizer.max_grad_norm = float(clip_val)


def _step_args(module, batch, batch_idx: int) -> tuple:
    # The same rule Lightning uses: batch_idx is passed when training_step takes a second argument.
    if is_param_in_hook_signature(module.training_step, "batch_idx", min_args=2):
        return batch, batch_idx
    return (batch,)


def _loss_of(output) -> Tensor:
    loss = output.get("loss") if isinstance(output, dict) else output
    if not isinstance(loss, Tensor):
        raise ValueError("XSAMCallback replays training_step and needs it to return the loss (a tensor, or a dict "
                         f"with a 'loss' entry); it returned {type(output).__name__}")
    return loss


@contextlib.contextmanager
def _logging_muted(module):
    """``self.log``/``self.log_dict`` do nothing in the block: the extra passes must not overwrite the logged loss."""
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del module.log, module.log_dict
