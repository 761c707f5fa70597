"""Build script: the pure-Python package, plus the compiled op set (csrc/) when it can be built.

Environment switches:
  XSAM_NO_EXTENSION=1  build no extension (the pure-Python package still works; backend="native"
                       then reports why it is unavailable).
  XSAM_NO_CUDA=1       build the CPU ops only, even when torch and nvcc could build CUDA.
  TORCH_CUDA_ARCH_LIST respected; default "9.0+PTX" (sm_90 code plus PTX the driver can JIT for
                       newer GPUs), one architecture to keep CI compile time low.
  MAX_JOBS             parallel compile jobs (ninja); torch's default is all cores.
Install with `pip install --no-build-isolation -e .` so the extension is built against the
torch already installed (see README and shared/spec/build-notes.md).
"""
import glob
import os
import sys

from setuptools import setup

PACKAGES = ["xsam", "xsam.ops", "xsam.integrations", "xsam.kernels", "xsam.bench"]
# The Triton kernels (kernels/) and the benchmark harness (bench/) live at the top of the
# repository and ship as xsam.kernels and xsam.bench.
PACKAGE_DIR = {"xsam": "xsam", "xsam.kernels": "kernels", "xsam.bench": "bench"}

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def _warn(message: str) -> None:
    print(f"xsam setup.py: {message}", file=sys.stderr)


def _cuda_home() -> str | None:
    # torch guesses CUDA_HOME from `which nvcc`, which here is a wrapper script outside the
    # toolkit; prefer the explicit variable, then the standard install location.
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    return None


def extension_build():
    """(ext_modules, cmdclass) for the compiled op set, or ([], {}) when it is not built."""
    if _flag("XSAM_NO_EXTENSION"):
        _warn("XSAM_NO_EXTENSION is set: building the pure-Python package only")
        return [], {}
    try:
        import torch
    except ImportError:
        _warn("torch is not installed, so the compiled op set (xsam._C) is not built; install torch "
              "first and reinstall with `pip install --no-build-isolation -e .` to get backend='native'")
        return [], {}

    cuda_home = None
    if _flag("XSAM_NO_CUDA"):
        _warn("XSAM_NO_CUDA is set: building the CPU ops only")
    elif not torch.version.cuda:
        _warn("torch has no CUDA support: building the CPU ops only")
    else:
        cuda_home = _cuda_home()
        if cuda_home is None:
            _warn("nvcc not found (set CUDA_HOME): building the CPU ops only")
        else:
            # cpp_extension reads CUDA_HOME when it is first imported.
            os.environ["CUDA_HOME"] = cuda_home
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0+PTX")

    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/ops_cpu.cpp", "csrc/module.cpp"]
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if cuda_home is not None:
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = cxx + ["-DXSAM_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-std=c++20", "-DXSAM_WITH_CUDA", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("xsam._C", sources, extra_compile_args=extra, **kwargs)
    else:
        ext = cpp_extension.CppExtension("xsam._C", sources, extra_compile_args=extra, **kwargs)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


EXT_MODULES, CMDCLASS = extension_build()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
