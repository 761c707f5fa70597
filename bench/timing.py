"""Timing: blocks of calls, synchronising the measured device around each block, interleaved.

``time_callable`` times one function; ``time_interleaved`` times several in rounds (one
block of each per round, the starting function rotating), so that a change of load on a
shared machine hits every configuration alike instead of whichever ran during it. A ratio
of two interleaved configurations is then taken round by round (``paired_ratio``), between
blocks that ran seconds apart. Every result carries its spread (quartiles, min/max), and
``unstable`` says when a spread is too wide for the median to be trusted.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

# A ratio whose spread (IQR over median) exceeds this is "unstable": with n >= 10 rounds the
# median's standard error is about 0.25 IQR, so two runs under this bound agree on their
# medians within about 15% (two standard errors of the difference).
UNSTABLE_SPREAD = 0.2
# A time whose spread exceeds this is "unstable" too: the load changed so much during the run
# that its median describes no state of the machine.
UNSTABLE_TIME_SPREAD = 0.5


@dataclass
class TimingStats:
    """Seconds per call (or any per-block quantity): the median over blocks and its spread."""

    median: float
    q1: float
    q3: float
    minimum: float
    maximum: float
    blocks: int
    calls_per_block: int
    samples: tuple[float, ...] = ()

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def spread(self) -> float:
        """IQR relative to the median (0.1 = the middle half of the blocks lies within 10% of it)."""
        return self.iqr / self.median if self.median else float("inf")


    def scaled(self, factor: float) -> "TimingStats":
        """The same statistics of ``factor`` times the quantity (e.g. per step instead of per cycle)."""
        return summarize([s * factor for s in self.samples], self.calls_per_block)


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarize(values: list[float], calls_per_block: int = 1) -> TimingStats:
    q1, q3 = _quartiles(values)
    return TimingStats(median=statistics.median(values), q1=q1, q3=q3, minimum=min(values), maximum=max(values),
                       blocks=len(values), calls_per_block=calls_per_block, samples=tuple(values))


def unstable(time: TimingStats, ratio: TimingStats | None = None) -> bool:
    """Whether a measurement is too noisy to be repeated: a wide ratio, or a time spread close to its median."""
    return time.spread > UNSTABLE_TIME_SPREAD or (ratio is not None and ratio.spread > UNSTABLE_SPREAD)


def paired_ratio(numerator: TimingStats, denominator: TimingStats) -> TimingStats:
    """Round-by-round ratios of two interleaved measurements, summarised like a timing."""
    ratios = [a / b for a, b in zip(numerator.samples, denominator.samples)]
    return summarize(ratios)


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


def time_interleaved(fns: Mapping[str, Callable[[], object]], *, blocks: int = 7, block_seconds: float = 0.02,
                     warmup_calls: int = 2, max_calls_per_block: int = 10_000,
                     device: torch.device | str | None = None) -> dict[str, TimingStats]:
    """Time every ``fns[name]()`` in ``blocks`` rounds; round r runs one block of each, starting at the r-th.

    Warm-up calls first (allocator, Triton/cuDNN autotuning, first-touch page faults); then each
    function gets the number of calls per block that lasts about ``block_seconds`` (at least one),
    so that timer and synchronisation overheads do not dominate sub-millisecond ops. ``device``
    (a CUDA device) is synchronised before and after each block. (torch.utils.benchmark.Timer
    would do the same per function but imports torch's build machinery, which warns on machines
    without CUDA, and cannot interleave.)
    """
    sync = _synchronizer(device)
    names = list(fns)
    calls = {}
    for name in names:
        for _ in range(max(1, warmup_calls)):
            first = _mean_seconds(fns[name], 1, sync)
        calls[name] = int(min(max_calls_per_block, max(1, block_seconds / max(first, 1e-9))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(1, blocks)):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(_mean_seconds(fns[name], calls[name], sync))
    return {name: summarize(times[name], calls[name]) for name in names}


def time_callable(fn: Callable[[], object], *, blocks: int = 7, block_seconds: float = 0.02,
                  warmup_calls: int = 2, max_calls_per_block: int = 10_000,
                  device: torch.device | str | None = None) -> TimingStats:
    """Time ``fn()`` alone: ``time_interleaved`` with one function."""
    return time_interleaved({"fn": fn}, blocks=blocks, block_seconds=block_seconds, warmup_calls=warmup_calls,
                            max_calls_per_block=max_calls_per_block, device=device)["fn"]
