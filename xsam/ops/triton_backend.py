"""Adapter from the op set to the Triton kernels in ``xsam.kernels`` (not written yet)."""
UNAVAILABLE_REASON = "the Triton kernels are not implemented yet"
