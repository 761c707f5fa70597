"""``xsam experiment``: SGD, SAM, ASAM and X-SAM (each correction) under one budget, on offline data.

Tasks (both ship with scikit-learn, so nothing is downloaded):
- ``digits``: 1797 8x8 handwritten digits, 10 classes; a small CNN with BatchNorm.
- ``cancer``: the Wisconsin breast-cancer set, 569 samples x 30 measured
  features, 2 classes; an MLP with BatchNorm. A different modality and model
  family from digits, real measurements, and no extra dependency (scikit-image's
  lfw_subset has only 200 images, so 50 test images, and needs another package).

Every method gets the same model initialisation per seed, the same batches,
epochs, learning-rate schedule (SGD, momentum 0.9, cosine) and weight decay.
At evaluation points the top Hessian eigenvalue (with sign) and the angle
between the gradient and its eigenvector are measured by
``xsam.diagnostics.top_eigenvalue`` on a fixed training batch, in eval mode,
the same way for every method. Wall time counts training steps only.

Outputs in ``--out``: ``curves.csv`` (one row per task, method, seed and
evaluation point), ``summary.csv`` (mean and std per task and method),
``experiment.png`` (eigenvalue, angle and test accuracy; needs matplotlib),
and the table printed to stdout.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .cli_args import OneLineErrorParser, number, output_dir

__all__ = ["METHODS", "TASKS", "Settings", "main", "run_one", "summarize"]

METHODS = ("sgd", "sam", "asam", "xsam-signed", "xsam-symmetric", "xsam-acute")
EXTRA_METHODS = ("xsam-alpha0",)  # control: X-SAM's normalised SAM without the correction
TASKS = ("digits", "cancer")


@dataclass
class Settings:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    rho: float = 0.05
    asam_rho: float = 0.5
    alpha: float = 0.2
    eig_interval: int = 5
    power_iters: int = 5
    eval_every: int = 5  # epochs between sharpness measurements (the last epoch always)
    eig_batch: int = 512  # fixed training examples for the independent eigenvalue
    eig_tol: float = 1e-3
    eig_max_iters: int = 100
    backend: str = "auto"


QUICK = dict(epochs=6, eval_every=3, eig_batch=256, eig_max_iters=60)


# ----- data and models ------------------------------------------------------------------
def load_task(name: str):
    """(x_train, y_train, x_test, y_test) as float32/int64 tensors; a fixed stratified split."""
    try:
        from sklearn import datasets
        from sklearn.model_selection import train_test_split
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit("xsam experiment needs scikit-learn for its bundled data sets: "
                         "pip install 'xsam[experiment]' (or pip install scikit-learn)") from e
    if name == "digits":
        data = datasets.load_digits()
        x = data.images.reshape(-1, 1, 8, 8) / 16.0
    elif name == "cancer":
        data = datasets.load_breast_cancer()
        x = data.data
    else:
        raise ValueError(f"task={name!r} is not known; use one of {', '.join(TASKS)}")
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=0.3, random_state=0, stratify=data.target)
    if name == "cancer":  # standardise with the training statistics only
        mean, std = xtr.mean(0), xtr.std(0) + 1e-8
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte)


def make_model(task: str) -> nn.Module:
    if task == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(nn.Linear(30, 64), nn.BatchNorm1d(64), nn.ReLU(),
                         nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))


def make_optimizer(method: str, model: nn.Module, s: Settings, seed: int):
    from .optim import SAM, XSAM

    base = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    params = model.parameters()
    if method == "sgd":
        return torch.optim.SGD(params, **base)
    if method == "sam":
        return SAM(params, torch.optim.SGD, rho=s.rho, model=model, backend=s.backend, **base)
    if method == "asam":
        return SAM(params, torch.optim.SGD, rho=s.asam_rho, adaptive=True, model=model, backend=s.backend, **base)
    if method.startswith("xsam-"):
        kind = method[len("xsam-"):]
        alpha, correction = (0.0, "signed") if kind == "alpha0" else (s.alpha, kind)
        return XSAM(params, torch.optim.SGD, rho=s.rho, alpha=alpha, correction=correction,
                    eig_interval=s.eig_interval, power_iters=s.power_iters, hvp="exact", model=model,
                    seed=seed, backend=s.backend, **base)
    raise ValueError(f"method={method!r} is not known; use one of {', '.join(METHODS + EXTRA_METHODS)}")


# ----- one run ---------------------------------------------------------------------------
@torch.no_grad()
def _accuracy(model: nn.Module, x, y) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def run_one(task: str, method: str, seed: int, s: Settings, data=None) -> list[dict]:
    """Train one (task, method, seed); one row per evaluation point (epoch 0 = before training)."""
    from .diagnostics import DiagnosticsRecorder, top_eigenvalue

    xtr, ytr, xte, yte = load_task(task) if data is None else data
    torch.manual_seed(seed)
    model = make_model(task)  # same initial weights for every method at this seed
    opt = make_optimizer(method, model, s, seed)
    criterion = nn.CrossEntropyLoss()
    steps_per_epoch = len(xtr) // s.batch_size  # drop the ragged last batch (BatchNorm)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s.epochs * steps_per_epoch)
    recorder = DiagnosticsRecorder(opt) if method.startswith("xsam") else None
    order = torch.Generator().manual_seed(10_000 + seed)  # same batches for every method
    eig_gen = torch.Generator().manual_seed(20_000 + seed)
    eig_idx = torch.randperm(len(xtr), generator=eig_gen)[: s.eig_batch]
    xe, ye = xtr[eig_idx], ytr[eig_idx]
    eig_loss = lambda: criterion(model(xe), ye)

    rows, vector, train_time, seen = [], None, 0.0, 0

    def evaluate(epoch: int, train_loss: float) -> None:
        nonlocal vector, seen
        est = top_eigenvalue(model, eig_loss, tol=s.eig_tol, max_iters=s.eig_max_iters, init=vector, seed=seed)
        vector = est.vector  # warm start: the next measurement needs few iterations
        row = dict(task=task, method=method, seed=seed, epoch=epoch, train_loss=train_loss,
                   test_acc=_accuracy(model, xte, yte), eigenvalue=est.eigenvalue,
                   rel_residual=est.relative_residual, eig_iters=est.iterations, eig_converged=est.converged,
                   grad_angle_deg=est.angle_degrees, train_time_s=train_time,
                   opt_cos_gadv_v=math.nan, opt_eigenvalue=math.nan)
        if recorder is not None:
            recs = recorder.records()[seen:]
            seen += len(recs)
            cos = [abs(r["cos_gadv_v"]) for r in recs if not math.isnan(r["cos_gadv_v"])]
            if cos:
                row["opt_cos_gadv_v"] = statistics.fmean(cos)
            fresh = [r["eigenvalue"] for r in recs if r["refreshed"]]
            if fresh:
                row["opt_eigenvalue"] = fresh[-1]
        rows.append(row)

    evaluate(0, math.nan)
    for epoch in range(1, s.epochs + 1):
        perm = torch.randperm(len(xtr), generator=order)
        loss_sum = torch.zeros(())
        start = time.perf_counter()
        for b in range(steps_per_epoch):
            idx = perm[b * s.batch_size:(b + 1) * s.batch_size]
            xb, yb = xtr[idx], ytr[idx]
            loss_fn = lambda: criterion(model(xb), yb)

            def closure():
                loss = loss_fn()
                loss.backward()
                return loss

            if method == "sgd":
                opt.zero_grad(set_to_none=True)
                loss = closure()
                opt.step()
            elif method in ("sam", "asam"):
                loss = opt.step(closure)
            else:
                loss = opt.step(closure, loss_fn=loss_fn)
            loss_sum += loss.detach()
            sched.step()
        train_time += time.perf_counter() - start
        if epoch % s.eval_every == 0 or epoch == s.epochs:
            evaluate(epoch, loss_sum.item() / steps_per_epoch)
    if recorder is not None:
        recorder.remove()
    return rows


def _run_job(job):
    task, method, seed, settings = job
    torch.set_num_threads(1)  # one worker per core; tiny models gain nothing from intra-op threads
    return run_one(task, method, seed, settings)


# ----- summary, table, plots -------------------------------------------------------------
def _mean_std(values):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and std over seeds of the final row of every (task, method) run."""
    final = {}
    for r in rows:
        key = (r["task"], r["method"], r["seed"])
        if key not in final or r["epoch"] > final[key]["epoch"]:
            final[key] = r
    out = []
    keys = sorted({(t, m) for t, m, _ in final}, key=lambda k: (TASKS.index(k[0]) if k[0] in TASKS else 99,
                                                                   (METHODS + EXTRA_METHODS).index(k[1])))
    for task, method in keys:
        runs = [r for (t, m, _), r in final.items() if t == task and m == method]
        row = dict(task=task, method=method, seeds=len(runs))
        for name in ("test_acc", "eigenvalue", "grad_angle_deg", "train_time_s"):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r[name] for r in runs])
        row["eig_converged"] = sum(bool(r["eig_converged"]) for r in runs)
        out.append(row)
    return out


def format_table(summary: list[dict]) -> str:
    head = (f"| task | method | seeds | test acc (%) | final top eigenvalue | grad-v angle (deg) | "
            f"train wall time (s) |")
    lines = [head, "|" + "---|" * 7]
    for r in summary:
        lines.append(
            f"| {r['task']} | {r['method']} | {r['seeds']} "
            f"| {100 * r['test_acc_mean']:.2f} ± {100 * r['test_acc_std']:.2f} "
            f"| {r['eigenvalue_mean']:.3g} ± {r['eigenvalue_std']:.2g} "
            f"| {r['grad_angle_deg_mean']:.1f} ± {r['grad_angle_deg_std']:.1f} "
            f"| {r['train_time_s_mean']:.1f} ± {r['train_time_s_std']:.1f} |")
    return "\n".join(lines)


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows: list[dict], path: str) -> bool:
    """Eigenvalue and angle over training, final test accuracy; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = [t for t in TASKS if any(r["task"] == t for r in rows)]
    methods = [m for m in METHODS + EXTRA_METHODS if any(r["method"] == m for r in rows)]
    colors = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        ax_eig, ax_ang, ax_acc = axes[i]
        for m in methods:
            runs = [r for r in rows if r["task"] == task and r["method"] == m]
            epochs = sorted({r["epoch"] for r in runs})
            for ax, key in ((ax_eig, "eigenvalue"), (ax_ang, "grad_angle_deg")):
                stats = [_mean_std([r[key] for r in runs if r["epoch"] == e]) for e in epochs]
                mean = [a for a, _ in stats]
                std = [b for _, b in stats]
                ax.plot(epochs, mean, marker="o", ms=3, label=m, color=colors[m])
                ax.fill_between(epochs, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                                alpha=0.15, color=colors[m])
        summ = {r["method"]: r for r in summarize([r for r in rows if r["task"] == task])}
        xs = range(len(methods))
        ax_acc.bar(xs, [100 * summ[m]["test_acc_mean"] for m in methods],
                   yerr=[100 * summ[m]["test_acc_std"] for m in methods], color=[colors[m] for m in methods],
                   capsize=3)
        accs = [100 * summ[m]["test_acc_mean"] for m in methods]
        ax_acc.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs) + 2))
        ax_acc.set_xticks(list(xs), methods, rotation=30, ha="right")
        ax_eig.set(title=f"{task}: top Hessian eigenvalue (fixed batch)", xlabel="epoch", ylabel="lambda_max")
        ax_ang.set(title=f"{task}: angle between gradient and top eigenvector", xlabel="epoch",
                   ylabel="degrees (0-90)")
        ax_acc.set(title=f"{task}: final test accuracy (mean ± std)", ylabel="%")
        ax_eig.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# ----- command line ----------------------------------------------------------------------
# Ranges of the settings, checked while parsing (before any run starts).
SETTING_TYPES = {
    "epochs": number(int, 1), "batch_size": number(int, 2), "eval_every": number(int, 1),
    "lr": number(float, 0.0, low_open=True), "rho": number(float, 0.0), "alpha": number(float, 0.0, 2.0),
    "eig_interval": number(int, 1), "power_iters": number(int, 1), "momentum": number(float, 0.0, 1.0),
    "weight_decay": number(float, 0.0), "asam_rho": number(float, 0.0), "eig_batch": number(int, 2),
    "eig_tol": number(float, 0.0, low_open=True), "eig_max_iters": number(int, 2),
}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="xsam experiment",
                                description="SGD vs SAM vs ASAM vs X-SAM on offline data: accuracy, sharpness, "
                                            "gradient-eigenvector angle, wall time")
    p.add_argument("--quick", action="store_true",
                   help=f"CI-sized run: digits only, 1 seed, {QUICK['epochs']} epochs (about 30 s)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None, help="default: both (--quick: digits)")
    p.add_argument("--methods", nargs="+", choices=METHODS + EXTRA_METHODS, default=None,
                   help="default: " + " ".join(METHODS) + " (xsam-alpha0 is an optional control)")
    p.add_argument("--seeds", type=number(int, 1), default=None, help="number of seeds (default 3; --quick: 1)")
    p.add_argument("--out", type=output_dir, default="xsam-experiment", help="output folder (created)")
    p.add_argument("--workers", type=number(int, 1), default=1, help="parallel runs (processes, one thread each)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG (also skipped without matplotlib)")
    for f in Settings.__dataclass_fields__.values():
        if f.name in ("backend",):
            p.add_argument("--backend", default=f.default, choices=("auto", "reference", "native", "triton"))
            continue
        p.add_argument("--" + f.name.replace("_", "-"), type=SETTING_TYPES.get(f.name, type(f.default)), default=None,
                       help=f"default {f.default}" + (f", --quick {QUICK[f.name]}" if f.name in QUICK else ""))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Tiny models: intra-op threads only add synchronisation, and on a loaded machine a
    # two-thread op waits for the slower thread; every run (and worker) uses one.
    torch.set_num_threads(1)
    settings = Settings(**(QUICK if args.quick else {}))
    for name in Settings.__dataclass_fields__:
        value = getattr(args, name, None)
        if value is not None:
            setattr(settings, name, value)
    tasks = args.tasks or (["digits"] if args.quick else list(TASKS))
    methods = args.methods or list(METHODS)
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    jobs = [(t, m, seed, settings) for t in tasks for seed in range(n_seeds) for m in methods]
    print(f"xsam experiment: {len(tasks)} task(s) x {len(methods)} methods x {n_seeds} seed(s); "
          f"settings {asdict(settings)}", flush=True)
    started = time.perf_counter()
    rows: list[dict] = []

    def report(job, result):
        last = result[-1]
        print(f"  {job[0]:7s} {job[1]:15s} seed {job[2]}: test acc {100 * last['test_acc']:.2f}%  "
              f"lambda_max {last['eigenvalue']:.4g}  train {last['train_time_s']:.1f}s", flush=True)
        rows.extend(result)

    if args.workers == 1:
        for job in jobs:
            report(job, run_one(*job))
    else:
        import concurrent.futures
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
            futures = {pool.submit(_run_job, job): job for job in jobs}
            for fut in concurrent.futures.as_completed(futures):
                report(futures[fut], fut.result())
    rows.sort(key=lambda r: (r["task"], (METHODS + EXTRA_METHODS).index(r["method"]), r["seed"], r["epoch"]))
    summary = summarize(rows)
    _write_csv(os.path.join(args.out, "curves.csv"), rows)
    _write_csv(os.path.join(args.out, "summary.csv"), summary)
    table = format_table(summary)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    print()
    print(table)
    if args.no_plots:
        print("plots skipped (--no-plots)")
    elif plot(rows, os.path.join(args.out, "experiment.png")):
        print(f"plot: {os.path.join(args.out, 'experiment.png')}")
    else:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or the package's "
              "'experiment' extra)", file=sys.stderr)
    print(f"wrote {args.out}/curves.csv, summary.csv, table.md in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
