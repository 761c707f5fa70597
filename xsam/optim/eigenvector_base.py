"""What X-SAM and Eigen-SAM share around the eigenvector: schedule, refresh, state, checkpoints."""
from __future__ import annotations

import operator
import warnings

import torch
from torch import Tensor

from .. import ops
from ..distributed import is_dtensor
from ..hessian import RandomState
from .base import FirstPassSums, SharpnessAware, StepTransaction
from .eigenvector import HVP_MODES, EigenvectorTracker, TrackerInputs
from .lists import ParamLists
from .validation import check_bool, check_choice, check_count, check_number, check_seed, own_arguments

__all__ = ["EigenvectorBase", "passed_on"]

def passed_on(arguments: dict) -> dict:
    """What XSAM's and EigenSAM's constructors hand on unchanged: the entries of their ``locals()`` named
    by the keyword-only arguments of ``EigenvectorBase`` and ``SharpnessAware``."""
    return {name: arguments[name] for name in own_arguments(EigenvectorBase) + own_arguments(SharpnessAware)}


class EigenvectorBase(SharpnessAware):
    """A SAM-type optimizer with the top Hessian eigenvector v in its state (``EigenvectorTracker``); beyond
    the hooks of ``SharpnessAware``, a subclass reads v with ``_vectors`` and ``_gradient_and_v_sums``."""

    STREAMING = False  # whether the class feeds hvp="streaming" from its passes (X-SAM does)
    STATE_KEYS = ("eigenvector",)
    COUNTERS = ("refreshes", "rejected_refreshes", "refresh_attempts")  # saved as host integers
    REFRESH_RECORD = ("eigenvalue", "eigen_residual", "refresh_rejected", "refresh_agreed",
                      "power_iterations")  # the last refresh's

    def __init__(self, params, base_optimizer, defaults: dict, *, eig_interval, eig_interval_max, power_iters,
                 eig_tol, hvp, hvp_eval_mode, seed, **common):
        eig_interval = check_count("eig_interval", eig_interval,
                                   "It is the number of steps between eigenvector refreshes.")
        if eig_interval_max is not None:
            eig_interval_max = check_count("eig_interval_max", eig_interval_max, "It is the longest interval of "
                                           "the adaptive refresh schedule (None: every eig_interval steps).")
            if eig_interval_max < eig_interval:
                raise ValueError(f"eig_interval_max={eig_interval_max} is below eig_interval={eig_interval}: pass "
                                 "at least eig_interval, or None for a fixed schedule")
            if hvp == "streaming":
                raise ValueError("eig_interval_max has no effect with hvp='streaming' (v is updated in every "
                                 "step): leave it None")
        power_iters = check_count("power_iters", power_iters, "It is the number of power iterations per refresh.")
        if eig_tol is not None:
            eig_tol = check_number("eig_tol", eig_tol, 0.0, low_open=True,
                                   hint="Pass a positive tolerance, or None for fixed iterations.")
        if hvp == "streaming" and not self.STREAMING:
            raise ValueError(f"hvp='streaming' is not available for {type(self).__name__}; use 'exact', "
                             "'finite_difference', 'forward_difference' or 'auto'")
        check_choice("hvp", hvp, HVP_MODES if self.STREAMING else tuple(m for m in HVP_MODES if m != "streaming"))
        check_bool("hvp_eval_mode", hvp_eval_mode, "run the HVPs with the model in eval mode")
        seed = check_seed(seed)
        self.tracker = EigenvectorTracker(eig_interval=eig_interval, eig_interval_max=eig_interval_max,
                                          power_iters=power_iters, eig_tol=eig_tol, hvp=hvp,
                                          hvp_eval_mode=hvp_eval_mode, seed=seed)
        super().__init__(params, base_optimizer, defaults, **common)

    @property
    def _tracker_inputs(self) -> TrackerInputs:
        return TrackerInputs(state=self.state, global_state=self._global, model=self.model, backend=self.backend,
                             eps=self.eps, process_group=self.process_group,
                             per_replica_perturbation=self.per_replica_perturbation,
                             gradient_check=self._gradient_check)

    @property
    def refresh_due(self) -> bool:
        """Whether the next ``step`` refreshes the eigenvector (every ``eig_interval`` steps, or as the
        adaptive schedule says, and right after a rejected refresh)."""
        return self.tracker.due(self._global)

    def _initial_global_state(self) -> dict:
        return dict(super()._initial_global_state(), **self.tracker.initial_state())

    def _check_hyperparameters(self, values: dict, where: str) -> None:
        super()._check_hyperparameters(values, where)
        if self.tracker.hvp == "exact" and any(is_dtensor(p) for p in values.get("params", ())):
            raise ValueError("hvp='exact' does not work with sharded DTensor parameters (FSDP2 fully_shard): the "
                             "forward computes with unsharded copies, so autograd cannot differentiate the loss "
                             "with respect to the sharded parameters twice. Use hvp='finite_difference' (or "
                             "hvp='auto', which picks it for DTensor parameters)")

    def eigenvector(self) -> list[Tensor] | None:
        """A copy of the current v, one tensor per trainable parameter in param-group order (the order
        of ``[p for g in param_groups for p in g["params"] if p.requires_grad]``); None before the
        first refresh. A copy: the next refresh overwrites the state in place."""
        params = self._step_lists().params
        vecs = self.tracker.vectors(self._tracker_inputs, params)
        return None if vecs is None else [v.detach().clone() for p, v in zip(params, vecs) if p.requires_grad]

    def _refresh(self, txn: StepTransaction, after_first_pass: bool) -> None:
        if not after_first_pass and self.tracker.hvp == "forward_difference":
            # Its products reuse the first pass's gradient, so they replay its random numbers (dropout).
            txn.first_pass_randomness = RandomState.capture()
        if txn.closure is None or not self.tracker.due(self._global):
            return
        mode = self.tracker.mode(txn.loss_fn, txn.lists.params)
        if (mode == "forward_difference") != after_first_pass:
            return
        first = None
        if after_first_pass:
            # Owned copies of the first pass's gradients: the HVP backward passes overwrite .grad (and
            # with DDP's gradient_as_bucket_view, the buckets they are views of); they go back afterwards.
            first = {id(p): p.grad.detach().clone() for p in txn.lists.params if p.grad is not None}
        txn.refresh = self.tracker.compute(self._tracker_inputs, txn.lists, txn.closure, txn.loss_fn,
                                           first_gradients=first, first_pass_randomness=txn.first_pass_randomness)
        if first is not None:
            for p in txn.lists.params:
                p.grad = first.get(id(p))

    def _vectors(self, txn: StepTransaction, lists: ParamLists) -> list[Tensor] | None:
        """v aligned with ``lists``: the one computed in this step, else the stored one."""
        pending = txn.refresh
        if pending is None:
            params, vecs = txn.lists.params, self.tracker.vectors(self._tracker_inputs, txn.lists.params)
        else:
            params, vecs = pending.params, pending.vectors
        if vecs is None or params is lists.params or (
                len(params) == len(lists.params) and all(map(operator.is_, params, lists.params))):
            return vecs
        by_id = dict(zip(map(id, params), vecs))  # the slow path: some parameters have no gradient
        return [by_id[id(p)] if id(p) in by_id else torch.zeros_like(p) for p in lists.params]

    def _gradient_and_v_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]
                             ) -> FirstPassSums | None:
        """``1 / (||g|| + eps)``, ``<g, v>`` and v from one fused reduction (None before the first v);
        records ``grad_norm`` and ``cos_g_v``."""
        vecs = self._vectors(txn, active)
        if vecs is None:
            return None
        gg, gv = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout).unbind()
        norm = gg.sqrt()
        inv = (norm + self.eps).reciprocal()
        txn.diagnostics["grad_norm"] = norm
        txn.diagnostics["cos_g_v"] = gv * inv
        return FirstPassSums(inv_norm=inv, gv=gv, vecs=vecs)

    def step(self, closure=None, loss_fn=None) -> Tensor | None:
        """One step, with a refresh of v first when due; otherwise as ``SharpnessAware.step`` (the loss of the
        first pass, all or nothing). ``loss_fn`` (forward only, returns the loss) is needed by exact HVPs."""
        return self._step(closure, loss_fn)

    def _commit(self, txn: StepTransaction) -> None:
        if txn.refresh is not None:
            self.tracker.commit(self._tracker_inputs, txn.refresh)
        super()._commit(txn)

    def _record(self, txn: StepTransaction) -> dict:
        record = super()._record(txn)
        record.update({key: self._global[key] for key in ("eigenvalue", "eigen_residual", "refresh_rejected")
                       if key in self._global})
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
            t.refresh = self.tracker.compute(self._tracker_inputs, t.lists, t.closure, t.loss_fn)

        if self._execute(txn, refresh):
            self.tracker.commit(self._tracker_inputs, txn.refresh)
        return self._global.get("eigenvalue", torch.full((), float("nan")))

    # ----- checkpoints -------------------------------------------------------------------------
    def _checkpoint_global(self) -> dict:
        g = self._global
        out = super()._checkpoint_global()
        out.update({key: int(g.get(key, 0)) for key in self.COUNTERS})
        out["generator"] = g["generator"]
        # Before the first refresh: placeholders of the types a refresh stores (dropped on load).
        params = [p for group in self.param_groups for p in group["params"]]
        device = params[0].device if params else torch.device("cpu")
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in params) else torch.float32
        out["power_iterations"] = int(g.get("power_iterations", 0))
        for key in ("eigenvalue", "eigen_residual"):
            out[key] = g.get(key, torch.full((), float("nan"), dtype=dtype, device=device))
        out["refresh_rejected"] = g.get("refresh_rejected", torch.zeros((), dtype=torch.bool, device=device))
        if self.tracker.adaptive:
            out.update({key: int(g[key]) for key in self.tracker.SCHEDULE})
            out["refresh_agreed"] = g.get("refresh_agreed", torch.zeros((), dtype=torch.bool, device=device))
        return out

    def _checkpoint_per_param(self, params: list[Tensor], trainable: list[int]) -> dict[int, dict]:
        out = {}
        for i in trainable:  # zeros where there is none yet: what vectors() uses for a missing entry
            v = self.state[params[i]].get("eigenvector") if params[i] in self.state else None
            out[i] = {"eigenvector": torch.zeros_like(params[i]) if v is None else v}
        return out

    def _restore_global(self, saved: dict, own: dict) -> tuple[dict, dict]:
        live, own = super()._restore_global(saved, own)
        live.update({key: saved[key] for key in (*self.COUNTERS, *self.tracker.SCHEDULE) if key in saved})
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
            i = positions.get(pid)
            if v is None or i is None:
                continue
            if tuple(v.shape) != tuple(params[i].shape):
                raise ValueError(f"state_dict's eigenvector for parameter {i} has shape {tuple(v.shape)} but the "
                                 f"parameter has shape {tuple(params[i].shape)}; build the model as it was saved")
            if is_dtensor(v) != is_dtensor(params[i]):
                kinds = ("a sharded DTensor", "a plain tensor")
                raise ValueError(f"state_dict's eigenvector for parameter {i} is {kinds[not is_dtensor(v)]} but the "
                                 f"parameter is {kinds[not is_dtensor(params[i])]}; load checkpoints across "
                                 "sharding layouts with torch.distributed.checkpoint.state_dict."
                                 "set_optimizer_state_dict (StateDictOptions(full_state_dict=True) for a full one)")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"state_dict's eigenvector for parameter {i} is not finite; the checkpoint is "
                                 "corrupt (load an earlier one, or drop the 'eigenvector' entries to start over)")

    def _after_load(self) -> None:
        super()._after_load()
        vectors = [entry["eigenvector"] for entry in self.state.values() if "eigenvector" in entry]
        # One fused reduction: under FSDP2 every rank sees the same sum, so every rank decides alike.
        restart = self.tracker.exists(self._global) and not bool(
            ops.dots([vectors], [(0, 0)], backend=self.backend)[0] > 0)
        if restart:  # a zero v would stay zero: each refresh warm-starts from it and is rejected
            warnings.warn(f"{type(self).__name__}: the checkpoint has no eigenvector (its entries are missing or all "
                          "zero), so v starts over: the next step refreshes it from a fresh start vector",
                          stacklevel=3)
            for entry in self.state.values():
                entry.pop("eigenvector", None)
            for key in self.REFRESH_RECORD:
                self._global.pop(key, None)
            self._global.update({key: 0 for key in self.COUNTERS})
            self._global.update(self.tracker.initial_schedule())
        self.tracker.after_load(self._global, retry=restart)
