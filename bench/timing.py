"""Timing: repeated blocks of calls, synchronising the measured device around each block.

``Timer`` synchronises the accelerator around every block (so GPU times are
device times, not launch times) and lets us run with all CPU threads; we only
choose the block length and summarise the per-block means (median and spread).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class TimingStats:
    """Seconds per call: the median over blocks, with the spread of the block means."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    blocks: int
    calls_per_block: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _synchronizer(device: torch.device | str | None) -> Callable[[], None]:
    """Waits for the queued work of ``device`` (the GPU the op runs on, not the current one)."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _mean_seconds(fn: Callable[[], object], calls: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync()
    return (time.perf_counter() - start) / calls


def time_callable(fn: Callable[[], object], *, blocks: int = 7, block_seconds: float = 0.02,
                  warmup_calls: int = 2, max_calls_per_block: int = 10_000,
                  device: torch.device | str | None = None) -> TimingStats:
    """Time ``fn()``: warm-up calls (allocator, Triton/cuDNN autotuning), then ``blocks`` timed blocks.

    Each block runs ``fn`` enough times to last about ``block_seconds`` so that timer and
    synchronisation overheads do not dominate sub-millisecond ops; ``device`` (a CUDA device)
    is synchronised before and after each block. (torch.utils.benchmark.Timer would do the
    same but imports torch's build machinery, which warns on machines without CUDA.)
    """
    sync = _synchronizer(device)
    for _ in range(max(1, warmup_calls)):
        first = _mean_seconds(fn, 1, sync)
    calls = int(min(max_calls_per_block, max(1, block_seconds / max(first, 1e-9))))
    times = [_mean_seconds(fn, calls, sync) for _ in range(max(1, blocks))]
    q1, q3 = _quartiles(times)
    return TimingStats(median=statistics.median(times), q1=q1, q3=q3, minimum=min(times), maximum=max(times),
                       blocks=len(times), calls_per_block=calls)
