"""Hugging Face ``Trainer``: ``XSAMTrainer`` trains with ``xsam.XSAM`` (or ``xsam.SAM``).

The rules in full: docs/training-loops.md, "Hugging Face Trainer".
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import Tensor
from transformers import Trainer

from ..optim import XSAM, SharpnessAware
from ._common import (TwoPassClosure, check_flag, check_sam_optimizer, logged_diagnostics, run_sam_step,
                      running_statistics_untouched)

__all__ = ["XSAMTrainer"]

# sam_kwargs the trainer sets itself, and from what.
_SET_BY_THE_TRAINER = {
    "model": "the model being trained", "process_group": "the world group under DDP",
    "per_replica_perturbation": "False: the Trainer's first pass all-reduces",
    "max_grad_norm": "from TrainingArguments(max_grad_norm=...); set the clipping there",
}


class XSAMTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer is ``xsam.XSAM`` (or ``xsam.SAM``) around the base optimizer
    of ``args``: ``XSAMTrainer(model=model, args=TrainingArguments(...), train_dataset=..., sam_kwargs={"rho": 0.05})``.

    The Trainer's loop is the first pass; ``optimizer.step()``, which it calls without a closure, replays the
    micro-batches at the perturbed weights. ``TrainingArguments(max_grad_norm=...)`` becomes the optimizer's
    ``max_grad_norm`` (it clips the corrected direction): docs/training-loops.md, "Hugging Face Trainer".

    Args:
        *args, **kwargs: the ``Trainer`` arguments. ``optimizers`` must leave the optimizer as
            None (the trainer builds it; a scheduler may be given).
        sam_class (type, optional): ``xsam.XSAM`` or ``xsam.SAM`` (default: ``xsam.XSAM``); the
            optimizer built from it is ``trainer.sam_optimizer`` (``diagnostics()``, ``eigenvector()``)
        sam_kwargs (dict, optional): its own arguments, e.g. ``rho``, ``alpha``, ``correction``,
            ``eig_interval``, ``power_iters``, ``hvp_eval_mode``, ``backend`` (default: None,
            the class defaults). The trainer sets ``model``, ``process_group``,
            ``per_replica_perturbation`` and ``max_grad_norm`` itself (refused here).
        log_diagnostics (bool, optional): add the per-step diagnostics to the logs (default: True)
    """

    def __init__(self, *args, sam_class: type = XSAM, sam_kwargs: dict | None = None,
                 log_diagnostics: bool = True, **kwargs):
        if not (isinstance(sam_class, type) and issubclass(sam_class, SharpnessAware)):
            raise ValueError(f"sam_class={sam_class!r} is invalid: pass xsam.XSAM, xsam.SAM or another xsam "
                             "optimizer class")
        sam_kwargs = dict(sam_kwargs or {})
        reserved = sorted(set(sam_kwargs) & set(_SET_BY_THE_TRAINER))
        if reserved:
            whence = "; ".join(f"{key}: {_SET_BY_THE_TRAINER[key]}" for key in reserved)
            raise ValueError(f"sam_kwargs sets {reserved}, which XSAMTrainer sets itself ({whence}); remove them")
        check_flag(log_diagnostics)
        super().__init__(*args, **kwargs)
        if self.args.fp16:
            raise ValueError("XSAMTrainer does not support fp16=True (accelerate's GradScaler refuses the closure "
                             "SAM needs); use bf16=True, or a hand-written loop with xsam.amp.SAMGradScaler")
        if self.optimizer is not None:
            raise ValueError("XSAMTrainer builds its optimizer from TrainingArguments and sam_kwargs; pass "
                             "optimizers=(None, scheduler) instead of an optimizer")
        self.sam_class = sam_class
        self.sam_kwargs = sam_kwargs
        # The SAM/X-SAM optimizer itself (self.optimizer becomes accelerate's wrapper around it).
        self.sam_optimizer: SharpnessAware | None = None
        self.log_diagnostics = log_diagnostics
        # (model, inputs, num_items_in_batch) of each micro-batch since the last optimizer step.
        self._micro_batches: list[tuple] = []
        self._first_pass_loss: Tensor | None = None
        self._last_record: dict[str, Tensor] | None = None

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        trainable = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if n in decay], "weight_decay": self.args.weight_decay},
                  {"params": [p for n, p in trainable if n not in decay], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        base_class, base_kwargs = (self.optimizer_cls_and_kwargs
                                   or Trainer.get_optimizer_cls_and_kwargs(self.args, opt_model))
        special = {"params", "model", "optimizer_dict"} & set(base_kwargs)
        if not (isinstance(base_class, type) and issubclass(base_class, torch.optim.Optimizer)) or special:
            raise ValueError(f"optim={self.args.optim!r} builds {base_class!r}, which XSAMTrainer cannot wrap; use a "
                             "torch.optim optimizer such as optim='adamw_torch' or optim='sgd'")
        # Built here, not by XSAM: XSAM's own `eps` argument would otherwise take Adam's epsilon.
        base = base_class([dict(g) for g in groups], **base_kwargs)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        group = torch.distributed.group.WORLD if distributed and torch.distributed.get_world_size() > 1 else None
        clip = self.args.max_grad_norm if self.args.max_grad_norm > 0 else None
        optimizer = _driven_by_trainer(self.sam_class)(
            [dict(g) for g in groups], base, model=opt_model, process_group=group, max_grad_norm=clip,
            **self.sam_kwargs)
        check_sam_optimizer(optimizer, "XSAMTrainer", "")
        optimizer.trainer_step = functools.partial(self._sam_step, optimizer)
        if self.log_diagnostics:
            optimizer.register_diagnostics_hook(self._remember_record)
        self.optimizer = self.sam_optimizer = optimizer
        return optimizer

    def training_step(self, model, inputs, num_items_in_batch=None) -> Tensor:
        """The Trainer's training step (the first pass of this micro-batch), remembered for the second pass."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._micro_batches.append((model, inputs, num_items_in_batch))
        self._first_pass_loss = loss if self._first_pass_loss is None else self._first_pass_loss + loss
        return loss

    def _sam_step(self, optimizer: SharpnessAware) -> Tensor | None:
        """``optimizer.step()`` as the Trainer calls it: the whole SAM/X-SAM step on the accumulated batch."""
        micro_batches, self._micro_batches = self._micro_batches, []
        first_loss, self._first_pass_loss = self._first_pass_loss, None
        if not micro_batches:
            raise RuntimeError("optimizer.step() ran before any training_step of XSAMTrainer; the SAM step needs "
                               "the micro-batches of the first pass")
        closure = TwoPassClosure(first_loss, optimizer, functools.partial(self._second_pass, micro_batches))
        return run_sam_step(optimizer, closure, functools.partial(self._forward_loss, micro_batches))

    def _second_pass(self, micro_batches: list) -> Tensor:
        total = None
        with running_statistics_untouched(self.model):
            for i, (model, inputs, num_items_in_batch) in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                # DDP all-reduces once, on the last micro-batch, as in the Trainer's first pass.
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, inputs, num_items_in_batch)
                total = loss if total is None else total + loss
        return total

    def _clip_grad_norm(self, model) -> None:
        """Not done: the optimizer's ``max_grad_norm`` clips the step; None has the Trainer measure the norm it logs."""
        return None

    def _forward_loss(self, micro_batches: list) -> Tensor:
        """X-SAM's forward-only loss for exact HVPs: the accumulated batch's loss, scaled as training_step scales it."""
        losses = []
        with running_statistics_untouched(self.model), self.compute_loss_context_manager():
            for _, inputs, num_items_in_batch in micro_batches:
                loss = self.compute_loss(self.model, self._prepare_inputs(inputs),
                                         num_items_in_batch=num_items_in_batch)
                if not self._loss_is_scaled_for_accumulation(num_items_in_batch):
                    loss = loss / self.current_gradient_accumulation_steps
                losses.append(loss)
        return sum(losses)

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        # The rule of Trainer.training_step: compute_loss already divided by the accumulated batch's
        # token count when the model takes num_items_in_batch, or a custom compute_loss_func did.
        explicit = getattr(self, "loss_is_scaled_for_ga", None)
        if explicit is not None:
            return explicit
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _remember_record(self, optimizer, record: dict) -> None:
        self._last_record = logged_diagnostics(record)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, plus the last step's X-SAM diagnostics next to the training loss."""
        if "loss" in logs and self._last_record:
            logs.update({k: v.item() for k, v in self._last_record.items()})
            self._last_record = None
        super().log(logs, *args, **kwargs)


@functools.cache
def _driven_by_trainer(optimizer_class: type) -> type:
    """A subclass whose ``step()`` without a closure (the Trainer's call) runs ``self.trainer_step()``."""

    class TrainerDriven(optimizer_class):
        trainer_step = None

        def step(self, closure=None, **kwargs):
            if closure is None and self.trainer_step is not None:
                return self.trainer_step()
            return super().step(closure, **kwargs)

    TrainerDriven.__name__ = TrainerDriven.__qualname__ = f"TrainerDriven{optimizer_class.__name__}"
    return TrainerDriven
