"""Terminal tables, the CSV file and the GB/s plot."""
from __future__ import annotations

import csv
from pathlib import Path

COLUMNS = [
    "section", "model", "op", "impl", "device", "dtype", "n_tensors", "n_elements", "bytes_moved",
    "median_s", "q1_s", "q3_s", "min_s", "max_s", "blocks", "calls_per_block",
    "gb_per_s", "copy_gb_per_s", "fraction_of_copy_bw", "speedup_vs_reference", "speedup_vs_loop",
    "ratio_vs_sam", "param_bytes", "state_bytes", "base_state_bytes", "state_over_params",
    "peak_extra_bytes", "peak_over_params", "note",
]


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})


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


def format_tables(rows: list[dict]) -> str:
    parts = []
    ops_rows = [r for r in rows if r["section"] == "ops"]
    if ops_rows:
        header = ["model", "op", "impl", "median ms", "IQR ms", "GB/s", "copy GB/s", "of copy",
                  "x vs ref", "x vs loop"]
        lines = [[r["model"], r["op"], r["impl"], _fmt(r["median_s"] * 1e3, ".3f"),
                  _fmt((r["q3_s"] - r["q1_s"]) * 1e3, ".3f"), _fmt(r["gb_per_s"], ".1f"),
                  _fmt(r["copy_gb_per_s"], ".1f"), _fmt(r["fraction_of_copy_bw"], ".0%"),
                  _fmt(r.get("speedup_vs_reference"), ".2f"), _fmt(r.get("speedup_vs_loop"), ".2f")]
                 for r in ops_rows]
        first = ops_rows[0]
        parts.append(f"== Op set on {first['device']} ({first['dtype']}); GB/s from the byte model, "
                     "'of copy': share of a measured copy_ of the same bytes, 'x vs': speed-up (>1 = faster)\n"
                     + _table(header, lines))
    e2e = [r for r in rows if r["section"] == "e2e"]
    if e2e:
        header = ["model", "optimizer", "backend", "s/step", "IQR s", "min s", "max s", "vs SAM"]
        lines = [[r["model"], r["op"], r["impl"], _fmt(r["median_s"], ".4f"), _fmt(r["q3_s"] - r["q1_s"], ".4f"),
                  _fmt(r["min_s"], ".4f"), _fmt(r["max_s"], ".4f"), _fmt(r.get("ratio_vs_sam"), ".2f")]
                 for r in e2e]
        parts.append(f"== End to end on {e2e[0]['device']}: seconds per training step "
                     f"({e2e[0]['note']})\n" + _table(header, lines))
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
        copy_x = [i + len(impls) * width for i, op in enumerate(ops) if any((op, m) in here for m in impls)]
        copy_y = [next(here[(op, m)] for m in impls if (op, m) in here)["copy_gb_per_s"]
                  for op in ops if any((op, m) in here for m in impls)]
        ax.bar(copy_x, copy_y, width, color="none", edgecolor="black", hatch="//", label="copy_ (same bytes)")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(ops))], ops, fontsize=8)
        ax.set_ylabel("GB/s")
        ax.set_title(f"{model} on {device} ({dtype})", fontsize=9)
        ax.legend(fontsize=7, ncol=len(impls) + 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
