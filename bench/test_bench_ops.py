"""pytest-benchmark wrappers for a few ops: ``pytest bench/test_bench_ops.py [--benchmark-only]``.

They live in bench/, outside the default test paths, so a plain ``pytest`` does not
collect them. Parameters: every available backend plus the per-parameter loop, on
the ResNet-18 and many-small-tensors parameter sets (full size on GPU, 1/16 on CPU).
pytest-benchmark times with the host clock, so each call ends with a device
synchronisation on GPU (otherwise it would time kernel launches only).
"""
from __future__ import annotations

import pytest
import torch

from xsam.bench import ops_bench
from xsam.bench.models import parameter_shapes

pytest.importorskip("pytest_benchmark")

DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
OPS = ("dots_gg_gv", "perturb_", "correct_restore_", "power_update_", "xsam_step")
MODELS = ("resnet18", "many_small")


def _cases():
    for device in DEVICES:
        chosen, _ = ops_bench.available_backends(device, torch.float32)
        for impl in chosen + [ops_bench.FOREACH, ops_bench.LOOP]:
            yield pytest.param(device, impl, id=f"{device.type}-{impl}")


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("device,impl", list(_cases()))
def test_op(benchmark, device, impl, op, model):
    ws = ops_bench.make_workspace(parameter_shapes(model), device, torch.float32)
    fn = ops_bench.implementation_op(impl, op, ws)

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    call()  # warm-up outside the measurement (allocator, kernel compilation)
    benchmark.extra_info["bytes_moved"] = ops_bench.TENSOR_PASSES[op] * ws.numel * 4
    benchmark(call)
