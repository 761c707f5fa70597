"""Mixed precision: the closure-aware scaler (skip on inf, rejected refreshes), autocast, low-precision weights.

Oracles: the same run without a scaler (power-of-two scales make scaling and
unscaling exact, so the runs must agree bit for bit), snapshots taken before the
step (a skipped step must change nothing), and an fp32 twin for bf16 weights.
"""
import functools

import pytest
import torch
from torch import nn

from xsam import SAM, XSAM
from xsam.amp import SAMGradScaler
from xsam.ops.dispatch import unavailable_reason

import helpers
from helpers import assert_each_close, assert_same_state, closure_of, scaled_or_plain_steps, snapshot

ALL_BACKENDS = [b for b in ("reference", "native", "triton")
                if unavailable_reason(b, torch.device("cpu"), torch.float32) is None]
# Triton runs in its (slow) interpreter here: one test covers it by default, the rest under -m slow.
BACKENDS = [b if b != "triton" else pytest.param(b, marks=pytest.mark.slow) for b in ALL_BACKENDS]


make_model = functools.partial(helpers.make_model, 6, 8, 3, dtype=torch.float32)


def data(seed=1, n=16):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def make_xsam(model, backend="reference", **kw):
    kw = {"lr": 0.1, "momentum": 0.9, "eig_interval": 2, "power_iters": 2, "hvp": "exact", **kw}
    return XSAM(model.parameters(), torch.optim.SGD, backend=backend, **kw)


class Injector:
    """Closures that poison the gradient of chosen calls with inf or nan."""

    def __init__(self, model, scaler, x, y):
        self.model, self.scaler, self.x, self.y = model, scaler, x, y
        self.closure_calls, self.poison_closure_call, self.poison_loss_fn = 0, None, False

    def loss(self):
        return nn.functional.cross_entropy(self.model(self.x), self.y)

    def closure(self):
        self.closure_calls += 1
        loss = self.loss()
        self.scaler.scale(loss).backward()
        if self.closure_calls == self.poison_closure_call:
            next(self.model.parameters()).grad.view(-1)[0] = float("inf")
        return loss

    def loss_fn(self):
        loss = self.loss()
        # inf * loss makes every second derivative inf/nan, as an fp16 overflow would.
        return loss * float("inf") if self.poison_loss_fn else loss


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poisoned_pass", [1, 2])
def test_non_finite_pass_skips_the_whole_step(backend, poisoned_pass):
    model = make_model()
    x, y = data()
    opt = make_xsam(model, backend)
    scaler = SAMGradScaler("cpu", init_scale=2.0 ** 10)
    inj = Injector(model, scaler, x, y)
    # Momentum buffers and an eigenvector exist; step 3 does not refresh, step 4 does.
    scaled_or_plain_steps(opt, scaler, inj.closure, 3, use_scaler=True, loss_fn=inj.loss_fn)
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append(r))
    for step in (3, 4):  # without and with a refresh in the skipped step
        if step == 4:  # step 3 completes normally
            scaled_or_plain_steps(opt, scaler, inj.closure, 1, use_scaler=True, loss_fn=inj.loss_fn)
        before, scale_before = snapshot(model, opt), scaler.get_scale()
        inj.closure_calls, inj.poison_closure_call = 0, poisoned_pass
        scaler.step(opt, inj.closure, loss_fn=inj.loss_fn)
        scaler.update()
        inj.poison_closure_call = None
        after = snapshot(model, opt)
        assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "weights not restored exactly"
        skipped_before, skipped_after = (s["state"][0]["xsam"].pop("skipped_steps") for _, s in (before, after))
        assert skipped_after == skipped_before + 1
        assert_same_state(before[1], after[1])  # eigenvector, base optimizer and counters
        assert scaler.get_scale() == scale_before * 0.5
        assert inj.closure_calls == poisoned_pass  # a poisoned first pass stops before the second
    assert len(records) == 1  # only the completed step reported
    refreshed_before = opt.diagnostics()["refreshes"]
    scaler.step(opt, inj.closure, loss_fn=inj.loss_fn)  # the skipped refresh step is redone, and succeeds
    assert opt.diagnostics()["refreshes"] == refreshed_before + 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hvp", ["exact", "forward_difference"])
def test_non_finite_hvp_keeps_the_old_eigenvector_and_reports_it(backend, hvp):
    model = make_model()
    x, y = data()
    opt = make_xsam(model, backend, hvp=hvp)
    scaler = SAMGradScaler("cpu", init_scale=2.0 ** 10)
    inj = Injector(model, scaler, x, y)
    scaled_or_plain_steps(opt, scaler, inj.closure, 2, use_scaler=True, loss_fn=inj.loss_fn)
    assert opt.refresh_due
    records = []
    opt.register_diagnostics_hook(lambda o, r: records.append(r))
    v_before = [t.clone() for t in opt.eigenvector()]
    diag_before = opt.diagnostics()
    weights_before = [p.detach().clone() for p in model.parameters()]
    inj.closure_calls = 0
    if hvp == "exact":
        inj.poison_loss_fn = True
    else:  # call 1 is the first pass, call 2 the first product
        inj.poison_closure_call = 2
    scaler.step(opt, inj.closure, loss_fn=inj.loss_fn)
    scaler.update()
    assert inj.closure_calls == (4 if hvp == "forward_difference" else 2)  # both products, both passes
    inj.poison_loss_fn, inj.poison_closure_call = False, None
    assert all(torch.equal(a, b) for a, b in zip(v_before, opt.eigenvector()))
    d = opt.diagnostics()
    assert d["eigenvalue"] == diag_before["eigenvalue"] and d["refreshes"] == diag_before["refreshes"]
    assert d["rejected_refreshes"] == 1 and d["step"] == diag_before["step"] + 1  # the step itself was taken
    assert not all(torch.equal(a, b) for a, b in zip(weights_before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # A refresh ran (refreshed) and was rejected on the device (a bool tensor: no host sync needed).
    assert bool(records[-1]["refresh_rejected"]) and records[-1]["refreshed"] is True
    assert scaler.get_scale() == 2.0 ** 9
    assert opt.refresh_due  # retried at the next step
    scaler.step(opt, inj.closure, loss_fn=inj.loss_fn)
    assert not bool(records[-1]["refresh_rejected"]) and records[-1]["refreshed"] is True
    assert opt.diagnostics()["refreshes"] == diag_before["refreshes"] + 1


@pytest.mark.parametrize("hvp, max_grad_norm", [("exact", None), ("finite_difference", None),
                                                ("forward_difference", None), ("streaming", None),
                                                ("finite_difference", 0.05)])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_scaled_run_equals_unscaled_run_bit_for_bit(backend, hvp, max_grad_norm):
    """Power-of-two scales: scaling the loss and unscaling every pass and HVP is exact (the step h is relative).
    max_grad_norm is in the units of the unscaled loss: the scaled run clips exactly like the unscaled one
    (the closure, which sees scaled gradients, is no place to clip)."""
    x, y = data()
    runs = []
    for use_scaler in (False, True):
        model = make_model(dtype=torch.float64)
        # normalize=False: a missed unscale would not cancel out in the update.
        opt = make_xsam(model, backend, hvp=hvp, normalize=False, max_grad_norm=max_grad_norm)
        scaler = SAMGradScaler("cpu", init_scale=2.0 ** 12, growth_interval=1000)
        clip_coefs = []
        if max_grad_norm is not None:
            opt.register_diagnostics_hook(lambda o, r: clip_coefs.append(r["clip_coef"].item()))
        inj = Injector(model, scaler if use_scaler else SAMGradScaler("cpu", enabled=False), x.double(), y)
        scaled_or_plain_steps(opt, scaler, inj.closure, 3, use_scaler, loss_fn=inj.loss_fn if hvp == "exact" else None)
        runs.append(([p.detach().clone() for p in model.parameters()], opt.eigenvector(), opt.diagnostics(),
                     clip_coefs))
    (w0, v0, d0, clip0), (w1, v1, d1, clip1) = runs
    if hvp != "streaming":  # streaming estimates no eigenvalue
        assert abs(d0["eigenvalue"] - d1["eigenvalue"]) <= 1e-9 * abs(d0["eigenvalue"])
    assert abs(d0["grad_norm"] - d1["grad_norm"]) <= 1e-9 * abs(d0["grad_norm"])
    if hvp == "exact":
        assert all(torch.equal(a, b) for a, b in zip(w0, w1))
        assert all(torch.equal(a, b) for a, b in zip(v0, v1))
    else:  # the differences round
        assert_each_close(w0 + v0, w1 + v1, rtol=1e-9, atol=1e-9)
    if max_grad_norm is not None:
        assert max(clip0) < 0.5  # the clip acted on every step
        assert clip0 == pytest.approx(clip1, rel=1e-9)


def test_sam_with_the_scaler_skips_and_equals_unscaled_sam():
    x, y = data()
    results = []
    for use_scaler in (False, True):
        model = make_model()
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        scaler = SAMGradScaler("cpu", init_scale=2.0 ** 8)
        inj = Injector(model, scaler if use_scaler else SAMGradScaler("cpu", enabled=False), x, y)
        scaled_or_plain_steps(opt, scaler, inj.closure, 2, use_scaler)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    before = [p.detach().clone() for p in model.parameters()]
    inj.closure_calls, inj.poison_closure_call = 0, 2
    scaler.step(opt, inj.closure)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() == 2.0 ** 7


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_training_on_cpu_lowers_the_loss(dtype):
    x, y = data(n=64)
    model = make_model()
    opt = make_xsam(model, "auto", hvp="finite_difference", lr=0.2)
    scaler = SAMGradScaler("cpu", enabled=dtype == torch.float16)  # bf16 needs no scaling

    def loss_fn():
        with torch.autocast("cpu", dtype=dtype):
            return nn.functional.cross_entropy(model(x), y)

    def closure():
        loss = loss_fn()
        scaler.scale(loss).backward()
        return loss

    with torch.no_grad():
        start = nn.functional.cross_entropy(model(x), y).item()
    scaled_or_plain_steps(opt, scaler, closure, 15, use_scaler=True)
    with torch.no_grad():
        end = nn.functional.cross_entropy(model(x), y).item()
    assert end < 0.8 * start
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.diagnostics()["refreshes"] >= 7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_parameters_track_an_fp32_twin(backend, dtype):
    x, y = data()
    low = make_model(dtype=dtype)
    high = make_model().to(dtype).float()  # the same (rounded) starting weights in fp32
    outs = []
    for model, mdtype in ((low, dtype), (high, torch.float32)):
        opt = make_xsam(model, backend, hvp="exact", lr=0.05, momentum=0.0)
        loss_fn = lambda: nn.functional.cross_entropy(model(x.to(mdtype)).float(), y)  # noqa: E731
        for _ in range(2):
            opt.step(closure_of(loss_fn), loss_fn=loss_fn)
        outs.append((model, opt))
    (low, opt_low), (high, opt_high) = outs
    assert all(p.dtype == dtype and opt_low.state[p]["eigenvector"].dtype == dtype for p in low.parameters())
    tol = {torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for a, b in zip(low.parameters(), high.parameters()):
        torch.testing.assert_close(a.float(), b, rtol=tol, atol=tol)
    # The moved distance agrees too, not only the (nearly unchanged) weights.
    start = make_model().to(dtype).float()
    for a, b, s in zip(low.parameters(), high.parameters(), start.parameters()):
        torch.testing.assert_close(a.float() - s, b - s, rtol=0.2, atol=4 * tol)
    assert abs(opt_low.diagnostics()["eigenvalue"] - opt_high.diagnostics()["eigenvalue"]) < 0.1 * abs(
        opt_high.diagnostics()["eigenvalue"])


def test_scaler_rejects_misuse_with_clear_errors():
    model = make_model()
    opt = make_xsam(model)
    scaler = SAMGradScaler("cpu")
    with pytest.raises(ValueError, match="needs a closure"):
        scaler.step(opt)
    with pytest.raises(TypeError, match="not a SAM-type optimizer"):
        scaler.step(torch.optim.SGD(model.parameters(), lr=0.1), lambda: None)
    with pytest.raises(RuntimeError, match="unscales every pass itself"):
        scaler.unscale_(opt)
