"""Test session setup: Triton runs in its interpreter on machines without a GPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (test modules, xsam.kernels).
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def triton_launch_config(request):
    """Op tests parametrised by backend and device run Triton in the interpreter with tiny launches."""
    params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
    if params.get("backend") != "triton":
        yield
        return
    from op_cases import launch_config_for

    with launch_config_for(params["backend"], params.get("device", "")):
        yield


@pytest.fixture
def one_thread():
    """One intra-op thread, for tests of tiny tensors: more threads only add waiting on a loaded machine.

    Use it per module with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
