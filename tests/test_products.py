"""Compiled exact products against double backward, and Gauss-Newton products against a dense J^T H J."""
import warnings

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call

from xsam.hessian import exact_hvp, random_vectors
from xsam.optim import XSAM, eval_mode
from xsam.products import compiled_hvp, ggn_hvp

from helpers import closure_of, flat, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(3 * 3 * 3, 3))


def bn_cnn():
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(3, 3))
    with torch.no_grad():  # running statistics away from their initial 0 / 1, so eval mode is visible
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def batch(model_name: str, seed: int, n: int = 8):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, 5) if model_name == "mlp" else (n, 1, 6, 6)
    return torch.randn(shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)


MODELS = {"mlp": mlp, "cnn": cnn, "bn_cnn": bn_cnn}


def state_of(model):
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_products_equal_double_backward_and_are_reused(name):
    """The first graph serves a second batch and closure, and a second model of the same layout with its own
    weights and statistics."""
    torch.manual_seed(0)
    first, second = MODELS[name]().eval(), MODELS[name]().eval()
    before = state_of(first)
    graphs = []
    for model, seed in ((first, 1), (first, 2), (second, 2)):
        params = list(model.parameters())
        x, y = batch(name, seed)

        def loss_fn():
            return nn.functional.cross_entropy(model(x), y)

        vectors = random_vectors(params, 2, torch.Generator().manual_seed(seed))
        compiled = compiled_hvp(model, loss_fn, params)(vectors)
        eager = exact_hvp(loss_fn, params)[0](vectors)
        for c, e in zip(compiled, eager):
            assert (flat(c) - flat(e)).norm() <= 1e-5 * flat(e).norm()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] == graphs[1] == graphs[2]
    assert all(torch.equal(a, b) for a, b in zip(state_of(first), before))
    assert all(p.grad is None for p in first.parameters())


class GraphBreak(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 2)

    def forward(self, x):
        torch._dynamo.graph_break()
        return self.linear(x).tanh()


def off_by_one_percent(graph, example_inputs):
    """A torch.compile backend whose code computes 1.01 times the right outputs."""
    def run(*args):
        return [None if t is None else t * 1.01 for t in graph(*args)]

    return run


@pytest.mark.parametrize("model_class, backend, warning", [
    (GraphBreak, "inductor", "GraphBreak: torch.compile could not compile.*eager double backward"),
    (mlp, off_by_one_percent, "differs from double backward's by 1.0e-02 relative"),
])
def test_a_product_not_compiled_exactly_falls_back_to_eager_products_with_one_warning(model_class, backend, warning):
    torch.manual_seed(0)
    model = model_class()
    params = list(model.parameters())
    x = torch.randn(6, 5)

    def loss_fn():
        return model(x).square().sum()

    vectors = random_vectors(params, 2, torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match=warning):
        first = compiled_hvp(model, loss_fn, params, backend=backend)(vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = compiled_hvp(model, loss_fn, params, backend=backend)(vectors)
    expected = exact_hvp(loss_fn, params)[0](vectors)
    for products in (first, second):
        for a, b in zip(products, expected):
            torch.testing.assert_close(flat(a), flat(b), rtol=0, atol=0)


def test_past_the_recompile_limit_products_warn_instead_of_running_eagerly_unannounced():
    torch.manual_seed(0)
    x = torch.randn(6, 5)
    with torch._dynamo.config.patch(recompile_limit=1):
        for i in range(2):  # one layout per model, with the eager backend (no code generation)
            model = nn.Sequential(nn.Linear(5, 2 + i))
            params = list(model.parameters())

            def loss_fn():
                return model(x).square().mean()

            vectors = random_vectors(params, 1, torch.Generator().manual_seed(0))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = compiled_hvp(model, loss_fn, params, backend="eager")(vectors)
            assert [w for w in caught if "could not compile" in str(w.message)] or i == 0
            torch.testing.assert_close(flat(got[0]), flat(exact_hvp(loss_fn, params)[0](vectors)[0]))
    assert "recompile" in str(caught[-1].message).lower()


def test_an_error_of_loss_fn_itself_is_raised_not_turned_into_a_fallback():
    model = nn.Linear(4, 2)
    x = torch.randn(6, 3)  # wrong width: the loss fails compiled and eagerly alike

    def loss_fn():
        return model(x).sum()

    product = compiled_hvp(model, loss_fn, list(model.parameters()), backend="eager")
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        product(random_vectors(list(model.parameters()), 1))
    from xsam.products import _COMPILED

    assert all(p.fallback_reason is None for p in _COMPILED[model].values())


# ----- Gauss-Newton ---------------------------------------------------------------------------
def dense_ggn(model, x, loss_of_output):
    """J^T H J built explicitly: the Jacobian of the flat output and the Hessian of the loss in it."""
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    sizes = [p.numel() for p in params]
    out_shape = model(x).shape

    def output_of(w):
        weights = {n: t.view_as(p) for n, t, p in zip(names, w.split(sizes), params)}
        return functional_call(model, weights, (x,)).reshape(-1)

    J = torch.autograd.functional.jacobian(output_of, flat(params).to(params[0].dtype))
    z = model(x).detach().reshape(-1)
    H = torch.autograd.functional.hessian(lambda z_: loss_of_output(z_.view(out_shape)), z)
    return J.T @ H @ J


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_ggn_products_equal_a_dense_jacobian_and_loss_hessian(loss):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (7,))
    target = torch.randn(7, 3, dtype=torch.float64)
    loss_of = {"cross_entropy": lambda out: nn.functional.cross_entropy(out, y),
               "mse": lambda out: (out - target).square().mean()}[loss]
    params = list(model.parameters())
    vectors = random_vectors(params, 3, torch.Generator().manual_seed(1))
    products = ggn_hvp(model, lambda: loss_of(model(x)), params)(vectors)
    G = dense_ggn(model, x, loss_of)
    for v, gv in zip(vectors, products):
        torch.testing.assert_close(flat(gv), G @ flat(v), rtol=1e-10, atol=1e-12)
        assert float(flat(v) @ flat(gv)) >= 0  # positive semi-definite
    assert all(p.grad is None for p in params)


def test_ggn_in_eval_mode_uses_the_running_statistics_and_leaves_them_alone():
    torch.manual_seed(0)
    model = bn_cnn().double()
    x, y = batch("bn_cnn", 3)
    x = x.double()
    params = list(model.parameters())
    before = state_of(model)
    v = random_vectors(params, 1, torch.Generator().manual_seed(2))
    with eval_mode(model):
        (gv,) = ggn_hvp(model, lambda: nn.functional.cross_entropy(model(x), y), params)(v)
        G = dense_ggn(model, x, lambda out: nn.functional.cross_entropy(out, y))
    torch.testing.assert_close(flat(gv), G @ flat(v[0]), rtol=1e-10, atol=1e-12)
    assert model.training
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), before))


def test_a_loss_linear_in_the_output_has_a_zero_gauss_newton_matrix():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    x = torch.randn(4, 3)
    (gv,) = ggn_hvp(model, lambda: model(x).sum(), params)(random_vectors(params, 1))
    assert all(torch.equal(t, torch.zeros_like(p)) for t, p in zip(gv, params))


def test_products_refuse_foreign_parameters_and_ggn_a_loss_fn_it_cannot_split():
    model, other = nn.Linear(3, 2), nn.Linear(3, 2)
    params = list(model.parameters())
    x = torch.ones(4, 3)
    v = random_vectors(params, 1)
    for build in (compiled_hvp, ggn_hvp):
        with pytest.raises(ValueError, match=r"params\[0\].*not a parameter of model"):
            build(model, lambda: model(x).sum(), list(other.parameters()))
    with pytest.raises(ValueError, match="called model more than once"):
        ggn_hvp(model, lambda: (model(x) + model(x)).sum(), params)(v)
    with pytest.raises(ValueError, match="did not call model"):
        ggn_hvp(model, lambda: params[0].sum() * 0 + x.sum(), params)(v)
    rnn = nn.RNN(3, 2)  # returns (output, h_n)
    with pytest.raises(ValueError, match="output to be a tensor"):
        ggn_hvp(rnn, lambda: rnn(x)[0].sum(), list(rnn.parameters()))(random_vectors(list(rnn.parameters()), 1))


# ----- the optimizer --------------------------------------------------------------------------
def step_functions(model, x, y):
    """The optimizer's forward-only ``loss_fn`` and its closure (forward and backward) on one batch."""
    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    return loss_fn, closure_of(loss_fn)


def test_xsam_refreshes_v_from_ggn_products():
    """One power iteration from the seeded start: v = G v0 / ||G v0||, G built densely."""
    model = make_model(4, 5, 3)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    params = list(model.parameters())
    G = dense_ggn(model, x, lambda out: nn.functional.cross_entropy(out, y))
    v0 = flat(random_vectors(params, 1, torch.Generator().manual_seed(3))[0])
    expected = G @ v0 / (G @ v0).norm()
    opt = XSAM(params, torch.optim.SGD, lr=0.1, hvp="ggn", model=model, power_iters=1, seed=3)
    loss_fn, closure = step_functions(model, x, y)
    opt.step(closure, loss_fn=loss_fn)
    torch.testing.assert_close(flat(opt.eigenvector()), expected, rtol=1e-9, atol=1e-12)


def test_xsam_with_compiled_products_matches_exact_products():
    runs = {}
    for hvp in ("exact", "compiled"):
        torch.manual_seed(0)
        model = mlp()
        x, y = batch("mlp", 4)
        opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, hvp=hvp, model=model, power_iters=2, seed=1)
        loss_fn, closure = step_functions(model, x, y)
        for _ in range(2):
            opt.step(closure, loss_fn=loss_fn)
        runs[hvp] = (flat(opt.eigenvector()), flat(model.parameters()))
    for exact, compiled in zip(runs["exact"], runs["compiled"]):
        torch.testing.assert_close(compiled, exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hvp", ["compiled", "ggn"])
def test_product_modes_without_model_fail_clearly_and_change_nothing(hvp):
    torch.manual_seed(0)
    model = mlp()
    x, y = batch("mlp", 5)
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, hvp=hvp)
    before = state_of(model)
    loss_fn, closure = step_functions(model, x, y)
    with pytest.raises(ValueError, match=f"hvp='{hvp}' needs model="):
        opt.step(closure, loss_fn=loss_fn)
    assert all(torch.equal(a, b) for a, b in zip(state_of(model), before))
    with pytest.raises(ValueError, match=f"hvp='{hvp}' needs loss_fn"):
        XSAM(model.parameters(), torch.optim.SGD, lr=0.1, hvp=hvp, model=model).step(closure)


@pytest.mark.slow
def test_the_product_cost_bench_times_every_method_and_checks_the_exact_ones():
    from xsam.bench.products_bench import METHODS, measure

    rows = measure("digits_cnn", rounds=1, block_seconds=0.0, log=lambda _: None)
    assert [r.method for r in rows] == list(METHODS)
    assert all(r.ratio > 0 and r.milliseconds > 0 for r in rows)
    by_method = {r.method: r for r in rows}
    assert by_method["gradient"].ratio == 1.0
    assert by_method["func_eager"].relative_error < 1e-5 and by_method["compiled"].relative_error < 1e-5
