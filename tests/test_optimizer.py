"""SAM, ASAM and X-SAM steps against flat-vector oracles written here, plus the step protocol."""
import copy
import itertools

import pytest
import torch
from torch import nn

from xsam import SAM, XSAM, EigenSAM

from helpers import Quadratic, assert_same_state, bn_batch, closure_of, flat, make_bn_run, resumed_halfway, same_bits, \
    set_eigenvector

EPS = 1e-12
RHO, ALPHA, LR = (0.05, 0.2), (0.3, 1.5), (0.1, 0.05)  # per param group: group 0 = p0, group 1 = p1, p2


def groups(q, **extra):
    return q.two_groups(RHO, ALPHA, LR, **extra)


def oracle(q, steps, *, correction="signed", normalize=True, adaptive=False, seed=0, use_eigenvector=True):
    """X-SAM (or SAM with use_eigenvector=False) with plain SGD, on flat float64 vectors."""
    rho, alpha = q.per_element(RHO), q.per_element(ALPHA)

    def ascent(w, g, v):
        return rho * w * w * g / ((w * g).norm() + EPS) if adaptive else rho * g / (g.norm() + EPS)

    def descent(ga, v):
        if not use_eigenvector:
            return ga
        gh = ga / (ga.norm() + EPS) if normalize else ga
        c = gh @ v
        beta = {"signed": torch.sign(ga @ v) * c, "symmetric": c, "acute": c.clamp_min(0)}[correction]
        return gh - alpha * beta * v

    w, steps = q.sgd_oracle(steps, seed, q.per_element(LR), ascent, descent, refresh=use_eigenvector)
    return w, [dict(s, cos_gadv_v=(s["ga"] @ s["v"]) / (s["ga"].norm() + EPS),
                    cos_g_v=(s["g"] @ s["v"]) / (s["g"].norm() + EPS)) for s in steps if use_eigenvector]


@pytest.mark.parametrize("correction, normalize, adaptive",
                         list(itertools.product(["signed", "symmetric", "acute"], [True, False], [False, True])))
def test_xsam_step_equals_flat_oracle(correction, normalize, adaptive):
    q = Quadratic()
    opt = XSAM(groups(q), torch.optim.SGD, correction=correction, normalize=normalize, adaptive=adaptive,
               eig_interval=2, power_iters=5, hvp="exact", seed=3)
    want, history = oracle(q, 5, correction=correction, normalize=normalize, adaptive=adaptive, seed=3)
    records = []
    handle = opt.register_diagnostics_hook(lambda o, r: records.append(r))
    for t in range(5):
        if t == 4:
            handle.remove()  # the last step is not reported
        opt.step(q.closure, loss_fn=q.loss)
    torch.testing.assert_close(flat(q.params), want, rtol=1e-12, atol=1e-12)
    d = opt.diagnostics()
    assert d["step"] == 5 and d["refreshes"] == 3
    for key in ("eigenvalue", "cos_gadv_v", "cos_g_v"):
        assert abs(d[key] - history[-1][key].item()) < 1e-10, key
    assert [r["step"] for r in records] == [0, 1, 2, 3]
    assert [r["refreshed"] for r in records] == [True, False, True, False]
    for r, h in zip(records, history):
        assert abs(r["cos_gadv_v"].item() - h["cos_gadv_v"].item()) < 1e-10
        assert abs(r["eigenvalue"].item() - h["eigenvalue"].item()) < 1e-10
        assert isinstance(r["correction"], torch.Tensor)


@pytest.mark.parametrize("cls, kwargs, oracle_kwargs, steps, tol", [
    (SAM, {}, dict(use_eigenvector=False), 3, 1e-12),
    (SAM, dict(adaptive=True), dict(adaptive=True, use_eigenvector=False), 3, 1e-12),
    (XSAM, dict(hvp="finite_difference", eig_interval=2, seed=1), dict(seed=1), 4, 1e-7),
])
def test_sam_asam_and_finite_difference_xsam_equal_their_oracle(cls, kwargs, oracle_kwargs, steps, tol):
    q = Quadratic()
    opt = cls(groups(q), torch.optim.SGD, **kwargs)
    want, _ = oracle(q, steps, **oracle_kwargs)
    for _ in range(steps):
        opt.step(q.closure)
    torch.testing.assert_close(flat(q.params), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("cls, kwargs, sam_kwargs, steps, tol", [
    (XSAM, dict(normalize=False, hvp="finite_difference"), {}, 4, (0.0, 0.0)),  # bit for bit
    (EigenSAM, dict(momentum=0.9, hvp="exact"), dict(momentum=0.9), 6, (1e-14, 1e-15)),  # e = a * g + 0 * v
])
def test_alpha_zero_is_sam(cls, kwargs, sam_kwargs, steps, tol):
    q1, q2 = Quadratic(), Quadratic()
    opt = cls(groups(q1, alpha=0.0), torch.optim.SGD, eig_interval=2, **kwargs)
    sam = SAM(groups(q2), torch.optim.SGD, **sam_kwargs)
    for _ in range(steps):
        opt.step(q1.closure, loss_fn=q1.loss)
        sam.step(q2.closure)
    torch.testing.assert_close(flat(q1.params), flat(q2.params), rtol=tol[0], atol=tol[1])


def step_with_given_eigenvector(v, correction):
    """One step (no refresh) from the same weights with the stored eigenvector set to v; returns .grad."""
    q = Quadratic()
    opt = XSAM(groups(q), torch.optim.SGD, correction=correction, eig_interval=1000)
    set_eigenvector(opt, q.params, v)
    w = flat(q.params)
    opt.step(q.closure)
    rho = q.per_element(RHO)
    g = q.grad(w)
    ga = q.grad(w + rho * g / (g.norm() + EPS))
    return flat([p.grad for p in q.params]), ga / (ga.norm() + EPS)


def test_sign_of_v_matters_for_signed_and_not_for_symmetric():
    q = Quadratic()
    v = q.eigenvectors[:, 1] + 0.3 * q.eigenvectors[:, 0]
    v = v / v.norm()
    alpha = q.per_element(ALPHA)
    plus, gh = step_with_given_eigenvector(v, "signed")
    minus, _ = step_with_given_eigenvector(-v, "signed")
    c = gh @ v
    # signed: beta = |c| whatever the sign of v, so the result moves along -sign(v) * v (the part along the
    # stored v shrinks by (1 - alpha) when <gh, v> > 0 and grows by (1 + alpha) when it is < 0).
    torch.testing.assert_close(plus, gh - alpha * c.abs() * v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(minus, gh + alpha * c.abs() * v, rtol=1e-12, atol=1e-12)
    sym_plus, _ = step_with_given_eigenvector(v, "symmetric")
    sym_minus, _ = step_with_given_eigenvector(-v, "symmetric")
    torch.testing.assert_close(sym_plus, sym_minus, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(sym_plus, gh - alpha * c * v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hvp", ["finite_difference", "streaming"])
def test_step_equals_manual_two_step_path(hvp):
    q1, q2 = Quadratic(), Quadratic()
    auto = XSAM(groups(q1), torch.optim.SGD, momentum=0.9, eig_interval=2, hvp=hvp)
    manual = XSAM(groups(q2), torch.optim.SGD, momentum=0.9, eig_interval=2, hvp=hvp)
    for _ in range(4):
        auto.step(q1.closure)
        if manual.refresh_due:
            manual.refresh_eigenvector(q2.closure)
        manual.zero_grad()
        q2.closure()
        manual.first_step(zero_grad=True)
        q2.closure()
        manual.second_step(zero_grad=True)
    assert same_bits(q1.params, q2.params) and same_bits(auto.eigenvector(), manual.eigenvector())
    assert_same_state(auto.diagnostics(), manual.diagnostics())


@pytest.mark.parametrize("cls", [XSAM, EigenSAM])
def test_checkpoint_resume_is_bit_identical(cls):
    (model_a, opt_a), (model_c, opt_c) = resumed_halfway(cls, 4)
    assert same_bits(model_a.state_dict().values(), model_c.state_dict().values())
    assert same_bits(opt_a.eigenvector(), opt_c.eigenvector())
    assert opt_a.diagnostics() == opt_c.diagnostics()
    # The base optimizer and the wrapper still share their param groups after loading.
    assert opt_c.base_optimizer.param_groups is opt_c.param_groups


def test_batchnorm_statistics_come_from_the_first_pass_only():
    for hvp_eval_mode in (True, False):
        model, opt = make_bn_run(XSAM)
        opt.tracker.hvp_eval_mode = hvp_eval_mode
        twin = copy.deepcopy(model)
        x, y = bn_batch(0)

        closure = closure_of(lambda: nn.functional.cross_entropy(model(x), y))
        opt.step(closure)  # refreshes (2 finite-difference HVPs), then two passes
        twin(x)  # one training-mode forward at the unperturbed weights: the first pass
        bn, bn_twin = model[1], twin[1]
        assert torch.equal(bn.running_mean, bn_twin.running_mean)
        assert torch.equal(bn.running_var, bn_twin.running_var)
        assert bn.num_batches_tracked.item() == 1
        assert model.training and bn.training  # eval mode of the HVPs was undone


def test_lr_scheduler_and_add_param_group_reach_the_base_optimizer():
    q = Quadratic()
    opt = XSAM(q.params[:1], torch.optim.SGD, lr=0.1, rho=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(q.closure, loss_fn=q.loss)
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.05
    opt.add_param_group({"params": q.params[1:2], "rho": 0.2, "alpha": 0.5, "lr": 0.3})
    assert opt.base_optimizer.param_groups[1] is opt.param_groups[1]
    assert opt.param_groups[1]["rho"] == 0.2 and opt.param_groups[1]["momentum"] == 0
    opt.base_optimizer.add_param_group({"params": q.params[2:]})  # the step gives it the wrapper's defaults
    before = [p.detach().clone() for p in q.params[1:]]
    opt.step(q.closure, loss_fn=q.loss)
    assert not any(torch.equal(p, b) for p, b in zip(q.params[1:], before))
    assert opt.param_groups[2]["rho"] == 0.01 and opt.diagnostics()["step"] == 2


def test_parameters_without_gradient_are_skipped():
    q = Quadratic()
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    gs = groups(q)
    # Last in parameter order, so the random start draws for the others are the oracle's; its rows of
    # v vanish after the first HVP, leaving the same direction.
    gs[1]["params"] = gs[1]["params"] + [unused]
    opt = XSAM(gs, torch.optim.SGD, eig_interval=2, hvp="exact", seed=3)
    want, _ = oracle(q, 3, seed=3)
    for _ in range(3):
        opt.step(q.closure, loss_fn=q.loss)
    torch.testing.assert_close(flat(q.params), want, rtol=1e-12, atol=1e-12)
    assert torch.equal(unused, torch.ones(3, dtype=torch.float64)) and unused.grad is None


def test_step_without_closure_and_exact_without_loss_fn_are_clear_errors():
    q = Quadratic()
    before = flat(q.params)
    opt = XSAM(q.params, torch.optim.SGD, lr=0.1, hvp="exact")
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="loss_fn"):
        opt.step(q.closure)
    assert torch.equal(flat(q.params), before)
    assert opt.diagnostics()["step"] == 0 and opt.eigenvector() is None
    with pytest.raises(ValueError, match="closure"):
        SAM(q.params, torch.optim.SGD, lr=0.1).step()


def test_sparse_gradients_are_rejected_before_anything_changes():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = XSAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    before = emb.weight.detach().clone()

    closure = closure_of(lambda: emb(torch.tensor([1, 2])).sum())
    with pytest.raises(ValueError, match="sparse"):
        opt.step(closure)
    assert torch.equal(emb.weight, before)
    assert opt.diagnostics()["step"] == 0


def test_built_base_optimizer_instance_is_accepted_and_keeps_its_own_eps_beside_the_wrappers():
    q = Quadratic()
    base = torch.optim.Adam(q.params, lr=1e-3, eps=1e-6)
    opt = XSAM(q.params, base, hvp="exact", eps=1e-10)
    opt.step(q.closure, loss_fn=q.loss)
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    assert base.defaults["eps"] == 1e-6 and opt.eps == 1e-10
    with pytest.raises(ValueError, match="other parameters"):
        XSAM(q.params[:1], torch.optim.SGD(q.params, lr=0.1))
