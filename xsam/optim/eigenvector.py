"""The top Hessian eigenvector v of X-SAM and Eigen-SAM: when to refresh it, how, and when to reject it.

A refresh runs ``power_iters`` power iterations on Hessian-vector products at the unperturbed
weights, warm-started from the previous v (a seeded normal draw the first time):
- ``hvp="exact"``: double backward of a forward-only ``loss_fn``, before the first pass;
- ``"finite_difference"``: central differences of the closure's gradient (2 evaluations per
  product), before the first pass;
- ``"forward_difference"``: ``(grad L(w + h v) - grad L(w)) / h`` reusing the first pass's
  gradient (1 evaluation per product), between the first pass and the perturbation; where the
  HVPs run in eval mode but the first pass ran in train mode (``model=`` with
  ``hvp_eval_mode=True``), or where the first pass is not all-reduced (DDP's
  ``per_replica_perturbation``), ``grad L(w)`` costs one more evaluation per refresh;
- ``"auto"``: exact when a ``loss_fn`` is given (and no parameter is a DTensor), else central
  finite differences.

A refresh whose vector is zero or not finite (a zero Hessian on the batch, a NaN product, an
AMP overflow) is rejected on the device: ``torch.where`` keeps the previous v (or the
normalised start vector when there is none), no host sync. The rejection is counted, reported
as ``refresh_rejected``, and the refresh is retried at the next step once the host can read
the flag without waiting (immediately on the CPU; on a GPU as soon as the device has
produced it). So v is never zero or non-finite after a completed step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..hessian import (_is_dtensor, exact_hvp, finite_difference_hvp, forward_difference_hvp, orthonormalize_,
                       power_iteration, random_vectors)
from .lists import ParamLists
from .model_state import batchnorm_statistics_frozen, eval_mode

__all__ = ["HVP_MODES", "EigenvectorTracker", "PendingRefresh"]

HVP_MODES = ("auto", "exact", "finite_difference", "forward_difference")


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


class EigenvectorTracker:
    """Refresh schedule, HVP mode, power iteration and rejection rule, over an optimizer's state."""

    def __init__(self, optimizer, *, eig_interval: int, power_iters: int, eig_tol: float | None, hvp: str,
                 hvp_eval_mode: bool, seed: int):
        self.optimizer = optimizer
        self.eig_interval = eig_interval
        self.power_iters = power_iters
        self.eig_tol = eig_tol
        self.hvp = hvp
        self.hvp_eval_mode = hvp_eval_mode
        self.seed = seed
        self._pending_retry: _DeviceFlag | None = None  # the rejection flag of the last refresh
        self._cache_key: tuple | None = None
        self._cache: list[Tensor] | None = None

    def initial_state(self) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        return {"refreshes": 0, "rejected_refreshes": 0, "refresh_attempts": 0, "retry_refresh": False,
                "generator": generator.get_state()}

    @property
    def _global(self) -> dict:
        return self.optimizer._global

    # ----- schedule ------------------------------------------------------------------------
    def poll_retry(self) -> None:
        """Read the last refresh's rejection flag into ``retry_refresh`` once the device has produced it."""
        if self._pending_retry is not None:
            value = self._pending_retry.poll()
            if value is not None:
                self._global["retry_refresh"] = value
                self._pending_retry = None

    def due(self) -> bool:
        """True when ``step % eig_interval == 0``, or when the last refresh was rejected (a retry)."""
        self.poll_retry()
        return self._global["step"] % self.eig_interval == 0 or bool(self._global.get("retry_refresh", False))

    def mode(self, loss_fn, params: list[Tensor]) -> str:
        mode = self.hvp
        if mode == "auto":
            # FSDP2 parameters are out of autograd's reach from the loss (see exact_hvp): only
            # finite differences, whose closure backward FSDP2 reduce-scatters, work there.
            sharded = any(_is_dtensor(p) for p in params)
            mode = "exact" if loss_fn is not None and not sharded else "finite_difference"
        if mode == "exact" and loss_fn is None:
            raise ValueError("hvp='exact' needs loss_fn: pass step(closure, loss_fn=f) where f() runs the "
                             "forward pass and returns the loss (no backward), or use hvp='finite_difference' "
                             "or hvp='forward_difference'")
        return mode

    def process_group(self):
        """The group over which exact HVPs are averaged (``torch.autograd.grad`` bypasses DDP's reducer).

        "auto": the DDP model's group. Under torch.distributed with more than one rank and no DDP
        ``model``, each rank would silently keep the HVPs of its own batch: refused, with what to pass.
        """
        opt = self.optimizer
        if not isinstance(opt.process_group, str):
            return opt.process_group
        if isinstance(opt.model, torch.nn.parallel.DistributedDataParallel):
            return opt.model.process_group
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError(
                f"exact Hessian-vector products under torch.distributed ({dist.get_world_size()} ranks) need to "
                "know where to average them: pass model=<the DistributedDataParallel module> (its group is used) "
                "or process_group=<a group> (or process_group=None to keep each rank's own HVPs on purpose)")
        return None

    # ----- the vector --------------------------------------------------------------------
    def exists(self) -> bool:
        refreshes = self._global.get("refreshes", 0)
        return isinstance(refreshes, Tensor) or refreshes > 0 or self._global.get("refresh_attempts", 0) > 0

    def vectors(self, params: list[Tensor]) -> list[Tensor] | None:
        """v aligned with ``params`` (zeros where a parameter has none), or None before the first refresh.

        The list is rebuilt from the optimizer state only when the state may have changed (a
        refresh, a load, new param groups), so a step does no per-parameter lookups.
        """
        if not self.exists():
            return None
        key = (id(params), id(self._global.get("refreshes")), id(self.optimizer.state))
        if key != self._cache_key:
            state = self.optimizer.state
            self._cache = [state[p]["eigenvector"] if "eigenvector" in state[p] else torch.zeros_like(p)
                           for p in params]
            self._cache_key = key
        return self._cache

    def vectors_for(self, lists: ParamLists, full: ParamLists) -> list[Tensor] | None:
        """v aligned with ``lists``, a subset of ``full`` (the slow path when some gradients are missing)."""
        vecs = self.vectors(full.params)
        if vecs is None or lists is full:
            return vecs
        by_id = {id(p): v for p, v in zip(full.params, vecs)}
        return [by_id[id(p)] for p in lists.params]

    # ----- a refresh ---------------------------------------------------------------------------
    def compute(self, lists: ParamLists, closure, loss_fn, first_gradients: dict[int, Tensor] | None = None
                ) -> PendingRefresh:
        """Power iteration at the current weights; the state is not touched until ``commit``."""
        opt = self.optimizer
        params = [p for p in lists.params if p.requires_grad]
        layout = ops.Layout.of(params)
        mode = self.mode(loss_fn, params)
        generator = torch.Generator()
        generator.set_state(self._global["generator"])
        previous = self.vectors(lists.params) if self.exists() else None
        if previous is not None:
            previous = [v for p, v in zip(lists.params, previous) if p.requires_grad]
            start = previous
        else:
            start = random_vectors(params, 1, generator)[0]
        flags: list[Tensor] = []
        check = opt._gradient_check

        def unscale(tensors: list[Tensor]) -> None:  # AMP: unscale and flag non-finite values
            if check is not None:
                flags.append(check(tensors, "hvp").reshape(()))

        with eval_mode(opt.model, self.hvp_eval_mode), batchnorm_statistics_frozen(opt.model):
            if mode == "exact":
                # autograd.grad bypasses DDP's reducer: the products are averaged over the group here.
                raw, _ = exact_hvp(torch.enable_grad()(loss_fn), params, process_group=self.process_group())

                def hvp(vectors):
                    products = raw(vectors)
                    with torch.no_grad():
                        for prod in products:
                            unscale(prod)
                    return products
            elif mode == "finite_difference":
                # The closure's backward goes through DDP (when used), which already averages.
                hvp = finite_difference_hvp(closure, params, backend=opt.backend, on_gradients=unscale,
                                            layout=layout)
            else:
                base = self._base_gradient(closure, params, first_gradients, unscale)
                hvp = forward_difference_hvp(closure, params, base, backend=opt.backend, on_gradients=unscale,
                                             layout=layout)
            result = power_iteration(hvp, [start], iters=self.power_iters, tol=self.eig_tol, eps=opt.eps,
                                     backend=opt.backend, layout=layout)
        lam, residual, norm = result.eigenvalues[0], result.residuals[0], result.norms[0]
        accepted = torch.isfinite(lam) & torch.isfinite(norm) & (norm > 0) & torch.isfinite(residual)
        for flag in flags:
            accepted = accepted & (flag.to(accepted.device) == 0)
        with torch.no_grad():
            if previous is None:  # the fallback: the normalised start vector
                previous = [t.clone() for t in start]
                orthonormalize_([previous], eps=opt.eps, backend=opt.backend)
            vectors = [torch.where(accepted.to(v.device), v, f) for v, f in zip(result.vectors[0], previous)]
        old_lam = self._global.get("eigenvalue")
        old_res = self._global.get("eigen_residual")
        nan = torch.full_like(lam, float("nan"))
        return PendingRefresh(
            params=params, vectors=vectors,
            eigenvalue=torch.where(accepted, lam, nan if old_lam is None else old_lam.to(lam)),
            residual=torch.where(accepted, residual, nan if old_res is None else old_res.to(residual)),
            accepted=accepted, iterations=result.iterations, generator_state=generator.get_state())

    def _base_gradient(self, closure, params: list[Tensor], first_gradients, unscale) -> list[Tensor]:
        """grad L(w) for forward differences: the first pass's, unless the HVPs run in another model mode.

        Nor under DDP's per-replica perturbation: that first pass is each replica's own gradient
        (not all-reduced), while the products' gradients are averaged.
        """
        opt = self.optimizer
        reusable = not (opt.model is not None and self.hvp_eval_mode) and not opt.per_replica_perturbation
        if first_gradients is not None and reusable:
            return [first_gradients[id(p)] if id(p) in first_gradients else torch.zeros_like(p) for p in params]
        # One more evaluation, all-reduced, in the mode of the HVPs (the caller's eval-mode context is active).
        user_grads = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad():
                closure()
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        finally:
            for p, g in zip(params, user_grads):
                p.grad = g
        with torch.no_grad():
            unscale(grads)
        return grads

    def commit(self, pending: PendingRefresh) -> None:
        state, g = self.optimizer.state, self._global
        with torch.no_grad():
            for p, v in zip(pending.params, pending.vectors):
                entry = state[p]
                if "eigenvector" in entry and entry["eigenvector"].shape == v.shape:
                    entry["eigenvector"].copy_(v)  # in place: the cached list stays valid
                else:
                    entry["eigenvector"] = v
        rejected = ~pending.accepted
        g["eigenvalue"] = pending.eigenvalue
        g["eigen_residual"] = pending.residual
        g["power_iterations"] = pending.iterations
        g["refreshes"] = pending.accepted.long() + g.get("refreshes", 0)
        g["rejected_refreshes"] = rejected.long() + g.get("rejected_refreshes", 0)
        g["refresh_attempts"] = g.get("refresh_attempts", 0) + 1
        g["refresh_rejected"] = rejected
        g["generator"] = pending.generator_state
        g["retry_refresh"] = False
        self._pending_retry = _DeviceFlag(rejected)

    def forget_pending_retry(self) -> None:
        """After a load: the flag in the loaded state decides."""
        self._pending_retry = None
        flag = self._global.get("refresh_rejected")
        if isinstance(flag, Tensor):
            self._pending_retry = _DeviceFlag(flag)
