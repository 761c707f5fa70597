"""Fake (meta) implementations of the op set, derived from ``xsam.ops.contract``: element-wise ops return
nothing, reductions a 1-d tensor of the accumulation dtype whose length the contract gives."""
from __future__ import annotations

import functools

import torch

from .contract import OPS, OpSpec
from .reference import accumulation_dtype


def _fake_for(spec: OpSpec):
    names = spec.argument_names()

    def fake(*args, **kwargs):
        bound = dict(zip(names, args), **kwargs)
        if not spec.is_reduction:
            return None
        first = bound[spec.list_args[0]]
        n = spec.result_len(bound)
        if len(first) == 0:  # no tensor says otherwise: fp32 on the CPU, as every backend returns
            return torch.empty((n,), dtype=torch.float32)
        return first[0].new_empty((n,), dtype=accumulation_dtype(first[0].dtype))

    return fake


@functools.cache
def register_fakes(namespace: str) -> None:
    """Register the fake of every op under ``namespace`` (once per process)."""
    for spec in OPS.values():
        torch.library.register_fake(f"{namespace}::{spec.name}")(_fake_for(spec))
