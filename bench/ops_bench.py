"""Benchmarks of every op of the op set, and of the optimizer-side part of an X-SAM step.

Byte model (``TRAFFIC``): the bytes an ideal fused implementation must move, in passes over
the N elements of the parameter set (one pass = N * element size bytes). GB/s is the passes
read and written over the measured time, so an implementation that moves more (unfused, or a
loop) shows a lower GB/s.

- dots (g,g),(g,v): reads g, v                                              2
- weighted_sumsq ||w*g||^2: reads w, g                                      2
- perturb_: reads w, g; writes w and the saved copy                         4
- correct_restore_: reads g, v, saved; writes g and w                       5
- axpy_ y += a x: reads y, x; writes y                                      3
- scale_copy_ dst = s src: reads src; writes dst                            2
- power_update_: {u.u, v.u, v.v} reads u, v; then the residual ||u - lambda v||
  and v = u / ||u|| in one pass reading u, v and writing v                  5
- xsam_step: the optimizer's arithmetic per step of X-SAM with k = p = 5 (one power
  update per step on average): dots(g,v) + perturb_ + dots(g_adv,v) +
  correct_restore_ + power_update_                                          2+4+2+5+5 = 18

Ceiling (``CEILING``): how fast this device streams the same traffic, measured in the same
run, interleaved with the implementations: PyTorch's single-tensor stream kernels (``dot``,
``add_``, ``copy_``) on one flat buffer per array the op touches, so at the op's own
footprint and in its storage dtype, in the sequence closest to the op's reads and writes.
A write to an array the op does not read (``saved`` in perturb_, ``w`` in correct_restore_)
makes a CPU read the line first (write-allocate): those passes count twice on a CPU, on
both sides. When the stand-in moves more than the op (perturb_: no PyTorch kernel writes two
outputs, so copy_ then add_, one read of w more), its time is scaled by the ratio of the
bytes. ``fraction_of_ceiling`` = ceiling time / op time (1 = as fast as PyTorch streams).

``memory`` labels where the footprint lives: "cache" (within the last-level cache: the
GB/s are cache bandwidth, not DRAM), "partly" (within twice that), "DRAM".

Implementations, all timed in interleaved rounds (``bench.timing.time_interleaved``):
every backend ``xsam.ops.dispatch.unavailable_reason`` reports available (new backends
appear by themselves), and the two hand-written baselines of ``bench/baselines.py``
(``skilled_foreach``, ``per_param_loop``). The reference backend is a baseline too;
``best_baseline`` names the fastest of the three and ``speedup_vs_best_baseline`` is
measured against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from xsam import ops
from xsam.ops.dispatch import unavailable_reason

from . import baselines
from .models import Shape
from .timing import TimingStats, time_interleaved


@dataclass(frozen=True)
class Traffic:
    """Passes over the N elements: read, written, and written to arrays not read first (write-allocate)."""

    reads: int
    writes: int
    fresh_writes: int = 0
    arrays: int = 2  # distinct arrays of N elements the op touches: its footprint

    @property
    def passes(self) -> int:
        return self.reads + self.writes

    def physical_passes(self, write_allocate: bool) -> int:
        return self.passes + (self.fresh_writes if write_allocate else 0)

    def __add__(self, other: "Traffic") -> "Traffic":
        return Traffic(self.reads + other.reads, self.writes + other.writes, self.fresh_writes + other.fresh_writes,
                       max(self.arrays, other.arrays))


_DOTS = Traffic(2, 0, arrays=2)
_POWER = Traffic(4, 1, arrays=2)
_PERTURB = Traffic(2, 2, fresh_writes=1, arrays=3)
_CORRECT = Traffic(3, 2, fresh_writes=1, arrays=4)
TRAFFIC = {
    "dots_gg_gv": _DOTS,
    "weighted_sumsq": Traffic(2, 0, arrays=2),
    "perturb_": _PERTURB,
    "correct_restore_": _CORRECT,
    "axpy_": Traffic(2, 1, arrays=2),
    "scale_copy_": Traffic(1, 1, fresh_writes=1, arrays=2),
    "power_update_": _POWER,
    "xsam_step": Traffic(0, 0, arrays=5) + _DOTS + _PERTURB + _DOTS + _CORRECT + _POWER,
}
TENSOR_PASSES = {op: t.passes for op, t in TRAFFIC.items()}
OP_NAMES = tuple(TRAFFIC)
BACKENDS = ("reference", "triton", "native")
FOREACH, LOOP = "skilled_foreach", "per_param_loop"
BASELINES = ("reference", FOREACH, LOOP)
RHO, ALPHA, EPS, FD_STEP = 0.05, 0.2, 1e-12, 1e-3


def available_backends(device: torch.device, dtype: torch.dtype, requested: tuple[str, ...] | None = None
                       ) -> tuple[list[str], dict[str, str]]:
    """(backends to bench, {backend: why skipped}) for one device and dtype."""
    chosen, skipped = [], {}
    for name in requested or BACKENDS:
        why = unavailable_reason(name, device, dtype)
        if why is None and name == "triton" and device.type == "cpu" and requested is None:
            # Under TRITON_INTERPRET=1 the kernels run in a Python interpreter: a correctness
            # tool, seconds per call, not something to benchmark. Ask for it by name to time it anyway.
            why = "Triton on CPU runs only in the interpreter (name it in --backends to time it anyway)"
        if why is None:
            chosen.append(name)
        else:
            skipped[name] = why
    return chosen, skipped


# ----- where the data lives -----------------------------------------------------------------
def last_level_cache_bytes(device: torch.device) -> int | None:
    """The largest cache of the device (the CPU's L3, a GPU's L2), or None when unknown."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes) if sizes else None


def memory_label(footprint: int, llc: int | None) -> str:
    if llc is None:
        return "?"
    if footprint <= llc:
        return "cache"
    return "partly" if footprint < 2 * llc else "DRAM"


# ----- the tensors an op works on -------------------------------------------------------------
@dataclass
class Workspace:
    """The tensors one op works on: weights, gradients, saved weights, eigenvector, HVP result."""

    w: list[Tensor]
    g: list[Tensor]
    saved: list[Tensor]
    v: list[Tensor]
    u: list[Tensor]
    scalars: dict[str, Tensor] = field(default_factory=dict)
    layout: ops.Layout | None = None  # computed once, as the optimizer does

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.w)


def make_workspace(shapes: list[Shape], device: torch.device, dtype: torch.dtype, seed: int = 0) -> Workspace:
    """Same seed, same values: every implementation starts from identical tensors."""
    # Drawn on the device itself: filling GPT-2-sized lists on the host would take longer than timing them.
    gen = torch.Generator(device=device).manual_seed(seed)

    def vector(scale: float) -> list[Tensor]:
        return [(torch.randn(s, generator=gen, device=device) * scale).to(dtype) for s in shapes]

    w, g, v, u = vector(1.0), vector(0.1), vector(1.0), vector(1.0)
    v_norm = torch.stack([(t.float() ** 2).sum() for t in v]).sum().sqrt()
    v = [(t / v_norm.to(t.dtype)) for t in v]
    # The saved copy holds w (as after a perturbation), so an op that reads it first reads weights.
    saved = [t.clone() for t in w]
    # Scalars stay on the device as 0-d fp32 tensors, as the optimizer passes them.
    acc = ops.accumulation_dtype(dtype)
    scalars = {name: torch.full((), value, device=device, dtype=acc)
               for name, value in (("scale", 1e-3), ("a", 0.5), ("b", 0.25), ("h", FD_STEP))}
    return Workspace(w=w, g=g, saved=saved, v=v, u=u, scalars=scalars, layout=ops.Layout.of(w))


# ----- the op set, through one backend ------------------------------------------------------
def backend_op(op: str, ws: Workspace, backend: str) -> Callable[[], object]:
    s, lay = ws.scalars, ws.layout
    if op == "dots_gg_gv":
        return lambda: ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend, layout=lay)
    if op == "weighted_sumsq":
        return lambda: ops.weighted_sumsq(ws.w, ws.g, backend=backend, layout=lay)
    if op == "perturb_":
        return lambda: ops.perturb_(ws.w, ws.g, ws.saved, s["scale"], backend=backend, layout=lay)
    if op == "correct_restore_":
        # g <- 0.5 g - 0.25 v converges to -0.5 v: repeated calls stay finite and never denormal.
        return lambda: ops.correct_restore_(ws.w, ws.g, ws.saved, ws.v, s["a"], s["b"], backend=backend, layout=lay)
    if op == "axpy_":
        return lambda: ops.axpy_(ws.w, ws.v, s["h"], backend=backend, layout=lay)
    if op == "scale_copy_":
        return lambda: ops.scale_copy_(ws.saved, ws.u, s["scale"], backend=backend, layout=lay)
    if op == "power_update_":
        return lambda: ops.power_update_([ws.u], [ws.v], eps=EPS, backend=backend, layout=lay)
    if op == "xsam_step":
        return lambda: backend_xsam_step(ws, backend)
    raise ValueError(f"unknown op {op!r}")


def backend_xsam_step(ws: Workspace, backend: str) -> None:
    """The optimizer's arithmetic in one step, as XSAM issues it (same gradient for both passes)."""
    lay = ws.layout
    sums = ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend, layout=lay)
    ops.perturb_(ws.w, ws.g, ws.saved, RHO / (sums[0].sqrt() + EPS), backend=backend, layout=lay)
    sums = ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend, layout=lay)
    a = 1.0 / (sums[0].sqrt() + EPS)
    ops.correct_restore_(ws.w, ws.g, ws.saved, ws.v, a, ALPHA * (a * sums[1]).abs(), backend=backend, layout=lay)
    ops.power_update_([ws.u], [ws.v], eps=EPS, backend=backend, layout=lay)


# ----- the hand-written baselines -----------------------------------------------------------
def foreach_xsam_step(ws: Workspace) -> None:
    b = baselines
    sums = b.foreach_dots_gg_gv(ws.g, ws.v)
    b.foreach_perturb_(ws.w, ws.g, ws.saved, RHO / (sums[0].sqrt() + EPS))
    sums = b.foreach_dots_gg_gv(ws.g, ws.v)
    a = 1.0 / (sums[0].sqrt() + EPS)
    b.foreach_correct_restore_(ws.w, ws.g, ws.saved, ws.v, a, ALPHA * (a * sums[1]).abs())
    b.foreach_power_update_(ws.u, ws.v)


def loop_xsam_step(ws: Workspace, state: dict[int, Tensor]) -> None:
    b = baselines
    sums = b.loop_dots_gg_gv(ws.g, ws.v)
    b.loop_perturb_(ws.w, ws.g, state, RHO / (sums[0].sqrt() + EPS))
    sums = b.loop_dots_gg_gv(ws.g, ws.v)
    a = 1.0 / (sums[0].sqrt() + EPS)
    b.loop_correct_restore_(ws.w, ws.g, state, ws.v, a, ALPHA * (a * sums[1]).abs())
    b.loop_power_update_(ws.u, ws.v)


def foreach_op(op: str, ws: Workspace) -> Callable[[], object]:
    s, b = ws.scalars, baselines
    table = {
        "dots_gg_gv": lambda: b.foreach_dots_gg_gv(ws.g, ws.v),
        "weighted_sumsq": lambda: b.foreach_weighted_sumsq(ws.w, ws.g),
        "perturb_": lambda: b.foreach_perturb_(ws.w, ws.g, ws.saved, s["scale"]),
        "correct_restore_": lambda: b.foreach_correct_restore_(ws.w, ws.g, ws.saved, ws.v, s["a"], s["b"]),
        "axpy_": lambda: b.foreach_axpy_(ws.w, ws.v, s["h"]),
        "scale_copy_": lambda: b.foreach_scale_copy_(ws.saved, ws.u, s["scale"]),
        "power_update_": lambda: b.foreach_power_update_(ws.u, ws.v),
        "xsam_step": lambda: foreach_xsam_step(ws),
    }
    return table[op]


def loop_op(op: str, ws: Workspace) -> Callable[[], object]:
    s, b = ws.scalars, baselines
    state = {i: t for i, t in enumerate(ws.saved)}
    h = float(s["h"])  # finite-difference code passes the step as a Python float
    table = {
        "dots_gg_gv": lambda: b.loop_dots_gg_gv(ws.g, ws.v),
        "weighted_sumsq": lambda: b.loop_weighted_sumsq(ws.w, ws.g),
        "perturb_": lambda: b.loop_perturb_(ws.w, ws.g, state, s["scale"]),
        "correct_restore_": lambda: b.loop_correct_restore_(ws.w, ws.g, state, ws.v, s["a"], s["b"]),
        "axpy_": lambda: b.loop_axpy_(ws.w, ws.v, h),
        "scale_copy_": lambda: b.loop_scale_copy_(ws.saved, ws.u, s["scale"]),
        "power_update_": lambda: b.loop_power_update_(ws.u, ws.v),
        "xsam_step": lambda: loop_xsam_step(ws, state),
    }
    return table[op]


def implementation_op(impl: str, op: str, ws: Workspace) -> Callable[[], object]:
    if impl == FOREACH:
        return foreach_op(op, ws)
    if impl == LOOP:
        return loop_op(op, ws)
    return backend_op(op, ws, impl)


# ----- the ceiling --------------------------------------------------------------------------
# Stand-ins on flat buffers (array indices as in the op): ("dot", a, b) reads a and b;
# ("add_", y, x) reads y and x, writes y; ("copy_", dst, src) reads src, writes dst (write-allocate).
_STEPS = {"dot": Traffic(2, 0), "add_": Traffic(2, 1), "copy_": Traffic(1, 1, fresh_writes=1)}
_DOTS_STANDIN = [("dot", 0, 1)]
_PERTURB_STANDIN = [("copy_", 2, 0), ("add_", 0, 1)]  # arrays w, g, saved
_CORRECT_STANDIN = [("add_", 1, 3), ("copy_", 0, 2)]  # arrays w, g, saved, v
_POWER_STANDIN = [("dot", 0, 1), ("add_", 1, 0)]  # arrays u, v
CEILING = {
    "dots_gg_gv": _DOTS_STANDIN,
    "weighted_sumsq": _DOTS_STANDIN,
    "perturb_": _PERTURB_STANDIN,
    "correct_restore_": _CORRECT_STANDIN,
    "axpy_": [("add_", 0, 1)],
    "scale_copy_": [("copy_", 0, 1)],
    "power_update_": _POWER_STANDIN,
    # arrays w, g, saved, v, u
    "xsam_step": [("dot", 1, 3), ("copy_", 2, 0), ("add_", 0, 1), ("dot", 1, 3), ("add_", 1, 3), ("copy_", 0, 2),
                  ("dot", 4, 3), ("add_", 3, 4)],
}


def standin_traffic(op: str) -> Traffic:
    total = Traffic(0, 0, arrays=TRAFFIC[op].arrays)
    for kind, *_ in CEILING[op]:
        total = total + _STEPS[kind]
    return total


def ceiling_fn(op: str, flat: list[Tensor]) -> Callable[[], None]:
    steps = [(kind, flat[i], flat[j]) for kind, i, j in CEILING[op]]

    def run() -> None:
        for kind, x, y in steps:
            if kind == "dot":
                torch.dot(x, y)
            elif kind == "add_":
                x.add_(y)
            else:
                x.copy_(y)
    return run


def ceiling_scale(op: str, device: torch.device) -> float:
    """Op bytes over stand-in bytes (both with write-allocate on a CPU): 1 where the stand-in moves what the op does."""
    wa = device.type == "cpu"
    return TRAFFIC[op].physical_passes(wa) / standin_traffic(op).physical_passes(wa)


def make_flat_buffers(numel: int, device: torch.device, dtype: torch.dtype) -> list[Tensor]:
    gen = torch.Generator(device=device).manual_seed(1)
    return [(torch.randn(numel, generator=gen, device=device) * 0.01).to(dtype) for _ in range(5)]


# ----- driver -------------------------------------------------------------------------------
def _row(model: str, op: str, impl: str, device: torch.device, dtype: torch.dtype, n_tensors: int, numel: int,
         itemsize: int, llc: int | None, t: TimingStats, ceiling: TimingStats) -> dict:
    traffic = TRAFFIC[op]
    nbytes = traffic.passes * numel * itemsize
    footprint = traffic.arrays * numel * itemsize
    ceiling_s = ceiling.median * ceiling_scale(op, device)
    return {
        "section": "ops", "model": model, "op": op, "impl": impl, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "n_tensors": n_tensors, "n_elements": numel,
        "bytes_moved": nbytes, "footprint_bytes": footprint, "memory": memory_label(footprint, llc),
        "median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "min_s": t.minimum, "max_s": t.maximum,
        "spread": t.spread, "blocks": t.blocks, "calls_per_block": t.calls_per_block,
        "gb_per_s": nbytes / t.median / 1e9, "ceiling_gb_per_s": nbytes / ceiling_s / 1e9,
        "ceiling_spread": ceiling.spread, "fraction_of_ceiling": ceiling_s / t.median,
    }


def run_ops(models: dict[str, list[Shape]], device: torch.device, dtype: torch.dtype, *, timing: dict,
            ops_to_run: tuple[str, ...] = OP_NAMES, backends: tuple[str, ...] | None = None,
            log: Callable[[str], None] = print) -> list[dict]:
    chosen, skipped = available_backends(device, dtype, backends)
    for name, why in skipped.items():
        log(f"  [ops] skipping backend {name!r} on {device}/{dtype}: {why}")
    impls = chosen + [FOREACH, LOOP]
    llc = last_level_cache_bytes(device)
    rows = []
    for model, shapes in models.items():
        # One workspace per implementation, all alive: the implementations of an op run interleaved.
        spaces = {impl: make_workspace(shapes, device, dtype) for impl in impls}
        numel, itemsize = spaces[impls[0]].numel, torch.empty((), dtype=dtype).element_size()
        flat = make_flat_buffers(numel, device, dtype)
        for op in ops_to_run:
            fns = {}
            for impl in impls:
                fns[impl] = _checked(implementation_op(impl, op, spaces[impl]), f"{model}/{op}/{impl}", log)
            fns = {k: f for k, f in fns.items() if f is not None}
            fns["ceiling"] = ceiling_fn(op, flat)
            stats = time_interleaved(fns, device=device, **timing)
            for impl in fns:
                if impl != "ceiling":
                    rows.append(_row(model, op, impl, device, dtype, len(shapes), numel, itemsize, llc, stats[impl],
                                     stats["ceiling"]))
        del spaces, flat
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  [ops] {model}: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes):,} elements done")
    add_ratios(rows)
    return rows


def _checked(fn: Callable[[], object], what: str, log: Callable[[str], None]) -> Callable[[], object] | None:
    """``fn`` if one call succeeds: one broken backend must not hide the others' rows."""
    try:
        fn()
    except Exception as exc:
        log(f"  [ops] {what} failed: {type(exc).__name__}: {exc}")
        return None
    return fn


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups over the baselines measured in the same run (same model, op, device, dtype)."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["op"], r["device"], r["dtype"]), {})[r["impl"]] = r["median_s"]
    for r in rows:
        times = by_key[(r["model"], r["op"], r["device"], r["dtype"])]
        for base, col in (("reference", "speedup_vs_reference"), (FOREACH, "speedup_vs_foreach"),
                          (LOOP, "speedup_vs_loop")):
            if base in times:
                r[col] = times[base] / r["median_s"]
        measured = [b for b in BASELINES if b in times]
        if measured:
            best = min(measured, key=times.__getitem__)
            r["best_baseline"] = best
            r["speedup_vs_best_baseline"] = times[best] / r["median_s"]
