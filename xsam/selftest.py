"""``xsam selftest``: every kernel on this machine against the pure-PyTorch reference (``xsam.ops.verify``'s
cases and rule), then a few optimizer steps; a table, and an exit code (``EXIT_*``). docs/selftest.md says
what the table means.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import torch

from . import __version__
from .cli_args import OneLineErrorParser, choices_list, number
from .ops.contract import OPS
from .ops.dispatch import unavailable_reason
from .ops.verify import (REPORT_TO, Comparison, boundaries, compare, launch_context, mixed_cases, run_case,
                         selftest_cases, unit_roundoff)
from .optim import SAM, XSAM

FUSED_BACKENDS = ("native", "triton")
EXIT_PASSED = 0  # also when no fused backend runs here at all: "auto" then uses the reference, which needs no check
EXIT_FAILED = 1
EXIT_NOTHING_CHECKED = 5  # the backends named with --backends cannot run here (pytest's code for no test)
DTYPE_NAMES = ("float32", "float64", "float16", "bfloat16")
TRAINING_STEPS = 3


def _parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(
        prog="xsam selftest",
        description="Check every fused kernel on this machine against the pure-PyTorch reference (every op, "
                    "device, dtype and backend), then a few SAM/ASAM/X-SAM steps. Exit code 1 on any failure, "
                    f"{EXIT_NOTHING_CHECKED} when none of the backends named with --backends can run here.")
    parser.add_argument("--device", choices=("cpu", "cuda", "all"), default="all",
                        help="devices to check (default: all: the CPU and CUDA when available)")
    parser.add_argument("--backends", type=choices_list(FUSED_BACKENDS, "backend"), default=None,
                        help="comma-separated fused backends to check (default: native,triton, those available)")
    parser.add_argument("--dtypes", type=choices_list(DTYPE_NAMES, "dtype"), default=DTYPE_NAMES,
                        help="comma-separated dtypes (default: all four; the optimizer steps run in float32)")
    parser.add_argument("--triton-interpreter", action="store_true",
                        help="also run the Triton kernels on the CPU in Triton's interpreter (slow; sets "
                             "TRITON_INTERPRET=1, so Triton is then not checked on CUDA in this run)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer cases: edge sizes and chunk boundaries only, one layout each")
    parser.add_argument("--seed", type=number(int, 0, 2**31 - 1), default=0, help="seed of the random inputs")
    return parser


# ---------------------------------------------------------------- the table

@dataclass
class Row:
    """One line of the table: the cases of one (op or method, backend, device, dtype)."""

    what: str
    backend: str
    device: str
    dtype: str
    cases: int = 0
    worst: Comparison | None = None  # where the error came closest to its bound
    failures: list[str] = field(default_factory=list)

    def add(self, comparison: Comparison, failure: str | None) -> None:
        self.cases += 1
        if failure is not None:
            self.failures.append(failure)
        if self.worst is None or comparison.ratio > self.worst.ratio:
            self.worst = comparison

    def add_cases(self, cases, backend: str) -> Row:
        for case in cases:
            result = run_case(case, backend)
            self.add(result.comparison, None if result.ok else f"{case.label}: {result.failure}")
        return self

    @property
    def ok(self) -> bool:
        return not self.failures and self.cases > 0

    def line(self) -> str:
        error = bound = "-"
        if worst := self.worst:
            error, bound = _number(worst.error), "exact" if worst.bound <= 1e-290 else _number(worst.bound)
        result = "PASS" if self.ok else ("FAIL" if self.cases else "NO CASE")
        return (f"{self.what:<17} {self.backend:<8} {self.device:<9} {self.dtype:<9} {self.cases:>5}  {error:>9}  "
                f"{bound:>9}  {result}")


HEADER = f"{'op':<17} {'backend':<8} {'device':<9} {'dtype':<9} {'cases':>5}  {'max error':>9}  {'bound':>9}  result"


def _number(x: float) -> str:
    return "0" if x == 0 else f"{x:.2e}"  # inf prints as "inf"


# ---------------------------------------------------------------- a few optimizer steps

def trained_parameters(method: str, backend: str, device: torch.device, dtype: torch.dtype, width: int, seed: int):
    """The parameters after TRAINING_STEPS steps of ``method`` with ``backend`` on a small MLP, plus a wide
    parameter that spans more than one chunk of the backend (its loss term is cheap next to a wide layer)."""
    gen = torch.Generator().manual_seed(seed)
    body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    with torch.no_grad():
        for p in body.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) / 4)
    body.to(device=device, dtype=dtype)
    wide = torch.nn.Parameter(torch.randn(width, generator=gen, dtype=torch.float64).to(device, dtype))
    x = torch.randn(16, 8, generator=gen, dtype=torch.float64).to(device, dtype)
    y = torch.randint(0, 3, (16,), generator=gen).to(device)
    params = [*body.parameters(), wide]

    def loss_fn():
        return torch.nn.functional.cross_entropy(body(x), y) + wide.cos().mean()

    def closure():
        loss = loss_fn()
        loss.backward()
        return loss

    kwargs = dict(lr=0.1, momentum=0.9, backend=backend)
    if method == "X-SAM":
        opt = XSAM(params, torch.optim.SGD, rho=0.05, alpha=0.2, eig_interval=2, power_iters=3, hvp="exact",
                   seed=seed, **kwargs)
    else:
        opt = SAM(params, torch.optim.SGD, rho=0.05, adaptive=method == "ASAM", **kwargs)
    for _ in range(TRAINING_STEPS):
        opt.step(closure, loss_fn=loss_fn) if method == "X-SAM" else opt.step(closure)
    return torch.cat([p.detach().reshape(-1).double() for p in params])


def _training_row(method: str, backend: str, device: torch.device, seed: int) -> Row:
    """SAM/ASAM/X-SAM in float32 with ``backend`` against backend="reference", both measured against
    a float64 run: the rule of the op checks, with a few roundings per step."""
    chunk, _ = boundaries(backend, device.type)
    row = Row(method, backend, str(device), "float32")
    try:
        with launch_context(backend, device):
            got = trained_parameters(method, backend, device, torch.float32, chunk + 1, seed)
    except Exception as exc:  # a kernel that raises fails
        row.add(Comparison(math.inf, 0.0, False), f"raised {type(exc).__name__}: {exc}")
        return row
    ref = trained_parameters(method, "reference", device, torch.float32, chunk + 1, seed)
    exact = trained_parameters(method, "reference", device, torch.float64, chunk + 1, seed)
    eps, tiny = unit_roundoff(torch.float32)
    # Norm-wise: a weight near 0 carries the roundings of its updates, which are not smaller than
    # those of the largest weights.
    c = compare(got, exact, eps=eps, tiny=tiny, magnitude=exact.abs().max().expand_as(exact), ref=ref,
                roundings=4.0 * TRAINING_STEPS)
    row.add(c, None if c.ok else
            f"parameter {c.where} is {c.error:.3g} from the float64 run, more than the bound {c.bound:.3g}")
    return row


# ---------------------------------------------------------------- the run

def _enable_triton_interpreter() -> str | None:
    """Set TRITON_INTERPRET=1 before the kernels are imported; a note when that is too late."""
    if "xsam.kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    elif os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return ("the Triton kernels were imported before --triton-interpreter took effect; run "
                "`python -m xsam selftest --triton-interpreter` in a fresh process")
    return None


def _plan(args) -> tuple[list[tuple[str, torch.device, list[torch.dtype]]], list[str]]:
    """(backend, device, dtypes it runs) to check, and a line for each backend and device left out."""
    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices += [torch.device("cuda", index) for index in range(torch.cuda.device_count())]
    dtypes = [getattr(torch, name) for name in args.dtypes]
    plan, left_out = [], []
    for backend in args.backends:
        for device in devices:
            ready = []
            for dtype in dtypes:
                why = unavailable_reason(backend, device, dtype)
                if backend == "triton" and device.type == "cpu" and not args.triton_interpreter:
                    why = "Triton runs on the CPU only in its interpreter; pass --triton-interpreter to check it there"
                if why is None:
                    ready.append(dtype)
                elif dtype == dtypes[0]:
                    left_out.append(f"{backend} on {device}: not checked: {why}")
            if ready:
                plan.append((backend, device, ready))
    return plan, left_out


def _op_rows(plan, args):
    """Every op for every (backend, device, dtype), then lists mixing every dtype (and device)."""
    for backend in args.backends:
        entries = [(device, ready) for name, device, ready in plan if name == backend]
        for device, ready in entries:
            with launch_context(backend, device):
                for dtype in ready:
                    for op in OPS:
                        cases = selftest_cases(op, backend, device, dtype, quick=args.quick, seed=args.seed)
                        yield Row(op, backend, str(device), str(dtype).removeprefix("torch.")).add_cases(cases, backend)
        mixed_devices = [device for device, ready in entries if len(ready) == len(DTYPE_NAMES)]
        if mixed_devices:
            with launch_context(backend, mixed_devices[0]):
                for op in OPS:
                    cases = mixed_cases(op, mixed_devices, seed=args.seed)
                    yield Row(op, backend, "+".join(map(str, mixed_devices)), "mixed").add_cases(cases, backend)


def _failure_lines(rows: list[Row]) -> list[str]:
    lines = []
    for row in [row for row in rows if not row.ok]:
        what = f"{row.what} on {row.backend}, {row.device}, {row.dtype}"
        if not row.cases:
            lines.append(f"FAIL {what}: the self-test has no case for this op (add a Recipe in "
                         "xsam/ops/verify/rule.py)")
        lines += [f"FAIL {what}: {failure}" for failure in row.failures[:3]]
        if len(row.failures) > 3:
            lines.append(f"     ... and {len(row.failures) - 3} more failing cases of {what}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    named = args.backends is not None
    args.backends = args.backends or FUSED_BACKENDS
    if args.device == "cuda" and not torch.cuda.is_available():
        _parser().error("argument --device: cuda was asked for, but no CUDA device is available")
    note = _enable_triton_interpreter() if args.triton_interpreter else None
    start = time.perf_counter()
    plan, left_out = _plan(args)
    devices = sorted({str(device) for _, device, _ in plan})
    print(f"xsam selftest: xsam {__version__}, torch {torch.__version__}, Python {platform.python_version()}, "
          f"devices: {', '.join(devices) or 'none'}" + (" (quick)" if args.quick else ""))
    for line in ([f"note: {note}"] if note else []) + left_out:
        print(line)
    if not plan and named:
        print(f"selftest skipped: {', '.join(args.backends)} cannot run here (see above), so nothing was checked "
              f"(exit code {EXIT_NOTHING_CHECKED})")
        return EXIT_NOTHING_CHECKED
    if not plan:
        print("nothing to check: no fused backend runs here (backend='auto' uses the reference, which needs no check)")
        return EXIT_PASSED

    rows: list[Row] = []
    print(f"\n{HEADER}")
    for row in _op_rows(plan, args):
        rows.append(row)
        print(row.line(), flush=True)
    steps = [(backend, device) for backend, device, ready in plan if torch.float32 in ready]
    if steps:
        print(f"\noptimizer steps ({TRAINING_STEPS} each, float32, against backend='reference'; errors against a "
              f"float64 run, norm-wise):")
        print(HEADER.replace("op    ", "method"))
    for backend, device in steps:
        for method in ("SAM", "ASAM", "X-SAM"):
            rows.append(_training_row(method, backend, device, args.seed))
            print(rows[-1].line(), flush=True)

    print("", *_failure_lines(rows), sep="\n")
    seconds = time.perf_counter() - start
    cases = sum(row.cases for row in rows)
    failed = sum(not row.ok for row in rows)
    if failed:
        print(f"selftest FAILED: {failed} of {len(rows)} rows ({cases} cases, {seconds:.1f} s). backend='auto' "
              f"checks a few cases itself and falls back to the reference when they fail; backend='native' or "
              f"'triton' do not. Please report this output, with `xsam info`, to {REPORT_TO}")
        return EXIT_FAILED
    print(f"selftest passed: {len(rows)} rows, {cases} cases, {seconds:.1f} s")
    return EXIT_PASSED


if __name__ == "__main__":
    sys.exit(main())
