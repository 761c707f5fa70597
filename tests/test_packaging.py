"""The three ways to install: the sdist carries everything a build needs, a wheel installs into a
fresh environment, and a build without a working compiler still installs the pure-Python package.

Each install goes into a fresh virtual environment that sees this one's torch through a .pth
file but not its editable xsam (whose import hook would otherwise serve the checkout's xsam._C).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

import xsam
from xsam import build_info
from xsam.build_info import RECORD_NAME

ROOT = Path(__file__).resolve().parents[1]
# The distribution is torch-xsam (the name xsam is taken on PyPI); the import name and command are xsam.
DIST = f"torch_xsam-{xsam.__version__}"

# Runs inside the fresh environment: one X-SAM step on the reference backend, then what
# backend="native" and `xsam info` say.
SMOKE = textwrap.dedent("""
    import sys, torch, xsam
    from xsam import cli
    assert xsam.__file__.startswith(sys.argv[1]), xsam.__file__
    import xsam.bench, xsam.kernels  # their sources lie beside them in an installed wheel
    assert xsam.kernels.__path__[0].startswith(sys.argv[1]) and callable(xsam.bench.main)
    model = torch.nn.Linear(4, 1)
    opt = xsam.XSAM(model.parameters(), torch.optim.SGD, lr=0.1, backend="reference")
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    def closure():
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    before = model.weight.detach().clone()
    opt.step(closure)
    assert not torch.equal(before, model.weight), "the step did not move the weights"
    try:
        xsam.ops.resolve("native", torch.device("cpu"), torch.float32)
        print("NATIVE: available")
    except xsam.BackendUnavailableError as exc:
        print("NATIVE:", exc)
    cli.main(["info"])
""")


def run(args, **kwargs):
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, f"{args}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def build_env(**overrides):
    kept = {k: v for k, v in os.environ.items() if k not in ("XSAM_NO_EXTENSION", "XSAM_NO_CUDA", "PYTHONPATH")}
    return {"TORCH_CUDA_ARCH_LIST": "9.0"} | kept | overrides  # one architecture keeps a CUDA compile short


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    # XSAM_NO_EXTENSION: the sdist must carry the sources through MANIFEST.in alone, not because
    # setuptools adds an extension's sources by itself.
    out = tmp_path_factory.mktemp("sdist")
    run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT],
        env=build_env(XSAM_NO_EXTENSION="1"))
    (archive,) = out.glob("*.tar.gz")
    return archive


@pytest.fixture
def unpacked(sdist, tmp_path) -> Path:
    with tarfile.open(sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / DIST


@pytest.fixture
def fresh_env(tmp_path) -> Path:
    """A new venv (python at bin/python) whose site-packages sees this environment's torch."""
    env = tmp_path / "env"
    run([sys.executable, "-m", "venv", "--without-pip", env])
    (site_packages(env) / "_parent_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env


def site_packages(env: Path) -> Path:
    return next(env.glob("lib/python*/site-packages"))


def pip_install(venv: Path, *args, env=None):
    return run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps",
                "--no-build-isolation", *args], env=env or build_env())


def smoke(env: Path, tmp_path: Path) -> str:
    # cwd away from the checkout, so `import xsam` cannot find it there.
    return run([env / "bin" / "python", "-c", SMOKE, site_packages(env)], cwd=tmp_path,
               env=build_env()).stdout


def test_sdist_has_everything_a_build_needs(sdist):
    with tarfile.open(sdist) as tar:
        names = {name.removeprefix(DIST + "/") for name in tar.getnames()}
    tracked = run(["git", "ls-files", "csrc", "kernels", "bench", "xsam", "tests"], cwd=ROOT).stdout.split() \
        if (ROOT / ".git").exists() else []
    needed = {"setup.py", "pyproject.toml", "MANIFEST.in", "CMakeLists.txt", "README.md", "LICENSE",
              "csrc/cuda/multi_tensor_apply.cuh", "csrc/xsam_ops.h", "kernels/elementwise.py", "bench/device_check.sh",
              "xsam/build_info.py", *tracked}
    assert not needed - names, f"missing from the sdist: {sorted(needed - names)}"
    assert not [n for n in names if n.endswith(".so") or n.endswith(RECORD_NAME)], names


def test_wheel_installs_and_imports_in_a_fresh_environment(unpacked, fresh_env, tmp_path):
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, unpacked],
        env=build_env(XSAM_NO_EXTENSION="1"))
    (wheel,) = dist.glob("*.whl")
    assert wheel.name == f"{DIST}-py3-none-any.whl"  # no extension: a pure wheel
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(f"{DIST}.dist-info/METADATA").decode()
    assert {"xsam/kernels.py", "xsam/kernels/plans.py", "xsam/bench.py", "xsam/bench/ops_bench.py",
            "xsam/ops/native_backend.py"} <= names
    assert not [n for n in names if n.startswith(("kernels/", "bench/"))], "top-level packages in the wheel"
    for line in ("License-Expression: MIT", "Requires-Python: >=3.10", "Requires-Dist: torch>=2.4",
                 "Classifier: Programming Language :: Python :: 3.11", f"Version: {xsam.__version__}"):
        assert line in metadata

    pip_install(fresh_env, wheel)
    out = smoke(fresh_env, tmp_path)
    assert "xsam._C build: no build record" in out
    assert "NATIVE: backend='native' cannot run" in out and "xsam._C is not built" in out
    assert "xsam._C build: no build record" in run([fresh_env / "bin" / "xsam", "info"], cwd=tmp_path).stdout


def test_a_failed_compile_installs_the_pure_python_package(unpacked, fresh_env, tmp_path):
    # `false` as the compiler: found on PATH, fails every call, as a broken toolchain does.
    installed = pip_install(fresh_env, "-v", unpacked, env=build_env(CC="false", CXX="false"))
    assert "WARNING: the compiled extension xsam._C failed to build with C++ compiler 'false'" in installed.stderr
    package = site_packages(fresh_env) / "xsam"
    assert not list(package.glob("_C*.so"))
    record = json.loads((package / RECORD_NAME).read_text())
    assert record["built"] is False and "'false'" in record["failure"]

    out = smoke(fresh_env, tmp_path)
    assert "NATIVE: backend='native' cannot run" in out and "failed to build" in out and "pip install" in out
    assert "the build failed with C++ compiler 'false'" in out
    assert "xsam._C build: failed at install with C++ compiler 'false'" in out
    assert "reference  cpu     available" in out


def test_a_failed_compile_of_an_editable_install_records_it_in_the_source_tree(unpacked, fresh_env, tmp_path):
    # The editable build writes in place; a binary left by an earlier build must not outlive the failure.
    stale = unpacked / "xsam" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    stale.write_bytes(b"an earlier build")
    pip_install(fresh_env, "-e", unpacked, env=build_env(CC="false", CXX="false"))
    assert not stale.exists()
    assert json.loads((unpacked / "xsam" / RECORD_NAME).read_text())["built"] is False


@pytest.mark.slow
@pytest.mark.parametrize("arch_list", ["9.0", None], ids=["one-arch", "default-arch-list"])
def test_wheel_with_the_compiled_extension(unpacked, fresh_env, tmp_path, arch_list):
    """The full build, CUDA too when torch and nvcc can."""
    env = build_env()
    if arch_list is None:
        env.pop("TORCH_CUDA_ARCH_LIST")
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-w", dist, unpacked], env=env)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert any(name.startswith("xsam/_C") and name.endswith(".so") for name in zf.namelist())
        record = json.loads(zf.read(f"xsam/{RECORD_NAME}"))
    assert record["built"] is True
    if record["cuda"]:
        if arch_list is None:
            nvcc = Path(env.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
            expected = build_info.default_arch_list(build_info.torch_cuda_arch_codes(), build_info.nvcc_gpu_codes(nvcc))
            assert (record["arch_list"], record["arch_list_source"]) == (expected, "default")
        else:
            assert record["arch_codes"] == ["sm_90"]
        # What nvcc was really asked to compile: every recorded code, as torch's ninja file has it.
        (ninja_file,) = unpacked.glob("build/temp*/build.ninja")
        gencodes = build_info.codes_from_gencode_flags(ninja_file.read_text().split())
        assert sorted(gencodes) == sorted(record["arch_codes"]), (gencodes, record)
    pip_install(fresh_env, wheel)
    out = smoke(fresh_env, tmp_path)
    assert "NATIVE: available" in out and "native     cpu     available" in out


# What each shadowed name's xsam subpackage must still do from the checkout's root.
STILL_RUNS = {
    "kernels": "import torch, xsam.kernels.elementwise; from xsam import ops; y = [torch.zeros(5)]; "
               "ops.axpy_(y, [torch.ones(5)], 2.0, backend='triton'); assert torch.equal(y[0], torch.full((5,), 2.0))",
    "bench": "from xsam.bench import main; from xsam.bench.models import PARAMETER_SETS; "
             "assert main and PARAMETER_SETS",
}


@pytest.mark.parametrize("name", sorted(STILL_RUNS))
def test_the_checkout_shadows_no_installed_package_of_a_folder_name(tmp_path, name):
    """From the repository's root, first on sys.path (as with ``python -m pytest``), ``import kernels``
    gets the installed package of that name (transformers imports Hugging Face's), not the
    checkout's folder; xsam's subpackage of that folder still imports and runs."""
    (tmp_path / f"{name}.py").write_text("INSTALLED = True\n")
    check = f"import {name}; assert getattr({name}, 'INSTALLED', False), {name}; {STILL_RUNS[name]}"
    env = build_env(PYTHONPATH=str(tmp_path))
    env["TRITON_INTERPRET"] = "1"  # the kernel runs on CPU tensors, in Triton's interpreter
    run([sys.executable, "-c", check], cwd=ROOT, env=env)
