"""Bandwidth of the native CUDA ops at 1e9 elements, aligned and at an odd offset, and of the Triton
passes over 1,000 tensors, beside a copy of the same bytes: printed tables, no timed assertion. ``bench/device_check.sh`` runs it
(``pytest -s -m gpu_bench bench/test_bandwidth.py``); it skips without a GPU.
"""
from __future__ import annotations

import statistics

import pytest
import torch

from xsam.ops import accumulation_dtype
from xsam.ops.dispatch import unavailable_reason

DEVICE = "cuda"
_WHY_NOT = unavailable_reason("native", torch.device(DEVICE), torch.float32) if torch.cuda.is_available() \
    else "needs a CUDA GPU"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_WHY_NOT is not None, reason=str(_WHY_NOT))]


@pytest.mark.gpu_bench
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bandwidth_at_1e9_elements(dtype):
    """GB/s of the native ops on one tensor of 1e9 elements, 16-byte aligned and starting at an odd
    element (the element-by-element path), next to a copy of the same bytes. Printed, not asserted."""
    n = 10**9
    item = torch.tensor([], dtype=dtype).element_size()
    acc = accumulation_dtype(dtype)
    s = torch.full((), 0.5, device=DEVICE, dtype=acc)
    X = torch.ops.xsam
    rows = []
    for aligned in (True, False):
        bases = [torch.randn(n + 1, device=DEVICE, dtype=dtype) for _ in range(3)]
        a, b, c = ([base[:n]] if aligned else [base[1:]] for base in bases)
        passes = {  # bytes moved, in passes over n elements
            "copy_ (baseline)": (lambda: a[0].copy_(b[0]), 2),
            "scale_copy_": (lambda: X.scale_copy_(a, b, s), 2),
            "axpy_": (lambda: X.axpy_(a, b, s), 3),
            "perturb_": (lambda: X.perturb_(a, b, c, s, False), 4),
            "dots (g,g),(g,v)": (lambda: X.dots(a + b, 2, [0, 0, 0, 1]), 2),
            "weighted_sumsq": (lambda: X.weighted_sumsq(a, b), 2),
            "residual_sumsq": (lambda: X.residual_sumsq(a, b, s), 2),
        }
        for name, (fn, npasses) in passes.items():
            ms = _median_ms(fn)
            rows.append(f"{name:20s} {str(dtype)[6:]:9s} {'aligned' if aligned else 'odd offset':10s} "
                        f"{ms:8.3f} ms {npasses * n * item / ms / 1e6:8.1f} GB/s")
        del a, b, c, bases
        torch.cuda.empty_cache()
    print("\n" + "\n".join(rows))


@pytest.mark.gpu_bench
def test_triton_bandwidth_over_1000_tensors():
    """GB/s of the Triton perturb and dots passes over 1,000 float32 tensors of 67,108 elements, next
    to a copy of the same bytes. Printed, not asserted."""
    why_not = unavailable_reason("triton", torch.device(DEVICE), torch.float32)
    if why_not is not None:
        pytest.skip(str(why_not))
    from xsam import ops

    n = 1 << 26
    w, g, v = ([torch.randn(n // 1000, device=DEVICE) for _ in range(1000)] for _ in range(3))
    saved = [torch.empty_like(t) for t in w]
    s = torch.full((), 0.01, device=DEVICE)
    src, dst = torch.empty(2 * n, device=DEVICE), torch.empty(2 * n, device=DEVICE)
    passes = {  # (function, bytes moved)
        "copy_ (baseline)": (lambda: dst.copy_(src), 16 * n),
        "perturb_": (lambda: ops.perturb_(w, g, saved, s, backend="triton"), 16 * n),
        "dots (g,g),(g,v),(v,v)": (lambda: ops.dots([g, v], [(0, 0), (0, 1), (1, 1)], backend="triton"), 8 * n),
    }
    rows = [f"{name:24s} {(ms := _median_ms(fn)):8.3f} ms {nbytes / ms / 1e6:8.1f} GB/s"
            for name, (fn, nbytes) in passes.items()]
    print("\n" + "\n".join(rows))


def _median_ms(fn, reps=7):
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
