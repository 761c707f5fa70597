"""The fixed per-step cost of the optimizer objects, against what it would be without it.

- ``host``: the optimizer side of an X-SAM step through a real ``xsam.XSAM``
  (``first_step()`` then ``second_step()``: perturbation, correction, restore; no refresh,
  the eigenvector already computed; a base optimizer whose ``step`` does nothing) on 1,000
  tensors of 1,150 elements against one flat tensor of the same 1,150,000 elements, per
  backend. The gradients are set once, outside the timing: ``second_step`` leaves the
  corrected (normalised) direction in ``.grad``, which the next ``first_step`` reads, so
  the timed loop does only what the optimizer does. ``ratio`` (to the flat tensor, round by round):
  1 would mean no per-tensor cost at all.
- ``peer``: whole SAM training steps (forward and backward included) of ``xsam.SAM``
  against davda54/sam's SAM (``bench.baselines.PeerSAM``) on a 9-tensor 1-D CNN
  (``MNIST1DCNN``, batch 100), one CPU thread, fp32 and fp64: the loop every SAM user
  writes (forward, backward, ``first_step``, forward, backward, ``second_step``), the same
  for both. ``ratio`` (to davda54/sam) > 1: xsam is slower. (tests/test_bench.py checks that both
  take the same steps.)

Every configuration of a section runs interleaved, round by round (``bench.timing``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from xsam import SAM, XSAM

from .baselines import PeerSAM
from .models import MNIST1DCNN
from .ops_bench import available_backends
from .timing import TimingStats, paired_ratio, time_interleaved, unstable

HOST_TENSORS, HOST_ELEMENTS = 1000, 1150
PEER_BATCH = 100


class NoStep(torch.optim.Optimizer):
    """A base optimizer that does nothing: what is timed is the SAM-type wrapper alone."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def host_optimizer(n_tensors: int, numel: int, device: torch.device, dtype: torch.dtype, backend: str) -> XSAM:
    """An XSAM over ``n_tensors`` parameters of ``numel`` elements, with an eigenvector and gradients set."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [nn.Parameter(torch.randn(numel, generator=gen, device=device, dtype=dtype)) for _ in range(n_tensors)]
    opt = XSAM(params, NoStep, rho=0.05, alpha=0.2, hvp="finite_difference", backend=backend)

    def closure():  # the gradient of sum(w^2): H = 2 I, any vector is an eigenvector
        for p in params:
            p.grad = 2.0 * p.detach()
        return torch.zeros((), device=device)

    opt.refresh_eigenvector(closure)
    for p in params:
        p.grad = torch.randn(numel, generator=gen, device=device, dtype=dtype)
    return opt


def host_step(opt: XSAM) -> Callable[[], None]:
    def step():
        opt.first_step()
        opt.second_step()
    return step


def run_host(device: torch.device, *, rounds: int, block_seconds: float, backends: tuple[str, ...] | None = None,
             dtype: torch.dtype = torch.float32, n_tensors: int | None = None, numel: int | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    n_tensors, numel = n_tensors or HOST_TENSORS, numel or HOST_ELEMENTS
    chosen, _ = available_backends(device, dtype, backends)
    shapes = {f"{n_tensors}x{numel}": (n_tensors, numel), f"1x{n_tensors * numel}": (1, n_tensors * numel)}
    fns = {(name, backend): host_step(host_optimizer(count, size, device, dtype, backend))
           for backend in chosen for name, (count, size) in shapes.items()}
    stats = time_interleaved(fns, blocks=rounds, block_seconds=block_seconds, warmup_calls=3, device=device)
    flat = list(shapes)[1]
    rows = []
    for (name, backend), t in stats.items():
        ratio = paired_ratio(t, stats[(flat, backend)])
        rows.append(_row(f"host_{name}", "xsam_first+second_step", backend, device, dtype, shapes[name][0],
                         n_tensors * numel, t, ratio, f"1x{n_tensors * numel} (same backend)",
                         "optimizer side of an X-SAM step (no refresh, base step a no-op); ratio: "
                         f"over one flat tensor of {n_tensors * numel:,} elements, same backend"))
    log(f"  [overhead] host: {n_tensors} x {numel} vs 1 x {n_tensors * numel} done ({rounds} rounds)")
    return rows


def peer_stepper(optimizer: str, dtype: torch.dtype, backend: str | None, seed: int = 0) -> tuple[nn.Module, Callable]:
    """(model, one SAM training step) with ``xsam.SAM`` or davda54/sam's SAM, from the same weights and batch."""
    torch.manual_seed(seed)
    model = MNIST1DCNN().to(dtype)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(PEER_BATCH, 1, MNIST1DCNN.LENGTH, generator=gen, dtype=dtype)
    y = torch.randint(0, 10, (PEER_BATCH,), generator=gen)
    sgd = dict(lr=0.05, momentum=0.9)
    if optimizer == "davda54_sam":
        opt = PeerSAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, backend=backend, **sgd)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
    return model, step


def run_peer(*, rounds: int, block_seconds: float, backends: tuple[str, ...] | None = None,
             log: Callable[[str], None] = print) -> list[dict]:
    device = torch.device("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fns = {}
        for dtype in (torch.float32, torch.float64):
            fns[("davda54_sam", "-", dtype)] = peer_stepper("davda54_sam", dtype, None)[1]
            for backend in available_backends(device, dtype, backends)[0]:
                fns[("xsam_sam", backend, dtype)] = peer_stepper("xsam_sam", dtype, backend)[1]
        stats = time_interleaved(fns, blocks=rounds, block_seconds=block_seconds, warmup_calls=5, device=device)
    finally:
        torch.set_num_threads(threads)
    n_tensors = len(list(MNIST1DCNN().parameters()))
    numel = sum(p.numel() for p in MNIST1DCNN().parameters())
    rows = []
    for (name, backend, dtype), t in stats.items():
        ratio = paired_ratio(t, stats[("davda54_sam", "-", dtype)])
        rows.append(_row("mnist1d_cnn", name, backend, device, dtype, n_tensors, numel, t, ratio,
                         "davda54_sam (same dtype)", f"whole SAM step (2 forward+backward), batch {PEER_BATCH}, "
                         "1 thread; ratio: over davda54/sam's SAM, same dtype (>1: slower)"))
    log(f"  [overhead] peer: xsam.SAM vs davda54/sam done ({rounds} rounds)")
    return rows


def _row(model: str, op: str, impl: str, device: torch.device, dtype: torch.dtype, n_tensors: int, numel: int,
         t: TimingStats, ratio: TimingStats, ratio_to: str, note: str) -> dict:
    return {
        "section": "overhead", "model": model, "op": op, "impl": impl, "device": str(device),
        "dtype": str(dtype).replace("torch.", ""), "n_tensors": n_tensors, "n_elements": numel,
        "median_s": t.median, "q1_s": t.q1, "q3_s": t.q3, "min_s": t.minimum, "max_s": t.maximum,
        "spread": t.spread, "blocks": t.blocks, "calls_per_block": t.calls_per_block,
        "ratio": ratio.median, "ratio_q1": ratio.q1, "ratio_q3": ratio.q3, "ratio_to": ratio_to,
        "unstable": unstable(t, ratio), "note": note,
    }
