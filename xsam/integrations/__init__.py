"""Run SAM and X-SAM inside the trainers people already use.

- ``xsam.integrations.lightning.XSAMCallback``: PyTorch Lightning (``pip install torch-xsam[lightning]``);
- ``xsam.integrations.transformers.XSAMTrainer``: the Hugging Face ``Trainer``
  (``pip install torch-xsam[transformers]``).

Import the submodule you need: this package imports neither framework itself, so
``import xsam`` stays light and works without them.

Both integrations share one design (``xsam.integrations._common``): the trainer's own
loop runs the first pass (forward and backward of every micro-batch of the
accumulated batch, with its usual logging, mixed precision and DDP gradient
synchronisation); the optimizer step then replays the same micro-batches at the
perturbed weights for the second pass. Hessian-vector products are exact, from a
forward-only loss built from the same micro-batches.
"""

__all__: list[str] = []
