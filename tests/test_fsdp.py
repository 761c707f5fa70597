"""FSDP2 (fully_shard) with gloo, 2 processes on CPU, against single-process and flat oracles.

One mp.spawn runs everything; each rank saves what it saw and the parent compares: the ranks with
each other (same weights, same scalars); the sharded run with the single-process run of the same
model on the concatenated batch (float64); the op set on DTensors of several placements with flat
vectors; SAMGradScaler runs with the unscaled sharded run, and around a step whose gradient is
non-finite on one rank only (every rank must skip it). The layers have output sizes 7, 5 and 1, so
dim-0 sharding over 2 ranks is uneven (4 + 3, 3 + 2 rows) and the last weight has no rows on rank 1.
"""
import functools
import os

import pytest
import torch
from torch import nn

from xsam import SAM, XSAM, ops
from xsam.amp import SAMGradScaler
from xsam.hessian import exact_hvp, random_vectors

import helpers
from helpers import (assert_skipped, error_of, flat, gloo_group, mse, refreshes_in, regression_batches,
                     scaled_run_with_a_poisoned_attempt, spawned_results)

WORLD, STEPS, SEED = 2, 5, 3
SKIPPED_STEP, POISONED_RANK, INIT_SCALE = 1, 1, 2.0 ** 10  # step 1 does not refresh (eig_interval=2)
RESUME_AT = 3  # the DCP checkpoint is taken after step 2; step 4 refreshes from the loaded eigenvector
XSAM_HYPER = dict(lr=0.1, momentum=0.9, rho=0.05, alpha=0.5, eig_interval=2, power_iters=3)
SAM_HYPER = dict(lr=0.1, momentum=0.9, rho=0.05)
# hvp_eval_mode=False: forward differences reuse the first pass's gradient (else they evaluate it once more).
XSAM_VARIANTS = {"xsam": {}, "xsam_forward": {"hvp": "forward_difference", "hvp_eval_mode": False},
                 "xsam_streaming": {"hvp": "streaming"}}
CONFIGS = (*XSAM_VARIANTS, "sam", "asam")
TOLERANCES = {"xsam": 1e-10, "xsam_forward": 1e-7, "xsam_streaming": 1e-7}  # of the sharded runs; SAM: 1e-13
XSAM_DIAGNOSTICS = ("eigenvalue", "eigen_residual", "grad_norm", "adv_grad_norm", "cos_g_v", "cos_gadv_v", "correction")
DIAGNOSTICS = {  # config: scalars of the last step that must match the oracle
    "xsam": XSAM_DIAGNOSTICS, "xsam_forward": XSAM_DIAGNOSTICS,
    "xsam_streaming": XSAM_DIAGNOSTICS[2:],  # streaming estimates no eigenvalue
    "sam": ("grad_norm",),
    "asam": ("weighted_grad_norm",),  # ASAM's perturbation norm ||w * g||
}


def make_optimizer(name, params, hvp="finite_difference", model=None):
    if name in XSAM_VARIANTS:
        kwargs = {"hvp": hvp, **XSAM_VARIANTS[name]}
        return XSAM(params, torch.optim.SGD, seed=SEED, model=model, **kwargs, **XSAM_HYPER)
    return SAM(params, torch.optim.SGD, adaptive=name == "asam", model=model, **SAM_HYPER)


def expected_refreshes(name):
    return refreshes_in(STEPS, XSAM_HYPER["eig_interval"], streaming=name == "xsam_streaming")


def make_model():
    return helpers.make_model(4, 7, 5, 1)


def batches(rank=None, steps=range(STEPS)):
    """STEPS batches (or ``steps``); with rank, that rank's half of each."""
    return regression_batches(steps, 500, 8, 4, 1, rank, WORLD)


def train(model, opt, rank=None, steps=range(STEPS)):
    # loss_fn is offered to X-SAM, as a user would: hvp="auto" must still pick finite differences.
    helpers.train(model, opt, batches(rank, steps), offer_loss_fn=isinstance(opt, XSAM))


def sharded_run(name):
    """make_model() sharded layer by layer, and the optimizer ``name`` on it (hvp="auto": finite differences)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model, make_optimizer(name, model.parameters(), hvp="auto", model=model)


def full_vectors():
    """Two aligned lists of full tensors, the same on every rank (one generator seed)."""
    gen = torch.Generator().manual_seed(11)
    shapes = [(5, 3), (3, 5), (6,), (2, 2)]
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)]


def dtensor_op_checks(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (WORLD,))
    # full_vectors() as Shard(0), Shard(1), Replicate DTensors and a plain (replicated) tensor.
    placements = [[Shard(0)], [Shard(1)], [Replicate()], None]
    a, b = [[t.clone() if pl is None else distribute_tensor(t, mesh, pl, src_data_rank=None)
             for t, pl in zip(full, placements)] for full in full_vectors()]
    out = {"dots": ops.dots([a, b], [(0, 0), (0, 1), (1, 1)]), "wsumsq": ops.weighted_sumsq(a, b),
           "dots_is_plain": type(ops.dots([a], [(0, 0)])) is torch.Tensor}
    ops.axpy_(a, b, 0.5)
    ops.scale_copy_(b, b, -2.0)
    out["axpy"] = [t.full_tensor() if isinstance(t, DTensor) else t for t in a]
    out["scale_copy"] = [t.full_tensor() if isinstance(t, DTensor) else t for t in b]
    partial = DTensor.from_local(torch.ones(3, dtype=torch.float64), mesh, [Partial()])
    out["partial_error"] = error_of(lambda: ops.dots([[partial]], [(0, 0)]))
    out["mixed_error"] = error_of(lambda: ops.dots([a[:1], [torch.zeros(5, 3, dtype=torch.float64)]], [(0, 1)]))
    return out


def scaled_xsam_run(rank):
    """X-SAM under SAMGradScaler on FSDP2; one attempt of step SKIPPED_STEP gets an inf in the second pass's
    gradient (call 2: the step does not refresh) on POISONED_RANK's local shard only."""
    model, opt = sharded_run("xsam")
    scaler = SAMGradScaler("cpu", init_scale=INIT_SCALE, growth_interval=1000)
    skip = scaled_run_with_a_poisoned_attempt(opt, scaler, functools.partial(mse, model), batches(rank),
                                              SKIPPED_STEP, 2 if rank == POISONED_RANK else None)
    return {"skip": skip, "weights": [p.full_tensor() for p in model.parameters()],
            "eigenvector": [v.full_tensor() for v in opt.eigenvector()], "refreshes": opt.diagnostics()["refreshes"],
            "scale": scaler.get_scale()}


def dcp_resumed_run(name, rank, checkpoint_dir):
    """The run of ``name`` saved with DCP after RESUME_AT steps, resumed in a freshly built model and optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, opt = sharded_run(name)
    train(model, opt, rank, steps=range(RESUME_AT))
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    model, opt = sharded_run(name)
    model_sd, optim_sd = get_state_dict(model, opt)  # the template DCP loads into, in place
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint_dir)
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    out = {"step": opt.diagnostics()["step"], "momentum": bool(opt.base_optimizer.state)}
    train(model, opt, rank, steps=range(RESUME_AT, STEPS))
    out["weights"] = [p.full_tensor() for p in model.parameters()]
    out["eigenvector"] = [t.full_tensor() for t in opt.eigenvector()] if name == "xsam" else None
    out["diagnostics"] = opt.diagnostics()
    return out


def single_process_checkpoint_into_sharded(rank):
    """A single-process run's checkpoint loaded into a sharded optimizer: refused as it is, sharded by DCP."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    plain = make_model()
    plain_opt = make_optimizer("xsam", plain.parameters())
    train(plain, plain_opt, steps=range(RESUME_AT))
    model, opt = sharded_run("xsam")
    out = {"direct_error": error_of(lambda: opt.load_state_dict(plain_opt.state_dict()))}
    set_optimizer_state_dict(model, opt, get_optimizer_state_dict(plain, plain_opt),
                             options=StateDictOptions(full_state_dict=True))
    out.update(step=opt.diagnostics()["step"], eigenvector=[t.full_tensor() for t in opt.eigenvector()],
               expected=plain_opt.eigenvector())
    return out


def worker(rank, init_file, out_dir):
    with gloo_group(f"file://{init_file}", rank, WORLD):
        result = {}
        for name in CONFIGS:
            model, opt = sharded_run(name)
            train(model, opt, rank)
            diag = opt.diagnostics()
            result[name] = {
                "weights": [p.full_tensor() for p in model.parameters()],
                "diagnostics": {k: diag[k] for k in DIAGNOSTICS[name]},
                "eigenvector": ([t.full_tensor() for t in opt.eigenvector()] if name in XSAM_VARIANTS else None),
                "refreshes": diag.get("refreshes"),
            }
        model, _ = sharded_run("sam")
        params = list(model.parameters())
        result["local_rows"] = [p.to_local().shape[0] for p in params]
        result["start"] = [t.full_tensor() for t in random_vectors(params, 1, torch.Generator().manual_seed(SEED))[0]]
        result["exact_optimizer_error"] = error_of(lambda: make_optimizer("xsam", params, hvp="exact"))
        x, y = next(batches())
        result["exact_hvp_error"] = error_of(lambda: exact_hvp(lambda: mse(model, x, y), params))
        result["ops"] = dtensor_op_checks(rank)
        result["amp"] = scaled_xsam_run(rank)
        result["full_into_sharded"] = single_process_checkpoint_into_sharded(rank)
        result["dcp"] = {}
        for name in ("xsam", "sam"):
            try:  # an error here (raised on every rank alike) leaves the other results to be checked
                result["dcp"][name] = dcp_resumed_run(name, rank, os.path.join(out_dir, f"dcp_{name}"))
            except Exception as exc:
                result["dcp"][name] = f"{type(exc).__name__}: {exc}"
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return spawned_results(worker, tmp_path_factory.mktemp("fsdp"), WORLD, timeout=600)


def test_parameters_are_sharded_unevenly(fsdp_results):
    # (7,4), (7,), (5,7), (5,), (1,5), (1,): torch.chunk rows per rank, rank 1 empty for the last layer.
    assert fsdp_results[0]["local_rows"] == [4, 4, 3, 3, 1, 1]
    assert fsdp_results[1]["local_rows"] == [3, 3, 2, 2, 0, 0]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_rank_holds_identical_weights_and_scalars(fsdp_results, name):
    r0, r1 = fsdp_results[0][name], fsdp_results[1][name]
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    # The reduced scalars come from one all-reduce: the same bits on every rank.
    assert r0["diagnostics"] == r1["diagnostics"]
    if name in XSAM_VARIANTS:
        assert r0["refreshes"] == r1["refreshes"] == expected_refreshes(name)
        assert all(torch.equal(a, b) for a, b in zip(r0["eigenvector"], r1["eigenvector"]))


@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_training_matches_single_process_full_batch(fsdp_results, name):
    model = make_model()
    opt = make_optimizer(name, model.parameters())
    train(model, opt)
    got = fsdp_results[0][name]
    # Finite differences divide rounding differences (gradients summed per rank, then averaged) by h.
    tol = TOLERANCES.get(name, 1e-13)
    before = flat(make_model().parameters())
    assert (flat(model.parameters()) - before).abs().max() > 1e-3  # the weights really moved
    torch.testing.assert_close(flat(got["weights"]), flat(model.parameters()), rtol=tol, atol=tol)
    diag = opt.diagnostics()
    for key in DIAGNOSTICS[name]:
        torch.testing.assert_close(torch.tensor(got["diagnostics"][key]), torch.tensor(diag[key]),
                                   rtol=100 * tol, atol=tol, msg=f"{key}")
    if name in XSAM_VARIANTS:
        assert got["refreshes"] == diag["refreshes"] == expected_refreshes(name)
        torch.testing.assert_close(flat(got["eigenvector"]), flat(opt.eigenvector()), rtol=tol, atol=tol)


def test_start_vector_is_the_single_process_draw(fsdp_results):
    expected = random_vectors(list(make_model().parameters()), 1, torch.Generator().manual_seed(SEED))[0]
    for rank in range(WORLD):
        assert all(torch.equal(a, b) for a, b in zip(fsdp_results[rank]["start"], expected))


def test_exact_hvps_are_refused_with_the_reason(fsdp_results):
    for rank in range(WORLD):
        opt_error = fsdp_results[rank]["exact_optimizer_error"]
        assert opt_error.startswith("ValueError: hvp='exact' does not work with sharded DTensor parameters")
        assert "hvp='finite_difference'" in opt_error
        hvp_error = fsdp_results[rank]["exact_hvp_error"]
        assert hvp_error.startswith("RuntimeError: exact HVPs cannot differentiate the loss with respect to params[0]")
        assert "finite_difference_hvp" in hvp_error


def test_op_set_reduces_dtensors_like_flat_vectors(fsdp_results):
    """Shard(0), Shard(1), Replicate (counted once, not per rank) and a plain tensor in one list."""
    a, b = full_vectors()
    fa, fb = flat(a), flat(b)
    expected_dots = torch.stack([fa @ fa, fa @ fb, fb @ fb])
    expected_wsumsq = (fa * fb).square().sum()
    for rank in range(WORLD):
        got = fsdp_results[rank]["ops"]
        assert got["dots_is_plain"]
        torch.testing.assert_close(got["dots"], expected_dots, rtol=1e-14, atol=0)
        torch.testing.assert_close(got["wsumsq"], expected_wsumsq, rtol=1e-14, atol=0)
        # Element-wise ops wrote into the shards of the DTensors (and into the plain tensor).
        torch.testing.assert_close(flat(got["axpy"]), fa + 0.5 * fb, rtol=0, atol=1e-15)
        torch.testing.assert_close(flat(got["scale_copy"]), -2.0 * fb, rtol=0, atol=0)
        assert "has a Partial placement" in got["partial_error"]
        assert got["mixed_error"].startswith("ValueError: lists[1][0] is a plain tensor but lists[0][0] is a DTensor")


def test_scaler_skips_on_every_rank_when_one_shard_is_non_finite_and_leaves_no_trace(fsdp_results):
    """The inf sits in rank 1's shard only; the all-reduced flag makes rank 0 skip too. Power-of-two scales
    unscale exactly: the skipped attempt left no trace (the tolerance allows for finite-difference rounding; a
    missed unscale is off by 2**10)."""
    for rank in range(WORLD):
        skip = fsdp_results[rank]["amp"]["skip"]
        assert skip["closure_calls"] == 2  # the second pass ran, then the step was skipped
        assert_skipped(skip, INIT_SCALE, SKIPPED_STEP)
        assert fsdp_results[rank]["amp"]["scale"] == INIT_SCALE / 2
    r0, r1 = fsdp_results[0]["amp"], fsdp_results[1]["amp"]
    assert all(torch.equal(a, b) for a, b in zip(r0["weights"], r1["weights"]))
    unscaled = fsdp_results[0]["xsam"]
    assert r0["refreshes"] == unscaled["refreshes"] == 3
    torch.testing.assert_close(flat(r0["weights"]), flat(unscaled["weights"]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(flat(r0["eigenvector"]), flat(unscaled["eigenvector"]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["xsam", "sam"])
def test_dcp_checkpoint_resumes_a_sharded_run_bit_identically(fsdp_results, name):
    """get_state_dict / dcp.save, then dcp.load into a fresh sharded model and optimizer and set_state_dict: the
    run continues bit for bit (sharded eigenvector, momentum buffers, step and refresh counters, generator)."""
    for rank in range(WORLD):
        resumed, uninterrupted = fsdp_results[rank]["dcp"][name], fsdp_results[rank][name]
        assert isinstance(resumed, dict), f"rank {rank}: {resumed}"
        assert resumed["step"] == RESUME_AT and resumed["momentum"]
        assert all(torch.equal(a, b) for a, b in zip(resumed["weights"], uninterrupted["weights"]))
        assert all(resumed["diagnostics"][k] == v for k, v in uninterrupted["diagnostics"].items())
        if name == "xsam":
            assert resumed["diagnostics"]["refreshes"] == uninterrupted["refreshes"] == 3
            assert all(torch.equal(a, b) for a, b in zip(resumed["eigenvector"], uninterrupted["eigenvector"]))


def test_a_single_process_checkpoint_loads_into_a_sharded_optimizer_through_dcp(fsdp_results):
    for rank in range(WORLD):
        got = fsdp_results[rank]["full_into_sharded"]
        assert got["direct_error"].startswith("ValueError: state_dict's eigenvector for parameter 0 is a plain "
                                              "tensor but the parameter is a sharded DTensor")
        assert "full_state_dict=True" in got["direct_error"]
        assert got["step"] == RESUME_AT
        assert all(torch.equal(a, b) for a, b in zip(got["eigenvector"], got["expected"]))
