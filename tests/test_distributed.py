"""DDP with gloo, 2 processes on CPU: identical replicas, and the single-process / flat oracles.

One mp.spawn runs every scenario in turn; each rank saves what it saw (weights, eigenvector, error
messages) and the parent compares the ranks bit for bit and with oracles computed in one process:
mode (a), synchronised perturbation, against the single-process run on the concatenated batch
(float64); mode (b), per-replica perturbation, against a flat float64 step in which each replica
perturbs by its own half-batch gradient. Ranks that disagree issue mismatched collectives: the gloo
timeout and the spawn deadline turn that into a failure instead of a hang.
"""
import functools
import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call, grad

from xsam import XSAM
from xsam.amp import SAMGradScaler
from xsam.hessian import random_vectors

from helpers import (assert_skipped, closure_of, error_of, flat, gloo_group, make_model, mse, refreshes_in,
                     regression_batches, scaled_run_with_a_poisoned_attempt, spawn_and_wait)

WORLD, STEPS, SEED = 2, 5, 7
SIZES = (5, 6, 2)  # the MLP's widths
HYPER = dict(lr=0.1, momentum=0.9, rho=0.05, alpha=0.5, eig_interval=2, power_iters=3)
CONFIGS = {  # name: (hvp, per_replica_perturbation, DDP keyword arguments, XSAM keyword arguments)
    "sync_exact": ("exact", False, {}, {}),
    "sync_fd": ("finite_difference", False, {}, {}),
    "replica_exact": ("exact", True, {}, {}),
    "sync_fd_bucket_view": ("finite_difference", False, {"gradient_as_bucket_view": True}, {}),
    # hvp_eval_mode=False: the products reuse the first pass's gradients (views into the buckets).
    "sync_forward_bucket_view": ("forward_difference", False, {"gradient_as_bucket_view": True},
                                 {"hvp_eval_mode": False}),
    # Mode (a) is fine with a static graph (mode (b) is refused, see run_refusals).
    "sync_fd_static_graph": ("finite_difference", False, {"static_graph": True}, {}),
    "sync_forward_train_mode": ("forward_difference", False, {}, {"hvp_eval_mode": False}),
    # Mode (b): the first pass's gradients are each rank's own, the products' are averaged.
    "replica_forward_train_mode": ("forward_difference", True, {}, {"hvp_eval_mode": False}),
    "sync_streaming": ("streaming", False, {}, {}),
    "replica_streaming": ("streaming", True, {}, {}),
}
REFERENCES = {  # DDP run: single-process run on the full batch it must equal, and the tolerance
    "sync_exact": ("sync_exact", 1e-10),
    # Finite differences divide the rounding of per-rank gradient sums by h.
    "sync_fd": ("sync_fd", 1e-7),
    "sync_fd_bucket_view": ("sync_fd", 1e-7),
    "sync_fd_static_graph": ("sync_fd", 1e-7),
    "sync_forward_bucket_view": ("sync_forward_train_mode", 1e-6),
    "sync_forward_train_mode": ("sync_forward_train_mode", 1e-7),
    "sync_streaming": ("sync_streaming", 1e-7),
    "group_exact_manual": ("sync_exact", 1e-10),
}
SKIPPED_STEP, POISONED_RANK, INIT_SCALE = 1, 1, 2.0 ** 10  # step 1 does not refresh (eig_interval=2)


class Branchy(nn.Module):
    """The model of make_model(*SIZES) plus a branch that a forward may leave out (``use_extra=False``)."""

    def __init__(self):
        super().__init__()
        self.body = make_model(*SIZES)
        self.extra = nn.Linear(5, 2).double()

    def forward(self, x, use_extra=True):
        out = self.body(x)
        return out + torch.tanh(self.extra(x)) if use_extra else out


def batches(rank=None):
    """Each step's batch: the full one, or with rank, that rank's half."""
    return regression_batches(range(STEPS), 1000, 8, SIZES[0], SIZES[-1], rank, WORLD)


def train(model, opt, rank=None, forward_model=None, first_pass_kwargs=None):
    """STEPS steps of opt.step(closure, loss_fn); ``first_pass_kwargs`` go to the model in the first pass only.
    Returns the eigenvector after the first step."""
    forward_model = forward_model or model
    first_eigenvector = None
    for x, y in batches(rank):
        calls = [0]

        def closure():
            calls[0] += 1
            kwargs = first_pass_kwargs if first_pass_kwargs and calls[0] == 1 else {}
            loss = mse(model, x, y, **kwargs)
            loss.backward()
            return loss

        opt.step(closure, loss_fn=lambda: mse(forward_model, x, y))
        if first_eigenvector is None:
            first_eigenvector = opt.eigenvector()
    return first_eigenvector


def outcome(opt, params, first_eigenvector=None):
    return {"weights": [p.detach().clone() for p in params], "eigenvector": opt.eigenvector(),
            "refreshes": opt.diagnostics()["refreshes"], "first_eigenvector": first_eigenvector}


def expected_refreshes(name):
    return refreshes_in(STEPS, HYPER["eig_interval"], streaming="streaming" in name)


# ----- the scenarios, each run on every rank ---------------------------------------------------
def run_config(name, rank):
    hvp, per_replica, ddp_kwargs, xsam_kwargs = CONFIGS[name]
    ddp = nn.parallel.DistributedDataParallel(make_model(*SIZES), **ddp_kwargs)
    opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp=hvp, model=ddp, per_replica_perturbation=per_replica,
               seed=SEED, **xsam_kwargs, **HYPER)
    first_eigenvector = train(ddp, opt, rank, forward_model=ddp.module)
    return outcome(opt, ddp.parameters(), first_eigenvector)


def run_replica_unused(rank):
    """Mode (b); rank 0's first pass leaves the extra layer out (no gradient there), the rest use it."""
    ddp = nn.parallel.DistributedDataParallel(Branchy(), find_unused_parameters=True)
    opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp="exact", model=ddp, per_replica_perturbation=True,
               seed=SEED, **HYPER)
    train(ddp, opt, rank, forward_model=ddp.module, first_pass_kwargs={"use_extra": rank != 0})
    return outcome(opt, ddp.parameters())


def run_group_exact_manual(rank):
    """Exact HVPs without a DDP model, averaged over an explicit process_group, through refresh_eigenvector /
    first_step / second_step."""
    ddp = nn.parallel.DistributedDataParallel(make_model(*SIZES))
    opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp="exact", process_group=dist.group.WORLD, seed=SEED, **HYPER)
    for x, y in batches(rank):
        if opt.refresh_due:
            opt.refresh_eigenvector(loss_fn=lambda: mse(ddp.module, x, y))
        mse(ddp, x, y).backward()
        opt.first_step(zero_grad=True)
        mse(ddp, x, y).backward()
        opt.second_step(zero_grad=True)
    return outcome(opt, ddp.parameters())


def run_refusals(rank):
    """Exact HVPs under DDP that would not be averaged, and static_graph with per-replica perturbation."""
    x, y = next(batches(rank))
    out = {}
    for name, model_arg in (("ddp_module", "module"), ("no_model", None)):
        ddp = nn.parallel.DistributedDataParallel(make_model(*SIZES))
        opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp="exact", model=ddp.module if model_arg else None,
                   seed=SEED, **HYPER)
        closure = closure_of(lambda: mse(ddp, x, y))
        before = [p.detach().clone() for p in ddp.parameters()]
        out[f"step_{name}"] = error_of(lambda: opt.step(closure, loss_fn=lambda: mse(ddp.module, x, y)))
        out[f"unchanged_{name}"] = all(torch.equal(a, b) for a, b in zip(before, ddp.parameters()))
        out[f"refresh_{name}"] = error_of(lambda: opt.refresh_eigenvector(loss_fn=lambda: mse(ddp.module, x, y)))
    static = nn.parallel.DistributedDataParallel(make_model(*SIZES), static_graph=True)
    out["static_graph"] = error_of(lambda: XSAM(static.parameters(), torch.optim.SGD, model=static,
                                                per_replica_perturbation=True, lr=0.1))
    return out


def run_scaled_replica(rank):
    """replica_exact under SAMGradScaler; one attempt of step SKIPPED_STEP overflows in POISONED_RANK's first pass
    (call 1 with exact HVPs)."""
    ddp = nn.parallel.DistributedDataParallel(make_model(*SIZES))
    opt = XSAM(ddp.parameters(), torch.optim.SGD, hvp="exact", model=ddp, per_replica_perturbation=True,
               seed=SEED, **HYPER)
    scaler = SAMGradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    skip = scaled_run_with_a_poisoned_attempt(opt, scaler, functools.partial(mse, ddp), batches(rank), SKIPPED_STEP,
                                              1 if rank == POISONED_RANK else None, functools.partial(mse, ddp.module))
    return {"skip": skip, **outcome(opt, ddp.parameters()), "scale": scaler.get_scale()}


SCENARIOS = {name: (lambda rank, name=name: run_config(name, rank)) for name in CONFIGS}
SCENARIOS.update(replica_unused=run_replica_unused, group_exact_manual=run_group_exact_manual,
                 refusals=run_refusals,
                 scaled_replica=run_scaled_replica)  # last: ranks that disagree here desynchronise the group


def worker(rank, init_file, out_dir):
    with gloo_group(f"file://{init_file}", rank, WORLD):
        for name, scenario in SCENARIOS.items():
            try:
                result = scenario(rank)
            except Exception as exc:  # recorded, so that the other scenarios are still checked
                result = {"error": f"{type(exc).__name__}: {exc}"}
            torch.save(result, os.path.join(out_dir, f"{name}_{rank}.pt"))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """``results(name)``: the per-rank outcomes of a scenario (fails the test if it did not complete)."""
    tmp = tmp_path_factory.mktemp("ddp")
    try:
        spawn_and_wait(worker, (str(tmp / "init"), str(tmp)), WORLD, timeout=240)
        failure = None
    except BaseException as exc:  # noqa: BLE001 - a timeout or crash: the scenarios saved so far are checked
        failure = f"{type(exc).__name__}: {exc}"

    def load(name):
        files = [tmp / f"{name}_{r}.pt" for r in range(WORLD)]
        if not all(f.exists() for f in files):
            pytest.fail(f"scenario {name} did not finish on every rank ({failure})")
        outcomes = [torch.load(f, weights_only=False) for f in files]
        for r, out in enumerate(outcomes):
            assert "error" not in out, f"scenario {name} raised on rank {r}: {out['error']}"
        return outcomes

    return load


def single_process(name):
    """Config ``name`` in a single process on the full batch: what a DDP run in mode (a) must equal."""
    hvp, _, _, xsam_kwargs = CONFIGS[name]
    model = make_model(*SIZES)
    opt = XSAM(model.parameters(), torch.optim.SGD, hvp=hvp, seed=SEED, **xsam_kwargs, **HYPER)
    return outcome(opt, model.parameters(), train(model, opt))


def assert_replicas_identical(pair, refreshes):
    r0, r1 = pair
    assert r0["refreshes"] == r1["refreshes"] == refreshes
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"])), "replicas' weights differ"
    assert all(torch.equal(a, b) for a, b in zip(r0["eigenvector"], r1["eigenvector"])), "eigenvectors differ"


@pytest.mark.parametrize("name", [*CONFIGS, "replica_unused", "group_exact_manual"])
def test_every_rank_holds_bit_identical_weights_and_eigenvectors(results, name):
    assert_replicas_identical(results(name), expected_refreshes(name))


@pytest.mark.parametrize("name", list(REFERENCES))
def test_synchronised_perturbation_matches_single_process_full_batch(results, name):
    """Also with gradient_as_bucket_view=True, and with exact HVPs averaged over an explicit process_group."""
    reference, tol = REFERENCES[name]
    want = single_process(reference)
    got = results(name)[0]
    assert got["refreshes"] == want["refreshes"] == expected_refreshes(name)
    torch.testing.assert_close(flat(got["weights"]), flat(want["weights"]), rtol=tol, atol=tol)
    torch.testing.assert_close(flat(got["eigenvector"]), flat(want["eigenvector"]), rtol=tol, atol=tol)


def per_replica_oracle(model, first_pass_kwargs=lambda r: {}):
    """Mode (b) on flat float64 vectors: replica r perturbs by grad L_r, the update averages the perturbed grads.

    ``first_pass_kwargs(r)``: extra model arguments of replica r's first pass (a parameter it leaves
    out gets no gradient there, so the replica does not move it).
    """
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]

    def unflatten(w):
        return dict(zip(names, (c.view(s) for c, s in zip(w.split(sizes), shapes))))

    def loss(w, x, y, kwargs):
        return (functional_call(model, unflatten(w), (x,), kwargs) - y).square().mean()

    grad_loss = grad(loss)
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(SEED)
    eps, v, buf = 1e-12, None, None
    for t, (x, y) in enumerate(batches()):
        if t % HYPER["eig_interval"] == 0:
            if v is None:
                v = torch.cat([r.reshape(-1) for r in random_vectors(list(model.parameters()), 1, gen)[0]])
            v = v / (v.norm() + eps)
            for _ in range(HYPER["power_iters"]):  # H of the full-batch mean loss = mean of the halves' H
                u = torch.autograd.functional.hvp(lambda w_: loss(w_, x, y, {}), w, v)[1]
                v = u / (u.norm() + eps)
        perturbed_grads = []
        for r in range(WORLD):
            xr, yr = x.chunk(WORLD)[r], y.chunk(WORLD)[r]
            g = grad_loss(w, xr, yr, first_pass_kwargs(r))
            perturbed_grads.append(grad_loss(w + HYPER["rho"] * g / (g.norm() + eps), xr, yr, {}))
        ga = torch.stack(perturbed_grads).mean(0)
        gh = ga / (ga.norm() + eps)
        g_corr = gh - HYPER["alpha"] * (gh @ v).abs() * v
        buf = g_corr if buf is None else HYPER["momentum"] * buf + g_corr
        w = w - HYPER["lr"] * buf
    return w, v


@pytest.mark.parametrize("name, model, first_pass_kwargs", [
    ("replica_exact", functools.partial(make_model, *SIZES), lambda r: {}),
    ("replica_unused", Branchy, lambda r: {"use_extra": r != 0}),
])
def test_per_replica_perturbation_matches_flat_oracle(results, name, model, first_pass_kwargs):
    """replica_unused: rank 0's first pass leaves a layer out; its second-pass gradient still takes part in the
    normalisation and the correction, on every rank."""
    w, v = per_replica_oracle(model(), first_pass_kwargs)
    got = results(name)[0]
    torch.testing.assert_close(flat(got["weights"]), w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flat(got["eigenvector"]), v, rtol=1e-10, atol=1e-10)
    if name == "replica_exact":  # and it really is a different step from mode (a): no all-reduced first pass
        assert (flat(results("sync_exact")[0]["weights"]) - w).abs().max() > 1e-6


def test_forward_differences_in_mode_b_use_the_averaged_gradient_as_their_base(results):
    """Mode (b) does not all-reduce the first pass's gradient, so the products need the averaged one as their
    base. Forward differences are O(h) ~ 1e-8 from the exact products of the same mode-(b) run."""
    exact = results("replica_exact")[0]
    got = results("replica_forward_train_mode")[0]
    torch.testing.assert_close(flat(got["eigenvector"]), flat(exact["eigenvector"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat(got["weights"]), flat(exact["weights"]), rtol=1e-6, atol=1e-6)
    # Before any update the replicas' products are the full batch's: the first v is the single-process one.
    first = single_process("sync_forward_train_mode")["first_eigenvector"]
    torch.testing.assert_close(flat(got["first_eigenvector"]), flat(first), rtol=1e-7, atol=1e-7)


def test_exact_hvps_without_a_ddp_model_are_refused_with_what_to_pass(results):
    """model=ddp.module or model=None would keep each rank's own HVPs."""
    for rank, out in enumerate(results("refusals")):
        for name in ("ddp_module", "no_model"):
            for path in ("step", "refresh"):
                message = out[f"{path}_{name}"]
                assert message is not None, f"rank {rank}: {path} with {name} was not refused"
                assert message.startswith("ValueError: exact Hessian-vector products under torch.distributed")
                assert "model=<the DistributedDataParallel module>" in message and "process_group=" in message
            assert out[f"unchanged_{name}"]


def test_static_graph_with_per_replica_perturbation_is_refused_at_construction(results):
    """DDP(static_graph=True) cannot skip the first pass's all-reduce (a PyTorch internal assert)."""
    for out in results("refusals"):
        message = out["static_graph"]
        assert message is not None and message.startswith("ValueError: per_replica_perturbation=True does not work "
                                                          "with DistributedDataParallel(static_graph=True)")


def test_scaler_skips_on_every_rank_when_one_ranks_first_pass_overflows(results):
    """Mode (b)'s first pass is not all-reduced, so only one rank saw the inf; the scaler's flag is
    all-reduced over the DDP group: both ranks skip, halve the scale, and the run equals the unscaled one."""
    pair = results("scaled_replica")
    for out in pair:
        assert_skipped(out["skip"], INIT_SCALE, SKIPPED_STEP)
        assert out["scale"] == INIT_SCALE / 2
    assert_replicas_identical(pair, expected_refreshes("scaled_replica"))
    unscaled = results("replica_exact")[0]
    torch.testing.assert_close(flat(pair[0]["weights"]), flat(unscaled["weights"]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(pair[0]["eigenvector"]), flat(unscaled["eigenvector"]), rtol=1e-12, atol=1e-12)


def test_per_replica_perturbation_needs_a_ddp_model():
    with pytest.raises(ValueError, match="per_replica_perturbation=True needs model="):
        XSAM(make_model(*SIZES).parameters(), torch.optim.SGD, lr=0.1, per_replica_perturbation=True)
    with pytest.raises(ValueError, match="process_group='everyone' is invalid"):
        XSAM(make_model(*SIZES).parameters(), torch.optim.SGD, lr=0.1, process_group="everyone")
