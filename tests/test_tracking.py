"""Eigenvector tracking: forward-difference refreshes, their step size, and streaming.

Oracles: closed forms on quadratics (A is known, so H v, the top eigenvector and every pass are
known exactly), double-backward HVPs computed here with torch.autograd and a flat fp64 re-derivation
of the streaming step. Evaluations are counted by closure calls. Under AMP: test_amp.py; under DDP
and FSDP2: test_distributed.py, test_fsdp.py.
"""
import copy
import math

import pytest
import torch
from torch import nn

from xsam import XSAM
from xsam.hessian import default_fd_step, forward_difference_hvp, random_vectors
from xsam.optim.eigenvector import STREAMING_RATE

from helpers import Quadratic, assert_same_state, closure_of, flat, make_model, mse, raising_on_call, \
    regression_batches, same_bits, snapshot, unflat


class Counted:
    """A closure that counts its calls and records the weights and the model mode of each."""

    def __init__(self, closure, params, model=None):
        self.closure, self.params, self.model = closure, params, model
        self.weights, self.training = [], []

    def __call__(self):
        self.weights.append(flat(self.params))
        self.training.append(None if self.model is None else self.model.training)
        return self.closure()

    @property
    def calls(self) -> int:
        return len(self.weights)


def xsam_on(params, **kw):
    kw = {"lr": 0.01, "rho": 0.05, "alpha": 0.2, "power_iters": 1, "eig_interval": 5, **kw}
    return XSAM(params, torch.optim.SGD, **kw)


# ----- cost: gradient evaluations per step, counted ---------------------------------------------
@pytest.mark.parametrize("hvp, p, k, per_step", [
    ("forward_difference", 1, 5, 2.2),  # the cost model: 2 + p/k
    ("forward_difference", 3, 2, 3.5),
    ("finite_difference", 1, 5, 2.4),  # 2 + 2p/k
    ("streaming", 5, 5, 2.0),  # SAM's two passes only (p and k are not used)
])
def test_evaluations_per_step_follow_the_cost_model(hvp, p, k, per_step):
    q = Quadratic()
    closure = Counted(q.closure, q.params)
    opt = xsam_on(q.params, hvp=hvp, power_iters=p, eig_interval=k)
    steps = 20
    for _ in range(steps):
        opt.step(closure)
    assert closure.calls == round(per_step * steps)


def bn_problem():
    """A float64 MLP with BatchNorm, a regression batch and its closure."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 1)).double()
    x, y = next(regression_batches([0], 1, 16, 4, 1))
    return model, x, y, closure_of(lambda: mse(model, x, y))


@pytest.mark.parametrize("eval_mode, calls, modes", [
    # first pass (train), grad L(w) and one product per iteration (eval), second pass (train)
    (True, 10 * 2 + 2 * 3, [True, False, False, False, True]),
    (False, 10 * 2 + 2 * 2, [True, True, True, True]),
])
def test_forward_differences_with_a_batchnorm_model_reuse_the_first_pass_only_in_its_mode(eval_mode, calls, modes):
    """In eval mode grad L(w) is evaluated once more per refresh (2 + (p+1)/k); else the first pass is reused."""
    model, _, _, bn_closure = bn_problem()
    closure = Counted(bn_closure, list(model.parameters()), model)
    opt = xsam_on(model.parameters(), hvp="forward_difference", power_iters=2, eig_interval=5, model=model,
                  hvp_eval_mode=eval_mode)
    for _ in range(10):
        opt.step(closure)
    assert closure.calls == calls and closure.training[:len(modes)] == modes  # the modes of the first refresh
    assert model.training


# ----- order: where the refresh runs ------------------------------------------------------------
def test_forward_differences_run_between_the_first_pass_and_the_perturbation():
    q = Quadratic()
    closure = Counted(q.closure, q.params)
    opt = xsam_on(q.params, hvp="forward_difference", power_iters=2, rho=0.05)
    w = flat(q.params)
    start = random_vectors(q.params, 1, torch.Generator().manual_seed(0))[0]
    v0 = flat(start) / flat(start).norm()
    with torch.no_grad():
        h = float(default_fd_step(q.params, unflat(v0, q.params), order=1))
    opt.step(closure)
    assert closure.calls == 4
    assert torch.equal(closure.weights[0], w)  # the first pass, at w
    torch.testing.assert_close(closure.weights[1] - w, h * v0, rtol=1e-9, atol=1e-15)  # w + h v
    v1 = q.A @ v0
    v1 = v1 / v1.norm()
    torch.testing.assert_close((closure.weights[2] - w) / (closure.weights[2] - w).norm(), v1, rtol=1e-6, atol=1e-8)
    g = q.grad(w)
    torch.testing.assert_close(closure.weights[3] - w, 0.05 * g / g.norm(), rtol=1e-9, atol=1e-12)  # w + e


def test_central_differences_keep_their_place_before_the_first_pass():
    q = Quadratic()
    closure = Counted(q.closure, q.params)
    opt = xsam_on(q.params, hvp="finite_difference")
    w = flat(q.params)
    opt.step(closure)
    assert closure.calls == 4
    plus, minus = closure.weights[0] - w, closure.weights[1] - w
    torch.testing.assert_close(plus, -minus, rtol=1e-12, atol=1e-15)
    assert torch.equal(closure.weights[2], w)  # then the first pass


# ----- quality: v against known top eigenvectors ---------------------------------------------------
@pytest.mark.parametrize("hvp, dtype, tol", [("forward_difference", torch.float64, 1e-7),
                                             ("forward_difference", torch.float32, 1e-3),
                                             ("streaming", torch.float64, 1e-2)])
def test_v_converges_to_the_closed_form_top_eigenvector(hvp, dtype, tol):
    """Forward differences, one warm-started product every 5 steps: after 20 refreshes |cos| is 1 - O((4/7)^40)."""
    q = Quadratic(dtype=dtype)
    opt = xsam_on(q.params, hvp=hvp, power_iters=1, eig_interval=5)
    for _ in range(100):
        opt.step(q.closure)
    v = flat(opt.eigenvector())
    assert abs(float(v @ q.eigenvectors[:, 0])) > 1 - tol
    if hvp == "forward_difference":  # streaming estimates no eigenvalue
        assert opt.diagnostics()["eigenvalue"] == pytest.approx(-7.0, rel=tol)


class MiniBatchQuadratic:
    """L_B(w) = 0.5 w^T A_B w + b_B^T w over 8 batches whose Hessians average to A exactly.

    A = Q diag(lam) Q^T with lam_1 = 10 well above the rest (the full-data top eigenvector is
    Q[:, 0]); each A_B = A + N_B with symmetric noise N_B summing to zero over the batches, of
    about the size of the gap, so a batch's own top eigenvector is not the full-data one.
    """

    def __init__(self, seed=0, n=12, batches=8, noise=2.0):
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        lam = torch.linspace(3.0, 0.1, n, dtype=torch.float64)
        lam[0] = 10.0
        self.A, self.top = q @ torch.diag(lam) @ q.T, q[:, 0]
        noise_mats = [torch.randn(n, n, generator=gen, dtype=torch.float64) for _ in range(batches)]
        noise_mats = [(m + m.T) / 2 for m in noise_mats]
        mean = sum(noise_mats) / batches
        scale = noise / max(float(torch.linalg.matrix_norm(m - mean, 2)) for m in noise_mats)
        self.As = [self.A + scale * (m - mean) for m in noise_mats]
        self.bs = [torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(batches)]
        self.w = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64))
        self.order = torch.randint(0, batches, (1000,), generator=gen).tolist()

    def closure_for(self, step):
        A, b = self.As[self.order[step]], self.bs[self.order[step]]
        return closure_of(lambda: 0.5 * self.w @ A @ self.w + b @ self.w)

    def quality(self, v):
        """Rayleigh quotient of v on the full-data Hessian over its top eigenvalue, and |cos(v, top)|."""
        v = flat(v)
        return float(v @ self.A @ v / (v @ v)) / 10.0, abs(float(v @ self.top)) / float(v.norm())


@pytest.mark.parametrize("hvp, mean_rq, min_rq, mean_cos", [
    ("forward_difference", 0.97, 0.9, 0.97),  # measured 0.994, 0.986, 0.997
    ("streaming", 0.75, 0.2, 0.8),  # measured 0.844, 0.268, 0.892: weaker, with dips
])
def test_v_tracks_the_full_data_top_eigenvector_over_mini_batches(hvp, mean_rq, min_rq, mean_cos):
    """Each batch's Hessian is off by noise the size of the gap; the tracked v follows their mean's top."""
    prob = MiniBatchQuadratic()
    opt = XSAM([prob.w], torch.optim.SGD, lr=0.05, momentum=0.9, rho=0.05, alpha=0.2, hvp=hvp, power_iters=1,
               eig_interval=5)
    rq, cos = [], []
    for t in range(300):
        opt.step(prob.closure_for(t))
        if t >= 100:
            r, c = prob.quality(opt.eigenvector())
            rq.append(r)
            cos.append(c)
    assert sum(rq) / len(rq) > mean_rq and min(rq) > min_rq
    assert sum(cos) / len(cos) > mean_cos


# ----- the forward-difference step size h ~ sqrt(eps) --------------------------------------------
def mlp_problem(dtype):
    model = make_model(6, 16, 16, 1, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=gen).to(dtype), torch.randn(64, 1, generator=gen).to(dtype)
    params = list(model.parameters())

    closure = closure_of(lambda: mse(model, x, y))

    def exact(v):  # double backward in fp64 on an fp64 copy: the oracle
        m64 = copy.deepcopy(model).double()
        p64 = list(m64.parameters())
        grads = torch.autograd.grad((m64(x.double()) - y.double()).square().mean(), p64, create_graph=True)
        return flat(torch.autograd.grad(grads, p64, [t.double() for t in v]))

    return params, closure, exact


def quadratic_problem(dtype):
    q = Quadratic(dtype=dtype)
    return q.params, q.closure, lambda v: q.A @ flat(v)


def forward_errors(problem, dtype, multipliers):
    """Relative errors of forward differences at ``m`` times the default step h ~ sqrt(eps) for each ``m``, and
    at the central-difference step eps^(1/3)."""
    params, closure, exact = problem(dtype)
    gen = torch.Generator().manual_seed(3)
    v = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params]
    reference = exact(v)

    def error(step):
        for p in params:
            p.grad = None
        closure()
        base = [p.grad.clone() for p in params]
        product = forward_difference_hvp(closure, params, base, step=step)([v])[0]
        return float((flat(product) - reference).norm() / reference.norm())

    h = default_fd_step(params, v, order=1)
    return {m: error(h * m) for m in multipliers}, error(default_fd_step(params, v, order=2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_difference_error_on_a_quadratic_is_rounding_only(dtype):
    """No truncation error on a quadratic: the error is O(eps / h) = O(sqrt(eps)) at the default h."""
    errors, _ = forward_errors(quadratic_problem, dtype, (0.01, 1.0, 100.0))
    assert errors[1.0] < 20 * math.sqrt(torch.finfo(dtype).eps)
    assert errors[0.01] > errors[1.0] > errors[100.0]  # rounding shrinks as h grows: nothing else is there


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_difference_step_balances_truncation_and_rounding_on_an_mlp(dtype):
    """The error is V-shaped in h; the default h = sqrt(eps) (1 + rms(w)) / ||v|| sits near the bottom."""
    sweep, central = forward_errors(mlp_problem, dtype, (1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 1e2))
    best = min(sweep.values())
    assert sweep[1.0] <= 4 * best  # near the optimum of the V
    assert sweep[1e-2] > 5 * sweep[1.0] and sweep[1e2] > 5 * sweep[1.0]  # rounding left, truncation right
    assert sweep[1.0] < 30 * math.sqrt(torch.finfo(dtype).eps)
    # The central-difference step eps^(1/3) is too long for an O(h) formula.
    assert central > sweep[1.0]
    if dtype == torch.float64:
        assert central > 10 * sweep[1.0]


def test_default_fd_step_is_sqrt_eps_for_order_1_and_cube_root_for_order_2():
    params = [torch.full((3,), 2.0), torch.full((1,), 2.0)]  # rms(w) = 2
    v = [torch.full((3,), 0.5), torch.full((1,), 0.5)]  # ||v|| = 1
    eps = torch.finfo(torch.float32).eps
    assert float(default_fd_step(params, v, order=1)) == pytest.approx(3 * eps ** 0.5, rel=1e-6)
    assert float(default_fd_step(params, v, order=2)) == pytest.approx(3 * eps ** (1 / 3), rel=1e-6)
    with pytest.raises(ValueError, match="order=3"):
        default_fd_step(params, v, order=3)


# ----- BatchNorm: the products are those of the mode they claim ------------------------------------
@pytest.mark.parametrize("eval_mode", [True, False])
def test_forward_difference_products_with_batchnorm_match_exact_hvps_of_their_mode(eval_mode):
    model, x, y, closure = bn_problem()
    reference = copy.deepcopy(model)
    opt = xsam_on(model.parameters(), hvp="forward_difference", power_iters=1, model=model,
                  hvp_eval_mode=eval_mode, lr=0.0, momentum=0.0)
    opt.step(closure)
    # Only the first pass updated the running statistics: one train-mode forward on the batch.
    with torch.no_grad():
        reference(x)
    for a, b in zip(model.buffers(), reference.buffers()):
        assert torch.equal(a, b)
    # The refresh ran after that pass, at the same weights: its product is H v0 of that mode.
    params = list(reference.parameters())
    start = random_vectors(params, 1, torch.Generator().manual_seed(0))[0]
    v0 = flat(start) / flat(start).norm()
    reference.train(not eval_mode)
    if not eval_mode:
        for m in reference.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.track_running_stats = False  # batch statistics, running ones left alone
    grads = torch.autograd.grad((reference(x) - y).square().mean(), params, create_graph=True)
    hv = flat(torch.autograd.grad(grads, params, unflat(v0, params)))
    torch.testing.assert_close(flat(opt.eigenvector()), hv / hv.norm(), rtol=1e-6, atol=1e-6)


# ----- transactions, checkpoints ------------------------------------------------------------------
@pytest.mark.parametrize("hvp, failing_call", [("forward_difference", 3), ("forward_difference", 2),
                                               ("streaming", 2)])
def test_a_failure_after_the_update_was_computed_changes_nothing(hvp, failing_call):
    """The refresh (or streaming update) of a step that fails is not committed."""
    model, _, _, inner = bn_problem()
    opt = xsam_on(model.parameters(), hvp=hvp, power_iters=1, eig_interval=1, model=model, hvp_eval_mode=False)
    opt.step(inner)
    weights, state = snapshot(model, opt)
    buffers = [b.clone() for b in model.buffers()]
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(raising_on_call(failing_call, inner))
    assert same_bits(weights, model.parameters()) and same_bits(buffers, model.buffers())
    assert_same_state(opt.state_dict(), state)


@pytest.mark.parametrize("hvp", ["forward_difference", "streaming"])
def test_a_resumed_run_continues_bit_identically(hvp):
    model = make_model(6, 8, 3)
    x, y = next(regression_batches([0], 1, 16, 6, 3))
    closure = closure_of(lambda: mse(model, x, y))
    opt = xsam_on(model.parameters(), hvp=hvp, power_iters=2, eig_interval=3, lr=0.1, momentum=0.9)
    for _ in range(4):
        opt.step(closure)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
    for _ in range(4):
        opt.step(closure)
    straight = [p.detach().clone() for p in model.parameters()] + opt.eigenvector()
    model.load_state_dict(saved[0])
    opt2 = xsam_on(model.parameters(), hvp=hvp, power_iters=2, eig_interval=3, lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved[1])
    for _ in range(4):
        opt2.step(closure)
    resumed = [p.detach().clone() for p in model.parameters()] + opt2.eigenvector()
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


# ----- streaming: the arithmetic, the first v, rejection, the manual path ---------------------------
STREAMING_GROUPS = ((0.05, 0.2), (0.3, 1.5), (0.1, 0.05))  # (rho, alpha, lr) of params[0] and of the rest


def streaming_oracle(q, steps, rho, alpha, lr, eps=1e-12):
    """Flat fp64 re-derivation: z = g - g_adv, v <- normalise(v + gamma <z^, v> z^) (first v: z^), then the
    signed correction with that v; plain SGD."""
    rho_v, alpha_v, lr_v = q.per_element(rho), q.per_element(alpha), q.per_element(lr)
    w, v = flat(q.params), None
    for _ in range(steps):
        g = q.grad(w)
        e = rho_v * g / (g.norm() + eps)
        g_adv = q.grad(w + e)
        z = g - g_adv
        zh = z / z.norm()
        v = zh if v is None else v + STREAMING_RATE * (zh @ v) * zh
        v = v / v.norm()
        gh = g_adv / (g_adv.norm() + eps)
        g_corr = gh - alpha_v * (gh @ v).abs() * v
        w = w - lr_v * g_corr
    return w, v


def test_streaming_step_matches_the_flat_oracle_with_two_param_groups():
    q = Quadratic()
    w, v = streaming_oracle(Quadratic(), 5, *STREAMING_GROUPS)  # the same problem, before the optimizer moves it
    opt = XSAM(q.two_groups(*STREAMING_GROUPS), torch.optim.SGD, hvp="streaming")
    for _ in range(5):
        opt.step(q.closure)
    torch.testing.assert_close(flat(q.params), w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(flat(opt.eigenvector()), v, rtol=1e-10, atol=1e-12)
    d = opt.diagnostics()
    assert d["refreshes"] == 5 and math.isnan(d["eigenvalue"]) and not opt.refresh_due


def test_a_zero_streaming_product_is_rejected_and_v_stays_a_unit_vector():
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = xsam_on([w], hvp="streaming")

    def linear():  # zero Hessian: g_adv = g, so z = 0
        loss = (w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    opt.step(linear)
    v = flat(opt.eigenvector())
    d = opt.diagnostics()
    assert d["rejected_refreshes"] == 1 and d["refresh_rejected"] == 1
    assert torch.isfinite(v).all() and float(v.norm()) == pytest.approx(1.0)
    start = flat(random_vectors([w], 1, torch.Generator().manual_seed(0))[0])
    torch.testing.assert_close(v, start / start.norm())  # the normalised start vector
    opt.step(linear)
    assert torch.equal(flat(opt.eigenvector()), v)


def test_streaming_is_refused_where_it_has_no_meaning():
    q = Quadratic()
    opt = xsam_on(q.params, hvp="streaming")
    with pytest.raises(ValueError, match="no refresh of its own"):
        opt.refresh_eigenvector(q.closure)

    class NotWired(XSAM):
        STREAMING = False

    with pytest.raises(ValueError, match="hvp='streaming' is not available for NotWired"):
        NotWired(q.params, torch.optim.SGD, lr=0.1, hvp="streaming")


# ----- the frontier harness (xsam bench --only tracking) --------------------------------------------
def test_a_frontier_run_counts_evaluations_and_scores_v_against_the_large_batch():
    from xsam.bench.tracking_bench import TrackConfig, quality_run

    cfg = TrackConfig("forward_p1_k5", "forward_difference", 1, 5)
    result = quality_run("mlp", cfg, seed=0, steps=10, eval_every=5)
    assert result["closure_per_step"] == pytest.approx(2.2) and result["products_per_step"] == 0
    assert [p["step"] for p in result["points"]] == [5, 10]
    for p in result["points"]:
        assert p["lambda_max"] > 0 and p["top_converged"]
        assert -1.0 <= p["quality"] <= 1.0 + 1e-3 and 0.0 <= p["cos"] <= 1.0  # lambda_max bounds the quotient


@pytest.mark.slow
def test_the_tracking_section_writes_its_table_csvs_and_plot(tmp_path):
    from xsam.bench import main
    from xsam.bench.tracking_bench import CSV_NAME, CURVES_NAME, PLOT_NAME, PRODUCTS_NAME, TABLE_NAME

    assert main(["--only", "tracking", "--quick", "--workers", "1", "--out", str(tmp_path)]) == 0
    for name in (CSV_NAME, CURVES_NAME, PRODUCTS_NAME, TABLE_NAME, PLOT_NAME):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / TABLE_NAME).read_text()
    assert "xsam bench --only tracking" in table and "| streaming |" in table
