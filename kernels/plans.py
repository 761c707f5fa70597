"""The host side of the Triton kernels: launch configuration and cached address tables ("plans").

One launch covers a whole list of tensors, whose addresses programs read from a table (layout in
``xsam.kernels.primitives``). Building a table costs a Python loop and a host-to-device copy, so tables
are cached (least recently used first out), keyed by everything the kernels rely on: every tensor's
address, list 0's element counts, the dtype, the device and which lists the op writes (overlaps are
refused when a table is built). The key is checked on every call with one C-level ``map`` per list;
the memory order is not in it (``xsam.ops.triton_backend`` checks it on every call).

A table is filled by a non-blocking copy on the stream that built it; another stream waits for that
copy and ``record_stream``-s the table, so evicting it while a kernel still reads it is safe. A table
used during CUDA graph capture is never freed (``release_graph_plans`` frees them once the graphs are
gone); one built during capture is filled only on replay, so it serves that capture alone.
"""
from __future__ import annotations

import contextlib
import threading
from bisect import bisect_right
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .primitives import INTERPRETING, TL_DTYPES

__all__ = ["CallFacts", "MixedDtypeError", "Plan", "call_facts", "check_scalars", "clear_plan_cache",
           "get_launch_config", "launch_config", "launch_guard", "num_warps", "plan_cache_info", "plan_for",
           "release_graph_plans"]


# ---------------------------------------------------------------- launch configuration

class _Config(threading.local):
    def __init__(self):
        # GPU: 64K-element chunks keep the chunk table small for big models while giving a few
        # hundred programs for a 10M-parameter list; 2048-element blocks with 8 warps give 8
        # elements (one or two 128-bit accesses) per thread per list.
        # Interpreter: every program costs ~2 ms of Python, so use big blocks.
        self.chunk = 65536
        self.block = 8192 if INTERPRETING else 2048


_config = _Config()


def get_launch_config() -> tuple[int, int]:
    """(chunk, block): elements per program and per loop iteration."""
    return _config.chunk, _config.block


@contextlib.contextmanager
def launch_config(chunk: int | None = None, block: int | None = None) -> Iterator[None]:
    """Temporarily use other chunk/block sizes (tests use small ones to cross boundaries)."""
    old = get_launch_config()
    new_chunk = old[0] if chunk is None else chunk
    new_block = min(old[1], new_chunk) if block is None else block  # the current block is <= its chunk
    for name, value in (("chunk", new_chunk), ("block", new_block)):
        if not isinstance(value, int) or value < 16 or value & (value - 1):
            raise ValueError(f"{name}={value!r} is invalid: it must be a power of two >= 16")
    if new_chunk < new_block:
        raise ValueError(f"chunk={new_chunk} is smaller than block={new_block}; use chunk >= block")
    _config.chunk, _config.block = new_chunk, new_block
    try:
        yield
    finally:
        _config.chunk, _config.block = old


def num_warps(block: int) -> int:
    return 8 if block >= 2048 else 4


def launch_guard(device: torch.device):
    """Triton launches on the current CUDA device; tensors on another GPU need it switched."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# ---------------------------------------------------------------- the facts of one call

class MixedDtypeError(TypeError):
    """A call mixes dtypes; the kernels read every list with one element type."""


_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_dtype_of = attrgetter("dtype")
_device_of = attrgetter("device")


@dataclass(slots=True)
class CallFacts:
    """What the key of a call's plan is made of, gathered with one C-level map per list and fact."""

    device: torch.device
    dtype: torch.dtype
    numels: tuple[int, ...]  # every list's, position by position
    ptrs: list[tuple[int, ...]]  # one address tuple per list


def call_facts(lists: Sequence[Sequence[Tensor]], names: Sequence[str]) -> CallFacts | None:
    """Check that the lists are aligned and of one supported dtype; None when they are empty."""
    first = lists[0]
    n = len(first)
    for lst, name in zip(lists, names):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors but {names[0]} has {n}; the lists must be aligned "
                             "(one tensor per parameter, in the same order)")
    if n == 0:
        return None
    dtype = first[0].dtype
    if dtype not in TL_DTYPES:
        raise TypeError(f"{names[0]}[0] has dtype {dtype}, which the Triton kernels do not support; "
                        f"use one of {', '.join(map(str, TL_DTYPES))}")
    numels = tuple(map(_numel, first))
    ptrs = []
    done: dict[int, tuple[int, ...]] = {}  # the same list object twice (axpy_(y, y)) is looked at once
    for lst, name in zip(lists, names):
        known = done.get(id(lst))
        if known is None:
            if lst is not first and tuple(map(_numel, lst)) != numels:
                i = next(i for i, t in enumerate(lst) if t.numel() != numels[i])
                raise ValueError(f"{name}[{i}] has {lst[i].numel()} elements but {names[0]}[{i}] has {numels[i]}; "
                                 "the lists must be aligned (tensor i of every list has the same shape)")
            if list(map(_dtype_of, lst)).count(dtype) != n:
                i = next(i for i, t in enumerate(lst) if t.dtype != dtype)
                raise MixedDtypeError(f"{name}[{i}] is {lst[i].dtype} but {names[0]}[0] is {dtype}; one call takes "
                                      "one dtype (group the tensors by (device, dtype) first: xsam.ops does)")
            known = done[id(lst)] = tuple(map(_data_ptr, lst))
        ptrs.append(known)
    return CallFacts(first[0].device, dtype, numels, ptrs)


def check_scalars(device: torch.device, **scalars: Tensor) -> None:
    """Scalars are read by the kernels on the tensors' device: one value there, never a host copy."""
    for name, s in scalars.items():
        if s.device != device or s.numel() != 1:
            raise ValueError(f"{name} must be a one-element tensor on {device} (the tensors' device), got shape "
                             f"{tuple(s.shape)} on {s.device}; the kernels read it there without a host sync")


# ---------------------------------------------------------------- plans

@dataclass(slots=True, eq=False)
class Plan:
    """The device table for one set of storages, and the launches over it."""

    table: Tensor | None  # int64: offsets from base per list, sizes, chunk map (see primitives)
    dtype: torch.dtype
    ntensors: int
    nchunks: int
    # (first chunk, chunks, vector width): positions whose tensors all start on 16 bytes get
    # 128-bit accesses; the others get a launch of their own instead of slowing everyone.
    launches: tuple[tuple[int, int, int], ...]
    base: Tensor | None = field(init=False)  # the table's memory in the storage dtype
    ready: "torch.cuda.Event | None" = None  # recorded after the copy that fills the table
    streams: set[int] = field(default_factory=set)  # raw CUDA streams ordered after that copy
    staging: Tensor | None = None  # host source of a copy that a CUDA graph replays
    in_graph: bool = False  # used during graph capture: never freed (see _GRAPH_PLANS)

    def __post_init__(self) -> None:
        self.base = None if self.table is None else self.table.view(self.dtype)


_PLANS: "OrderedDict[tuple, Plan]" = OrderedDict()  # least recently used first
_PLAN_CACHE_SIZE = 64
# Plans whose tables CUDA graphs read on replay: kept whatever the cache evicts or clears.
_GRAPH_PLANS: list[Plan] = []
_lock = threading.Lock()


def plan_cache_info() -> dict[str, int]:
    return {"entries": len(_PLANS), "capacity": _PLAN_CACHE_SIZE, "graph_plans": len(_GRAPH_PLANS)}


def clear_plan_cache() -> None:
    """Forget every cached plan (tables that captured CUDA graphs read stay alive)."""
    with _lock:
        _PLANS.clear()


def release_graph_plans() -> None:
    """Free the tables kept for CUDA graphs; only once every graph captured with them is destroyed."""
    with _lock:
        _GRAPH_PLANS.clear()


def plan_for(facts: CallFacts, lists: Sequence[Sequence[Tensor]], names: Sequence[str], written: tuple[int, ...],
             chunk: int) -> Plan:
    """The plan for these lists (``facts`` from ``call_facts``), from the cache or built now.

    ``written``: positions in ``lists`` of the lists the op writes. The plan is ready for a
    launch on the current stream.
    """
    key = (facts.device, facts.dtype, chunk, written, facts.numels, *facts.ptrs)
    capturing = facts.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    with _lock:
        plan = _PLANS.get(key)
        if plan is not None:
            _PLANS.move_to_end(key)
    if plan is None:
        plan = _build(facts, lists, names, written, chunk, capturing)
        if not capturing:
            with _lock:
                _PLANS[key] = plan
                while len(_PLANS) > _PLAN_CACHE_SIZE:
                    _PLANS.popitem(last=False)
    if facts.device.type == "cuda":
        _use_on_current_stream(plan, facts.device, capturing)
    return plan


def _use_on_current_stream(plan: Plan, device: torch.device, capturing: bool) -> None:
    if plan.table is None:
        return
    if capturing:
        # A graph replays this launch at any later time: the table must outlive every eviction.
        # (torch.cuda.graph synchronises before capture, so a copy issued before it has run.)
        if not plan.in_graph:
            plan.in_graph = True
            with _lock:
                _GRAPH_PLANS.append(plan)
        return
    stream = torch._C._cuda_getCurrentRawStream(device.index)
    if stream not in plan.streams:
        current = torch.cuda.current_stream(device)
        current.wait_event(plan.ready)  # the copy that fills the table ran on the stream that built it
        plan.table.record_stream(current)  # its memory is reused only after this stream's kernels
        plan.streams.add(stream)


def _build(facts: CallFacts, lists: Sequence[Sequence[Tensor]], names: Sequence[str], written: tuple[int, ...],
           chunk: int, capturing: bool) -> Plan:
    _check_devices(facts.device, lists, names)
    esize = facts.dtype.itemsize
    _check_writes(facts, names, written, esize)
    numels, ptrs = facts.numels, facts.ptrs
    vec = max(1, 16 // esize)
    vector_chunks: list[int] = []
    scalar_chunks: list[int] = []
    row = 0  # the chunk's place in tensor order, whichever launch takes it
    for i, n in enumerate(numels):
        entries = vector_chunks if all(p[i] % 16 == 0 for p in ptrs) else scalar_chunks
        for start in range(0, n, chunk):  # empty tensors get no chunk at all
            entries += (i, start, row)
            row += 1
    nvector, nscalar = len(vector_chunks) // 3, len(scalar_chunks) // 3
    launches = tuple((first, count, width) for first, count, width in ((0, nvector, vec), (nvector, nscalar, 1))
                     if count)
    if not launches:
        return Plan(None, facts.dtype, len(numels), 0, ())
    table = torch.empty(len(ptrs) * len(numels) + len(numels) + 3 * (nvector + nscalar), dtype=torch.int64,
                        device=facts.device)
    origin = table.data_ptr()  # allocations are at least 64-byte aligned, so vector promises hold
    offsets = []
    for k, lst_ptrs in enumerate(ptrs):
        for i, p in enumerate(lst_ptrs):
            if (p - origin) % esize:
                raise ValueError(f"{names[k]}[{i}] starts at an address that is not a multiple of its element "
                                 f"size ({esize} bytes); pass a copy (.clone())")
            offsets.append((p - origin) // esize)
    host = torch.tensor(offsets + list(numels) + vector_chunks + scalar_chunks, dtype=torch.int64)
    plan = Plan(table, facts.dtype, len(numels), nvector + nscalar, launches)
    if facts.device.type != "cuda":
        table.copy_(host)
    elif capturing:
        # Captured as a copy node that every replay runs, reading `host` then: keep it forever.
        table.copy_(host, non_blocking=True)
        plan.staging = host
    else:
        table.copy_(host.pin_memory(), non_blocking=True)
        plan.ready = torch.cuda.Event()
        plan.ready.record()
        plan.streams.add(torch._C._cuda_getCurrentRawStream(facts.device.index))
    return plan


def _check_devices(device: torch.device, lists: Sequence[Sequence[Tensor]], names: Sequence[str]) -> None:
    for lst, name in zip(lists, names):
        devices = list(map(_device_of, lst))
        if devices.count(device) != len(devices):
            i = next(i for i, d in enumerate(devices) if d != device)
            raise ValueError(f"{name}[{i}] is on {devices[i]} but {names[0]}[0] is on {device}; one call takes one "
                             "device (group the tensors by device first: xsam.ops does)")


def _check_writes(facts: CallFacts, names: Sequence[str], written: tuple[int, ...], esize: int) -> None:
    """Refuse two writers of one element, and reads of an element that another position writes.

    Dense tensors cover ``[address, address + numel * esize)``. A read list may be a written one
    at the same position (``axpy_(y, y)``): each element is read before it is written.
    """
    if not written:
        return
    numels, ptrs = facts.numels, facts.ptrs
    spans = sorted((p, p + n * esize, k, i) for k in set(written)
                   for i, (p, n) in enumerate(zip(ptrs[k], numels)) if n)
    for (_, end, k, i), (start, _, k2, i2) in zip(spans, spans[1:]):
        if start < end:
            what = "the same tensor" if ptrs[k][i] == ptrs[k2][i2] else "views of overlapping memory"
            raise ValueError(f"{names[k]}[{i}] and {names[k2]}[{i2}] are {what}, and the op writes both: two writes "
                             "of one element would race; pass distinct tensors")
    ends = [span[1] for span in spans]
    for k in set(range(len(ptrs))) - set(written):
        for i, (p, n) in enumerate(zip(ptrs[k], numels)):
            j = bisect_right(ends, p)  # the first written span that ends after p
            if n and j < len(spans) and spans[j][0] < p + n * esize and (spans[j][0], spans[j][3]) != (p, i):
                raise ValueError(f"{names[k]}[{i}] shares memory with {names[spans[j][2]]}[{spans[j][3]}], which the "
                                 "op writes: a read of another position's output would race; pass a copy")
