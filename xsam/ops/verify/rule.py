"""The rule a fused kernel is held to (``compare``), and what each op needs besides its schema (``Recipe``).
The rule in words: ``xsam.ops.verify``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from ..contract import OPS

# ---------------------------------------------------------------- the rule

@dataclass(frozen=True)
class Comparison:
    """The worst element of a comparison: its error, the bound there, and whether all are within."""

    error: float
    bound: float
    ok: bool
    where: int = -1  # flat index of the worst element

    @property
    def ratio(self) -> float:
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else math.inf)


def compare(got: Tensor, exact: Tensor, *, eps, tiny, magnitude: Tensor | None = None, ref: Tensor | None = None,
            roundings: float = 2.0) -> Comparison:
    """``got`` against the float64 ``exact`` under the rule of the module docstring.

    ``eps`` and ``tiny`` are floats or per-element tensors (lists of mixed dtypes); with
    ``roundings=0`` nothing but the reference's own error is allowed.
    """
    got, exact = got.to(torch.float64), exact.to(torch.float64)
    if got.numel() == 0:
        return Comparison(0.0, 0.0, True)
    bound = torch.full_like(exact, 1e-300)
    if roundings and magnitude is not None:
        # Relative to the terms' size, plus the spacing of subnormals, where roundings stop shrinking.
        bound = bound + roundings * eps * (magnitude.to(torch.float64) + tiny)
    if ref is not None:
        bound = bound + 2 * (ref.to(torch.float64) - exact).abs()
    err = (got - exact).abs()
    err = torch.where(torch.isnan(err), torch.full_like(err, math.inf), err)
    worst = (err / bound).argmax()
    error, at_bound, ok = torch.stack([err[worst], bound[worst], (err <= bound).all().double()]).tolist()
    return Comparison(error, at_bound, bool(ok), int(worst))


def unit_roundoff(dtype: torch.dtype) -> tuple[float, float]:
    info = torch.finfo(dtype)
    return info.eps, info.tiny


# ---------------------------------------------------------------- recipes: what each op needs besides its schema

def _near_multiple(values: dict, scalars: dict) -> None:
    """residual_sumsq: u = lam v + a small part, so the residual is small next to ||u||, where a
    one-pass formula ||u||^2 - 2 lam <u, v> + lam^2 ||v||^2 cancels."""
    values["us"] = scalars["lam"] * values["vs"] + 1e-3 * values["us"]


def _residual_magnitude(flats: dict, scalars: dict) -> Tensor:
    # Each term u - lam v is formed in the accumulation dtype: about one rounding of |u| + |lam v|
    # per element, which the square doubles relative to |r|.
    u, v, lam = flats["us"], flats["vs"], scalars["lam"]
    return (2 * (u - lam * v).abs() * (u.abs() + abs(lam) * v.abs())).sum().reshape(1)


@dataclass(frozen=True)
class Recipe:
    """What a case of one op needs beyond its schema (``contract.OPS``).

    Scalars are dyadic, exact in every dtype, and keep the "exact" values exact.
    """

    scalars: dict[str, float] = field(default_factory=dict)
    # Named variants: overrides of the schema's other arguments, or None for an optional list.
    variants: tuple[tuple[str, dict], ...] = (("", {}),)
    # Written lists whose old contents the op ignores (filled with NaN, so an unwritten element shows).
    outputs: tuple[str, ...] = ()
    # Written list -> the list whose original bits it must hold afterwards (exact copies).
    copies: dict[str, str] = field(default_factory=dict)
    # dots: its lists, concatenated into `tensors` by the op layer, and the other arguments.
    lists: tuple[str, ...] | None = None
    other: dict = field(default_factory=dict)
    roundings: float = 2.0  # element-wise ops; reductions use max(2, sqrt(n))
    # Scalars the op subtracts (a * g - b * v): the magnitude run negates their absolute value,
    # so that it adds the terms' sizes.
    subtracted: tuple[str, ...] = ()
    # Shapes random inputs: (flat float64 values by list name, scalars) -> None, in place.
    condition: Callable[[dict, dict], None] | None = None
    # Reductions: (flat float64 inputs by list name, scalars) -> the terms' size; default: the
    # op run on absolute values.
    magnitude: Callable[[dict, dict], Tensor] | None = None


RECIPES: dict[str, Recipe] = {
    "dots": Recipe(lists=("lists[0]", "lists[1]", "lists[2]"), other={"pairs": [0, 0, 0, 1, 2, 1, 1, 2, 2, 2]}),
    "weighted_sumsq": Recipe(),
    "residual_sumsq": Recipe(scalars={"lam": 0.5}, condition=_near_multiple, magnitude=_residual_magnitude),
    "perturb_": Recipe(scalars={"scale": 0.375}, variants=(("sam", {"adaptive": False}), ("asam", {"adaptive": True})),
                       outputs=("saved",), copies={"saved": "params"}, roundings=3.0),  # w*w*g rounds thrice
    "tilted_perturb_": Recipe(scalars={"a": 0.375, "b": -0.1875}, outputs=("saved",), copies={"saved": "params"}),
    "correct_restore_": Recipe(scalars={"a": 1.75, "b": -0.3125}, variants=(("vecs", {}), ("no vecs", {"vecs": None})),
                               outputs=("params",), copies={"params": "saved"}, subtracted=("b",)),
    "axpy_": Recipe(scalars={"alpha": -0.625}),
    "scale_copy_": Recipe(scalars={"scale": 0.375}, outputs=("dsts",)),
}


def missing_recipes() -> list[str]:
    """Ops of the contract that the checks have no case for."""
    return [name for name in OPS if name not in RECIPES]


def _list_names(op: str) -> tuple[str, ...]:
    recipe = RECIPES[op]
    return recipe.lists if recipe.lists is not None else OPS[op].list_args


def _alias_pair(op: str) -> tuple[str, str]:
    """(read list, written list) of the aliased variant: ``axpy_(y, y)``; reductions read one list twice."""
    names = _list_names(op)
    written = OPS[op].written
    if not written:
        return names[1], names[0]
    recipe = RECIPES[op]
    read = [n for n in names if n not in written and n not in recipe.outputs]
    return read[0], written[0]
