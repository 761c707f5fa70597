"""GPU architecture coverage (xsam/build_info.py): the default build list, and the run-time check
that keeps backend="native" off a GPU the extension has no code for. The GPU is faked."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from xsam import BackendUnavailableError, build_info
from xsam.ops.contract import OPS
from xsam.build_info import ArchCode, BuildRecord
from xsam.ops import dispatch, native_backend

ROOT = Path(__file__).resolve().parents[1]
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = os.path.join(CUDA_HOME, "bin", "nvcc")

# torch 2.14.1+cu130's own list, and what nvcc 13.0 and an older nvcc 12.0 can compile.
TORCH_CU130 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
NVCC_13 = ["sm_75", "sm_80", "sm_86", "sm_87", "sm_88", "sm_89", "sm_90", "sm_100", "sm_110", "sm_103",
           "sm_120", "sm_121"]
NVCC_12_0 = ["sm_50", "sm_52", "sm_53", "sm_60", "sm_61", "sm_62", "sm_70", "sm_72", "sm_75", "sm_80", "sm_86",
             "sm_87", "sm_89", "sm_90"]

# A100, A10 / RTX 3090, L4 / RTX 4090, H100, B200, RTX 5090.
USERS_GPUS = [(8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]


def compiled_codes(arch_list: str) -> list[str]:
    """The codes torch's cpp_extension compiles for a TORCH_CUDA_ARCH_LIST."""
    from torch.utils import cpp_extension  # here: it warns at import on a machine without CUDA

    with mock.patch.dict(os.environ, TORCH_CUDA_ARCH_LIST=arch_list):
        return build_info.codes_from_gencode_flags(cpp_extension._get_cuda_arch_flags())


def covered(codes, capability) -> bool:
    return any(ArchCode.parse(code).runs_on(capability) for code in codes)


# --- the default list -----------------------------------------------------------------------

@pytest.mark.parametrize("torch_codes, nvcc, expected", [
    (TORCH_CU130, NVCC_13, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),
    (TORCH_CU130, NVCC_12_0, "7.5;8.0;8.6;9.0+PTX"),  # an older nvcc cannot compile Blackwell
    (TORCH_CU130, None, "7.5;8.0;8.6;9.0;10.0;12.0+PTX"),  # nvcc could not say: nothing filtered
    (["sm_80", "sm_90a", "compute_90"], NVCC_13, "8.0+PTX"),  # PTX and arch-specific entries are ignored
    ([], NVCC_13, "8.0;8.6;8.9;9.0+PTX"),  # torch cannot say: the common GPUs
    ([], None, "8.0;8.6;8.9;9.0+PTX"),
])
def test_default_arch_list_is_torchs_list_limited_to_nvcc_and_covers_users_gpus(torch_codes, nvcc, expected):
    assert build_info.default_arch_list(torch_codes, nvcc) == expected
    codes = compiled_codes(expected)
    for capability in USERS_GPUS:
        assert covered(codes, capability), (capability, codes)
    assert not covered(codes, (7, 0))  # below the oldest entry: no code, no JIT


def test_default_arch_list_names_the_fix_when_nvcc_compiles_none_of_it():
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        build_info.default_arch_list(["sm_100", "sm_120"], NVCC_12_0)


@pytest.mark.skipif(not (torch.version.cuda and os.path.exists(NVCC)), reason="needs a CUDA torch and nvcc")
def test_default_arch_list_on_this_machine_covers_the_gpus_people_train_on():
    arch_list = build_info.default_arch_list(build_info.torch_cuda_arch_codes(), build_info.nvcc_gpu_codes(NVCC))
    codes = compiled_codes(arch_list)
    assert all(covered(codes, capability) for capability in USERS_GPUS[:4]), arch_list


def test_check_compilable_names_the_entries_nvcc_cannot_compile():
    build_info.check_compilable(["sm_90", "compute_90"], NVCC_13, "9.0+PTX")
    with pytest.raises(ValueError, match=r"TORCH_CUDA_ARCH_LIST='7.0;9.0' asks for sm_70"):
        build_info.check_compilable(["sm_70", "sm_90"], NVCC_13, "7.0;9.0")


def test_codes_from_gencode_flags():
    flags = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90",
             "-gencode=arch=compute_90,code=sm_90", "-O3"]
    assert build_info.codes_from_gencode_flags(flags) == ["sm_80", "compute_90", "sm_90"]


# --- which GPUs a code runs on ----------------------------------------------------------------

@pytest.mark.parametrize("code, runs_on, not_on", [
    ("sm_80", [(8, 0), (8, 6), (8, 9)], [(7, 5), (9, 0)]),  # cubin: same major, same or later minor
    ("sm_86", [(8, 6), (8, 9)], [(8, 0), (9, 0)]),
    ("compute_90", [(9, 0), (10, 0), (12, 0)], [(8, 9)]),  # PTX: JIT for any later GPU
    ("sm_90a", [(9, 0)], [(10, 0)]),  # architecture-specific: that GPU only
    ("sm_100", [(10, 0), (10, 3)], [(9, 0), (12, 0)]),
])
def test_arch_code_runs_on(code, runs_on, not_on):
    arch = ArchCode.parse(code)
    assert str(arch) == code
    assert all(arch.runs_on(cap) for cap in runs_on)
    assert not any(arch.runs_on(cap) for cap in not_on)


@pytest.mark.parametrize("code", ["9.0", "sm90", "sm_9", "gfx90a", ""])
def test_arch_code_rejects_other_spellings(code):
    with pytest.raises(ValueError, match="sm_XY or compute_XY"):
        ArchCode.parse(code)


# --- the run-time check, on a faked GPU -------------------------------------------------------

HOPPER_ONLY = BuildRecord(built=True, cuda=True, arch_codes=("sm_90",), arch_list="9.0",
                          arch_list_source="TORCH_CUDA_ARCH_LIST", torch_version=torch.__version__)


def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_native_coverage_reason_on_a_faked_gpu(monkeypatch):
    monkeypatch.setattr(build_info, "load_build_record", lambda: HOPPER_ONLY)
    fake_gpu(monkeypatch, (9, 0))
    assert build_info.native_coverage_reason("cuda") is None
    fake_gpu(monkeypatch, (8, 6))
    why = build_info.native_coverage_reason(torch.device("cuda", 0))
    assert "compute capability 8.6" in why and "sm_90" in why and 'TORCH_CUDA_ARCH_LIST="8.6"' in why
    assert build_info.native_coverage_reason("cpu") is None


def test_no_cuda_kernels_means_nothing_to_cover():
    cpu_build = BuildRecord(built=True, cuda=False)
    failed = BuildRecord(built=False, cuda=True, arch_codes=("sm_90",), failure="with C++ compiler 'false': ...")
    for record in (None, cpu_build, failed):
        assert build_info.gpu_coverage_reason((8, 0), record) is None


@pytest.fixture
def fresh_dispatch():
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


@pytest.mark.skipif(not all(native_backend.has_kernel("cuda", op) for op in OPS),
                    reason="xsam._C was built without CUDA kernels for every op")
def test_native_backend_is_unavailable_on_an_uncovered_gpu_and_auto_passes_it_by(monkeypatch, fresh_dispatch):
    record = build_info.load_build_record()
    assert record is not None and record.built and record.cuda and record.arch_codes, record
    below = min((c.major, c.minor) for c in map(ArchCode.parse, record.arch_codes))
    uncovered = (below[0] - 1, 0)  # older than the oldest code: no cubin runs and no PTX can JIT
    fake_gpu(monkeypatch, uncovered)
    cuda = torch.device("cuda")
    why = dispatch.unavailable_reason("native", cuda, torch.float32)
    assert why and f"compute capability {uncovered[0]}.0" in why
    assert dispatch.resolve("auto", cuda, torch.float32) is not native_backend
    with pytest.raises(BackendUnavailableError, match="compute capability"):
        dispatch.resolve("native", cuda, torch.float32)

    dispatch.clear_cache()
    fake_gpu(monkeypatch, below)
    assert dispatch.unavailable_reason("native", cuda, torch.float32) is None


# --- what the user sees -----------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    (HOPPER_ONLY, "CUDA kernels for sm_90 (TORCH_CUDA_ARCH_LIST='9.0'"),
    (BuildRecord(built=True, cuda=False, torch_version="2.14.1"), "CPU kernels only"),
])  # a failed build and none at all: test_packaging installs them
def test_describe_says_how_the_extension_was_built(record, expected, monkeypatch):
    monkeypatch.setattr(build_info, "load_build_record", lambda: record)
    assert expected in build_info.describe()[0]


def test_describe_reports_coverage_of_each_visible_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert build_info.describe(HOPPER_ONLY)[1:] == ["GPU coverage: no CUDA GPU visible"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100-SXM4-80GB")
    fake_gpu(monkeypatch, (8, 0))
    gpu_line = build_info.describe(HOPPER_ONLY)[1]
    assert gpu_line.startswith("GPU cuda:0 NVIDIA A100-SXM4-80GB (compute capability 8.0): not covered: ")
    fake_gpu(monkeypatch, (9, 0))
    assert build_info.describe(HOPPER_ONLY)[1].endswith("covered by xsam._C")


def test_missing_extension_reason_names_the_torch_it_was_built_against():
    stale = BuildRecord(built=True, cuda=False, torch_version="2.4.0")
    why = build_info.missing_extension_reason(ImportError("undefined symbol: _ZN3c10"), stale)
    assert "built against torch 2.4.0" in why and "undefined symbol" in why


# --- bad input at build time ------------------------------------------------------------------

@pytest.mark.skipif(not (torch.version.cuda and os.path.exists(NVCC) and shutil.which("c++")),
                    reason="needs a CUDA torch, nvcc and a C++ compiler")
def test_setup_rejects_a_malformed_arch_list_naming_the_variable():
    env = dict(os.environ, TORCH_CUDA_ARCH_LIST="Hopper;nine", CUDA_HOME=CUDA_HOME)
    env.pop("XSAM_NO_EXTENSION", None)
    run = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0
    assert "TORCH_CUDA_ARCH_LIST='Hopper;nine' is not understood" in run.stderr
    assert 'TORCH_CUDA_ARCH_LIST="8.0;8.6;9.0+PTX"' in run.stderr
