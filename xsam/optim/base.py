"""The step protocol SAM, XSAM and EigenSAM share: one transaction per step.

    validate -> [refresh] -> pass 1 -> [refresh] -> perturb -> pass 2 -> descend (correct + restore,
    clip, base step) -> commit -> hooks

Every step is all-or-nothing. Nothing moves before the hyper-parameters of every group are
checked; the weights are restored bit-exactly from the saved copy, the BatchNorm statistics
put back and the counters reset if anything raises (the closure included) or a pass is not
finite (AMP); the optimizer's own state changes only in ``_commit``. Diagnostics hooks run
after the commit: an exception in a hook propagates, but the step it reports stays whole.

Every hook a subclass may override (``EigenvectorBase`` overrides them for the eigenvector).
A step calls, in this order:

- ``_check_hyperparameters(values, where)``: the per-group keys (the defaults, and every group
  at construction and before every step);
- ``_initial_global_state()``: the global state of a fresh optimizer;
- ``_refresh(txn, after_first_pass)``: the eigenvector, before or after the first pass;
- ``_first_pass_sums(txn, active, grads)``: the ``FirstPassSums`` the ascent needs;
- ``_perturb_group(txn, active, group, grads, sums)``: the ascent of one param group;
- ``_descent(txn, active, grads)``: the direction the base optimizer steps with, and the
  exact restore of w;
- ``_commit(txn)``: store what the step computed (call ``super()._commit``);
- ``_record(txn)``: the record the diagnostics hooks receive.

Checkpoints (``xsam.optim.checkpoint``): ``STATE_KEYS`` (the wrapper's own per-parameter
keys), ``_checkpoint_global()`` and ``_checkpoint_per_param(params, trainable)`` (what is
saved), ``_check_checkpoint(global_state, per_param, params, positions)`` (refuse before
anything is loaded), ``_restore_global(saved, own)`` (the live state from the saved) and
``_after_load()``.
"""
from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import ops
from .checkpoint import GLOBAL, CheckpointMixin
from .functional import inverse_norm
from .lists import GroupLists, ParamLists, structure_key
from .model_state import BatchNormState, batchnorm_statistics_frozen
from .validation import (check_base_optimizer, check_eps, check_model, check_number, check_parameters,
                         check_process_group, check_rho, fill_prebuilt_groups, own_eps, split_base_kwargs)

__all__ = ["GLOBAL", "FirstPassSums", "GradientCheck", "SharpnessAware", "StepTransaction"]

Closure = Callable[[], Tensor]
# ``check(tensors, kind)``: see ``SharpnessAware.gradient_check``.
GradientCheck = Callable[[list[Tensor], str], Tensor]


class NonFiniteGradients(Exception):
    """Raised inside a step when a pass produced inf/nan: the step is undone and skipped."""


@dataclass
class StepTransaction:
    """What one step has done so far, so that it can be committed or undone."""

    lists: ParamLists
    counters: dict  # the global state as it was (host values and device-tensor references)
    batchnorm: BatchNormState | None  # running statistics before the first pass
    closure: Closure | None = None
    loss_fn: Closure | None = None
    loss: Tensor | None = None
    perturbed: list[GroupLists] = field(default_factory=list)  # groups whose weights are in `saved`
    perturbed_lists: ParamLists | None = None
    refresh: Any = None  # the eigenvector computed in this step (X-SAM, Eigen-SAM)
    first_pass_gradient: list[Tensor] | None = None  # hvp="streaming": a copy of g, aligned with `lists`
    first_pass_randomness: Any = None  # the random generators' states before the first pass (forward differences)
    base_step_started: bool = False  # the base optimizer may have changed its state: no full rollback
    diagnostics: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class FirstPassSums:
    """The global sums of the first pass that the ascent needs, from one fused reduction."""

    inv_norm: Tensor  # 1 / (||g|| + eps) (ASAM: of ||w * g||): the ascent is rho * inv_norm * g
    gv: Tensor | None = None  # <g, v>, once there is a v (X-SAM, Eigen-SAM)
    vecs: list[Tensor] | None = None  # v, aligned with the first pass's gradients


class SharpnessAware(CheckpointMixin, torch.optim.Optimizer):
    """Base of SAM, XSAM and EigenSAM: param groups shared with a base optimizer, and the step protocol."""

    KIND = "SAM"  # recorded in checkpoints, so that one kind's state is not loaded into another

    def __init__(self, params, base_optimizer, defaults: dict, *, model: nn.Module | None,
                 per_replica_perturbation: bool, process_group, backend: str, eps: float | None,
                 max_grad_norm: float | None, base_kwargs: dict):
        self._check_hyperparameters(defaults, "")
        check_base_optimizer(base_optimizer)
        eps = check_eps(own_eps(type(self).__name__, base_optimizer, eps))
        if isinstance(base_optimizer, type):
            split_base_kwargs(type(self), base_optimizer, base_kwargs)
        ops.check_backend_name(backend)
        if max_grad_norm is not None:
            max_grad_norm = check_number("max_grad_norm", max_grad_norm, 0.0, low_open=True,
                                         hint="Pass None for no clipping.")
        check_model(model, per_replica_perturbation)
        check_process_group(process_group)
        self.model = model
        self.per_replica_perturbation = per_replica_perturbation
        self.process_group = process_group
        self.backend = backend
        self.eps = eps
        self.max_grad_norm = max_grad_norm
        self._own_defaults = dict(defaults)
        self._lists: ParamLists | None = None
        self._lists_key: tuple | None = None
        self._open: StepTransaction | None = None  # between a manual first_step() and second_step()
        self._broken: str | None = None  # why steps are refused until a checkpoint is loaded
        # An OrderedDict: RemovableHandle keeps a weak reference to it.
        self._diagnostics_hooks: collections.OrderedDict[int, Callable] = collections.OrderedDict()
        self._gradient_check: GradientCheck | None = None  # see gradient_check()
        self._stateless_base_key: tuple | None = None  # checkpoint.py: a base optimizer known to keep no state
        self.base_optimizer: torch.optim.Optimizer | None = None
        super().__init__(params, defaults)
        check_parameters(self.param_groups, type(self).__name__)
        self._attach_base_optimizer(base_optimizer, base_kwargs)
        self.state[GLOBAL] = self._initial_global_state()

    # ----- param groups ------------------------------------------------------------------
    def _attach_base_optimizer(self, base_optimizer, base_kwargs: dict) -> None:
        if isinstance(base_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"{sorted(base_kwargs)} are base-optimizer arguments, but base_optimizer is "
                                 "already built; pass them to its constructor instead")
            mine = [p for g in self.param_groups for p in g["params"]]
            theirs = [p for g in base_optimizer.param_groups for p in g["params"]]
            if len(mine) != len(theirs) or any(a is not b for a, b in zip(mine, theirs)):
                raise ValueError("base_optimizer was built over other parameters than `params`; "
                                 "build it over the same parameters, or pass its class instead")
            fill_prebuilt_groups(base_optimizer.param_groups, self.param_groups, self._own_defaults)
            self.base_optimizer = base_optimizer
        else:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        # One list of group dicts for both: a scheduler or add_param_group on either acts on both.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        for index, group in enumerate(self.param_groups):
            self._validate_group(index, group)

    def add_param_group(self, param_group: dict) -> None:
        if self.base_optimizer is None:  # called by Optimizer.__init__
            super().add_param_group(param_group)
            self._validate_group(len(self.param_groups) - 1, self.param_groups[-1])
            return
        group = dict(param_group)
        self._validate_group(len(self.param_groups), group)
        self.base_optimizer.add_param_group(group)

    def _validate_group(self, index: int, group: dict) -> None:
        """Fill this class's keys a group lacks (a group added to the base optimizer) and check them."""
        for key, value in self._own_defaults.items():
            group.setdefault(key, value)
        self._check_hyperparameters(group, f"param_groups[{index}]: ")

    def _check_hyperparameters(self, values: dict, where: str) -> None:
        """The per-group keys of the defaults (where="") or of a group; each class extends it for its own."""
        values["rho"] = check_rho(values["rho"], where)

    def _step_lists(self) -> ParamLists:
        key = structure_key(self.param_groups)
        if key != self._lists_key:
            lists = ParamLists.build(self.param_groups)
            check_parameters(self.param_groups, type(self).__name__)
            self._lists, self._lists_key = lists, key
        return self._lists

    # ----- the transaction ---------------------------------------------------------------
    def _initial_global_state(self) -> dict:
        return {"kind": self.KIND, "step": 0, "skipped_steps": 0}

    @property
    def _global(self) -> dict:
        return self.state[GLOBAL]

    def _begin(self, closure: Closure | None, loss_fn: Closure | None) -> StepTransaction:
        if self._open is not None:
            raise RuntimeError("the weights are still perturbed by a manual first_step(): finish that step with "
                               "second_step() before calling step(closure) or first_step() again (or use "
                               "step(closure) alone, which runs both passes)")
        if self._broken is not None:
            raise RuntimeError(self._broken)
        for index, group in enumerate(self.param_groups):
            self._validate_group(index, group)
        lists = self._step_lists()
        if not any(p.requires_grad for p in lists.params):  # frozen since: the constructor's message
            check_parameters(self.param_groups, type(self).__name__)
        return StepTransaction(lists=lists, counters=dict(self._global), batchnorm=BatchNormState.capture(self.model),
                               closure=closure, loss_fn=loss_fn)

    def _run(self, txn: StepTransaction) -> None:
        """The algorithm of one step (every part may raise; the caller undoes what was done)."""
        self._refresh(txn, after_first_pass=False)
        txn.loss = self._pass(txn, first=True)
        self._refresh(txn, after_first_pass=True)
        self._perturb(txn)
        self._pass(txn, first=False)
        self._descend(txn)

    def _execute(self, txn: StepTransaction, body: Callable[[StepTransaction], None]) -> bool:
        """Run ``body``; True when the step completed, False when a non-finite pass skipped it."""
        try:
            body(txn)
        except NonFiniteGradients:
            self._rollback(txn)
            self._global["skipped_steps"] += 1
            return False
        except BaseException:
            self._rollback(txn)
            raise
        return True

    @torch.no_grad()
    def _rollback(self, txn: StepTransaction) -> None:
        """Undo a step: exact weights back, BatchNorm statistics back, counters back, no gradients.

        The base optimizer's state has no copy (one would cost its size every step): when its own
        step raised, the weights moved in this step go back, and further steps are refused until
        a checkpoint is loaded, so that a retry cannot apply part of the update twice.
        """
        self._open = None
        if txn.base_step_started:
            txn.perturbed = txn.perturbed_lists.groups
            self._broken = (f"the base optimizer {type(self.base_optimizer).__name__} raised inside its step (or "
                            "one of its step hooks), so its state (momentum, ...) may be partly updated; the weights "
                            "were put back, but a retry could apply part of the update twice. Load a checkpoint "
                            f"with load_state_dict() before stepping this {type(self).__name__} again")
        for g in txn.perturbed:
            ops.copy_(g.of(txn.perturbed_lists.params), g.of(txn.perturbed_lists.saved))
        txn.perturbed = []
        if txn.batchnorm is not None:
            txn.batchnorm.restore()
        self._global.clear()
        self._global.update(txn.counters)
        self.zero_grad(set_to_none=True)

    def _finish(self, txn: StepTransaction) -> None:
        """Commit the step, then report it to the hooks (after the commit: a raising hook leaves it whole)."""
        self._commit(txn)
        if self._diagnostics_hooks:
            record = self._record(txn)
            for hook in list(self._diagnostics_hooks.values()):
                hook(self, record)

    def _commit(self, txn: StepTransaction) -> None:
        self._global.update(txn.diagnostics)
        self._global["step"] += 1

    def _record(self, txn: StepTransaction) -> dict:
        return dict(txn.diagnostics, step=self._global["step"] - 1, refreshed=txn.refresh is not None)

    # ----- the passes ----------------------------------------------------------------------
    def _pass(self, txn: StepTransaction, first: bool) -> Tensor:
        """One gradient pass: the first at w (updates BatchNorm statistics), the second at w + e."""
        self.zero_grad(set_to_none=True)
        # Mode (b) of DDP: no all-reduce in the first pass (forward and backward), so each replica
        # perturbs by its own mini-batch gradient (the SAM paper's m-sharpness).
        no_sync = self.model.no_sync() if first and self.per_replica_perturbation else contextlib.nullcontext()
        with no_sync, batchnorm_statistics_frozen(None if first else self.model):
            loss = txn.closure()
        self._check_gradients(txn.lists, "first" if first else "second")
        return loss

    @torch.no_grad()
    def _check_gradients(self, lists: ParamLists, kind: str) -> None:
        """Let the attached check (AMP) unscale this pass's gradients; skip the step on inf/nan (one host sync
        per pass, only while a check is attached, as GradScaler.step's)."""
        if self._gradient_check is None:
            return
        grads = [p.grad for p in lists.params if p.grad is not None]
        if grads and bool(self._gradient_check(grads, kind) > 0):
            raise NonFiniteGradients(kind)

    def _gradients_of_first_pass(self, txn: StepTransaction) -> tuple[ParamLists, list[Tensor]]:
        active, grads, keep = txn.lists.gradients()
        if not grads:
            raise RuntimeError("no parameter has a gradient after the first pass; the closure (or your own "
                               "loss.backward() before first_step()) must run backward")
        # Sparse gradients come from the model's layers (nn.Embedding(sparse=True)): checking the
        # first step after the lists were built, and every step on the slow path, is enough.
        if keep is not None or not txn.lists.sparse_checked:
            for p, g in zip(active.params, grads):
                if g.is_sparse:
                    raise ValueError(f"a parameter of shape {tuple(p.shape)} has a sparse gradient; SAM-type "
                                     "optimizers need dense gradients (e.g. nn.Embedding(sparse=False))")
            txn.lists.sparse_checked = keep is None
        return active, grads

    @torch.no_grad()
    def _perturb(self, txn: StepTransaction) -> None:
        active, grads = self._gradients_of_first_pass(txn)
        sums = self._first_pass_sums(txn, active, grads)
        txn.perturbed_lists = active
        for g in active.groups:
            self._perturb_group(txn, active, g, g.of(grads), sums)
            txn.perturbed.append(g)  # after the op: now its weights are in `saved`

    def _first_pass_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> FirstPassSums:
        """SAM's (and ASAM's) norm of the first pass, in one fused reduction; records it."""
        if self.adaptive:
            name, sq = "weighted_grad_norm", ops.weighted_sumsq(active.params, grads, backend=self.backend,
                                                                layout=active.layout)
        else:
            name, sq = "grad_norm", ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0]
        txn.diagnostics[name] = sq.sqrt()
        return FirstPassSums(inverse_norm(sq, self.eps))

    @torch.no_grad()
    def _descend(self, txn: StepTransaction) -> None:
        """Turn the second pass's gradient into the descent direction, restore w exactly, clip, base step."""
        active, grads, rest = txn.lists.for_descent(txn.perturbed_lists)
        self._descent(txn, active, grads)
        if rest:  # moved, but no second-pass gradient: only restored
            ops.copy_(*rest)
        txn.perturbed = []  # the weights are w again
        if self.max_grad_norm is not None:
            self._clip(txn, active, grads)
        txn.base_step_started = True
        self.base_optimizer.step()

    def _clip(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> None:
        """Clip what the base optimizer sees to ``max_grad_norm`` (as clip_grad_norm_; the HVPs never see it)."""
        norm = ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0].sqrt()
        coef = (self.max_grad_norm / (norm + 1e-6)).clamp(max=1.0)
        ops.scale_copy_(grads, grads, coef, backend=self.backend, layout=active.layout)
        txn.diagnostics["clip_coef"] = coef

    # ----- hooks for subclasses --------------------------------------------------------------
    adaptive = False

    def _refresh(self, txn: StepTransaction, after_first_pass: bool) -> None:
        """X-SAM, Eigen-SAM: compute the eigenvector when due (before or after the first pass)."""

    def _perturb_group(self, txn: StepTransaction, active: ParamLists, group: GroupLists, grads: list[Tensor],
                       sums: FirstPassSums) -> None:
        scale = group.group["rho"] * sums.inv_norm
        ops.perturb_(group.of(active.params), grads, group.of(active.saved), scale, adaptive=self.adaptive,
                     backend=self.backend, layout=group.layout)

    def _descent(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> None:
        """SAM: the base optimizer steps with the perturbed gradient as it is; restore w."""
        for g in active.groups:
            ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), None, 1.0, 0.0,
                                 backend=self.backend, layout=g.layout)

    # ----- public API --------------------------------------------------------------------------
    def step(self, closure: Closure | None = None) -> Tensor | None:
        """One full step; returns the loss of the first (unperturbed) pass.

        If anything raises (the closure included), the weights are restored bit-exactly and the
        optimizer state is left as it was.
        """
        return self._step(closure, None)

    def _step(self, closure: Closure | None, loss_fn: Closure | None) -> Tensor | None:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step() needs a closure: step(closure) where closure() runs "
                             "forward and backward and returns the loss (the gradient is evaluated at least "
                             "twice per step)")
        txn = self._begin(torch.enable_grad()(closure), loss_fn)
        if self._execute(txn, self._run):
            self._finish(txn)
        return txn.loss

    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb by the gradients already in ``.grad`` (your own first pass): ``w += e``, w saved exactly."""
        txn = self._begin(None, None)
        self._execute(txn, self._perturb)
        self._open = txn
        if zero_grad:
            self.zero_grad()

    def second_step(self, zero_grad: bool = False) -> None:
        """With your second pass's gradients in ``.grad``: descent direction, exact restore, base step."""
        txn = self._open
        if txn is None:
            raise RuntimeError("second_step() needs first_step() first (the weights are not perturbed)")
        self._open = None
        if self._execute(txn, self._descend):
            self._finish(txn)
        if zero_grad:
            self.zero_grad()

    def register_diagnostics_hook(self, hook: Callable[["SharpnessAware", dict], None]
                                  ) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer, record)`` after every completed step.

        ``record`` maps names to the step's scalars as device tensors (no host sync is forced;
        read them when convenient): ``step`` (int, the index of the step just taken),
        ``refreshed`` (bool, the step ran an eigenvector refresh), ``grad_norm`` (||g|| of the first
        pass; not for SAM with ``adaptive=True``), ``weighted_grad_norm`` (||w * g||, the norm ASAM's
        perturbation divides by; ``adaptive=True`` only), ``clip_coef`` (with ``max_grad_norm``), and
        for X-SAM ``adv_grad_norm``, ``cos_g_v``, ``cos_gadv_v``, ``correction`` (the ``beta`` of
        algorithm.md: the gradient loses ``alpha * beta * v``), ``eigenvalue`` and
        ``eigen_residual`` of the current v, and ``refresh_rejected`` (bool tensor: the refresh of
        this step gave a zero or non-finite vector and the previous v was kept). Steps skipped by
        the AMP scaler are not reported. Hooks run after the step is committed: an exception in
        a hook propagates, but the step stays taken and counted.
        """
        handle = torch.utils.hooks.RemovableHandle(self._diagnostics_hooks)
        self._diagnostics_hooks[handle.id] = hook
        return handle

    @contextlib.contextmanager
    def gradient_check(self, check: GradientCheck):
        """Attach ``check`` to every pass of the steps taken inside the block (``xsam.amp.SAMGradScaler``).

        ``check(tensors, kind)`` sees each pass's gradients (``kind`` "first", "second") and every
        HVP product ("hvp"); it may rescale them in place (AMP's unscaling) and returns a 0-d
        device tensor > 0 when one is not finite: a non-finite pass skips the step (counted in
        ``skipped_steps``), a non-finite product rejects the refresh.
        """
        if self._gradient_check is not None:
            raise RuntimeError("this optimizer already has a gradient check attached (nested scaler.step?)")
        self._gradient_check = check
        try:
            yield
        finally:
            self._gradient_check = None

    def scratch_tensors(self) -> list[Tensor]:
        """Buffers kept between steps that are not state (the saved weights): memory, not checkpoints."""
        return [] if self._lists is None else list(self._lists.saved)

    def diagnostics(self) -> dict[str, float | int]:
        """The last step's scalars as Python numbers (reading them waits for the device)."""
        return {k: v.item() if isinstance(v, Tensor) else v for k, v in self._global.items()
                if k not in ("generator", "kind")}
