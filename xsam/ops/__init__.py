"""The functional op set of xsam, over lists of tensors of any devices and dtypes.

Each function takes aligned lists (tensor i of every list has the shape of tensor i of the
first), splits them into (device, dtype) groups (``Layout``), runs the chosen backend
(``xsam.ops.dispatch``) on every group, and, for reductions, adds the per-group partial
results in a fixed order. Scalar arguments may be Python numbers or 0-d tensors; results stay
on the device, so nothing here synchronises with the host. What each op computes is stated
once, in ``xsam.ops.contract``.

Callers that apply many ops to the same tensors pass ``layout=Layout.of(first_list)`` (kept
between calls) so that no call repeats per-tensor Python work: the optimizer does.

Sharded parameters (DTensors: FSDP2 ``fully_shard``, tensor parallelism) are handled in
``xsam.ops.sharded``, above the backends, so every backend serves them unchanged.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from . import reference
from .contract import OPS, OpSpec
from .dispatch import BACKEND_NAMES, BackendUnavailableError, check_backend_name, describe, resolve
from .layout import Group, Layout, LayoutError, dense_copies
from .reference import accumulation_dtype

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailableError",
    "Layout",
    "PowerStats",
    "accumulation_dtype",
    "axpy_",
    "check_backend_name",
    "copy_",
    "correct_restore_",
    "describe",
    "dots",
    "dtensor_type",
    "gradients",
    "perturb_",
    "power_update_",
    "residual_sumsq",
    "resolve",
    "scale_copy_",
    "tilted_perturb_",
    "weighted_sumsq",
]

Tensors = Sequence[Tensor]


def dtensor_type() -> type | None:
    """The DTensor class, or None while ``torch.distributed.tensor`` is not imported.

    A DTensor cannot exist before its module is imported, so looking it up in sys.modules
    spares every ``import xsam`` the ~0.7 s that importing torch.distributed.tensor costs.
    """
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


# ---------------------------------------------------------------- running one op on one group

def call_backend(impl, spec: OpSpec, args: dict):
    """Run ``spec`` on one (device, dtype) group; dense copies when the backend asks for them."""
    fn = getattr(impl, spec.name)
    try:
        return fn(**args)
    except LayoutError as exc:
        dense, copy_back = dense_copies(spec, args, exc.contiguous_only)
        out = fn(**dense)
        for original, copy in copy_back:
            original.copy_(copy)
        return out


def _scalar(value, device: torch.device, acc: torch.dtype) -> Tensor:
    """A 0-d tensor of the accumulation dtype on ``device``, with no host sync."""
    if isinstance(value, Tensor):
        if value.device == device and value.dtype == acc and value.dim() == 0:
            return value
        # Non-blocking only towards an accelerator: a device-to-host copy with non_blocking=True
        # returns before the data arrives, and the CPU kernels would read it at once.
        return value.reshape(()).to(device=device, dtype=acc, non_blocking=device.type != "cpu")
    # torch.full launches a fill; torch.tensor would copy from the host and wait for the device.
    return torch.full((), float(value), device=device, dtype=acc)


def _result_dtype(layout: Layout) -> torch.dtype:
    return torch.float64 if any(g.dtype == torch.float64 for g in layout.groups) else torch.float32


def sum_partials(partials: list[Tensor], n: int, dtype: torch.dtype) -> Tensor:
    """Add per-group results in order on the first group's device (an empty list gives zeros)."""
    if not partials:
        return torch.zeros(n, dtype=dtype)
    home = partials[0].device
    total = partials[0].to(dtype)
    for p in partials[1:]:
        total = total + p.to(device=home, dtype=dtype, non_blocking=home.type != "cpu")
    return total


def run(name: str, lists: dict[str, Tensors | None], scalars: dict, other: dict, backend: str,
        layout: Layout | None):
    """Run op ``name`` over lists of any devices and dtypes (see the module docstring).

    ``lists`` maps the schema's list arguments to aligned lists (None for an absent optional
    list); for ``dots`` it is the lists to concatenate, under keys ``"0"``, ``"1"``, ...
    """
    spec = OPS[name]
    key = next(iter(lists.values()))
    if layout is None:
        layout = Layout.of(key)
    layout.check_aligned(list(lists.values()), list(lists))
    if layout.sharded:
        from . import sharded

        return sharded.run(spec, lists, scalars, other, backend)
    return run_local(spec, lists, scalars, other, backend, layout)


def run_local(spec: OpSpec, lists: dict, scalars: dict, other: dict, backend: str, layout: Layout):
    """``run`` for plain (local) tensors grouped by ``layout``."""
    partials = []
    for group in layout.groups:
        impl = resolve(backend, group.device, group.dtype)
        args = _group_args(spec, group, lists, scalars, other)
        out = call_backend(impl, spec, args)
        if spec.is_reduction:
            partials.append(out)
    if not spec.is_reduction:
        return None
    n = spec.result_len(other if spec.name == "dots" else {})
    if len(partials) == 1:
        return partials[0]
    return sum_partials(partials, n, _result_dtype(layout))


def _group_args(spec: OpSpec, group: Group, lists: dict, scalars: dict, other: dict) -> dict:
    acc = accumulation_dtype(group.dtype)
    args = {name: _scalar(value, group.device, acc) for name, value in scalars.items()}
    args.update(other)
    if spec.name == "dots":
        tensors: list[Tensor] = []
        for lst in lists.values():
            tensors += group.pick(lst)  # extends in C: no per-tensor Python work
        args["tensors"] = tensors
        args["num_lists"] = len(lists)
    else:
        for name, lst in lists.items():
            args[name] = None if lst is None else group.pick(lst)
    return args


# ---------------------------------------------------------------- the op set

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
    loop runs in C++ (about 15 ns a tensor instead of 50-75 in Python), for plain tensors and
    ``nn.Parameter`` (anything else reads ``.grad`` in Python, as the comprehension would).
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

    One fused reduction gives {<u,u>, <v,u>, <v,v>} for every j (Rayleigh quotient and norm),
    one more the residual ``||u - lambda v||`` element by element (the one-pass formula
    ``uu - lambda * vu`` cancels to 0 in fp32 long before the residual is small), then one
    scaling pass per vector writes the new v_j. For m > 1 the caller re-orthonormalises
    afterwards (block power iteration).
    """
    m = len(vs)
    if layout is None and m:
        layout = Layout.of(vs[0])
    lists = list(us) + list(vs)
    pairs = []
    for j in range(m):
        pairs += [(j, j), (m + j, j), (m + j, m + j)]
    sums = dots(lists, pairs, backend=backend, layout=layout).reshape(m, 3)
    uu, vu, vv = sums[:, 0], sums[:, 1], sums[:, 2]
    lam = vu / torch.where(vv > 0, vv, torch.ones_like(vv))
    residuals = torch.stack([residual_sumsq(us[j], vs[j], lam[j], backend=backend, layout=layout)
                             for j in range(m)]).sqrt()
    norms = uu.sqrt()
    inv = 1.0 / (norms + eps)
    for j in range(m):
        scale_copy_(vs[j], us[j], inv[j], backend=backend, layout=layout)
    return PowerStats(eigenvalues=lam, residuals=residuals, norms=norms)
