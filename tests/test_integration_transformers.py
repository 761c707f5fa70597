"""Hugging Face Trainer: XSAMTrainer against hand-written xsam loops on a tiny GPT-2 (built from a config, no
dropout; eager attention: PyTorch's fused CPU attention has no double backward, which exact HVPs need).

The hand loop runs the Trainer's micro-batches in order, each one's summed token loss divided by the number of
label tokens in the whole accumulated batch (``num_items_in_batch``), as the Trainer scales it.
"""
import os
import warnings

import pytest
import torch

from helpers import assert_each_close, free_port, same_bits, spawn_and_wait

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

from xsam import SAM, XSAM  # noqa: E402
from xsam.integrations.transformers import XSAMTrainer  # noqa: E402

XSAM_KWARGS = dict(rho=0.05, alpha=0.5, eig_interval=2, power_iters=3)
SAM_KWARGS = dict(rho=0.05)
BATCH = 2

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def quiet_transformers():
    transformers.utils.logging.set_verbosity_error()
    yield
    transformers.utils.logging.set_verbosity_warning()


def make_model(dtype=torch.float64):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, n_inner=8, vocab_size=16, n_positions=8, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype)


def make_data(count=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(0, 16, (8,), generator=gen) for _ in range(count)]
    return [{"input_ids": ids, "labels": ids.clone()} for ids in sequences]


def train(output_dir, *, kind="xsam", k=1, steps=3, dtype=torch.float64, resume=None, sam_kwargs=None, **arguments):
    settings = dict(output_dir=str(output_dir), use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
                    per_device_train_batch_size=BATCH, gradient_accumulation_steps=k, max_steps=steps,
                    learning_rate=0.1, optim="sgd", lr_scheduler_type="constant", weight_decay=0.01, max_grad_norm=0.0,
                    train_sampling_strategy="sequential", disable_tqdm=True, seed=0) | arguments
    trainer = XSAMTrainer(model=make_model(dtype), args=TrainingArguments(**settings), train_dataset=make_data(),
                          sam_class=XSAM if kind == "xsam" else SAM,
                          sam_kwargs=dict(XSAM_KWARGS if kind == "xsam" else SAM_KWARGS, **(sam_kwargs or {})))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train(resume_from_checkpoint=resume)
    return trainer


def hand_loop(trainer, *, kind="xsam", k=1, steps=3, dtype=torch.float64, autocast_dtype=None, batch=BATCH,
              **sam_kwargs):
    """The same steps with opt.step(closure, loss_fn); param groups (``trainer``'s rule) and order as the Trainer's,
    ``sam_kwargs`` added to the optimizer's (``max_grad_norm``: what TrainingArguments(max_grad_norm=...) sets)."""
    model = make_model(dtype)
    model.train()
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": 0.01},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    cls, kwargs = (XSAM, XSAM_KWARGS) if kind == "xsam" else (SAM, SAM_KWARGS)
    opt = cls(groups, torch.optim.SGD, model=model, lr=0.1, **kwargs, **sam_kwargs)
    autocast = torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None)
    data, losses = make_data(), []
    for step in range(steps):
        rows = [data[(step * k + i) * batch:(step * k + i + 1) * batch] for i in range(k)]
        micro = [{key: torch.stack([row[key] for row in mb]) for key in mb[0]} for mb in rows]
        tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro)

        def loss_of(mb):
            with autocast:
                return model(**mb, num_items_in_batch=tokens).loss.float().to(dtype)

        def closure():
            total = 0.0
            for mb in micro:
                loss = loss_of(mb)
                loss.backward()
                total += loss.detach()
            return total

        def loss_fn():
            return sum(loss_of(mb) for mb in micro)

        losses.append(opt.step(closure, loss_fn=loss_fn) if kind == "xsam" else opt.step(closure))
    return model, opt, losses


@pytest.mark.parametrize("kind, k, clip, options", [
    ("xsam", 1, 0.0, {}), ("xsam", 2, 0.0, {}), ("sam", 1, 0.0, {}), ("sam", 2, 0.0, {}),
    # max_grad_norm is the optimizer's clipping of the direction it applies: X-SAM normalises the second pass's
    # gradient before correcting it, so clipping that gradient would be a no-op.
    ("xsam", 2, 0.05, {}), ("sam", 2, 0.05, {}),
    ("xsam", 2, 0.05, {"hvp": "streaming"}),  # streaming sees the unclipped gradients of both passes
])
def test_steps_match_the_hand_written_loop(tmp_path, kind, k, clip, options):
    trainer = train(tmp_path, kind=kind, k=k, max_grad_norm=clip, sam_kwargs=options)
    model, opt, _ = hand_loop(trainer, kind=kind, k=k, max_grad_norm=clip or None, **options)
    assert_each_close(trainer.model.parameters(), model.parameters(), rtol=1e-12, atol=1e-12)
    assert trainer.sam_optimizer.diagnostics()["step"] == opt.diagnostics()["step"] == 3
    if kind == "xsam":
        assert_each_close(trainer.sam_optimizer.eigenvector(), opt.eigenvector(), rtol=1e-12, atol=1e-12)
    if clip:
        unclipped, _, _ = hand_loop(trainer, kind=kind, k=k, **options)
        assert max((a - b).abs().max() for a, b in zip(model.parameters(), unclipped.parameters())) > 1e-3
        # The Trainer still logs the first pass's gradient norm (unclipped), as with any optimizer.
        logged = [entry for entry in trainer.state.log_history if "grad_norm" in entry]
        assert logged[-1]["grad_norm"] == pytest.approx(opt.diagnostics()["grad_norm"], rel=1e-9)


def test_logs_keep_the_first_pass_loss_and_add_the_diagnostics(tmp_path):
    trainer = train(tmp_path, k=2)
    _, opt, losses = hand_loop(trainer, k=2)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry, loss in zip(logged, losses):
        assert entry["loss"] == pytest.approx(loss.item(), rel=1e-6)  # the Trainer's own loss logging
    last, diagnostics = logged[-1], opt.diagnostics()
    assert last["xsam/eigenvalue"] == pytest.approx(diagnostics["eigenvalue"], rel=1e-5)
    assert last["xsam/cos_gadv_v"] == pytest.approx(diagnostics["cos_gadv_v"], rel=1e-5)
    angle = torch.tensor(diagnostics["cos_gadv_v"]).acos().rad2deg().item()
    assert last["xsam/angle_gadv_v"] == pytest.approx(angle, rel=1e-4)
    assert {"xsam/grad_norm", "xsam/adv_grad_norm", "xsam/cos_g_v"} <= set(last)


@pytest.mark.parametrize("kind", ["xsam", "sam"])
def test_bf16_matches_the_hand_written_autocast_loop(tmp_path, kind):
    trainer = train(tmp_path, kind=kind, k=2, dtype=torch.float32, bf16=True)
    model, _, _ = hand_loop(trainer, kind=kind, k=2, dtype=torch.float32, autocast_dtype=torch.bfloat16)
    assert_each_close(trainer.model.parameters(), model.parameters(), rtol=1e-5, atol=1e-5)


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    straight = train(tmp_path / "a", steps=4, save_strategy="steps", save_steps=2)
    resumed = train(tmp_path / "b", steps=4, resume=str(tmp_path / "a" / "checkpoint-2"))
    assert same_bits(resumed.model.parameters(), straight.model.parameters())
    assert same_bits(resumed.sam_optimizer.eigenvector(), straight.sam_optimizer.eigenvector())
    assert resumed.sam_optimizer.diagnostics()["step"] == 4


def test_refusals_name_the_argument_and_the_fix(tmp_path):
    def trainer(model=None, fp16=False, **kwargs):
        args = TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], fp16=fp16)
        return XSAMTrainer(model=make_model() if model is None else model, args=args, train_dataset=make_data(),
                           **kwargs)

    with pytest.raises(ValueError, match="sets \\['model'\\]"):
        trainer(sam_kwargs={"model": None})
    with pytest.raises(ValueError, match=r"sets \['max_grad_norm'\].*from TrainingArguments\(max_grad_norm=...\)"):
        trainer(sam_kwargs={"max_grad_norm": 1.0})
    with pytest.raises(ValueError, match="needs exact Hessian-vector products"):
        trainer(sam_kwargs={"hvp": "finite_difference"}).create_optimizer()
    with pytest.raises(ValueError, match="does not support fp16=True"):
        trainer(fp16=True)
    model = make_model()
    with pytest.raises(ValueError, match="optimizers=\\(None, scheduler\\)"):
        trainer(model, optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None))


# ----- DDP: 2 processes, gloo (launched like torchrun: one process per rank, env:// rendezvous) --------
WORLD = 2


def ddp_worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    transformers.utils.logging.set_verbosity_error()
    trainer = train(out_dir, k=2, steps=2, ddp_backend="gloo", ddp_timeout=60)
    opt = trainer.sam_optimizer
    torch.save({"weights": [p.detach() for p in trainer.model.parameters()], "eigenvector": opt.eigenvector(),
                "steps": opt.diagnostics()["step"]}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow
def test_ddp_two_processes_match_the_single_process_loop_on_the_full_batch(tmp_path):
    """accelerate deals consecutive batches to the ranks, so global micro-batch i is batches 2i and 2i + 1."""
    spawn_and_wait(ddp_worker, (free_port(), str(tmp_path)), WORLD, timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[0]["steps"] == ranks[1]["steps"] == 2
    assert same_bits(ranks[0]["weights"] + ranks[0]["eigenvector"], ranks[1]["weights"] + ranks[1]["eigenvector"])
    grouping = XSAMTrainer(model=make_model(), args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]))
    model, opt, _ = hand_loop(grouping, k=2, steps=2, batch=BATCH * WORLD)
    assert_each_close(ranks[0]["weights"], [p.detach() for p in model.parameters()], rtol=1e-10, atol=1e-10)
    assert_each_close(ranks[0]["eigenvector"], opt.eigenvector(), rtol=1e-10, atol=1e-10)
