"""Test session setup: Triton runs in its interpreter on machines without a GPU."""
import os

import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (test modules, xsam.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.use_deterministic_algorithms(False)


def pytest_collection_modifyitems(config, items):
    import pytest

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
