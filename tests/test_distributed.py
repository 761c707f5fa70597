"""DDP with gloo, 2 processes on CPU: identical replicas, and the single-process / flat oracles.

One mp.spawn runs every configuration in turn (a spawn costs seconds); each rank
saves its weights and eigenvector, and the parent compares them with each other
(bit for bit) and with oracles computed here in one process:
- mode (a), synchronised perturbation: the single-process XSAM run on the
  concatenated batch (float64, tight tolerance);
- mode (b), per-replica perturbation: a flat float64 computation of the step in
  which each replica perturbs by its own half-batch gradient.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call, grad

from xsam import XSAM
from xsam.hessian import random_vectors

WORLD, STEPS, SEED = 2, 5, 7
HYPER = dict(lr=0.1, momentum=0.9, rho=0.05, alpha=0.5, eig_interval=2, power_iters=3)
CONFIGS = {  # name: (hvp, per_replica_perturbation)
    "sync_exact": ("exact", False),
    "sync_fd": ("finite_difference", False),
    "replica_exact": ("exact", True),
}


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def full_batch(step):
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randn(8, 5, generator=gen, dtype=torch.float64), torch.randn(8, 2, generator=gen, dtype=torch.float64)


def shard(tensor, rank):
    return tensor.chunk(WORLD)[rank]


def loss_of(model, x, y):
    return (model(x) - y).square().mean()


def train(model, opt, rank=None, forward_model=None):
    """STEPS steps; with rank, on that rank's half of each batch."""
    forward_model = forward_model or model
    for t in range(STEPS):
        x, y = full_batch(t)
        if rank is not None:
            x, y = shard(x, rank), shard(y, rank)

        def closure():
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        opt.step(closure, loss_fn=lambda: loss_of(forward_model, x, y))


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for name, (hvp, per_replica) in CONFIGS.items():
            ddp = nn.parallel.DistributedDataParallel(make_model())
            opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp=hvp, model=ddp, per_replica_perturbation=per_replica,
                       seed=SEED, **HYPER)
            train(ddp, opt, rank, forward_model=ddp.module)
            torch.save({"weights": [p.detach() for p in ddp.parameters()], "eigenvector": opt.eigenvector(),
                        "refreshes": opt.diagnostics()["refreshes"]},
                       os.path.join(out_dir, f"{name}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return {name: [torch.load(tmp / f"{name}_{r}.pt", weights_only=True) for r in range(WORLD)] for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_rank_holds_bit_identical_weights_and_eigenvectors(ddp_results, name):
    r0, r1 = ddp_results[name]
    assert r0["refreshes"] == r1["refreshes"] == 3
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    assert all(torch.equal(a, b) for a, b in zip(r0["eigenvector"], r1["eigenvector"]))


@pytest.mark.parametrize("name", ["sync_exact", "sync_fd"])
def test_synchronised_perturbation_matches_single_process_full_batch(ddp_results, name):
    model = make_model()
    opt = XSAM(model.parameters(), torch.optim.SGD, hvp=CONFIGS[name][0], seed=SEED, **HYPER)
    train(model, opt)
    got = ddp_results[name][0]
    tol = 1e-10 if name == "sync_exact" else 1e-7  # finite differences round differently per batch split
    for a, b in zip(got["weights"], model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=tol, atol=tol)
    for a, b in zip(got["eigenvector"], opt.eigenvector()):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def per_replica_oracle():
    """Mode (b) on flat float64 vectors: replica r perturbs by grad L_r, the update averages the perturbed grads."""
    model = make_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def unflatten(w):
        return dict(zip(names, (c.view(s) for c, s in zip(w.split(sizes), shapes))))

    def loss(w, x, y):
        return (functional_call(model, unflatten(w), (x,)) - y).square().mean()

    grad_loss = grad(loss)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(SEED)
    eps, v, buf = 1e-12, None, None
    for t in range(STEPS):
        x, y = full_batch(t)
        if t % HYPER["eig_interval"] == 0:
            if v is None:
                v = torch.cat([r.reshape(-1) for r in random_vectors(list(model.parameters()), 1, gen)[0]])
            v = v / (v.norm() + eps)
            for _ in range(HYPER["power_iters"]):  # H of the full-batch mean loss = mean of the halves' H
                u = torch.autograd.functional.hvp(lambda w_: loss(w_, x, y), w, v)[1]
                v = u / (u.norm() + eps)
        perturbed_grads = []
        for r in range(WORLD):
            xr, yr = shard(x, r), shard(y, r)
            g = grad_loss(w, xr, yr)
            perturbed_grads.append(grad_loss(w + HYPER["rho"] * g / (g.norm() + eps), xr, yr))
        ga = torch.stack(perturbed_grads).mean(0)
        gh = ga / (ga.norm() + eps)
        g_corr = gh - HYPER["alpha"] * (gh @ v).abs() * v
        buf = g_corr if buf is None else HYPER["momentum"] * buf + g_corr
        w = w - HYPER["lr"] * buf
    return w, v


def test_per_replica_perturbation_matches_flat_oracle(ddp_results):
    w, v = per_replica_oracle()
    got = ddp_results["replica_exact"][0]
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in got["weights"]]), w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in got["eigenvector"]]), v, rtol=1e-10, atol=1e-10)
    # And it really is a different step from mode (a): the first pass was not all-reduced.
    sync = torch.cat([t.reshape(-1) for t in ddp_results["sync_exact"][0]["weights"]])
    assert (sync - w).abs().max() > 1e-6


def test_per_replica_perturbation_needs_a_ddp_model():
    with pytest.raises(ValueError, match="per_replica_perturbation=True needs model="):
        XSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, per_replica_perturbation=True)
    with pytest.raises(ValueError, match="process_group='everyone' is invalid"):
        XSAM(make_model().parameters(), torch.optim.SGD, lr=0.1, process_group="everyone")
