"""Hessian-vector products and (block) power iteration over lists of parameter tensors.

A "vector" is a list of tensors aligned with a list of parameters (the flat vector of
algorithm.md cut into parameter-shaped pieces); all vector arithmetic goes through ``xsam.ops``.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import ops
from .distributed import all_reduce_mean_, is_dtensor

Vector = list[Tensor]
HvpFn = Callable[[Sequence[Vector]], list[Vector]]

__all__ = ["PowerIterationResult", "RandomState", "default_fd_step", "exact_hvp", "finite_difference_hvp",
           "forward_difference_hvp", "power_iteration", "random_vectors", "orthonormalize_"]


def _zeros_for_missing(results: Sequence[Tensor | None], params: Sequence[Tensor]) -> Vector:
    for r, p in zip(results, params):
        if r is not None and r.is_sparse:
            raise ValueError(f"a parameter of shape {tuple(p.shape)} has a sparse gradient; Hessian-vector products "
                             "and SAM-type optimizers need dense gradients (e.g. nn.Embedding(sparse=False))")
    return [torch.zeros_like(p) if r is None else r for r, p in zip(results, params)]


def _averaged(product: Vector, process_group) -> Vector:
    """``product`` averaged in place over the ranks of ``process_group`` (None: left as it is)."""
    if process_group is not None:
        with torch.no_grad():
            all_reduce_mean_(product, process_group)
    return product


def _check_sharded_parameters_reached(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
    """Refuse to turn an unreachable sharded parameter into silent zero rows of H."""
    for i, (g, p) in enumerate(zip(grads, params)):
        if g is None and is_dtensor(p):
            raise RuntimeError(
                f"exact HVPs cannot differentiate the loss with respect to params[{i}] (a DTensor of shape "
                f"{tuple(p.shape)}): autograd does not reach it from the loss. This is what FSDP2 (fully_shard) "
                "does: its forward computes with unsharded copies of the parameters and hands gradients to the "
                "sharded ones in hooks, so torch.autograd.grad reports 'The differentiated Tensor at index 0 "
                "appears to not have been used in the graph'. Use finite-difference HVPs instead "
                "(XSAM(hvp='finite_difference') or hvp='auto'; xsam.hessian.finite_difference_hvp)")


def exact_hvp(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *,
              process_group=None) -> tuple[HvpFn, Tensor]:
    """Build ``H v`` by double backward at the current weights.

    ``loss_fn`` runs the forward pass only and returns the scalar loss. Returns ``(hvp, loss)``: ``hvp(vectors)``
    maps m vectors to their m products, reusing one create-graph backward. Parameters the loss does not depend on
    get zero rows. ``process_group``: average every product over its ranks; needed with DDP, whose gradient
    all-reduce ``torch.autograd.grad`` bypasses. FSDP2 (``fully_shard``) parameters, which autograd cannot reach
    from the loss, raise a RuntimeError: use ``finite_difference_hvp``.
    """
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("loss_fn must return the scalar loss tensor (forward only, no backward)")
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    _check_sharded_parameters_reached(grads, params)
    # Only gradients that still depend on the weights have a second derivative.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]

    def hvp(vectors: Sequence[Vector]) -> list[Vector]:
        out = []
        for v in vectors:
            rows: list[Tensor | None] = [None] * len(params)
            if live:
                with torch.enable_grad():
                    hv = torch.autograd.grad(
                        [grads[i] for i in live], [params[i] for i in live],
                        grad_outputs=[v[i] for i in live], retain_graph=True, allow_unused=True,
                    )
                for i, h in zip(live, hv):
                    rows[i] = None if h is None else h.detach()
            out.append(_averaged(_zeros_for_missing(rows, params), process_group))
        return out

    return hvp, loss.detach()


def default_fd_step(params: Sequence[Tensor], vector: Vector, *, order: int = 2, backend: str = "auto",
                    layout: ops.Layout | None = None) -> Tensor:
    """Finite-difference step ``h = eps^(1/(order+1)) * (1 + rms(w)) / ||v||`` as a device scalar.

    eps is the machine epsilon of the least precise parameter dtype. Central differences (``order=2``, error
    O(h^2)) balance truncation against rounding (O(eps / h)) at h ~ eps^(1/3); forward differences (``order=1``,
    error O(h)) at h ~ eps^(1/2). The RMS weight makes the perturbation relative to typical weights.
    """
    if order not in (1, 2):
        raise ValueError(f"order={order!r} is invalid: 1 (forward differences) or 2 (central differences)")
    eps = max(torch.finfo(p.dtype).eps for p in params)
    sums = ops.dots([list(params), list(vector)], [(0, 0), (1, 1)], backend=backend, layout=layout)
    n = sum(p.numel() for p in params)
    rms = (sums[0] / max(n, 1)).sqrt()
    return eps ** (1.0 / (order + 1)) * (1.0 + rms) / sums[1].sqrt().clamp_min(1e-30)


GradientHook = Callable[[Vector], None]  # sees each closure gradient (e.g. AMP unscaling) before it is used


@dataclass
class RandomState:
    """The states of the generators dropout draws from: the CPU's and every initialised CUDA device's.

    Finite-difference products replay one such state in every closure call, so that the loss is one function of
    the weights during the products (the same dropout masks at ``w + h v`` and ``w - h v``), as for exact products,
    whose single forward pass draws one set of masks. Generators of one's own (``torch.Generator`` objects, numpy,
    other device types) are not covered.
    """

    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def capture(cls) -> RandomState:
        return cls(torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)

    def is_current(self) -> bool:
        now = RandomState.capture()
        return (torch.equal(now.cpu, self.cpu) and len(now.cuda) == len(self.cuda)
                and all(map(torch.equal, now.cuda, self.cuda)))

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block from these states; afterwards the generators are as they were before the block."""
        before = RandomState.capture()
        self.restore()
        try:
            yield
        finally:
            before.restore()


def finite_difference_hvp(
    closure: Callable[[], Tensor], params: Sequence[Tensor], *, step: float | Tensor | None = None,
    backend: str = "auto", on_gradients: GradientHook | None = None, layout: ops.Layout | None = None,
) -> HvpFn:
    """``H v ~ (grad L(w + h v) - grad L(w - h v)) / (2 h)`` using an ordinary closure.

    ``closure`` runs forward and backward (accumulating into ``.grad``) like a torch.optim closure; each
    product costs two calls. Weights are put back from a saved copy (bit-exact) and the caller's ``.grad``
    tensors reinstated, also when the closure raises. Every call replays the random generators' states of
    this call (``RandomState``), so dropout draws the masks an ``exact_hvp`` built now would; the generators
    are left as they were.
    """
    return _difference_hvp(closure, list(params), step, backend, layout, on_gradients, RandomState.capture())


_UNKNOWN_BASE_RANDOMNESS = (
    "forward_difference_hvp: the closure draws random numbers (dropout in train mode?), and without randomness= "
    "the products cannot replay the ones base_gradient was computed with, so they difference two different "
    "functions. Pass randomness=RandomState.capture() taken right before base_gradient's closure call, run the "
    "model in eval mode, or use finite_difference_hvp")


def forward_difference_hvp(
    closure: Callable[[], Tensor], params: Sequence[Tensor], base_gradient: Vector, *,
    step: float | Tensor | None = None, backend: str = "auto", on_gradients: GradientHook | None = None,
    layout: ops.Layout | None = None, randomness: RandomState | None = None,
) -> HvpFn:
    """``H v ~ (grad L(w + h v) - grad L(w)) / h`` with ``grad L(w)`` given (``base_gradient``).

    One closure call per product, against two for central differences: SAM's first pass already computed
    ``grad L(w)`` on the batch. Truncation error O(h), so the default step is ``~ sqrt(eps)``
    (``default_fd_step(order=1)``). ``base_gradient`` must be the gradient of the same loss in the same model mode
    (and already unscaled when ``on_gradients`` unscales the closure's). Weights and ``.grad`` are put back as by
    ``finite_difference_hvp``.

    ``randomness``: the random generators' states ``base_gradient``'s closure call started from
    (``RandomState.capture()`` right before it); every closure call replays them, so dropout draws the masks of
    ``base_gradient``. None: the states of this call, with a warning when the closure draws random numbers
    (``base_gradient`` then came from other ones).
    """
    params = list(params)
    base = list(base_gradient)
    if len(base) != len(params):
        raise ValueError(f"base_gradient has {len(base)} tensors for {len(params)} parameters; pass the "
                         "gradient at the current weights, one tensor per parameter")
    return _difference_hvp(closure, params, step, backend, layout, on_gradients,
                           RandomState.capture() if randomness is None else randomness, base,
                           warn_unknown_randomness=randomness is None)


def _difference_hvp(closure, params: list[Tensor], step, backend: str, layout, on_gradients: GradientHook | None,
                    randomness: RandomState, base: Vector | None = None, *,
                    warn_unknown_randomness: bool = False) -> HvpFn:
    """Central differences when ``base`` is None, else forward differences from ``base = grad L(w)``."""
    order = 2 if base is None else 1
    draws_random_numbers = None  # known after the first closure call

    def gradients_at(offset: Vector, h: Tensor, saved: Vector) -> Vector:
        """Gradients of the closure at ``w + h offset``."""
        nonlocal draws_random_numbers
        with torch.no_grad():
            ops.axpy_(params, offset, h, backend=backend, layout=layout)
        for p in params:
            p.grad = None
        try:
            with torch.enable_grad(), randomness.replayed():
                closure()
                if draws_random_numbers is None:
                    draws_random_numbers = not randomness.is_current()
        finally:
            with torch.no_grad():
                ops.copy_(params, saved)
        # Owned copies: with DDP(gradient_as_bucket_view=True) .grad is a view into a bucket that
        # the next backward overwrites.
        grads = _zeros_for_missing([None if p.grad is None else p.grad.detach().clone() for p in params], params)
        if on_gradients is not None:
            with torch.no_grad():
                on_gradients(grads)
        return grads

    def hvp(vectors: Sequence[Vector]) -> list[Vector]:
        user_grads = [p.grad for p in params]
        saved = [p.detach().clone() for p in params]
        out = []
        try:
            for v in vectors:
                h = default_fd_step(params, v, order=order, backend=backend, layout=layout) if step is None else step
                if not isinstance(h, Tensor):
                    h = torch.full((), float(h), dtype=ops.accumulation_dtype(params[0].dtype), device=params[0].device)
                g_plus = gradients_at(v, h, saved)
                if warn_unknown_randomness and draws_random_numbers:
                    warnings.warn(_UNKNOWN_BASE_RANDOMNESS, stacklevel=2)
                other = gradients_at(v, -h, saved) if base is None else base
                with torch.no_grad():
                    ops.axpy_(g_plus, other, -1.0, backend=backend, layout=layout)
                    ops.scale_copy_(g_plus, g_plus, (1.0 / order) / h, backend=backend, layout=layout)
                out.append(g_plus)
        finally:
            for p, g in zip(params, user_grads):
                p.grad = g
        return out

    return hvp


def random_vectors(params: Sequence[Tensor], m: int = 1, generator: torch.Generator | None = None) -> list[Vector]:
    """m standard-normal vectors shaped like ``params``, drawn on the CPU in parameter order.

    So the start vector is the same on every device for a given generator state; for a DTensor parameter (FSDP2,
    tensor parallelism) every rank draws the full shape and keeps its shard (no communication), so the global
    vector is the one a single process draws.
    """
    return [[_draw_like(p, generator) for p in params] for _ in range(m)]


def _draw_like(p: Tensor, generator: torch.Generator | None) -> Tensor:
    full = torch.randn(p.shape, generator=generator, dtype=torch.float32)
    if not is_dtensor(p):
        return full.to(device=p.device, dtype=p.dtype)
    from torch.distributed.tensor import distribute_tensor

    # src_data_rank=None: every rank already holds the same full draw, so split it locally.
    return distribute_tensor(full.to(device=p.to_local().device, dtype=p.dtype), p.device_mesh, p.placements,
                             src_data_rank=None)


def orthonormalize_(vectors: Sequence[Vector], *, eps: float = 1e-12, backend: str = "auto") -> None:
    """Modified Gram-Schmidt in place: vector j is made orthogonal to 0..j-1, then unit length."""
    with torch.no_grad():
        for j, vj in enumerate(vectors):
            for i in range(j):
                c = ops.dots([vectors[i], vj], [(0, 1)], backend=backend)[0]
                ops.axpy_(vj, vectors[i], -c, backend=backend)
            norm = ops.dots([vj], [(0, 0)], backend=backend)[0].sqrt()
            ops.scale_copy_(vj, vj, 1.0 / (norm + eps), backend=backend)


@dataclass
class PowerIterationResult:
    eigenvalues: Tensor  # (m,) Rayleigh quotients with their sign, largest |lambda| first
    vectors: list[Vector]  # m orthonormal vectors
    residuals: Tensor  # (m,) ||H v - lambda v|| of the last iteration
    norms: Tensor  # (m,) ||H v|| of the last iteration (0 or non-finite: the vector is unusable)
    iterations: int  # iterations run (< iters only with tol)


def power_iteration(
    hvp: HvpFn, init: Sequence[Vector], *, iters: int = 5, tol: float | None = None, eps: float = 1e-12,
    backend: str = "auto", layout: ops.Layout | None = None,
) -> PowerIterationResult:
    """(Block) power iteration on the operator ``hvp`` from the start vectors ``init``.

    ``init`` is not modified (it is the warm start). Each iteration computes ``u_j = H v_j``, the Rayleigh quotient
    ``lambda_j = <v_j, u_j>`` and residual ``||u_j - lambda_j v_j||`` and sets ``v_j = u_j / (||u_j|| + eps)``;
    with m > 1 the vectors are then re-orthonormalised, so they span the top-m subspace (by |lambda|). With
    ``tol``, it stops early once every vector has ``|lambda_k - lambda_{k-1}| / |lambda_k| < tol`` and
    ``residual / |lambda_k| < tol``; that test reads the values on the host, so ``tol=None`` is the sync-free choice.
    """
    if iters < 1:
        raise ValueError(f"iters={iters} is invalid: power iteration needs iters >= 1")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol={tol} is invalid: use a positive tolerance or None")
    with torch.no_grad():
        vectors = [[t.detach().clone() for t in v] for v in init]
        orthonormalize_(vectors, eps=eps, backend=backend)
    if layout is None and vectors:
        layout = ops.Layout.of(vectors[0])
    previous = None
    for k in range(iters):
        products = hvp(vectors)
        with torch.no_grad():
            stats = ops.power_update_(products, vectors, eps=eps, backend=backend, layout=layout)
            if len(vectors) > 1:
                orthonormalize_(vectors, eps=eps, backend=backend)
        if tol is not None:
            lam = stats.eigenvalues.abs().clamp_min(1e-30)
            ok = stats.residuals / lam < tol
            if previous is not None:
                ok = ok & ((stats.eigenvalues - previous).abs() / lam < tol)
                if bool(ok.all()):
                    break
            previous = stats.eigenvalues
    return PowerIterationResult(stats.eigenvalues, vectors, stats.residuals, stats.norms, k + 1)
