"""The ``xsam`` command line: ``xsam demo``, ``xsam bench``, ``xsam experiment``, ``xsam info``."""
from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import platform

    import torch

    import xsam
    from xsam.ops import describe

    print(f"xsam {xsam.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()} (torch built for CUDA {torch.version.cuda})")
    width = max(len(name) for name, _, _ in describe())
    for name, device, status in describe():
        print(f"  {name:<{width}}  {device:<6}  {status}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from xsam.demo import main as demo_main

    return demo_main(args.demo_args)


def _bench(args: argparse.Namespace) -> int:
    from xsam.bench import main as bench_main

    return bench_main(args.bench_args)


def _experiment(args: argparse.Namespace) -> int:
    from xsam.experiment import main as experiment_main

    return experiment_main(args.experiment_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # argparse's REMAINDER does not capture arguments that start with "-" (`xsam experiment --quick`
    # would be rejected), so the experiment's own parser gets everything after its name.
    if argv[:1] == ["experiment"]:
        from xsam.experiment import main as experiment_main

        return experiment_main(argv[1:])
    parser = argparse.ArgumentParser(prog="xsam", description="X-SAM for PyTorch: demo, benchmarks, backend info")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="train SGD, SAM and X-SAM on the bundled digits data (CPU, ~2 min)",
                       add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_demo)
    p = sub.add_parser("bench", help="benchmark the op set and the optimizer step", add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_bench)
    p = sub.add_parser("experiment", help="SGD, SAM, ASAM and X-SAM on offline data: accuracy, sharpness, "
                       "angle, wall time (--quick: about a minute)", add_help=False)
    p.add_argument("experiment_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_experiment)
    p = sub.add_parser("info", help="which backends run on this machine, and why not")
    p.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
