"""Model state a SAM-type step must control: BatchNorm running statistics and the train/eval mode.

Only the first (unperturbed) pass of a step may update BatchNorm running statistics, and a step that
fails puts them back as they were (a retry must not count the batch twice).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn

__all__ = ["BatchNormState", "batchnorm_layers", "batchnorm_statistics_frozen", "eval_mode"]


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


class BatchNormState:
    """The running statistics (mean, var, num_batches_tracked) of a model's BatchNorm layers at one moment."""

    def __init__(self, buffers: list[tuple[Tensor, Tensor]]):
        self._buffers = buffers  # (live buffer, saved copy)

    @classmethod
    def capture(cls, model: nn.Module | None) -> "BatchNormState | None":
        if model is None:
            return None
        buffers = [(b, b.detach().clone()) for m in batchnorm_layers(model)
                   for b in m.buffers(recurse=False) if b is not None]
        return cls(buffers) if buffers else None

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self._buffers:
            live.copy_(saved)


@contextlib.contextmanager
def batchnorm_statistics_frozen(model: nn.Module | None) -> Iterator[None]:
    """Run the block with ``model``'s BatchNorm running statistics put back exactly afterwards (the second
    pass, HVP evaluations). Without a model it does nothing."""
    state = BatchNormState.capture(model)
    try:
        yield
    finally:
        if state is not None:
            state.restore()


@contextlib.contextmanager
def eval_mode(model: nn.Module | None, enabled: bool = True) -> Iterator[None]:
    """``model.eval()`` for the block, then every module's own training flag back."""
    if model is None or not enabled:
        yield
        return
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag
