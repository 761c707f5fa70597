"""Fused multi-tensor reductions: dot products of list pairs, the ASAM norm, the power-iteration residual.

Deterministic, without float atomics: stage 1 writes one partial per (chunk, sum), summed over a
fixed-size block in a fixed order; stage 2 sums the partials with one torch reduction whose order
depends only on their shape.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .plans import CallFacts, call_facts, check_scalars, get_launch_config, launch_guard, num_warps, plan_for
from .primitives import accumulation, list_pointers, load_block, program_chunk

__all__ = ["MAX_LISTS", "MAX_PAIRS", "dots", "residual_sumsq", "weighted_sumsq"]

Tensors = Sequence[Tensor]

# A launch reads at most this many distinct lists and produces at most this many sums; larger
# requests are split into several launches (see ``dots``).
MAX_LISTS = 4
MAX_PAIRS = 8

# What a launch sums (a constexpr selects the term at compile time).
_DOTS, _WEIGHTED, _RESIDUAL = range(3)


@triton.jit
def _term(xs, lam, A: tl.constexpr, B: tl.constexpr, KIND: tl.constexpr):
    if KIND == 1:  # weighted: (w * x)^2
        r = xs[0] * xs[1]
        r = r * r
    elif KIND == 2:  # residual: (u - lam * v)^2, element by element
        r = xs[0] - lam * xs[1]
        r = r * r
    else:
        r = xs[A] * xs[B]
    return r


@triton.jit
def _accumulate(ps, offs, mask, lam, accs, NL: tl.constexpr, PAIRS: tl.constexpr, KIND: tl.constexpr,
                ACC: tl.constexpr, MASKED: tl.constexpr):
    """``accs[k] + term k`` for every pair k (the ``(a, b)`` of ``PAIRS``)."""
    xs = ()
    for k in tl.static_range(NL):
        xs = xs + (load_block(ps[k], offs, mask, MASKED).to(ACC),)
    out = ()
    for k in tl.static_range(len(PAIRS)):
        out = out + (accs[k] + _term(xs, lam, PAIRS[k][0], PAIRS[k][1], KIND),)
    return out


@triton.jit
def _reduce_kernel(table, base, partials, lam_ptr, ntensors, first_chunk, NL: tl.constexpr, PAIRS: tl.constexpr,
                   KIND: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr, CHUNK: tl.constexpr,
                   BLOCK: tl.constexpr):
    t, start, count, row = program_chunk(table, ntensors, first_chunk, NL, CHUNK)
    ps = list_pointers(table, base, ntensors, t, NL, VEC)
    lam = 0.0
    if KIND == 2:
        lam = tl.load(lam_ptr).to(ACC)
    accs = ()
    for k in tl.static_range(len(PAIRS)):
        accs = accs + (tl.zeros([BLOCK], ACC),)
    lanes = tl.arange(0, BLOCK)
    full = count // BLOCK
    for i in range(0, full):
        accs = _accumulate(ps, start + i * BLOCK + lanes, None, lam, accs, NL, PAIRS, KIND, ACC, False)
    if full * BLOCK < count:
        accs = _accumulate(ps, start + full * BLOCK + lanes, full * BLOCK + lanes < count, lam, accs,
                           NL, PAIRS, KIND, ACC, True)
    out = partials + tl.load(row) * len(PAIRS)
    for k in tl.static_range(len(PAIRS)):
        tl.store(out + k, tl.sum(accs[k], axis=0))


def reduction_block(block: int, dtype: torch.dtype) -> int:
    """fp64 sums use half the block at the same warps: 8 fp64 sums of 8 elements a thread exhaust the registers."""
    return max(16, block // 2) if dtype == torch.float64 else block


def _reduce(facts: CallFacts, lists: list[Tensors], names: Sequence[str], pairs: Sequence[tuple[int, int]],
            kind: int, lam: Tensor | None = None) -> Tensor:
    """One stage-1 launch (per vector width) over <= MAX_LISTS lists and <= MAX_PAIRS sums, then stage 2."""
    acc_dtype, acc_tl = accumulation(facts.dtype)
    chunk, block = get_launch_config()
    npairs = len(pairs)
    with launch_guard(facts.device):
        plan = plan_for(facts, lists, names, (), chunk)
        if not plan.launches:
            return torch.zeros(npairs, dtype=acc_dtype, device=facts.device)
        partials = torch.empty((plan.nchunks, npairs), dtype=acc_dtype, device=facts.device)
        for first, count, vec in plan.launches:
            _reduce_kernel[(count,)](
                plan.table, plan.base, partials, partials if lam is None else lam, plan.ntensors, first,
                NL=len(lists), PAIRS=tuple(pairs), KIND=kind, ACC=acc_tl, VEC=vec, CHUNK=chunk,
                BLOCK=reduction_block(block, facts.dtype), num_warps=num_warps(block),
            )
    return partials.sum(dim=0)


def _batches(pairs: Sequence[tuple[int, int]]) -> list[tuple[list[int], list[tuple[int, int]], list[int]]]:
    """Split pairs into launches that each read <= MAX_LISTS lists and give <= MAX_PAIRS sums.

    Returns (lists used, pairs renumbered into those lists, positions in the output).
    Greedy in the given order, so the split (and every result bit) is fixed.
    """
    batches: list[tuple[list[int], list[tuple[int, int]], list[int]]] = []
    used: list[int] = []
    local: list[tuple[int, int]] = []
    where: list[int] = []
    for k, (a, b) in enumerate(pairs):
        need = [i for i in dict.fromkeys((a, b)) if i not in used]
        if local and (len(used) + len(need) > MAX_LISTS or len(local) == MAX_PAIRS):
            batches.append((used, local, where))
            used, local, where = [], [], []
            need = list(dict.fromkeys((a, b)))
        used.extend(need)
        local.append((used.index(a), used.index(b)))
        where.append(k)
    if local:
        batches.append((used, local, where))
    return batches


def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]]) -> Tensor:
    """``out[k] = sum_i <lists[a][i], lists[b][i]>`` for ``(a, b) = pairs[k]`` (see the contract).

    Lists that are the same storages (e.g. ``dots([g, g], ...)``) are read once.
    """
    pairs = [(int(a), int(b)) for a, b in pairs]
    names = [f"lists[{k}]" for k in range(len(lists))]
    facts = call_facts(lists, names)
    if facts is None:  # empty lists: no tensor says otherwise, so fp32 on the CPU
        return torch.zeros(len(pairs))
    if not pairs:
        return torch.zeros(0, dtype=accumulation(facts.dtype)[0], device=facts.device)
    # Fold lists holding the same storages into one (call_facts checked that their sizes agree).
    canonical: dict[tuple[int, ...], int] = {}
    alias = [canonical.setdefault(p, k) for k, p in enumerate(facts.ptrs)]
    pairs = [(alias[a], alias[b]) for a, b in pairs]
    results = [_reduce(CallFacts(facts.device, facts.dtype, facts.numels, [facts.ptrs[i] for i in used]),
                       [lists[i] for i in used], [names[i] for i in used], local, _DOTS)
               for used, local, _ in _batches(pairs)]
    # Greedy batching keeps the pairs in order, so the batch results concatenate.
    return results[0] if len(results) == 1 else torch.cat(results)


def _sum_of_squares(kind: int, lists: list[Tensors], names: Sequence[str], lam: Tensor | None = None) -> Tensor:
    facts = call_facts(lists, names)
    if facts is None:
        return torch.zeros(1)
    if lam is not None:
        check_scalars(facts.device, lam=lam)
    return _reduce(facts, lists, names, [(0, 1)], kind, lam)


def weighted_sumsq(weights: Tensors, xs: Tensors) -> Tensor:
    """``sum_i ||weights[i] * xs[i]||^2`` as a 1-element tensor."""
    return _sum_of_squares(_WEIGHTED, [weights, xs], ("weights", "xs"))


def residual_sumsq(us: Tensors, vs: Tensors, lam: Tensor) -> Tensor:
    """``sum_i ||us[i] - lam * vs[i]||^2`` element by element, as a 1-element tensor."""
    return _sum_of_squares(_RESIDUAL, [us, vs], ("us", "vs"), lam)
