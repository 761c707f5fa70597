"""Timing: repeated blocks of calls through ``torch.utils.benchmark.Timer``.

``Timer`` synchronises the accelerator around every block (so GPU times are
device times, not launch times) and lets us run with all CPU threads; we only
choose the block length and summarise the per-block means (median and spread).
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.benchmark import Timer


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


def time_callable(fn: Callable[[], object], *, blocks: int = 7, block_seconds: float = 0.02,
                  warmup_calls: int = 2, max_calls_per_block: int = 10_000) -> TimingStats:
    """Time ``fn()``: warm-up calls (allocator, Triton/cuDNN autotuning), then ``blocks`` timed blocks.

    Each block runs ``fn`` enough times to last about ``block_seconds`` so that
    timer and synchronisation overheads do not dominate sub-millisecond ops.
    """
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    for _ in range(max(1, warmup_calls)):
        first = timer.timeit(1).mean
    calls = int(min(max_calls_per_block, max(1, block_seconds / max(first, 1e-9))))
    times = [timer.timeit(calls).mean for _ in range(max(1, blocks))]
    q1, q3 = _quartiles(times)
    return TimingStats(median=statistics.median(times), q1=q1, q3=q3, minimum=min(times), maximum=max(times),
                       blocks=len(times), calls_per_block=calls)
