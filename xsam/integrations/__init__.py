"""Run SAM and X-SAM inside the trainers people already use.

- ``xsam.integrations.lightning.XSAMCallback``: PyTorch Lightning (``pip install torch-xsam[lightning]``);
- ``xsam.integrations.transformers.XSAMTrainer``: the Hugging Face ``Trainer``
  (``pip install torch-xsam[transformers]``).

Import the submodule you need: this package imports neither framework itself, so
``import xsam`` stays light and works without them.

Both share one design, described in ``xsam.integrations._common``: the trainer's own loop is
the first pass, and the optimizer step replays the same micro-batches for the second.
"""

__all__: list[str] = []
