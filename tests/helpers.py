"""Shared test fixtures: flat-vector views and a quadratic with a known Hessian."""
from __future__ import annotations

import torch


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def unflat(vector: torch.Tensor, like) -> list[torch.Tensor]:
    out, i = [], 0
    for t in like:
        out.append(vector[i:i + t.numel()].reshape(t.shape).to(t.dtype))
        i += t.numel()
    return out


SHAPES = [(2, 3), (4,), (1, 1, 2)]  # 12 elements over three tensors of different rank
EIGENVALUES = [-7.0, 4.0, 3.999, 1.0, 0.5, 0.2, -0.1, 0.05, 0.02, 0.01, -0.005, 0.001]


class Quadratic:
    """L(w) = 0.5 w^T A w + b^T w with A = Q diag(EIGENVALUES) Q^T, w split over SHAPES.

    The largest |lambda| is negative (-7) and 4 / 3.999 are a near-degenerate pair.
    """

    def __init__(self, dtype=torch.float64, seed=0):
        gen = torch.Generator().manual_seed(seed)
        n = sum(torch.Size(s).numel() for s in SHAPES)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        self.eigenvalues = torch.tensor(EIGENVALUES, dtype=torch.float64)
        self.eigenvectors = q
        self.A = q @ torch.diag(self.eigenvalues) @ q.T
        self.A = 0.5 * (self.A + self.A.T)
        self.b = torch.randn(n, generator=gen, dtype=torch.float64)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
                       for s in SHAPES]
        self.dtype = dtype

    def loss(self) -> torch.Tensor:
        w = torch.cat([p.reshape(-1) for p in self.params]).to(torch.float64)
        return (0.5 * w @ self.A @ w + self.b @ w).to(self.dtype)

    def closure(self) -> torch.Tensor:
        loss = self.loss()
        loss.backward()
        return loss

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        return self.A @ w + self.b


def error_of(fn) -> str | None:
    """``"Type: message"`` of what ``fn()`` raised, or None: a spawned worker reports refusals this way."""
    try:
        fn()
    except Exception as exc:  # the parent process checks type and message
        return f"{type(exc).__name__}: {exc}"
    return None


def free_port() -> int:
    """A free TCP port on the loopback interface, for an env:// rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_and_wait(worker, args: tuple, nprocs: int, timeout: float) -> None:
    """``mp.spawn(worker, args, nprocs)``, failing the test (and killing the processes) after ``timeout`` seconds."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):  # False while a process still runs; raises if one failed
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {nprocs}-process run did not finish within {timeout:.0f} s")
