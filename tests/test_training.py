"""Training-loop features: BatchNorm without ``model=``, torch.compile, clipping, the
recipes of docs/training-loops.md (executed as written, from the checkout of the imported package) and the names
of the reported norms."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import xsam
from xsam import SAM, XSAM, batchnorm_statistics_frozen

from helpers import Quadratic, closure_of, flat, gloo_group, make_model


# ----- BatchNorm --------------------------------------------------------------------------
def test_batchnorm_helper_without_model_equals_the_model_path():
    """Users who run the passes themselves freeze the statistics with ``batchnorm_statistics_frozen``."""
    with_model, manual = make_mlp(batchnorm=True), make_mlp(batchnorm=True)
    twin = make_mlp(batchnorm=True)  # gets only the first-pass forwards: the oracle for the running statistics
    twin.load_state_dict(manual.state_dict())
    kw = dict(lr=0.1, momentum=0.9, eig_interval=2, power_iters=2, hvp="finite_difference")
    opt_a = XSAM(with_model.parameters(), torch.optim.SGD, model=with_model, hvp_eval_mode=False, **kw)
    opt_b = XSAM(manual.parameters(), torch.optim.SGD, **kw)
    for t in range(3):
        x = torch.randn(10, 4, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
        opt_a.step(closure_of(lambda: with_model(x).square().mean()))
        closure = closure_of(lambda: manual(x).square().mean())
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
            twin(x)
        twin.load_state_dict({k: v for k, v in manual.state_dict().items()
                              if "running" not in k and "num_batches" not in k}, strict=False)
        assert torch.equal(twin[1].running_mean, manual[1].running_mean)
        assert torch.equal(twin[1].running_var, manual[1].running_var)
    for a, b in zip(with_model.state_dict().values(), manual.state_dict().values()):
        assert torch.equal(a, b)
    assert manual[1].num_batches_tracked.item() == 3


# ----- torch.compile ----------------------------------------------------------------------
# aot_eager traces with dynamo and AOTAutograd like inductor, without the C++ compile (minutes on 2 cores).
@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_model_trains_like_eager_without_recompiling_every_step(compile_backend):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x, y = classification_batch(32, seed=50, width=5, dtype=torch.float32)
    results = []
    graphs_after = []
    for compiled in (False, True):
        eager = make_model(5, 7, 3, dtype=torch.float32)
        model = torch.compile(eager, backend=compile_backend) if compiled else eager
        # Finite-difference HVPs: compiled graphs do not support double backward (exact HVPs
        # can use loss_fn with the eager module, `model._orig_mod`).
        opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.2, momentum=0.9, eig_interval=2, power_iters=2,
                   hvp="finite_difference", model=model)

        closure = closure_of(lambda: nn.functional.cross_entropy(model(x), y))
        for t in range(6):
            opt.step(closure)
            if compiled:
                graphs_after.append(counters["stats"]["unique_graphs"])
        results.append(flat(eager.parameters()))
    torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-5)
    # Train-mode and eval-mode (HVP) graphs are built in the first refresh step; none after.
    assert graphs_after[0] >= 1 and graphs_after[-1] == graphs_after[1], graphs_after


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
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    # A one-rank gloo group in this process is enough to build DTensors; destroyed afterwards.
    with gloo_group(f"file://{tmp_path / 'init'}", 0, 1):
        mesh = init_device_mesh("cpu", (1,))
        p = nn.Parameter(distribute_tensor(torch.zeros(3, 2), mesh, [Shard(0)]))
        SAM([p], torch.optim.SGD, lr=0.1)
        XSAM([p], torch.optim.SGD, lr=0.1, hvp="auto")
        with pytest.raises(ValueError, match="hvp='exact' does not work with sharded DTensor parameters"):
            XSAM([p], torch.optim.SGD, lr=0.1, hvp="exact")


# ----- the documented recipes and an MLP with a known Hessian --------------------------------
RECIPES = Path(xsam.__file__).resolve().parents[1] / "docs" / "training-loops.md"


def readme_snippet(heading: str) -> str:
    """The first python block of the section ``### heading`` of docs/training-loops.md."""
    section = RECIPES.read_text().split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def make_mlp(seed=0, batchnorm=False, last_layer_scale=1.0):
    torch.manual_seed(seed)
    layers = [nn.Linear(4, 6), nn.BatchNorm1d(6) if batchnorm else nn.Identity(), nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers).double()
    with torch.no_grad():
        model[3].weight.mul_(last_layer_scale)
    return model


def steep_mlp():
    """||g|| about 1.6 on classification_batch(32): a clipping threshold of 1 acts on it."""
    return make_mlp(last_layer_scale=5.0)


def classification_batch(n, seed=1, width=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=gen, dtype=dtype), torch.randint(0, 3, (n,), generator=gen)


def loss_of(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def true_top_eigenpair(model, x, y):
    """Largest-|lambda| eigenpair of the exact Hessian of the batch loss at the current weights."""
    params = list(model.parameters())
    shapes, sizes = [p.shape for p in params], [p.numel() for p in params]
    names = [n for n, _ in model.named_parameters()]

    def loss(w):
        weights = {n: c.view(s) for n, c, s in zip(names, w.split(sizes), shapes)}
        return nn.functional.cross_entropy(torch.func.functional_call(model, weights, (x,)), y)

    hessian = torch.autograd.functional.hessian(loss, flat(params))
    values, vectors = torch.linalg.eigh(hessian)
    i = values.abs().argmax()
    return values[i].item(), vectors[:, i]


# ----- clipping inside the closure and max_grad_norm --------------------------------------
CLIP = 0.5


def refreshed(max_grad_norm=None, clip_in_closure=False):
    """One X-SAM step with a converged finite-difference refresh: (optimizer, weights before and after, the
    true eigenpair, the step's record)."""
    model = steep_mlp()
    x, y = classification_batch(32)  # ||g|| about 1.6 > CLIP: clipping is active
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.01, hvp="finite_difference", eig_interval=1000,
               power_iters=80, max_grad_norm=max_grad_norm)

    def closure():
        loss = loss_of(model, x, y)
        loss.backward()
        if clip_in_closure:
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        return loss

    before = flat(model.parameters())
    lam_true, v_true = true_top_eigenpair(model, x, y)
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append(r))
    opt.step(closure)
    return opt, before, flat(model.parameters()), (lam_true, v_true), records[-1]


def test_clipping_inside_the_closure_corrupts_finite_difference_hvps():
    """The problem (it holds on every version): the HVPs differentiate the clipped gradient."""
    opt, _, _, (lam_true, v_true), _ = refreshed(clip_in_closure=True)
    lam = opt.diagnostics()["eigenvalue"]
    cos = abs(flat(opt.eigenvector()) @ v_true).item()
    assert abs(lam - lam_true) > 0.5 * abs(lam_true) and cos < 0.95, (lam, lam_true, cos)


def test_max_grad_norm_clips_the_update_and_leaves_the_hvps_alone():
    opt, before, after, (lam_true, v_true), record = refreshed(max_grad_norm=CLIP)
    assert opt.diagnostics()["eigenvalue"] == pytest.approx(lam_true, rel=1e-6)
    assert abs(flat(opt.eigenvector()) @ v_true).item() == pytest.approx(1.0, abs=1e-8)
    # SGD without momentum moved the weights by lr * the clipped gradient: norm CLIP (the corrected
    # gradient, normalised, has norm about 1 > CLIP).
    assert record["clip_coef"].item() < 0.9
    assert ((after - before).norm() / 0.01).item() == pytest.approx(CLIP, rel=1e-5)
    unclipped, _, _, _, _ = refreshed()
    assert opt.diagnostics()["eigenvalue"] == unclipped.diagnostics()["eigenvalue"]
    assert all(torch.equal(a, b) for a, b in zip(opt.eigenvector(), unclipped.eigenvector()))


def test_the_readme_clipping_recipe_leaves_the_closure_gradient_unclipped():
    """What the HVPs differentiate: the documented closure must leave the raw gradient in .grad."""
    model = steep_mlp()
    x, y = classification_batch(32)
    namespace = {"torch": torch, "XSAM": XSAM, "model": model, "x": x, "y": y}
    exec(readme_snippet("Gradient clipping"), namespace)
    raw = torch.autograd.grad(loss_of(model, x, y), list(model.parameters()))
    assert flat(raw).norm() > 1.0  # the recipe's threshold would act on it
    model.zero_grad(set_to_none=True)
    namespace["closure"]()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), raw))
    assert namespace["opt"].max_grad_norm is not None


@pytest.mark.parametrize("cls", [SAM, XSAM])
def test_asam_reports_the_weighted_norm_under_its_own_name(cls):
    model = make_mlp()
    x, y = classification_batch(16)
    g = flat(torch.autograd.grad(loss_of(model, x, y), list(model.parameters())))
    w = flat(model.parameters())
    kwargs = dict(hvp="exact") if cls is XSAM else {}
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, adaptive=True, **kwargs)
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append(r))

    closure = closure_of(lambda: loss_of(model, x, y))
    opt.step(closure, loss_fn=lambda: loss_of(model, x, y)) if cls is XSAM else opt.step(closure)
    diag = opt.diagnostics()
    assert diag["weighted_grad_norm"] == pytest.approx((w * g).norm().item(), rel=1e-12)
    assert records[-1]["weighted_grad_norm"].item() == diag["weighted_grad_norm"]
    if cls is XSAM:  # X-SAM needs ||g|| anyway (cos(g, v)) and reports both
        assert diag["grad_norm"] == pytest.approx(g.norm().item(), rel=1e-12)
    else:
        assert "grad_norm" not in diag


# ----- the documented gradient accumulation ---------------------------------------------------
@pytest.mark.parametrize("optimizer", ["xsam_exact", "xsam_fd", "sam"])
def test_the_readme_accumulation_recipe_equals_the_whole_batch_when_k_does_not_divide_it(optimizer):
    """30 samples in 4 micro-batches (8, 8, 8, 6): dividing each loss by k was 7e-2 off."""
    x, y = classification_batch(30)
    runs = []
    for accumulate in (True, False):
        model = make_mlp()
        if optimizer == "sam":
            opt = SAM(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9)
        else:
            opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9, eig_interval=1, power_iters=3,
                       hvp="auto" if optimizer == "xsam_exact" else "finite_difference")
        losses = []

        def step(closure, loss_fn):  # the recipe's opt.step; SAM takes the closure only
            losses.append(opt.step(closure) if optimizer == "sam" else opt.step(closure, loss_fn=loss_fn))

        for _ in range(2):
            if accumulate:
                exec(readme_snippet("Gradient accumulation"), {"torch": torch, "model": model, "x": x, "y": y,
                                                               "opt": SimpleNamespace(step=step)})
            else:
                step(closure_of(lambda: loss_of(model, x, y)), lambda: loss_of(model, x, y))
        runs.append((flat(model.parameters()), torch.stack(losses), opt))
    (w_acc, loss_acc, opt_acc), (w_full, loss_full, opt_full) = runs
    assert (w_full - flat(make_mlp().parameters())).abs().max() > 1e-2  # the weights really moved
    tol = 1e-8 if optimizer == "xsam_fd" else 1e-12  # finite differences amplify rounding by 1/h
    torch.testing.assert_close(w_acc, w_full, rtol=tol, atol=tol)
    torch.testing.assert_close(loss_acc, loss_full, rtol=1e-12, atol=1e-12)
    if optimizer != "sam":
        torch.testing.assert_close(flat(opt_acc.eigenvector()), flat(opt_full.eigenvector()), rtol=tol, atol=tol)


def test_with_batchnorm_the_readme_accumulation_recipe_updates_the_statistics_once_per_micro_batch():
    """What docs/training-loops.md says about BatchNorm: per-micro-batch statistics, k running updates per step."""
    x, y = classification_batch(30)
    model = make_mlp(batchnorm=True)
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)
    exec(readme_snippet("Gradient accumulation"), {"torch": torch, "model": model, "opt": opt, "x": x, "y": y})
    assert model[1].num_batches_tracked.item() == 4  # the first pass's 4 micro-batches, nothing else
