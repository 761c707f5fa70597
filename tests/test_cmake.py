"""The CMake build (CMakeLists.txt) of the op set: configure, build, load, compare one op."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch.utils

ROOT = Path(__file__).resolve().parents[1]
CMAKE = shutil.which("cmake")

pytestmark = pytest.mark.skipif(CMAKE is None, reason="cmake is not installed (apt-get install cmake, "
                                                       "or pip install cmake)")


def test_cmake_build_loads_and_matches_reference(tmp_path):
    build = tmp_path / "build"
    env = dict(os.environ, MAKEFLAGS="-j2")
    configure = subprocess.run(
        [CMAKE, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        capture_output=True, text=True, env=env, timeout=300)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    compile_ = subprocess.run([CMAKE, "--build", str(build), "-j2"], capture_output=True, text=True, env=env,
                              timeout=600)
    assert compile_.returncode == 0, compile_.stdout[-3000:] + compile_.stderr[-3000:]
    library = build / "libxsam_ops.so"
    assert library.exists()
    # A fresh process without xsam (whose xsam._C registers kernels for the same ops): the schemas come from
    # the contract module alone (it imports only torch), loaded from its file; the library adds its kernels.
    contract = ROOT / "xsam" / "ops" / "contract.py"
    code = textwrap.dedent(f"""
        import importlib.util, sys, torch
        spec = importlib.util.spec_from_file_location("contract", {str(contract)!r})
        contract = sys.modules["contract"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(contract)
        contract.define_schemas("xsam")
        torch.ops.load_library({str(library)!r})
        gen = torch.Generator().manual_seed(0)
        xs = [torch.randn(n, generator=gen) for n in (1, 7, 16385)]
        ys = [torch.randn(n, generator=gen) for n in (1, 7, 16385)]
        fx, fy = torch.cat(xs).double(), torch.cat(ys).double()
        got = torch.ops.xsam.dots(xs + ys, 2, [0, 0, 0, 1])
        want = torch.stack([fx @ fx, fx @ fy]).float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)
        alpha = torch.tensor(0.5)
        torch.ops.xsam.axpy_(ys, xs, alpha)
        torch.testing.assert_close(torch.cat(ys).double(), fy + 0.5 * fx, rtol=1e-6, atol=1e-6)
        print("ok")
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
