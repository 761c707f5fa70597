"""xsam: X-SAM (Sharpness-Aware Minimization with dominant-eigenvector gradient correction) for PyTorch."""
from . import amp, distributed, hessian, ops
from .hessian import exact_hvp, finite_difference_hvp, power_iteration
from .ops import BackendUnavailableError
from .optim import SAM, XSAM, EigenSAM, batchnorm_statistics_frozen

__version__ = "0.1.0"

__all__ = ["SAM", "XSAM", "EigenSAM", "BackendUnavailableError", "amp", "distributed",
           "batchnorm_statistics_frozen", "exact_hvp", "finite_difference_hvp", "hessian", "ops",
           "power_iteration"]
