"""The optimizers: SAM (and ASAM), XSAM, EigenSAM, built on one step protocol (``xsam.optim.base``)."""
from .base import GLOBAL, SharpnessAware
from .eigensam import EigenSAM
from .eigenvector import HVP_MODES
from .functional import CORRECTIONS
from .model_state import batchnorm_statistics_frozen, eval_mode
from .sam import SAM
from .xsam import XSAM

__all__ = ["CORRECTIONS", "EigenSAM", "GLOBAL", "HVP_MODES", "SAM", "SharpnessAware", "XSAM",
           "batchnorm_statistics_frozen", "eval_mode"]
