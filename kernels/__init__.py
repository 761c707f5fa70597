"""Triton kernels for the xsam op set (shipped as ``xsam.kernels``; importing a module imports triton).

- ``primitives``: the table layout and the loads, stores and rounding every kernel shares;
- ``plans``: the host side: launch configuration and the cached address tables;
- ``elementwise``: perturb, tilted perturb, correct-and-restore, axpy, scale-copy;
- ``reductions``: dot products, the ASAM norm, the power-iteration residual.
``xsam.ops.triton_backend`` registers them as the ops ``torch.ops.xsam_triton.*``.
"""
