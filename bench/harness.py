"""Benchmark harness: ``xsam bench [--quick] [--only ops,e2e,overhead,memory,tracking] [--out DIR]``.

Sections, each measured on one device per run:
- ops: every op of the op set and the optimizer-side part of an X-SAM step, on
  parameter sets shaped like ResNet-18, ViT-B/16, GPT-2 small and 1,000 small
  tensors, per available backend, against a ceiling measured at the same footprint,
  the reference backend, skilled foreach code and a davda54/sam-style per-parameter
  loop (bench/ops_bench.py, bench/baselines.py);
- e2e: seconds per training step of SGD, SAM and XSAM, interleaved (bench/e2e_bench.py);
- overhead: the fixed per-step cost of the optimizer objects: XSAM on 1,000 small tensors
  against one flat tensor, xsam.SAM against davda54/sam's SAM (bench/overhead_bench.py);
- memory: the tensors SAM/XSAM hold besides the model (and the peak on GPU);
- tracking (only when asked for, it trains for about an hour on two cores): the eigenvector's
  cost against its quality per HVP mode, power iterations and refresh interval (bench/tracking_bench.py).
Results: a table on the terminal, ``bench_results.csv``, ``bench_table.txt`` and
``bench_gbps.png`` (when matplotlib is installed) in ``--out``.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

SECTIONS = ("ops", "e2e", "overhead", "memory", "tracking")
DEFAULT_SECTIONS = ("ops", "e2e", "overhead", "memory")
CSV_NAME, TABLE_NAME, PLOT_NAME = "bench_results.csv", "bench_table.txt", "bench_gbps.png"


def build_parser() -> argparse.ArgumentParser:
    from xsam.cli_args import OneLineErrorParser, choices_list, number, output_dir

    from .e2e_bench import E2E_MODELS
    from .models import PARAMETER_SETS
    from .ops_bench import BACKENDS, OP_NAMES

    p = OneLineErrorParser(
        prog="xsam bench",
        description="Benchmark the xsam op set, the optimizer step end to end, and its memory.",
        epilog="Defaults fit the machine: full sizes on a GPU; on CPU each bandwidth parameter set is divided by "
               "the largest power of two that keeps its arrays beyond the last-level cache (ResNet-18 1, ViT-B/16 "
               "and GPT-2 8 with a 32 MiB L3), so a run takes about three minutes on two cores.")
    p.add_argument("--quick", action="store_true", help="a smoke run in seconds (tiny sizes, few repeats)")
    p.add_argument("--only", type=choices_list(SECTIONS, "section"), default=DEFAULT_SECTIONS, metavar="SECTIONS",
                   help=f"comma-separated sections to run, of {','.join(SECTIONS)} (default: "
                        f"{','.join(DEFAULT_SECTIONS)})")
    p.add_argument("--out", type=output_dir, default=None, help="output folder (default: results/bench)")
    p.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda when available, else cpu)")
    p.add_argument("--scale", type=number(float, 0.0, low_open=True), default=None,
                   help="divide the elements of every parameter tensor by this (default: 1 on GPU; on CPU per "
                        "set, beyond the last-level cache, many_small unscaled; 256 with --quick)")
    p.add_argument("--size", choices=("full", "small"), default=None,
                   help="shorthand: full = --scale 1, small = --scale 16")
    p.add_argument("--models", type=choices_list(PARAMETER_SETS, "parameter set"), default=None, metavar="SETS",
                   help=f"parameter sets for the op benchmarks, of {','.join(PARAMETER_SETS)} "
                        "(default: all; resnet18,many_small with --quick)")
    p.add_argument("--ops", type=choices_list(OP_NAMES, "op"), default=OP_NAMES, metavar="OPS",
                   help=f"ops to time, of {','.join(OP_NAMES)}")
    p.add_argument("--backends", type=choices_list(BACKENDS, "backend"), default=None, metavar="NAMES",
                   help=f"backends to time, of {','.join(BACKENDS)} (default: every available one)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"),
                   help="storage dtype of the op benchmarks (default float32)")
    p.add_argument("--e2e-models", type=choices_list(E2E_MODELS, "model"), default=None, metavar="MODELS",
                   help="end-to-end models, of small_cnn,cnn_32_64_128,resnet18_cifar (default: the two CNNs on CPU, "
                        "small_cnn and resnet18_cifar on GPU)")
    p.add_argument("--batch", type=number(int, 2), default=None,
                   help="end-to-end batch size, at least 2 (default 64 on CPU, 128 on GPU)")
    p.add_argument("--blocks", type=number(int, 1), default=None,
                   help="timed blocks (interleaved rounds) per op measurement (default 7, 3 with --quick)")
    p.add_argument("--rounds", type=number(int, 1), default=None,
                   help="interleaved rounds of the e2e and overhead sections (default 15 on CPU, 9 on GPU, 3 with "
                        "--quick)")
    p.add_argument("--no-plot", action="store_true", help="do not write the plot")
    from .tracking_bench import EXTRA_TASKS, TASKS as TRACKING_TASKS

    p.add_argument("--seeds", type=number(int, 1), default=None, help="tracking: seeds per configuration (default 3)")
    p.add_argument("--steps", type=number(int, 1), default=None, help="tracking: training steps per run (default 300)")
    p.add_argument("--workers", type=number(int, 1), default=2, help="tracking: processes for the quality runs")
    p.add_argument("--tracking-tasks", type=choices_list(TRACKING_TASKS + EXTRA_TASKS, "task"), default=None,
                   metavar="TASKS", help=f"tracking: tasks, of {','.join(TRACKING_TASKS + EXTRA_TASKS)} (default: "
                                        f"{','.join(TRACKING_TASKS)})")
    return p


def output_dir_default() -> Path:
    from xsam.cli_args import output_dir

    return output_dir("results/bench")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    import torch

    from . import e2e_bench, ops_bench, overhead_bench, report, tracking_bench
    from .models import PARAMETER_SETS, dram_scale, parameter_shapes

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as exc:
        parser.error(f"argument --device: {exc}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"argument --device: {device} is not supported; use cpu or cuda[:i]")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda asked for, but torch sees no CUDA device")
    if args.out is None:
        args.out = output_dir_default()
    on_gpu = device.type == "cuda"
    scale = args.scale or {"full": 1.0, "small": 16.0}.get(args.size or "", None)
    if scale is None and (args.quick or on_gpu):
        scale = 256.0 if args.quick else 1.0
    blocks = args.blocks or (3 if args.quick else 7)
    rounds = args.rounds or (3 if args.quick else (9 if on_gpu else 15))
    timing = dict(blocks=blocks, block_seconds=0.005 if args.quick else 0.05,
                  warmup_calls=1 if args.quick else 2)
    e2e_models = args.e2e_models or (("small_cnn",) if args.quick else ("small_cnn", "resnet18_cifar") if on_gpu
                                     else ("small_cnn", "cnn_32_64_128"))
    batch = args.batch or (16 if args.quick else (128 if on_gpu else 64))
    configs = e2e_bench.QUICK_CONFIGS if args.quick else (e2e_bench.GPU_CONFIGS if on_gpu else e2e_bench.DEFAULT_CONFIGS)
    dtype = getattr(torch, args.dtype)

    name = torch.cuda.get_device_name(device) if on_gpu else platform.processor() or platform.machine()
    llc = ops_bench.last_level_cache_bytes(device)
    scales = {m: scale or dram_scale(m, llc, dtype.itemsize) for m in PARAMETER_SETS}
    print(f"xsam bench on {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"last-level cache {'?' if llc is None else f'{llc / 2**20:g} MiB'}, scale "
          f"{', '.join(f'{m} 1/{s:g}' for m, s in scales.items())}, {blocks} blocks per op, {rounds} rounds")
    started = time.perf_counter()
    rows: list[dict] = []

    def save() -> str:
        # After every section, so a run cut short by a time limit still leaves its finished sections.
        table = report.format_tables(rows)
        report.write_csv(rows, args.out / CSV_NAME)
        (args.out / TABLE_NAME).write_text(table + "\n")
        return table

    if "ops" in args.only:
        names = args.models or (("resnet18", "many_small") if args.quick else tuple(PARAMETER_SETS))
        models = {m: parameter_shapes(m, scales[m]) for m in names}
        rows += ops_bench.run_ops(models, device, dtype, timing=timing, ops_to_run=args.ops, backends=args.backends)
        save()
    if "e2e" in args.only:
        rows += e2e_bench.run_e2e(e2e_models, device, batch=batch, configs=configs, rounds=rounds,
                                  backends=args.backends)
        save()
    if "overhead" in args.only:
        rows += overhead_bench.run_host(device, rounds=rounds, block_seconds=timing["block_seconds"],
                                        backends=args.backends)
        rows += overhead_bench.run_peer(rounds=rounds, block_seconds=timing["block_seconds"], backends=args.backends)
        save()
    if "memory" in args.only:
        rows += e2e_bench.run_memory(e2e_models, device, batch=batch, configs=configs)
    written = []
    if "tracking" in args.only:  # its own files (CPU, whatever --device says)
        written += tracking_bench.main_section(args, no_plot=args.no_plot)
        if args.only == ("tracking",):
            print(f"\nwrote {', '.join(str(args.out / w) for w in written)} in {time.perf_counter() - started:.0f} s")
            return 0
    table = save()
    print()
    print(table)
    written = [CSV_NAME, TABLE_NAME] + written
    if not args.no_plot and "ops" in args.only:
        why_not = report.plot_bandwidth(rows, args.out / PLOT_NAME)
        if why_not:
            print(f"xsam bench: {why_not}")
        else:
            written.append(PLOT_NAME)
    print(f"\nwrote {', '.join(str(args.out / w) for w in written)} in {time.perf_counter() - started:.0f} s")
    return 0
