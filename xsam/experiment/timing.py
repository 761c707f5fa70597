"""Time per step that survives a loaded machine: every arm interleaved on the same batches, one thread.

Each round runs every arm on the same batches in a rotated order, so a slow spell of the machine
hits all arms of a round alike: the per-round ratio to SAM is robust where absolute times are
not. One warm-up round is not timed.
"""
from __future__ import annotations

import functools
import os
import statistics
import time

import torch

from .arms import make_optimizer, parse_arm, take_step
from .run import Settings
from .tasks import load_task, make_model, task_loss

__all__ = ["UNSTABLE", "time_arms"]

UNSTABLE = 0.5  # spread / median at or above which a timing is flagged


def _stepper(task: str, arm_name: str, s: Settings, seed: int):
    arm = parse_arm(arm_name)
    torch.manual_seed(seed)
    model = make_model(task)
    opt = make_optimizer(arm, model, s, seed)

    def step(xb, yb):
        def closure():
            loss = task_loss(task, model, xb, yb)
            loss.backward()
            return loss

        take_step(arm, opt, closure, functools.partial(task_loss, task, model, xb, yb))

    return step


def time_arms(task: str, arms: list[str], s: Settings, *, cycles: int = 7, steps: int = 10,
              seed: int = 0) -> list[dict]:
    """One row per arm: median and spread of the time per step, and the median ratio to SAM."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xtr, ytr, _, _ = load_task(task)
        gen = torch.Generator().manual_seed(30_000 + seed)
        # A multiple of eig_interval steps, so every arm refreshes the same number of times per round.
        steps = max(steps, s.eig_interval) // s.eig_interval * s.eig_interval
        batches = [torch.randint(0, len(xtr), (s.batch_size,), generator=gen) for _ in range(steps)]
        batches = [(xtr[i], ytr[i]) for i in batches]
        steppers = {name: _stepper(task, name, s, seed) for name in arms}
        load_before = os.getloadavg()[0]
        per_round: dict[str, list[float]] = {name: [] for name in arms}
        for cycle in range(cycles + 1):
            shift = cycle % len(arms)
            for name in arms[shift:] + arms[:shift]:
                start = time.perf_counter()
                for xb, yb in batches:
                    steppers[name](xb, yb)
                if cycle:  # round 0 warms up
                    per_round[name].append((time.perf_counter() - start) / steps)
        load_after = os.getloadavg()[0]
    finally:
        torch.set_num_threads(threads)
    rows = []
    reference = per_round.get("sam")
    for name in arms:
        times = per_round[name]
        median = statistics.median(times)
        spread = max(times) - min(times)
        ratio = statistics.median(t / r for t, r in zip(times, reference)) if reference else float("nan")
        rows.append(dict(task=task, method=name, ms_per_step=1e3 * median, spread_ms=1e3 * spread,
                         ratio_to_sam=ratio, unstable=spread >= UNSTABLE * median, rounds=cycles,
                         steps_per_round=steps, load_before=load_before, load_after=load_after))
    return rows
