"""Triton kernels for the xsam op set (importing a submodule imports triton).

- ``primitives``: the table layout and the loads, stores and rounding every kernel shares;
- ``plans``: the host side: launch configuration and the cached address tables;
- ``elementwise``: perturb, tilted perturb, correct-and-restore, axpy, scale-copy;
- ``reductions``: dot products, the ASAM norm, the power-iteration residual.
``xsam.ops.triton_backend`` registers them as the ops ``torch.ops.xsam_triton.*``. The sources are
the repository's ``kernels/`` folder (``xsam/_source_folders.py`` says why it is not a package).
"""
from xsam._source_folders import source_folder

__path__ = source_folder("kernels")
