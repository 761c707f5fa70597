"""The coefficients of one step from the global sums of one fused reduction (docs/algorithm.md).

Everything stays on the device: nothing here reads a value on the host.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CORRECTIONS", "Correction", "Tilt", "eigensam_tilt", "inverse_norm", "xsam_correction"]

CORRECTIONS = ("signed", "symmetric", "acute")


def inverse_norm(sq_norm: Tensor, eps: float) -> Tensor:
    """``1 / (||x|| + eps)`` from ``||x||^2``: SAM's ascent is ``e = rho * inverse_norm(||g||^2) * g``
    (ASAM: ``||w * g||^2``), and ``<x, v> * inverse_norm(||x||^2)`` is the cosine with a unit v."""
    return (sq_norm.sqrt() + eps).reciprocal()


@dataclass
class Correction:
    """X-SAM's descent direction ``g_corr = a * g_adv - alpha * beta * v`` (alpha per param group)."""

    a: Tensor  # 1 / (||g_adv|| + eps) with normalize=True, else 1
    beta: Tensor  # the beta(c) of the correction rule
    adv_grad_norm: Tensor  # ||g_adv||
    cos_gadv_v: Tensor  # <g_adv, v> / ||g_adv||


def xsam_correction(gg: Tensor, gv: Tensor, *, normalize: bool, rule: str, eps: float) -> Correction:
    """Coefficients of the correction from ``gg = ||g_adv||^2`` and ``gv = <g_adv, v>``: with ``c = <gh, v>``
    and ``gh = a * g_adv``, beta is ``|c|`` ("signed"), ``c`` ("symmetric") or ``max(c, 0)`` ("acute")."""
    norm = gg.sqrt()
    inv = (norm + eps).reciprocal()
    cos = gv * inv
    a, c = (inv, cos) if normalize else (torch.ones_like(norm), gv)
    if rule == "signed":
        beta = c.abs()  # sign(<g_adv, v>) * c, and a > 0
    elif rule == "symmetric":
        beta = c
    elif rule == "acute":
        beta = c.clamp_min(0)
    else:
        raise ValueError(f"correction={rule!r} is not supported; use one of {', '.join(map(repr, CORRECTIONS))}")
    return Correction(a=a, beta=beta, adv_grad_norm=norm, cos_gadv_v=cos)


@dataclass
class Tilt:
    """Eigen-SAM's ascent ``e = rho * (gh + alpha * s * v_perp) = a * g + b * v`` for one param group."""

    a: Tensor
    b: Tensor


def eigensam_tilt(inv_norm: Tensor, gv: Tensor, rho: float, alpha: float) -> Tilt:
    """``a`` and ``b`` (``EigenSAM``'s docstring) from ``inv_norm = 1 / (||g|| + eps)`` and ``gv = <g, v>``:
    ``s * c = |c|`` with ``c = gv * inv_norm`` and ``s = sign(gv)``."""
    c = gv * inv_norm
    s = torch.sign(gv)
    return Tilt(a=rho * (1.0 - alpha * c.abs()) * inv_norm, b=rho * alpha * s)
