"""Checking a fused backend against the reference: the rule (``rule.py``), the op cases (``cases.py``),
running one (``trial.py``), and the check before first use (here), which ``backend="auto"`` runs once per
(device, dtype). What users see: docs/selftest.md.

The rule (``compare``): a fused kernel must be at least about as accurate as the reference, both measured
against the reference run in float64 on the same (rounded) inputs:
``|got - exact| <= 2 |ref - exact| + roundings * eps * (magnitude + tiny)``, with ``eps`` and ``tiny`` of the
storage dtype (of the accumulation dtype for reductions), ``magnitude`` the op run on absolute values and a
few ``roundings`` (sqrt(n) for sums of n terms, whose order may differ).

"exact" values (``Case.values``) are in {0, +-1/2, +-1}, with dyadic scalars: every intermediate of every op
is representable in every supported dtype (8 significant bits for bfloat16; sums below 2**24 units in
float32), so any correct implementation, FMA or not and in any summation order, returns the exact bits, and
these cases allow no rounding at all.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from .cases import Case, boundaries, launch_context, mixed_cases, quick_cases, selftest_cases
from .rule import RECIPES, Comparison, compare, missing_recipes, unit_roundoff
from .trial import CaseResult, run_case

__all__ = ["CaseResult", "CheckOutcome", "Comparison", "Case", "REPORT_TO", "KernelCheckWarning", "RECIPES",
           "SKIP_ENV", "boundaries", "check_backend", "clear_outcomes", "compare", "launch_context",
           "mixed_cases", "missing_recipes", "outcomes", "quick_cases", "run_case", "selftest_cases",
           "trusted", "unit_roundoff"]

SKIP_ENV = "XSAM_SKIP_KERNEL_CHECK"
REPORT_TO = "the torch-xsam issue tracker"  # where a wrong kernel is to be reported

class KernelCheckWarning(UserWarning):
    """A fused backend failed its check before first use; "auto" uses the reference instead."""


# ---------------------------------------------------------------- the check before first use (backend="auto")

@dataclass(frozen=True)
class CheckOutcome:
    """What the check before first use found for one fused backend on one (device, dtype)."""

    backend: str
    device: torch.device
    dtype: torch.dtype
    # "passed" | "failed" | "skipped" (XSAM_SKIP_KERNEL_CHECK) | "deferred" (first used in a CUDA graph capture)
    status: str
    detail: str = ""
    seconds: float = 0.0

    @property
    def trusted(self) -> bool:
        return self.status != "failed"

    def describe(self) -> str:
        if self.status == "passed":
            return f"{self.backend}: checked ok ({1000 * self.seconds:.1f} ms)"
        if self.status == "failed":
            return f"reference: {self.backend} failed its check, fell back ({self.detail})"
        return f"{self.backend}: not checked ({self.detail})"


_OUTCOMES: dict[tuple[str, torch.device, torch.dtype], CheckOutcome] = {}


def outcomes() -> dict[tuple[str, torch.device, torch.dtype], CheckOutcome]:
    """The checks run so far in this process, by (backend, device, dtype)."""
    return dict(_OUTCOMES)


def clear_outcomes() -> None:
    _OUTCOMES.clear()


_SKIP_VALUES = {True: ("1", "true", "yes", "on"), False: ("", "0", "false", "no", "off", "disabled", "none")}


def skip_requested() -> bool:
    """Whether XSAM_SKIP_KERNEL_CHECK asks to skip the check: only a clear true value does."""
    value = os.environ.get(SKIP_ENV, "").strip().lower()
    for skip, spellings in _SKIP_VALUES.items():
        if value in spellings:
            return skip
    raise ValueError(f"{SKIP_ENV}={os.environ[SKIP_ENV]!r} is neither true nor false: set it to 1 (or "
                     f"{', '.join(_SKIP_VALUES[True][1:])}) to skip the check of the fused kernels before their "
                     f"first use, or unset it (or 0, {', '.join(_SKIP_VALUES[False][2:])}) to run the check")


def trusted(backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend="auto"`` may use fused ``backend`` for (device, dtype): checked once per process."""
    outcome = _OUTCOMES.get((backend, device, dtype))
    if outcome is None:
        dynamo = sys.modules.get("torch._dynamo")
        if torch.compiler.is_compiling() and dynamo is not None:
            # Traced by torch.compile: the check runs tensors of its own and reads results on the
            # host, so it runs eagerly, outside the graph (a graph break, once per process).
            outcome = dynamo.disable(_check_and_record)(backend, device, dtype)
        else:
            outcome = _check_and_record(backend, device, dtype)
    return outcome.trusted


def _check_and_record(backend: str, device: torch.device, dtype: torch.dtype) -> CheckOutcome:
    if skip_requested():
        outcome = CheckOutcome(backend, device, dtype, "skipped", f"{SKIP_ENV}={os.environ[SKIP_ENV].strip()}")
    elif device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        outcome = CheckOutcome(backend, device, dtype, "deferred", "first used inside a CUDA graph capture, where "
                               "nothing may wait for the GPU; run `xsam selftest` to check it")
        warnings.warn(f"xsam could not check the {backend} kernels for {dtype} on {device} before first use: "
                      f"{outcome.detail}", KernelCheckWarning, stacklevel=caller_level())
    else:
        outcome = check_backend(backend, device, dtype)
        if outcome.status == "failed":
            warnings.warn(
                f"xsam: the {backend} kernels gave wrong results for {dtype} tensors on {device} in their check "
                f"before first use, so backend='auto' uses the reference implementation for them in this process "
                f"(slower; backend='reference' gives the same results). {outcome.detail}. Please report this, with "
                f"the output of `xsam selftest` and `xsam info`, to {REPORT_TO}. ({SKIP_ENV}=1 skips this check.)",
                KernelCheckWarning, stacklevel=caller_level())
    _OUTCOMES[(backend, device, dtype)] = outcome
    return outcome


def caller_level() -> int:
    """The stack level of the first frame outside xsam and torch (the user's call)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("xsam.", "torch.")):
        frame, level = frame.f_back, level + 1
    return level


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> CheckOutcome:
    """Run ``quick_cases`` on ``backend`` (never "auto": no recursion) and say whether all passed.

    The check leaves the caller's state alone: its own generators (not the global RNG), no
    autograd, no autocast; it reads its results on the host, so a CUDA sync debug mode is
    suspended meanwhile. If the check itself cannot run, the backend counts as failed.
    """
    start = time.perf_counter()
    detail = ""  # why the check failed
    sync_mode = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    try:
        if sync_mode:
            torch.cuda.set_sync_debug_mode(0)
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            for case in quick_cases(backend, device, dtype):
                result = run_case(case, backend, twice=False)  # wrong results only: keep it short
                if not result.ok:
                    detail = f"{case.op} ({case.label}): {result.failure}"
                    break
    except Exception as exc:
        detail = f"the check itself raised {type(exc).__name__}: {exc}"
    finally:
        if sync_mode:
            torch.cuda.set_sync_debug_mode(sync_mode)
    return CheckOutcome(backend, device, dtype, "failed" if detail else "passed", detail, time.perf_counter() - start)
