"""Triton kernels for the xsam op set (shipped as ``xsam.kernels``)."""
