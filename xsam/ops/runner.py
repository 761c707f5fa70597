"""Running one op of the contract over aligned lists of any devices and dtypes (``xsam.ops`` is its
public face): split the lists into (device, dtype) groups, run the backend ``xsam.ops.dispatch``
picks on each group, and add the groups' partial sums of a reduction in a fixed order. DTensors go
through ``xsam.ops.sharded`` first.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .contract import OPS, OpSpec
from .dispatch import resolve
from .layout import Group, Layout, LayoutError, dense_copies
from .reference import accumulation_dtype


def call_backend(impl, spec: OpSpec, args: dict):
    """Run ``spec`` on one (device, dtype) group; dense copies when the backend asks for them."""
    fn = getattr(impl, spec.name)
    try:
        return fn(**args)
    except LayoutError:
        dense, copy_back = dense_copies(spec, args)
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


def sum_partials(partials: list[Tensor], n: int, dtype: torch.dtype) -> Tensor:
    """Add per-group results in order on the first group's device (an empty list gives zeros)."""
    if not partials:
        return torch.zeros(n, dtype=dtype)
    home = partials[0].device
    total = partials[0].to(dtype)
    for p in partials[1:]:
        total = total + p.to(device=home, dtype=dtype, non_blocking=home.type != "cpu")
    return total


def run(name: str, lists: dict[str, Sequence[Tensor] | None], scalars: dict, other: dict, backend: str,
        layout: Layout | None):
    """Run op ``name`` over lists of any devices and dtypes (see the docstring of ``xsam.ops``).

    ``lists`` maps the schema's list arguments to aligned lists (None for an absent optional list);
    for ``dots`` it is the lists to concatenate, under their names in messages (``"lists[0]"``, ...).
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
    return sum_partials(partials, n, torch.float64 if any(g.dtype == torch.float64 for g in layout.groups)
                        else torch.float32)


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
