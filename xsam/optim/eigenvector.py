"""The top Hessian eigenvector v of X-SAM and Eigen-SAM: when to refresh it, how, and when to reject it.

A refresh runs ``power_iters`` power iterations on Hessian-vector products at the unperturbed weights,
warm-started from the previous v (a seeded normal draw the first time), with the HVP modes of
docs/algorithm.md; ``"streaming"`` has no product of its own (``xsam.optim.streaming``). A refresh whose
vector is zero or not finite is rejected on the device (``torch.where`` keeps the previous v or the
normalised start vector: no host sync), and retried at the next step once the host can read the flag
without waiting. So v is never zero or non-finite after a completed step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .. import ops
from ..distributed import all_reduce_mean_, is_dtensor
from ..hessian import (RandomState, finite_difference_hvp, forward_difference_hvp, orthonormalize_, power_iteration,
                       random_vectors)
from ..products import PRODUCT_MODES, product_function
from .base import GradientCheck
from .lists import ParamLists, scratch_like
from .model_state import batchnorm_statistics_frozen, eval_mode

__all__ = ["HVP_MODES", "STREAMING_RATE", "EigenvectorTracker", "PendingRefresh", "TrackerInputs", "replica_group"]

HVP_MODES = ("auto", "exact", "finite_difference", "forward_difference", "streaming", *PRODUCT_MODES)
# gamma of the streaming (Oja) update: each step adds gamma times v's projection on z^ (docs/tracking).
STREAMING_RATE = 2.0
# The adaptive schedule lengthens the interval while successive refreshes agree this well.
ADAPTIVE_AGREEMENT = 0.9


@dataclass
class TrackerInputs:
    """What the tracker reads of its optimizer, handed in with every call (it keeps no reference to it)."""

    state: dict  # the per-parameter state: the "eigenvector" entries
    global_state: dict  # counters, the start vector's generator, the last refresh's record
    model: nn.Module | None
    backend: str
    eps: float
    process_group: Any  # "auto", None or a torch.distributed group
    per_replica_perturbation: bool
    gradient_check: GradientCheck | None


@dataclass
class PendingRefresh:
    """An eigenvector computed in the current step, committed with the step."""

    params: list[Tensor]  # the trainable parameters it is aligned with
    vectors: list[Tensor]  # the new v, or the fallback where the refresh was rejected
    eigenvalue: Tensor
    residual: Tensor
    accepted: Tensor  # 0-d bool on the device
    iterations: int
    generator_state: Tensor
    agreed: Tensor | None = None  # adaptive schedule: accepted and |cos(v, previous v)| >= ADAPTIVE_AGREEMENT
    # Streaming: ``vectors`` are scratch and may be unusable where not accepted; the v stored at
    # commit is ``vectors`` where accepted, else these (the previous v or the normalised start).
    fallback: list[Tensor] | None = None


class _DeviceFlag:
    """A 0-d device bool the host reads only once the device has produced it (never stalls)."""

    def __init__(self, flag: Tensor):
        if flag.device.type == "cuda":
            self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
            self._host.copy_(flag, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = flag, None

    def poll(self) -> bool | None:
        """The value, or None while the device has not produced it yet."""
        if self._event is not None and not self._event.query():
            return None
        return bool(self._host)

    def wait(self) -> bool:
        """The value, waiting for the device if it has not produced it yet."""
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


@dataclass(eq=False)
class EigenvectorTracker:
    """Refresh schedule, HVP mode, power iteration and rejection rule, over the state it is handed."""

    eig_interval: int
    eig_interval_max: int | None
    power_iters: int
    eig_tol: float | None
    hvp: str
    hvp_eval_mode: bool
    seed: int

    def __post_init__(self):
        # The last committed refresh was rejected: retry at the next step. Read from the device
        # flag once it is produced (a fact about a committed step: no rollback undoes it).
        self._retry = False
        self._pending_retry: _DeviceFlag | None = None
        # Adaptive schedule: whether the last committed refresh agreed with the one before it.
        self._agreed: _DeviceFlag | None = None
        self._cache_key: tuple | None = None
        self._cache: list[Tensor] | None = None

    SCHEDULE = ("refresh_interval", "next_refresh")  # the adaptive schedule's host integers

    def initial_state(self) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        return {"refreshes": 0, "rejected_refreshes": 0, "refresh_attempts": 0, "generator": generator.get_state(),
                **self.initial_schedule()}

    def initial_schedule(self) -> dict:
        """The adaptive schedule before its first refresh (nothing for a fixed one)."""
        return dict.fromkeys(self.SCHEDULE, 0) if self.adaptive else {}

    # ----- schedule ------------------------------------------------------------------------
    @property
    def streaming(self) -> bool:
        return self.hvp == "streaming"

    @property
    def adaptive(self) -> bool:
        return self.eig_interval_max is not None

    def due(self, global_state: dict) -> bool:
        """True when ``step % eig_interval == 0`` (adaptive: from the step the last refresh scheduled on)
        or the last refresh was rejected (a retry); never with ``hvp="streaming"`` (no refresh of its own)."""
        if self.streaming:
            return False
        if self._pending_retry is not None and (value := self._pending_retry.poll()) is not None:
            self._retry = value
            self._pending_retry = None
        step = global_state["step"]
        if self.adaptive:
            return step >= global_state.get("next_refresh", 0) or self._retry
        return step % self.eig_interval == 0 or self._retry

    def _schedule(self, g: dict, agreed: Tensor) -> None:
        """The adaptive schedule after a refresh: double the interval (up to ``eig_interval_max``) when the
        refresh before this one agreed with its predecessor, else back to ``eig_interval``. A refresh late: that
        flag was copied to the host one refresh ago, so reading it waits for nothing in practice, and every
        device decides alike."""
        previous = self._agreed.wait() if self._agreed is not None else False
        interval = g.get("refresh_interval") or self.eig_interval
        interval = min(2 * interval, self.eig_interval_max) if previous else self.eig_interval
        g["refresh_interval"] = interval
        g["next_refresh"] = g["step"] + interval
        g["refresh_agreed"] = agreed
        self._agreed = _DeviceFlag(agreed)

    def mode(self, loss_fn, params: list[Tensor]) -> str:
        mode = self.hvp
        if mode == "streaming":
            raise ValueError("hvp='streaming' updates v inside every step from the two SAM passes; it has no "
                             "refresh of its own (refresh_due is always False). Use another hvp to refresh v "
                             "with power iterations")
        if mode == "auto":
            # FSDP2 parameters are out of autograd's reach from the loss (see exact_hvp): only
            # finite differences, whose closure backward FSDP2 reduce-scatters, work there.
            sharded = any(is_dtensor(p) for p in params)
            mode = "exact" if loss_fn is not None and not sharded else "finite_difference"
        if mode in ("exact", *PRODUCT_MODES) and loss_fn is None:
            raise ValueError(f"hvp={mode!r} needs loss_fn: pass step(closure, loss_fn=f) where f() runs the "
                             "forward pass and returns the loss (no backward), or use hvp='finite_difference' "
                             "or hvp='forward_difference'")
        return mode

    @staticmethod
    def process_group(inputs: TrackerInputs):
        """The group over which exact HVPs are averaged (``torch.autograd.grad`` bypasses DDP's reducer); "auto":
        the DDP model's group, refused without one under several ranks (each would keep its own batch's HVPs)."""
        if not isinstance(inputs.process_group, str):
            return inputs.process_group
        if isinstance(inputs.model, torch.nn.parallel.DistributedDataParallel):
            return inputs.model.process_group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"exact Hessian-vector products under torch.distributed ({dist.get_world_size()} ranks) need to "
                "know where to average them: pass model=<the DistributedDataParallel module> (its group is used) "
                "or process_group=<a group> (or process_group=None to keep each rank's own HVPs on purpose)")
        return None

    # ----- the vector --------------------------------------------------------------------
    @staticmethod
    def exists(global_state: dict) -> bool:
        refreshes = global_state.get("refreshes", 0)
        return isinstance(refreshes, Tensor) or refreshes > 0 or global_state.get("refresh_attempts", 0) > 0

    def vectors(self, inputs: TrackerInputs, params: list[Tensor]) -> list[Tensor] | None:
        """v aligned with ``params`` (zeros where a parameter has none), or None before the first refresh;
        rebuilt only when the state may have changed (a refresh, a load, new param groups)."""
        if not self.exists(inputs.global_state):
            return None
        key = (id(params), id(inputs.global_state.get("refreshes")), id(inputs.state))
        if key != self._cache_key:
            state = inputs.state
            self._cache = [state[p]["eigenvector"] if "eigenvector" in state[p] else torch.zeros_like(p)
                           for p in params]
            self._cache_key = key
        return self._cache

    # ----- a refresh ---------------------------------------------------------------------------
    def compute(self, inputs: TrackerInputs, lists: ParamLists, closure, loss_fn,
                first_gradients: dict[int, Tensor] | None = None,
                first_pass_randomness: RandomState | None = None) -> PendingRefresh:
        """Power iteration at the current weights; the state is not touched until ``commit``. Forward differences
        reuse ``first_gradients``, the first pass's gradient, and ``first_pass_randomness`` (its dropout masks)."""
        params = [p for p in lists.params if p.requires_grad]
        layout = ops.Layout.of(params)
        mode = self.mode(loss_fn, params)
        generator = torch.Generator()
        generator.set_state(inputs.global_state["generator"])
        previous = self.vectors(inputs, lists.params)
        has_previous = previous is not None
        if has_previous:
            start = previous = [v for p, v in zip(lists.params, previous) if p.requires_grad]
        else:
            start = random_vectors(params, 1, generator)[0]
        flags: list[Tensor] = []
        check = inputs.gradient_check

        def unscale(tensors: list[Tensor]) -> None:  # AMP: unscale and flag non-finite values
            if check is not None:
                flags.append(check(tensors, "hvp").reshape(()))

        with eval_mode(inputs.model, self.hvp_eval_mode), batchnorm_statistics_frozen(inputs.model):
            if mode in ("exact", *PRODUCT_MODES):
                # autograd.grad bypasses DDP's reducer: the products are averaged over the group here.
                raw = product_function(mode, inputs.model, torch.enable_grad()(loss_fn), params,
                                       process_group=self.process_group(inputs))

                def hvp(vectors):
                    products = raw(vectors)
                    with torch.no_grad():
                        for prod in products:
                            unscale(prod)
                    return products
            elif mode == "finite_difference":
                # The closure's backward goes through DDP (when used), which already averages.
                hvp = finite_difference_hvp(closure, params, backend=inputs.backend, on_gradients=unscale,
                                            layout=layout)
            else:
                base, randomness = self._base_gradient(inputs, closure, params, first_gradients,
                                                       first_pass_randomness, unscale)
                hvp = forward_difference_hvp(closure, params, base, backend=inputs.backend, on_gradients=unscale,
                                             layout=layout, randomness=randomness)
            result = power_iteration(hvp, [start], iters=self.power_iters, tol=self.eig_tol, eps=inputs.eps,
                                     backend=inputs.backend, layout=layout)
        lam, residual, norm = result.eigenvalues[0], result.residuals[0], result.norms[0]
        accepted = torch.isfinite(lam) & torch.isfinite(norm) & (norm > 0) & torch.isfinite(residual)
        for flag in flags:
            accepted = accepted & (flag.to(accepted.device) == 0)
        with torch.no_grad():
            if previous is None:  # the fallback: the normalised start vector
                previous = [t.clone() for t in start]
                orthonormalize_([previous], eps=inputs.eps, backend=inputs.backend)
            vectors = [torch.where(accepted.to(v.device), v, f) for v, f in zip(result.vectors[0], previous)]
            agreed = None
            if self.adaptive:
                if has_previous:
                    vv, vp, pp = ops.dots([vectors, previous], [(0, 0), (0, 1), (1, 1)], backend=inputs.backend,
                                          layout=layout).unbind()
                    agreed = accepted & (vp.abs() >= ADAPTIVE_AGREEMENT * (vv * pp).sqrt())
                else:
                    agreed = torch.zeros_like(accepted)
        def kept(new: Tensor, key: str) -> Tensor:  # where rejected: the last refresh's value (NaN before one)
            old = inputs.global_state.get(key)
            return torch.where(accepted, new, torch.full_like(new, float("nan")) if old is None else old.to(new))

        return PendingRefresh(params=params, vectors=vectors, eigenvalue=kept(lam, "eigenvalue"),
                              residual=kept(residual, "eigen_residual"), accepted=accepted,
                              iterations=result.iterations, generator_state=generator.get_state(), agreed=agreed)

    def _base_gradient(self, inputs: TrackerInputs, closure, params: list[Tensor], first_gradients,
                       first_pass_randomness, unscale) -> tuple[list[Tensor], RandomState | None]:
        """grad L(w) for forward differences and the random generators' states it was computed from: the first
        pass's, unless the HVPs run in another model mode. With ``per_replica_perturbation`` the first pass
        skipped DDP's all-reduce, but the HVP passes do not: its gradient is averaged here (no evaluation)."""
        if first_gradients is not None and not (inputs.model is not None and self.hvp_eval_mode):
            base = [first_gradients[id(p)] if id(p) in first_gradients else torch.zeros_like(p) for p in params]
            if inputs.per_replica_perturbation:
                base = [t.clone() for t in base]  # the caller restores the first-pass .grad from the originals
                with torch.no_grad():
                    all_reduce_mean_(base, replica_group(inputs))
            return base, first_pass_randomness
        # One more evaluation, in the mode of the HVPs (the caller's eval-mode context is active).
        randomness = RandomState.capture()
        user_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad(), randomness.replayed():
                closure()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        finally:
            for p, g in zip(params, user_grads):
                p.grad = g
        with torch.no_grad():
            unscale(grads)
        return grads, randomness

    def commit(self, inputs: TrackerInputs, pending: PendingRefresh) -> None:
        state, g = inputs.state, inputs.global_state
        with torch.no_grad():
            fresh = []  # positions without a stored vector of this shape yet
            for i, (p, v) in enumerate(zip(pending.params, pending.vectors)):
                entry = state[p]
                if pending.fallback is not None:  # scratch vectors: the fallback where rejected
                    v = torch.where(pending.accepted.to(v.device), v, pending.fallback[i])
                if "eigenvector" in entry and entry["eigenvector"].shape == v.shape:
                    entry["eigenvector"].copy_(v)  # in place: the cached list stays valid
                else:
                    fresh.append((entry, v))
            # New vectors share bucketed allocations, as the saved weights do (faster on many small tensors).
            for (entry, v), storage in zip(fresh, scratch_like([v for _, v in fresh])):
                entry["eigenvector"] = storage.copy_(v)
        rejected = ~pending.accepted
        g["eigenvalue"] = pending.eigenvalue
        g["eigen_residual"] = pending.residual
        g["power_iterations"] = pending.iterations
        g["refreshes"] = pending.accepted.long() + g.get("refreshes", 0)
        g["rejected_refreshes"] = rejected.long() + g.get("rejected_refreshes", 0)
        g["refresh_attempts"] = g.get("refresh_attempts", 0) + 1
        g["refresh_rejected"] = rejected
        g["generator"] = pending.generator_state
        if self.adaptive and pending.agreed is not None:
            self._schedule(g, pending.agreed)
        self._retry = False
        self._pending_retry = _DeviceFlag(rejected)

    def after_load(self, global_state: dict, retry: bool = False) -> None:
        """The rejection flag of the loaded state decides whether the next step retries (or ``retry``)."""
        self._retry = retry
        flag = global_state.get("refresh_rejected")
        self._pending_retry = _DeviceFlag(flag) if isinstance(flag, Tensor) else None
        agreed = global_state.get("refresh_agreed")
        self._agreed = _DeviceFlag(agreed) if isinstance(agreed, Tensor) else None


def replica_group(inputs: TrackerInputs):
    """The group DDP averages over (per-replica perturbation: the model is the DDP module)."""
    return getattr(inputs.model, "process_group", None)
