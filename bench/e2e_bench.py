"""End to end: seconds per training step of SGD, SAM and XSAM on a real model, and the memory they hold.

A "step" includes forward and backward passes. XSAM refreshes its eigenvector
every ``k`` steps with ``p`` power iterations, so steps are timed in whole cycles
of ``k`` steps and reported per step (the refresh cost is amortised, as in training).
All configurations run interleaved, one cycle each per round, and their ratios to SAM
are taken round by round; a ratio whose spread (IQR over median) exceeds 20%, or a time
whose spread exceeds 50%, is flagged ``unstable`` (``bench.timing.unstable``): rerun on a
quieter machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from xsam import SAM, XSAM

from .models import ResNet18, SmallCNN
from .ops_bench import available_backends
from .timing import paired_ratio, time_interleaved, unstable


@dataclass(frozen=True)
class OptimizerConfig:
    name: str
    kind: str  # "sgd" | "sam" | "xsam"
    hvp: str = "exact"
    eig_interval: int = 5
    power_iters: int = 5
    hvp_eval_mode: bool = True


# eig_interval of SGD and SAM is only the number of steps per timed cycle.
DEFAULT_CONFIGS = (
    OptimizerConfig("sgd", "sgd"),
    OptimizerConfig("sam", "sam"),
    OptimizerConfig("xsam_exact_k5_p5", "xsam", "exact", 5, 5),
    OptimizerConfig("xsam_fd_k5_p5", "xsam", "finite_difference", 5, 5),
    # The fast settings of docs/tracking: one power iteration per refresh (the recommended setting,
    # exact products), one forward-difference product reusing the first pass (eval-mode HVPs, as
    # the authors', and train-mode ones, which need no extra evaluation), and the streaming
    # estimator (no extra evaluation).
    OptimizerConfig("xsam_exact_k5_p1", "xsam", "exact", 5, 1),
    OptimizerConfig("xsam_fwd_k5_p1", "xsam", "forward_difference", 5, 1),
    OptimizerConfig("xsam_fwd_k5_p1_train", "xsam", "forward_difference", 5, 1, hvp_eval_mode=False),
    OptimizerConfig("xsam_stream", "xsam", "streaming"),
)
# A rarer refresh shows how the overhead amortises; 20-step cycles are too long for CPU defaults.
GPU_CONFIGS = DEFAULT_CONFIGS + (OptimizerConfig("xsam_exact_k20_p5", "xsam", "exact", 20, 5),)
QUICK_CONFIGS = (
    OptimizerConfig("sgd", "sgd", eig_interval=2),
    OptimizerConfig("sam", "sam", eig_interval=2),
    OptimizerConfig("xsam_exact_k2_p2", "xsam", "exact", 2, 2),
    OptimizerConfig("xsam_fd_k2_p2", "xsam", "finite_difference", 2, 2),
)


@dataclass
class Workload:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor


E2E_MODELS = ("small_cnn", "cnn_32_64_128", "resnet18_cifar")


def make_workload(name: str, device: torch.device, batch: int, seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    if name == "small_cnn":
        model, size = SmallCNN(), 32
    elif name == "cnn_32_64_128":  # the same three convolutions at twice the width: 4x the work per step
        model, size = SmallCNN(width=32), 32
    elif name == "resnet18_cifar":
        model, size = ResNet18(num_classes=10, cifar_stem=True), 32
    else:
        raise ValueError(f"unknown end-to-end model {name!r}")
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, size, size, generator=gen).to(device)
    targets = torch.randint(0, 10, (batch,), generator=gen).to(device)
    return Workload(name, model.to(device), inputs, targets)


def make_stepper(cfg: OptimizerConfig, work: Workload, backend: str) -> tuple[torch.optim.Optimizer, Callable[[], None]]:
    """(optimizer, one training step) for a configuration."""
    model, criterion = work.model, nn.CrossEntropyLoss()
    params = list(model.parameters())
    sgd_args = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)

    def loss_fn():
        return criterion(model(work.inputs), work.targets)

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    if cfg.kind == "sgd":
        opt = torch.optim.SGD(params, **sgd_args)

        def step():
            opt.zero_grad(set_to_none=True)
            closure()
            opt.step()
        return opt, step
    if cfg.kind == "sam":
        opt = SAM(params, torch.optim.SGD, rho=0.05, model=model, backend=backend, **sgd_args)
        return opt, lambda: opt.step(closure)
    opt = XSAM(params, torch.optim.SGD, rho=0.05, alpha=0.2, eig_interval=cfg.eig_interval,
               power_iters=cfg.power_iters, hvp=cfg.hvp, hvp_eval_mode=cfg.hvp_eval_mode, model=model,
               backend=backend, **sgd_args)
    if cfg.hvp == "exact":
        return opt, lambda: opt.step(closure, loss_fn=loss_fn)
    return opt, lambda: opt.step(closure)


def _cycle(step: Callable[[], None], n: int) -> Callable[[], None]:
    def run():
        for _ in range(n):
            step()
    return run


def run_e2e(model_names: tuple[str, ...], device: torch.device, *, batch: int, configs=DEFAULT_CONFIGS,
            rounds: int = 15, backends: tuple[str, ...] | None = None,
            log: Callable[[str], None] = print) -> list[dict]:
    """Seconds per step of every (configuration, backend), interleaved: one cycle of each per round.

    A cycle is k steps (k = the refresh interval), so each timed cycle holds one refresh.
    ``ratio`` is the median over rounds of the ratio to SAM's cycle of the same round
    (same backend), and its quartiles are reported: the blocks of a ratio ran seconds apart.
    """
    chosen, skipped = available_backends(device, torch.float32, backends)
    for name, why in skipped.items():
        log(f"  [e2e] skipping backend {name!r} on {device}: {why}")
    rows = []
    for model_name in model_names:
        runs, keep = {}, []
        for backend in chosen:
            for cfg in configs:
                if cfg.kind == "sgd" and backend != chosen[0]:
                    continue  # SGD does not use the op set: time it once
                work = make_workload(model_name, device, batch)
                opt, step = make_stepper(cfg, work, backend)
                keep.append((work, opt))
                runs[(cfg, "-" if cfg.kind == "sgd" else backend)] = _cycle(step, cfg.eig_interval)
        # Warm-up covers a refresh and the plain steps; then one whole refresh cycle per block.
        stats = time_interleaved(runs, blocks=rounds, block_seconds=0.0, warmup_calls=1, device=device)
        n_params = sum(p.numel() for p in keep[0][0].model.parameters())
        n_tensors = len(list(keep[0][0].model.parameters()))
        for (cfg, impl), t in stats.items():
            per_step = t.scaled(1.0 / cfg.eig_interval)
            rows.append({
                "section": "e2e", "model": model_name, "op": cfg.name, "impl": impl, "device": str(device),
                "dtype": "float32", "n_tensors": n_tensors, "n_elements": n_params,
                "median_s": per_step.median, "q1_s": per_step.q1, "q3_s": per_step.q3, "min_s": per_step.minimum,
                "max_s": per_step.maximum, "spread": per_step.spread, "blocks": t.blocks,
                "calls_per_block": cfg.eig_interval, "_stats": per_step,
                "note": f"batch {batch}; per step, over {rounds} interleaved rounds of one cycle of k steps each "
                        "(k = refresh interval)",
            })
        del runs, keep
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"  [e2e] {model_name} done ({rounds} rounds)")
    _add_sam_ratios(rows)
    for r in rows:
        del r["_stats"]
    return rows


def _add_sam_ratios(rows: list[dict]) -> None:
    """Round-by-round ratios to SAM with the same backend (SGD: to SAM of the first backend)."""
    sam = {(r["model"], r["impl"]): r["_stats"] for r in rows if r["op"] == "sam"}
    for r in rows:
        backend = r["impl"]
        if backend == "-":
            backend = next((b for m, b in sam if m == r["model"]), None)
        base = sam.get((r["model"], backend))
        if base is None:
            continue
        ratio = paired_ratio(r["_stats"], base)
        r["ratio"], r["ratio_q1"], r["ratio_q3"] = ratio.median, ratio.q1, ratio.q3
        r["ratio_to"] = f"sam ({backend})"
        r["unstable"] = unstable(r["_stats"], ratio)


# ----- memory -------------------------------------------------------------------------------
def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the tensors an optimizer keeps between steps: the SAM/XSAM wrapper's own, and the base optimizer's."""
    base = getattr(opt, "base_optimizer", None)
    if base is None:  # plain SGD: everything it holds is "base" state (the momentum)
        return {"own": 0, "base": _tensor_bytes([opt.state[p] for p in opt.state])}
    own = sum(_tensor_bytes(opt.state[p]) for g in opt.param_groups for p in g["params"] if p in opt.state)
    # The saved-weights buffers are scratch outside state_dict (xsam/optim/base.py keeps them in
    # scratch_tensors()); they are memory the wrapper holds all the same.
    own += _tensor_bytes(opt.scratch_tensors() if hasattr(opt, "scratch_tensors") else [])
    return {"own": own, "base": _tensor_bytes([base.state[p] for p in base.state])}


def run_memory(model_names: tuple[str, ...], device: torch.device, *, batch: int, configs=DEFAULT_CONFIGS,
               log: Callable[[str], None] = print) -> list[dict]:
    backend = available_backends(device, torch.float32)[0][0]
    rows = []
    for model_name in model_names:
        seen_kinds = set()
        for cfg in configs:
            if (cfg.kind, cfg.hvp) in seen_kinds:
                continue  # state size does not depend on k or p
            seen_kinds.add((cfg.kind, cfg.hvp))
            work = make_workload(model_name, device, batch)
            param_bytes = sum(p.numel() * p.element_size() for p in work.model.parameters())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
            opt, step = make_stepper(cfg, work, backend)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            step()  # step 0 of XSAM is a refresh: the peak includes the HVP graph
            opt.zero_grad(set_to_none=True)
            state = optimizer_state_bytes(opt)
            row = {"section": "memory", "model": model_name, "op": cfg.name if cfg.kind == "sgd" else
                   {"sam": "sam", "xsam": f"xsam_{cfg.hvp}"}[cfg.kind], "impl": backend, "device": str(device),
                   "dtype": "float32", "n_elements": sum(p.numel() for p in work.model.parameters()),
                   "param_bytes": param_bytes, "state_bytes": state["own"], "base_state_bytes": state["base"],
                   "state_over_params": state["own"] / param_bytes,
                   "note": "state_bytes: tensors the wrapper holds between steps (eigenvector, saved weights), "
                           "base_state_bytes: the SGD momentum"}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = torch.cuda.max_memory_allocated(device) - before
                row["peak_extra_bytes"] = peak
                row["peak_over_params"] = peak / param_bytes
                row["note"] += "; peak_extra_bytes: max_memory_allocated over a step (refresh included) " \
                               "minus the model and batch"
            rows.append(row)
            del opt, step, work
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"  [memory] {model_name} done")
    return rows
