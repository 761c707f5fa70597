"""Triton kernels for the xsam op set (shipped as ``xsam.kernels``).

The kernels live in ``xsam.kernels.multi_tensor`` (importing it imports triton);
``xsam.ops.triton_backend`` adapts them to the op-set contract.
"""
