"""The Triton kernels (``xsam.kernels``) as a backend: the registered ops ``torch.ops.xsam_triton.*``.

Schemas and fakes come from the contract, so the Triton path traces under torch.compile like the
compiled one. The kernels are registered for CUDA, or for the CPU when ``TRITON_INTERPRET=1`` was set
before ``xsam.kernels`` was imported, with ``Library.impl`` at the device key (less host time per call
than ``register_kernel``); a fallback registration serves calls without any tensor and explains why
other devices have no kernel. Positions that are not dense with one memory order
(``xsam.ops.layout.flat_compatible``) raise ``LayoutError`` and the op layer retries with dense
copies; ``xsam.kernels.plans`` checks everything else.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .contract import OPS, OpSpec, define_schemas
from .fakes import register_fakes
from .layout import LayoutError, flat_compatible

NAMESPACE = "xsam_triton"

try:
    from xsam.kernels import elementwise, reductions
    from xsam.kernels.primitives import INTERPRETING, SUPPORTED_DTYPES
except Exception as exc:  # triton missing or broken: report it, never break `import xsam`
    UNAVAILABLE_REASON: str | None = f"Triton cannot be imported ({type(exc).__name__}: {exc}); install triton"
else:
    UNAVAILABLE_REASON = None

_is_contiguous = Tensor.is_contiguous


def availability(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when the kernels can run (device, dtype) tensors in this process, else why not."""
    if UNAVAILABLE_REASON:
        return UNAVAILABLE_REASON
    device = torch.device(device)
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        return f"the Triton kernels support {names}, not {dtype}"
    if device.type == "cpu":
        if INTERPRETING:
            return None
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            return ("TRITON_INTERPRET was set after xsam.kernels was imported, so the kernels were "
                    "built for a GPU; set it before importing xsam (or triton) to run on CPU tensors")
        return ("Triton runs CPU tensors only in its interpreter; set TRITON_INTERPRET=1 before "
                "importing xsam (slow: for tests), or use a CUDA device")
    if device.type == "cuda":
        if INTERPRETING:
            return ("xsam.kernels was imported with TRITON_INTERPRET=1, whose interpreter can only "
                    "address host memory; unset TRITON_INTERPRET to run CUDA tensors")
        if not torch.cuda.is_available():
            return "CUDA is not available in this process"
        return None
    return f"the Triton kernels run on CUDA devices (or CPU under the interpreter), not {device.type}"


# ---------------------------------------------------------------- the registered kernels

def _check_flat(op: str, lists: list[list[Tensor]]) -> None:
    """Raise LayoutError unless every position is dense with one memory order (all contiguous: at once)."""
    if all(all(map(_is_contiguous, lst)) for lst in lists):
        return
    suspects = sorted({i for lst in lists for i, ok in enumerate(map(_is_contiguous, lst)) if not ok})
    for i in suspects:
        position = [lst[i] for lst in lists]
        if not flat_compatible(position):
            raise LayoutError(f"xsam_triton::{op}: the tensors at position {i} are not dense with one memory order "
                              f"(strides {[t.stride() for t in position]}); xsam.ops retries with dense copies")


def _kernel_for(spec: OpSpec):
    """The CPU or CUDA kernel of op ``spec``: the layout check, then the Triton launches."""
    if spec.name == "dots":
        def dots(tensors: list[Tensor], num_lists: int, pairs: list[int]) -> Tensor:
            if num_lists < 1 or len(tensors) % num_lists or len(pairs) % 2:
                raise ValueError(f"xsam_triton::dots: {len(tensors)} tensors cannot be cut into num_lists={num_lists} "
                                 f"aligned lists, or pairs has an odd length ({len(pairs)}); pass the lists "
                                 "concatenated and pairs flattened (a0, b0, a1, b1, ...)")
            bad = [i for i in pairs if not 0 <= i < num_lists]
            if bad:
                raise ValueError(f"xsam_triton::dots: pairs names list {bad[0]}, but only lists 0..{num_lists - 1} "
                                 "exist")
            n = len(tensors) // num_lists
            lists = [tensors[j * n:(j + 1) * n] for j in range(num_lists)]
            _check_flat("dots", lists)
            return reductions.dots(lists, list(zip(pairs[::2], pairs[1::2])))
        return dots

    kernel = getattr(elementwise, spec.name, None) or getattr(reductions, spec.name)
    names = spec.argument_names()
    positions = [names.index(name) for name in spec.list_args]

    def run(*args):
        _check_flat(spec.name, [args[i] for i in positions if args[i] is not None])
        return kernel(*args)

    run.__name__ = spec.name
    return run


def _fallback_for(spec: OpSpec, device_key: str):
    """The CompositeExplicitAutograd kernel: calls without tensors, and devices without a kernel."""
    names = spec.argument_names()

    def fallback(*args):
        bound = dict(zip(names, args))
        lists = [bound[name] for name in spec.list_args if bound[name]]
        if lists:
            device = lists[0][0].device
            raise RuntimeError(f"xsam_triton::{spec.name} has kernels for {device_key} tensors only, not {device}: "
                               f"{availability(device, lists[0][0].dtype) or 'use xsam.ops to pick a backend'}")
        if not spec.is_reduction:
            return None
        return torch.zeros(spec.result_len(bound))  # the contract: no tensor says otherwise, so fp32 on the CPU

    return fallback


# ---------------------------------------------------------------- the backend functions

def _adapter(name: str):
    """The backend function of op ``name``: the registered op, called with the schema's arguments."""
    spec = OPS[name]
    op = getattr(getattr(torch.ops, NAMESPACE), name).default
    names = spec.argument_names()

    def run(**args):
        return op(*[args[name] for name in names])

    run.__name__ = name
    run.__doc__ = spec.doc
    return run


define_schemas(NAMESPACE)  # the adapters below look their ops up; the kernels register only with Triton
if not UNAVAILABLE_REASON:
    register_fakes(NAMESPACE)
    _DEVICE_KEY = "CPU" if INTERPRETING else "CUDA"
    _LIBRARY = torch.library.Library(NAMESPACE, "IMPL")  # the registrations live as long as this object
    for _spec in OPS.values():
        _LIBRARY.impl(_spec.name, _kernel_for(_spec), _DEVICE_KEY)
        _LIBRARY.impl(_spec.name, _fallback_for(_spec, _DEVICE_KEY), "CompositeExplicitAutograd")

# One adapter per op of the contract (tests/test_backend_triton.py checks that none is missing). Only
# called when UNAVAILABLE_REASON is None.
dots = _adapter("dots")
weighted_sumsq = _adapter("weighted_sumsq")
residual_sumsq = _adapter("residual_sumsq")
perturb_ = _adapter("perturb_")
tilted_perturb_ = _adapter("tilted_perturb_")
correct_restore_ = _adapter("correct_restore_")
axpy_ = _adapter("axpy_")
scale_copy_ = _adapter("scale_copy_")
