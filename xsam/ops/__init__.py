"""The functional op set of xsam, over lists of tensors of any devices and dtypes.

Each function takes aligned lists (tensor i of every list has the shape of tensor i of the first),
runs the chosen backend on every (device, dtype) group (``xsam.ops.runner``) and, for reductions,
adds the groups' partial results in a fixed order. Scalars may be Python numbers or 0-d tensors;
results stay on the device, so nothing here synchronises with the host. What each op computes is
stated once, in ``xsam.ops.contract``. Callers that apply many ops to the same tensors keep
``layout=Layout.of(first_list)`` between calls, so no call repeats per-tensor Python work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .dispatch import (BACKEND_NAMES, BackendLoadWarning, BackendUnavailableError, check_backend_name, describe,
                       resolve)
from .layout import Layout, dtensor_type
from .reference import accumulation_dtype
from .runner import run

__all__ = ["BACKEND_NAMES", "BackendLoadWarning", "BackendUnavailableError", "Layout", "PowerStats",
           "accumulation_dtype", "axpy_", "check_backend_name", "copy_", "correct_restore_", "describe",
           "dots", "dtensor_type", "gradients", "perturb_", "power_update_", "residual_sumsq", "resolve",
           "scale_copy_", "tilted_perturb_", "weighted_sumsq"]

Tensors = Sequence[Tensor]


def dots(lists: Sequence[Tensors], pairs: Sequence[tuple[int, int]], *, backend: str = "auto",
         layout: Layout | None = None) -> Tensor:
    """``out[k] = sum over all tensors of <lists[a], lists[b]>`` for ``(a, b) = pairs[k]``.

    The result is a 1-d fp32 tensor (fp64 when any input is fp64) on the device of the
    first group.
    """
    flat_pairs = [int(i) for pair in pairs for i in pair]
    for i in flat_pairs:
        if not 0 <= i < len(lists):
            raise ValueError(f"pairs={list(pairs)!r} names list {i}, but only lists 0..{len(lists) - 1} were given")
    return run("dots", {f"lists[{j}]": lst for j, lst in enumerate(lists)}, {}, {"pairs": flat_pairs},
               backend, layout)


def weighted_sumsq(weights: Tensors, xs: Tensors, *, backend: str = "auto", layout: Layout | None = None) -> Tensor:
    """``sum ||w * x||^2`` over the lists, as a 0-d tensor."""
    return run("weighted_sumsq", {"weights": weights, "xs": xs}, {}, {}, backend, layout).reshape(())


def residual_sumsq(us: Tensors, vs: Tensors, lam, *, backend: str = "auto", layout: Layout | None = None) -> Tensor:
    """``sum ||u - lam * v||^2`` over the lists, element by element (no cancellation), as a 0-d tensor."""
    return run("residual_sumsq", {"us": us, "vs": vs}, {"lam": lam}, {}, backend, layout).reshape(())


def perturb_(params: Tensors, grads: Tensors, saved: Tensors, scale, *, adaptive: bool = False,
             backend: str = "auto", layout: Layout | None = None) -> None:
    """``saved = w``, then ``w += scale * g`` (``scale * w * w * g`` when adaptive)."""
    run("perturb_", {"params": params, "grads": grads, "saved": saved}, {"scale": scale},
        {"adaptive": bool(adaptive)}, backend, layout)


def tilted_perturb_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors, a, b, *, backend: str = "auto",
                    layout: Layout | None = None) -> None:
    """``saved = w``, then ``w += a * g + b * v`` (Eigen-SAM's ascent)."""
    run("tilted_perturb_", {"params": params, "grads": grads, "saved": saved, "vecs": vecs}, {"a": a, "b": b}, {},
        backend, layout)


def correct_restore_(params: Tensors, grads: Tensors, saved: Tensors, vecs: Tensors | None, a, b,
                     *, backend: str = "auto", layout: Layout | None = None) -> None:
    """``g = a * g - b * v`` (``a * g`` without ``vecs``) and ``w = saved``, in one pass."""
    run("correct_restore_", {"params": params, "grads": grads, "saved": saved, "vecs": vecs}, {"a": a, "b": b}, {},
        backend, layout)


def axpy_(ys: Tensors, xs: Tensors, alpha, *, backend: str = "auto", layout: Layout | None = None) -> None:
    """``y += alpha * x``."""
    run("axpy_", {"ys": ys, "xs": xs}, {"alpha": alpha}, {}, backend, layout)


def scale_copy_(dsts: Tensors, srcs: Tensors, scale, *, backend: str = "auto", layout: Layout | None = None) -> None:
    """``dst = scale * src``."""
    run("scale_copy_", {"dsts": dsts, "srcs": srcs}, {"scale": scale}, {}, backend, layout)


def gradients(tensors: Tensors) -> tuple[list[Tensor | None], int]:
    """``([t.grad for t in tensors], how many of them are None)``: host work, no op.

    An optimizer gathers every parameter's gradient after each pass; with the extension the
    loop runs in C++ for plain tensors and ``nn.Parameter`` (anything else reads ``.grad`` in Python).
    """
    from . import native_backend  # loads the extension on first use, as the backends do

    return native_backend.gradients(tensors)


def copy_(dsts: Tensors, srcs: Tensors) -> None:
    """``dst = src`` bit for bit (restoring saved weights); DTensors shard by shard.

    A plain copy needs no backend; it exists here because ``torch._foreach_copy_`` has no
    DTensor sharding rule ("aten._foreach_copy_.default does not have a sharding strategy").
    """
    if len(dsts) != len(srcs):
        raise ValueError(f"dsts has {len(dsts)} tensors but srcs has {len(srcs)}; the lists must be aligned")
    if not len(dsts):
        return
    cls = dtensor_type()
    if cls is not None and isinstance(dsts[0], cls):
        from .sharded import local_lists

        dsts, srcs = local_lists([dsts, srcs], ["dsts", "srcs"])
    torch._foreach_copy_(list(dsts), list(srcs))


@dataclass
class PowerStats:
    """Per-vector results of one power-iteration update (1-d device tensors of length m)."""

    eigenvalues: Tensor  # Rayleigh quotients <v, Hv> / <v, v>, with their sign
    residuals: Tensor  # ||Hv - lambda v||
    norms: Tensor  # ||Hv||


def power_update_(us: Sequence[Tensors], vs: Sequence[Tensors], *, eps: float = 1e-12, backend: str = "auto",
                  layout: Layout | None = None) -> PowerStats:
    """One power-iteration update for m vectors: ``v_j <- u_j / (||u_j|| + eps)`` with ``u_j = H v_j``.

    One fused reduction gives {<u,u>, <v,u>, <v,v>} for every j (Rayleigh quotient and norm), one
    more the residual ``||u - lambda v||`` element by element (``residual_sumsq``: no cancellation),
    then one scaling pass per vector writes the new v_j. For m > 1 the caller re-orthonormalises
    afterwards (block power iteration).
    """
    m = len(vs)
    if layout is None and m:
        layout = Layout.of(vs[0])
    pairs = [pair for j in range(m) for pair in ((j, j), (m + j, j), (m + j, m + j))]
    sums = dots(list(us) + list(vs), pairs, backend=backend, layout=layout).reshape(m, 3)
    uu, vu, vv = sums[:, 0], sums[:, 1], sums[:, 2]
    lam = vu / torch.where(vv > 0, vv, torch.ones_like(vv))
    residuals = torch.stack([residual_sumsq(us[j], vs[j], lam[j], backend=backend, layout=layout)
                             for j in range(m)]).sqrt()
    norms = uu.sqrt()
    inv = 1.0 / (norms + eps)
    for j in range(m):
        scale_copy_(vs[j], us[j], inv[j], backend=backend, layout=layout)
    return PowerStats(eigenvalues=lam, residuals=residuals, norms=norms)
