"""The op set's contract: every op declared once, as a TorchScript schema plus its result size.

Derived from it: the schemas of ``xsam::`` (the compiled extension only registers kernels for them;
a C++ signature that disagrees fails at load time) and ``xsam_triton::``, which lists each op writes
(``Tensor(a!)[]``), the fakes torch.compile traces with, and the op layer's argument handling. It
imports nothing but torch, so a process that never imports xsam can load it (tests/test_cmake.py does).

Rules shared by every op and every backend (reference, Triton, native CPU and CUDA):
- One call gets aligned lists of one device and one dtype (float32, float64, float16, bfloat16): tensor i
  of every list has the shape of tensor i of the first list. The op layer groups mixed lists by (device,
  dtype) and adds reduction partials in a fixed order.
- Scalars are 0-d tensors on the group's device in the accumulation dtype (float64 for float64 storage,
  else float32); they are read on the device, never with ``.item()``.
- Arithmetic runs in the accumulation dtype with one rounding on store; reductions accumulate in it and
  return a 1-d tensor of it. Reductions are deterministic run to run on one machine (fixed-order two-stage
  sums, no float atomics); across GPU models the split into blocks, and hence the last bits, may differ.
- A written list may be the same list as a read one at the same position (``axpy_(y, y)``,
  ``scale_copy_(v, v)``): every element is read before it is written. The same tensor twice within a
  written list is refused (two writers of one element).
- Empty lists are valid: element-wise ops do nothing, reductions return zeros (float32 on the CPU, as no
  tensor says otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["OPS", "OpSpec", "define_schemas", "SUPPORTED_DTYPES"]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class OpSpec:
    """One op: its schema, what it computes, and (for reductions) its result length."""

    schema: str
    doc: str
    # Reductions: number of sums given the op's arguments (by schema name). None: returns nothing.
    result_len: Callable[[dict], int] | None = None
    name: str = field(init=False)
    list_args: tuple[str, ...] = field(init=False)  # Tensor[] / Tensor[]? arguments, in order
    written: tuple[str, ...] = field(init=False)  # the lists the op writes (alias annotation "!")
    other_args: tuple[str, ...] = field(init=False)  # ints, int lists, bools

    def __post_init__(self) -> None:
        parsed = torch._C.parse_schema(self.schema)
        lists, written, other = [], [], []  # scalars (Tensor) are none of these
        for arg in parsed.arguments:
            kind = str(arg.type)
            if kind in ("List[Tensor]", "Optional[List[Tensor]]"):
                lists.append(arg.name)
                if arg.alias_info is not None and arg.alias_info.is_write:
                    written.append(arg.name)
            elif kind != "Tensor":
                other.append(arg.name)
        object.__setattr__(self, "name", parsed.name)
        object.__setattr__(self, "list_args", tuple(lists))
        object.__setattr__(self, "written", tuple(written))
        object.__setattr__(self, "other_args", tuple(other))

    @property
    def is_reduction(self) -> bool:
        return self.result_len is not None

    def argument_names(self) -> list[str]:
        return [arg.name for arg in torch._C.parse_schema(self.schema).arguments]


_SPECS = [
    OpSpec(
        "dots(Tensor[] tensors, int num_lists, int[] pairs) -> Tensor",
        "out[k] = sum_i <L[a_k][i], L[b_k][i]> where the lists L are `tensors` cut into `num_lists` "
        "equal parts (list-major) and pairs = [a_0, b_0, a_1, b_1, ...]. Sums of squares are pairs "
        "(a, a). A list named by several pairs is read once per call.",
        result_len=lambda args: len(args["pairs"]) // 2,
    ),
    OpSpec(
        "weighted_sumsq(Tensor[] weights, Tensor[] xs) -> Tensor",
        "out[0] = sum_i ||weights[i] * xs[i]||^2 (the ASAM norm ||w * g||^2).",
        result_len=lambda args: 1,
    ),
    OpSpec(
        "residual_sumsq(Tensor[] us, Tensor[] vs, Tensor lam) -> Tensor",
        "out[0] = sum_i ||us[i] - lam * vs[i]||^2, element by element (no cancellation: the "
        "power-iteration residual to the precision of the accumulation dtype).",
        result_len=lambda args: 1,
    ),
    OpSpec(
        "perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] saved, Tensor scale, bool adaptive) -> ()",
        "saved = params (the exact bits); then params += scale * grads, or += scale * w * w * g "
        "(w the original params) when adaptive (ASAM).",
    ),
    OpSpec(
        "tilted_perturb_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] saved, Tensor[] vecs, Tensor a, "
        "Tensor b) -> ()",
        "saved = params (the exact bits); then params += a * grads + b * vecs (Eigen-SAM's ascent "
        "tilted toward the eigenvector).",
    ),
    OpSpec(
        "correct_restore_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] saved, Tensor[]? vecs, Tensor a, "
        "Tensor b) -> ()",
        "grads = a * grads - b * vecs (a * grads without vecs), and params = saved (the exact bits), "
        "in one pass.",
    ),
    OpSpec(
        "axpy_(Tensor(a!)[] ys, Tensor[] xs, Tensor alpha) -> ()",
        "ys += alpha * xs (finite-difference steps, Gram-Schmidt).",
    ),
    OpSpec(
        "scale_copy_(Tensor(a!)[] dsts, Tensor[] srcs, Tensor scale) -> ()",
        "dsts = scale * srcs (the normalisation of a power-iteration step).",
    ),
]

OPS: dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}

_LIBRARIES: dict[str, torch.library.Library] = {}


def define_schemas(namespace: str) -> None:
    """Define every op's schema under ``namespace`` once per process (idempotent)."""
    if namespace in _LIBRARIES:
        return
    library = torch.library.Library(namespace, "FRAGMENT")
    for spec in OPS.values():
        library.define(spec.schema)
    _LIBRARIES[namespace] = library  # the Library object must outlive the definitions
