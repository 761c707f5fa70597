"""What the compiled extension xsam._C was built for, and whether it can run on this GPU.

Architecture codes are those of ``torch.cuda.get_arch_list()``: ``sm_XY`` is machine code for compute
capability X.Y, ``compute_XY`` PTX that the driver compiles on first use. setup.py loads this file by path, so
torch is imported only inside the functions that need it, and ``torch.utils.cpp_extension`` (which warns "No
CUDA runtime is found" on a machine without CUDA) never at run time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Sequence

RECORD_NAME = "_build_record.json"
RECORD_PATH = Path(__file__).resolve().parent / RECORD_NAME

# When torch cannot tell its architectures: Ampere, Ada and Hopper, the GPUs most people train on.
FALLBACK_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (9, 0))

REBUILD_HINT = "`pip install --no-build-isolation -e .` (or `pip install --no-build-isolation .`)"

_CODE = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")
_GENCODE = re.compile(r"-gencode=arch=compute_\w+,code=((?:sm|compute)_\w+)")


@dataclasses.dataclass(frozen=True)
class ArchCode:
    """One entry of an architecture list: ``sm_86`` is ArchCode(ptx=False, major=8, minor=6)."""

    ptx: bool  # compute_XY (PTX, JIT-compiled by the driver) rather than sm_XY (machine code)
    major: int
    minor: int
    suffix: str = ""  # "a": only this exact capability; "f": this family (same major)

    @classmethod
    def parse(cls, code: str) -> ArchCode:
        match = _CODE.fullmatch(code.strip())
        if match is None:
            raise ValueError(f"architecture code {code!r} is not of the form sm_XY or compute_XY "
                             f"(as torch.cuda.get_arch_list() prints them, e.g. 'sm_90', 'compute_120')")
        kind, major, minor, suffix = match.groups()
        return cls(kind == "compute", int(major), int(minor), suffix)

    def __str__(self) -> str:
        return f"{'compute' if self.ptx else 'sm'}_{self.major}{self.minor}{self.suffix}"

    def runs_on(self, capability: tuple[int, int]) -> bool:
        """Whether a GPU of this compute capability can run code compiled for this entry."""
        major, minor = capability
        if self.suffix == "a":
            return (major, minor) == (self.major, self.minor)
        if self.ptx and not self.suffix:
            # The driver JIT-compiles PTX for any newer architecture.
            return (major, minor) >= (self.major, self.minor)
        # Machine code runs within its major version on the same or a later minor version.
        return major == self.major and minor >= self.minor


def capability_text(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


def codes_from_gencode_flags(flags: Sequence[str]) -> list[str]:
    """The codes that nvcc ``-gencode=arch=compute_XY,code=...`` flags compile, in their order."""
    return list(dict.fromkeys(match.group(1) for match in map(_GENCODE.fullmatch, flags) if match))


def default_arch_list(torch_arch_codes: Sequence[str], nvcc_codes: Sequence[str] | None) -> str:
    """TORCH_CUDA_ARCH_LIST for a build that did not set one: the GPUs the installed torch runs
    on, limited to what the local nvcc can compile, with PTX for the newest so that later GPUs
    can still JIT it.

    Args:
        torch_arch_codes: the installed torch's own list (``torch.cuda.get_arch_list()``, e.g.
            ``["sm_80", "sm_86", "sm_90", "compute_90"]``); when it names no ``sm_`` entry,
            ``FALLBACK_CAPABILITIES`` (8.0, 8.6, 8.9, 9.0) are used instead.
        nvcc_codes: what ``nvcc --list-gpu-code`` prints (``sm_75``, ...), or None when unknown
            (then nothing is filtered out).

    Returns a string such as ``"8.0;8.6;9.0+PTX"``.
    """
    parsed = [ArchCode.parse(code) for code in torch_arch_codes]
    # Architecture-specific variants (sm_90a) would not run on the rest of their family.
    wanted = sorted({(c.major, c.minor) for c in parsed if not c.ptx and not c.suffix}) or list(FALLBACK_CAPABILITIES)
    if nvcc_codes is not None:
        compilable = {(c.major, c.minor) for c in map(ArchCode.parse, nvcc_codes) if not c.suffix}
        supported = [cap for cap in wanted if cap in compilable]
        if not supported:
            raise ValueError(
                f"the local nvcc compiles none of the architectures the installed torch was built for "
                f"({', '.join(map(capability_text, wanted))}; nvcc knows {', '.join(sorted(map(str, nvcc_codes)))}); "
                f"set TORCH_CUDA_ARCH_LIST to one nvcc supports (e.g. TORCH_CUDA_ARCH_LIST=\"9.0\") or install "
                f"the CUDA toolkit that matches torch (torch.version.cuda)")
        wanted = supported
    return ";".join(capability_text(cap) for cap in wanted) + "+PTX"


def torch_cuda_arch_codes() -> list[str]:
    """The architectures the installed CUDA torch was compiled for, GPU or not (``torch.cuda.get_arch_list()``
    is [] without a visible GPU, as on many build machines)."""
    import torch

    codes = torch.cuda.get_arch_list() if torch.cuda.is_available() else []
    if not codes:
        flags = getattr(torch._C, "_cuda_getArchFlags", lambda: None)()
        codes = flags.split() if flags else []
    return codes


def nvcc_gpu_codes(nvcc: str) -> list[str] | None:
    """The ``sm_XY`` codes this nvcc can compile (``nvcc --list-gpu-code``), None if it cannot say."""
    try:
        listed = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    codes = [line.strip() for line in listed.stdout.splitlines() if _CODE.fullmatch(line.strip())]
    return codes if listed.returncode == 0 and codes else None


def check_compilable(codes: Sequence[str], nvcc_codes: Sequence[str] | None, arch_list: str) -> None:
    """Raise ValueError naming TORCH_CUDA_ARCH_LIST when it asks for code nvcc cannot produce."""
    if nvcc_codes is None:
        return
    compilable = {(c.major, c.minor) for c in map(ArchCode.parse, nvcc_codes)}
    missing = [str(c) for c in map(ArchCode.parse, codes) if (c.major, c.minor) not in compilable]
    if missing:
        raise ValueError(
            f"TORCH_CUDA_ARCH_LIST={arch_list!r} asks for {', '.join(missing)}, which the local nvcc cannot "
            f"compile (it knows {', '.join(nvcc_codes)}); drop those entries, or unset TORCH_CUDA_ARCH_LIST "
            f"to build for the default list")


@dataclasses.dataclass(frozen=True)
class BuildRecord:
    """What setup.py built (or failed to build), written next to the extension."""

    built: bool  # False: the compile failed and the pure-Python package was installed
    cuda: bool  # whether CUDA kernels were compiled (or, for a failed build, attempted)
    arch_codes: tuple[str, ...] = ()  # e.g. ("sm_80", "sm_86", "sm_90", "compute_90"); () if unknown
    arch_list: str = ""  # the TORCH_CUDA_ARCH_LIST the build used
    arch_list_source: str = ""  # "TORCH_CUDA_ARCH_LIST" (set by the builder) or "default"
    torch_version: str = ""
    failure: str | None = None  # why the build failed: "with C++ compiler 'g++': <error>"


def write_build_record(directory: str | os.PathLike, record: BuildRecord) -> Path:
    path = Path(directory) / RECORD_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(record), indent=1) + "\n")
    return path


@functools.lru_cache(maxsize=None)
def load_build_record(path: Path = RECORD_PATH) -> BuildRecord | None:
    """The record of the build that installed this package; None when it built no extension
    (XSAM_NO_EXTENSION=1, or no torch at install time) or the record is unreadable."""
    try:
        fields = {f.name for f in dataclasses.fields(BuildRecord)}
        data = {key: value for key, value in json.loads(path.read_text()).items() if key in fields}
        data["arch_codes"] = tuple(data.get("arch_codes", ()))
        return BuildRecord(**data)
    except (OSError, ValueError, TypeError):
        return None


def missing_extension_reason(error: BaseException, record: BuildRecord | None = None) -> str:
    """Why backend="native" is unavailable when ``import xsam._C`` raised ``error``."""
    record = load_build_record() if record is None else record
    if record is not None and not record.built:
        return (f"the compiled extension xsam._C failed to build when xsam was installed, so the pure-Python "
                f"package was installed instead (the build failed {record.failure}); fix that (`pip install -v` "
                f"shows the compiler's output) and reinstall with {REBUILD_HINT}")
    import torch

    mismatch = ""
    if record is not None and record.torch_version and record.torch_version != torch.__version__:
        mismatch = f"; it was built against torch {record.torch_version}, this is torch {torch.__version__}"
    return (f"the compiled extension xsam._C is not built or cannot be loaded ({error}{mismatch}); rebuild it "
            f"with {REBUILD_HINT}, without XSAM_NO_EXTENSION=1")


def gpu_coverage_reason(capability: tuple[int, int], record: BuildRecord | None) -> str | None:
    """None when the CUDA kernels of ``record`` run on a GPU of this compute capability, else why not."""
    if record is None or not record.built or not record.cuda or not record.arch_codes:
        return None  # no CUDA kernels to check; the caller reports their absence
    if any(ArchCode.parse(code).runs_on(capability) for code in record.arch_codes):
        return None
    arch = capability_text(capability)
    return (f"xsam._C has CUDA code for {' '.join(record.arch_codes)} only, none of which runs on a GPU of "
            f"compute capability {arch}; rebuild with TORCH_CUDA_ARCH_LIST=\"{arch}\" {REBUILD_HINT}, or unset "
            f"TORCH_CUDA_ARCH_LIST to build for every architecture the installed torch supports")


def native_coverage_reason(device) -> str | None:
    """None when xsam._C's CUDA kernels run on ``device`` (or it is not a CUDA device), else why not."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    try:
        capability = tuple(torch.cuda.get_device_capability(device))
    except (RuntimeError, AssertionError):
        return None  # no GPU to check against: nothing will be launched on it either
    return gpu_coverage_reason(capability, load_build_record())


def describe(record: BuildRecord | None = None) -> list[str]:
    """Lines for ``xsam info``: how xsam._C was built, and whether each visible GPU is covered."""
    import torch

    record = load_build_record() if record is None else record
    if record is None:
        lines = ["xsam._C build: no build record (installed with XSAM_NO_EXTENSION=1 or without torch)"]
    elif not record.built:
        lines = [f"xsam._C build: failed at install {record.failure}; the pure-Python package was installed"]
    elif record.cuda:
        how = (f"TORCH_CUDA_ARCH_LIST unset: the default {record.arch_list!r}" if record.arch_list_source == "default"
               else f"TORCH_CUDA_ARCH_LIST={record.arch_list!r} set at build time")
        lines = [f"xsam._C build: CUDA kernels for {' '.join(record.arch_codes) or '(unknown architectures)'} "
                 f"({how}), torch {record.torch_version}"]
    else:
        lines = [f"xsam._C build: CPU kernels only, no CUDA kernels, torch {record.torch_version}"]
    if not torch.cuda.is_available():
        return lines + ["GPU coverage: no CUDA GPU visible"]
    for index in range(torch.cuda.device_count()):
        capability = tuple(torch.cuda.get_device_capability(index))
        if record is None or not record.built or not record.cuda:
            status = "xsam._C has no CUDA kernels to run on it"
        else:
            why = gpu_coverage_reason(capability, record)
            status = "covered by xsam._C" if why is None else f"not covered: {why}"
        lines.append(f"GPU cuda:{index} {torch.cuda.get_device_name(index)} "
                     f"(compute capability {capability_text(capability)}): {status}")
    return lines
