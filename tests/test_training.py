"""Training-loop features: gradient accumulation, BatchNorm without ``model=``, torch.compile, clipping.

Oracles: the large-batch step (accumulation), the ``model=`` path and a twin
model (BatchNorm), the eager run (compile), and flat-vector SAM on a quadratic
with a known gradient (clipping).
"""
import copy

import pytest
import torch
from torch import nn

from xsam import SAM, XSAM, batchnorm_statistics_frozen

from helpers import Quadratic, flat


def mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def batch(t, n=12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(50 + t)
    return torch.randn(n, 5, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


# ----- gradient accumulation ----------------------------------------------------------------
def accumulating_closures(model, x, y, micro_batches):
    """The documented pattern: each pass (and each HVP) runs every micro-batch; losses / k."""
    xs, ys = x.chunk(micro_batches), y.chunk(micro_batches)

    def closure():
        total = 0.0
        for xi, yi in zip(xs, ys):
            loss = nn.functional.cross_entropy(model(xi), yi) / micro_batches
            loss.backward()  # accumulates into .grad; the optimizer zeroes it before each pass
            total = total + loss.detach()
        return total

    def loss_fn():  # exact HVPs: the mean over micro-batches, forward only
        return sum(nn.functional.cross_entropy(model(xi), yi) for xi, yi in zip(xs, ys)) / micro_batches

    return closure, loss_fn


@pytest.mark.parametrize("optimizer", ["xsam_exact", "xsam_fd", "sam"])
def test_accumulated_micro_batches_equal_the_large_batch_step(optimizer):
    runs = []
    for micro_batches in (1, 3):
        model = mlp()
        if optimizer == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        else:
            opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, alpha=0.5, eig_interval=2,
                       power_iters=3, hvp="exact" if optimizer == "xsam_exact" else "finite_difference")
        for t in range(4):
            closure, loss_fn = accumulating_closures(model, *batch(t), micro_batches)
            loss = opt.step(closure, loss_fn=loss_fn) if optimizer == "xsam_exact" else opt.step(closure)
        runs.append((flat(model.parameters()), loss, opt))
    (w1, loss1, opt1), (w3, loss3, opt3) = runs
    tol = 1e-12 if optimizer != "xsam_fd" else 1e-8  # finite differences amplify rounding by 1/h
    torch.testing.assert_close(w3, w1, rtol=tol, atol=tol)
    torch.testing.assert_close(loss3, loss1, rtol=1e-12, atol=1e-12)
    if optimizer != "sam":
        torch.testing.assert_close(flat(opt3.eigenvector()), flat(opt1.eigenvector()), rtol=tol, atol=tol)


# ----- BatchNorm --------------------------------------------------------------------------
def bn_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double()


def test_batchnorm_helper_without_model_equals_the_model_path():
    """Users who run the passes themselves freeze the statistics with ``batchnorm_statistics_frozen``."""
    with_model, manual = bn_model(), bn_model()
    twin = bn_model()  # gets only the first-pass forwards: the oracle for the running statistics
    twin.load_state_dict(manual.state_dict())
    kw = dict(lr=0.1, momentum=0.9, eig_interval=2, power_iters=2, hvp="finite_difference")
    opt_a = XSAM(with_model.parameters(), torch.optim.SGD, model=with_model, hvp_eval_mode=False, **kw)
    opt_b = XSAM(manual.parameters(), torch.optim.SGD, **kw)
    for t in range(3):
        x = torch.randn(10, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)

        def closure_for(model):
            def closure():
                loss = model(x).square().mean()
                loss.backward()
                return loss
            return closure

        opt_a.step(closure_for(with_model))

        closure = closure_for(manual)
        if opt_b.refresh_due:
            with batchnorm_statistics_frozen(manual):  # HVP evaluations must not count
                opt_b.refresh_eigenvector(closure)
        opt_b.zero_grad()
        closure()  # the first pass: the only one that updates running statistics
        opt_b.first_step(zero_grad=True)
        with batchnorm_statistics_frozen(manual):
            closure()
        opt_b.second_step(zero_grad=True)

        # The twin sees one training forward at the same (pre-step) weights the first pass used.
        with torch.no_grad():
            twin_weights = {k: v for k, v in twin.state_dict().items() if "running" not in k and "num_batches" not in k}
            twin(x)
        twin.load_state_dict({**twin.state_dict(), **{k: v for k, v in manual.state_dict().items()
                                                      if k in twin_weights}})
        assert torch.equal(twin[1].running_mean, manual[1].running_mean)
        assert torch.equal(twin[1].running_var, manual[1].running_var)
    for a, b in zip(with_model.state_dict().values(), manual.state_dict().values()):
        assert torch.equal(a, b)
    assert manual[1].num_batches_tracked.item() == 3


def test_batchnorm_statistics_frozen_restores_every_buffer_exactly():
    model = bn_model()
    model(torch.randn(8, 4, dtype=torch.float64))  # non-trivial statistics
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    with batchnorm_statistics_frozen(model):
        model(torch.randn(8, 4, dtype=torch.float64))
        model(torch.randn(8, 4, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Outside the block the statistics move as usual (the helper is not a permanent switch).
    x = torch.randn(8, 4, dtype=torch.float64)
    model(x), twin(x)
    assert torch.equal(model[1].running_mean, twin[1].running_mean)
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])


# ----- torch.compile ----------------------------------------------------------------------
# aot_eager traces with dynamo and AOTAutograd like inductor, without the C++ compile (minutes on 2 cores).
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_trains_like_eager_without_recompiling_every_step(compile_backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, y = batch(0, n=32, dtype=torch.float32)
    results = []
    graphs_after = []
    for compiled in (False, True):
        eager = mlp(dtype=torch.float32)
        model = torch.compile(eager, backend=compile_backend) if compiled else eager
        # Finite-difference HVPs: compiled graphs do not support double backward (exact HVPs
        # can use loss_fn with the eager module, `model._orig_mod`).
        opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, eig_interval=2, power_iters=2,
                   hvp="finite_difference", model=model)

        def closure():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        for t in range(6):
            opt.step(closure)
            if compiled:
                graphs_after.append(counters["stats"]["unique_graphs"])
        results.append(flat(eager.parameters()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)
    # Train-mode and eval-mode (HVP) graphs are built in the first refresh step; none after.
    assert graphs_after[0] >= 1 and graphs_after[-1] == graphs_after[1], graphs_after


@pytest.mark.parametrize("backend", ["reference", "native"])
def test_op_set_traces_into_one_graph(backend):
    from xsam import ops
    from xsam.ops.dispatch import unavailable_reason

    reason = unavailable_reason(backend, torch.device("cpu"), torch.float32)
    if reason:
        pytest.skip(reason)

    def fused(params, grads, saved):
        sums = ops.dots([grads], [(0, 0)], backend=backend)
        ops.perturb_(params, grads, saved, 0.05 / (sums[0].sqrt() + 1e-12), backend=backend)
        return sums

    def data():
        gen = torch.Generator().manual_seed(0)
        return ([torch.randn(s, generator=gen) for s in ((3, 4), (5,))] for _ in range(2))

    (pe, ge), (pc, gc) = data(), data()
    se, sc = [torch.empty_like(p) for p in pe], [torch.empty_like(p) for p in pc]
    want = fused(pe, ge, se)
    got = torch.compile(fused, backend="aot_eager", fullgraph=True)(pc, gc, sc)
    torch.testing.assert_close(got, want)
    for a, b in zip(pc + sc, pe + se):
        torch.testing.assert_close(a, b)


# ----- gradient clipping between the passes -----------------------------------------------
def clipping_closure(q, max_norm):
    def closure():
        loss = q.closure()
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(q.params, max_norm)
        return loss
    return closure


def test_clipping_in_the_closure_clips_the_perturbed_gradient_for_sam():
    q = Quadratic()
    max_norm, rho, lr = 0.5, 0.05, 0.1
    opt = SAM(q.params, torch.optim.SGD, rho=rho, lr=lr)
    w = flat(q.params)
    for _ in range(3):
        opt.step(clipping_closure(q, max_norm))
        g = q.grad(w)  # first pass: clipping rescales g, which the normalised perturbation ignores
        ga = q.grad(w + rho * g / (g.norm() + 1e-12))
        assert ga.norm() > max_norm  # the clip is active in this test
        w = w - lr * ga * min(1.0, max_norm / (ga.norm().item() + 1e-6))
    torch.testing.assert_close(flat(q.params), w, rtol=1e-12, atol=1e-12)


def test_norm_clipping_is_a_no_op_for_normalised_xsam():
    runs = []
    for max_norm in (None, 0.5):
        q = Quadratic()
        opt = XSAM(q.params, torch.optim.SGD, lr=0.1, eig_interval=2, hvp="exact")
        for _ in range(3):
            opt.step(clipping_closure(q, max_norm), loss_fn=q.loss)
        runs.append(flat(q.params))
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-12, atol=1e-12)


def test_dtensor_parameters_are_accepted_but_exact_hvps_are_refused(tmp_path):
    """Sharded parameters are supported (tests/test_fsdp.py); exact HVPs are not, and say so at construction."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # A one-rank gloo group in this process is enough to build DTensors; destroyed afterwards.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.zeros(3, 2), mesh, [Shard(0)]))
        SAM([p], torch.optim.SGD, lr=0.1)
        XSAM([p], torch.optim.SGD, lr=0.1, hvp="auto")
        with pytest.raises(ValueError, match="hvp='exact' does not work with sharded DTensor parameters"):
            XSAM([p], torch.optim.SGD, lr=0.1, hvp="exact")
    finally:
        dist.destroy_process_group()
