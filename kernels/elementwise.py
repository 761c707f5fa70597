"""Fused multi-tensor element-wise passes: perturb, tilted perturb, correct-and-restore, axpy, scale-copy.

One launch per pass covers every tensor of the lists (two when some cannot take 128-bit accesses);
every element is loaded before any is stored, so a written list may be a read list at the same position.
Writes through raw pointers are invisible to autograd, so each pass bumps the version counters of what it
writes, after every check and before the launch, as PyTorch's in-place ops do.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from xsam.ops.contract import OPS

from .plans import call_facts, check_scalars, get_launch_config, launch_guard, num_warps, plan_for
from .primitives import INTERPRETING, TL_DTYPES, accumulation, list_pointers, load_block, program_chunk, round_to, \
    store_block

__all__ = ["axpy_", "correct_restore_", "perturb_", "scale_copy_", "tilted_perturb_"]

Tensors = Sequence[Tensor]

# The pass a launch runs (a constexpr selects the body at compile time).
_PERTURB, _PERTURB_ADAPTIVE, _TILTED_PERTURB, _CORRECT_RESTORE, _AXPY, _SCALE_COPY = range(6)


@triton.jit
def _elementwise_block(ps, offs, mask, a, b, OP: tl.constexpr, NL: tl.constexpr, DTYPE: tl.constexpr,
                       ACC: tl.constexpr, MANUAL_BF16: tl.constexpr, MASKED: tl.constexpr):
    if OP <= 2:  # perturb, adaptive perturb, tilted perturb: (w, g, saved[, v])
        w_raw = load_block(ps[0], offs, mask, MASKED)
        g = load_block(ps[1], offs, mask, MASKED).to(ACC)
        w = w_raw.to(ACC)
        if OP == 1:
            step = a * w * w * g  # the ORIGINAL w, as in the reference
        elif OP == 2:
            step = a * g + b * load_block(ps[3], offs, mask, MASKED).to(ACC)
        else:
            step = a * g
        store_block(ps[2], offs, w_raw, mask, MASKED)  # the exact bits, so the restore is exact
        store_block(ps[0], offs, round_to(w + step, DTYPE, MANUAL_BF16), mask, MASKED)
    elif OP == 3:  # correct and restore: (w, g, saved[, v])
        g = load_block(ps[1], offs, mask, MASKED).to(ACC) * a
        if NL > 3:
            g = g - b * load_block(ps[3], offs, mask, MASKED).to(ACC)
        saved = load_block(ps[2], offs, mask, MASKED)
        store_block(ps[1], offs, round_to(g, DTYPE, MANUAL_BF16), mask, MASKED)
        store_block(ps[0], offs, saved, mask, MASKED)
    elif OP == 4:  # axpy: (y, x)
        y = load_block(ps[0], offs, mask, MASKED).to(ACC)
        x = load_block(ps[1], offs, mask, MASKED).to(ACC)
        store_block(ps[0], offs, round_to(y + a * x, DTYPE, MANUAL_BF16), mask, MASKED)
    else:  # scale_copy: (dst, src)
        x = load_block(ps[1], offs, mask, MASKED).to(ACC)
        store_block(ps[0], offs, round_to(a * x, DTYPE, MANUAL_BF16), mask, MASKED)


@triton.jit
def _elementwise_kernel(
    table, base, ntensors, first_chunk, s0, s1,
    OP: tl.constexpr, NL: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, VEC: tl.constexpr,
    MANUAL_BF16: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    t, start, count, _ = program_chunk(table, ntensors, first_chunk, NL, CHUNK)
    ps = list_pointers(table, base, ntensors, t, NL, VEC)
    a = tl.load(s0).to(ACC)
    b = tl.load(s1).to(ACC)
    lanes = tl.arange(0, BLOCK)
    full = count // BLOCK
    for i in range(0, full):
        _elementwise_block(ps, start + i * BLOCK + lanes, None, a, b, OP, NL, DTYPE, ACC, MANUAL_BF16, False)
    if full * BLOCK < count:
        _elementwise_block(ps, start + full * BLOCK + lanes, full * BLOCK + lanes < count, a, b,
                           OP, NL, DTYPE, ACC, MANUAL_BF16, True)


@functools.lru_cache(maxsize=None)
def _list_access(name: str, present: tuple[bool, ...]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The names of op ``name``'s present lists, and the positions among them of those it writes."""
    spec = OPS[name]
    names = tuple(n for n, here in zip(spec.list_args, present) if here)
    return names, tuple(k for k, n in enumerate(names) if n in spec.written)


def _run(op: int, name: str, lists: list[Tensors | None], scalars: dict[str, Tensor]) -> None:
    """Pass ``op`` of contract op ``name`` over its list arguments in schema order (None: an absent list)."""
    names, written = _list_access(name, tuple(lst is not None for lst in lists))
    lists = [lst for lst in lists if lst is not None]
    facts = call_facts(lists, names)
    if facts is None:  # empty lists: nothing to do
        return
    check_scalars(facts.device, **scalars)
    values = list(scalars.values())
    s0, s1 = values[0], values[-1]  # the kernel reads two scalars; one-scalar passes use the same twice
    chunk, block = get_launch_config()
    dtype = facts.dtype
    with launch_guard(facts.device):
        plan = plan_for(facts, lists, names, written, chunk)
        for k in written:
            torch._C._increment_version(lists[k])
        for first, count, vec in plan.launches:
            _elementwise_kernel[(count,)](
                plan.table, plan.base, plan.ntensors, first, s0, s1,
                OP=op, NL=len(lists), DTYPE=TL_DTYPES[dtype], ACC=accumulation(dtype)[1], VEC=vec,
                MANUAL_BF16=INTERPRETING and dtype == torch.bfloat16, CHUNK=chunk, BLOCK=block,
                num_warps=num_warps(block),
            )


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale: Tensor, adaptive: bool) -> None:
    """``saved = w``; ``w += scale * g`` (``scale * w * w * g`` when adaptive), one pass."""
    _run(_PERTURB_ADAPTIVE if adaptive else _PERTURB, "perturb_", [params, grads, saved], {"scale": scale})


def tilted_perturb_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors, a: Tensor, b: Tensor) -> None:
    """``saved = w``; ``w += a * g + b * v``, one pass."""
    _run(_TILTED_PERTURB, "tilted_perturb_", [params, grads, saved, vecs], {"a": a, "b": b})


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a: Tensor,
                     b: Tensor) -> None:
    """``g = a * g - b * v`` (``a * g`` when ``vecs`` is None) and ``w = saved``, one pass."""
    _run(_CORRECT_RESTORE, "correct_restore_", [params, grads, saved, vecs], {"a": a, "b": b})


def axpy_(ys: Tensors, xs: Tensors, alpha: Tensor) -> None:
    """``y += alpha * x``."""
    _run(_AXPY, "axpy_", [ys, xs], {"alpha": alpha})


def scale_copy_(dsts: Tensors, srcs: Tensors, scale: Tensor) -> None:
    """``dst = scale * src``."""
    _run(_SCALE_COPY, "scale_copy_", [dsts, srcs], {"scale": scale})
