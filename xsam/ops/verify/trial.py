"""Running one case of an op on a fused backend against the float64 reference, and its verdict."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..contract import OPS
from ..reference import accumulation_dtype
from .cases import Case, _Inputs, _Layout, _layout_of, _materialise, _values
from .rule import RECIPES, Comparison, _alias_pair, compare, unit_roundoff

def _bits(t: Tensor) -> Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _flat(layout: _Layout, inputs: _Inputs, name: str) -> Tensor:
    """List ``name``'s values, as float64 on the layout's home device."""
    return torch.cat([t.reshape(-1).to(device=layout.home, dtype=torch.float64) for t in inputs.lists[name]])


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
    pieces = [torch.tensor(unit_roundoff(dtype), dtype=torch.float64, device="cpu").expand(n, 2)
              for (_, dtype), n in zip(layout.placements, layout.numels)]
    both = torch.cat(pieces).to(layout.home)
    return both[:, 0], both[:, 1]


def _allowed(bound: float) -> str:
    return "no difference is allowed (exact values)" if bound <= 1e-290 else f"at most {bound:.3g} is allowed"


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_case(case: Case, backend: str, *, twice: bool = True) -> CaseResult:
    """Run ``case`` on ``backend`` and compare with a float64 run of the reference (the rule: ``xsam.ops.verify``).

    ``twice``: run a reduction twice and require the same bits (determinism). Anything that raises
    (the kernel, or the check on what it returned) fails the case, with the exception's first line.
    The backend runs on the caller's threads, the inputs and the oracle on one: a parallel region is slow.
    """
    threads = torch.get_num_threads()
    try:
        with _threads(1):
            return _run_case(case, backend, twice, threads)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        return CaseResult(case, backend, Comparison(math.inf, 0.0, False), f"raised {type(exc).__name__}: {first}")


def _run_case(case: Case, backend: str, twice: bool, threads: int) -> CaseResult:
    from ..runner import run  # late: the runner imports this package (through dispatch)

    spec, recipe = OPS[case.op], RECIPES[case.op]
    layout = _layout_of(case.shapes, case.placements, case.layout)
    values, scalars, other = _values(case, layout)

    def call(on: _Inputs, name: str = "reference", with_scalars: dict = scalars):
        return run(case.op, on.lists, with_scalars, other, name, None)

    fused = _materialise(layout, values, recipe.outputs, mode="run")
    aliased_read = _alias_pair(case.op)[0] if case.aliased else None
    read_only = [n for n, lst in fused.lists.items() if lst is not None and n not in spec.written
                 and n not in recipe.outputs and n != aliased_read]
    before = {n: [b.clone() for b in bufs] for n, bufs in fused.buffers.items()}

    def failed(message: str, comparison: Comparison = Comparison(math.inf, 0.0, False)) -> CaseResult:
        return CaseResult(case, backend, comparison, message)

    with _threads(threads):
        got = call(fused, backend)
        again = call(fused, backend) if spec.is_reduction and twice else got
    random = case.values == "random"
    # Element-wise ops on exact values: every intermediate is representable, so the reference is
    # exact as well and need not run.
    reference = _materialise(layout, values, recipe.outputs, mode="run") if random or spec.is_reduction else None
    ref = call(reference) if reference is not None else None
    exact_in = _materialise(layout, values, recipe.outputs, mode="exact")
    exact = call(exact_in)
    magnitude_in = None
    if random and recipe.magnitude is None:
        magnitude_in = _materialise(layout, values, recipe.outputs, mode="magnitude")
        magnitude = call(magnitude_in, with_scalars={k: -abs(v) if k in recipe.subtracted else abs(v)
                                                     for k, v in scalars.items()})
    home = layout.home
    if spec.is_reduction:
        if not isinstance(got, Tensor) or (got.shape, got.dtype, got.device) != (ref.shape, ref.dtype, ref.device):
            what = (f"a {got.dtype} tensor of shape {list(got.shape)} on {got.device}" if isinstance(got, Tensor)
                    else type(got).__name__)
            return failed(f"returned {what}; the reference returns {ref.dtype}, {list(ref.shape)} on {ref.device}")
        if not torch.equal(_bits(got), _bits(again)):
            return failed("a second call on the same inputs gave other bits (reductions must be deterministic)")
        if random:
            if recipe.magnitude is not None:
                flats = {name: _flat(layout, exact_in, name) for name in exact_in.buffers}
                magnitude = recipe.magnitude(flats, scalars)
            eps, tiny = max(unit_roundoff(accumulation_dtype(g.dtype)) for g in layout.groups)
            roundings = max(2.0, math.sqrt(sum(layout.numels)))
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
