"""What one curvature product costs against one gradient: ``python -m xsam.bench.products_bench [--out DIR]``.

On the same batch of 64 images, models in eval mode (BatchNorm on running statistics, as the
optimizers' products run with ``model=``), one thread, every method timed in interleaved rounds
(``timing.time_interleaved``); each round's time over that round's gradient time gives one ratio
per method, and the table reports the median ratio over rounds with its quartiles. Methods:

- ``gradient``: ``torch.autograd.grad`` of the loss (the unit);
- ``double_backward``: ``xsam.hessian.exact_hvp``, a create-graph backward and one product
  (what ``hvp="exact"`` spends on a refresh of one power iteration);
- ``double_backward_quarter``: the same on 16 of the 64 images (a sub-batch ``loss_fn``);
- ``func_eager``: ``torch.func`` forward-over-reverse (jvp of grad with ``functional_call``), eager;
- ``compiled``: the same under ``torch.compile`` (the code ``hvp="compiled"`` runs, compiled once
  before timing; where its error exceeds ``xsam.products.VERIFY_RTOL``, ``hvp="compiled"`` runs
  double backward instead);
- ``ggn``: the Gauss-Newton product (``xsam.products.ggn_hvp``).

With ``--tracking``, also the tracking frontier's rows of these products (``tracking_bench``: the
same tasks, quality measure and interleaved timing against SAM) for SAM, exact products at the
authors' setting (p 5, k 5) and at p 1, k 5, compiled exact products at p 1, k 5, and Gauss-Newton
products at p 1 and p 5, k 5; written to ``product_frontier.md`` and ``product_frontier.csv``.

Models: ``digits_cnn``, the demo's CNN on 8x8 digits; ``cnn3_32``, three 3x3 convolutions
(32-64-128 channels, each with BatchNorm and ReLU, max-pool after the first two) and a linear
head, on 32x32x3 inputs. Each exact method's product is compared with double backward's
(relative error); GGN's with nothing (it is another matrix).
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .timing import paired_ratio, time_interleaved

METHODS = ("gradient", "double_backward", "double_backward_quarter", "func_eager", "compiled", "ggn")
BATCH = 64
CSV_NAME = "product_costs.csv"
TABLE_NAME = "product_costs.md"
FRONTIER_CSV, FRONTIER_TABLE = "product_frontier.csv", "product_frontier.md"
FRONTIER_CONFIGS = ("sam", "exact_p5_k5", "exact_p1_k5", "compiled_p1_k5", "ggn_p1_k5", "ggn_p5_k5")


def cnn3_32() -> nn.Module:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(3, 32), nn.MaxPool2d(2), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def digits_cnn() -> nn.Module:
    from xsam.demo import small_cnn

    return small_cnn()


def resnet18_cifar() -> nn.Module:
    from .models import ResNet18

    return ResNet18(num_classes=10, cifar_stem=True)


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "digits_cnn": (digits_cnn, (1, 8, 8)), "cnn3_32": (cnn3_32, (3, 32, 32)),
    "resnet18_cifar": (resnet18_cifar, (3, 32, 32))}
CPU_MODELS = ("digits_cnn", "cnn3_32")  # the default; ResNet-18 is for GPUs (bench/device_check.sh)


@dataclass
class ProductCost:
    model: str
    method: str
    ratio: float  # median over rounds of (method's time / the gradient's time)
    q1: float
    q3: float
    milliseconds: float  # median time of one call
    relative_error: float  # ||product - double backward's|| / ||double backward's|| (nan: not an exact product)


def _trained_bn_statistics(model: nn.Module, shape: tuple[int, ...], generator: torch.Generator, batch: int,
                           device: torch.device) -> None:
    """A few train-mode forwards, so eval mode runs on running statistics that are not the initial 0 / 1."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn((batch, *shape), generator=generator).to(device))
    model.eval()


def method_calls(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, Callable], list]:
    """One callable per method (each returns its product, the gradient for ``gradient``) and the vector."""
    from xsam.hessian import exact_hvp, random_vectors
    from xsam.products import CompiledProduct, _parameter_names, ggn_hvp

    params = list(model.parameters())
    v = random_vectors(params, 1, torch.Generator().manual_seed(0))[0]
    quarter = len(y) // 4

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    def quarter_loss_fn():
        return nn.functional.cross_entropy(model(x[:quarter]), y[:quarter])

    # The two forms of hvp="compiled"'s product, called directly: timed without its one-time check.
    product = CompiledProduct(model, _parameter_names(model, params, "compiled"), "inductor")
    primals = tuple(p.detach() for p in params)
    calls = {
        "gradient": lambda: list(torch.autograd.grad(loss_fn(), params)),
        "double_backward": lambda: exact_hvp(loss_fn, params)[0]([v])[0],
        "double_backward_quarter": lambda: exact_hvp(quarter_loss_fn, params)[0]([v])[0],
        "func_eager": lambda: list(product._product(loss_fn, primals, tuple(v))),
        "compiled": lambda: list(product._compiled(loss_fn, primals, tuple(v))),
        "ggn": lambda: ggn_hvp(model, loss_fn, params)([v])[0],
    }
    return calls, v


def measure(name: str, rounds: int, block_seconds: float, log=print, *, batch: int = BATCH,
            device: torch.device = torch.device("cpu")) -> list[ProductCost]:
    from xsam.products import _relative_difference

    build, shape = MODELS[name]
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build().to(device)
    _trained_bn_statistics(model, shape, generator, batch, device)
    x = torch.randn((batch, *shape), generator=generator).to(device)
    y = torch.randint(0, 10, (batch,), generator=generator).to(device)
    calls, _ = method_calls(model, x, y)
    log(f"{name}: compiling")
    reference = calls["double_backward"]()
    errors = {m: _relative_difference(calls[m](), reference) for m in ("func_eager", "compiled")}
    log(f"{name}: timing {rounds} rounds")
    times = time_interleaved(calls, blocks=rounds, block_seconds=block_seconds,
                             device=device if device.type == "cuda" else None)
    rows = []
    for method in METHODS:
        ratio = paired_ratio(times[method], times["gradient"])
        rows.append(ProductCost(f"{name} (batch {batch})" if batch != BATCH else name, method, ratio.median, ratio.q1, ratio.q3, 1e3 * times[method].median,
                                errors.get(method, 0.0 if method == "double_backward" else float("nan"))))
    return rows


def format_table(rows: list[ProductCost], command: str, rounds: int) -> str:
    lines = [
        "# One curvature product against one gradient",
        "",
        f"`{command}`: {platform.processor() or platform.machine()}, torch {torch.__version__}, one thread, "
        f"batch {BATCH} (or as named), eval mode, {rounds} interleaved rounds; median of the per-round ratios [quartiles].",
        "",
        "| model | method | time / gradient [q1, q3] | ms per call | rel. error vs double backward |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        error = "-" if r.relative_error != r.relative_error else f"{r.relative_error:.1e}"
        lines.append(f"| {r.model} | {r.method} | {r.ratio:.2f} [{r.q1:.2f}, {r.q3:.2f}] | {r.milliseconds:.2f} "
                     f"| {error} |")
    return "\n".join(lines) + "\n"


def product_frontier(out: Path, *, seeds: int, steps: int, cycles: int, eval_every: int,
                     names: tuple[str, ...] = FRONTIER_CONFIGS, log=print) -> None:
    """The tracking frontier's rows of ``names`` on its default tasks, one process, one thread."""
    import time

    from . import tracking_bench as tb

    started = time.perf_counter()
    configs = [c for c in tb.frontier_configs() if c.name in names]
    timing = {task: tb.time_configs(task, configs, cycles, log) for task in tb.TASKS}
    results = []
    for task in tb.TASKS:
        for cfg in configs:
            if cfg.hvp == "sam":
                continue
            for seed in range(seeds):
                results.append(tb.quality_run(task, cfg, seed, steps, eval_every))
                log(f"  quality: {task} {cfg.name} seed {seed} ({results[-1]['seconds']:.0f} s)")
    rows = tb.summarize(configs, tb.TASKS, timing, results)
    tb._write_csv(out / FRONTIER_CSV, tb.FRONTIER_COLUMNS, rows)
    command = (f"python -m xsam.bench.products_bench --tracking --seeds {seeds} --steps {steps} --cycles {cycles} "
               f"--eval-every {eval_every} --configs {','.join(names)}")
    (out / FRONTIER_TABLE).write_text(tb.format_table(rows, command, seeds=seeds, steps=steps,
                                                      eval_every=eval_every, cycles=cycles,
                                                      elapsed=time.perf_counter() - started))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xsam.bench.products_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/tracking"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--block-seconds", type=float, default=0.3)
    parser.add_argument("--models", default=",".join(CPU_MODELS), help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--batches", default=str(BATCH), help="comma-separated batch sizes (default 64)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--tracking", action="store_true", help="only the frontier rows of the product methods")
    parser.add_argument("--configs", default=",".join(FRONTIER_CONFIGS),
                        help="with --tracking: the frontier configurations to run (sam is the baseline)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cycles", type=int, default=7)
    parser.add_argument("--eval-every", type=int, default=23)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tracking:
        product_frontier(args.out, seeds=args.seeds, steps=args.steps, cycles=args.cycles, eval_every=args.eval_every,
                         names=tuple(args.configs.split(",")))
        print((args.out / FRONTIER_TABLE).read_text())
        return 0
    device = torch.device(args.device)
    rows = [row for name in args.models.split(",") for batch in map(int, args.batches.split(","))
            for row in measure(name, args.rounds, args.block_seconds, batch=batch, device=device)]
    with open(args.out / CSV_NAME, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(ProductCost.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(vars(r) for r in rows)
    command = "python -m xsam.bench.products_bench " + " ".join(sys.argv[1:] if argv is None else argv)
    (args.out / TABLE_NAME).write_text(format_table(rows, command.strip(), args.rounds))
    print((args.out / TABLE_NAME).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
