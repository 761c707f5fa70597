"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector."""
from __future__ import annotations

import operator

import torch
from torch import Tensor, nn

from .. import ops
from ..hessian import RandomState, _is_dtensor
from .base import StepTransaction, SharpnessAware, register_arguments
from .eigenvector import HVP_MODES, EigenvectorTracker
from .functional import CORRECTIONS, inverse_norm, xsam_correction
from .lists import ParamLists
from .validation import check_bool, check_choice, check_count, check_number, check_seed

__all__ = ["EigenvectorMixin", "XSAM"]


class EigenvectorMixin:
    """What X-SAM and Eigen-SAM share around the eigenvector: schedule, refresh, state, checkpoints."""

    tracker: EigenvectorTracker
    STREAMING = False  # whether the class feeds hvp="streaming" from its passes (X-SAM does)

    def _setup_tracker(self, *, eig_interval, power_iters, eig_tol, hvp, hvp_eval_mode, seed) -> None:
        eig_interval = check_count("eig_interval", eig_interval,
                                   "It is the number of steps between eigenvector refreshes.")
        power_iters = check_count("power_iters", power_iters, "It is the number of power iterations per refresh.")
        if eig_tol is not None:
            eig_tol = check_number("eig_tol", eig_tol, 0.0, low_open=True,
                                   hint="Pass a positive tolerance, or None for fixed iterations.")
        check_choice("hvp", hvp, HVP_MODES)
        if hvp == "streaming" and not self.STREAMING:
            raise ValueError(f"hvp='streaming' is not available for {type(self).__name__}; use 'exact', "
                             "'finite_difference', 'forward_difference' or 'auto'")
        check_bool("hvp_eval_mode", hvp_eval_mode, "run the HVPs with the model in eval mode")
        seed = check_seed(seed)
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
        if not after_first_pass and self.tracker.hvp == "forward_difference":
            # Its products reuse the first pass's gradient, so they replay its random numbers (dropout).
            txn.first_pass_randomness = RandomState.capture()
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
        txn.refresh = self.tracker.compute(txn.lists, txn.closure, txn.loss_fn, first_gradients=first,
                                           first_pass_randomness=txn.first_pass_randomness)
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
        """``{scale_sq: ||g||^2, inv_norm: 1 / (||g|| + eps), gv: <g, v>, vecs: v}`` from one fused
        reduction (None before the first v); records ``grad_norm`` and ``cos_g_v``."""
        vecs = self._vectors(txn, active)
        if vecs is None:
            return None
        gg, gv = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout).unbind()
        norm = gg.sqrt()
        inv = (norm + self.eps).reciprocal()
        txn.diagnostics["grad_norm"] = norm
        txn.diagnostics["cos_g_v"] = gv * inv
        return {"scale_sq": gg, "inv_norm": inv, "gv": gv, "vecs": vecs}

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
        if self.tracker.streaming:
            self.tracker.mode(loss_fn, [])  # raises: streaming has no refresh of its own
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

    # ----- checkpoints -------------------------------------------------------------------------
    STATE_KEYS = ("eigenvector",)
    COUNTERS = ("refreshes", "rejected_refreshes", "refresh_attempts")  # saved as host integers
    REFRESH_RECORD = ("eigenvalue", "eigen_residual", "refresh_rejected", "power_iterations")  # the last refresh's

    def _checkpoint_global(self) -> dict:
        g = self._global
        out = super()._checkpoint_global()
        out.update({key: int(g.get(key, 0)) for key in self.COUNTERS})
        out["retry_refresh"] = bool(g.get("retry_refresh", False))
        out["generator"] = g["generator"]
        # Before the first refresh: placeholders of the types a refresh stores (dropped on load).
        params = [p for group in self.param_groups for p in group["params"]]
        device = params[0].device if params else torch.device("cpu")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        out["power_iterations"] = int(g.get("power_iterations", 0))
        out["eigenvalue"] = g.get("eigenvalue", torch.full((), float("nan"), dtype=dtype, device=device))
        out["eigen_residual"] = g.get("eigen_residual", torch.full((), float("nan"), dtype=dtype, device=device))
        out["refresh_rejected"] = g.get("refresh_rejected", torch.zeros((), dtype=torch.bool, device=device))
        return out

    def _checkpoint_per_param(self, params: list[Tensor], trainable: list[int]) -> dict[int, dict]:
        out = {}
        for i in trainable:  # zeros where there is none yet: what vectors() uses for a missing entry
            v = self.state[params[i]].get("eigenvector") if params[i] in self.state else None
            out[i] = {"eigenvector": torch.zeros_like(params[i]) if v is None else v}
        return out

    def _restore_global(self, saved: dict, own: dict) -> tuple[dict, dict]:
        live, own = super()._restore_global(saved, own)
        for key in (*self.COUNTERS, "retry_refresh"):
            if key in saved:
                live[key] = saved[key]
        live["generator"] = saved["generator"].cpu()  # torch.Generator's state lives on the CPU
        if int(live["refresh_attempts"]) > 0 or int(live["refreshes"]) > 0:
            live.update({key: saved[key] for key in self.REFRESH_RECORD if key in saved})
        else:  # no refresh yet: the eigenvector and the record were placeholders
            own = {k: {} for k in own}
        return live, own

    def _check_checkpoint(self, global_state: dict, per_param: dict, params: list[Tensor], positions: dict) -> None:
        for key in ("refreshes", "generator"):
            if key not in global_state:
                raise ValueError(f"state_dict's 'xsam' entry has no '{key}'; it is not a complete "
                                 f"{type(self).__name__} checkpoint")
        generator = global_state["generator"]
        if not (isinstance(generator, Tensor) and generator.dtype == torch.uint8):
            raise ValueError("state_dict's 'xsam' entry has a 'generator' that is not a uint8 tensor (the state of "
                             "torch.Generator()); the checkpoint is corrupt")
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
            if _is_dtensor(v) != _is_dtensor(params[i]):
                kinds = ("a sharded DTensor", "a plain tensor")
                raise ValueError(f"state_dict's eigenvector for parameter {i} is {kinds[not _is_dtensor(v)]} but the "
                                 f"parameter is {kinds[not _is_dtensor(params[i])]}; load checkpoints across "
                                 "sharding layouts with torch.distributed.checkpoint.state_dict."
                                 "set_optimizer_state_dict (StateDictOptions(full_state_dict=True) for a full one)")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"state_dict's eigenvector for parameter {i} is not finite; the checkpoint is "
                                 "corrupt (load an earlier one, or drop the 'eigenvector' entries to start over)")

    def _after_load(self) -> None:
        super()._after_load()
        self.tracker.forget_pending_retry()

    def scratch_tensors(self) -> list[Tensor]:
        return super().scratch_tensors() + self.tracker.scratch_tensors()


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
            pass), "auto" (exact with a ``loss_fn``, else finite differences), or "streaming"
            (no evaluation: every step updates v from the product its two passes contain, by
            Oja's rule; ``eig_interval``, ``power_iters`` and ``eig_tol`` are not used, and the
            eigenvalue is not estimated: NaN in the diagnostics).
        hvp_eval_mode (bool, default True): run the HVPs with ``model`` in eval mode. With
            "forward_difference" this costs one more evaluation per refresh (grad L(w) in eval
            mode); False reuses the first pass's gradient (train-mode Hessian, BatchNorm
            statistics still frozen; needs a model without dropout or other randomness).
        seed (int, default 0): seed of the first start vector, in [0, 2**64).
    """

    KIND = "XSAM"
    STREAMING = True
    OWN_ARGUMENTS = ("rho", "alpha", "correction", "normalize", "adaptive", "eig_interval", "power_iters",
                     "eig_tol", "hvp", "model", "hvp_eval_mode", "seed", "per_replica_perturbation",
                     "process_group", "backend", "eps", "max_grad_norm")

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2,
                 correction: str = "signed", normalize: bool = True, adaptive: bool = False,
                 eig_interval: int = 5, power_iters: int = 5, eig_tol: float | None = None, hvp: str = "auto",
                 model: nn.Module | None = None, hvp_eval_mode: bool = True, seed: int = 0,
                 per_replica_perturbation: bool = False, process_group="auto", backend: str = "auto",
                 eps: float | None = None, max_grad_norm: float | None = None, **base_kwargs):
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

    def _check_hyperparameters(self, values: dict, where: str) -> None:
        super()._check_hyperparameters(values, where)
        values["alpha"] = check_number("alpha", values["alpha"], 0.0, 2.0, where=where,
                                       hint="alpha=0 is SAM, 1 removes the component along v.")

    def _first_pass_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> dict:
        if self.tracker.streaming:
            self.tracker.capture_first_pass(txn, active, grads)
        sums = self._gradient_and_v_sums(txn, active, grads)
        if sums is None:
            return super()._first_pass_sums(txn, active, grads)
        if self.adaptive:
            wg = ops.weighted_sumsq(active.params, grads, backend=self.backend, layout=active.layout)
            txn.diagnostics["weighted_grad_norm"] = wg.sqrt()
            return {"scale_sq": wg, "inv_norm": inverse_norm(wg, self.eps)}
        return sums

    def _descent(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> None:
        vecs = self._vectors(txn, active)
        streamed = self.tracker.stream(txn, active, grads, vecs) if self.tracker.streaming else None
        if streamed is not None:  # this step's v, updated from g - g_adv, corrects this step
            vecs, gg, gv = streamed.vectors, streamed.gg, streamed.gv
        elif vecs is None:  # before the first v: the normalised (or raw) g_adv
            gg = ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0]
            a = inverse_norm(gg, self.eps) if self.normalize else 1.0
            txn.diagnostics["adv_grad_norm"] = gg.sqrt()
            for g in active.groups:
                ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), None, a, 0.0,
                                     backend=self.backend, layout=g.layout)
            return
        else:
            gg, gv = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout).unbind()
        corr = xsam_correction(gg, gv, normalize=self.normalize, rule=self.correction, eps=self.eps)
        txn.diagnostics.update(adv_grad_norm=corr.adv_grad_norm, cos_gadv_v=corr.cos_gadv_v, correction=corr.beta)
        for g in active.groups:
            ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), g.of(vecs), corr.a,
                                 g.group["alpha"] * corr.beta, backend=self.backend, layout=g.layout)
