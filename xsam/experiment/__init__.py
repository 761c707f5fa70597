"""``xsam experiment``: does X-SAM's correction, or Eigen-SAM's tilt, regularise curvature?

Arms (``xsam.experiment.arms``): SGD, SAM, the normalised control (X-SAM with alpha 0), X-SAM
(signed, symmetric, acute; several alpha), X-SAM at SAM's scale, Eigen-SAM. Tasks
(``xsam.experiment.tasks``, all offline): MNIST-1D (CNN; the MLP for the baseline check),
scikit-learn's digits, breast cancer, and a synthetic valley with a cubic term along its sharp
direction. One run (``xsam.experiment.run``) records accuracy, the top Hessian eigenvalue at
the end and at matched training loss, the gradient-eigenvector angle and the exact count of
gradient evaluations; the time per step comes from a separate interleaved timing phase
(``xsam.experiment.timing``).

Outputs in ``--out``: ``runs.csv`` (one row per run), ``curves.csv`` (per evaluation point),
``matched.csv`` (the eigenvalue at each training-loss level crossed), ``timing.csv``,
``summary.csv`` (per task and arm), ``table.md`` and ``experiment.png``.
"""
from .arms import DEFAULT_ARMS, Arm, ScaledXSAM, parse_arm
from .cli import QUICK_ARMS, build_parser, main
from .report import common_levels, summarize
from .run import LOSS_LEVELS, Settings, run_one, settings_for
from .tasks import TASKS, CubicValley, load_task, make_model
from .timing import time_arms

__all__ = ["DEFAULT_ARMS", "LOSS_LEVELS", "QUICK_ARMS", "TASKS", "Arm", "CubicValley", "ScaledXSAM", "Settings",
           "build_parser", "common_levels", "load_task", "main", "make_model", "parse_arm", "run_one",
           "settings_for", "summarize", "time_arms"]
