"""Fused multi-tensor Triton kernels for the xsam op set.

One launch covers a whole list of tensors. The host builds, once per set of
storages, a "plan": an int64 device table holding, for every list, the base
address of each tensor, then the element counts, then a chunk map (tensor
index, first element) with one entry per program. Programs load their
tensor's addresses from the table and cast them to typed pointers, so the
number of tensors never changes the kernel and never costs extra launches.

Contract (the adapter in ``xsam.ops.triton_backend`` guarantees it): every
tensor is contiguous, all tensors of one call share one device and one dtype,
and the lists are aligned (same length, same element counts position by
position). Scalars are 0-d tensors on the device, read inside the kernels, so
nothing here waits for the device.

Reductions are deterministic: stage 1 writes one partial per (chunk, pair),
summed over a fixed-size block in a fixed order; stage 2 sums the partial
table along its first axis with one torch reduction whose order depends only
on the table's shape. No float atomics.
"""
from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from operator import attrgetter
from typing import Iterator, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "INTERPRETING",
    "MAX_LISTS",
    "MAX_PAIRS",
    "MixedDtypeError",
    "SUPPORTED_DTYPES",
    "axpy_",
    "clear_plan_cache",
    "correct_restore_",
    "dots",
    "get_launch_config",
    "launch_config",
    "perturb_",
    "plan_cache_info",
    "scale_copy_",
    "weighted_sumsq",
]

# A reduction launch reads at most this many distinct lists and produces at most
# this many sums; larger requests are split into several launches (see ``dots``).
MAX_LISTS = 4
MAX_PAIRS = 8

# Element-wise pass kinds (a constexpr selects the body at compile time).
_PERTURB, _PERTURB_ADAPTIVE, _CORRECT, _AXPY, _SCALE_COPY = range(5)

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
SUPPORTED_DTYPES = tuple(_TL_DTYPES)


@triton.jit
def _pointer(meta, base, row, ntensors, t, VEC: tl.constexpr):
    # Tensors are addressed as base + element offset, where base is the table itself
    # viewed in the storage dtype. Unlike a cast from an integer, this keeps the
    # compiler's alignment facts, so a promise that every offset is a multiple of
    # VEC elements (16 bytes, checked on the host) turns into 128-bit accesses.
    off = tl.load(meta + row * ntensors + t)
    if VEC > 1:
        off = tl.multiple_of(off, VEC)
    return base + off


@triton.jit
def _pick(x0, x1, x2, x3, I: tl.constexpr):
    if I == 0:
        r = x0
    elif I == 1:
        r = x1
    elif I == 2:
        r = x2
    else:
        r = x3
    return r


@triton.jit
def _round(x, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    # The interpreter truncates fp32 -> bf16; compiled Triton rounds to nearest
    # even. MANUAL_BF16 (interpreter only) rounds by hand so that CPU tests see
    # the same rounding as a GPU.
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        r = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(DTYPE)
    return r


@triton.jit
def _term(x0, x1, x2, x3, A: tl.constexpr, B: tl.constexpr, WEIGHTED: tl.constexpr):
    if WEIGHTED:
        r = x0 * x1
        r = r * r
    else:
        r = _pick(x0, x1, x2, x3, A) * _pick(x0, x1, x2, x3, B)
    return r


@triton.jit
def _load(p, offs, mask, MASKED: tl.constexpr):
    # Full blocks load without a mask: a mask against an unknown bound would stop
    # the compiler from vectorising.
    if MASKED:
        x = tl.load(p + offs, mask=mask, other=0.0)
    else:
        x = tl.load(p + offs)
    return x


@triton.jit
def _store(p, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + offs, x, mask=mask)
    else:
        tl.store(p + offs, x)


@triton.jit
def _chunk(meta, ntensors, NL: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, first element, elements in this chunk) of this program."""
    pid = tl.program_id(0)
    t = tl.load(meta + (NL + 1) * ntensors + 2 * pid)
    start = tl.multiple_of(tl.load(meta + (NL + 1) * ntensors + 2 * pid + 1), CHUNK)  # chunks start at k*CHUNK
    count = (tl.minimum(start + CHUNK, tl.load(meta + NL * ntensors + t)) - start).to(tl.int32)
    return t, start, count


@triton.jit
def _dots_accumulate(p0, p1, p2, p3, offs, mask,
                     acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
                     NL: tl.constexpr, NP: tl.constexpr,
                     A0: tl.constexpr, B0: tl.constexpr, A1: tl.constexpr, B1: tl.constexpr,
                     A2: tl.constexpr, B2: tl.constexpr, A3: tl.constexpr, B3: tl.constexpr,
                     A4: tl.constexpr, B4: tl.constexpr, A5: tl.constexpr, B5: tl.constexpr,
                     A6: tl.constexpr, B6: tl.constexpr, A7: tl.constexpr, B7: tl.constexpr,
                     WEIGHTED: tl.constexpr, ACC: tl.constexpr, MASKED: tl.constexpr):
    x0 = _load(p0, offs, mask, MASKED).to(ACC)
    x1 = x0
    x2 = x0
    x3 = x0
    if NL > 1:
        x1 = _load(p1, offs, mask, MASKED).to(ACC)
    if NL > 2:
        x2 = _load(p2, offs, mask, MASKED).to(ACC)
    if NL > 3:
        x3 = _load(p3, offs, mask, MASKED).to(ACC)
    acc0 += _term(x0, x1, x2, x3, A0, B0, WEIGHTED)
    if NP > 1:
        acc1 += _term(x0, x1, x2, x3, A1, B1, WEIGHTED)
    if NP > 2:
        acc2 += _term(x0, x1, x2, x3, A2, B2, WEIGHTED)
    if NP > 3:
        acc3 += _term(x0, x1, x2, x3, A3, B3, WEIGHTED)
    if NP > 4:
        acc4 += _term(x0, x1, x2, x3, A4, B4, WEIGHTED)
    if NP > 5:
        acc5 += _term(x0, x1, x2, x3, A5, B5, WEIGHTED)
    if NP > 6:
        acc6 += _term(x0, x1, x2, x3, A6, B6, WEIGHTED)
    if NP > 7:
        acc7 += _term(x0, x1, x2, x3, A7, B7, WEIGHTED)
    return acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7


@triton.jit
def _dots_kernel(
    meta, base, partials, ntensors,
    NL: tl.constexpr, NP: tl.constexpr,
    A0: tl.constexpr, B0: tl.constexpr, A1: tl.constexpr, B1: tl.constexpr,
    A2: tl.constexpr, B2: tl.constexpr, A3: tl.constexpr, B3: tl.constexpr,
    A4: tl.constexpr, B4: tl.constexpr, A5: tl.constexpr, B5: tl.constexpr,
    A6: tl.constexpr, B6: tl.constexpr, A7: tl.constexpr, B7: tl.constexpr,
    WEIGHTED: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, count = _chunk(meta, ntensors, NL, CHUNK)
    p0 = _pointer(meta, base, 0, ntensors, t, VEC)
    p1 = p0
    p2 = p0
    p3 = p0
    if NL > 1:
        p1 = _pointer(meta, base, 1, ntensors, t, VEC)
    if NL > 2:
        p2 = _pointer(meta, base, 2, ntensors, t, VEC)
    if NL > 3:
        p3 = _pointer(meta, base, 3, ntensors, t, VEC)
    acc0 = tl.zeros([BLOCK], ACC)
    acc1 = tl.zeros([BLOCK], ACC)
    acc2 = tl.zeros([BLOCK], ACC)
    acc3 = tl.zeros([BLOCK], ACC)
    acc4 = tl.zeros([BLOCK], ACC)
    acc5 = tl.zeros([BLOCK], ACC)
    acc6 = tl.zeros([BLOCK], ACC)
    acc7 = tl.zeros([BLOCK], ACC)
    lanes = tl.arange(0, BLOCK)
    full = count // BLOCK
    for i in range(0, full):
        offs = start + i * BLOCK + lanes
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _dots_accumulate(
            p0, p1, p2, p3, offs, None, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
            NL, NP, A0, B0, A1, B1, A2, B2, A3, B3, A4, B4, A5, B5, A6, B6, A7, B7, WEIGHTED, ACC, False)
    if full * BLOCK < count:
        offs = start + full * BLOCK + lanes
        acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7 = _dots_accumulate(
            p0, p1, p2, p3, offs, full * BLOCK + lanes < count, acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7,
            NL, NP, A0, B0, A1, B1, A2, B2, A3, B3, A4, B4, A5, B5, A6, B6, A7, B7, WEIGHTED, ACC, True)
    out = partials + tl.program_id(0) * NP
    tl.store(out, tl.sum(acc0, axis=0))
    if NP > 1:
        tl.store(out + 1, tl.sum(acc1, axis=0))
    if NP > 2:
        tl.store(out + 2, tl.sum(acc2, axis=0))
    if NP > 3:
        tl.store(out + 3, tl.sum(acc3, axis=0))
    if NP > 4:
        tl.store(out + 4, tl.sum(acc4, axis=0))
    if NP > 5:
        tl.store(out + 5, tl.sum(acc5, axis=0))
    if NP > 6:
        tl.store(out + 6, tl.sum(acc6, axis=0))
    if NP > 7:
        tl.store(out + 7, tl.sum(acc7, axis=0))


@triton.jit
def _elementwise_block(p0, p1, p2, p3, offs, mask, a, b,
                       OP: tl.constexpr, NL: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                       MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr):
    if OP <= 1:  # perturb: (w, g, saved)
        w_raw = _load(p0, offs, mask, MASKED)
        g = _load(p1, offs, mask, MASKED).to(ACC)
        _store(p2, offs, w_raw, mask, MASKED)  # the exact bits, so restore is exact
        w = w_raw.to(ACC)
        if OP == 1:
            step = a * w * w * g  # the ORIGINAL w, as in the reference
        else:
            step = a * g
        _store(p0, offs, _round(w + step, DTYPE, MANUAL_BF16), mask, MASKED)
    elif OP == 2:  # correct and restore: (w, g, saved[, v])
        g = _load(p1, offs, mask, MASKED).to(ACC) * a
        if NL > 3:
            g = g - b * _load(p3, offs, mask, MASKED).to(ACC)
        _store(p1, offs, _round(g, DTYPE, MANUAL_BF16), mask, MASKED)
        _store(p0, offs, _load(p2, offs, mask, MASKED), mask, MASKED)
    elif OP == 3:  # axpy: (y, x)
        y = _load(p0, offs, mask, MASKED).to(ACC)
        x = _load(p1, offs, mask, MASKED).to(ACC)
        _store(p0, offs, _round(y + a * x, DTYPE, MANUAL_BF16), mask, MASKED)
    else:  # scale_copy: (dst, src); loads precede stores, so dst may be src
        x = _load(p1, offs, mask, MASKED).to(ACC)
        _store(p0, offs, _round(a * x, DTYPE, MANUAL_BF16), mask, MASKED)


@triton.jit
def _elementwise_kernel(
    meta, base, ntensors, s0, s1,
    OP: tl.constexpr, NL: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr,
    MANUAL_BF16: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, count = _chunk(meta, ntensors, NL, CHUNK)
    p0 = _pointer(meta, base, 0, ntensors, t, VEC)
    p1 = _pointer(meta, base, 1, ntensors, t, VEC)
    p2 = p0
    p3 = p0
    if NL > 2:
        p2 = _pointer(meta, base, 2, ntensors, t, VEC)
    if NL > 3:
        p3 = _pointer(meta, base, 3, ntensors, t, VEC)
    a = tl.load(s0).to(ACC)
    b = tl.load(s1).to(ACC)
    lanes = tl.arange(0, BLOCK)
    full = count // BLOCK
    for i in range(0, full):
        _elementwise_block(p0, p1, p2, p3, start + i * BLOCK + lanes, None, a, b,
                           OP, NL, DTYPE, ACC, MANUAL_BF16, False)
    if full * BLOCK < count:
        _elementwise_block(p0, p1, p2, p3, start + full * BLOCK + lanes, full * BLOCK + lanes < count, a, b,
                           OP, NL, DTYPE, ACC, MANUAL_BF16, True)


# True when TRITON_INTERPRET=1 was set when this module was imported: the kernels
# then run on the CPU through numpy and can only address host memory.
INTERPRETING = type(_dots_kernel).__name__ == "InterpretedFunction"


# ---------------------------------------------------------------- launch configuration

class _Config(threading.local):
    def __init__(self):
        # GPU: 64K-element chunks keep the chunk table small for big models while
        # giving a few hundred programs for a 10M-parameter list; 2048-element blocks
        # with 8 warps give 8 elements (one or two 128-bit accesses) per thread per list.
        # Interpreter: every program costs ~2 ms of Python, so use big blocks.
        self.chunk = 65536
        self.block = 8192 if INTERPRETING else 2048


_config = _Config()


def get_launch_config() -> tuple[int, int]:
    """(chunk, block): elements per program and per loop iteration."""
    return _config.chunk, _config.block


def _check_config(chunk: int, block: int) -> None:
    for name, value in (("chunk", chunk), ("block", block)):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value!r} is invalid: it must be a power of two >= 16")
    if chunk < block:
        raise ValueError(f"chunk={chunk} is smaller than block={block}; use chunk >= block")


@contextlib.contextmanager
def launch_config(chunk: int | None = None, block: int | None = None) -> Iterator[None]:
    """Temporarily use other chunk/block sizes (tests use small ones to cross boundaries)."""
    old = get_launch_config()
    new_chunk = old[0] if chunk is None else chunk
    new_block = old[1] if block is None else block
    if chunk is not None and block is None:
        new_block = min(new_block, new_chunk)
    _check_config(new_chunk, new_block)
    _config.chunk, _config.block = new_chunk, new_block
    try:
        yield
    finally:
        _config.chunk, _config.block = old


def _num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


# ---------------------------------------------------------------- plans (cached tables)

class _Plan:
    """The device table for one set of storages, and the launch grid over it."""

    __slots__ = ("meta", "base", "ntensors", "nchunks", "vec")

    def __init__(self, meta: Tensor | None, base: Tensor | None, ntensors: int, nchunks: int, vec: int):
        self.meta = meta  # int64: element offsets from base per list, sizes, chunk map
        self.base = base  # the same memory viewed in the storage dtype
        self.ntensors = ntensors
        self.nchunks = nchunks
        self.vec = vec  # every offset is a multiple of this many elements


_PLAN_CACHE: "OrderedDict[tuple, _Plan]" = OrderedDict()
_PLAN_CACHE_SIZE = 64
_plan_lock = threading.Lock()
_data_ptr = torch.Tensor.data_ptr
_numel = torch.Tensor.numel
_dtype_of = attrgetter("dtype")


def plan_cache_info() -> dict[str, int]:
    return {"entries": len(_PLAN_CACHE), "capacity": _PLAN_CACHE_SIZE}


def clear_plan_cache() -> None:
    with _plan_lock:
        _PLAN_CACHE.clear()


class MixedDtypeError(TypeError):
    """A call mixes dtypes across its lists; the kernels read every list with one element type."""


def _validate(lists: Sequence[Sequence[Tensor]], numels: tuple[int, ...]) -> None:
    # Runs once per new plan only: the cache key then vouches for these facts.
    dtype, device, n = lists[0][0].dtype, lists[0][0].device, len(numels)
    if dtype not in _TL_DTYPES:
        raise TypeError(f"dtype {dtype} is not supported by the Triton kernels; use one of {SUPPORTED_DTYPES}")
    for k, lst in enumerate(lists):
        if len(lst) != n:
            raise ValueError(f"list {k} has {len(lst)} tensors but list 0 has {n}; the lists must be aligned")
        for i, t in enumerate(lst):
            if t.dtype != dtype:
                raise MixedDtypeError(f"list {k}, tensor {i} is {t.dtype} but list 0 is {dtype}")
            if t.device != device:
                raise ValueError(f"list {k}, tensor {i} is on {t.device} but list 0 is on {device}; "
                                 "group tensors by device first (xsam.ops does)")
            if t.numel() != numels[i]:
                raise ValueError(f"list {k}, tensor {i} has {t.numel()} elements but list 0 has {numels[i]} "
                                 "there; the lists must be aligned")
            if not t.is_contiguous():
                raise ValueError(f"list {k}, tensor {i} is not contiguous; pass contiguous tensors "
                                 "(xsam.ops.triton_backend copies non-contiguous ones for you)")


def _plan(lists: Sequence[Sequence[Tensor]], chunk: int, ptrs: Sequence[tuple[int, ...]] | None = None) -> _Plan:
    """The cached plan for these storages: keyed by every data_ptr, the sizes and the dtype.

    The key is what makes reuse safe: a table is only reused for exactly the same
    addresses, element counts and element type it was built for.
    """
    first = lists[0]
    device = first[0].device
    if ptrs is None:
        ptrs = [tuple(map(_data_ptr, lst)) for lst in lists]
    key = (device, tuple(lst[0].dtype for lst in lists), chunk, tuple(map(_numel, first)), *ptrs)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        return plan
    numels = key[3]
    _validate(lists, numels)
    nchunks = 0
    chunk_rows: list[int] = []
    for i, n in enumerate(numels):
        for start in range(0, n, chunk):  # empty tensors get no chunk at all
            chunk_rows.append(i)
            chunk_rows.append(start)
            nchunks += 1
    if nchunks == 0:
        plan = _Plan(None, None, len(numels), 0, 1)
    else:
        dtype = first[0].dtype
        size = first[0].element_size()
        meta = torch.empty(len(lists) * len(numels) + len(numels) + len(chunk_rows), dtype=torch.int64,
                           device=device)
        origin = meta.data_ptr()  # allocator blocks are at least 64-byte aligned
        rows = [(p - origin) // size for k in range(len(lists)) for p in key[4 + k]]
        # Views into flat buffers can start anywhere: only promise 16-byte alignment when true.
        aligned = all(p % 16 == 0 for k in range(len(lists)) for p, n in zip(key[4 + k], numels) if n)
        meta.copy_(torch.tensor(rows + list(numels) + chunk_rows, dtype=torch.int64))
        plan = _Plan(meta, meta.view(dtype), len(numels), nchunks, 16 // size if aligned else 1)
    with _plan_lock:
        _PLAN_CACHE[key] = plan
        while len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
            _PLAN_CACHE.popitem(last=False)
    return plan


def _launch_guard(device: torch.device):
    # Triton launches on the current CUDA device; tensors on another GPU need it switched.
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _acc(dtype: torch.dtype) -> tuple[torch.dtype, "tl.dtype"]:
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


# ---------------------------------------------------------------- reductions

def _reduce(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]], weighted: bool,
            ptrs: Sequence[tuple[int, ...]] | None = None) -> Tensor:
    """One stage-1 launch over <= MAX_LISTS lists and <= MAX_PAIRS pairs, then the fixed-order stage 2."""
    first = lists[0]
    dtype = first[0].dtype
    acc_dtype, acc_tl = _acc(dtype)
    chunk, block = get_launch_config()
    plan = _plan(lists, chunk, ptrs)
    npairs = len(pairs)
    if plan.nchunks == 0:
        return torch.zeros(npairs, dtype=acc_dtype, device=first[0].device)
    partials = torch.empty((plan.nchunks, npairs), dtype=acc_dtype, device=first[0].device)
    ab = {}
    for k in range(MAX_PAIRS):
        a, b = pairs[k] if k < npairs else (0, 0)
        ab[f"A{k}"], ab[f"B{k}"] = a, b
    with _launch_guard(first[0].device):
        _dots_kernel[(plan.nchunks,)](
            plan.meta, plan.base, partials, plan.ntensors,
            NL=len(lists), NP=npairs, **ab, WEIGHTED=weighted,
            ACC=acc_tl, VEC=plan.vec, CHUNK=chunk, BLOCK=block,
            num_warps=_num_warps(block),
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


def dots(lists: Sequence[Sequence[Tensor]], pairs: Sequence[tuple[int, int]]) -> Tensor:
    """``out[k] = sum_i <lists[a][i], lists[b][i]>`` for ``(a, b) = pairs[k]`` (see the reference).

    Lists that are the same storages (e.g. ``dots([g, g], ...)``) are read once.
    """
    pairs = [(int(a), int(b)) for a, b in pairs]
    first = lists[0]
    acc_dtype = _acc(first[0].dtype)[0]
    if not pairs:
        return torch.zeros(0, dtype=acc_dtype, device=first[0].device)
    # Fold lists holding the same storages into one, so each is read once.
    # (The address tuples double as the plan's cache key, so they are computed once.)
    ptrs = [tuple(map(_data_ptr, lst)) for lst in lists]
    canonical: dict[tuple[int, ...], int] = {}
    alias = [canonical.setdefault(p, k) for k, p in enumerate(ptrs)]
    for k, j in enumerate(alias):
        # Same addresses with other sizes is a misaligned call, not an alias: keep it
        # separate so plan validation reports it.
        if j != k and list(map(_numel, lists[k])) != list(map(_numel, lists[j])):
            alias[k] = k
    pairs = [(alias[a], alias[b]) for a, b in pairs]
    results = [_reduce([lists[i] for i in used], local, False, [ptrs[i] for i in used])
               for used, local, _ in _batches(pairs)]
    # Greedy batching keeps the pairs in order, so the batch results concatenate.
    return results[0] if len(results) == 1 else torch.cat(results)


def weighted_sumsq(weights: Sequence[Tensor], xs: Sequence[Tensor]) -> Tensor:
    """``sum_i ||weights[i] * xs[i]||^2`` as a 1-element tensor."""
    return _reduce([weights, xs], [(0, 1)], weighted=True)


# ---------------------------------------------------------------- element-wise passes

def _elementwise(op: int, lists: Sequence[Sequence[Tensor]], s0: Tensor, s1: Tensor) -> None:
    first = lists[0]
    dtype = first[0].dtype
    chunk, block = get_launch_config()
    plan = _plan(lists, chunk)
    if plan.nchunks == 0:
        return
    with _launch_guard(first[0].device):
        _elementwise_kernel[(plan.nchunks,)](
            plan.meta, plan.base, plan.ntensors, s0, s1,
            OP=op, NL=len(lists), DTYPE=_TL_DTYPES[dtype], ACC=_acc(dtype)[1], VEC=plan.vec,
            MANUAL_BF16=INTERPRETING and dtype == torch.bfloat16, CHUNK=chunk, BLOCK=block,
            num_warps=_num_warps(block),
        )


def perturb_(params, grads, saved, scale: Tensor, adaptive: bool) -> None:
    """``saved = w``; ``w += scale * g`` (``scale * w * w * g`` when adaptive), one pass."""
    _elementwise(_PERTURB_ADAPTIVE if adaptive else _PERTURB, [params, grads, saved], scale, scale)


def correct_restore_(params, grads, saved, vecs, a: Tensor, b: Tensor) -> None:
    """``g = a * g - b * v`` (``a * g`` when ``vecs`` is None) and ``w = saved``, one pass."""
    lists = [params, grads, saved] if vecs is None else [params, grads, saved, vecs]
    _elementwise(_CORRECT, lists, a, b)


def axpy_(ys, xs, alpha: Tensor) -> None:
    """``y += alpha * x``."""
    _elementwise(_AXPY, [ys, xs], alpha, alpha)


def scale_copy_(dsts, srcs, scale: Tensor) -> None:
    """``dst = scale * src``."""
    _elementwise(_SCALE_COPY, [dsts, srcs], scale, scale)
