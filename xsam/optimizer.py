"""Compatibility module: the optimizers live in ``xsam.optim`` (one module per concern)."""
from .optim import CORRECTIONS, HVP_MODES, SAM, XSAM, batchnorm_statistics_frozen, eval_mode
from .optim.base import GradientCheck

__all__ = ["CORRECTIONS", "HVP_MODES", "SAM", "XSAM", "GradientCheck", "batchnorm_statistics_frozen", "eval_mode"]
