"""The optimizers: SAM (and ASAM), XSAM, EigenSAM, built on one step protocol (``xsam.optim.base``)."""
from .base import GLOBAL, SharpnessAware
from .eigenvector import HVP_MODES
from .eigenvector_base import EigenvectorBase
from .functional import CORRECTIONS
from .model_state import batchnorm_statistics_frozen, eval_mode
# In the order messages name them ("It is an argument of XSAM and EigenSAM"): SAM, XSAM, EigenSAM.
from .sam import SAM  # isort: skip
from .xsam import XSAM  # isort: skip
from .eigensam import EigenSAM  # isort: skip

__all__ = ["CORRECTIONS", "EigenSAM", "EigenvectorBase", "GLOBAL", "HVP_MODES", "SAM", "SharpnessAware", "XSAM",
           "batchnorm_statistics_frozen", "eval_mode"]
