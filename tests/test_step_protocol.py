"""Every step all-or-nothing: what a demanding user tries (test_optimizer.py checks the mathematics of
completed steps)."""
import copy
import math
import re

import pytest
import torch
from torch import nn

from xsam import SAM, XSAM, EigenSAM

from helpers import Quadratic, assert_same_state, closure_of, flat, raising_on_call, same_bits

EPS = 1e-12


def four_params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (3, 4, 2, 5)]


def quadratic_closure(params):
    return closure_of(lambda: sum(((i + 1) * p.square()).sum() + p.sum() for i, p in enumerate(params)))


def weights(params):
    return [p.detach().clone() for p in params]


# ----- groups and hyper-parameters checked before any weight moves ----------------------
def test_prebuilt_base_optimizer_with_two_groups_steps_like_the_same_groups_built_by_the_wrapper():
    ps, qs = four_params(), four_params()
    prebuilt = XSAM(ps, torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=0.1), eig_interval=2,
                    hvp="finite_difference")
    own = XSAM([{"params": qs[:2]}, {"params": qs[2:]}], torch.optim.SGD, lr=0.1, eig_interval=2,
               hvp="finite_difference")
    assert [g["rho"] for g in prebuilt.param_groups] == [0.05, 0.05]
    for _ in range(3):
        prebuilt.step(quadratic_closure(ps))
        own.step(quadratic_closure(qs))
    assert same_bits(ps, qs)


@pytest.mark.parametrize("key, value", [("rho", None), ("rho", -1.0), ("rho", math.inf), ("rho", 1e300),
                                        ("alpha", 50.0), ("alpha", float("nan"))])
def test_a_bad_value_edited_into_a_group_is_refused_before_any_weight_moves(key, value):
    ps = four_params()
    opt = XSAM([{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.SGD, lr=0.1, momentum=0.9,
               hvp="finite_difference")
    opt.step(quadratic_closure(ps))
    before, state, valid = weights(ps), copy.deepcopy(opt.state_dict()), opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    with pytest.raises(ValueError, match=rf"param_groups\[1\]: {key}={re.escape(repr(value))} is invalid"):
        opt.step(quadratic_closure(ps))
    assert same_bits(ps, before)
    assert opt.diagnostics()["step"] == 1
    opt.param_groups[1][key] = valid
    assert_same_state(opt.state_dict(), state)


def test_a_raising_hook_propagates_but_the_step_stays_whole_and_counted():
    q = Quadratic()
    opt = XSAM(q.params, torch.optim.SGD, lr=0.1, eig_interval=1, hvp="exact")

    def hook(o, record):
        raise KeyError("hook bug")

    opt.register_diagnostics_hook(hook)
    w0 = flat(q.params)
    with pytest.raises(KeyError, match="hook bug"):
        opt.step(q.closure, loss_fn=q.loss)
    d = opt.diagnostics()
    assert d["step"] == 1 and d["refreshes"] == 1  # counted with the update it made
    assert not torch.equal(flat(q.params), w0) and opt.eigenvector() is not None


# ----- the eigenvector cannot die --------------------------------------------------------------
def test_a_zero_hessian_refresh_is_rejected_and_retried_and_v_never_becomes_zero():
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False).double()
    zeros, x = torch.zeros(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    batch = [zeros]
    opt = XSAM(model.parameters(), torch.optim.SGD, lr=0.1, eig_interval=100, power_iters=40, hvp="exact")
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append(r))
    loss_fn = lambda: model(batch[0]).square().sum()  # noqa: E731  (zero Hessian on an all-zero batch)

    closure = closure_of(loss_fn)
    opt.step(closure, loss_fn=loss_fn)
    v = flat(opt.eigenvector())
    assert bool(records[-1]["refresh_rejected"]) and torch.isfinite(v).all() and v.norm() == pytest.approx(1.0)
    assert opt.diagnostics()["rejected_refreshes"] == 1 and opt.refresh_due  # retried although not scheduled
    batch[0] = x  # a batch with curvature: the retry is accepted
    opt.step(closure, loss_fn=loss_fn)
    assert not bool(records[-1]["refresh_rejected"]) and opt.diagnostics()["refreshes"] == 1
    assert not opt.refresh_due
    hess_v = 2 * flat(opt.eigenvector()).reshape(2, 3) @ (x.T @ x)
    lam = opt.diagnostics()["eigenvalue"]
    assert lam > 0 and (hess_v.reshape(-1) - lam * flat(opt.eigenvector())).norm() < 1e-3 * lam


def test_a_nan_hvp_without_the_scaler_keeps_the_weights_and_v_finite():
    q = Quadratic()
    opt = XSAM(q.params, torch.optim.SGD, lr=0.1, eig_interval=1, hvp="exact")
    opt.step(q.closure, loss_fn=q.loss)
    v_before = [t.clone() for t in opt.eigenvector()]
    lam_before = opt.diagnostics()["eigenvalue"]
    opt.step(q.closure, loss_fn=lambda: q.loss() * float("nan"))
    assert all(torch.isfinite(p).all() for p in q.params)
    assert same_bits(opt.eigenvector(), v_before) and opt.diagnostics()["eigenvalue"] == lam_before
    d = opt.diagnostics()
    assert d["rejected_refreshes"] == 1 and d["refreshes"] == 1 and d["refresh_rejected"] == 1
    opt.step(q.closure, loss_fn=q.loss)  # and the next refresh is taken
    assert opt.diagnostics()["refreshes"] == 2


# ----- validation at construction ---------------------------------------------------------------
def test_complex_and_all_frozen_parameters_are_refused_at_construction_and_when_frozen_since():
    with pytest.raises(ValueError, match="complex"):
        SAM([nn.Parameter(torch.randn(3, dtype=torch.complex64))], torch.optim.SGD, lr=0.1)
    frozen = [nn.Parameter(torch.randn(3), requires_grad=False)]
    with pytest.raises(ValueError, match="frozen"):
        XSAM(frozen, torch.optim.SGD, lr=0.1)
    q = Quadratic()
    opt = XSAM(q.params, torch.optim.SGD, lr=0.1, eig_interval=1, hvp="exact")
    opt.step(q.closure, loss_fn=q.loss)
    for p in q.params:
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="none of the 3 parameters given to XSAM requires a gradient"):
        opt.step(q.closure, loss_fn=q.loss)


# ----- checkpoints ---------------------------------------------------------------------------------
def trained(cls, **kwargs):
    ps = four_params()
    opt = cls(ps, torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    opt.step(quadratic_closure(ps))
    return ps, opt


@pytest.mark.parametrize("source, target", [(SAM, XSAM), (XSAM, SAM), (XSAM, EigenSAM), (EigenSAM, XSAM)])
def test_a_checkpoint_of_another_kind_is_refused_and_changes_nothing(source, target):
    _, src = trained(source)
    _, dst = trained(target)
    before = copy.deepcopy(dst.state_dict())
    with pytest.raises(ValueError, match=f"saved by {source.__name__}, but this optimizer is {target.__name__}"):
        dst.load_state_dict(src.state_dict())
    assert_same_state(dst.state_dict(), before)


@pytest.mark.parametrize("corrupt, match", [
    (lambda sd: sd["state"][0].pop("xsam"), "no 'xsam' entry"),
    (lambda sd: sd["state"][0].update(eigenvector=torch.zeros(7, dtype=torch.float64)), "shape"),
    (lambda sd: sd["state"][0]["eigenvector"].fill_(float("nan")), "not finite"),
    (lambda sd: sd["state"][1].update(xsam=sd["state"][0]["xsam"]), "in the state of 2 parameters"),
    (lambda sd: sd["state"].update(bogus={}), "not parameters of its 'param_groups'"),
    (lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3, 3, dtype=torch.float64)),
     r"parameter 0 has 'momentum_buffer' of shape \(3, 3\).*\(3,\)"),
    (lambda sd: sd["param_groups"][0].update(rho=-1.0), r"state_dict's param_groups\[0\]: rho="),
    (lambda sd: sd["param_groups"][0].update(alpha=float("nan")), r"state_dict's param_groups\[0\]: alpha="),
    (lambda sd: sd["param_groups"][0].update(params=[0, 1]), r"1 param groups of sizes \[2\]"),
])
def test_a_corrupt_checkpoint_is_refused_and_changes_nothing(corrupt, match):
    ps, opt = trained(XSAM, hvp="finite_difference")
    sd = copy.deepcopy(opt.state_dict())
    corrupt(sd)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_same_state(opt.state_dict(), before)
    opt.param_groups[0]["lr"] = 0.5  # and the groups are still shared
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.5 and opt.base_optimizer.param_groups is opt.param_groups


@pytest.mark.parametrize("cls, fail_on_call",
                         [(SAM, 1), (SAM, 2)] + [(cls, n) for cls in (XSAM, EigenSAM) for n in (1, 2, 3, 4)])
def test_closure_raising_mid_step_leaves_weights_batchnorm_statistics_and_state_unchanged(cls, fail_on_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 1))
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    kwargs = {} if cls is SAM else dict(eig_interval=2, power_iters=1, hvp="finite_difference")
    opt = cls(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model, **kwargs)
    closure = closure_of(lambda: (model(x) - y).square().mean())
    opt.step(closure)
    opt.step(closure)  # momentum buffers and an eigenvector exist now; the next step refreshes
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    # X-SAM, Eigen-SAM: calls 1-2 are the refresh's finite-difference HVP, 3 the first pass, 4 the second
    # (perturbed) pass; SAM: 1 the first, 2 the second.
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(raising_on_call(fail_on_call, closure))
    assert_same_state((model.state_dict(), opt.state_dict()), before)
    opt.step(closure)  # and it carries on normally


def test_a_parameter_with_a_gradient_only_in_the_second_pass_is_normalised_and_corrected():
    q = Quadratic()
    extra = nn.Parameter(torch.tensor([0.3, -0.2], dtype=torch.float64))
    params = q.params + [extra]
    opt = XSAM(params, torch.optim.SGD, lr=0.1, alpha=0.5, correction="symmetric", eig_interval=1000,
               hvp="exact")
    opt.step(q.closure, loss_fn=q.loss)  # v is set (extra has zero curvature: its part of v is 0)
    v = flat(opt.eigenvector())
    w, e0 = flat(q.params), extra.detach().clone()
    calls = []

    def closure():  # the extra parameter enters the loss in the second pass only
        calls.append(1)
        loss = q.loss()
        if len(calls) % 2 == 0:  # not in the first pass's graph at all: no gradient there
            loss = loss + (extra * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    g = q.grad(w)
    ga = torch.cat([q.grad(w + 0.05 * g / (g.norm() + EPS)), torch.tensor([1.0, 2.0], dtype=torch.float64)])
    gh = ga / (ga.norm() + EPS)
    want = gh - 0.5 * (gh @ v) * v
    torch.testing.assert_close(flat([p.grad for p in params]), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(extra.detach(), e0 - 0.1 * want[-2:], rtol=1e-10, atol=1e-12)


def test_step_after_a_manual_first_step_says_what_to_do_and_keeps_the_perturbation():
    ps = four_params()
    opt = SAM(ps, torch.optim.SGD, lr=0.1)
    quadratic_closure(ps)()
    w0 = weights(ps)
    opt.first_step(zero_grad=True)
    perturbed = weights(ps)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.step(quadratic_closure(ps))
    assert same_bits(ps, perturbed) and not same_bits(ps, w0)
    quadratic_closure(ps)()
    opt.second_step()
    assert opt.diagnostics()["step"] == 1


def test_the_eigen_residual_is_right_to_fp32_precision():
    q = Quadratic(dtype=torch.float32)
    opt = XSAM(q.params, torch.optim.SGD, lr=1e-9, eig_interval=1, power_iters=60, hvp="exact")
    opt.step(q.closure, loss_fn=q.loss)
    v = flat(opt.eigenvector())
    lam = opt.diagnostics()["eigenvalue"]
    # The product of the last iteration is H v_prev; its residual against lam v_prev is what is reported.
    # After 60 iterations on a -7 vs 4 spectrum, H v is within fp32 rounding of lam v.
    true = (q.A @ v - lam * v).norm().item()
    assert opt.diagnostics()["eigen_residual"] == pytest.approx(true, abs=5e-6)
    assert opt.diagnostics()["eigen_residual"] > 0


def test_saved_weights_share_bucketed_allocations_without_overlap(monkeypatch):
    """Contiguous parameters of one device and dtype get their saved copies from shared allocations of
    at most SCRATCH_BUCKET_BYTES; other layouts and dtypes get their own, in their layout."""
    from xsam.optim import lists

    monkeypatch.setattr(lists, "SCRATCH_BUCKET_BYTES", 64 * 4)  # 64 float32
    params = [nn.Parameter(torch.randn(3, 4)), nn.Parameter(torch.randn(20)),
              nn.Parameter(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)),
              nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(5, dtype=torch.float64)),
              nn.Parameter(torch.randn(40)), nn.Parameter(torch.randn(0))]
    saved = lists.scratch_like(params)
    assert [(s.shape, s.stride(), s.dtype) for s in saved] == [(p.shape, p.stride(), p.dtype) for p in params]
    storage = [s.untyped_storage().data_ptr() for s in saved]
    assert storage[0] == storage[1] != storage[3]  # 12 + 20 elements fit in 64; 40 more do not
    assert storage[2] not in storage[:2] + storage[3:] and storage[4] not in storage[:4] + storage[5:]
    spans = sorted((s.data_ptr(), s.data_ptr() + s.numel() * s.element_size()) for s in saved if s.numel())
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))  # no two copies overlap
    assert all(s.data_ptr() % lists.SCRATCH_ALIGN_BYTES == 0 for s in saved)  # each starts as aligned as its own
    # And a step restores every parameter bit-exactly through them.
    opt = XSAM(params, torch.optim.SGD, lr=0.0, hvp="finite_difference")
    before = weights(params)
    closure = closure_of(lambda: sum((p.double() ** 2).sum() for p in params))
    opt.step(closure)
    assert same_bits(before, params)
    # The eigenvectors, created by that step's refresh, share allocations the same way, and later
    # refreshes write into them.
    def where_stored():
        return [opt.state[p]["eigenvector"].untyped_storage().data_ptr() for p in params]

    stored = where_stored()
    assert stored[0] == stored[1] != stored[3] and stored[2] not in stored[:2] + stored[3:]
    assert not set(stored) & set(storage)
    opt.refresh_eigenvector(closure)
    assert where_stored() == stored


# ----- failures the step cannot undo, and refusals at construction ---------------------------------------
def test_a_base_step_that_raises_refuses_further_steps_until_a_checkpoint_is_loaded():
    ps = four_params()
    opt = XSAM(ps, torch.optim.SGD, lr=0.1, momentum=0.9, hvp="finite_difference", eig_interval=1)
    opt.step(quadratic_closure(ps))
    checkpoint, before = copy.deepcopy(opt.state_dict()), weights(ps)
    momentum = [opt.base_optimizer.state[p]["momentum_buffer"].clone() for p in ps]

    def raising(optimizer, args, kwargs):  # after SGD has updated the weights and momenta
        raise KeyError("post-hook bug")

    handle = opt.base_optimizer.register_step_post_hook(raising)
    with pytest.raises(KeyError, match="post-hook bug"):
        opt.step(quadratic_closure(ps))
    handle.remove()
    assert same_bits(ps, before) and opt.diagnostics()["step"] == 1
    assert not same_bits([opt.base_optimizer.state[p]["momentum_buffer"] for p in ps], momentum)  # cannot be undone
    with pytest.raises(RuntimeError, match="raised inside its step.*load_state_dict"):
        opt.step(quadratic_closure(ps))  # a retry would add the momentum update twice
    assert same_bits(ps, before)
    opt.load_state_dict(copy.deepcopy(checkpoint))  # a load may alias the tensors it is given
    opt.step(quadratic_closure(ps))
    # The oracle: the same step from the checkpoint in a fresh optimizer.
    qs = [nn.Parameter(w.clone()) for w in before]
    fresh = XSAM(qs, torch.optim.SGD, lr=0.1, momentum=0.9, hvp="finite_difference", eig_interval=1)
    fresh.load_state_dict(checkpoint)
    fresh.step(quadratic_closure(qs))
    assert same_bits(ps, qs)


def test_the_groups_of_the_wrapper_and_of_a_prebuilt_base_optimizer_are_checked_at_construction():
    ps = four_params()
    with pytest.raises(ValueError, match="alpha"):
        XSAM([{"params": ps, "alpha": 3.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="alpha"):
        EigenSAM([{"params": ps, "alpha": -1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        XSAM(ps[:1], torch.optim.SGD, lr=0.1).add_param_group({"params": ps[1:], "rho": -1.0})
    with pytest.raises(ValueError, match=r"param_groups\[1\]: rho=-1"):
        SAM(ps, torch.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "rho": -1}], lr=0.1))
    # A group that spans groups of ours with other values is ambiguous: refused.
    with pytest.raises(ValueError, match=r"base_optimizer's param_groups\[0\] holds parameters of param_groups 0 "
                                         r"and 1.*rho"):
        XSAM([{"params": ps[:2], "rho": 0.1}, {"params": ps[2:], "rho": 0.5}], torch.optim.SGD(ps, lr=0.1))
    # Groups that cut across ours with the same values mean the same thing: accepted.
    XSAM([{"params": ps[:2]}, {"params": ps[2:]}], torch.optim.SGD([{"params": ps[:3]}, {"params": ps[3:]}],
                                                                   lr=0.1))


def test_eigenvector_returns_a_copy_in_param_group_order_that_a_refresh_does_not_overwrite():
    q = Quadratic()
    opt = XSAM([{"params": q.params[2:]}, {"params": q.params[:2]}], torch.optim.SGD, lr=0.1, eig_interval=1,
               hvp="exact")
    opt.step(q.closure, loss_fn=q.loss)
    kept = opt.eigenvector()
    assert [v.shape for v in kept] == [p.shape for p in q.params[2:] + q.params[:2]]
    copy_of_kept = [v.clone() for v in kept]
    opt.step(q.closure, loss_fn=q.loss)
    assert same_bits(kept, copy_of_kept) and not same_bits(opt.eigenvector(), kept)
    kept[0].fill_(7.0)
    assert not torch.equal(opt.eigenvector()[0], kept[0])  # writing the copy leaves v alone
