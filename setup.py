"""Build script: the pure-Python package, plus the compiled op set (csrc/) when it can be built.

Environment switches:
  XSAM_NO_EXTENSION=1  build no extension (the pure-Python package still works; backend="native"
                       then reports why it is unavailable).
  XSAM_NO_CUDA=1       build the CPU ops only, even when torch and nvcc could build CUDA.
  TORCH_CUDA_ARCH_LIST the GPU architectures to compile, e.g. "8.0;8.6;9.0+PTX". Unset: every
                       architecture the installed torch was built for that the local nvcc supports,
                       plus PTX for the newest (xsam/build_info.py, default_arch_list). CI and
                       `make test` pin "9.0" to keep the compile short.
  MAX_JOBS             parallel compile jobs (ninja); torch's default is all cores.
A compile that fails (no compiler, a broken toolchain, an error in csrc/) does not fail the
install: the pure-Python package is installed with a warning, and the reason is recorded in
xsam/_build_record.json for `xsam info` and backend="native".
Install with `pip install --no-build-isolation -e .` so the extension is built against the
torch already installed (see README and shared/spec/build-notes.md).
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import setup

PACKAGES = ["xsam", "xsam.ops", "xsam.ops.verify", "xsam.optim", "xsam.integrations", "xsam.experiment", "xsam.kernels", "xsam.bench"]
# The Triton kernels (kernels/) and the benchmark harness (bench/) live at the top of the
# repository and ship as xsam.kernels and xsam.bench: their sources, in xsam/kernels/ and
# xsam/bench/ of a wheel, beside the modules xsam/kernels.py and xsam/bench.py that make them
# packages (xsam/_source_folders.py says why the folders have no __init__.py).
PACKAGE_DIR = {"xsam": "xsam", "xsam.kernels": "kernels", "xsam.bench": "bench"}

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_build_info():
    # By path: `import xsam.build_info` would run xsam/__init__.py, which needs torch and the
    # extension this script is about to build.
    spec = importlib.util.spec_from_file_location("_xsam_build_info", os.path.join(HERE, "xsam", "build_info.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build_info = _load_build_info()


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


def _choose_arch_list(cuda_home: str) -> tuple[list[str] | None, str]:
    """Set TORCH_CUDA_ARCH_LIST when unset; return (nvcc's codes or None, where the list came from)."""
    nvcc_codes = build_info.nvcc_gpu_codes(os.path.join(cuda_home, "bin", "nvcc"))
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
        return nvcc_codes, "TORCH_CUDA_ARCH_LIST"
    os.environ["TORCH_CUDA_ARCH_LIST"] = build_info.default_arch_list(build_info.torch_cuda_arch_codes(), nvcc_codes)
    _warn(f"TORCH_CUDA_ARCH_LIST is not set: compiling for {os.environ['TORCH_CUDA_ARCH_LIST']} "
          f"(the installed torch's architectures that nvcc supports)")
    return nvcc_codes, "default"


def _compiled_arch_codes(cpp_extension, nvcc_codes) -> list[str]:
    """The sm_/compute_ codes torch will pass to nvcc; a clear error for a list it rejects."""
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
    # torch's own parser (named architectures, "+PTX"), the one BuildExtension uses. Private:
    # without it the record holds no codes, and the run-time coverage check is skipped.
    get_flags = getattr(cpp_extension, "_get_cuda_arch_flags", None)
    if get_flags is None:
        return []
    try:
        flags = get_flags()
    except (ValueError, IndexError) as exc:
        raise ValueError(
            f"TORCH_CUDA_ARCH_LIST={arch_list!r} is not understood ({exc}); use compute capabilities "
            f"separated by ';', each optionally with '+PTX', e.g. TORCH_CUDA_ARCH_LIST=\"8.0;8.6;9.0+PTX\", "
            f"or unset it to build for the default list") from None
    codes = build_info.codes_from_gencode_flags(flags)
    build_info.check_compilable(codes, nvcc_codes, arch_list)
    return codes


def _with_failure_fallback(base, record):
    """``base`` (torch's BuildExtension) made to record its outcome, and to install the
    pure-Python package instead of failing when the compile fails."""

    class BuildExtensionOrFallBack(base):
        def run(self):
            inplace = self.inplace  # setuptools clears it during the build and restores it only on success
            compiler = (os.environ.get("CXX") or "c++").split()[0]
            try:
                if shutil.which(compiler) is None:
                    raise RuntimeError(f"{compiler!r} is not on PATH (install g++ or set CXX)")
                super().run()
            except Exception as exc:  # whatever broke (toolchain, compile, link), the package still works
                self.inplace = inplace
                self._fall_back(f"with C++ compiler {compiler!r}: {type(exc).__name__}: {exc}")
            else:
                self._record(build_info.BuildRecord(built=True, **record))

        def _fall_back(self, failure):
            stale = self.get_ext_fullpath("xsam._C")
            if os.path.exists(stale):
                os.remove(stale)  # an older build's binary would not match these sources
            banner = "=" * 78
            _warn(f"\n{banner}\nWARNING: the compiled extension xsam._C failed to build {failure}\n"
                  f"(`pip install -v` shows the compiler's output.) Installing the pure-Python package: "
                  f"the reference and Triton backends work, backend='native' does not; `xsam info` "
                  f"repeats this reason.\n{banner}")
            self._record(build_info.BuildRecord(built=False, failure=failure, **record))

        def _record(self, outcome):
            # Next to the extension: in the source tree for an editable install, else in the
            # build directory that the wheel is made from.
            build_info.write_build_record(os.path.dirname(self.get_ext_fullpath("xsam._C")), outcome)

    return BuildExtensionOrFallBack


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

    cuda_home, nvcc_codes, arch_list_source = None, None, ""
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
            nvcc_codes, arch_list_source = _choose_arch_list(cuda_home)

    from torch.utils import cpp_extension

    sources = ["csrc/ops.cpp", "csrc/ops_cpu.cpp", "csrc/module.cpp"]
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp"]
    extra = {"cxx": cxx}
    kwargs = dict(include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    record = dict(cuda=cuda_home is not None, torch_version=torch.__version__)
    if cuda_home is not None:
        record.update(arch_codes=tuple(_compiled_arch_codes(cpp_extension, nvcc_codes)),
                      arch_list=os.environ["TORCH_CUDA_ARCH_LIST"], arch_list_source=arch_list_source)
        sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
        extra["cxx"] = cxx + ["-DXSAM_WITH_CUDA"]
        extra["nvcc"] = ["-O3", "-std=c++20", "-DXSAM_WITH_CUDA", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("xsam._C", sources, extra_compile_args=extra, **kwargs)
    else:
        ext = cpp_extension.CppExtension("xsam._C", sources, extra_compile_args=extra, **kwargs)
    build_ext = _with_failure_fallback(cpp_extension.BuildExtension.with_options(use_ninja=True), record)
    return [ext], {"build_ext": build_ext}


EXT_MODULES, CMDCLASS = extension_build()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=EXT_MODULES, cmdclass=CMDCLASS)
