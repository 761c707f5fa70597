"""Eigen-SAM steps against a flat float64 oracle written here, on every available backend, plus what it
shares with X-SAM (HVP modes, the step protocol)."""
import pytest
import torch
from torch import nn

from xsam import EigenSAM

from helpers import Quadratic, closure_of, flat, make_model, scaled_or_plain_steps, set_eigenvector
from op_cases import backend_params

EPS = 1e-12
RHO, ALPHA, LR = (0.05, 0.2), (0.1, 0.5), (0.1, 0.05)  # per param group: group 0 = p0, group 1 = p1, p2


def groups(q, **extra):
    return q.two_groups(RHO, ALPHA, LR, **extra)


def tilted_ascent(g, v, rho, alpha):
    """docs/algorithm.md, literally: e = rho * (gh + alpha * s * v_perp), not renormalised."""
    gh = g / (g.norm() + EPS)
    c = gh @ v
    s = torch.sign(g @ v)
    return rho * (gh + alpha * s * (v - c * gh))


def oracle(q, steps, *, seed=0):
    """Eigen-SAM with plain SGD on flat float64 vectors; also the diagnostics of each step."""
    rho, alpha = q.per_element(RHO), q.per_element(ALPHA)
    w, steps = q.sgd_oracle(steps, seed, q.per_element(LR), lambda w, g, v: tilted_ascent(g, v, rho, alpha),
                            lambda ga, v: ga)
    history = []
    for s in steps:
        g, v = s["g"], s["v"]
        c = (g @ v) / (g.norm() + EPS)
        history.append({"eigenvalue": s["eigenvalue"], "cos_g_v": c,
                        "tilt_a": RHO[0] * (1 - ALPHA[0] * c.abs()) / (g.norm() + EPS),
                        "tilt_b": RHO[0] * ALPHA[0] * torch.sign(g @ v)})
    return w, history


@pytest.mark.parametrize("backend, device", backend_params(devices=("cpu", "cuda")))
def test_eigensam_equals_flat_oracle_on_every_backend(backend, device):
    q = Quadratic()
    want, history = oracle(q, 5, seed=3)  # on the CPU, where q.A stays
    if device == "cuda":
        for p in q.params:
            p.data = p.data.cuda()
    opt = EigenSAM(groups(q), torch.optim.SGD, eig_interval=2, power_iters=5, hvp="exact", seed=3, backend=backend)
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append({k: v for k, v in r.items()}))
    A = q.A.to(device)

    closure = closure_of(lambda: q.loss() if device == "cpu" else _loss_on(q, A))
    for _ in range(5):
        opt.step(closure, loss_fn=(q.loss if device == "cpu" else lambda: _loss_on(q, A)))
    torch.testing.assert_close(flat(q.params).cpu(), want, rtol=1e-12, atol=1e-12)
    d = opt.diagnostics()
    assert d["step"] == 5 and d["refreshes"] == 3
    for key in ("eigenvalue", "cos_g_v", "tilt_a", "tilt_b"):
        assert abs(d[key] - history[-1][key].item()) < 1e-10, key
    assert [bool(r["refreshed"]) for r in records] == [True, False, True, False, True]
    for r, h in zip(records, history):
        assert abs(float(r["tilt_a"]) - h["tilt_a"].item()) < 1e-10


def _loss_on(q, A):
    w = torch.cat([p.reshape(-1) for p in q.params])
    return 0.5 * w @ A @ w + q.b.to(A.device) @ w


@pytest.mark.parametrize("hvp, tol", [("finite_difference", 1e-7), ("forward_difference", 1e-5)])
def test_difference_hvps_match_the_exact_oracle_closely(hvp, tol):
    q = Quadratic()
    opt = EigenSAM(groups(q), torch.optim.SGD, hvp=hvp, eig_interval=2, seed=1)
    want, _ = oracle(q, 4, seed=1)
    for _ in range(4):
        opt.step(q.closure)
    torch.testing.assert_close(flat(q.params), want, rtol=tol, atol=tol)


def step_with_given_eigenvector(v, backend="reference"):
    """One step (no refresh) from the same weights with the stored eigenvector set to v; returns the weights."""
    q = Quadratic()
    opt = EigenSAM(groups(q), torch.optim.SGD, eig_interval=1000, backend=backend)
    set_eigenvector(opt, q.params, v)
    w = flat(q.params)
    opt.step(q.closure)
    return flat(q.params), w, q, opt


@pytest.mark.parametrize("backend, device", backend_params(devices=("cpu",)))
def test_the_update_does_not_depend_on_the_sign_of_v(backend, device):
    q = Quadratic()
    v = q.eigenvectors[:, 1] + 0.3 * q.eigenvectors[:, 0]
    v = v / v.norm()
    plus, w, q, opt = step_with_given_eigenvector(v, backend)
    minus, _, _, opt_minus = step_with_given_eigenvector(-v, backend)
    assert torch.equal(plus, minus)  # s * v and |c| are the same bits for v and -v
    # ... and it is the oracle's step with that v.
    rho, alpha, lr = q.per_element(RHO), q.per_element(ALPHA), q.per_element(LR)
    g = q.grad(w)
    torch.testing.assert_close(plus, w - lr * q.grad(w + tilted_ascent(g, v, rho, alpha)), rtol=1e-12, atol=1e-12)
    assert opt.diagnostics()["tilt_b"] == -opt_minus.diagnostics()["tilt_b"]


def test_the_tilt_leans_toward_v_by_alpha_times_the_orthogonal_part():
    q = Quadratic()
    v = q.eigenvectors[:, 0]
    opt = EigenSAM(q.params, torch.optim.SGD, lr=0.0, rho=0.1, alpha=0.5, eig_interval=1000)
    set_eigenvector(opt, q.params, v)
    w = flat(q.params)
    q.closure()
    opt.first_step(zero_grad=True)
    e = flat(q.params) - w
    g = q.grad(w)
    gh = g / g.norm()
    s = torch.sign(g @ v)
    # The component along gh is rho (not renormalised), the one orthogonal to it is rho * alpha * |v_perp|.
    assert (e @ gh).item() == pytest.approx(0.1, rel=1e-12)
    v_perp = v - (gh @ v) * gh
    torch.testing.assert_close(e - (e @ gh) * gh, 0.1 * 0.5 * s * v_perp, rtol=1e-10, atol=1e-14)
    q.closure()
    opt.second_step()
    assert torch.equal(flat(q.params), w)  # lr 0: the restore is exact


def test_amp_scaler_run_equals_the_unscaled_run_and_skips_a_non_finite_pass():
    """Power-of-two scales make scaling and unscaling exact; an inf in the perturbed pass skips the step."""
    from xsam.amp import SAMGradScaler

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (16,), generator=gen)
    runs = []
    for use_scaler in (False, True):
        model = make_model(6, 8, 3)
        opt = EigenSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, alpha=0.5, eig_interval=2,
                       power_iters=2, hvp="exact")
        scaler = SAMGradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
        calls, poison = [], []
        loss_fn = lambda: nn.functional.cross_entropy(model(x), y)

        def closure():
            calls.append(1)
            loss = loss_fn()
            (scaler.scale(loss) if use_scaler else loss).backward()
            if poison and len(calls) == 2:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            return loss

        scaled_or_plain_steps(opt, scaler, closure, 3, use_scaler, loss_fn=loss_fn)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.eigenvector()))
        if use_scaler:
            before = [p.detach().clone() for p in model.parameters()]
            calls.clear()
            poison.append(True)
            scaler.step(opt, closure, loss_fn=loss_fn)
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert opt.diagnostics()["step"] == 3 and opt.diagnostics()["skipped_steps"] == 1
    (w0, v0), (w1, v1) = runs
    assert all(torch.equal(a, b) for a, b in zip(w0 + v0, w1 + v1))
