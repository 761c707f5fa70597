"""Triton kernels for the xsam op set, registered by ``xsam.ops.triton_backend`` (importing a submodule
imports triton). The sources are the repository's ``kernels/`` folder (``xsam/_source_folders.py`` says why).
"""
from xsam._source_folders import source_folder

__path__ = source_folder("kernels")
