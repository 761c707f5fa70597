"""The ``xsam`` command line: ``xsam demo``, ``xsam bench``, ``xsam experiment``, ``xsam selftest``, ``xsam info``."""
from __future__ import annotations

import importlib
import sys

from .cli_args import OneLineErrorParser

# Subcommands with their own argument parser: (module with main(argv) -> int, help).
DELEGATED = {
    "demo": ("xsam.demo", "train SGD, SAM and X-SAM on the bundled digits data (CPU, about 2 min)"),
    "bench": ("xsam.bench", "benchmark the op set, the optimizer step and end-to-end training"),
    "experiment": ("xsam.experiment", "SGD, SAM, X-SAM and Eigen-SAM on offline data (MNIST-1D, digits, a "
                   "synthetic valley): accuracy, sharpness at matched loss, angle, cost (--quick for a short run)"),
    "selftest": ("xsam.selftest", "check every fused kernel on this machine against the reference: a table, and "
                 "exit code 1 on any failure"),
}


def info() -> int:
    import platform

    import torch

    import xsam
    from xsam import build_info
    from xsam.ops import describe

    print(f"xsam {xsam.__version__}, torch {torch.__version__}, Python {platform.python_version()}")
    print(f"CUDA available: {torch.cuda.is_available()} (torch built for CUDA {torch.version.cuda})")
    print("\n".join(build_info.describe()))  # what xsam._C was built for, and whether each GPU is covered
    rows = describe()
    width = max(len(name) for name, _, _ in rows)
    for name, device, status in rows:
        print(f"  {name:<{width}}  {device:<6}  {status}")
    print("\n".join(auto_check_lines()))
    return 0


def auto_check_lines() -> list[str]:
    """What backend="auto" uses for each device and dtype, after its check before first use."""
    import torch

    from xsam.ops import resolve
    from xsam.ops.contract import SUPPORTED_DTYPES
    from xsam.ops.dispatch import unavailable_reason
    from xsam.ops.verify import SKIP_ENV, outcomes

    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    lines = [f"backend='auto' per dtype, after checking the fused kernels against the reference before their first "
             f"use ({SKIP_ENV}=1 skips the check; `xsam selftest` checks everything):"]
    for device in devices:
        for dtype in SUPPORTED_DTYPES:
            module = resolve("auto", device, dtype)
            found = [o for (_, d, t), o in outcomes().items() if d == device and t == dtype]
            if found:
                status = found[0].describe()
            elif module.__name__.endswith("reference"):
                why = unavailable_reason("native", device, dtype)
                status = f"reference (native: {why})" if why else "reference"
            else:
                status = f"{module.__name__.rsplit('.', 1)[-1].replace('_backend', '')}: not yet checked"
            lines.append(f"  {str(device):<6}  {str(dtype).removeprefix('torch.'):<9} {status}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after a delegated subcommand's name goes to its own parser unchanged
    # (argparse.REMAINDER would reject options such as `xsam bench --quick`).
    if argv and argv[0] in DELEGATED:
        module = importlib.import_module(DELEGATED[argv[0]][0])
        return module.main(argv[1:])
    parser = OneLineErrorParser(prog="xsam", description="X-SAM for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, text) in DELEGATED.items():
        sub.add_parser(name, help=f"{text} (`xsam {name} --help` for its options)")
    sub.add_parser("info", help="which backends run on this machine, why not, and what backend='auto' uses "
                   "after checking them")
    parser.parse_args(argv)
    return info()


if __name__ == "__main__":
    sys.exit(main())
