"""The command line of ``xsam experiment``."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict

import torch

from ..cli_args import OneLineErrorParser, number, output_dir
from .arms import DEFAULT_ARMS, parse_arm
from .report import baselines_table, format_paired, format_table, paired, plot, summarize, write_csv
from .run import QUICK, run_one, settings_for
from .tasks import TASKS
from .timing import time_arms

__all__ = ["QUICK_ARMS", "build_parser", "main"]

DEFAULT_TASKS = ("mnist1d", "mnist", "digits", "mnist1d-mlp", "cubic")
QUICK_ARMS = ("sgd", "sam", "xsam-alpha0", "xsam-signed-0.2", "xsam-scaled-signed-1.0", "eigensam-0.2")
BASELINE_ONLY = {"mnist1d-mlp": ("sgd",)}  # the MLP is there to check the data against the published number

SETTING_TYPES = {  # in the order of Settings' fields (and of --help)
    "epochs": number(int, 1), "batch_size": number(int, 2), "lr": number(float, 0.0, low_open=True),
    "momentum": number(float, 0.0, 1.0), "weight_decay": number(float, 0.0), "rho": number(float, 0.0),
    "asam_rho": number(float, 0.0), "eig_interval": number(int, 1), "power_iters": number(int, 1),
    "eval_every": number(int, 1), "eig_batch": number(int, 2), "eig_tol": number(float, 0.0, low_open=True),
    "eig_max_iters": number(int, 2),
}


def _arm(text: str) -> str:
    try:
        parse_arm(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return text


def build_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(prog="xsam experiment",
                           description="SGD, SAM, the normalised control, X-SAM (every correction, several alpha, "
                                       "at SAM's scale, per layer) and Eigen-SAM on offline data: accuracy, "
                                       "sharpness at the end and at matched training loss, paired over seeds, "
                                       "gradient-eigenvector angle, cost")
    p.add_argument("--quick", action="store_true",
                   help=f"CI-sized run: digits and cubic, 1 seed, {QUICK['epochs']} epochs, arms "
                        f"{' '.join(QUICK_ARMS)} (under a minute)")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=None,
                   help="default: " + " ".join(DEFAULT_TASKS) + " (--quick: digits cubic)")
    p.add_argument("--methods", nargs="+", type=_arm, default=None,
                   help="arms (default: " + " ".join(DEFAULT_ARMS) + "); names: sgd, sam, asam, xsam-alpha0, "
                        "xsam-<rule>-<alpha>, xsam-scaled-<rule>-<alpha>, layerwise-<rule>-<alpha>, "
                        "eigensam-<alpha>")
    p.add_argument("--seeds", type=number(int, 1), default=None, help="number of seeds (default 5; --quick: 1)")
    p.add_argument("--out", type=output_dir, default="xsam-experiment", help="output folder (created)")
    p.add_argument("--workers", type=number(int, 1), default=1, help="parallel runs (processes, one thread each)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG (also skipped without matplotlib)")
    p.add_argument("--timing-rounds", type=number(int, 0), default=None,
                   help="rounds of the interleaved timing phase per task (default 7, --quick 2; 0 skips it)")
    p.add_argument("--from-raw", nargs="+", default=None, metavar="RAW_JSON",
                   help="train nothing: report the runs saved in these raw.json files (of earlier runs, e.g. one "
                        "per task) together; --tasks and --methods then only select and order them")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "native", "triton"))
    for name, kind in SETTING_TYPES.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help="for every task (default: per task, xsam.experiment.run.TASK_SETTINGS)")
    return p


def _run_job(job):
    task, method, seed, settings, sign = job
    torch.set_num_threads(1)  # one worker per core; tiny models gain nothing from intra-op threads
    return run_one(task, method, seed, settings, sign)


def _jobs(arms_of, n_seeds, settings):
    jobs = []
    for task, arms in arms_of.items():
        for seed in range(n_seeds):
            for m in arms:
                arm = parse_arm(m)  # the control (alpha 0) does not use v: one sign is enough
                signs = (1, -1) if task == "cubic" and arm.has_signed_v and arm.alpha > 0 else (0,)
                jobs += [(task, m, seed, settings[task], sign) for sign in signs]
    return jobs


def _load_raw(paths) -> list[dict]:
    results = []
    for path in paths:
        try:
            with open(path) as f:
                results += json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"xsam experiment: --from-raw {path}: {e} (give the raw.json an earlier run wrote)")
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    overrides = {name: getattr(args, name) for name in SETTING_TYPES}
    saved = _load_raw(args.from_raw) if args.from_raw else None
    if saved is not None:
        ran_tasks = list(dict.fromkeys(r["run"]["task"] for r in saved))
        tasks = [t for t in (args.tasks or TASKS) if t in ran_tasks]
        methods = list(dict.fromkeys(args.methods or (r["run"]["method"] for r in saved)))
        saved = [r for r in saved if r["run"]["task"] in tasks and r["run"]["method"] in methods]
    else:
        tasks = args.tasks or (["digits", "cubic"] if args.quick else list(DEFAULT_TASKS))
        methods = list(dict.fromkeys(args.methods or (QUICK_ARMS if args.quick else DEFAULT_ARMS)))
    n_seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    rounds = args.timing_rounds if args.timing_rounds is not None else (2 if args.quick else 7)
    settings = {t: settings_for(t, args.quick, backend=args.backend, **overrides) for t in tasks}
    arms_of = {t: [m for m in methods if m in BASELINE_ONLY.get(t, methods)] for t in tasks}
    jobs = [] if saved is not None else _jobs(arms_of, n_seeds, settings)
    n_runs = len(jobs) if saved is None else len(saved)
    print(f"xsam experiment: {n_runs} runs ({', '.join(tasks)}; {len(methods)} arms; {n_seeds} seed(s)); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs", flush=True)
    for t in tasks:
        print(f"  {t}: {asdict(settings[t])}", flush=True)
    started = time.perf_counter()
    results = []

    def report(job, result):
        r = result["run"]
        sign = f" v{'+' if job[4] > 0 else '-'}" if job[4] else ""
        metric = f"test loss {r['test_loss']:.4g}" if job[0] == "cubic" else f"test acc {100 * r['test_acc']:.2f}%"
        print(f"  {job[0]:11s} {job[1]:24s} seed {job[2]}{sign}: {metric}  train loss {r['train_loss']:.3g}  "
              f"lambda_max {r['eigenvalue']:.4g}  {r['train_time_s']:.0f}s", flush=True)
        results.append(result)

    if saved is not None:
        results += saved
    elif args.workers == 1:
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
    training_s = time.perf_counter() - started
    with open(os.path.join(args.out, "raw.json"), "w") as f:  # everything measured, before the report
        json.dump(results, f)
    timing = []
    if rounds:
        for t in tasks:  # after the training runs, alone in this process (other processes' load remains)
            timing += time_arms(t, arms_of[t], settings[t], cycles=rounds)
    order = list(methods)
    key = lambda r: (tasks.index(r["task"]), order.index(r["method"]), r["seed"], -r["v_sign"])
    runs = sorted((res["run"] for res in results), key=key)
    curves = sorted((c for res in results for c in res["curve"]), key=lambda c: (*key(c), c["epoch"]))
    matched = sorted((m for res in results for m in res["matched"]), key=lambda m: (*key(m), -m["level"]))
    summary = summarize(runs, matched, timing, order, tasks)
    pairs = paired(runs, matched, order)
    out = args.out
    for name, rows in (("runs", runs), ("curves", curves), ("matched", matched), ("timing", timing),
                       ("summary", summary), ("paired", [p.row() for p in pairs])):
        write_csv(os.path.join(out, f"{name}.csv"), rows)
    table = format_table(summary) + "\n" + format_paired(pairs)
    baselines = baselines_table(summary)
    loads = sorted({(t["load_before"], t["load_after"]) for t in timing})
    load_note = ("Load average (1 min) during the timing phase: " + ", ".join(f"{a:.1f} -> {b:.1f}" for a, b in loads)
                 + f" on {os.cpu_count()} CPUs.") if loads else ""
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + "\n" + (baselines + "\n\n" if baselines else "") + load_note + "\n")
    print("", table, baselines, load_note, sep="\n")
    if args.no_plots:
        print("plots skipped (--no-plots)")
    elif plot(summary, curves, os.path.join(out, "experiment.png")):
        print(f"plot: {os.path.join(out, 'experiment.png')}")
    else:
        print("plots skipped: matplotlib is not installed (pip install matplotlib, or the package's "
              "'experiment' extra)", file=sys.stderr)
    print(f"wrote {out}/runs.csv, curves.csv, matched.csv, timing.csv, summary.csv, paired.csv, table.md: training "
          f"{training_s:.0f} s, total {time.perf_counter() - started:.0f} s")
    return 0
