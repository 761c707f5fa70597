"""``xsam experiment``: does X-SAM's correction, or Eigen-SAM's tilt, regularise curvature?

The outputs in ``--out`` and the method: docs/results/README.md, "What was run" and "Method".
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
