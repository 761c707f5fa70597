"""Benchmarks of every op of the op set, and of the optimizer-side part of one X-SAM step.

Byte model (``TENSOR_PASSES``): the bytes an ideal fused implementation must move,
in passes over the N elements of the parameter set (one pass = N * element size
bytes). GB/s is that model divided by the measured time, so an implementation
that moves more (unfused, or the per-parameter loop) shows a lower GB/s, and the
ratio to a measured copy of the same number of bytes on the same device says how
close an op gets to the bandwidth floor.

- dots (g,g),(g,v): reads g, v                                              2
- weighted_sumsq ||w*g||^2: reads w, g                                      2
- perturb_: reads w, g; writes w and the saved copy                         4
- correct_restore_: reads g, v, saved; writes g and w                       5
- axpy_ y += a x: reads y, x; writes y                                      3
- scale_copy_ dst = s src: reads src; writes dst                            2
- power_update_: dots {u.u, v.u, v.v} reads u, v; scaling reads u writes v  4
- xsam_step: what XSAM runs outside forward/backward on a refresh step:
  dots(g,v) + perturb_ + dots(g_adv,v) + correct_restore_ + power_update_   2+4+2+5+4 = 17

Baselines measured in the same run: the ``reference`` backend, and
``per_param_loop``: a Python loop over the tensors written like the most used
SAM implementation (davda54/sam): the norm as
``torch.norm(torch.stack([p.grad.norm(p=2) for p in params]))``, the perturbation
as ``old_p = p.data.clone(); p.add_(p.grad * scale)``, the restore as
``p.data = old_p``. ``loop_*`` functions compute the same numbers as the op set
(tests/test_bench.py checks it), so the comparison is fair.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from xsam import ops
from xsam.ops.dispatch import unavailable_reason

from .models import Shape
from .timing import TimingStats, time_callable

TENSOR_PASSES = {
    "dots_gg_gv": 2,
    "weighted_sumsq": 2,
    "perturb_": 4,
    "correct_restore_": 5,
    "axpy_": 3,
    "scale_copy_": 2,
    "power_update_": 4,
    "xsam_step": 17,
}
OP_NAMES = tuple(TENSOR_PASSES)
BACKENDS = ("reference", "triton", "native")
LOOP = "per_param_loop"
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


@dataclass
class Workspace:
    """The tensors one op works on: weights, gradients, saved weights, eigenvector, HVP result."""

    w: list[Tensor]
    g: list[Tensor]
    saved: list[Tensor]
    v: list[Tensor]
    u: list[Tensor]
    scalars: dict[str, Tensor] = field(default_factory=dict)

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
    saved = [torch.empty_like(t) for t in w]
    # Scalars stay on the device as 0-d fp32 tensors, as the optimizer passes them.
    acc = ops.accumulation_dtype(dtype)
    scalars = {name: torch.full((), value, device=device, dtype=acc)
               for name, value in (("scale", 1e-3), ("a", 0.5), ("b", 0.25), ("h", FD_STEP))}
    return Workspace(w=w, g=g, saved=saved, v=v, u=u, scalars=scalars)


# ----- the op set, through one backend ------------------------------------------------------
def backend_op(op: str, ws: Workspace, backend: str) -> Callable[[], object]:
    s = ws.scalars
    if op == "dots_gg_gv":
        return lambda: ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend)
    if op == "weighted_sumsq":
        return lambda: ops.weighted_sumsq(ws.w, ws.g, backend=backend)
    if op == "perturb_":
        return lambda: ops.perturb_(ws.w, ws.g, ws.saved, s["scale"], backend=backend)
    if op == "correct_restore_":
        # g <- 0.5 g - 0.25 v converges to -0.5 v: repeated calls stay finite and never denormal.
        return lambda: ops.correct_restore_(ws.w, ws.g, ws.saved, ws.v, s["a"], s["b"], backend=backend)
    if op == "axpy_":
        return lambda: ops.axpy_(ws.w, ws.v, s["h"], backend=backend)
    if op == "scale_copy_":
        return lambda: ops.scale_copy_(ws.saved, ws.u, s["scale"], backend=backend)
    if op == "power_update_":
        return lambda: ops.power_update_([ws.u], [ws.v], eps=EPS, backend=backend)
    if op == "xsam_step":
        return lambda: backend_xsam_step(ws, backend)
    raise ValueError(f"unknown op {op!r}")


def backend_xsam_step(ws: Workspace, backend: str) -> None:
    """The optimizer's arithmetic on a refresh step, as XSAM issues it (same gradient for both passes)."""
    sums = ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend)
    ops.perturb_(ws.w, ws.g, ws.saved, RHO / (sums[0].sqrt() + EPS), backend=backend)
    sums = ops.dots([ws.g, ws.v], [(0, 0), (0, 1)], backend=backend)
    a = 1.0 / (sums[0].sqrt() + EPS)
    ops.correct_restore_(ws.w, ws.g, ws.saved, ws.v, a, ALPHA * (a * sums[1]).abs(), backend=backend)
    ops.power_update_([ws.u], [ws.v], eps=EPS, backend=backend)


# ----- the per-parameter loop baseline (davda54/sam style) ----------------------------------
def loop_dots_gg_gv(gs: list[Tensor], vs: list[Tensor]) -> Tensor:
    norm = torch.norm(torch.stack([g.norm(p=2) for g in gs]), p=2)
    gv = torch.stack([(g * v).sum() for g, v in zip(gs, vs)]).sum()
    return torch.stack([norm * norm, gv])


def loop_weighted_sumsq(ws_: list[Tensor], gs: list[Tensor]) -> Tensor:
    norm = torch.norm(torch.stack([(torch.abs(w) * g).norm(p=2) for w, g in zip(ws_, gs)]), p=2)
    return norm * norm


def loop_perturb_(params: list[Tensor], grads: list[Tensor], state: dict[int, Tensor], scale: Tensor) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        state[i] = p.data.clone()
        e_w = g * scale.to(p)
        p.add_(e_w)


def loop_correct_restore_(params: list[Tensor], grads: list[Tensor], state: dict[int, Tensor], vecs: list[Tensor],
                          a: Tensor, b: Tensor) -> None:
    for i, (p, g, v) in enumerate(zip(params, grads, vecs)):
        g.mul_(a.to(g)).sub_(v * b.to(g))
        p.data = state[i]  # davda54/sam restores by swapping the storage back, copying nothing


def loop_axpy_(ys: list[Tensor], xs: list[Tensor], alpha: float) -> None:
    for y, x in zip(ys, xs):
        y.add_(x * alpha)


def loop_scale_copy_(dsts: list[Tensor], srcs: list[Tensor], scale: Tensor) -> None:
    for d, s in zip(dsts, srcs):
        d.copy_(s * scale.to(s))


def loop_power_update_(us: list[Tensor], vs: list[Tensor]) -> Tensor:
    uu = torch.stack([(u * u).sum() for u in us]).sum()
    vu = torch.stack([(v * u).sum() for v, u in zip(vs, us)]).sum()
    vv = torch.stack([(v * v).sum() for v in vs]).sum()
    norm = uu.sqrt()
    loop_scale_copy_(vs, us, 1.0 / (norm + EPS))
    return vu / vv


def loop_xsam_step(ws: Workspace, state: dict[int, Tensor]) -> None:
    sums = loop_dots_gg_gv(ws.g, ws.v)
    loop_perturb_(ws.w, ws.g, state, RHO / (sums[0].sqrt() + EPS))
    sums = loop_dots_gg_gv(ws.g, ws.v)
    a = 1.0 / (sums[0].sqrt() + EPS)
    loop_correct_restore_(ws.w, ws.g, state, ws.v, a, ALPHA * (a * sums[1]).abs())
    loop_power_update_(ws.u, ws.v)


def loop_op(op: str, ws: Workspace) -> Callable[[], object]:
    s = ws.scalars
    state = {i: t for i, t in enumerate(ws.saved)}
    h = float(s["h"])  # finite-difference code passes the step as a Python float
    table = {
        "dots_gg_gv": lambda: loop_dots_gg_gv(ws.g, ws.v),
        "weighted_sumsq": lambda: loop_weighted_sumsq(ws.w, ws.g),
        "perturb_": lambda: loop_perturb_(ws.w, ws.g, state, s["scale"]),
        "correct_restore_": lambda: loop_correct_restore_(ws.w, ws.g, state, ws.v, s["a"], s["b"]),
        "axpy_": lambda: loop_axpy_(ws.w, ws.v, h),
        "scale_copy_": lambda: loop_scale_copy_(ws.saved, ws.u, s["scale"]),
        "power_update_": lambda: loop_power_update_(ws.u, ws.v),
        "xsam_step": lambda: loop_xsam_step(ws, state),
    }
    return table[op]


# ----- the copy ceiling ---------------------------------------------------------------------
class CopyCeiling:
    """Time of one ``copy_`` moving a given number of bytes (half read, half written), per device."""

    def __init__(self, device: torch.device, timing: dict):
        self.device = device
        self.timing = timing
        self._cache: dict[int, TimingStats] = {}

    def stats(self, nbytes: int) -> TimingStats:
        if nbytes not in self._cache:
            half = max(1, nbytes // 2)
            src = torch.ones(half, dtype=torch.uint8, device=self.device)
            dst = torch.empty_like(src)
            self._cache[nbytes] = time_callable(lambda: dst.copy_(src), device=self.device, **self.timing)
            del src, dst
        return self._cache[nbytes]


# ----- driver -------------------------------------------------------------------------------
def _row(model: str, op: str, impl: str, device: torch.device, dtype: torch.dtype, n_tensors: int, numel: int,
         nbytes: int, t: TimingStats, copy: TimingStats) -> dict:
    return {
        "section": "ops", "model": model, "op": op, "impl": impl, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "n_tensors": n_tensors, "n_elements": numel,
        "bytes_moved": nbytes, "median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "min_s": t.minimum,
        "max_s": t.maximum, "blocks": t.blocks, "calls_per_block": t.calls_per_block,
        "gb_per_s": nbytes / t.median / 1e9, "copy_gb_per_s": nbytes / copy.median / 1e9,
        "fraction_of_copy_bw": copy.median / t.median,
    }


def run_ops(models: dict[str, list[Shape]], device: torch.device, dtype: torch.dtype, *, timing: dict,
            ops_to_run: tuple[str, ...] = OP_NAMES, backends: tuple[str, ...] | None = None,
            log: Callable[[str], None] = print) -> list[dict]:
    chosen, skipped = available_backends(device, dtype, backends)
    for name, why in skipped.items():
        log(f"  [ops] skipping backend {name!r} on {device}/{dtype}: {why}")
    impls = chosen + [LOOP]
    copy = CopyCeiling(device, timing)
    rows = []
    for model, shapes in models.items():
        for impl in impls:
            ws = make_workspace(shapes, device, dtype)
            numel, itemsize = ws.numel, ws.w[0].element_size()
            for op in ops_to_run:
                fn = loop_op(op, ws) if impl == LOOP else backend_op(op, ws, impl)
                try:
                    t = time_callable(fn, device=device, **timing)
                except Exception as exc:  # one broken backend must not hide the others' rows
                    log(f"  [ops] {model}/{op}/{impl} failed: {type(exc).__name__}: {exc}")
                    continue
                nbytes = TENSOR_PASSES[op] * numel * itemsize
                rows.append(_row(model, op, impl, device, dtype, len(shapes), numel, nbytes, t,
                                 copy.stats(nbytes)))
            del ws
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"  [ops] {model}: {len(shapes)} tensors, {sum(math.prod(s) for s in shapes):,} elements done")
    add_ratios(rows)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """Speed-ups over the two baselines measured in the same run (same model, op, device, dtype)."""
    by_key: dict[tuple, dict[str, float]] = {}
    for r in rows:
        by_key.setdefault((r["model"], r["op"], r["device"], r["dtype"]), {})[r["impl"]] = r["median_s"]
    for r in rows:
        times = by_key[(r["model"], r["op"], r["device"], r["dtype"])]
        for base, col in (("reference", "speedup_vs_reference"), (LOOP, "speedup_vs_loop")):
            if base in times:
                r[col] = times[base] / r["median_s"]
