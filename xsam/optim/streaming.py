"""``hvp="streaming"``: Oja's update of v from the product SAM's two passes already contain (no evaluation).

Every step feeds ``z = g - g_adv ~ -H e`` (e the perturbation) to
``v <- (v + gamma <z^, v> z^) / ||...||`` with ``z^ = z / ||z||`` (docs/tracking/).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .. import ops
from ..distributed import all_reduce_mean_
from ..hessian import random_vectors
from .eigenvector import STREAMING_RATE, PendingRefresh, TrackerInputs, replica_group
from .lists import ParamLists, scratch_like

__all__ = ["StreamedDescent", "StreamingUpdate"]


@dataclass
class StreamedDescent:
    """What X-SAM's descent needs from a streaming update: the new v and the sums of g_adv with it."""

    vectors: list[Tensor]  # the new v, aligned with the descent's parameters (scratch until commit)
    gg: Tensor  # ||g_adv||^2
    gv: Tensor  # <g_adv, new v>
    refresh: PendingRefresh  # the new v as it is committed with the step


class StreamingUpdate:
    """The first pass's gradient, kept until the second pass, and Oja's update of v from both."""

    def __init__(self):
        # A buffer for the first pass's gradient, reused across steps with the same lists.
        self._lists: ParamLists | None = None
        self._buffer: list[Tensor] | None = None

    def scratch_tensors(self) -> list[Tensor]:
        """The buffer of the first pass's gradient (memory, not state)."""
        return list(self._buffer or [])

    def capture_first_pass(self, inputs: TrackerInputs, lists: ParamLists, active: ParamLists,
                           grads: list[Tensor]) -> list[Tensor]:
        """A copy of the first pass's g (the second pass overwrites .grad), held by the step transaction:
        aligned with ``lists`` (zeros where a parameter has no first-pass gradient), and with
        ``per_replica_perturbation`` averaged over the DDP group, so every replica computes the same v."""
        if lists is not self._lists:
            self._buffer = scratch_like(lists.params)
            self._lists = lists
        buffer = self._buffer
        with torch.no_grad():
            if active is lists:
                ops.copy_(buffer, grads)
            else:
                by_id = dict(zip(map(id, active.params), grads))
                for p, b in zip(lists.params, buffer):
                    g = by_id.get(id(p))
                    b.copy_(g) if g is not None else b.zero_()
            if inputs.per_replica_perturbation:
                all_reduce_mean_(buffer, replica_group(inputs))
        return buffer

    @staticmethod
    def stream(inputs: TrackerInputs, lists: ParamLists, first_pass: list[Tensor], active: ParamLists,
               grads: list[Tensor], vecs: list[Tensor] | None) -> StreamedDescent:
        """Oja's update of v from ``z = g - g_adv``, before the correction uses it: ``first_pass`` is what
        ``capture_first_pass`` returned for ``lists``, ``grads`` g_adv aligned with ``active``, ``vecs`` the
        stored v (None before the first); the new v and the correction's sums come from one fused reduction."""
        if active is lists:
            z = first_pass
        else:
            by_id = dict(zip(map(id, lists.params), first_pass))
            z = [by_id[id(p)] for p in active.params]
        generator = torch.Generator()
        generator.set_state(inputs.global_state["generator"])
        start = vecs
        if start is None:  # the first v: z^ itself (one power step from the perturbation), else the seeded draw
            start = random_vectors(active.params, 1, generator)[0]
        layout, backend = active.layout, inputs.backend
        with torch.no_grad():
            ops.axpy_(z, grads, -1.0, backend=backend, layout=layout)  # z = g - g_adv ~ -H e
            s = ops.dots([grads, start, z], [(0, 0), (0, 1), (2, 2), (2, 1), (0, 2), (1, 1)], backend=backend,
                         layout=layout)
            gg, gv, zz, zv, gz, vv = s.unbind()
            accepted = torch.isfinite(zz) & (zz > 0) & torch.isfinite(zv) & torch.isfinite(gz)
            safe_zz = torch.where(accepted, zz, torch.ones_like(zz))
            if vecs is None:  # v = z^
                cv, cz = torch.zeros_like(zz), safe_zz.rsqrt()
            else:  # v + gamma <z^, v> z^, normalised (||v|| = 1 up to rounding, kept exact with vv)
                proj = STREAMING_RATE * zv / safe_zz
                norm = (vv + (2.0 + STREAMING_RATE) * STREAMING_RATE * zv * zv / safe_zz).sqrt()
                cv, cz = 1.0 / norm, proj / norm
            keep = 1.0 / vv.sqrt()  # a rejected update keeps v (or the normalised start vector)
            cv, cz = torch.where(accepted, cv, keep), torch.where(accepted, cz, torch.zeros_like(cz))
            ops.scale_copy_(z, z, cz, backend=backend, layout=layout)
            ops.axpy_(z, start, cv, backend=backend, layout=layout)  # z now holds the new v
            fallback = vecs if vecs is not None else [t * keep for t in start]
        nan = torch.full_like(zz, float("nan"))  # Oja's rule estimates no eigenvalue
        refresh = PendingRefresh(params=list(active.params), vectors=z, eigenvalue=nan, residual=nan,
                                 accepted=accepted, iterations=0, generator_state=generator.get_state(),
                                 fallback=fallback)
        return StreamedDescent(vectors=z, gg=gg, gv=torch.where(accepted, cv * gv + cz * gz, keep * gv),
                               refresh=refresh)
