"""Summaries, tables, CSVs and the plot of ``xsam experiment``.

Paired differences compare an arm with a reference arm seed by seed (same initial weights and
batches): mean, 95% Student-t interval, seeds on each side.
"""
from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass

from .run import LOSS_LEVELS
from .tasks import PUBLISHED

__all__ = ["Paired", "baselines_table", "common_levels", "comparisons", "format_paired", "format_table", "paired",
           "plot", "summarize", "write_csv"]

# Two-sided 95% quantiles of Student's t for 1-30 degrees of freedom (beyond: the normal 1.96).
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def _mean_std(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _diverged(run: dict) -> bool:
    return not math.isfinite(run["train_loss"])


REFERENCE_ARMS = ("sgd", "sam", "xsam-alpha0")


def common_levels(runs: list[dict], matched: list[dict]) -> dict[str, float]:
    """Per task, the lowest level every run of the reference arms reached (all arms where none ran)."""
    reached: dict[tuple, set] = {}
    for m in matched:
        reached.setdefault((m["task"], m["method"], m["seed"], m["v_sign"]), set()).add(m["level"])
    out = {}
    for task in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == task]
        common = set(LOSS_LEVELS)
        for r in [r for r in mine if r["method"] in REFERENCE_ARMS] or mine:
            common &= reached.get((r["task"], r["method"], r["seed"], r["v_sign"]), set())
        out[task] = min(common) if common else math.nan
    return out


def _with_reference(values: dict, task: str, method: str, ref: str, seed: int, sign: int) -> tuple:
    """(method's value, ref's value) at one seed; a reference without a start sign pairs with both signs."""
    return values.get((task, method, seed, sign)), values.get((task, ref, seed, sign), values.get((task, ref, seed, 0)))


def summarize(runs: list[dict], matched: list[dict], timing: list[dict], order: list[str],
              tasks: list[str] | None = None) -> list[dict]:
    """One row per (task, method, start sign): means and stds over seeds, timing, matched-loss sharpness."""
    levels = common_levels(runs, matched)
    at_level = {(m["task"], m["method"], m["seed"], m["v_sign"]): m["eigenvalue"] for m in matched
                if m["level"] == levels.get(m["task"])}
    timing_of = {(t["task"], t["method"]): t for t in timing}
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["method"], r["v_sign"]), []).append(r)
    rank = {m: i for i, m in enumerate(order)}
    task_rank = {t: i for i, t in enumerate(tasks or sorted({r["task"] for r in runs}))}
    out = []
    for (task, method, sign), rs in sorted(groups.items(), key=lambda kv: (task_rank.get(kv[0][0], 999),
                                                                          rank.get(kv[0][1], 999), -kv[0][2])):
        ok = [r for r in rs if not _diverged(r)]
        row = dict(task=task, method=method, v_sign=sign, seeds=len(rs), diverged=len(rs) - len(ok),
                   matched_level=levels.get(task, math.nan))
        for name in ("test_acc", "test_loss", "train_loss", "eigenvalue", "grad_angle_deg", "evals_per_step",
                     "hvps_per_step"):
            row[f"{name}_mean"], row[f"{name}_std"] = _mean_std([r[name] for r in ok])
        lam = [at_level[(task, method, r["seed"], sign)] for r in ok if (task, method, r["seed"], sign) in at_level]
        row["matched_eigenvalue_mean"], row["matched_eigenvalue_std"] = _mean_std(lam)
        row["reached_level"] = len(lam)
        # Paired with the normalised control and with SAM (same seed): seeds with a lower eigenvalue.
        for ref, col in (("xsam-alpha0", "lower_than_control"), ("sam", "lower_than_sam")):
            pairs = [_with_reference(at_level, task, method, ref, r["seed"], sign) for r in ok]
            pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
            row[col] = f"{sum(a < b for a, b in pairs)}/{len(pairs)}" if pairs and method != ref else ""
        if task == "cubic":
            for name in ("u0", "w0"):
                row[f"{name}_mean"], _ = _mean_std([r[name] for r in ok])
            row["v_sign_kept"] = sum(r.get("v_sign_end") == sign for r in ok) if sign else ""
        t = timing_of.get((task, method))
        row.update(ms_per_step=t["ms_per_step"] if t else math.nan, spread_ms=t["spread_ms"] if t else math.nan,
                   ratio_to_sam=t["ratio_to_sam"] if t else math.nan, timing_unstable=bool(t and t["unstable"]))
        out.append(row)
    return out


@dataclass(frozen=True)
class Paired:
    """``method`` minus ``reference``, seed by seed, for one task and metric."""

    task: str
    method: str
    reference: str
    metric: str  # test_acc, test_loss (cubic) or matched_eigenvalue
    v_sign: int
    differences: tuple[float, ...]  # in seed order

    @property
    def mean(self) -> float:
        return statistics.fmean(self.differences)

    @property
    def half_width(self) -> float:
        """Half the 95% confidence interval of the mean difference (Student t; nan for one seed)."""
        n = len(self.differences)
        if n < 2:
            return math.nan
        return (T975[n - 2] if n - 1 <= len(T975) else 1.96) * statistics.stdev(self.differences) / math.sqrt(n)

    @property
    def beyond_noise(self) -> bool:
        """The 95% interval excludes 0."""
        return abs(self.mean) > self.half_width

    @property
    def higher(self) -> int:
        return sum(d > 0 for d in self.differences)

    @property
    def lower(self) -> int:
        return sum(d < 0 for d in self.differences)

    def row(self) -> dict:
        return dict(asdict(self), differences=" ".join(f"{d:.4g}" for d in self.differences), seeds=len(
            self.differences), mean=self.mean, ci_low=self.mean - self.half_width,
            ci_high=self.mean + self.half_width, higher=self.higher, lower=self.lower, beyond_noise=self.beyond_noise)


def comparisons(methods: list[str]) -> list[tuple[str, str]]:
    """(method, reference) pairs: SAM against SGD (the positive control), every other arm against SAM and
    against the normalised control, and a per-layer arm against its own per-layer control (alpha 0)."""
    from .arms import parse_arm

    out = [("sam", "sgd")] if {"sam", "sgd"} <= set(methods) else []
    layer_controls = [m for m in methods if parse_arm(m).kind == "layerwise" and parse_arm(m).alpha == 0]
    for ref in ("sam", "xsam-alpha0"):
        out += [(m, ref) for m in methods if ref in methods and m not in ("sgd", "sam", ref)]
    out += [(m, layer_controls[0]) for m in methods if layer_controls and m not in layer_controls
            and parse_arm(m).kind == "layerwise"]
    return out


def paired(runs: list[dict], matched: list[dict], order: list[str]) -> list[Paired]:
    """The ``comparisons`` seed by seed, for the test metric and for lambda_max at L.

    A seed enters a comparison when both runs have the value (did not diverge; reached L); a
    reference without a start sign (SAM, the control) pairs with both signs of an arm on the
    cubic task.
    """
    levels = common_levels(runs, matched)
    at_level = {(m["task"], m["method"], m["seed"], m["v_sign"]): m["eigenvalue"] for m in matched
                if m["level"] == levels.get(m["task"])}
    final = {(r["task"], r["method"], r["seed"], r["v_sign"]): r for r in runs if not _diverged(r)}
    rank = {m: i for i, m in enumerate(order)}
    out = []
    for task in dict.fromkeys(r["task"] for r in runs):
        metric = "test_loss" if task == "cubic" else "test_acc"
        mine = [r for r in runs if r["task"] == task]
        methods = sorted({r["method"] for r in mine}, key=lambda m: rank.get(m, 999))
        seeds = sorted({r["seed"] for r in mine})
        for method, ref in comparisons(methods):
            for sign in sorted({r["v_sign"] for r in mine if r["method"] == method}, reverse=True):
                for name, values in ((metric, {k: r[metric] for k, r in final.items()}),
                                     ("matched_eigenvalue", at_level)):
                    pairs = [_with_reference(values, task, method, ref, seed, sign) for seed in seeds]
                    diffs = [value - base for value, base in pairs if value is not None and base is not None]
                    if diffs:
                        out.append(Paired(task, method, ref, name, sign, tuple(diffs)))
    return out


def format_paired(pairs: list[Paired]) -> str:
    """Per task: each arm minus SAM and minus the control (SAM minus SGD first), mean [95% CI], seeds."""
    lines = []
    for task in dict.fromkeys(p.task for p in pairs):
        mine = [p for p in pairs if p.task == task]
        cubic = task == "cubic"
        acc = "test loss" if cubic else "test acc (points)"
        scale = 1.0 if cubic else 100.0
        lines += [f"**{task}**: paired differences, method minus reference, mean [95% CI] (seeds above / below 0)",
                  "", f"| method | reference | Δ {acc} | Δ λmax at L |", "|---|---|---|---|"]
        by_key = {(p.method, p.v_sign, p.reference, p.metric): p for p in mine}
        for method, sign, ref in dict.fromkeys((p.method, p.v_sign, p.reference) for p in mine):
            cells = []
            for metric, metric_scale in (("test_loss" if cubic else "test_acc", scale), ("matched_eigenvalue", 1.0)):
                p = by_key.get((method, sign, ref, metric))
                cells.append("–" if p is None else _interval(p, metric_scale))
            label = method + {1: " (+v)", -1: " (−v)", 0: ""}[sign]
            lines.append(f"| {label} | {ref} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def _interval(p: Paired, scale: float) -> str:
    bold = "**" if p.beyond_noise else ""  # the interval excludes 0
    ci = "" if math.isnan(p.half_width) else (f" [{scale * (p.mean - p.half_width):+.3g}, "
                                               f"{scale * (p.mean + p.half_width):+.3g}]")
    return f"{bold}{scale * p.mean:+.3g}{ci}{bold} ({p.higher}/{p.lower})"


def _pm(mean, std, fmt="{:.3g}"):
    if math.isnan(mean):
        return "–"
    return fmt.format(mean) + ("" if math.isnan(std) else " ± " + fmt.format(std))


def format_table(summary: list[dict]) -> str:
    lines = []
    for task in dict.fromkeys(r["task"] for r in summary):
        rows = [r for r in summary if r["task"] == task]
        level = rows[0]["matched_level"]
        cubic = task == "cubic"
        metric = "test loss" if cubic else "test acc (%)"
        lines += [f"**{task}** (matched training loss L = {level:.3g})", "",
                  f"| method |{' v sign |' if cubic else ''} seeds | {metric} | λmax end | λmax at L | "
                  "lower than control at L | lower than SAM at L | grad–v angle end (°) | grad evals/step | "
                  "HVPs/step | ms/step (× SAM) |",
                  "|" + "---|" * (11 + cubic)]
        for r in rows:
            metric = (_pm(r["test_loss_mean"], r["test_loss_std"], "{:.4f}") if cubic else
                      _pm(100 * r["test_acc_mean"], 100 * r["test_acc_std"], "{:.2f}"))
            seeds = f"{r['seeds']}" + (f" ({r['diverged']} diverged)" if r["diverged"] else "")
            timing = "–" if math.isnan(r["ms_per_step"]) else (
                f"{r['ms_per_step']:.2f} ± {r['spread_ms'] / 2:.2f}"
                + ("" if math.isnan(r["ratio_to_sam"]) else f" (× {r['ratio_to_sam']:.2f})")
                + (" unstable" if r["timing_unstable"] else ""))
            sign = {1: " + |", -1: " − |", 0: " |"}[r["v_sign"]] if cubic else ""
            ok = r["seeds"] - r["diverged"]
            reached = "" if r["reached_level"] == ok else f" ({r['reached_level']}/{ok} reached L)"
            lines.append(
                f"| {r['method']} |{sign} {seeds} | {metric} | {_pm(r['eigenvalue_mean'], r['eigenvalue_std'])} "
                f"| {_pm(r['matched_eigenvalue_mean'], r['matched_eigenvalue_std'])}{reached} "
                f"| {r['lower_than_control']} "
                f"| {r['lower_than_sam']} | {_pm(r['grad_angle_deg_mean'], r['grad_angle_deg_std'], '{:.1f}')} "
                f"| {r['evals_per_step_mean']:.2f} | {r['hvps_per_step_mean']:.2f} | {timing} |")
        lines.append("")
    return "\n".join(lines)


def baselines_table(summary: list[dict]) -> str:
    """SGD's test accuracy next to the published one, where there is one."""
    lines = ["| task (model) | SGD test acc here (%) | published (%) |", "|---|---|---|"]
    for r in summary:
        if r["method"] == "sgd" and r["task"] in PUBLISHED:
            model = "MLP" if r["task"].endswith("mlp") else "CNN"
            lines.append(f"| {r['task']} ({model}) | {_pm(100 * r['test_acc_mean'], 100 * r['test_acc_std'], '{:.2f}')}"
                         f" | about {100 * PUBLISHED[r['task']]:.0f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def write_csv(path, rows: list[dict]) -> None:
    """The rows as CSV (an empty file when there are none, e.g. no loss level was reached)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        if not rows:
            return
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows)


def plot(summary: list[dict], curves: list[dict], path) -> bool:
    """Per task: lambda_max at matched loss and at the end per arm, lambda_max over epochs; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(dict.fromkeys(r["task"] for r in summary))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(16, 4.5 * len(tasks)), squeeze=False)
    for (ax_bar, ax_curve), task in zip(axes, tasks):
        rows = [r for r in summary if r["task"] == task]
        labels = [r["method"] + {1: " (+v)", -1: " (-v)", 0: ""}[r["v_sign"]] for r in rows]
        xs = range(len(rows))
        for offset, key, name in ((-0.2, "matched_eigenvalue", "at matched loss"), (0.2, "eigenvalue", "at the end")):
            ax_bar.bar([x + offset for x in xs], [r[f"{key}_mean"] for r in rows], width=0.4,
                       yerr=[0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in rows], capsize=2,
                       label=name)
        ax_bar.set_xticks(list(xs), labels, rotation=60, ha="right", fontsize=7)
        ax_bar.set_yscale("log")
        ax_bar.set(title=f"{task}: top Hessian eigenvalue (mean ± std over seeds; L = {rows[0]['matched_level']:.3g})",
                   ylabel="λmax")
        ax_bar.legend(fontsize=8)
        shown = [m for m in ("sgd", "sam", "xsam-alpha0", "xsam-signed-0.2", "xsam-scaled-signed-1.0",
                             "eigensam-0.2", "eigensam-0.5", "layerwise-signed-0", "layerwise-signed-0.2")
                 if any(c["method"] == m for c in curves)]
        for m in shown:
            cs = [c for c in curves if c["task"] == task and c["method"] == m and c["v_sign"] in (0, 1)]
            epochs = sorted({c["epoch"] for c in cs})
            means = [_mean_std([c["eigenvalue"] for c in cs if c["epoch"] == e])[0] for e in epochs]
            ax_curve.plot(epochs, means, marker="o", ms=3, label=m)
        ax_curve.set_yscale("log")
        ax_curve.set(title=f"{task}: λmax over training (fixed batch)", xlabel="epoch", ylabel="λmax")
        ax_curve.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return True
