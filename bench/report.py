"""Terminal tables, the CSV file, the GB/s plot, and the README summary.

``python -m xsam.bench.report results/bench/bench_results.csv`` prints the Markdown tables of
the README's "Benchmarks" section from a finished run.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .timing import UNSTABLE_SPREAD, UNSTABLE_TIME_SPREAD

COLUMNS = [
    "section", "model", "op", "impl", "device", "dtype", "n_tensors", "n_elements", "bytes_moved", "footprint_bytes",
    "memory", "median_s", "q1_s", "q3_s", "min_s", "max_s", "spread", "blocks", "calls_per_block",
    "gb_per_s", "ceiling_gb_per_s", "ceiling_spread", "fraction_of_ceiling", "speedup_vs_reference",
    "speedup_vs_foreach", "speedup_vs_loop", "best_baseline", "speedup_vs_best_baseline",
    "ratio", "ratio_q1", "ratio_q3", "ratio_to", "unstable",
    "param_bytes", "state_bytes", "base_state_bytes", "state_over_params",
    "peak_extra_bytes", "peak_over_params", "note",
]
REFERENCE_TARGET = 1.15  # the reference backend within this factor of the skilled foreach baseline


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    """Rows of ``write_csv`` back, numbers as numbers and empty cells dropped."""
    rows = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            row = {}
            for k, v in raw.items():
                if v == "":
                    continue
                try:
                    row[k] = int(v) if v.lstrip("-").isdigit() else float(v)
                except ValueError:
                    row[k] = {"True": True, "False": False}.get(v, v)
            rows.append(row)
    return rows


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def _table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.rjust(w) if i >= 3 else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for line in lines:
        out.append("  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))))
    return "\n".join(out)


def _pct(v) -> str:
    return "" if v is None else f"{v:.0%}"


def _flag(r: dict) -> str:
    return "UNSTABLE" if r.get("unstable") else ""


def _ops_table(rows: list[dict]) -> str:
    header = ["model", "op", "impl", "data", "median ms", "spread", "GB/s", "ceiling GB/s", "ceil spread",
              "of ceiling", "x vs ref", "x vs foreach", "x vs loop", "x vs best baseline"]
    lines = [[r["model"], r["op"], r["impl"], r["memory"], _fmt(r["median_s"] * 1e3, ".3f"),
              _pct(r["spread"]) + ("*" if r["spread"] > UNSTABLE_SPREAD else ""),
              _fmt(r["gb_per_s"], ".1f"), _fmt(r["ceiling_gb_per_s"], ".1f"), _pct(r["ceiling_spread"]),
              _pct(r["fraction_of_ceiling"]), _fmt(r.get("speedup_vs_reference"), ".2f"),
              _fmt(r.get("speedup_vs_foreach"), ".2f"), _fmt(r.get("speedup_vs_loop"), ".2f"),
              "" if r.get("best_baseline") is None else f"{r['speedup_vs_best_baseline']:.2f} ({r['best_baseline']})"]
             for r in rows]
    first = rows[0]
    title = (f"== Op set on {first['device']} ({first['dtype']}). GB/s: byte model over the median time; ceiling: "
             "PyTorch's stream kernels on the same traffic at the same footprint (write-allocate counted); data: "
             "where the footprint fits (cache rows measure cache, not DRAM, bandwidth); spread: IQR over median; "
             "'x vs': speed-up over that implementation, same run (>1 = faster)")
    noisy = sum(r["spread"] > UNSTABLE_SPREAD for r in rows)
    note = (f"\n{noisy} of {len(rows)} rows (*) have a spread above {UNSTABLE_SPREAD:.0%}: the machine was busy, "
            "their medians may not repeat" if noisy else "")
    return title + "\n" + _table(header, lines) + "\n" + reference_check(rows) + note


def reference_check(rows: list[dict]) -> str:
    """One line: the reference backend against the skilled foreach baseline (target: within 1.15x)."""
    ratios = [(1.0 / r["speedup_vs_foreach"], r["model"], r["op"]) for r in rows
              if r["impl"] == "reference" and r.get("speedup_vs_foreach")]
    if not ratios:
        return "reference vs skilled_foreach: not measured"
    worst = max(ratios)
    over = [f"{m}/{o} {x:.2f}x" for x, m, o in ratios if x > REFERENCE_TARGET]
    verdict = "all within" if not over else f"OVER on {', '.join(over)};"
    return (f"reference time over skilled_foreach time (target <= {REFERENCE_TARGET}x): {verdict} "
            f"worst {worst[0]:.2f}x ({worst[1]}/{worst[2]})")


def _ratio_cell(r: dict) -> str:
    if r.get("ratio") is None:
        return ""
    if r["ratio"] == r["ratio_q1"] == r["ratio_q3"] == 1.0:
        return "(baseline)"  # the row the others are divided by
    return f"{r['ratio']:.2f} [{r['ratio_q1']:.2f}-{r['ratio_q3']:.2f}]"


def format_tables(rows: list[dict]) -> str:
    parts = []
    ops_rows = [r for r in rows if r["section"] == "ops"]
    if ops_rows:
        parts.append(_ops_table(ops_rows))
    e2e = [r for r in rows if r["section"] == "e2e"]
    if e2e:
        header = ["model", "optimizer", "backend", "ms/step", "spread", "min ms", "max ms", "vs SAM [IQR]", "flag"]
        lines = [[r["model"], r["op"], r["impl"], _fmt(r["median_s"] * 1e3, ".2f"), _pct(r["spread"]),
                  _fmt(r["min_s"] * 1e3, ".2f"), _fmt(r["max_s"] * 1e3, ".2f"), _ratio_cell(r), _flag(r)]
                 for r in e2e]
        parts.append(f"== End to end on {e2e[0]['device']}: milliseconds per training step ({e2e[0]['note']}); "
                     "'vs SAM': median of the round-by-round ratios to SAM [quartiles]\n" + _table(header, lines)
                     + _stability_note(e2e))
    over = [r for r in rows if r["section"] == "overhead"]
    if over:
        header = ["model", "op", "impl", "dtype", "median ms", "spread", "ratio [IQR]", "ratio to", "flag"]
        lines = [[r["model"], r["op"], r["impl"], r["dtype"], _fmt(r["median_s"] * 1e3, ".3f"), _pct(r["spread"]),
                  _ratio_cell(r), r["ratio_to"], _flag(r)] for r in over]
        parts.append(f"== Fixed per-step cost on {over[0]['device']}: the optimizer side of X-SAM on 1,000 small "
                     "tensors against one flat tensor; whole SAM steps of xsam.SAM against davda54/sam's SAM "
                     "(ratios round by round, median [quartiles]; >1 = slower)\n" + _table(header, lines)
                     + _stability_note(over))
    mem = [r for r in rows if r["section"] == "memory"]
    if mem:
        header = ["model", "optimizer", "backend", "param MB", "state MB", "state/params", "momentum MB",
                  "peak extra MB", "peak/params"]
        lines = [[r["model"], r["op"], r["impl"], _fmt(r["param_bytes"] / 1e6, ".2f"),
                  _fmt(r["state_bytes"] / 1e6, ".2f"), _fmt(r["state_over_params"], ".2f"),
                  _fmt(r["base_state_bytes"] / 1e6, ".2f"),
                  _fmt(r.get("peak_extra_bytes") and r["peak_extra_bytes"] / 1e6, ".2f"),
                  _fmt(r.get("peak_over_params"), ".2f")] for r in mem]
        parts.append(f"== Memory on {mem[0]['device']}: tensors held between steps by the SAM/XSAM wrapper "
                     "(eigenvector, saved weights) besides the base optimizer's momentum\n" + _table(header, lines))
    return "\n\n".join(parts)


def _stability_note(rows: list[dict]) -> str:
    if not any(r.get("unstable") for r in rows):
        return ""
    return (f"\nUNSTABLE: the round-by-round ratio spreads over more than {UNSTABLE_SPREAD:.0%} of its median, or "
            f"a time over more than {UNSTABLE_TIME_SPREAD:.0%}: the machine was busy and these numbers may not "
            "repeat. Rerun on an idle machine.")


def plot_bandwidth(rows: list[dict], path: Path) -> str | None:
    """Bar chart of GB/s per op and implementation, one panel per parameter set; None when no matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display on benchmark machines
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'xsam[plot]'): no plot written"
    ops_rows = [r for r in rows if r["section"] == "ops"]
    if not ops_rows:
        return "no op rows to plot"
    panels = list(dict.fromkeys((r["model"], r["device"], r["dtype"]) for r in ops_rows))
    ops = list(dict.fromkeys(r["op"] for r in ops_rows))
    impls = list(dict.fromkeys(r["impl"] for r in ops_rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    width = 0.8 / (len(impls) + 1)
    for ax, (model, device, dtype) in zip(axes[:, 0], panels):
        here = {(r["op"], r["impl"]): r for r in ops_rows if (r["model"], r["device"], r["dtype"]) == (model, device, dtype)}
        for j, impl in enumerate(impls):
            xs = [i + j * width for i, op in enumerate(ops) if (op, impl) in here]
            ys = [here[(op, impl)]["gb_per_s"] for op in ops if (op, impl) in here]
            ax.bar(xs, ys, width, label=impl)
        ceil_x = [i + len(impls) * width for i, op in enumerate(ops) if any((op, m) in here for m in impls)]
        ceil_y = [next(here[(op, m)] for m in impls if (op, m) in here)["ceiling_gb_per_s"]
                  for op in ops if any((op, m) in here for m in impls)]
        ax.bar(ceil_x, ceil_y, width, color="none", edgecolor="black", hatch="//", label="ceiling (stream kernels)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))], ops, fontsize=8)
        ax.set_ylabel("GB/s")
        memory = "/".join(sorted({r["memory"] for r in here.values()}))
        ax.set_title(f"{model} on {device} ({dtype}); data in {memory}", fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls) + 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----- the README summary ---------------------------------------------------------------------
SET_NAMES = {"resnet18": "ResNet-18", "vit_b16": "ViT-B/16", "gpt2_small": "GPT-2 small",
             "many_small": "1,000 small tensors"}


def markdown_summary(rows: list[dict]) -> str:
    """The README tables: the X-SAM step per parameter set, end to end, and the fixed per-step costs."""
    parts = []
    steps = [r for r in rows if r["section"] == "ops" and r["op"] == "xsam_step"]
    if steps:
        baselines = ["reference", "skilled_foreach", "per_param_loop"]
        kernels = [i for i in dict.fromkeys(r["impl"] for r in steps) if i not in baselines]
        impls = baselines + kernels
        header = (["parameter set", "data"] + [f"{i} ms" for i in impls]
                  + [f"{k} vs best baseline" for k in kernels] + [f"{k} of ceiling" for k in kernels])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for model in dict.fromkeys(r["model"] for r in steps):
            here = {r["impl"]: r for r in steps if r["model"] == model}
            first = next(iter(here.values()))
            cells = [f"{SET_NAMES.get(model, model)} ({first['n_tensors']} tensors, {first['n_elements'] / 1e6:.3g}M)",
                     first["memory"]]
            cells += [f"{here[i]['median_s'] * 1e3:.3g}" if i in here else "" for i in impls]
            cells += [f"{here[k]['speedup_vs_best_baseline']:.2f}x ({here[k]['best_baseline']})" if k in here else ""
                      for k in kernels]
            cells += [f"{here[k]['fraction_of_ceiling']:.0%}" if k in here else "" for k in kernels]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    ops_rows = [r for r in rows if r["section"] == "ops"]
    if ops_rows:
        parts.append(reference_check(ops_rows))
    e2e = [r for r in rows if r["section"] == "e2e"]
    if e2e:
        lines = ["| model | optimizer | backend | ms/step | vs SAM, median [quartiles] |", "|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['op']} | {r['impl']} | {r['median_s'] * 1e3:.2f} | "
                  f"{_ratio_cell(r)}{' UNSTABLE' if r.get('unstable') else ''} |" for r in e2e]
        parts.append("\n".join(lines))
    over = [r for r in rows if r["section"] == "overhead"]
    if over:
        lines = ["| measurement | implementation | dtype | ms | ratio, median [quartiles] | ratio to |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {r['op'] if r['impl'] == '-' else r['op'] + ' ' + r['impl']} | {r['dtype']} | "
                  f"{r['median_s'] * 1e3:.3f} | {_ratio_cell(r)}{' UNSTABLE' if r.get('unstable') else ''} | "
                  f"{r['ratio_to']} |" for r in over]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print("usage: python -m xsam.bench.report BENCH_RESULTS_CSV\n\nPrints the README's markdown tables "
              "from the bench_results.csv that `xsam bench` wrote.", file=sys.stderr if len(sys.argv) != 2 else sys.stdout)
        sys.exit(0 if len(sys.argv) == 2 else 2)
    print(markdown_summary(read_csv(Path(sys.argv[1]))))
