"""The experiment's arms (methods), by name, and the optimizers they build.

Names: ``sgd``, ``sam``, ``asam``; ``xsam-alpha0`` (the normalised control, X-SAM with alpha 0);
``xsam-<rule>-<alpha>``; ``xsam-scaled-<rule>-<alpha>`` (``ScaledXSAM``, which separates the
correction from the normalisation); ``eigensam-<alpha>``; ``layerwise-<rule>-<alpha>``
(``LayerwiseXSAM``; alpha 0 is its per-layer normalised control).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .. import ops
from ..optim import SAM, XSAM, EigenSAM
from ..optim.functional import CORRECTIONS
from .layerwise import LayerwiseXSAM

__all__ = ["DEFAULT_ARMS", "Arm", "ScaledXSAM", "make_optimizer", "parse_arm", "seed_with_start_sign",
           "take_step"]

DEFAULT_ARMS = (
    "sgd", "sam", "xsam-alpha0",
    *(f"xsam-{rule}-{alpha}" for rule in CORRECTIONS for alpha in ("0.2", "0.5", "1.0")),
    "xsam-scaled-signed-1.0",
    *(f"eigensam-{alpha}" for alpha in ("0.1", "0.2", "0.5")),
    "layerwise-signed-0", "layerwise-signed-0.2",
)
_PATTERN = re.compile(r"^(?:(sgd|sam|asam|xsam-alpha0)"
                      r"|(xsam-scaled|xsam|layerwise)-(signed|symmetric|acute)-([0-9.]+)|eigensam-([0-9.]+))$")


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # sgd | sam | asam | xsam | eigensam | layerwise
    alpha: float = 0.0
    rule: str = "signed"
    scaled: bool = False

    @property
    def uses_eigenvector(self) -> bool:
        return self.kind in ("xsam", "eigensam", "layerwise")

    @property
    def has_signed_v(self) -> bool:
        """One global v whose start orientation can be chosen (the cubic task's v and -v runs)."""
        return self.kind in ("xsam", "eigensam")


def parse_arm(name: str) -> Arm:
    m = _PATTERN.match(name)
    if m is None:
        raise ValueError(f"arm {name!r} is not known; use sgd, sam, asam, xsam-alpha0, xsam-<rule>-<alpha>, "
                         "xsam-scaled-<rule>-<alpha>, layerwise-<rule>-<alpha> (rule: signed, symmetric, acute) "
                         "or eigensam-<alpha>")
    plain, family, rule, alpha, eig_alpha = m.groups()
    if plain == "xsam-alpha0":
        return Arm(name, "xsam", 0.0)
    if plain:
        return Arm(name, plain)
    value = float(alpha if rule else eig_alpha)
    if rule and not 0.0 <= value <= 2.0:
        raise ValueError(f"arm {name!r}: X-SAM's alpha must lie in [0, 2]")
    if family == "layerwise":
        return Arm(name, "layerwise", value, rule)
    if rule:
        return Arm(name, "xsam", value, rule, family == "xsam-scaled")
    return Arm(name, "eigensam", value)


class ScaledXSAM(XSAM):
    """X-SAM whose corrected direction is rescaled to ``||g_adv||`` (SAM's scale; experiment arm only).

    ``g = g_corr * ||g_adv|| / ||g_corr||``, so it differs from SAM's ``g_adv`` only by the
    correction's change of direction. One more fused reduction and one scaling pass per step.
    """

    def _descent(self, txn, active, grads: list[Tensor]) -> None:
        super()._descent(txn, active, grads)  # grads = g_corr, weights restored
        norm = ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0].sqrt()
        scale = txn.diagnostics["adv_grad_norm"] / (norm + self.eps)
        ops.scale_copy_(grads, grads, scale, backend=self.backend, layout=active.layout)


def make_optimizer(arm: Arm, model: nn.Module, s, seed: int):
    """The arm's optimizer over ``model`` with the settings ``s`` (``xsam.experiment.Settings``)."""
    base = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    params = list(model.parameters())
    if arm.kind == "sgd":
        return torch.optim.SGD(params, **base)
    if arm.kind in ("sam", "asam"):
        adaptive = arm.kind == "asam"
        return SAM(params, torch.optim.SGD, rho=s.asam_rho if adaptive else s.rho, adaptive=adaptive, model=model,
                   backend=s.backend, **base)
    if arm.kind == "layerwise":
        return LayerwiseXSAM(model, rho=s.rho, alpha=arm.alpha, rule=arm.rule, eig_interval=s.eig_interval,
                             power_iters=s.power_iters, seed=seed, **base)
    eig = dict(eig_interval=s.eig_interval, power_iters=s.power_iters, hvp="exact", model=model, seed=seed,
               backend=s.backend)
    if arm.kind == "eigensam":
        return EigenSAM(params, torch.optim.SGD, rho=s.rho, alpha=arm.alpha, **eig, **base)
    cls = ScaledXSAM if arm.scaled else XSAM
    return cls(params, torch.optim.SGD, rho=s.rho, alpha=arm.alpha, correction=arm.rule, **eig, **base)


def take_step(arm: Arm, opt, closure, loss_fn) -> None:
    """One training step: SGD evaluates the closure once; the others run their own step protocol."""
    if arm.kind == "sgd":
        opt.zero_grad(set_to_none=True)
        closure()
        opt.step()
    elif arm.uses_eigenvector:
        opt.step(closure, loss_fn=loss_fn)
    else:
        opt.step(closure)


def seed_with_start_sign(params: list[Tensor], direction: list[Tensor], sign: int, seed: int) -> int:
    """An optimizer seed whose first start vector has ``sign`` on ``direction`` (tries seed*64 + k)."""
    from ..hessian import random_vectors

    for k in range(64):
        candidate = seed * 64 + k
        start = random_vectors(params, 1, torch.Generator().manual_seed(candidate))[0]
        dot = sum(float((s.double() * d.double()).sum()) for s, d in zip(start, direction))
        if dot * sign > 0:
            return candidate
    raise RuntimeError("no start vector with the wanted sign in 64 draws")  # pragma: no cover - p = 2**-64
