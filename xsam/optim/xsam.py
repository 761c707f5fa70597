"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector."""
from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from .. import ops
from ..hessian import _is_dtensor
from .base import StepTransaction, SharpnessAware, register_arguments
from .eigenvector import HVP_MODES, EigenvectorTracker
from .functional import CORRECTIONS, cosine, xsam_correction
from .lists import ParamLists
from .validation import check_bool, check_choice, check_count, check_number, check_seed

__all__ = ["EigenvectorMixin", "XSAM"]


class EigenvectorMixin:
    """What X-SAM and Eigen-SAM share around the eigenvector: schedule, refresh, state, checkpoints."""

    tracker: EigenvectorTracker

    def _setup_tracker(self, *, eig_interval, power_iters, eig_tol, hvp, hvp_eval_mode, seed) -> None:
        check_count("eig_interval", eig_interval, "It is the number of steps between eigenvector refreshes.")
        check_count("power_iters", power_iters, "It is the number of power iterations per refresh.")
        if eig_tol is not None:
            check_number("eig_tol", eig_tol, 0.0, low_open=True,
                         hint="Pass a positive tolerance, or None for fixed iterations.")
        check_choice("hvp", hvp, HVP_MODES)
        check_bool("hvp_eval_mode", hvp_eval_mode, "run the HVPs with the model in eval mode")
        check_seed(seed)
        self.tracker = EigenvectorTracker(self, eig_interval=eig_interval, power_iters=power_iters, eig_tol=eig_tol,
                                          hvp=hvp, hvp_eval_mode=hvp_eval_mode, seed=seed)

    @property
    def refresh_due(self) -> bool:
        """Whether the next ``step`` refreshes the eigenvector (every ``eig_interval`` steps, and right
        after a rejected refresh)."""
        return self.tracker.due()

    def _initial_global_state(self) -> dict:
        return dict(super()._initial_global_state(), **self.tracker.initial_state())

    def _before_step(self) -> None:
        self.tracker.poll_retry()

    def _validate_group(self, index: int, group: dict) -> None:
        super()._validate_group(index, group)
        if self.tracker.hvp == "exact" and any(_is_dtensor(p) for p in group["params"]):
            raise ValueError("hvp='exact' does not work with sharded DTensor parameters (FSDP2 fully_shard): the "
                             "forward computes with unsharded copies, so autograd cannot differentiate the loss "
                             "with respect to the sharded parameters twice. Use hvp='finite_difference' (or "
                             "hvp='auto', which picks it for DTensor parameters)")

    def eigenvector(self) -> list[Tensor] | None:
        """The current v as a list aligned with the trainable parameters (None before the first refresh)."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        vecs = self.tracker.vectors(self._step_lists().params)
        if vecs is None:
            return None
        by_id = dict(zip(map(id, self._step_lists().params), vecs))
        return [by_id[id(p)] for p in params]

    def _refresh(self, txn: StepTransaction, after_first_pass: bool) -> None:
        if txn.closure is None or not self.tracker.due():
            return
        mode = self.tracker.mode(txn.loss_fn, txn.lists.params)
        if (mode == "forward_difference") != after_first_pass:
            return
        first = None
        if after_first_pass:
            # Owned copies of the first pass's gradients: the HVP backward passes overwrite .grad (and
            # with DDP's gradient_as_bucket_view, the buckets they are views of); they go back afterwards.
            first = {id(p): p.grad.detach().clone() for p in txn.lists.params if p.grad is not None}
        txn.refresh = self.tracker.compute(txn.lists, txn.closure, txn.loss_fn, first_gradients=first)
        if first is not None:
            for p in txn.lists.params:
                p.grad = first.get(id(p))

    def _vectors(self, txn: StepTransaction, lists: ParamLists) -> list[Tensor] | None:
        """v aligned with ``lists``: the one computed in this step, else the stored one."""
        pending = txn.refresh
        if pending is None:
            return self.tracker.vectors_for(lists, txn.lists)
        if len(pending.params) == len(lists.params) and all(map(operator.is_, pending.params, lists.params)):
            return pending.vectors
        by_id = dict(zip(map(id, pending.params), pending.vectors))
        return [by_id[id(p)] if id(p) in by_id else torch.zeros_like(p) for p in lists.params]

    def _gradient_and_v_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> dict | None:
        """``{scale_sq: ||g||^2, gv: <g, v>, vecs: v}`` in one fused reduction (None before the first v);
        records ``grad_norm`` and ``cos_g_v``."""
        vecs = self._vectors(txn, active)
        if vecs is None:
            return None
        sums = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout)
        txn.diagnostics["grad_norm"] = sums[0].sqrt()
        txn.diagnostics["cos_g_v"] = cosine(sums[1], sums[0], self.eps)
        return {"scale_sq": sums[0], "gv": sums[1], "vecs": vecs}

    def step(self, closure=None, loss_fn=None) -> Tensor | None:
        """One step: refresh v when due, first pass, perturb, second pass, descent direction and restore,
        base step.

        Returns the loss of the first pass. ``loss_fn`` (forward only, returns the loss) is needed
        by exact HVPs. If anything raises (the closure included), the weights and the optimizer
        state are left as they were.
        """
        txn = self._begin(self._require_closure(closure), loss_fn)
        if self._execute(txn, self._run):
            self._finish(txn)
        return txn.loss

    def _commit_extra(self, txn: StepTransaction) -> None:
        if txn.refresh is not None:
            self.tracker.commit(txn.refresh)

    def _record(self, txn: StepTransaction) -> dict:
        record = super()._record(txn)
        for key in ("eigenvalue", "eigen_residual", "refresh_rejected"):
            if key in self._global:
                record[key] = self._global[key]
        if txn.refresh is None and "refresh_rejected" in record:
            record["refresh_rejected"] = torch.zeros_like(record["refresh_rejected"])
        return record

    def refresh_eigenvector(self, closure=None, loss_fn=None) -> Tensor:
        """Recompute v now at the current (unperturbed) weights; returns the eigenvalue (device tensor).

        For the manual ``first_step``/``second_step`` path: call it before the first pass when
        ``refresh_due`` (or whenever you like). Counted as a refresh, not as a step.
        """
        if self._open is not None:
            raise RuntimeError("refresh_eigenvector() must run at the unperturbed weights: call it before "
                               "first_step() (or after second_step())")
        closure = None if closure is None else torch.enable_grad()(closure)
        if closure is None and self.tracker.mode(loss_fn, []) != "exact":
            raise ValueError(f"hvp={self.tracker.hvp!r} needs the closure: refresh_eigenvector(closure) where "
                             "closure() runs forward and backward")
        txn = self._begin(closure, loss_fn)

        def refresh(t: StepTransaction) -> None:
            t.refresh = self.tracker.compute(t.lists, t.closure, t.loss_fn)

        if self._execute(txn, refresh):
            self.tracker.commit(txn.refresh)
        return self._global.get("eigenvalue", torch.full((), float("nan")))

    def _check_checkpoint(self, global_state: dict, per_param: dict, params: list[Tensor], positions: dict) -> None:
        for key in ("refreshes", "generator"):
            if key not in global_state:
                raise ValueError(f"state_dict's 'xsam' entry has no '{key}'; it is not a complete "
                                 f"{type(self).__name__} checkpoint")
        for pid, entry in per_param.items():
            v = entry.get("eigenvector") if isinstance(entry, dict) else None
            if v is None:
                continue
            i = positions.get(pid)
            if i is None:
                continue
            if tuple(v.shape) != tuple(params[i].shape):
                raise ValueError(f"state_dict's eigenvector for parameter {i} has shape {tuple(v.shape)} but the "
                                 f"parameter has shape {tuple(params[i].shape)}; build the model as it was saved")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"state_dict's eigenvector for parameter {i} is not finite; the checkpoint is "
                                 "corrupt (load an earlier one, or drop the 'eigenvector' entries to start over)")

    def _after_load(self) -> None:
        super()._after_load()
        self.tracker.forget_pending_retry()


@register_arguments
class XSAM(EigenvectorMixin, SharpnessAware):
    r"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector (docs/algorithm.md).

    Every ``eig_interval`` steps (step 0 included) the top eigenvector v of the mini-batch
    Hessian at the unperturbed weights is refreshed by ``power_iters`` power iterations
    (warm-started from the previous v). Then, with ``gh = g_adv / (||g_adv|| + eps)``
    (``normalize=True``) and ``c = <gh, v>``, the base optimizer steps with
    ``gh - alpha * beta(c) * v``, ``beta = |c|`` ("signed"), ``c`` ("symmetric") or ``max(c, 0)``
    ("acute"). Steps are all-or-nothing, as for ``SAM``.

    Args:
        params, base_optimizer, rho, adaptive, model, per_replica_perturbation, process_group,
        backend, eps, max_grad_norm, **base_kwargs: as for ``SAM``; a param group may set its own
            ``rho`` and ``alpha``.
        alpha (float, default 0.2): correction strength in [0, 2]; 0 is SAM with a normalised
            gradient, 1 removes the component along v ("symmetric").
        correction (str, default "signed"): "signed" | "symmetric" | "acute".
        normalize (bool, default True): correct the normalised g_adv (the authors' rule).
        eig_interval (int, default 5): steps between eigenvector refreshes.
        power_iters (int, default 5): power iterations per refresh.
        eig_tol (float, default None): stop a refresh early once the eigenvalue and the residual
            settle to this relative tolerance (reads them on the host each iteration).
        hvp (str, default "auto"): "exact" (needs ``step(closure, loss_fn)``), "finite_difference"
            (2 evaluations per product), "forward_difference" (1 per product, reusing the first
            pass), or "auto" (exact with a ``loss_fn``, else finite differences).
        hvp_eval_mode (bool, default True): run the HVPs with ``model`` in eval mode.
        seed (int, default 0): seed of the first start vector, in [0, 2**64).
    """

    KIND = "XSAM"
    OWN_ARGUMENTS = ("rho", "alpha", "correction", "normalize", "adaptive", "eig_interval", "power_iters",
                     "eig_tol", "hvp", "model", "hvp_eval_mode", "seed", "per_replica_perturbation",
                     "process_group", "backend", "eps", "max_grad_norm")

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2,
                 correction: str = "signed", normalize: bool = True, adaptive: bool = False,
                 eig_interval: int = 5, power_iters: int = 5, eig_tol: float | None = None, hvp: str = "auto",
                 model: nn.Module | None = None, hvp_eval_mode: bool = True, seed: int = 0,
                 per_replica_perturbation: bool = False, process_group="auto", backend: str = "auto",
                 eps: float | None = None, max_grad_norm: float | None = None, **base_kwargs):
        check_number("rho", rho, 0.0, hint="It is the perturbation radius; the usual value is 0.05.")
        check_number("alpha", alpha, 0.0, 2.0, hint="alpha=0 is SAM, 1 removes the component along v.")
        check_choice("correction", correction, CORRECTIONS)
        check_bool("normalize", normalize)
        check_bool("adaptive", adaptive, "True: ASAM's perturbation")
        self.correction = correction
        self.normalize = normalize
        self.adaptive = adaptive
        self._setup_tracker(eig_interval=eig_interval, power_iters=power_iters, eig_tol=eig_tol, hvp=hvp,
                            hvp_eval_mode=hvp_eval_mode, seed=seed)
        super().__init__(params, base_optimizer, {"rho": rho, "alpha": alpha}, model=model,
                         per_replica_perturbation=per_replica_perturbation, process_group=process_group,
                         backend=backend, eps=eps, max_grad_norm=max_grad_norm, base_kwargs=base_kwargs)

    def _validate_group(self, index: int, group: dict) -> None:
        super()._validate_group(index, group)
        check_number("alpha", group["alpha"], 0.0, 2.0, where=f"param_groups[{index}]: ",
                     hint="alpha=0 is SAM, 1 removes the component along v.")

    def _first_pass_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> dict:
        sums = self._gradient_and_v_sums(txn, active, grads)
        if sums is None:
            return super()._first_pass_sums(txn, active, grads)
        if self.adaptive:
            wg = ops.weighted_sumsq(active.params, grads, backend=self.backend, layout=active.layout)
            txn.diagnostics["weighted_grad_norm"] = wg.sqrt()
            return {"scale_sq": wg}
        return sums

    def _descent(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> None:
        vecs = self._vectors(txn, active)
        if vecs is None:  # before the first v: the normalised (or raw) g_adv
            gg = ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0]
            a = 1.0 / (gg.sqrt() + self.eps) if self.normalize else 1.0
            txn.diagnostics["adv_grad_norm"] = gg.sqrt()
            for g in active.groups:
                ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), None, a, 0.0,
                                     backend=self.backend, layout=g.layout)
            return
        sums = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout)
        corr = xsam_correction(sums[0], sums[1], normalize=self.normalize, rule=self.correction, eps=self.eps)
        txn.diagnostics.update(adv_grad_norm=corr.adv_grad_norm, cos_gadv_v=corr.cos_gadv_v, correction=corr.beta)
        for g in active.groups:
            ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), g.of(vecs), corr.a,
                                 g.group["alpha"] * corr.beta, backend=self.backend, layout=g.layout)
