"""Checking a fused backend against the reference: the rule, the op cases, and the check before first use.

One implementation serves two callers:
- ``xsam selftest`` (``xsam.selftest``): every op of ``xsam.ops.contract`` on every backend,
  device and dtype, over size cases that cross each backend's own boundaries;
- ``backend="auto"`` (``xsam.ops.dispatch``): before a fused backend first runs tensors of a
  (device, dtype) in a process, ``trusted`` runs a handful of cases (``quick_cases``) and,
  on a mismatch, warns once and makes "auto" use the reference for that (device, dtype).

The rule (``compare``). A fused kernel must be at least about as accurate as the reference,
both measured against a float64 computation of the same op on the same (rounded) inputs:
``|got - exact| <= 2 |ref - exact| + roundings * eps * (magnitude + tiny)``, with ``eps`` and
``tiny`` of the storage dtype (of the accumulation dtype for reductions), ``magnitude`` the
size of the terms (the op run on absolute values) and a few ``roundings`` (sqrt(n) for sums of
n terms, whose order may differ). "exact" is the reference run in float64.

Two kinds of values (``Case.values``):
- "random": normal values, checked with the rule above;
- "exact": values in {0, +-1/2, +-1} and dyadic scalars, for which every intermediate of every
  op is representable in every supported dtype (8 significant bits for bfloat16; sums below
  2**24 units in float32). Any correct implementation, FMA or not and in any summation order,
  then returns the exact bits, so these cases allow no rounding at all: a kernel that is off
  by one ulp on one element, or skips a chunk, fails them.
On top, the contract's exact bits: ``saved`` holds the old weights bit for bit, a restore puts
``saved`` back bit for bit, lists the op only reads keep their bits, memory around views is
not written, and reductions give the same bits twice.

Cases are derived from ``contract.OPS``: an op needs only a ``Recipe`` here (its scalars,
variants and what its written lists must hold); an op without one is reported as such
(``missing_recipes``) instead of being silently untested.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from torch import Tensor

from .contract import OPS, SUPPORTED_DTYPES
from .reference import accumulation_dtype

__all__ = [
    "CaseResult",
    "CheckOutcome",
    "Comparison",
    "Case",
    "ISSUES_URL",
    "KernelCheckWarning",
    "RECIPES",
    "SKIP_ENV",
    "boundaries",
    "check_backend",
    "clear_outcomes",
    "compare",
    "launch_context",
    "mixed_cases",
    "missing_recipes",
    "outcomes",
    "quick_cases",
    "run_case",
    "selftest_cases",
    "trusted",
]

SKIP_ENV = "XSAM_SKIP_KERNEL_CHECK"
ISSUES_URL = "https://github.com/xsam-project/xsam/issues"  # placeholder until the repository is public

# Boundaries of the compiled kernels: kCpuChunk (csrc/xsam_ops.h), kCudaChunk and kMaxBlocks
# (csrc/cuda/kernels.cuh, kernels.cu: chunks per launch) and the most tensors one CUDA launch
# takes (MaxTensors, for the ops with the fewest lists). The extension does not expose them.
NATIVE_CHUNK = {"cpu": 16384, "cuda": 32768}
NATIVE_CUDA_CHUNKS_PER_LAUNCH = 320
NATIVE_CUDA_TENSORS_PER_LAUNCH = 64
# Triton in the interpreter: every program costs ~2 ms of Python, so the self-test uses tiny launches.
TRITON_INTERPRETER_LAUNCH = (64, 16)  # (chunk, block)
# The "exact" values stay exact up to this many elements per list (see the module docstring:
# the worst op, residual_sumsq with lam = 1/2, adds up to 36 units of 1/16 per element).
EXACT_MAX_ELEMENTS = (1 << 24) // 36


class KernelCheckWarning(UserWarning):
    """A fused backend failed its check before first use; "auto" uses the reference instead."""


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


# ---------------------------------------------------------------- cases

Placement = tuple[torch.device, torch.dtype]


@dataclass(frozen=True)
class Case:
    """One call of one op: everything needed to build its inputs again, bit for bit, on any backend."""

    op: str
    shapes: tuple[tuple[int, ...], ...]
    placements: tuple[Placement, ...]  # (device, dtype) of each position
    values: str = "random"  # "random" | "exact"
    layout: str = "plain"  # "plain" | "offset" (odd storage offsets) | "strided" (offsets, one non-dense position)
    variant: str = ""
    aliased: bool = False  # a read list is a written one (axpy_(y, y)); reductions: one list twice
    sizes: str = ""  # the size case's name, for reports
    seed: int = 0

    @property
    def label(self) -> str:
        parts = [self.variant, "aliased" if self.aliased else "", f"{self.values} values", f"{self.sizes} sizes",
                 self.layout if self.layout != "plain" else ""]
        return ", ".join(p for p in parts if p)


def boundaries(backend: str, device: str) -> tuple[int, int | None]:
    """(chunk, block) of a fused backend on a device type: the lengths its kernels split tensors at."""
    if backend == "native":
        return NATIVE_CHUNK[device], None
    if device == "cpu":
        return TRITON_INTERPRETER_LAUNCH
    from xsam.kernels.plans import get_launch_config

    return get_launch_config()


def launch_context(backend: str, device: torch.device):
    """The launches ``boundaries`` assumes: tiny Triton launches in the interpreter, else unchanged."""
    if backend == "triton" and device.type == "cpu":
        from xsam.kernels.plans import launch_config

        chunk, block = TRITON_INTERPRETER_LAUNCH
        return launch_config(chunk=chunk, block=block)
    return contextlib.nullcontext()


def size_cases(backend: str, device: str, *, quick: bool = False) -> dict[str, list[tuple[int, ...]]]:
    """Shape lists that hit the edge cases: empty and 1-element tensors, odd shapes, each side of the
    backend's chunk (and block), many tensors (more than one launch's worth)."""
    chunk, block = boundaries(backend, device)
    cases = {"edge": [(0,), (1,), (7,), (3, 5), (2, 1, 4)]}
    # One past a chunk, and part of one with remainder 3 (mod 4) for the vectorised paths. Fewer than
    # 32768 elements per list (with the gaps) keeps PyTorch's own CPU work single-threaded: on a
    # busy machine every parallel region costs milliseconds.
    around = [(chunk + 1,), (chunk // 2 - 1,)]
    if block is not None and block < chunk:
        around = [(block - 1,), (block + 1,)] + around
    cases["chunk"] = around
    if quick:
        return cases
    interpreted = backend == "triton" and device == "cpu"
    if interpreted:
        cases["many"] = [(i % 5,) for i in range(40)]  # empty ones included; every program costs ~2 ms
    else:
        # More tensors than one CUDA launch of the native kernels takes (for every op), and one
        # of exactly one chunk.
        cases["many"] = [(1 + (7 * i) % 23,) for i in range(NATIVE_CUDA_TENSORS_PER_LAUNCH + 7)] + [(chunk,)]
    if backend == "native" and device == "cuda":
        cases["launches"] = [(NATIVE_CUDA_CHUNKS_PER_LAUNCH * chunk + 1,), (3,)]  # more chunks than one launch takes
    return cases


# (size case, layout, value kinds) of the self-test; aliased lists run on edge sizes only.
_SELFTEST_PLAN = (
    ("edge", "plain", ("random", "exact")),
    ("edge", "strided", ("random",)),  # a view the kernels cannot walk: the op layer's dense copies
    ("chunk", "offset", ("random", "exact")),
    ("many", "plain", ("random", "exact")),
    ("launches", "plain", ("random",)),
)
_QUICK_PLAN = (("edge", "plain", ("random", "exact")), ("chunk", "offset", ("random", "exact")))


def selftest_cases(op: str, backend: str, device: torch.device, dtype: torch.dtype, *, quick: bool = False,
                   seed: int = 0) -> list[Case]:
    """The self-test's cases of one op for one (backend, device, dtype)."""
    if op not in RECIPES:
        return []
    sizes = size_cases(backend, device.type, quick=quick)
    out = []
    for name, layout, kinds in _QUICK_PLAN if quick else _SELFTEST_PLAN:
        if name not in sizes:
            continue
        shapes = tuple(sizes[name])
        small = sum(math.prod(s) for s in shapes) <= EXACT_MAX_ELEMENTS
        base = Case(op, shapes, ((device, dtype),) * len(shapes), layout=layout, sizes=name, seed=seed)
        for variant, _ in RECIPES[op].variants:
            out += [replace(base, variant=variant, values=kind) for kind in kinds if small or kind == "random"]
        if name == "edge" and layout == "plain":
            out += [replace(base, variant=RECIPES[op].variants[0][0], aliased=True, values=kind) for kind in kinds]
    return out


def mixed_cases(op: str, devices: Sequence[torch.device], *, seed: int = 0) -> list[Case]:
    """Lists mixing every dtype (and the given devices): the op layer's grouping and its partial sums."""
    if op not in RECIPES:
        return []
    shapes = ((5,), (7,), (1,), (3, 3), (0,), (11,), (2, 2), (9,))
    dtypes = SUPPORTED_DTYPES
    place = tuple((devices[i % len(devices)], dtypes[(i // len(devices)) % len(dtypes)]) for i in range(len(shapes)))
    base = Case(op, shapes, place, variant=RECIPES[op].variants[0][0], sizes="mixed", seed=seed)
    return [base, replace(base, values="exact")]


def quick_cases(backend: str, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The check before first use: every op once, exact values, each side of a chunk, odd storage offsets."""
    chunk, block = boundaries(backend, device.type)
    shapes = ((0,), (1,), (7,), (chunk + 1,)) + (((block + 1,),) if block is not None and block < chunk else ())
    place = ((device, dtype),) * len(shapes)
    return [Case(op, shapes, place, values="exact", layout="offset", variant=variant, sizes="check")
            for op in OPS if op in RECIPES for variant, _ in RECIPES[op].variants]


# ---------------------------------------------------------------- building the inputs of a case
#
# Every list of a case lives in one buffer per (device, dtype) group, its tensors at the case's
# offsets with gaps between them, the gaps holding a sentinel. So what must not change (lists the
# op only reads, memory next to the tensors) is checked with one comparison per buffer. Values are
# copied tensor by tensor: a scatter or gather would be a parallel region on the CPU, which costs
# milliseconds on a busy machine.

_SENTINEL = 3.0
_ALIGN = 64  # elements: "plain" tensors start at multiples of it (128 bytes or more)


def _strides(shape: tuple[int, ...], step: int) -> tuple[int, ...]:
    strides, acc = [], step
    for size in reversed(shape):
        strides.append(acc)
        acc *= max(size, 1)
    return tuple(reversed(strides))


@dataclass(frozen=True)
class _Group:
    """The positions of a case on one (device, dtype), and where their elements sit in its buffers."""

    device: torch.device
    dtype: torch.dtype
    positions: tuple[int, ...]
    starts: tuple[int, ...]
    steps: tuple[int, ...]
    size: int  # buffer length
    begin: int  # this group's slice of the case's flat values (in group order)
    end: int
    outside: Tensor  # buffer positions that belong to no tensor


class _Layout:
    """The groups of a case, and the order of its flat values: group by group, positions in order."""

    _cache: dict[tuple, "_Layout"] = {}  # the cases of one check share their shapes and layout

    @classmethod
    def of(cls, case: Case) -> "_Layout":
        key = (case.shapes, case.placements, case.layout)
        layout = cls._cache.get(key)
        if layout is None:
            if len(cls._cache) > 32:
                cls._cache.clear()
            layout = cls._cache[key] = cls(case)
        return layout

    def __init__(self, case: Case):
        self.shapes = case.shapes
        by_place: dict[Placement, list[int]] = {}
        for i, place in enumerate(case.placements):
            by_place.setdefault(place, []).append(i)
        numels = [math.prod(s) for s in case.shapes]
        self.groups: list[_Group] = []
        self.order: list[int] = []  # positions in flat order
        flat_at = 0
        for k, ((device, dtype), positions) in enumerate(by_place.items()):
            starts, steps, end = [], [], 0
            for i in positions:
                step = 2 if case.layout == "strided" and i == 1 else 1
                start = -(-(end + 1) // _ALIGN) * _ALIGN + (0 if case.layout == "plain" else 1 + 2 * ((i + k) % 2))
                starts.append(start)
                steps.append(step)
                end = start + step * numels[i]
            size = end + 5
            outside = torch.ones(size, dtype=torch.bool, device="cpu")
            for i, start, step in zip(positions, starts, steps):
                outside[start:start + step * numels[i]:step] = False
            count = sum(numels[i] for i in positions)
            self.groups.append(_Group(device, dtype, tuple(positions), tuple(starts), tuple(steps), size, flat_at,
                                      flat_at + count, outside.to(device)))
            self.order += positions
            flat_at += count
        self.single = len(self.groups) == 1
        self.home = self.groups[0].device if self.single else torch.device("cpu")

    def to_layout_order(self, flat: Tensor) -> Tensor:
        """Values in position order (as generated) -> group order."""
        if self.single:
            return flat
        numels = [math.prod(s) for s in self.shapes]
        offsets = [0]
        for n in numels:
            offsets.append(offsets[-1] + n)
        return torch.cat([flat[offsets[i]:offsets[i + 1]] for g in self.groups for i in g.positions])

    def position_of(self, flat_index: int) -> str:
        """Which tensor and element a flat (group-order) index falls in."""
        for i in self.order:
            n = math.prod(self.shapes[i])
            if flat_index < n:
                return (f"tensor {i} of {len(self.shapes)} (shape {list(self.shapes[i])}), element "
                        f"{flat_index}")
            flat_index -= n
        return f"element {flat_index}"

    def round_to_storage(self, flat: Tensor) -> Tensor:
        """Float64 values (group order) rounded through each group's dtype."""
        if self.single:
            return flat.to(self.groups[0].dtype).to(torch.float64)
        return torch.cat([flat[g.begin:g.end].to(g.dtype).to(torch.float64) for g in self.groups])


def _values(case: Case, layout: _Layout) -> tuple[dict[str, Tensor | None], dict[str, float], dict, set[str]]:
    """The case's inputs: one flat float64 vector per list (group order, rounded to the storage
    dtypes; aliased lists share one), its scalars, its other arguments, and the absent lists."""
    recipe = RECIPES[case.op]
    overrides = dict(recipe.variants)[case.variant]
    spec = OPS[case.op]
    other = {**recipe.other, **{k: v for k, v in overrides.items() if k in spec.other_args}}
    absent = {k for k, v in overrides.items() if k in spec.list_args and v is None}
    scalars = dict(recipe.scalars)
    total = sum(math.prod(s) for s in case.shapes)
    home = layout.home
    values: dict[str, Tensor | None] = {}
    for k, name in enumerate(_list_names(case.op)):
        if name in absent or name in recipe.outputs:
            values[name] = None
            continue
        gen = torch.Generator(device=home).manual_seed(case.seed * 7919 + k)
        if case.values == "exact":
            values[name] = torch.randint(-2, 3, (total,), generator=gen, device=home).to(torch.float64) * 0.5
        else:
            values[name] = torch.randn(total, generator=gen, device=home, dtype=torch.float64)
    if case.values == "random" and recipe.condition is not None and not case.aliased:
        recipe.condition(values, scalars)
    for name, flat in values.items():
        if flat is not None:
            values[name] = layout.round_to_storage(layout.to_layout_order(flat))
    if case.aliased:
        read, written = _alias_pair(case.op)
        if values[written] is None:
            values[written] = values[read]
        values[read] = values[written]
    return values, scalars, other, absent


@dataclass
class _Inputs:
    """The tensors of one run, and the buffers that hold them (one per group, per distinct list)."""

    lists: dict[str, list[Tensor] | None]
    buffers: dict[str, list[Tensor]]


def _materialise(layout: _Layout, values: dict, absent: set[str], outputs: tuple[str, ...], *, mode: str) -> _Inputs:
    """Fresh tensors for one run. mode "run": each group's dtype, in the case's layout; "exact":
    float64; "magnitude": float64 absolute values. Output lists start as NaN, so an element the
    op fails to write shows."""
    made: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # aliased lists share their tensors
    lists: dict[str, list[Tensor] | None] = {}
    buffers: dict[str, list[Tensor]] = {}
    for name, flat in values.items():
        if name in absent or (flat is None and name not in outputs):
            lists[name] = None
            continue
        if flat is not None and id(flat) in made:
            lists[name], buffers[name] = made[id(flat)]
            continue
        tensors: list[Tensor | None] = [None] * len(layout.shapes)
        group_buffers = []
        for g in layout.groups:
            dtype = g.dtype if mode == "run" else torch.float64
            buffer = torch.full((g.size,), _SENTINEL, dtype=dtype, device=g.device)
            for i, start, step in zip(g.positions, g.starts, g.steps):
                shape = layout.shapes[i]
                tensors[i] = buffer.as_strided(shape, _strides(shape, step), start)
            if flat is None:
                part = torch.full((g.end - g.begin,), math.nan, dtype=dtype, device=g.device)
            else:
                part = flat[g.begin:g.end].to(device=g.device, dtype=dtype)
                part = part.abs() if mode == "magnitude" else part
            at = 0
            for i in g.positions:
                n = tensors[i].numel()
                tensors[i].copy_(part[at:at + n].view(tensors[i].shape))
                at += n
            group_buffers.append(buffer)
        lists[name], buffers[name] = tensors, group_buffers
        if flat is not None:
            made[id(flat)] = (tensors, group_buffers)
    return _Inputs(lists, buffers)


def _call(op: str, lists: dict, scalars: dict, other: dict, backend: str):
    from . import run  # the op layer (which imports this module through dispatch)

    return run(op, lists, scalars, other, backend, None)


def _bits(t: Tensor) -> Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _flat(layout: _Layout, inputs: _Inputs, name: str) -> Tensor:
    """List ``name``'s values in group order, as float64 on the layout's home device."""
    tensors = inputs.lists[name]
    parts = [tensors[i].reshape(-1).to(device=layout.home, dtype=torch.float64) for g in layout.groups
             for i in g.positions]
    return torch.cat(parts) if len(parts) != 1 else parts[0]


# ---------------------------------------------------------------- running a case

@dataclass(frozen=True)
class CaseResult:
    """The outcome of one case on one backend: the worst comparison, and what failed (None if nothing)."""

    case: Case
    backend: str
    comparison: Comparison
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


def _roundoff(layout: _Layout) -> tuple:
    """(eps, tiny) of the storage dtype: floats for one group, per-element tensors for mixed lists."""
    if layout.single:
        return unit_roundoff(layout.groups[0].dtype)
    pieces = [torch.tensor(unit_roundoff(g.dtype), dtype=torch.float64, device="cpu").expand(g.end - g.begin, 2)
              for g in layout.groups]
    both = torch.cat(pieces).to(layout.home)
    return both[:, 0], both[:, 1]


def _allowed(bound: float) -> str:
    return "no difference is allowed (exact values)" if bound <= 1e-290 else f"at most {bound:.3g} is allowed"


def run_case(case: Case, backend: str, *, twice: bool = True) -> CaseResult:
    """Run ``case`` on ``backend`` and compare with a float64 run of the reference (see the module docstring).

    ``twice``: run a reduction twice and require the same bits (determinism). Anything that raises
    (the kernel, or the check on what it returned) fails the case, with the exception's first line.
    """
    try:
        return _run_case(case, backend, twice)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return CaseResult(case, backend, Comparison(math.inf, 0.0, False), f"raised {type(exc).__name__}: {first}")


def _run_case(case: Case, backend: str, twice: bool) -> CaseResult:
    spec, recipe = OPS[case.op], RECIPES[case.op]
    layout = _Layout.of(case)
    values, scalars, other, absent = _values(case, layout)
    fused = _materialise(layout, values, absent, recipe.outputs, mode="run")
    aliased_read = _alias_pair(case.op)[0] if case.aliased else None
    read_only = [n for n, lst in fused.lists.items() if lst is not None and n not in spec.written
                 and n not in recipe.outputs and n != aliased_read]
    before = {n: [b.clone() for b in bufs] for n, bufs in fused.buffers.items()}

    def failed(message: str, comparison: Comparison = Comparison(math.inf, 0.0, False)) -> CaseResult:
        return CaseResult(case, backend, comparison, message)

    got = _call(case.op, fused.lists, scalars, other, backend)
    again = _call(case.op, fused.lists, scalars, other, backend) if spec.is_reduction and twice else got
    random = case.values == "random"
    # Element-wise ops on exact values: every intermediate is representable, so the reference is
    # exact as well and need not run.
    reference = _materialise(layout, values, absent, recipe.outputs, mode="run") if random or spec.is_reduction \
        else None
    ref = _call(case.op, reference.lists, scalars, other, "reference") if reference is not None else None
    exact_in = _materialise(layout, values, absent, recipe.outputs, mode="exact")
    exact = _call(case.op, exact_in.lists, scalars, other, "reference")
    magnitude_in = None
    if random and recipe.magnitude is None:
        magnitude_in = _materialise(layout, values, absent, recipe.outputs, mode="magnitude")
        signed = {k: -abs(v) if k in recipe.subtracted else abs(v) for k, v in scalars.items()}
        magnitude = _call(case.op, magnitude_in.lists, signed, other, "reference")
    home = layout.home
    if spec.is_reduction:
        if not isinstance(got, Tensor) or (got.shape, got.dtype, got.device) != (ref.shape, ref.dtype, ref.device):
            what = (f"a {got.dtype} tensor of shape {list(got.shape)} on {got.device}" if isinstance(got, Tensor)
                    else type(got).__name__)
            return failed(f"returned {what}; the reference returns {ref.dtype}, {list(ref.shape)} on {ref.device}")
        if not torch.equal(_bits(got), _bits(again)):
            return failed("a second call on the same inputs gave other bits (reductions must be deterministic)")
        n = sum(math.prod(s) for s in case.shapes)
        if random:
            if recipe.magnitude is not None:
                flats = {name: _flat(layout, exact_in, name) for name in exact_in.buffers}
                magnitude = recipe.magnitude(flats, scalars)
            eps, tiny = max(unit_roundoff(accumulation_dtype(g.dtype)) for g in layout.groups)
            roundings = max(2.0, math.sqrt(n))
        else:
            # Exact values: the kernels' sums are exact; allow only the float64 oracle's own
            # roundings (its sums of squares go through a norm, squared back).
            (eps, tiny), magnitude, roundings = unit_roundoff(torch.float64), exact.abs(), 2.0
        comparison = compare(got.to(home), exact.to(home), eps=eps, tiny=tiny, magnitude=magnitude.to(home),
                             ref=ref.to(home), roundings=roundings)
        if not comparison.ok:
            return failed(f"result {comparison.where} differs by {comparison.error:.3g} where "
                          f"{_allowed(comparison.bound)}", comparison)
    else:
        comparison = Comparison(0.0, 0.0, True)
        eps, tiny = _roundoff(layout)
        for name in spec.written:
            if name in recipe.copies:
                source = recipe.copies[name]
                # Every list has the same layout and sentinel gaps: equal buffers, bit for bit.
                if not all(torch.equal(_bits(out), _bits(old))
                           for out, old in zip(fused.buffers[name], before[source])):
                    return failed(f"'{name}' does not hold the exact bits of the original '{source}'")
                continue
            this = compare(_flat(layout, fused, name), _flat(layout, exact_in, name), eps=eps, tiny=tiny,
                           magnitude=_flat(layout, magnitude_in, name) if random else None,
                           ref=_flat(layout, reference, name) if random else None,
                           roundings=recipe.roundings if random else 0.0)
            if not this.ok:
                return failed(f"'{name}' differs by {this.error:.3g} where {_allowed(this.bound)}, at "
                              f"{layout.position_of(this.where)}", this)
            if this.ratio >= comparison.ratio:
                comparison = this
    for name, buffers in fused.buffers.items():
        for g, buffer, old in zip(layout.groups, buffers, before[name]):
            changed = _bits(buffer) != _bits(old)
            if name in read_only and bool(changed.any()):
                return failed(f"'{name}' is only read by {case.op}, but its bits changed", comparison)
            if bool((changed & g.outside).any()):
                return failed(f"memory next to the tensors of '{name}' was written", comparison)
    return CaseResult(case, backend, comparison)


# ---------------------------------------------------------------- the check before first use (backend="auto")

@dataclass(frozen=True)
class CheckOutcome:
    """What the check before first use found for one fused backend on one (device, dtype)."""

    backend: str
    device: torch.device
    dtype: torch.dtype
    # "passed" | "failed" | "skipped" (XSAM_SKIP_KERNEL_CHECK) | "deferred" (first used in a CUDA graph capture)
    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def trusted(self) -> bool:
        return self.status != "failed"

    def describe(self) -> str:
        if self.status == "passed":
            return f"{self.backend}: checked ok ({1000 * self.seconds:.1f} ms)"
        if self.status == "failed":
            return f"reference: {self.backend} failed its check, fell back ({self.detail})"
        return f"{self.backend}: not checked ({self.detail})"


_OUTCOMES: dict[tuple[str, torch.device, torch.dtype], CheckOutcome] = {}


def outcomes() -> dict[tuple[str, torch.device, torch.dtype], CheckOutcome]:
    """The checks run so far in this process, by (backend, device, dtype)."""
    return dict(_OUTCOMES)


def clear_outcomes() -> None:
    _OUTCOMES.clear()


def skip_requested() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() not in ("", "0", "false", "no")


def trusted(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend="auto"`` may use fused ``backend`` for (device, dtype): checked once per process."""
    key = (backend, device, dtype)
    outcome = _OUTCOMES.get(key)
    if outcome is None:
        dynamo = sys.modules.get("torch._dynamo")
        if torch.compiler.is_compiling() and dynamo is not None:
            # Traced by torch.compile: the check runs tensors of its own and reads results on the
            # host, so it runs eagerly, outside the graph (a graph break, once per process).
            outcome = dynamo.disable(_check_and_record)(backend, device, dtype)
        else:
            outcome = _check_and_record(backend, device, dtype)
    return outcome.trusted


def _check_and_record(backend: str, device: torch.device, dtype: torch.dtype) -> CheckOutcome:
    if skip_requested():
        outcome = CheckOutcome(backend, device, dtype, "skipped", f"{SKIP_ENV}=1")
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        outcome = CheckOutcome(backend, device, dtype, "deferred", "first used inside a CUDA graph capture, where "
                               "nothing may wait for the GPU; run `xsam selftest` to check it")
        warnings.warn(f"xsam could not check the {backend} kernels for {dtype} on {device} before first use: "
                      f"{outcome.detail}", KernelCheckWarning, stacklevel=_caller_level())
    else:
        outcome = check_backend(backend, device, dtype)
        if outcome.status == "failed":
            warnings.warn(
                f"xsam: the {backend} kernels gave wrong results for {dtype} tensors on {device} in their check "
                f"before first use, so backend='auto' uses the reference implementation for them in this process "
                f"(slower; backend='reference' gives the same results). {outcome.detail}. Please report this, with "
                f"the output of `xsam selftest` and `xsam info`, at {ISSUES_URL}. ({SKIP_ENV}=1 skips this check.)",
                KernelCheckWarning, stacklevel=_caller_level())
    _OUTCOMES[(backend, device, dtype)] = outcome
    return outcome


def _caller_level() -> int:
    """The stack level of the first frame outside xsam and torch (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("xsam.", "torch.")):
        frame, level = frame.f_back, level + 1
    return level


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> CheckOutcome:
    """Run ``quick_cases`` on ``backend`` (never "auto": no recursion) and say whether all passed.

    The check leaves the caller's state alone: its own generators (not the global RNG), no
    autograd, no autocast; it reads its results on the host, so a CUDA sync debug mode is
    suspended meanwhile. If the check itself cannot run, the backend counts as failed.
    """
    start = time.perf_counter()
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        if sync_mode:
            torch.cuda.set_sync_debug_mode(0)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for case in quick_cases(backend, device, dtype):
                result = run_case(case, backend, twice=False)  # wrong results only: keep it short
                if not result.ok:
                    detail = f"{case.op} ({case.label}): {result.failure}"
                    return CheckOutcome(backend, device, dtype, "failed", detail, time.perf_counter() - start)
    except Exception as exc:
        detail = f"the check itself raised {type(exc).__name__}: {exc}"
        return CheckOutcome(backend, device, dtype, "failed", detail, time.perf_counter() - start)
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode(sync_mode)
    return CheckOutcome(backend, device, dtype, "passed", "", time.perf_counter() - start)
