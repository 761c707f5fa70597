"""SAM, ASAM and X-SAM as thin ``torch.optim.Optimizer`` wrappers around any base optimizer.

The wrapper owns the step protocol and the state; every arithmetic pass over
the parameters is an op of ``xsam.ops`` (see ``../shared/spec/algorithm.md``
for the mathematics). The param groups are shared with the base optimizer, so
LR schedulers, ``add_param_group`` and per-group hyper-parameters work on either.

State layout (saved by ``state_dict``):
- ``self.state[p]["eigenvector"]``: p's slice of the top Hessian eigenvector v;
- ``self.state["xsam"]``: the global scalars: step counter, number of refreshes,
  generator state, and the diagnostics of the last step (device tensors).
The weights saved before the perturbation are scratch (reused buffers, not
saved in checkpoints): a checkpoint is only meaningful between steps.
"""
from __future__ import annotations

import collections
import contextlib
import math
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from . import ops
from .hessian import _is_dtensor, exact_hvp, finite_difference_hvp, power_iteration, random_vectors

__all__ = ["SAM", "XSAM", "CORRECTIONS", "HVP_MODES", "GradientCheck", "batchnorm_statistics_frozen"]

CORRECTIONS = ("signed", "symmetric", "acute")
HVP_MODES = ("auto", "exact", "finite_difference")
GLOBAL = "xsam"  # key of the global (not per-parameter) entry in self.state

Closure = Callable[[], Tensor]
# ``check(tensors, kind)``: may rescale ``tensors`` in place (AMP unscaling) and returns a 0-d
# device tensor that is > 0 when any of them is not finite. ``kind`` is "first", "second" or "hvp".
GradientCheck = Callable[[list[Tensor], str], Tensor]


class _NonFiniteGradients(Exception):
    """Raised inside a step when a pass produced inf/nan: the step is undone and skipped."""


def _check_number(name: str, value, low: float, high: float = math.inf, hint: str = "") -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high
    if not ok:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r} is invalid: {name} must be a number {bounds}. {hint}".rstrip())


def _check_count(name: str, value, hint: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be an integer >= 1. {hint}")


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")


def _resolve_process_group(process_group, model: nn.Module | None):
    """The group over which exact HVPs are averaged: "auto" takes a DDP model's group, else none."""
    if isinstance(process_group, str):
        if process_group != "auto":
            raise ValueError(f"process_group={process_group!r} is invalid: pass 'auto', None, or a "
                             "torch.distributed ProcessGroup")
        group = getattr(model, "process_group", None)
        ddp = torch.nn.parallel.DistributedDataParallel
        return group if isinstance(model, ddp) else None
    return process_group


def _batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@contextlib.contextmanager
def batchnorm_statistics_frozen(model: nn.Module | None) -> Iterator[None]:
    """Run the block with ``model``'s BatchNorm running statistics put back exactly afterwards.

    Used for the second (perturbed) pass and for HVP evaluations: only the first
    pass of a step may update running statistics.
    """
    if model is None:
        yield
        return
    saved = []
    for m in _batchnorm_modules(model):
        saved.append((m, [(name, b.clone()) for name, b in m.named_buffers(recurse=False) if b is not None]))
    try:
        yield
    finally:
        with torch.no_grad():
            for m, buffers in saved:
                for name, value in buffers:
                    getattr(m, name).copy_(value)


@contextlib.contextmanager
def eval_mode(model: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """``model.eval()`` for the block, then every module's own training flag back."""
    if model is None or not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


class SAM(torch.optim.Optimizer):
    """Sharpness-Aware Minimization (Foret et al., 2021) around any base optimizer.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``; with
    ``adaptive=True`` it is ASAM (element-wise perturbation ``rho * w*w*g / ||w*g||``).
    ``base_optimizer`` is an optimizer class (built over the same param groups with
    ``**base_kwargs``) or an already-built optimizer over the same parameters.

    ``step(closure)``: the closure runs forward and backward and returns the
    loss; it need not zero gradients, the optimizer clears them before each of
    its passes. BatchNorm running statistics of ``model`` (when given) are only
    updated by the first pass (without ``model``, wrap the passes after the first
    in ``batchnorm_statistics_frozen(model)`` yourself).

    Data parallelism (see ``xsam.distributed``): with ``model`` a DDP module,
    ``per_replica_perturbation=True`` runs the first pass under ``model.no_sync()``
    (each replica perturbs by its own gradient); ``process_group`` ("auto": the DDP
    module's group, or None, or a group) is where exact HVPs are averaged. FSDP2
    (``fully_shard``) parameters are DTensors: the op set reduces the global norms and
    dot products across their shards, so a step equals the single-process step.

    Gradient clipping: clip inside the closure, after ``backward``. It then acts on
    both passes; norm clipping is a no-op on the first pass (the perturbation is
    normalised, ASAM included) and on the second pass of XSAM with
    ``normalize=True``; it clips what the base optimizer sees for SAM and for
    ``normalize=False``. With ``xsam.amp.SAMGradScaler`` the closure sees scaled
    gradients, so clip with ``max_norm * scaler.get_scale()`` there.
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None, per_replica_perturbation: bool = False,
                 process_group="auto", backend: str = "auto", eps: float = 1e-12, **base_kwargs):
        _check_number("rho", rho, 0.0, hint="It is the perturbation radius; the usual value is 0.05.")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive={adaptive!r} is invalid: pass True (ASAM) or False (SAM)")
        ops.check_backend_name(backend)
        _check_number("eps", eps, 0.0)
        if model is not None and not isinstance(model, nn.Module):
            raise ValueError(f"model={type(model).__name__} is invalid: pass the nn.Module being trained, or None")
        if not isinstance(per_replica_perturbation, bool):
            raise ValueError(f"per_replica_perturbation={per_replica_perturbation!r} is invalid: pass True or False")
        if per_replica_perturbation and not hasattr(model, "no_sync"):
            raise ValueError("per_replica_perturbation=True needs model=<the DistributedDataParallel module>: the "
                             "first pass runs under model.no_sync() so each replica perturbs by its own gradient")
        self.adaptive = adaptive
        self.per_replica_perturbation = per_replica_perturbation
        self.process_group = _resolve_process_group(process_group, model)
        self.backend = backend
        self.eps = eps
        self.model = model
        self._saved_weights: dict[Tensor, Tensor] = {}  # scratch: w before the perturbation
        self._perturbed: list[Tensor] | None = None
        # Diagnostics of the step in progress, merged into the state only when it completes.
        self._step_diagnostics: dict[str, Tensor] = {}
        # An OrderedDict: RemovableHandle keeps a weak reference to it.
        self._diagnostics_hooks: collections.OrderedDict[int, Callable] = collections.OrderedDict()
        self._gradient_check: GradientCheck | None = None  # set for one step by xsam.amp.SAMGradScaler
        defaults = dict(rho=rho, **self._extra_defaults())
        super().__init__(params, defaults)
        self._attach_base_optimizer(base_optimizer, base_kwargs)
        self.state[GLOBAL] = self._initial_global_state()

    # ----- construction and param groups -------------------------------------------------
    def _extra_defaults(self) -> dict:
        return {}

    def _validate_group(self, group: dict) -> None:
        _check_number("rho", group["rho"], 0.0, hint="It is the perturbation radius; the usual value is 0.05.")

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
            for mine_g, theirs_g in zip(self.param_groups, base_optimizer.param_groups):
                for k, v in mine_g.items():
                    theirs_g.setdefault(k, v)
            self.base_optimizer = base_optimizer
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer):
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise ValueError(f"base_optimizer={base_optimizer!r} is invalid: pass a torch.optim.Optimizer "
                             "subclass (e.g. torch.optim.SGD) or an optimizer instance")
        # One list of group dicts for both: a scheduler or add_param_group on either acts on both.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict) -> None:
        if not hasattr(self, "base_optimizer"):  # called by Optimizer.__init__
            super().add_param_group(param_group)
            self._validate_group(self.param_groups[-1])
            return
        group = dict(param_group)
        for k, v in self.defaults.items():
            if k in self._own_keys():
                group.setdefault(k, v)
        self._validate_group(group)
        self.base_optimizer.add_param_group(group)

    def _own_keys(self) -> tuple[str, ...]:
        return ("rho", *self._extra_defaults())

    def _initial_global_state(self) -> dict:
        return {"step": 0, "skipped_steps": 0}

    @property
    def _global(self) -> dict:
        return self.state[GLOBAL]

    # ----- the two passes ----------------------------------------------------------------
    def _active(self) -> list[tuple[dict, list[Tensor]]]:
        """(group, params with a gradient) for every group, after checking the gradients."""
        out = []
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise ValueError(f"param_groups[{gi}] has a parameter of shape {tuple(p.shape)} with a sparse "
                                     "gradient; SAM-type optimizers need dense gradients (e.g. nn.Embedding("
                                     "sparse=False))")
            out.append((group, params))
        return out

    def _saved_buffer(self, p: Tensor) -> Tensor:
        buf = self._saved_weights.get(p)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            self._saved_weights[p] = buf
        return buf

    def _first_pass_statistics(self, params: list[Tensor], grads: list[Tensor], pending) -> Tensor:
        """The squared norm that scales the perturbation (hook: X-SAM also takes <g, v>)."""
        if self.adaptive:
            return ops.weighted_sumsq(params, grads, backend=self.backend)
        return ops.dots([grads], [(0, 0)], backend=self.backend)[0]

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb: save w, then ``w += rho * g / (||g|| + eps)`` (ASAM: ``rho * w*w*g / (||w*g|| + eps)``)."""
        self._first_step(None)
        if zero_grad:
            self.zero_grad()

    def _first_step(self, pending) -> None:
        if self._perturbed is not None:
            raise RuntimeError("first_step() was called twice without second_step(); the weights are "
                               "still perturbed. Call second_step() (or step(closure)) first.")
        active = self._active()
        params = [p for _, ps in active for p in ps]
        if not params:
            raise RuntimeError("first_step() found no parameter with a gradient; run the forward and "
                               "backward pass (loss.backward()) first")
        grads = [p.grad for p in params]
        self._step_diagnostics = {}
        sq = self._first_pass_statistics(params, grads, pending)
        denom = sq.sqrt() + self.eps
        self._step_diagnostics["grad_norm"] = sq.sqrt()
        for group, ps in active:
            ops.perturb_(ps, [p.grad for p in ps], [self._saved_buffer(p) for p in ps], group["rho"] / denom,
                         adaptive=self.adaptive, backend=self.backend)
        self._perturbed = params

    def _correction(self, active, pending) -> list[tuple[Tensor | float, Tensor | float, list[Tensor] | None]]:
        """Per group (a, b, v) of ``g = a * g - b * v``; plain SAM keeps the gradient as it is."""
        return [(1.0, 0.0, None) for _ in active]

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Correct the perturbed gradient (X-SAM), restore w exactly, and step the base optimizer."""
        self._second_step(None)
        if zero_grad:
            self.zero_grad()

    def _second_step(self, pending) -> None:
        if self._perturbed is None:
            raise RuntimeError("second_step() needs first_step() first (the weights are not perturbed)")
        perturbed = set(self._perturbed)
        active = [(g, [p for p in ps if p in perturbed]) for g, ps in self._active()]
        corrections = self._correction(active, pending)
        restored = set()
        for (group, ps), (a, b, vecs) in zip(active, corrections):
            ops.correct_restore_(ps, [p.grad for p in ps], [self._saved_weights[p] for p in ps], vecs, a, b,
                                 backend=self.backend)
            restored.update(ps)
        # Perturbed parameters that got no gradient in the second pass are only restored.
        rest = [p for p in self._perturbed if p not in restored]
        if rest:
            ops.copy_(rest, [self._saved_weights[p] for p in rest])
        self._perturbed = None
        self.base_optimizer.step()
        self._commit(pending)
        self._global.update(self._step_diagnostics)
        if self._diagnostics_hooks:
            record = dict(self._step_diagnostics, step=self._global["step"], refreshed=pending is not None,
                          **self._record_extras())
            for key in ("eigenvalue", "eigen_residual"):
                if key in self._global:
                    record[key] = self._global[key]
            for hook in list(self._diagnostics_hooks.values()):
                hook(self, record)
        self._global["step"] += 1

    def _commit(self, pending) -> None:
        """Hook: X-SAM stores the eigenvector computed during this step."""

    def _record_extras(self) -> dict:
        """Hook: extra entries of the diagnostics record (X-SAM: the rejected-refresh flag)."""
        return {}

    @torch.no_grad()
    def _abort(self) -> None:
        """Put the weights back after an exception in the middle of a step."""
        if self._perturbed is not None:
            ops.copy_(self._perturbed, [self._saved_weights[p] for p in self._perturbed])
            self._perturbed = None

    def _run(self, closure: Closure, first: bool) -> Tensor:
        """One gradient pass: the first at w (updates BatchNorm statistics), the second at w + e."""
        self.zero_grad(set_to_none=True)
        # Mode (b) of DDP: no all-reduce in the first pass (forward and backward), so each replica
        # perturbs by its own mini-batch gradient (the SAM paper's m-sharpness).
        no_sync = self.model.no_sync() if first and self.per_replica_perturbation else contextlib.nullcontext()
        with no_sync, batchnorm_statistics_frozen(None if first else self.model):
            loss = closure()
        self._check_gradients("first" if first else "second")
        return loss

    @torch.no_grad()
    def _check_gradients(self, kind: str) -> None:
        """Let the attached check (AMP) unscale this pass's gradients; skip the step on inf/nan.

        Reading the flag waits for the device: one host sync per pass, only while a check
        is attached (the stock GradScaler.step reads its flag once per step too).
        """
        if self._gradient_check is None:
            return
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        if grads and bool(self._gradient_check(grads, kind) > 0):
            raise _NonFiniteGradients(kind)

    def _skip(self) -> None:
        """Undo a step whose gradients were not finite: exact weights back, no base step, no state change."""
        self._abort()
        self.zero_grad(set_to_none=True)
        self._global["skipped_steps"] = self._global.get("skipped_steps", 0) + 1

    def step(self, closure: Closure | None = None) -> Tensor:
        """One full step; returns the loss of the first (unperturbed) pass."""
        if closure is None:
            raise ValueError("SAM.step() needs a closure: step(closure) where closure() runs forward and "
                             "backward and returns the loss (SAM evaluates the gradient twice)")
        closure = torch.enable_grad()(closure)
        loss = None
        try:
            loss = self._run(closure, first=True)
            with torch.no_grad():
                self._first_step(None)
            self._run(closure, first=False)
            with torch.no_grad():
                self._second_step(None)
        except _NonFiniteGradients:
            self._skip()
        except BaseException:
            self._abort()
            raise
        return loss

    # ----- checkpoints and diagnostics ---------------------------------------------------
    def register_diagnostics_hook(self, hook: Callable[["SAM", dict], None]) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer, record)`` after every completed step.

        ``record`` maps names to the step's scalars as device tensors (no host
        sync is forced; read them when convenient): ``step`` (int, the index of the
        step just taken), ``refreshed`` (bool), ``grad_norm`` (||g||), and for X-SAM
        ``adv_grad_norm``, ``cos_g_v``, ``cos_gadv_v``, ``correction`` (the
        ``beta`` of algorithm.md: the gradient loses ``alpha * beta * v``),
        ``eigenvalue`` and ``eigen_residual`` of the current v, and
        ``refresh_rejected`` (Python bool: a refresh of this step had non-finite
        HVPs under ``xsam.amp.SAMGradScaler`` and the old v was kept). Steps
        skipped by the scaler are not reported. With no hook registered nothing
        is recorded.
        """
        handle = torch.utils.hooks.RemovableHandle(self._diagnostics_hooks)
        self._diagnostics_hooks[handle.id] = hook
        return handle


    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["base_optimizer"] = self.base_optimizer.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        if self._perturbed is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(); finish the step first")
        state_dict = dict(state_dict)
        if "base_optimizer" not in state_dict:
            raise ValueError("state_dict has no 'base_optimizer' entry; it was not saved by "
                             f"{type(self).__name__}.state_dict()")
        base = state_dict.pop("base_optimizer")
        self.base_optimizer.load_state_dict(base)
        super().load_state_dict(state_dict)
        # Both load_state_dict calls rebuild their group dicts: share them again.
        self.base_optimizer.param_groups = self.param_groups
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        glob = self.state[GLOBAL]
        for k, v in glob.items():
            if isinstance(v, Tensor) and k != "generator":
                glob[k] = v.to(device)

    def diagnostics(self) -> dict[str, float | int]:
        """The last step's scalars as Python numbers (reading them waits for the device)."""
        out = {}
        for k, v in self._global.items():
            if k == "generator":
                continue
            out[k] = v.item() if isinstance(v, Tensor) else v
        return out


class XSAM(SAM):
    """X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector.

    Every ``eig_interval`` steps (step 0 included) the top eigenvector v of the
    mini-batch Hessian at the unperturbed weights is refreshed by ``power_iters``
    power iterations (warm-started from the previous v). Then, with
    ``gh = g_adv / (||g_adv|| + eps)`` (``normalize=True``) and ``c = <gh, v>``,
    the gradient handed to the base optimizer is ``gh - alpha * beta(c) * v`` with
    ``beta = |c|`` (``"signed"``), ``c`` (``"symmetric"``) or ``max(c, 0)`` (``"acute"``).

    HVPs: ``hvp="exact"`` needs ``step(closure, loss_fn=...)`` (``loss_fn`` runs the
    forward pass only and returns the loss), ``"finite_difference"`` uses the
    closure only, ``"auto"`` is exact when a ``loss_fn`` is given, except with FSDP2
    (DTensor) parameters, which only finite differences support (see
    ``xsam.distributed``). With ``model``, HVPs run with the model in eval mode
    (``hvp_eval_mode``) and neither HVPs nor the second pass update BatchNorm statistics.
    """

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2,
                 correction: str = "signed", normalize: bool = True, adaptive: bool = False,
                 eig_interval: int = 5, power_iters: int = 5, eig_tol: float | None = None, hvp: str = "auto",
                 model: nn.Module | None = None, hvp_eval_mode: bool = True, seed: int = 0,
                 per_replica_perturbation: bool = False, process_group="auto",
                 backend: str = "auto", eps: float = 1e-12, **base_kwargs):
        _check_number("alpha", alpha, 0.0, 2.0, hint="alpha=0 is SAM, 1 removes the component along v.")
        _check_choice("correction", correction, CORRECTIONS)
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize={normalize!r} is invalid: pass True or False")
        _check_count("eig_interval", eig_interval, "It is the number of steps between eigenvector refreshes.")
        _check_count("power_iters", power_iters, "It is the number of power iterations per refresh.")
        if eig_tol is not None:
            _check_number("eig_tol", eig_tol, 0.0, hint="Pass a positive tolerance, or None for fixed iterations.")
            if eig_tol == 0:
                raise ValueError("eig_tol=0 is invalid: pass a positive tolerance, or None for fixed iterations")
        _check_choice("hvp", hvp, HVP_MODES)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed={seed!r} is invalid: pass an integer")
        self._alpha_default = alpha
        self.correction = correction
        self.normalize = normalize
        self.eig_interval = eig_interval
        self.power_iters = power_iters
        self.eig_tol = eig_tol
        self.hvp = hvp
        self.hvp_eval_mode = hvp_eval_mode
        self.seed = seed
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, model=model,
                         per_replica_perturbation=per_replica_perturbation, process_group=process_group,
                         backend=backend, eps=eps, **base_kwargs)

    def _extra_defaults(self) -> dict:
        return {"alpha": self._alpha_default}

    def _validate_group(self, group: dict) -> None:
        super()._validate_group(group)
        _check_number("alpha", group["alpha"], 0.0, 2.0, hint="alpha=0 is SAM, 1 removes the component along v.")
        if self.hvp == "exact" and any(_is_dtensor(p) for p in group["params"]):
            raise ValueError("hvp='exact' does not work with sharded DTensor parameters (FSDP2 fully_shard): the "
                             "forward computes with unsharded copies, so autograd cannot differentiate the loss "
                             "with respect to the sharded parameters twice. Use hvp='finite_difference' (or "
                             "hvp='auto', which picks it for DTensor parameters)")

    def _initial_global_state(self) -> dict:
        generator = torch.Generator().manual_seed(self.seed)
        return {"step": 0, "skipped_steps": 0, "refreshes": 0, "rejected_refreshes": 0,
                "retry_refresh": False, "generator": generator.get_state()}

    # ----- the eigenvector ---------------------------------------------------------------
    def _hvp_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    @property
    def refresh_due(self) -> bool:
        """Whether the next ``step`` refreshes the eigenvector.

        True when ``step % eig_interval == 0``, and right after a refresh whose HVPs were not
        finite (AMP overflow), so that the rejected refresh is retried at the next step.
        """
        return self._global["step"] % self.eig_interval == 0 or self._global.get("retry_refresh", False)

    def eigenvector(self) -> list[Tensor] | None:
        """The current v as a list aligned with the parameters (None before the first refresh)."""
        if self._global["refreshes"] == 0:
            return None
        return [self.state[p]["eigenvector"] if "eigenvector" in self.state[p] else torch.zeros_like(p)
                for p in self._hvp_params()]

    def _compute_eigenvector(self, closure: Closure | None, loss_fn: Closure | None):
        """Power iteration at the current weights; returns the result without touching the state."""
        params = self._hvp_params()
        mode = self.hvp
        if mode == "auto":
            # FSDP2 parameters are out of autograd's reach from the loss (see exact_hvp): only
            # finite differences, whose closure backward FSDP2 reduce-scatters, work there.
            sharded = any(_is_dtensor(p) for p in params)
            mode = "exact" if loss_fn is not None and not sharded else "finite_difference"
        if mode == "exact" and loss_fn is None:
            raise ValueError("hvp='exact' needs loss_fn: pass step(closure, loss_fn=f) where f() runs the "
                             "forward pass and returns the loss (no backward), or use hvp='finite_difference'")
        if mode == "finite_difference" and closure is None:
            raise ValueError("hvp='finite_difference' needs the closure (forward + backward)")
        generator = torch.Generator()
        generator.set_state(self._global["generator"])
        start = self.eigenvector()
        if start is None:
            start = random_vectors(params, 1, generator)[0]
        check = self._gradient_check
        flags: list[Tensor] = []
        with eval_mode(self.model, self.hvp_eval_mode), batchnorm_statistics_frozen(self.model):
            if mode == "exact":
                # autograd.grad bypasses DDP's reducer: the products are averaged over the group here.
                hvp, _ = exact_hvp(torch.enable_grad()(loss_fn), params, process_group=self.process_group)
            else:
                # The closure's backward goes through DDP (when used), which already averages.
                hvp = finite_difference_hvp(torch.enable_grad()(closure), params, backend=self.backend)
            if check is not None:
                raw_hvp = hvp

                def hvp(vectors):
                    products = raw_hvp(vectors)
                    with torch.no_grad():
                        flags.append(check([t for prod in products for t in prod], "hvp"))
                    return products

            result = power_iteration(hvp, [start], iters=self.power_iters, tol=self.eig_tol, eps=self.eps,
                                     backend=self.backend)
        # One host read per refresh, only with a check attached: a non-finite product poisons v.
        finite = not flags or not bool(torch.stack([f.reshape(()) for f in flags]).sum() > 0)
        return params, result, generator.get_state(), finite

    def refresh_eigenvector(self, closure: Closure | None = None, loss_fn: Closure | None = None) -> Tensor:
        """Recompute v now at the current (unperturbed) weights; returns the eigenvalue (device tensor).

        For the manual ``first_step``/``second_step`` path: call it before the
        first pass when ``refresh_due`` (or whenever you like).
        """
        if self._perturbed is not None:
            raise RuntimeError("refresh_eigenvector() must run at the unperturbed weights, before first_step()")
        pending = self._accept(self._compute_eigenvector(closure, loss_fn))
        self._commit(pending)
        if pending is None:
            return self._global.get("eigenvalue", torch.full((), float("nan")))
        return pending[1].eigenvalues[0]

    def _record_extras(self) -> dict:
        # A Python bool: the scaler already read the flag on the host when it rejected the refresh.
        rejected, self._refresh_rejected = getattr(self, "_refresh_rejected", False), False
        return {"refresh_rejected": rejected}

    def _accept(self, pending):
        """The refresh if its HVPs were finite; else None (the old v stays) and a retry next step."""
        finite = pending[3]
        self._refresh_rejected = not finite
        if finite:
            self._global["retry_refresh"] = False
            return pending[:3]
        self._global["rejected_refreshes"] = self._global.get("rejected_refreshes", 0) + 1
        self._global["retry_refresh"] = True
        return None

    def _commit(self, pending) -> None:
        if pending is None:
            return
        params, result, generator_state = pending
        for p, v in zip(params, result.vectors[0]):
            self.state[p]["eigenvector"] = v
        g = self._global
        g["eigenvalue"] = result.eigenvalues[0]
        g["eigen_residual"] = result.residuals[0]
        g["power_iterations"] = result.iterations
        g["refreshes"] += 1
        g["generator"] = generator_state

    def _vectors_for(self, params: list[Tensor], pending) -> list[Tensor] | None:
        """v restricted to ``params``: the one being computed in this step, else the stored one."""
        if pending is not None:
            by_param = dict(zip(pending[0], pending[1].vectors[0]))
            return [by_param[p] if p in by_param else torch.zeros_like(p) for p in params]
        if self._global["refreshes"] == 0:
            return None
        return [self.state[p]["eigenvector"] if "eigenvector" in self.state[p] else torch.zeros_like(p)
                for p in params]

    # ----- the step ----------------------------------------------------------------------
    def _first_pass_statistics(self, params, grads, pending) -> Tensor:
        vecs = self._vectors_for(params, pending)
        if vecs is None:
            return super()._first_pass_statistics(params, grads, pending)
        sums = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend)
        self._step_diagnostics["cos_g_v"] = sums[1] / (sums[0].sqrt() + self.eps)
        if self.adaptive:
            return ops.weighted_sumsq(params, grads, backend=self.backend)
        return sums[0]

    def _correction(self, active, pending):
        params = [p for _, ps in active for p in ps]
        vecs = self._vectors_for(params, pending)
        grads = [p.grad for p in params]
        if vecs is None:
            gg = ops.dots([grads], [(0, 0)], backend=self.backend)[0]
            a = 1.0 / (gg.sqrt() + self.eps) if self.normalize else 1.0
            self._step_diagnostics["adv_grad_norm"] = gg.sqrt()
            return [(a, 0.0, None) for _ in active]
        sums = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend)
        norm = sums[0].sqrt()
        a = 1.0 / (norm + self.eps) if self.normalize else torch.ones_like(norm)
        c = a * sums[1]
        if self.correction == "signed":
            beta = c.abs()  # sign(<g_adv, v>) * c, and a > 0
        elif self.correction == "symmetric":
            beta = c
        else:
            beta = c.clamp_min(0)
        self._step_diagnostics["adv_grad_norm"] = norm
        self._step_diagnostics["cos_gadv_v"] = sums[1] / (norm + self.eps)
        self._step_diagnostics["correction"] = beta
        by_param = dict(zip(params, vecs))
        return [(a, group["alpha"] * beta, [by_param[p] for p in ps]) for group, ps in active]

    def step(self, closure: Closure | None = None, loss_fn: Closure | None = None) -> Tensor:
        """One X-SAM step: refresh v when due, first pass, perturb, second pass, correct, restore, base step.

        Returns the loss of the first pass. If anything raises (the closure
        included), the weights and the optimizer state are left as they were.
        """
        if closure is None:
            raise ValueError("XSAM.step() needs a closure: step(closure) where closure() runs forward and "
                             "backward and returns the loss (X-SAM evaluates the gradient at least twice)")
        closure = torch.enable_grad()(closure)
        pending, loss = None, None
        global_before = dict(self._global)
        self._refresh_rejected = False
        try:
            if self.refresh_due:
                pending = self._accept(self._compute_eigenvector(closure, loss_fn))
            loss = self._run(closure, first=True)
            with torch.no_grad():
                self._first_step(pending)
            self._run(closure, first=False)
            with torch.no_grad():
                self._second_step(pending)
        except _NonFiniteGradients:
            # A skipped step leaves the eigenvector, the schedule and the counters as they were
            # (the refresh of this step, if any, is redone by the next attempt).
            self._global.clear()
            self._global.update(global_before)
            self._skip()
        except BaseException:
            self._abort()
            self._global.clear()
            self._global.update(global_before)
            raise
        return loss
