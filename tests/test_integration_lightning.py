"""PyTorch Lightning: what works as it is, and XSAMCallback against a hand-written ``opt.step(closure, loss_fn)``
loop on the same micro-batches in the same order (float64 to rounding, mixed precision to its autocast dtype)."""
import os
import warnings
from datetime import timedelta

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import assert_each_close, free_port, same_bits, spawn_and_wait

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from xsam import SAM, XSAM  # noqa: E402
from xsam.amp import SAMGradScaler  # noqa: E402
from xsam.integrations.lightning import XSAMCallback  # noqa: E402

HYPER = dict(lr=0.1, momentum=0.9)
XSAM_HYPER = dict(rho=0.05, alpha=0.5, eig_interval=2, power_iters=3)
SAM_HYPER = dict(rho=0.05)
PRECISION_DTYPE = {"64-true": torch.float64, "32-true": torch.float32, "bf16-mixed": torch.float32,
                   "16-mixed": torch.float32}
AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")


def make_net(batchnorm=True):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6) if batchnorm else nn.Identity(), nn.Tanh(),
                         nn.Linear(6, 3))


def make_optimizer(kind, params, model, **extra):
    # hvp_eval_mode=False: eval-mode HVPs would read BatchNorm running statistics, which the trainer's first
    # pass has already updated when the step refreshes, and a hand-written opt.step has not (see README).
    if kind == "xsam":
        return XSAM(params, torch.optim.SGD, model=model, hvp_eval_mode=False, **XSAM_HYPER, **HYPER, **extra)
    return SAM(params, torch.optim.SGD, model=model, **SAM_HYPER, **HYPER, **extra)


def make_batches(count, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(count)]


class TinyModule(pl.LightningModule):
    def __init__(self, kind="xsam", batchnorm=True, **optimizer_kwargs):
        super().__init__()
        self.kind = kind
        self.optimizer_kwargs = optimizer_kwargs
        self.net = make_net(batchnorm)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        # The strategy's model: the DDP module under DDP (its process group averages exact HVPs).
        return make_optimizer(self.kind, self.parameters(), self.trainer.strategy.model, **self.optimizer_kwargs)


def fit(module, batches, *, precision="64-true", epochs=1, callback=True, ckpt_path=None, **trainer_kwargs):
    trainer_kwargs = {"accelerator": "cpu", "devices": 1} | trainer_kwargs
    if precision == "16-mixed":
        # Lightning turns precision="16-mixed" into bf16 on CPU; its fp16 plugin (what a GPU gets) can still be
        # passed explicitly, and runs fp16 autocast on the CPU.
        trainer_kwargs["plugins"], precision = [MixedPrecision("16-mixed", "cpu")], None
    trainer = pl.Trainer(max_epochs=epochs, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[XSAMCallback()] if callback else [], **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(batches, batch_size=None), ckpt_path=ckpt_path)
    return trainer


def hand_loop(kind, batches, *, k=1, precision="64-true", epochs=1, clip=None, batchnorm=True, micro_batches=None,
              exact_hvps=True, **optimizer_kwargs):
    """The same steps written by hand: each step's closure runs all k micro-batches (loss / k each).

    ``clip``: Trainer(gradient_clip_val=clip) by hand: SAM clips the second pass's gradient (the closure clips
    both; the first pass's scale does not matter), X-SAM passes it to the optimizer as max_grad_norm.
    ``exact_hvps=False``: X-SAM gets no loss_fn (finite-difference HVPs), as from Lightning's own closure.
    """
    dtype = PRECISION_DTYPE[precision]
    net = make_net(batchnorm).to(dtype)
    if kind == "xsam" and clip:
        optimizer_kwargs, clip = dict(optimizer_kwargs, max_grad_norm=clip), None
    opt = make_optimizer(kind, net.parameters(), net, **optimizer_kwargs)
    scaler = SAMGradScaler("cpu") if precision == "16-mixed" else None
    # cache_enabled=False as in Lightning: a cached cast weight shared by the micro-batches of loss_fn would
    # sum their gradients in the low precision.
    autocast = torch.autocast("cpu", dtype=AUTOCAST.get(precision, torch.bfloat16), enabled=precision in AUTOCAST,
                              cache_enabled=False)
    losses = []
    windows = [batches[i:i + k] for i in range(0, len(batches), k)] * epochs
    for window in windows:
        micro = [(x.to(dtype), y) for x, y in (window if micro_batches is None else micro_batches(window))]

        def closure():
            total = 0.0
            for x, y in micro:
                with autocast:
                    loss = F.cross_entropy(net(x), y) / k
                (scaler.scale(loss) if scaler else loss).backward()
                total += loss.detach()
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), clip * (scaler.get_scale() if scaler else 1.0))
            return total

        def loss_fn():
            with autocast:
                return sum(F.cross_entropy(net(x), y) for x, y in micro) / k

        exact = kind == "xsam" and exact_hvps
        if scaler:
            losses.append(scaler.step(opt, closure, loss_fn=loss_fn if exact else None))
            scaler.update()
        else:
            losses.append(opt.step(closure, loss_fn=loss_fn) if exact else opt.step(closure))
    return net, opt, losses


def assert_same_weights(module, net, tol):
    for a, b in zip([*module.net.parameters(), *module.net.buffers()], [*net.parameters(), *net.buffers()]):
        torch.testing.assert_close(a.detach(), b.detach().to(a.dtype), rtol=tol, atol=tol)


# ----- what Lightning does without the callback ----------------------------------------------
@pytest.mark.parametrize("kind, precision, k, degraded", [
    ("xsam", "64-true", 1, dict(exact_hvps=False)),  # no forward-only loss: finite-difference HVPs
    ("xsam", "bf16-mixed", 1, dict(exact_hvps=False)),
    # SAM zeroes the gradients before its first pass, so Lightning's micro-batches 1..k-1 are lost (they would
    # still move BatchNorm statistics: no BatchNorm here).
    ("sam", "64-true", 2, dict(micro_batches=lambda window: window[-1:])),
], ids=["finite-difference-hvps-64-true", "finite-difference-hvps-bf16-mixed", "last-micro-batch-only"])
def test_without_the_callback_steps_are_the_degraded_hand_written_loop(kind, precision, k, degraded):
    batches = make_batches(4)
    module = TinyModule(kind, batchnorm=False)
    fit(module, batches, precision=precision, callback=False, accumulate_grad_batches=k)
    net, _, _ = hand_loop(kind, batches, k=k, precision=precision, batchnorm=False, **degraded)
    assert_same_weights(module, net, 1e-12 if precision == "64-true" else 1e-5)


def test_without_the_callback_16_mixed_fails_because_gradscaler_steps_without_a_closure():
    with pytest.raises(ValueError, match="needs a closure"):
        fit(TinyModule("sam"), make_batches(2), precision="16-mixed", callback=False)


# ----- with the callback ---------------------------------------------------------------------
@pytest.mark.parametrize("kind, k, clip, options", [
    ("xsam", 1, None, {}), ("xsam", 3, None, {}), ("sam", 1, None, {}), ("sam", 3, None, {}),
    # Clipping: SAM clips the second pass's gradient. X-SAM normalises it before correcting it (clipping it would
    # be a no-op), so the clipping is X-SAM's own max_grad_norm, after the correction.
    ("xsam", 1, 0.05, {}), ("sam", 1, 0.05, {}),
    ("xsam", 2, 0.05, {"hvp": "streaming"}),  # streaming sees the unclipped gradients of both passes
])
def test_fp64_steps_match_the_hand_written_loop(kind, k, clip, options):
    batches = make_batches(6)
    module = TinyModule(kind, **options)
    trainer = fit(module, batches, accumulate_grad_batches=k, epochs=2, gradient_clip_val=clip)
    net, opt, losses = hand_loop(kind, batches, k=k, epochs=2, clip=clip, **options)
    assert_same_weights(module, net, 1e-12)
    assert trainer.optimizers[0].diagnostics()["step"] == opt.diagnostics()["step"] == 12 // k
    if kind == "xsam":
        assert_each_close(trainer.optimizers[0].eigenvector(), opt.eigenvector(), rtol=1e-12, atol=1e-12)
    if clip:
        unclipped, _, _ = hand_loop(kind, batches, k=k, epochs=2, **options)
        assert (net[0].weight - unclipped[0].weight).abs().max() > 1e-3  # the clipping was active
        assert trainer.optimizers[0].max_grad_norm is None  # routed for each step, not kept


def test_logged_loss_is_the_first_pass_loss_and_diagnostics_are_logged():
    batches = make_batches(4)
    module = TinyModule("xsam", batchnorm=False)
    trainer = fit(module, batches)
    _, opt, losses = hand_loop("xsam", batches, batchnorm=False)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train_loss"].double(), losses[-1].double(), rtol=1e-12, atol=1e-12)
    assert metrics["xsam/eigenvalue"].item() == pytest.approx(opt.diagnostics()["eigenvalue"], rel=1e-5)
    cos = opt.diagnostics()["cos_gadv_v"]
    assert metrics["xsam/cos_gadv_v"].item() == pytest.approx(cos, rel=1e-5)
    assert metrics["xsam/angle_gadv_v"].item() == pytest.approx(torch.tensor(cos).acos().rad2deg().item(), rel=1e-4)


class ManualModule(TinyModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize("make_module, trainer_kwargs, match", [
    (lambda: TinyModule("xsam"), dict(gradient_clip_val=0.05, gradient_clip_algorithm="value"),
     "gradient_clip_algorithm='value' is not supported with XSAM.*Use gradient_clip_algorithm='norm'"),
    (lambda: TinyModule("xsam", max_grad_norm=1.0), dict(gradient_clip_val=0.05),
     r"both Trainer\(gradient_clip_val=0.05\) and XSAM\(max_grad_norm=1.0\).*set one of them"),
    (lambda: TinyModule("xsam", hvp="finite_difference"), {}, "needs exact Hessian-vector products"),
    (ManualModule, {}, "automatic optimisation"),
], ids=["value-clipping", "clipping-set-twice", "finite-difference-hvps", "manual-optimisation"])
def test_what_the_callback_cannot_run_is_refused_before_any_weight_moves(make_module, trainer_kwargs, match):
    module = make_module()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=match):
        fit(module, make_batches(2), **trainer_kwargs)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), before))


@pytest.mark.parametrize("kind", ["xsam", "sam"])
@pytest.mark.parametrize("precision, clip", [("bf16-mixed", None), ("16-mixed", 0.05)])
def test_mixed_precision_matches_the_hand_written_autocast_loop(kind, precision, clip):
    """16-mixed runs through SAMGradScaler, with clipping on the unscaled gradients."""
    batches = make_batches(6)
    module = TinyModule(kind)
    trainer = fit(module, batches, precision=precision, accumulate_grad_batches=2, gradient_clip_val=clip)
    if precision == "16-mixed":
        assert isinstance(trainer.precision_plugin.scaler, SAMGradScaler)
    net, _, _ = hand_loop(kind, batches, k=2, precision=precision, clip=clip)
    assert_same_weights(module, net, 1e-5)


def test_checkpoint_resume_through_the_trainer_continues_bit_identically(tmp_path):
    batches = make_batches(3)
    straight = TinyModule("xsam")
    fit(straight, batches, epochs=4)
    first = TinyModule("xsam")
    trainer = fit(first, batches, epochs=2)
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    # Built in float64: Lightning loads the checkpoint's weights before 64-true converts the module, so a
    # float32 module would round them (a Lightning behaviour, unrelated to the optimizer).
    resumed = TinyModule("xsam").double()
    trainer = fit(resumed, batches, epochs=4, ckpt_path=str(tmp_path / "half.ckpt"))
    assert same_bits([*resumed.parameters(), *resumed.buffers()], [*straight.parameters(), *straight.buffers()])
    assert trainer.optimizers[0].diagnostics()["step"] == 12


# ----- DDP: 2 processes, gloo ----------------------------------------------------------------
WORLD, DDP_K, DDP_STEPS = 2, 2, 3


def ddp_batches():
    """Each global micro-batch has 8 samples; rank r trains on rows 4r..4r+3."""
    return make_batches(DDP_K * DDP_STEPS, size=4 * WORLD, seed=5)


def ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    shard = [(x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]) for x, y in ddp_batches()]
    module = TinyModule("xsam", batchnorm=False)
    trainer = fit(module, shard, accumulate_grad_batches=DDP_K, devices=WORLD, use_distributed_sampler=False,
                  strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)))
    opt = trainer.optimizers[0]
    torch.save({"weights": [p.detach() for p in module.net.parameters()], "eigenvector": opt.eigenvector(),
                "steps": opt.diagnostics()["step"]}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_ddp_two_processes_match_single_process_accumulation_on_the_full_batch(tmp_path):
    spawn_and_wait(ddp_worker, (free_port(), str(tmp_path)), WORLD, timeout=120)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == DDP_STEPS
    assert same_bits(ranks[0]["weights"] + ranks[0]["eigenvector"], ranks[1]["weights"] + ranks[1]["eigenvector"])
    net, opt, _ = hand_loop("xsam", ddp_batches(), k=DDP_K, batchnorm=False)
    assert_each_close(ranks[0]["weights"], [p.detach() for p in net.parameters()], rtol=1e-10, atol=1e-10)
    assert_each_close(ranks[0]["eigenvector"], opt.eigenvector(), rtol=1e-10, atol=1e-10)
