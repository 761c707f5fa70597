"""The compiled op set ``xsam._C`` (``torch.ops.xsam.*``) as a backend.

The schemas come from ``xsam.ops.contract`` (defined here, before the extension is
imported); ``xsam._C`` registers CPU kernels and, when built with nvcc, CUDA kernels for
them (``TORCH_LIBRARY_IMPL``). This module adds the fake implementations torch.compile
traces with, and exposes one function per op with the schema's arguments.

Hot path: each function calls the compiled kernel through xsam._C's fast entry (the tensors of
the lists are borrowed, not converted one by one; see csrc/module.cpp), or through
``torch.ops.xsam`` while torch.compile traces. The C++ side checks every tensor
(device, dtype, shape, dense layout) before it writes anything, so when a call fails the
arguments are untouched; only then does Python look for the cause, and a layout the kernels
cannot address raises ``LayoutError`` so that the op layer retries with dense copies.

When the extension is not built, ``UNAVAILABLE_REASON`` says why (with the import error),
so ``backend="native"`` raises ``BackendUnavailableError`` with that reason.
"""
from __future__ import annotations

import torch

from .. import build_info
from .contract import OPS, SUPPORTED_DTYPES, define_schemas
from .fakes import register_fakes
from .layout import LayoutError, needs_dense

NAMESPACE = "xsam"
_C = None  # the extension module, once loaded


def _load_extension() -> str | None:
    """Import xsam._C (running its kernel registrations); None on success, else why it failed."""
    global _C
    define_schemas(NAMESPACE)
    try:
        from xsam import _C  # its import runs the TORCH_LIBRARY_IMPL registrations
    except ImportError as exc:
        return build_info.missing_extension_reason(exc)  # says why the build failed, if it did
    return None


UNAVAILABLE_REASON = _load_extension()


def has_kernel(device_type: str, op: str = "dots") -> bool:
    """Whether xsam._C registered a kernel for this device type ("cpu", "cuda")."""
    if UNAVAILABLE_REASON:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{op}", key)


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
    missing = [op for op in OPS if not has_kernel(device.type, op)]
    if len(missing) == len(OPS) and device.type == "cuda":
        return ("xsam._C was built without CUDA kernels (XSAM_NO_CUDA=1, a CPU-only torch, or no nvcc "
                "at build time); rebuild with CUDA_HOME pointing at the CUDA toolkit")
    if missing:
        return (f"xsam._C has no {device.type} kernel for {', '.join(missing)} (an extension built from older "
                "sources?); rebuild it with `pip install --no-build-isolation -e .`")
    # A GPU the build compiled no code for would fail at the first launch ("no kernel image").
    return build_info.native_coverage_reason(device)


def _backend_function(spec):
    op = getattr(getattr(torch.ops, NAMESPACE), spec.name).default
    # The fast eager entry of xsam._C (see csrc/module.cpp): the same kernel without converting
    # every tensor of every list; torch.compile traces the registered op instead.
    fast = getattr(_C, spec.name)
    names = spec.argument_names()

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

    run.__name__ = spec.name
    run.__doc__ = spec.doc
    return run


def gradients(tensors) -> tuple[list, int]:
    """``xsam.ops.gradients``: in C++ when the extension is built (and not while torch.compile traces)."""
    if UNAVAILABLE_REASON or torch.compiler.is_compiling():
        grads = [t.grad for t in tensors]
        return grads, sum(g is None for g in grads)
    return _C.gradients(tensors)


if not UNAVAILABLE_REASON:
    for _spec in OPS.values():
        globals()[_spec.name] = _backend_function(_spec)
