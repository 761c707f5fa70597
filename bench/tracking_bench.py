"""Tracking frontier: what X-SAM's eigenvector costs against how well it tracks.

``xsam bench --only tracking [--quick] [--seeds N] [--steps N] [--out DIR]``

For every configuration (HVP mode x power iterations p x refresh interval k, plus the
streaming mode and SAM) on two tasks trained with mini-batches:

- ``mlp``: an MLP (10-32-32-1, tanh) regressing a fixed random teacher on 1,024 points built in
  code, batch 64, no ``model=`` (nothing depends on the mode) except for the compiled and
  Gauss-Newton products, which need it;
- ``digits``: the CNN with BatchNorm of ``xsam demo`` on scikit-learn's digits (1,437 training
  images), batch 64, ``model=`` (HVPs in eval mode unless the configuration says otherwise);
- ``digits_silu`` (only with ``--tracking-tasks digits_silu``, on a subset of the configurations):
  the same CNN with SiLU instead of ReLU, a smooth loss on which finite differences see no kinks.

Cost, per step: closure calls (gradient evaluations), ``loss_fn`` calls and products from
``loss_fn`` (double backward, compiled or Gauss-Newton) counted over the quality runs; and wall time per step against SAM
measured in the same process, interleaved: every cycle times 20 steps (a whole refresh cycle
of every k) of each configuration in turn, SAM included, so each cycle gives one ratio per
configuration; the median over cycles is reported with its range, and a configuration whose
range exceeds 20% of its median is flagged unstable.

Quality over training: every ``eval_every`` steps (23 by default, prime to every k, so the
points fall at every phase of the refresh cycle) the top eigenpair (lambda_max, v_top) of a
large fixed batch (all 1,024 points; 1,024 training images) is measured independently by
``xsam.diagnostics.top_eigenvalue`` (exact HVPs, eval mode, tolerance 1e-3, warm-started), and
the optimizer's v is scored by its Rayleigh quotient on that batch over lambda_max, and by
|cos(v, v_top)|. A run's quality is the mean over its points; the table reports the mean and
spread over seeds.

Besides, ``product_errors`` measures how far central and forward finite-difference products are
from exact ones on the digits CNN (ReLU) and the same CNN with SiLU, in fp32 and fp64.

Outputs in ``--out``: ``tracking_frontier.csv`` (one row per task and configuration),
``tracking_curves.csv`` (every measurement point), ``tracking_products.csv`` (the product
errors), ``tracking_frontier.md`` (the tables and the command) and ``tracking_frontier.png``
(quality against time; needs matplotlib).
"""
from __future__ import annotations

import dataclasses
import csv
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

CSV_NAME, CURVES_NAME, TABLE_NAME, PLOT_NAME = ("tracking_frontier.csv", "tracking_curves.csv",
                                                "tracking_frontier.md", "tracking_frontier.png")
PRODUCTS_NAME = "tracking_products.csv"
TASKS = ("mlp", "digits")  # the default frontier
EXTRA_TASKS = ("digits_silu",)  # the digits CNN with SiLU: smooth, so finite differences see no kinks
SILU_CONFIGS = ("sam", "exact_p5_k5", "exact_p1_k5", "central_p5_k5", "forward_p1_k5", "forward_p5_k5",
                "forward_p1_k5_trainmode", "streaming")
HVPS = ("exact", "finite_difference", "forward_difference")
LOSS_FN_HVPS = ("exact", "compiled", "ggn")  # the modes whose products come from loss_fn
MODEL_HVPS = ("compiled", "ggn")  # the modes that need model= (they swap its parameters)
EVAL_EVERY = 23  # steps between quality points: prime to every k, so they fall at every phase of the cycle
TIMING_STEPS = 20  # steps per timed block: a whole refresh cycle of k = 1, 5 and 20
UNSTABLE_RANGE = 0.2  # (max - min) / median of the per-cycle ratios above which a timing is flagged


@dataclass(frozen=True)
class TrackConfig:
    name: str
    hvp: str  # an XSAM hvp mode, or "sam"
    power_iters: int = 1
    eig_interval: int = 1
    hvp_eval_mode: bool = True
    tasks: tuple[str, ...] = TASKS
    eig_interval_max: int | None = None  # the adaptive schedule's longest interval


def frontier_configs(quick: bool = False) -> list[TrackConfig]:
    ps, ks = ((1, 5), (1, 5)) if quick else ((1, 2, 5), (1, 5, 20))
    configs = [TrackConfig("sam", "sam")]
    for hvp in HVPS:
        for p in ps:
            for k in ks:
                configs.append(TrackConfig(f"{_short(hvp)}_p{p}_k{k}", hvp, p, k))
    configs.append(TrackConfig("streaming", "streaming"))
    # The cheaper products at the authors' interval: compiled exact ones (the same v as exact, in
    # less time) and Gauss-Newton ones (another matrix, scored against the Hessian's v_top).
    for hvp in MODEL_HVPS:
        configs += [TrackConfig(f"{hvp}_p{p}_k5", hvp, p, 5) for p in ((1,) if quick else (1, 5))]
    # The adaptive schedule: from every 5 steps up to every 40 while successive refreshes agree.
    configs += [TrackConfig(f"exact_p{p}_k5_max40", "exact", p, 5, eig_interval_max=40) for p in (1, 5)]
    # The BatchNorm question: forward differences reusing the train-mode first pass instead of
    # spending one eval-mode evaluation per refresh (only the digits CNN has BatchNorm).
    configs.append(TrackConfig("forward_p1_k5_trainmode", "forward_difference", 1, 5, hvp_eval_mode=False,
                               tasks=("digits",)))
    # The smooth twin of the digits CNN gets the configurations that answer its question.
    return [dataclasses.replace(c, tasks=c.tasks + (EXTRA_TASKS if c.name in SILU_CONFIGS else ()))
            for c in configs]


def _short(hvp: str) -> str:
    return {"exact": "exact", "finite_difference": "central", "forward_difference": "forward", "compiled": "compiled",
            "ggn": "ggn"}[hvp]


# ----- tasks --------------------------------------------------------------------------------
@dataclass
class Task:
    name: str
    model: nn.Module
    x: torch.Tensor  # training inputs
    y: torch.Tensor
    big: tuple[torch.Tensor, torch.Tensor]  # the large fixed batch quality is measured on
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    lr: float
    weight_decay: float
    pass_model: bool  # model= to the optimizer (BatchNorm)
    batch: int = 64


def make_task(name: str, seed: int) -> Task:
    if name == "mlp":
        gen = torch.Generator().manual_seed(1234)  # the data set: the same for every seed
        x = torch.randn(1024, 10, generator=gen)
        teacher = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
        with torch.no_grad():
            for p in teacher.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))
            y = teacher(x) + 0.1 * torch.randn(1024, 1, generator=gen)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 1))
        return Task(name, model, x, y, (x, y), lambda out, t: (out - t).square().mean(), lr=0.1, weight_decay=0.0,
                    pass_model=False)
    if name in ("digits", "digits_silu"):
        from xsam.demo import load_digits_tensors, small_cnn

        (x, y), _ = load_digits_tensors(0)
        torch.manual_seed(seed)
        model = small_cnn()
        if name == "digits_silu":
            model = nn.Sequential(*(nn.SiLU() if isinstance(m, nn.ReLU) else m for m in model))
        return Task(name, model, x, y, (x[:1024], y[:1024]), nn.functional.cross_entropy, lr=0.05,
                    weight_decay=5e-4, pass_model=True)
    raise ValueError(f"unknown tracking task {name!r}; use one of {', '.join(TASKS + EXTRA_TASKS)}")


def make_optimizer(cfg: TrackConfig, task: Task, seed: int):
    from xsam.optim import SAM, XSAM

    base = dict(lr=task.lr, momentum=0.9, weight_decay=task.weight_decay)
    model = task.model if task.pass_model or cfg.hvp in MODEL_HVPS else None
    if cfg.hvp == "sam":
        return SAM(task.model.parameters(), torch.optim.SGD, rho=0.05, model=model, **base)
    return XSAM(task.model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.2, hvp=cfg.hvp,
                power_iters=cfg.power_iters, eig_interval=cfg.eig_interval, eig_interval_max=cfg.eig_interval_max,
                hvp_eval_mode=cfg.hvp_eval_mode, model=model, seed=seed, **base)


class Stepper:
    """One training run's steps: batches in a seeded order, with closure and loss_fn calls counted."""

    def __init__(self, cfg: TrackConfig, task: Task, seed: int):
        self.cfg, self.task = cfg, task
        self.opt = make_optimizer(cfg, task, seed)
        self.gen = torch.Generator().manual_seed(10_000 + seed)
        self.order, self.pos = torch.randperm(len(task.y), generator=self.gen), 0
        self.closure_calls = self.loss_fn_calls = self.steps = 0

    def batch(self):
        n = self.task.batch
        if self.pos + n > len(self.order):
            self.order, self.pos = torch.randperm(len(self.task.y), generator=self.gen), 0
        idx = self.order[self.pos:self.pos + n]
        self.pos += n
        return self.task.x[idx], self.task.y[idx]

    def step(self) -> None:
        x, y = self.batch()
        model, loss_of = self.task.model, self.task.loss

        def loss_fn():
            self.loss_fn_calls += 1
            return loss_of(model(x), y)

        def closure():
            self.closure_calls += 1
            loss = loss_of(model(x), y)
            loss.backward()
            return loss

        if self.cfg.hvp in LOSS_FN_HVPS:
            self.opt.step(closure, loss_fn=loss_fn)
        else:
            self.opt.step(closure)
        self.steps += 1

    def products(self) -> int:
        """Products from loss_fn (double backward, compiled or Gauss-Newton) so far."""
        if self.cfg.hvp not in LOSS_FN_HVPS:
            return 0
        return int(self.opt.diagnostics().get("refresh_attempts", 0)) * self.cfg.power_iters


# ----- quality --------------------------------------------------------------------------------
def measure_quality(task: Task, v: list[torch.Tensor] | None, v_top_init: list[torch.Tensor] | None
                    ) -> tuple[dict, list[torch.Tensor]]:
    """lambda_max and v_top of the large batch (independent exact HVPs), how v scores on it, and v_top."""
    from xsam.diagnostics import cosine, top_eigenvalue
    from xsam.hessian import exact_hvp
    from xsam.optim import eval_mode

    model = task.model
    bx, by = task.big
    params = [p for p in model.parameters() if p.requires_grad]

    def big_loss():
        return task.loss(model(bx), by)

    top = top_eigenvalue(model, big_loss, tol=1e-3, max_iters=300, init=v_top_init, params=params)
    row = {"lambda_max": top.eigenvalue, "top_converged": top.converged, "top_iterations": top.iterations,
           "rq": math.nan, "quality": math.nan, "cos": math.nan}
    if v is not None:
        with eval_mode(model):
            hvp, _ = exact_hvp(big_loss, params)
            hv = hvp([v])[0]
        vv = sum(float((t.double() ** 2).sum()) for t in v)
        rq = sum(float((a.double() * b.double()).sum()) for a, b in zip(v, hv)) / vv
        row.update(rq=rq, quality=rq / top.eigenvalue, cos=abs(cosine(v, top.vector)))
    return row, top.vector


def quality_run(task_name: str, cfg: TrackConfig, seed: int, steps: int, eval_every: int) -> dict:
    """One training run of ``cfg``: its cost counts and its quality at every measurement point."""
    torch.set_num_threads(1)
    task = make_task(task_name, seed)
    stepper = Stepper(cfg, task, seed)
    points, v_top = [], None
    started = time.perf_counter()
    for t in range(1, steps + 1):
        stepper.step()
        if t % eval_every == 0:
            v = stepper.opt.eigenvector()
            row, v_top = measure_quality(task, v, v_top)
            points.append(dict(task=task_name, config=cfg.name, seed=seed, step=t, **row))
    return {"task": task_name, "config": cfg.name, "seed": seed, "steps": steps, "points": points,
            "closure_per_step": stepper.closure_calls / steps, "loss_fn_per_step": stepper.loss_fn_calls / steps,
            "products_per_step": stepper.products() / steps, "seconds": time.perf_counter() - started}


def _quality_job(args):
    return quality_run(*args)


# ----- wall time, interleaved ----------------------------------------------------------------
def time_configs(task_name: str, configs: list[TrackConfig], cycles: int, log: Callable[[str], None]) -> dict:
    """Per configuration, the per-cycle ratios of seconds per step to SAM's in the same cycle."""
    torch.set_num_threads(1)
    steppers = {c.name: Stepper(c, make_task(task_name, 0), 0) for c in configs}
    for s in steppers.values():  # warm-up: a whole cycle (allocations, a refresh of every k)
        for _ in range(TIMING_STEPS):
            s.step()
    seconds: dict[str, list[float]] = {c.name: [] for c in configs}
    names = [c.name for c in configs]
    for cycle in range(cycles):
        shift = cycle % len(names)
        for name in names[shift:] + names[:shift]:  # a rotated order, so no one always follows another
            s = steppers[name]
            start = time.perf_counter()
            for _ in range(TIMING_STEPS):
                s.step()
            seconds[name].append((time.perf_counter() - start) / TIMING_STEPS)
        log(f"  [tracking] {task_name}: timing cycle {cycle + 1}/{cycles}")
    out = {}
    for name in names:
        ratios = [t / sam for t, sam in zip(seconds[name], seconds["sam"])]
        med = statistics.median(ratios)
        out[name] = {"seconds_per_step": statistics.median(seconds[name]), "ratio_vs_sam": med,
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "unstable": (max(ratios) - min(ratios)) > UNSTABLE_RANGE * med}
    return out


# ----- why finite differences fail on ReLU networks ---------------------------------------------------
PRODUCT_COLUMNS = ["activation", "dtype", "product", "batch", "relative_error", "hv_norm"]


def product_errors(batches: int = 5, train_steps: int = 100) -> list[dict]:
    """Relative error of central and forward finite-difference products against exact ones.

    The digits CNN (ReLU) and the same CNN with SiLU, after ``train_steps`` SAM steps, in eval
    mode, in fp32 and fp64, on ``batches`` batches of 64, along a v near each batch's top
    eigenvector (10 exact power iterations from a seeded start), at the default steps h.
    """
    from xsam.demo import load_digits_tensors, small_cnn
    from xsam.hessian import exact_hvp, finite_difference_hvp, forward_difference_hvp, random_vectors
    from xsam.optim import SAM, eval_mode

    torch.set_num_threads(1)
    (x, y), _ = load_digits_tensors(0)
    rows = []
    for activation in ("relu", "silu"):
        torch.manual_seed(0)
        model = small_cnn()
        if activation == "silu":
            model = nn.Sequential(*(nn.SiLU() if isinstance(m, nn.ReLU) else m for m in model))
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.05, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in range(train_steps):
            idx = torch.randint(0, len(y), (64,), generator=gen)

            def closure():
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                loss.backward()
                return loss
            opt.step(closure)
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)
            params = list(model.parameters())
            for b in range(batches):
                xb, yb = x[64 * b:64 * (b + 1)].to(dtype), y[64 * b:64 * (b + 1)]

                def loss_fn():
                    return nn.functional.cross_entropy(model(xb), yb)

                def closure():
                    loss = loss_fn()
                    loss.backward()
                    return loss

                with eval_mode(model):
                    exact, _ = exact_hvp(loss_fn, params)
                    v = random_vectors(params, 1, torch.Generator().manual_seed(b))[0]
                    for _ in range(10):
                        u = exact([v])[0]
                        norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in u))
                        v = [t / norm for t in u]
                    reference = exact([v])[0]
                    for p in params:
                        p.grad = None
                    closure()
                    base = [p.grad.clone() for p in params]
                    products = {"central": finite_difference_hvp(closure, params)([v])[0],
                                "forward": forward_difference_hvp(closure, params, base)([v])[0]}
                ref_norm = math.sqrt(sum(float((t.double() ** 2).sum()) for t in reference))
                for name, prod in products.items():
                    err = math.sqrt(sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in zip(prod, reference)))
                    rows.append({"activation": activation, "dtype": str(dtype).replace("torch.", ""), "product": name,
                                 "batch": b, "relative_error": err / ref_norm, "hv_norm": ref_norm})
            model.float()
    return rows


def format_product_errors(rows: list[dict]) -> str:
    lines = ["| activation | dtype | product | median relative error | max |", "|---|---|---|---|---|"]
    keys = dict.fromkeys((r["activation"], r["dtype"], r["product"]) for r in rows)
    for key in keys:
        errs = [r["relative_error"] for r in rows if (r["activation"], r["dtype"], r["product"]) == key]
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {statistics.median(errs):.2g} | {max(errs):.2g} |")
    return "\n".join(lines)


# ----- the whole frontier ------------------------------------------------------------------------
FRONTIER_COLUMNS = ["task", "config", "hvp", "power_iters", "eig_interval", "hvp_eval_mode", "closure_per_step",
                    "loss_fn_per_step", "products_per_step", "evals_per_step", "seconds_per_step", "ratio_vs_sam",
                    "ratio_min", "ratio_max", "unstable", "quality_mean", "quality_sd", "quality_worst",
                    "cos_mean", "cos_sd", "seeds", "points"]
CURVE_COLUMNS = ["task", "config", "seed", "step", "lambda_max", "top_converged", "top_iterations", "rq",
                 "quality", "cos"]


def run_tracking(out: Path, *, quick: bool = False, seeds: int | None = None, steps: int | None = None,
                 tasks: tuple[str, ...] = TASKS, workers: int = 2, cycles: int | None = None,
                 eval_every: int | None = None, plot: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Measure the frontier and write its files into ``out``; returns their names."""
    seeds = seeds or (1 if quick else 3)
    steps = steps or (12 if quick else 300)
    eval_every = eval_every or (6 if quick else EVAL_EVERY)
    cycles = cycles or (1 if quick else 7)
    configs = frontier_configs(quick)
    started = time.perf_counter()
    products = product_errors(batches=2 if quick else 5, train_steps=5 if quick else 100)
    log("  [tracking] finite-difference products against exact ones: done")
    timing = {}
    for task_name in tasks:  # first, alone on the machine: the quality runs use every core
        chosen = [c for c in configs if task_name in c.tasks]
        timing[task_name] = time_configs(task_name, chosen, cycles, log)
    jobs = [(task_name, c, seed, steps, eval_every) for task_name in tasks for c in configs
            if task_name in c.tasks and c.hvp != "sam" for seed in range(seeds)]
    jobs.sort(key=lambda j: -_job_weight(j[1]))  # the longest first, so the workers finish together
    results = []
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for i, r in enumerate(pool.imap_unordered(_quality_job, jobs), 1):
                results.append(r)
                log(f"  [tracking] quality {i}/{len(jobs)}: {r['task']} {r['config']} seed {r['seed']} "
                    f"({r['seconds']:.0f} s)")
    else:
        for i, job in enumerate(jobs, 1):
            results.append(quality_run(*job))
            log(f"  [tracking] quality {i}/{len(jobs)}: {job[0]} {job[1].name} seed {job[2]}")
    rows = summarize(configs, tasks, timing, results)
    curves = sorted((p for r in results for p in r["points"]),
                    key=lambda p: (p["task"], p["config"], p["seed"], p["step"]))
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / CSV_NAME, FRONTIER_COLUMNS, rows)
    _write_csv(out / CURVES_NAME, CURVE_COLUMNS, curves)
    _write_csv(out / PRODUCTS_NAME, PRODUCT_COLUMNS, products)
    command = _command(quick, seeds, steps, tasks, out)
    table = format_table(rows, command, seeds=seeds, steps=steps, eval_every=eval_every, cycles=cycles,
                         elapsed=time.perf_counter() - started)
    table += ("\n### Finite-difference products against exact ones (digits CNN, default h, near the top "
              "eigenvector)\n\n" + format_product_errors(products) + "\n")
    (out / TABLE_NAME).write_text(table)
    written = [CSV_NAME, CURVES_NAME, PRODUCTS_NAME, TABLE_NAME]
    why_not = plot_frontier(rows, out / PLOT_NAME) if plot else "no plot (--no-plot)"
    if why_not:
        log(f"  [tracking] {why_not}")
    else:
        written.append(PLOT_NAME)
    return written


def _job_weight(cfg: TrackConfig) -> float:
    per = {"exact": 3, "compiled": 3, "ggn": 3, "finite_difference": 2, "forward_difference": 1}.get(cfg.hvp, 0)
    return 2 + per * cfg.power_iters / cfg.eig_interval


def _command(quick: bool, seeds: int, steps: int, tasks: tuple[str, ...], out: Path) -> str:
    parts = ["xsam bench --only tracking", f"--out {out}"]
    if quick:
        parts.append("--quick")
    parts += [f"--seeds {seeds}", f"--steps {steps}"]
    if tuple(tasks) != TASKS:
        parts.append(f"--tracking-tasks {','.join(tasks)}")
    return " ".join(parts)


def summarize(configs: list[TrackConfig], tasks, timing: dict, results: list[dict]) -> list[dict]:
    rows = []
    for task_name in tasks:
        for cfg in configs:
            if task_name not in cfg.tasks:
                continue
            runs = [r for r in results if r["task"] == task_name and r["config"] == cfg.name]
            t = timing[task_name][cfg.name]
            row = {"task": task_name, "config": cfg.name, "hvp": cfg.hvp,
                   "power_iters": cfg.power_iters if cfg.hvp not in ("sam", "streaming") else "",
                   "eig_interval": cfg.eig_interval if cfg.hvp not in ("sam", "streaming") else "",
                   "hvp_eval_mode": cfg.hvp_eval_mode if task_name != "mlp" and cfg.hvp != "sam" else "",
                   **{k: t[k] for k in ("seconds_per_step", "ratio_vs_sam", "ratio_min", "ratio_max", "unstable")}}
            if cfg.hvp == "sam":
                row.update(closure_per_step=2.0, loss_fn_per_step=0.0, products_per_step=0.0, evals_per_step=2.0,
                           seeds=0, points=0)
                rows.append(row)
                continue
            per_run = [statistics.fmean(p["quality"] for p in r["points"]) for r in runs]
            cos_run = [statistics.fmean(p["cos"] for p in r["points"]) for r in runs]
            worst = min(p["quality"] for r in runs for p in r["points"])
            counts = {k: statistics.fmean(r[k] for r in runs)
                      for k in ("closure_per_step", "loss_fn_per_step", "products_per_step")}
            row.update(counts, evals_per_step=sum(counts.values()), quality_mean=statistics.fmean(per_run),
                       quality_sd=statistics.stdev(per_run) if len(per_run) > 1 else 0.0, quality_worst=worst,
                       cos_mean=statistics.fmean(cos_run), cos_sd=statistics.stdev(cos_run) if len(cos_run) > 1 else 0.0,
                       seeds=len(runs), points=sum(len(r["points"]) for r in runs))
            rows.append(row)
    return rows


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def format_table(rows: list[dict], command: str, *, seeds: int, steps: int, eval_every: int, cycles: int,
                 elapsed: float) -> str:
    lines = [f"Command: `{command}` ({elapsed:.0f} s; torch {torch.__version__}, one thread per process).", "",
             f"{seeds} seed(s), {steps} steps, quality measured every {eval_every} steps; time: median over "
             f"{cycles} interleaved cycles of {TIMING_STEPS} steps, [min, max] of the per-cycle ratio to SAM "
             f"(* marks a range over {UNSTABLE_RANGE:.0%} of the median). Evaluations per step: closure "
             "calls + loss_fn calls + products from loss_fn (each counted as one; a product costs more "
             "than that, see the time column).", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        lines += [f"### {task}", "",
                  "| config | hvp | p | k | evals/step | time vs SAM [min, max] | quality (RQ / lambda_max) | "
                  "worst point | abs cos(v, v_top) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["task"] == task):
            time_cell = f"{r['ratio_vs_sam']:.2f} [{r['ratio_min']:.2f}, {r['ratio_max']:.2f}]" + \
                        ("*" if r["unstable"] else "")
            if r["hvp"] == "sam":
                quality = worst = cos = "-"
            else:
                quality = f"{r['quality_mean']:.3f} ± {r['quality_sd']:.3f}"
                worst = f"{r['quality_worst']:.2f}"
                cos = f"{r['cos_mean']:.3f} ± {r['cos_sd']:.3f}"
            hvp = r["hvp"] + (" (train-mode HVPs)" if r.get("hvp_eval_mode") is False else "")
            lines.append(f"| {r['config']} | {hvp} | {r['power_iters']} | {r['eig_interval']} | "
                         f"{r['evals_per_step']:.2f} | {time_cell} | {quality} | {worst} | {cos} |")
        lines.append("")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path) -> str | None:
    """Quality against time per step (vs SAM), one panel per task; None when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib)"
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 5), squeeze=False)
    colors = {"exact": "tab:blue", "finite_difference": "tab:orange", "forward_difference": "tab:green",
              "streaming": "tab:red"}
    markers = {1: "o", 2: "s", 5: "^", 20: "D", "": "*"}
    for ax, task in zip(axes[0], tasks):
        for r in rows:
            if r["task"] != task or r["hvp"] == "sam":
                continue
            train_mode = r.get("hvp_eval_mode") is False
            ax.errorbar(r["ratio_vs_sam"], r["quality_mean"], yerr=r["quality_sd"],
                        xerr=[[r["ratio_vs_sam"] - r["ratio_min"]], [r["ratio_max"] - r["ratio_vs_sam"]]],
                        fmt=markers.get(r["eig_interval"], "o"), color=colors.get(r["hvp"], "k"),
                        mfc="none" if train_mode else None, ms=8 if r["hvp"] == "streaming" else 6,
                        elinewidth=0.6, capsize=2, alpha=0.85)
            if r["power_iters"] != "":
                ax.annotate(f"p{r['power_iters']}", (r["ratio_vs_sam"], r["quality_mean"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
        ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.axvline(1.15, color="gray", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("wall time per step / SAM's (same run, interleaved)")
        ax.set_ylabel("quality: Rayleigh quotient of v on the large batch / its lambda_max")
        ax.set_title(f"{task}: mean over training and seeds")
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=h) for h, c in colors.items()]
    present = {r["eig_interval"] for r in rows}
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=f"k = {k}")
                for k, m in markers.items() if k != "" and k in present]
    if any(r.get("hvp_eval_mode") is False for r in rows):
        handles.append(plt.Line2D([], [], color="k", marker="^", ls="", mfc="none", label="train-mode HVPs"))
    handles.append(plt.Line2D([], [], color="gray", ls="--", label="1.15x SAM"))
    axes[0][-1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def main_section(args, *, no_plot: bool = False, log=print) -> list[str]:
    """The ``--only tracking`` section of ``xsam bench``: returns the names of the files written."""
    tasks = tuple(args.tracking_tasks) if args.tracking_tasks else TASKS
    return run_tracking(args.out, quick=args.quick, seeds=args.seeds, steps=args.steps, tasks=tasks,
                        workers=args.workers, plot=not no_plot, log=log)


if __name__ == "__main__":  # pragma: no cover - use `xsam bench --only tracking`
    sys.exit("run `xsam bench --only tracking`")
