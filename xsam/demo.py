"""``xsam demo``: SGD, SAM, X-SAM, its alpha = 0 control and Eigen-SAM on scikit-learn's digits, on the CPU.

Every method trains the same small CNN from the same weights, data order and schedule. ``XSAM-a0`` (X-SAM
with alpha = 0: SAM with X-SAM's normalised step) separates what the correction does from what the
normalisation does. The top eigenvalue is measured on one fixed training batch; the cosine is |cos| because
v's sign is arbitrary (X-SAM: g_adv; Eigen-SAM: the first pass's g).
"""
from __future__ import annotations

import time

import torch
from torch import nn
from torch.nn import functional as F

from .cli_args import OneLineErrorParser, choices_list, number, output_dir
from .diagnostics import top_eigenvalue
from .optim import SAM, XSAM, EigenSAM

METHODS = ("SGD", "SAM", "XSAM-a0", "XSAM", "EigenSAM")
ALPHA = 0.2  # X-SAM's and Eigen-SAM's alpha (the authors' default)


def load_digits_tensors(seed: int = 0):
    """Digits as (N, 1, 8, 8) float tensors scaled to [0, 1], split 80/20 with a fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # the demo extra brings scikit-learn
        raise SystemExit("xsam demo needs scikit-learn: pip install 'torch-xsam[demo]'") from exc
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(32, 10),
    )


def make_optimizer(method: str, model: nn.Module, lr: float, rho: float):
    base = dict(lr=lr, momentum=0.9, weight_decay=5e-4)
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), **base)
    if method == "SAM":
        return SAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, **base)
    eig = dict(rho=rho, eig_interval=5, power_iters=5, hvp="exact", model=model, **base)
    if method == "EigenSAM":
        return EigenSAM(model.parameters(), torch.optim.SGD, alpha=ALPHA, **eig)
    return XSAM(model.parameters(), torch.optim.SGD, alpha=0.0 if method == "XSAM-a0" else ALPHA, **eig)


def train(method: str, data, epochs: int, batch_size: int, lr: float, rho: float, seed: int, progress) -> dict:
    (xtr, ytr), (xte, yte) = data
    torch.manual_seed(seed)
    model = small_cnn()
    opt = make_optimizer(method, model, lr, rho)
    steps_per_epoch = (len(ytr) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    cosines = []
    if isinstance(opt, (XSAM, EigenSAM)):
        key = "cos_gadv_v" if isinstance(opt, XSAM) else "cos_g_v"
        opt.register_diagnostics_hook(lambda o, r: cosines.append(r[key]) if key in r else None)
    order_gen = torch.Generator().manual_seed(seed)
    seconds, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=order_gen)
        for i in range(0, len(ytr), batch_size):
            xb, yb = xtr[order[i:i + batch_size]], ytr[order[i:i + batch_size]]

            def loss_fn():
                return F.cross_entropy(model(xb), yb)

            def closure():
                loss = loss_fn()
                loss.backward()
                return loss

            start = time.perf_counter()
            if method == "SGD":
                opt.zero_grad()
            if method in ("SGD", "SAM"):
                opt.step(closure)
            else:
                opt.step(closure, loss_fn=loss_fn)
            seconds += time.perf_counter() - start
            steps += 1
            sched.step()
            if progress is not None:
                progress.update(1)
    model.eval()
    with torch.no_grad():
        test_acc = (model(xte).argmax(1) == yte).float().mean().item()
    model.train()  # the top eigenvalue is measured in training mode
    fixed_x, fixed_y = xtr[:256], ytr[:256]  # the same batch for every method
    top_eig = top_eigenvalue(model, lambda: F.cross_entropy(model(fixed_x), fixed_y), tol=1e-4, seed=1234).eigenvalue
    mean_abs_cos = torch.stack(cosines).abs().mean().item() if cosines else float("nan")
    return dict(method=method, test_acc=test_acc, top_eig=top_eig, mean_abs_cos=mean_abs_cos,
                s_per_step=seconds / steps)


def what_it_shows(top_eig: dict[str, float]) -> str:
    """One sentence that splits X-SAM's top eigenvalue into the normalisation's part and the correction's."""
    if not {"SAM", "XSAM-a0", "XSAM"} <= top_eig.keys():
        return ""
    sam, control, xsam = top_eig["SAM"], top_eig["XSAM-a0"], top_eig["XSAM"]
    text = (f"Top eigenvalue: the normalised step alone (XSAM-a0 against SAM) {_change(control, sam)}; "
            f"the correction (XSAM against XSAM-a0) {_change(xsam, control)}")
    if "EigenSAM" in top_eig:
        text += f"; Eigen-SAM's tilt (EigenSAM against SAM) {_change(top_eig['EigenSAM'], sam)}"
    return text + ". One seed: differences of a few percent are noise (xsam experiment pairs 5 seeds)."


def _change(value: float, reference: float) -> str:
    return f"{reference:.3g} -> {value:.3g} ({value / reference:.2f}x)"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineErrorParser(prog="xsam demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=number(int, 1), default=7)
    parser.add_argument("--batch-size", type=number(int, 2), default=64, help="at least 2 (BatchNorm)")
    parser.add_argument("--lr", type=number(float, 0.0, low_open=True), default=0.05)
    parser.add_argument("--rho", type=number(float, 0.0), default=0.05)
    parser.add_argument("--seed", type=number(int, 0), default=0)
    parser.add_argument("--methods", type=choices_list(METHODS, "method"), default=METHODS,
                        help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--out", type=output_dir, default=None, help="also write the table to OUT/demo_table.txt")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    methods = list(args.methods)
    data = load_digits_tensors(args.seed)
    total = len(methods) * args.epochs * ((len(data[0][1]) + args.batch_size - 1) // args.batch_size)
    progress = None
    if not args.no_progress:
        try:
            from tqdm import tqdm
            progress = tqdm(total=total, unit="step", desc="training " + ", ".join(methods))
        except ImportError:
            pass
    rows = [train(m, data, args.epochs, args.batch_size, args.lr, args.rho, args.seed, progress) for m in methods]
    if progress is not None:
        progress.close()
    print(f"\ndigits (8x8, {len(data[0][1])} train / {len(data[1][1])} test), small CNN with BatchNorm, "
          f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr} cosine, momentum 0.9, rho {args.rho}, "
          f"X-SAM and Eigen-SAM alpha {ALPHA} (XSAM-a0: alpha 0), refresh every 5 steps, 5 power iterations "
          "(exact HVPs)")
    header = f"{'method':<10}{'test acc':>10}{'top eig (fixed batch)':>24}{'mean |cos(grad, v)|':>22}{'s/step':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        cos = "-" if r["mean_abs_cos"] != r["mean_abs_cos"] else f"{r['mean_abs_cos']:.3f}"
        lines.append(f"{r['method']:<10}{r['test_acc']:>10.4f}{r['top_eig']:>24.3f}{cos:>22}{r['s_per_step']:>10.4f}")
    reading = what_it_shows({r["method"]: r["top_eig"] for r in rows})
    if reading:
        lines += ["", reading]
    print("\n".join(lines))
    if args.out is not None:
        (args.out / "demo_table.txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / 'demo_table.txt'}")
    return 0
