"""Run SAM and X-SAM inside the trainers people already use: ``xsam.integrations.lightning.XSAMCallback`` for
PyTorch Lightning (``pip install torch-xsam[lightning]``), ``xsam.integrations.transformers.XSAMTrainer`` for the
Hugging Face ``Trainer`` (``pip install torch-xsam[transformers]``).

Import the submodule you need: this package imports neither framework, so ``import xsam`` works without them.
"""

__all__: list[str] = []
