"""The op cases: the sizes, layouts and values each backend is tried on, and their inputs."""
from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from ..contract import OPS, SUPPORTED_DTYPES
from ..native_backend import CONSTANTS as NATIVE  # where the compiled kernels cut work; None without xsam._C
from .rule import RECIPES, _alias_pair, _list_names


def native_cuda_tensors_per_launch(lists: int) -> int:
    """The most tensors one CUDA launch of the compiled kernels over ``lists`` lists takes (max_tensors_per_launch
    in csrc/cuda/multi_tensor_apply.cuh, 32 KiB of kernel parameters): 1624, 1160, 902, 738 for 1 to 4. A launch
    never splits a tensor and takes any number of chunks."""
    return (32764 - 256 - 16) // (lists * 8 + 12)


# Triton in the interpreter: every program costs ~2 ms of Python, so the self-test uses tiny launches.
TRITON_INTERPRETER_LAUNCH = (64, 16)  # (chunk, block)
# The "exact" values stay exact up to this many elements per list (see the module docstring:
# the worst op, residual_sumsq with lam = 1/2, adds up to 36 units of 1/16 per element).
EXACT_MAX_ELEMENTS = (1 << 24) // 36


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
        return NATIVE.chunk(device), None
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


def threaded_shapes() -> list[tuple[int, ...]]:
    """Tensors of exactly as many elements together as the CPU kernels split across threads (read from
    xsam._C): work items cut them mid-tensor, one spans several, and small ones share items."""
    small, below_a_chunk = (5, 3, 7), NATIVE.cpu_chunk - 1
    spanning = NATIVE.cpu_parallel_elements - sum(small) - below_a_chunk
    return [(5,), (spanning,), (3,), (below_a_chunk,), (7,)]


def size_cases(backend: str, device: str) -> dict[str, list[tuple[int, ...]]]:
    """Shape lists that hit the edge cases: empty and 1-element tensors, odd shapes, each side of the
    backend's chunk (and block), many tensors (more than one launch's worth)."""
    chunk, block = boundaries(backend, device)
    cases = {"edge": [(0,), (1,), (7,), (3, 5), (2, 1, 4)]}
    # One past a chunk, and part of one with remainder 3 (mod 4) for the vectorised paths; fewer than
    # 32768 elements per list (gaps included) keep PyTorch's own CPU work single-threaded.
    around = [(chunk + 1,), (chunk // 2 - 1,)]
    if block is not None and block < chunk:
        around = [(block - 1,), (block + 1,)] + around
    cases["chunk"] = around
    if backend == "native" and device == "cpu":
        cases["threads"] = threaded_shapes()
    if backend == "triton" and device == "cpu":
        cases["many"] = [(i % 5,) for i in range(40)]  # empty ones included; few: every program is slow
    else:
        # Many tiny tensors of odd sizes, and one of exactly one chunk.
        cases["many"] = [(1 + (7 * i) % 23,) for i in range(71)] + [(chunk,)]
    if backend == "native" and device == "cuda":
        # More tensors than one CUDA launch of the native kernels takes, for every op (whatever its
        # number of lists): a tensor of several chunks closes a full launch of the 4-list ops (the
        # next launch's reduction slots start after its chunks), tiny ones cross the other limits.
        last = native_cuda_tensors_per_launch(4) - 1
        cases["launches"] = ([(1 + (7 * i) % 23,) for i in range(last)] + [(2 * chunk + 5,)]
                             + [(3,)] * (native_cuda_tensors_per_launch(1) - last))
    return cases


# (size case, layout, value kinds) of the self-test; aliased lists run on edge sizes only.
_SELFTEST_PLAN = (
    ("edge", "plain", ("random", "exact")),
    ("edge", "strided", ("random",)),  # a view the kernels cannot walk: the op layer's dense copies
    ("chunk", "offset", ("random", "exact")),
    ("threads", "offset", ("random", "exact")),
    ("many", "plain", ("random", "exact")),
    ("launches", "plain", ("random",)),
)
_QUICK_PLAN = (("edge", "plain", ("random", "exact")), ("chunk", "offset", ("random", "exact")),
               ("threads", "offset", ("exact",)))


def selftest_cases(op: str, backend: str, device: torch.device, dtype: torch.dtype, *, quick: bool = False,
                   seed: int = 0) -> list[Case]:
    """The self-test's cases of one op for one (backend, device, dtype)."""
    if op not in RECIPES:
        return []
    sizes = size_cases(backend, device.type)
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
    """The check before first use: every op once, exact values, odd storage offsets, on one list of sizes 0, 1
    and odd, each side of a chunk, a dozen small tensors, and past the CPU kernels' parallel threshold."""
    chunk, block = boundaries(backend, device.type)
    shapes = ((0,), (1,), (7,)) + tuple((1 + (7 * i) % 23,) for i in range(12))
    if backend == "native" and device.type == "cpu":
        shapes += tuple(threaded_shapes())  # items cut across tensors: these cross chunk boundaries too
    else:
        shapes += ((chunk + 1,),) + (((block + 1,),) if block is not None and block < chunk else ())
    place = ((device, dtype),) * len(shapes)
    return [Case(op, shapes, place, values="exact", layout="offset", variant=variant, sizes="check")
            for op in OPS if op in RECIPES for variant, _ in RECIPES[op].variants]


# ---------------------------------------------------------------- building the inputs of a case
#
# Every list of a case lives in one buffer per (device, dtype) group, its tensors at the case's
# offsets with gaps between them, the gaps holding a sentinel. So what must not change (lists the
# op only reads, memory next to the tensors) is checked with one comparison per buffer. Values are
# copied tensor by tensor: a scatter or gather would start a parallel region on the CPU.

_SENTINEL = 3.0
_ALIGN = 64  # elements: "plain" tensors start at multiples of it (128 bytes or more)


def _strides(shape: tuple[int, ...], step: int) -> tuple[int, ...]:
    return tuple(step * stride for stride in torch.empty(shape, device="meta").stride())


@dataclass(frozen=True)
class _Group:
    """The positions of a case on one (device, dtype), and where their elements sit in its buffers."""

    device: torch.device
    dtype: torch.dtype
    positions: tuple[int, ...]
    starts: tuple[int, ...]
    steps: tuple[int, ...]
    outside: Tensor  # of the buffer's length: the positions that belong to no tensor


class _Layout:
    """The groups of a case's tensors, by (device, dtype). Flat values run over the positions in order."""

    def __init__(self, shapes: tuple[tuple[int, ...], ...], placements: tuple[Placement, ...], layout: str):
        self.shapes, self.placements = shapes, placements
        self.numels = [math.prod(s) for s in shapes]
        by_place: dict[Placement, list[int]] = {}
        for i, place in enumerate(placements):
            by_place.setdefault(place, []).append(i)
        self.groups: list[_Group] = []
        for k, ((device, dtype), positions) in enumerate(by_place.items()):
            starts, steps, end = [], [], 0
            for i in positions:
                step = 2 if layout == "strided" and i == 1 else 1
                start = -(-(end + 1) // _ALIGN) * _ALIGN + (0 if layout == "plain" else 1 + 2 * ((i + k) % 2))
                starts.append(start)
                steps.append(step)
                end = start + step * self.numels[i]
            outside = torch.ones(end + 5, dtype=torch.bool, device="cpu")
            for i, start, step in zip(positions, starts, steps):
                outside[start:start + step * self.numels[i]:step] = False
            self.groups.append(_Group(device, dtype, tuple(positions), tuple(starts), tuple(steps), outside.to(device)))
        self.single = len(self.groups) == 1
        self.home = self.groups[0].device if self.single else torch.device("cpu")

    def position_of(self, flat_index: int) -> str:
        """Which tensor and element a flat index falls in."""
        for i, n in enumerate(self.numels):
            if flat_index < n:
                return f"tensor {i} of {len(self.shapes)} (shape {list(self.shapes[i])}), element {flat_index}"
            flat_index -= n
        return f"element {flat_index}"

    def round_to_storage(self, flat: Tensor) -> Tensor:
        """Float64 values rounded through each position's dtype."""
        if self.single:
            return flat.to(self.groups[0].dtype).to(torch.float64)
        pieces = flat.split(self.numels)
        return torch.cat([piece.to(dtype).to(torch.float64) for piece, (_, dtype) in zip(pieces, self.placements)])


_layout_of = functools.lru_cache(maxsize=32)(_Layout)  # the cases of one check share their shapes and layout


def _values(case: Case, layout: _Layout) -> tuple[dict[str, Tensor | None], dict[str, float], dict]:
    """The case's inputs: one flat float64 vector per list (rounded to the storage dtypes; aliased
    lists share one; None for an absent list or an output), its scalars and its other arguments."""
    recipe = RECIPES[case.op]
    overrides = dict(recipe.variants)[case.variant]
    spec = OPS[case.op]
    other = {**recipe.other, **{k: v for k, v in overrides.items() if k in spec.other_args}}
    absent = {k for k, v in overrides.items() if k in spec.list_args and v is None}
    scalars = dict(recipe.scalars)
    total = sum(layout.numels)
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
            values[name] = layout.round_to_storage(flat)
    if case.aliased:
        read, written = _alias_pair(case.op)
        if values[written] is None:
            values[written] = values[read]
        values[read] = values[written]
    return values, scalars, other


@dataclass
class _Inputs:
    """The tensors of one run, and the buffers that hold them (one per group, per distinct list)."""

    lists: dict[str, list[Tensor] | None]
    buffers: dict[str, list[Tensor]]


def _materialise(layout: _Layout, values: dict, outputs: tuple[str, ...], *, mode: str) -> _Inputs:
    """Fresh tensors for one run. mode "run": each group's dtype, in the case's layout; "exact":
    float64; "magnitude": float64 absolute values. Output lists start as NaN, so an element the
    op fails to write shows."""
    made: dict[int, tuple[list[Tensor], list[Tensor]]] = {}  # aliased lists share their tensors
    lists: dict[str, list[Tensor] | None] = {}
    buffers: dict[str, list[Tensor]] = {}
    for name, flat in values.items():
        if flat is None and name not in outputs:
            lists[name] = None
            continue
        if flat is not None and id(flat) in made:
            lists[name], buffers[name] = made[id(flat)]
            continue
        tensors: list[Tensor | None] = [None] * len(layout.shapes)
        pieces = None if flat is None else (flat.abs() if mode == "magnitude" else flat).split(layout.numels)
        group_buffers = []
        for g in layout.groups:
            dtype = g.dtype if mode == "run" else torch.float64
            buffer = torch.full(g.outside.shape, _SENTINEL, dtype=dtype, device=g.device)
            for i, start, step in zip(g.positions, g.starts, g.steps):
                shape = layout.shapes[i]
                tensors[i] = buffer.as_strided(shape, _strides(shape, step), start)
                if pieces is None:
                    tensors[i].fill_(math.nan)
                else:
                    tensors[i].copy_(pieces[i].view(shape))
            group_buffers.append(buffer)
        lists[name], buffers[name] = tensors, group_buffers
        if flat is not None:
            made[id(flat)] = (tensors, group_buffers)
    return _Inputs(lists, buffers)
