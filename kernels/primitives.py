"""What every xsam Triton kernel shares: the plan table's layout, typed loads and stores, rounding.

The table (built on the host by ``xsam.kernels.plans``) is one int64 tensor per set of storages:

    rows 0 .. NL-1   element offset of tensor t of list k from ``base`` (the table viewed in the
                     storage dtype), at [k * ntensors + t]
    row NL           the element count of tensor t, at [NL * ntensors + t]
    chunk map        (tensor index, first element, partial row) per program, 3 entries each, at
                     [(NL + 1) * ntensors + 3 * chunk]

A launch covers chunks ``first_chunk .. first_chunk + grid - 1`` of the map, so one table can
serve launches with different vector widths (see ``plans.Plan.launches``). The partial row is
the chunk's place in tensor order: reductions add their partials in that order, whichever
launch took a chunk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.float64: tl.float64,
}
SUPPORTED_DTYPES = tuple(TL_DTYPES)


def accumulation(dtype: torch.dtype) -> tuple[torch.dtype, "tl.dtype"]:
    """Arithmetic and sums run in fp32, or fp64 for fp64 storage (torch and Triton dtypes)."""
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


@triton.jit
def program_chunk(table, ntensors, first_chunk, NL: tl.constexpr, CHUNK: tl.constexpr):
    """(tensor index, first element, elements in this chunk, pointer to its partial row) of this program."""
    entry = table + (NL + 1) * ntensors + 3 * (first_chunk + tl.program_id(0))
    t = tl.load(entry)
    start = tl.multiple_of(tl.load(entry + 1), CHUNK)  # chunks start at k * CHUNK
    count = (tl.minimum(start + CHUNK, tl.load(table + NL * ntensors + t)) - start).to(tl.int32)
    return t, start, count, entry + 2


@triton.jit
def list_pointers(table, base, ntensors, t, NL: tl.constexpr, VEC: tl.constexpr):
    """Tensor t of lists 0..NL-1, as a tuple."""
    # Tensors are addressed as base + element offset, where base is the table itself viewed in
    # the storage dtype. Unlike a cast from an integer, this keeps the compiler's alignment
    # facts, so a promise that the offset is a multiple of VEC elements (16 bytes, checked on
    # the host for every tensor of the launch) turns into 128-bit accesses.
    ps = ()
    for k in tl.static_range(NL):
        off = tl.load(table + k * ntensors + t)
        if VEC > 1:
            off = tl.multiple_of(off, VEC)
        ps = ps + (base + off,)
    return ps


@triton.jit
def load_block(p, offs, mask, MASKED: tl.constexpr):
    # Full blocks load without a mask: a mask against an unknown bound would stop the compiler
    # from vectorising.
    if MASKED:
        x = tl.load(p + offs, mask=mask, other=0.0)
    else:
        x = tl.load(p + offs)
    return x


@triton.jit
def store_block(p, offs, x, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(p + offs, x, mask=mask)
    else:
        tl.store(p + offs, x)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    # The interpreter truncates fp32 -> bf16; compiled Triton rounds to nearest even.
    # MANUAL_BF16 (interpreter only) rounds by hand so that CPU tests see a GPU's rounding.
    if MANUAL_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a (quiet) NaN
        r = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        r = x.to(DTYPE)
    return r


# True when TRITON_INTERPRET=1 was set when triton was imported: the kernels then run on the
# CPU through numpy and can only address host memory.
INTERPRETING = type(round_to).__name__ == "InterpretedFunction"
