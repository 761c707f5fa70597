"""Parameter sets that look like real models, built from shapes (nothing is downloaded).

- ``resnet18``: the torchvision ImageNet ResNet-18 layout (62 tensors, 11.7M
  parameters), taken from ``ResNet18`` below built on the meta device;
- ``vit_b16``: ViT-B/16 at 224x224 with a 1000-class head (152 tensors, 86.6M);
- ``gpt2_small``: GPT-2 small with the tied embedding counted once (148 tensors, 124.4M);
- ``many_small``: 1,000 small tensors of uneven sizes (about 1.2M elements), where
  per-tensor launch and loop overheads dominate rather than bandwidth.

``scale`` divides the number of elements of every tensor (never the number of
tensors, so launch-bound behaviour is kept) to make CPU runs short. ``dram_scale``
picks the largest power-of-two scale that still leaves every array of a set beyond
the last-level cache, so that the bandwidth sets measure memory, not cache.

``MNIST1DCNN``: the 1-D CNN of the comparison with davda54/sam (``bench/overhead_bench.py``).
"""
from __future__ import annotations

import math

import torch
from torch import nn

Shape = tuple[int, ...]


# ----- models built from torch.nn layers (also used end to end) --------------------------
class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        skip = x if self.downsample is None else self.downsample(x)
        return torch.relu(out + skip)


class ResNet18(nn.Module):
    """ResNet-18. ``cifar_stem=True``: 3x3 stem without max-pool (the CIFAR variant the X-SAM paper trains)."""

    def __init__(self, num_classes: int = 1000, cifar_stem: bool = False):
        super().__init__()
        if cifar_stem:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class SmallCNN(nn.Module):
    """A CIFAR-shaped CNN small enough for end-to-end steps on two CPU cores."""

    def __init__(self, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(4 * width),
            nn.ReLU(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.features(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class MNIST1DCNN(nn.Module):
    """A 9-tensor 1-D CNN on MNIST-1D-shaped inputs (batch, 1, 40), 10 classes (8,302 parameters).

    The convolutional base of the MNIST-1D reference models (three Conv1d of 25 channels,
    stride 2), then a hidden Linear and a bias-free output layer.
    """

    LENGTH = 40

    def __init__(self, channels: int = 25, hidden: int = 32, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv1d(1, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.hidden = nn.Linear(channels * 5, hidden)  # 40 -> 19 -> 10 -> 5 positions
        self.out = nn.Linear(hidden, num_classes, bias=False)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.out(torch.relu(self.hidden(x.flatten(1))))


# ----- parameter shape sets ----------------------------------------------------------------
def resnet18_shapes() -> list[Shape]:
    with torch.device("meta"):
        model = ResNet18(num_classes=1000)
    return [tuple(p.shape) for p in model.parameters()]


def _transformer_block(d: int, hidden: int) -> list[Shape]:
    # LayerNorm, fused QKV projection, output projection, LayerNorm, two-layer MLP (all with biases).
    return [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,)]


def vit_b16_shapes() -> list[Shape]:
    d, patches = 768, (224 // 16) ** 2
    shapes: list[Shape] = [(d, 3, 16, 16), (d,), (1, 1, d), (1, patches + 1, d)]
    for _ in range(12):
        shapes += _transformer_block(d, 4 * d)
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def gpt2_small_shapes() -> list[Shape]:
    d = 768
    shapes: list[Shape] = [(50257, d), (1024, d)]  # token and position embeddings (lm_head is tied)
    for _ in range(12):
        shapes += _transformer_block(d, 4 * d)
    return shapes + [(d,), (d,)]


def many_small_shapes(count: int = 1000) -> list[Shape]:
    # Uneven sizes (never a multiple of a block size) between 256 and ~2K elements.
    return [(256 + (i * 97) % 1793,) for i in range(count)]


PARAMETER_SETS = {
    "resnet18": resnet18_shapes,
    "vit_b16": vit_b16_shapes,
    "gpt2_small": gpt2_small_shapes,
    "many_small": many_small_shapes,
}
# Sets whose point is bandwidth; many_small is about per-tensor overhead and keeps its sizes.
BANDWIDTH_SETS = ("resnet18", "vit_b16", "gpt2_small")


def scale_shape(shape: Shape, scale: float) -> Shape:
    """``shape`` with about ``1/scale`` of its elements: the largest dimension is divided first."""
    if scale <= 1:
        return shape
    target = max(1, math.ceil(math.prod(shape) / scale))
    dims = list(shape) or [1]
    while math.prod(dims) > target:
        i = max(range(len(dims)), key=lambda k: dims[k])
        if dims[i] == 1:
            break
        # Strictly smaller each time, so the loop ends even when rounding up would keep the size.
        dims[i] = max(1, min(dims[i] - 1, math.ceil(dims[i] * target / math.prod(dims))))
    return tuple(dims) if shape else shape


def dram_scale(name: str, cache_bytes: int | None, itemsize: int = 4) -> float:
    """The largest power of two that keeps one array of set ``name`` (N elements) beyond ``cache_bytes``.

    Every op reads at least two arrays, so each footprint is then at least twice the cache.
    1 for sets that are not about bandwidth, or when the cache size is unknown.
    """
    if name not in BANDWIDTH_SETS or not cache_bytes:
        return 1.0
    array_bytes = sum(math.prod(s) for s in PARAMETER_SETS[name]()) * itemsize
    ratio = array_bytes / cache_bytes
    return float(2 ** math.floor(math.log2(ratio))) if ratio >= 2 else 1.0


def parameter_shapes(name: str, scale: float = 1.0) -> list[Shape]:
    if name not in PARAMETER_SETS:
        raise ValueError(f"unknown parameter set {name!r}; use one of {', '.join(PARAMETER_SETS)}")
    return [scale_shape(s, scale) for s in PARAMETER_SETS[name]()]
