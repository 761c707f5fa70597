"""Evidence tools: record what X-SAM does during training (``DiagnosticsRecorder``), and measure sharpness
independently of any optimizer, so that SGD, SAM and X-SAM runs share one yardstick (``top_eigenvalue``)."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .hessian import HvpFn, exact_hvp, power_iteration, random_vectors
from .optim import eval_mode as model_eval_mode

__all__ = ["DiagnosticsRecorder", "EigenEstimate", "LanczosResult", "RECORDED_KEYS", "cosine", "lanczos",
           "top_eigenvalue"]

LANCZOS_TARGETS = ("magnitude", "algebraic")
TOP_EIGENVALUE_METHODS = ("power", "lanczos")

# Scalars the optimizer's hook may hand over, in the column order of records() and to_csv().
RECORDED_KEYS = ("eigenvalue", "eigen_residual", "grad_norm", "adv_grad_norm", "cos_g_v", "cos_gadv_v",
                 "correction")


class DiagnosticsRecorder:
    """Keep the per-step diagnostics of a SAM/XSAM optimizer on the device until asked for.

    ``DiagnosticsRecorder(opt)`` starts recording; ``records()`` returns one dict per completed step (Python
    numbers; keys the optimizer did not report, e.g. ``cos_g_v`` for SAM or before the first eigenvector, are NaN);
    ``refreshes()`` only the steps that refreshed the eigenvector, whose ``eigenvalue``/``eigen_residual`` are the
    fresh ones (on other steps, those of the v in use). ``remove()`` (or leaving a ``with`` block) stops it.
    """

    def __init__(self, optimizer, keys: Sequence[str] = RECORDED_KEYS):
        if not hasattr(optimizer, "register_diagnostics_hook"):
            raise ValueError(f"optimizer={type(optimizer).__name__} has no register_diagnostics_hook(); "
                             "pass an xsam.SAM or xsam.XSAM optimizer")
        unknown = [k for k in keys if k not in RECORDED_KEYS]
        if unknown:
            raise ValueError(f"keys={list(keys)!r} has unknown names {unknown}; choose from {list(RECORDED_KEYS)}")
        self.keys = tuple(keys)
        self._rows: list[tuple[int, bool, Tensor]] = []  # (step, refreshed, (len(keys),) float32 device tensor)
        self._handle = optimizer.register_diagnostics_hook(self._on_step)

    def _on_step(self, optimizer, record: dict) -> None:
        device = next((record[k].device for k in self.keys if isinstance(record.get(k), Tensor)), None)
        if device is None:
            return
        # Missing keys become NaN; stacking copies the values, so later in-place reuse of the
        # optimizer's buffers cannot change what was recorded, and nothing waits for the device.
        row = []
        for k in self.keys:
            v = record.get(k)
            if isinstance(v, Tensor):
                row.append(v.detach().reshape(()).to(device=device, dtype=torch.float32))
            else:
                row.append(torch.full((), math.nan if v is None else float(v), dtype=torch.float32, device=device))
        self._rows.append((int(record["step"]), bool(record["refreshed"]), torch.stack(row)))

    def __len__(self) -> int:
        return len(self._rows)

    def remove(self) -> None:
        """Stop recording (what was recorded stays readable)."""
        self._handle.remove()

    def __enter__(self) -> "DiagnosticsRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def clear(self) -> None:
        self._rows.clear()

    def records(self) -> list[dict]:
        """Every recorded step as a dict of Python numbers (this is where the host waits, once)."""
        if not self._rows:
            return []
        table = torch.stack([values.cpu() for _, _, values in self._rows]).tolist()
        return [dict(step=step, refreshed=refreshed, **dict(zip(self.keys, row)))
                for (step, refreshed, _), row in zip(self._rows, table)]

    def refreshes(self) -> list[dict]:
        """The steps that refreshed the eigenvector: one record per power iteration run."""
        return [r for r in self.records() if r["refreshed"]]

    def to_csv(self, path, extra: dict | None = None) -> None:
        """Write ``records()`` to ``path`` (with constant ``extra`` columns, e.g. the run's name)."""
        extra = dict(extra or {})
        fields = [*extra, "step", "refreshed", *self.keys]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            for r in self.records():
                writer.writerow({**extra, **r})


@dataclass
class EigenEstimate:
    eigenvalue: float  # Rayleigh quotient of the top-|lambda| eigenvector, with its sign
    residual: float  # ||H v - lambda v|| (relative: residual / |eigenvalue|)
    iterations: int  # Hessian-vector products spent (power iterations or Lanczos steps)
    converged: bool  # both relative criteria below tol before max_iters
    vector: list[Tensor]  # unit eigenvector aligned with the parameters (a warm start for the next call)
    grad_cos: float  # cos(grad L, v) on the same batch; its sign is arbitrary (v's sign is)

    @property
    def relative_residual(self) -> float:
        return self.residual / max(abs(self.eigenvalue), 1e-30)

    @property
    def angle_degrees(self) -> float:
        """Angle between the gradient and the line of v, in [0, 90] (independent of v's sign)."""
        return math.degrees(math.acos(min(1.0, abs(self.grad_cos))))


def cosine(a: Sequence[Tensor], b: Sequence[Tensor]) -> float:
    """cos of the angle between two parameter-shaped vectors (flattened, in float64)."""
    dot = sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b))
    na = math.sqrt(sum(float((x.double() ** 2).sum()) for x in a))
    nb = math.sqrt(sum(float((y.double() ** 2).sum()) for y in b))
    return dot / max(na * nb, 1e-300)


@dataclass
class LanczosResult:
    eigenvalue: float  # the Ritz value picked by ``which``, with its sign
    vector: list[Tensor]  # its unit Ritz vector, aligned with ``init``
    residual: float  # ||H v - lambda v||, as the Lanczos recurrence gives it (beta_k |s_k|)
    products: int  # operator applications
    converged: bool  # both relative criteria below tol (or an invariant subspace was found)


def lanczos(hvp: HvpFn, init: Sequence[Tensor], *, max_iters: int = 100, tol: float = 1e-3,
            which: str = "magnitude") -> LanczosResult:
    """Largest-magnitude (``which="magnitude"``) or largest-algebraic (``"algebraic"``) eigenpair of ``hvp``.

    Lanczos from ``init`` (not modified) with full reorthogonalisation, one product per step, until the picked
    Ritz value changes by less than ``tol`` relative and its residual over its magnitude is below ``tol`` (power
    iteration's criteria), or ``max_iters`` products. The Krylov basis is kept (``max_iters`` parameter-sized
    vectors at most); every step solves the tridiagonal problem in float64 on the host.
    """
    if which not in LANCZOS_TARGETS:
        raise ValueError(f"which={which!r} is invalid: use one of {list(LANCZOS_TARGETS)}")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 2:
        raise ValueError(f"max_iters={max_iters!r} is invalid: pass an integer >= 2")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol={tol!r} is invalid: pass a positive relative tolerance such as 1e-3")
    like = [t.detach() for t in init]
    sizes = [t.numel() for t in like]

    def unflatten(q: Tensor) -> list[Tensor]:
        return [piece.view_as(t) for piece, t in zip(q.split(sizes), like)]

    q = torch.cat([t.reshape(-1) for t in like])
    norm = q.norm()
    if not (torch.isfinite(norm) and norm > 0):
        raise ValueError("init is zero or not finite: pass a nonzero start vector")
    basis = [q / norm]
    alphas: list[float] = []
    betas: list[float] = []
    previous = math.nan
    theta, ritz, residual, converged = math.nan, None, math.inf, False
    with torch.no_grad():
        for _ in range(max_iters):
            (product,) = hvp([unflatten(basis[-1])])
            w = torch.cat([t.reshape(-1) for t in product]).to(q.dtype)
            alphas.append(float(basis[-1] @ w))
            stacked = torch.stack(basis)
            for _ in range(2):  # "twice is enough": Gram-Schmidt against the whole basis, repeated
                w -= stacked.T @ (stacked @ w)
            beta = float(w.norm())
            off = torch.tensor(betas, dtype=torch.float64)
            T = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
            values, vectors = torch.linalg.eigh(T)
            pick = int(values.abs().argmax() if which == "magnitude" else values.argmax())
            theta, ritz = float(values[pick]), vectors[:, pick]
            residual = beta * abs(float(ritz[-1]))
            scale = max(abs(theta), 1e-30)
            # The Krylov space is invariant (exhausted): the Ritz values are eigenvalues.
            invariant = len(alphas) == q.numel() or beta <= 100 * torch.finfo(q.dtype).eps * float(
                values.abs().max())
            if invariant or (residual / scale < tol and abs(theta - previous) / scale < tol):
                converged = True
                break
            previous = theta
            betas.append(beta)
            basis.append(w / beta)
        k = len(alphas)
        vector = torch.stack(basis[:k]).T @ ritz.to(q.dtype)
        vector /= vector.norm()
    return LanczosResult(eigenvalue=theta, vector=[t.clone() for t in unflatten(vector)], residual=residual,
                         products=k, converged=converged)


def top_eigenvalue(model: nn.Module, loss_fn: Callable[[], Tensor], *, tol: float = 1e-3, max_iters: int = 200,
                   init: Sequence[Tensor] | None = None, seed: int = 0, eval_mode: bool = True,
                   params: Sequence[Tensor] | None = None, backend: str = "reference", method: str = "power",
                   which: str = "magnitude") -> EigenEstimate:
    """Top-|lambda| eigenpair of the Hessian of ``loss_fn()`` at ``model``'s current weights.

    ``loss_fn`` runs the forward pass on a fixed batch and returns the scalar loss (no backward). Power iteration
    (``method="power"``) or Lanczos (``"lanczos"``: far fewer products where the top eigenvalues are close) with
    exact HVPs runs until the eigenvalue changes by less than ``tol`` relative and ``||Hv - lambda v|| / |lambda|``
    is below ``tol``, or ``max_iters`` products. ``which="algebraic"`` (Lanczos only): the largest eigenvalue
    instead of the largest in magnitude. With ``eval_mode`` (default) the model is in eval mode meanwhile
    (BatchNorm uses running statistics: the loss is a fixed function of the weights and no statistic changes);
    the training flags are put back afterwards. ``init`` (e.g. the previous ``vector``) warm-starts the iteration;
    otherwise a standard-normal vector from ``seed``. Weights and ``.grad`` are not touched. ``backend`` defaults
    to the reference op set: a measurement should not share the fast kernels it may be used to check.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__} is invalid: pass an nn.Module")
    if not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol={tol!r} is invalid: pass a positive relative tolerance such as 1e-3")
    if not isinstance(max_iters, int) or isinstance(max_iters, bool) or max_iters < 2:
        raise ValueError(f"max_iters={max_iters!r} is invalid: pass an integer >= 2 (the stopping test "
                         "compares two successive iterations)")
    if method not in TOP_EIGENVALUE_METHODS:
        raise ValueError(f"method={method!r} is invalid: use one of {list(TOP_EIGENVALUE_METHODS)}")
    if which not in LANCZOS_TARGETS or (which != "magnitude" and method != "lanczos"):
        raise ValueError(f"which={which!r} is invalid: 'magnitude', or 'algebraic' with method='lanczos' "
                         "(power iteration finds the largest magnitude only)")
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    if not params:
        raise ValueError("model has no parameter with requires_grad=True")
    if init is None:
        init = random_vectors(params, 1, torch.Generator().manual_seed(seed))[0]
    elif len(init) != len(params) or any(t.shape != p.shape for t, p in zip(init, params)):
        raise ValueError("init must be a list of tensors shaped like the model's trainable parameters "
                         "(e.g. the .vector of an earlier top_eigenvalue call on the same model)")
    with model_eval_mode(model, eval_mode):
        hvp, _ = exact_hvp(loss_fn, params)
        if method == "lanczos":
            found = lanczos(hvp, list(init), max_iters=max_iters, tol=tol, which=which)
            vector, eigenvalue, residual = found.vector, found.eigenvalue, found.residual
            iterations, converged = found.products, found.converged
        else:
            result = power_iteration(hvp, [list(init)], iters=max_iters, tol=tol, backend=backend)
            vector, iterations = result.vectors[0], result.iterations
            eigenvalue, residual = float(result.eigenvalues[0]), float(result.residuals[0])
            converged = iterations < max_iters or residual / max(abs(eigenvalue), 1e-30) < tol
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    return EigenEstimate(eigenvalue=eigenvalue, residual=residual, iterations=iterations,
                         converged=converged, vector=vector, grad_cos=cosine(grads, vector))
