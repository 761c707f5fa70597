"""The compiled op set ``xsam._C`` (``torch.ops.xsam.*``) as a backend.

Eager calls go through xsam._C's fast entries (csrc/module.cpp says why); torch.compile traces
``torch.ops.xsam``. The C++ side checks every tensor before it writes anything, so a failed call leaves
its arguments untouched; only then does Python look for the cause and raise ``LayoutError`` for a layout
needing dense copies. When the extension is not built, or lacks part of the contract (``extension_gaps``),
``UNAVAILABLE_REASON`` says why: ``backend="native"`` raises with it and ``backend="auto"`` warns once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import build_info
from .contract import OPS, SUPPORTED_DTYPES, define_schemas
from .fakes import register_fakes
from .layout import LayoutError, needs_dense

NAMESPACE = "xsam"


def has_kernel(device_type: str, op: str = "dots") -> bool:
    """Whether xsam._C registered a kernel for this device type ("cpu", "cuda")."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return _C is not None and key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"{NAMESPACE}::{op}", key)


def extension_gaps(extension) -> str | None:
    """Why ``extension`` (a loaded xsam._C) cannot serve the whole contract, or None when it can.

    An op without a fast entry (csrc/module.cpp) or a CPU kernel (csrc/ops_cpu.cpp), or with a CUDA
    kernel missing where the others exist, makes the whole backend unavailable: "auto" then warns
    instead of quietly running the reference for part of the op set.
    """
    no_entry = [op for op in OPS if not hasattr(extension, op)]
    no_cpu = [op for op in OPS if not has_kernel("cpu", op)]
    cuda = [op for op in OPS if has_kernel("cuda", op)]
    no_cuda = [op for op in OPS if op not in cuda] if cuda else []
    for missing, what in ((no_entry, "fast entry (csrc/module.cpp)"), (no_cpu, "CPU kernel (csrc/ops_cpu.cpp)"),
                          (no_cuda, "CUDA kernel (csrc/cuda/ops_cuda.cpp)")):
        if missing:
            return (f"xsam._C has no {what} for {', '.join(missing)} (an extension built from older sources?); "
                    f"rebuild it with {build_info.REBUILD_HINT}")
    return None


define_schemas(NAMESPACE)  # first: importing xsam._C registers its CPU and CUDA kernels for these schemas
try:
    from xsam import _C
except ImportError as exc:
    _C = None
    UNAVAILABLE_REASON = build_info.missing_extension_reason(exc)  # says why the build failed, if it did
else:
    UNAVAILABLE_REASON = extension_gaps(_C)


@dataclass(frozen=True)
class KernelConstants:
    """Where the compiled kernels cut their work (csrc/kernel_constants.h), as xsam._C exports it."""

    cpu_chunk: int  # elements per CPU work item (one reduction slot each)
    cpu_min_parallel_items: int  # the CPU kernels run items on several threads from this many items on
    cuda_chunk: int  # elements of one tensor per CUDA block

    def chunk(self, device_type: str) -> int:
        return self.cuda_chunk if device_type == "cuda" else self.cpu_chunk

    @property
    def cpu_parallel_elements(self) -> int:
        """The fewest elements per list in one call (its tensors together) that the CPU kernels split across threads."""
        return (self.cpu_min_parallel_items - 1) * self.cpu_chunk + 1


CONSTANTS = None if UNAVAILABLE_REASON else KernelConstants(_C.CPU_CHUNK, _C.CPU_MIN_PARALLEL_ITEMS, _C.CUDA_CHUNK)

if not UNAVAILABLE_REASON:
    register_fakes(NAMESPACE)


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    if UNAVAILABLE_REASON:
        return UNAVAILABLE_REASON
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported by xsam._C (float32, float64, float16, bfloat16 are)"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return f"xsam._C has kernels for cpu and cuda only, not {device.type}"
    if device.type == "cuda" and not has_kernel("cuda"):
        return ("xsam._C was built without CUDA kernels (XSAM_NO_CUDA=1, a CPU-only torch, or no nvcc "
                "at build time); rebuild with CUDA_HOME pointing at the CUDA toolkit")
    # A GPU the build compiled no code for would fail at the first launch ("no kernel image").
    return build_info.native_coverage_reason(device)


def _adapter(name: str):
    """The backend function of op ``name``: xsam._C's fast entry, or the registered op under torch.compile."""
    spec = OPS[name]
    names = spec.argument_names()
    fast = getattr(_C, name, None)
    op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def run(**args):
        ordered = [args[name] for name in names]
        try:
            if torch.compiler.is_compiling():
                return op(*ordered)
            return fast(*ordered)
        except RuntimeError as exc:
            if needs_dense(spec, args):
                raise LayoutError(str(exc)) from exc
            raise

    run.__name__ = name
    run.__doc__ = spec.doc
    return run


def gradients(tensors) -> tuple[list, int]:
    """``xsam.ops.gradients``: in C++ when the extension is built (and not while torch.compile traces)."""
    if UNAVAILABLE_REASON or torch.compiler.is_compiling():
        grads = [t.grad for t in tensors]
        return grads, sum(g is None for g in grads)
    return _C.gradients(tensors)


# One adapter per op of the contract (tests/test_backend_native.py checks that none is missing). Only
# called when UNAVAILABLE_REASON is None.
dots = _adapter("dots")
weighted_sumsq = _adapter("weighted_sumsq")
residual_sumsq = _adapter("residual_sumsq")
perturb_ = _adapter("perturb_")
tilted_perturb_ = _adapter("tilted_perturb_")
correct_restore_ = _adapter("correct_restore_")
axpy_ = _adapter("axpy_")
scale_copy_ = _adapter("scale_copy_")
