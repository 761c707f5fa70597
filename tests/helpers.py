"""Shared test fixtures: flat-vector views, a quadratic with a known Hessian, a seeded MLP and its regression
training loop, state comparisons, spawned multi-process runs and a small BatchNorm run that repeats bit for bit."""
from __future__ import annotations

import contextlib
import copy
import functools
import io
from datetime import timedelta

import torch
from torch import nn


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors])


def unflat(vector: torch.Tensor, like) -> list[torch.Tensor]:
    return [piece.reshape(t.shape).to(t.dtype) for piece, t in zip(vector.split([t.numel() for t in like]), like)]


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
        return closure_of(self.loss)()

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        return self.A @ w + self.b

    def sgd_oracle(self, steps: int, seed: int, lr, ascent, descent, refresh: bool = True, eps: float = 1e-12):
        """Plain SGD steps of a SAM-type method on flat float64 vectors: every second step 5 power iterations
        refresh v, ``e = ascent(w, g, v)``, ``w -= lr * descent(g_adv, v)``. Returns w and each step's
        {"g", "ga", "v", "eigenvalue"} (the Rayleigh quotient of the last iteration's input)."""
        from xsam.hessian import random_vectors

        w, gen, v, lam, history = flat(self.params), torch.Generator().manual_seed(seed), None, None, []
        for t in range(steps):
            if refresh and t % 2 == 0:
                v = flat(random_vectors(self.params, 1, gen)[0]) if v is None else v
                v = v / (v.norm() + eps)
                for _ in range(5):
                    u = self.A @ v
                    lam = v @ u
                    v = u / (u.norm() + eps)
            g = self.grad(w)
            ga = self.grad(w + ascent(w, g, v))
            w = w - lr * descent(ga, v)
            history.append({"g": g, "ga": ga, "v": v, "eigenvalue": lam})
        return w, history

    def two_groups(self, rho, alpha, lr, /, **extra) -> list[dict]:
        """Param groups {p0} and {p1, p2} with per-group (rho, alpha, lr) pairs; ``extra`` (any key, alpha
        included) overrides them in both."""
        g0 = {"params": self.params[:1], "rho": rho[0], "alpha": alpha[0], "lr": lr[0]}
        g1 = {"params": self.params[1:], "rho": rho[1], "alpha": alpha[1], "lr": lr[1]}
        return [dict(g0, **extra), dict(g1, **extra)]

    def per_element(self, values) -> torch.Tensor:
        """A flat float64 vector holding values[0] on p0's elements and values[1] on the others."""
        n0 = self.params[0].numel()
        out = torch.full((sum(p.numel() for p in self.params),), float(values[1]), dtype=torch.float64)
        out[:n0] = values[0]
        return out


def assert_each_close(xs, ys, **tolerances) -> None:
    """``torch.testing.assert_close`` on each pair of the two sequences."""
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a, b, **tolerances)


def make_model(*sizes, seed=0, dtype=torch.float64) -> nn.Sequential:
    """Linear layers of these widths with Tanh between, initialised after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    layers = [m for d_in, d_out in zip(sizes, sizes[1:]) for m in (nn.Linear(d_in, d_out), nn.Tanh())]
    return nn.Sequential(*layers[:-1]).to(dtype)


def regression_batches(steps, seed, n, d_in, d_out, rank=None, world=2):
    """For each t in ``steps``, float64 (x, y) of n rows drawn from ``seed + t``; with ``rank``, that rank's
    share of the rows out of ``world``."""
    for t in steps:
        gen = torch.Generator().manual_seed(seed + t)
        x = torch.randn(n, d_in, generator=gen, dtype=torch.float64)
        y = torch.randn(n, d_out, generator=gen, dtype=torch.float64)
        yield (x, y) if rank is None else (x.chunk(world)[rank], y.chunk(world)[rank])


def mse(model, x, y, **kwargs) -> torch.Tensor:
    return (model(x, **kwargs) - y).square().mean()


def closure_of(loss_fn):
    """The closure ``opt.step`` takes: ``loss_fn()``, backpropagated and returned."""
    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    return closure


def train(model, opt, batches, offer_loss_fn=False) -> None:
    """``opt.step`` with a mean-squared-error closure on each (x, y); with ``offer_loss_fn``, ``loss_fn=``
    gets the same loss, as a user would pass it."""
    for x, y in batches:
        loss_fn = functools.partial(mse, model, x, y)
        opt.step(closure_of(loss_fn), **({"loss_fn": loss_fn} if offer_loss_fn else {}))


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


@contextlib.contextmanager
def gloo_group(init_method: str, rank: int, world: int):
    """The default process group on gloo for the ``with`` block; ranks that disagree (e.g. about skipping
    a step) issue mismatched collectives, and the 60 s timeout turns that into a failure, not a hang."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


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


def spawned_results(worker, tmp_path, nprocs: int, timeout: float) -> list:
    """Runs ``worker(rank, init_file, out_dir)`` in ``nprocs`` processes and loads the ``rank{r}.pt`` each saved."""
    spawn_and_wait(worker, (str(tmp_path / "init"), str(tmp_path)), nprocs, timeout)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(nprocs)]


def snapshot(model, opt) -> tuple[list[torch.Tensor], dict]:
    """The weights and a deep copy of the optimizer's state_dict, to compare after a step."""
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def same_bits(xs, ys) -> bool:
    """Each pair of tensors of the two sequences equal, bit for bit."""
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


def assert_same_state(a, b) -> None:
    """Nested state (dicts, lists, tensors, numbers) equal leaf by leaf; tensors in bits and dtype, NaN equal to NaN."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor)
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y)
    else:
        assert a == b or (a != a and b != b)  # NaN equal to NaN


def make_bn_run(cls, seed: int = 0):
    """A small CNN with BatchNorm and an eigenvector optimizer (`cls`: XSAM or EigenSAM) over it, for
    runs that must repeat bit for bit (checkpoints, BatchNorm statistics)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-4, eig_interval=3,
              power_iters=2, hvp="finite_difference", model=model)
    return model, opt


def bn_batch(t: int):
    """Batch t of a make_bn_run run: the same inputs whatever ran before."""
    gen = torch.Generator().manual_seed(100 + t)
    return torch.randn(8, 1, 6, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)


def train_bn_run(model, opt, steps: int, start: int = 0) -> None:
    for t in range(start, start + steps):
        x, y = bn_batch(t)
        opt.step(closure_of(lambda: nn.functional.cross_entropy(model(x), y)))


def resumed_halfway(cls, steps: int):
    """Two make_bn_run runs of 2 * steps: (model, opt) trained straight through, and (model, opt) of a
    fresh run (other initial weights) that loaded a checkpoint saved after `steps` steps and went on."""
    model_a, opt_a = make_bn_run(cls)
    train_bn_run(model_a, opt_a, 2 * steps)
    model_b, opt_b = make_bn_run(cls)
    train_bn_run(model_b, opt_b, steps)
    ckpt = through_torch_save({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    model_c, opt_c = make_bn_run(cls, seed=123)  # different initial weights, overwritten by the load
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train_bn_run(model_c, opt_c, steps, start=steps)
    return (model_a, opt_a), (model_c, opt_c)


def scaled_or_plain_steps(opt, scaler, closure, steps: int, use_scaler: bool, **step_kwargs) -> None:
    """``steps`` optimizer steps, through ``scaler.step`` / ``scaler.update`` or plainly (the closure scales
    its loss when ``use_scaler``); ``step_kwargs`` (``loss_fn=``) go to every step."""
    for _ in range(steps):
        if use_scaler:
            scaler.step(opt, closure, **step_kwargs)
            scaler.update()
        else:
            opt.step(closure, **step_kwargs)


def set_eigenvector(opt, params, v) -> None:
    """Store the flat vector ``v`` as ``opt``'s eigenvector of ``params``, as a refresh at step 0 would."""
    opt.state["xsam"].update(step=1, refreshes=1)
    for p, piece in zip(params, torch.split(v, [p.numel() for p in params])):
        opt.state[p]["eigenvector"] = piece.reshape(p.shape).clone()


def refreshes_in(steps: int, eig_interval: int, streaming: bool) -> int:
    """Eigenvector refreshes in ``steps`` steps from step 0: every step with streaming, else every eig_interval-th."""
    return steps if streaming else -(-steps // eig_interval)


def through_torch_save(obj):
    """``obj`` as ``torch.save`` and ``torch.load(weights_only=True)`` give it back (a checkpoint file)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def scaled_run_with_a_poisoned_attempt(opt, scaler, loss_of, batches, poisoned_step: int, poisoned_call,
                                       loss_fn_of=None) -> dict:
    """Scaled steps on ``batches`` (``loss_of(x, y)`` the forward, ``loss_fn_of(x, y)`` the steps' ``loss_fn``);
    step ``poisoned_step`` is first attempted with an inf in the first parameter's local gradient after closure
    call ``poisoned_call`` (None: not on this rank), then taken on the same batch. Returns what the attempt left."""
    from xsam.distributed import is_dtensor

    params = [p for group in opt.param_groups for p in group["params"]]

    def local_weights():
        return [(p.to_local() if is_dtensor(p) else p).detach().clone() for p in params]

    attempt = None
    for t, (x, y) in enumerate(batches):
        for poisoned in (True, False) if t == poisoned_step else (False,):
            calls = [0]

            def closure():
                calls[0] += 1
                loss = loss_of(x, y)
                scaler.scale(loss).backward()
                if poisoned and calls[0] == poisoned_call:
                    grad = params[0].grad
                    (grad.to_local() if is_dtensor(grad) else grad).view(-1)[0] = float("inf")
                return loss

            before, scale_before = local_weights(), scaler.get_scale()
            scaler.step(opt, closure, **({} if loss_fn_of is None else {"loss_fn": lambda: loss_fn_of(x, y)}))
            scaler.update()
            if poisoned:
                diagnostics = opt.diagnostics()
                attempt = {"weights_unchanged": same_bits(before, local_weights()), "scale_before": scale_before,
                           "scale_after": scaler.get_scale(), "closure_calls": calls[0],
                           "skipped_steps": diagnostics["skipped_steps"], "step": diagnostics["step"]}
    return attempt


def assert_skipped(attempt: dict, scale_before: float, step: int) -> None:
    """The poisoned attempt of ``scaled_run_with_a_poisoned_attempt`` was skipped: nothing moved, the scale halved."""
    assert attempt["weights_unchanged"] and attempt["skipped_steps"] == 1 and attempt["step"] == step
    assert attempt["scale_before"] == scale_before and attempt["scale_after"] == scale_before / 2


def raising_on_call(n: int, closure):
    """``closure``, except that its n-th call raises RuntimeError("boom")."""
    calls = []

    def wrapped():
        calls.append(None)
        if len(calls) == n:
            raise RuntimeError("boom")
        return closure()

    return wrapped
