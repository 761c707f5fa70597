"""Build script: the pure-Python package, plus the compiled op set (csrc/) when it can be built."""
from setuptools import setup

PACKAGES = ["xsam", "xsam.ops", "xsam.kernels", "xsam.bench"]
# The Triton kernels (kernels/) and the benchmark harness (bench/) live at the top of the
# repository and ship as xsam.kernels and xsam.bench.
PACKAGE_DIR = {"xsam": "xsam", "xsam.kernels": "kernels", "xsam.bench": "bench"}

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
