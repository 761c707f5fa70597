"""SAM and ASAM (Foret et al., 2021; Kwon et al., 2021) around any base optimizer."""
from __future__ import annotations

from torch import nn

from .base import SharpnessAware
from .validation import check_bool, register_arguments

__all__ = ["SAM"]


@register_arguments
class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization around any base optimizer.

    Each step: ``g = grad L(w)``; ``e = rho * g / (||g|| + eps)`` (ASAM: ``rho * w*w*g / (||w*g|| + eps)``);
    ``g_adv = grad L(w + e)``; ``w`` restored bit-exactly; the base optimizer steps with ``g_adv``.

    ``SAM(params, torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)``; ``step(closure)`` where the
    closure runs forward and backward and returns the loss (it need not zero gradients: the
    optimizer clears them before each pass). Steps are all-or-nothing: if anything raises (the
    closure included) the weights, BatchNorm statistics of ``model`` and the optimizer state are
    left as they were. ``first_step()`` / ``second_step()`` are for loops that run the passes
    themselves.

    Args:
        params: parameters or param groups (a group may set its own ``rho``).
        base_optimizer: a ``torch.optim.Optimizer`` subclass (built over the same param groups
            with ``**base_kwargs``) or an optimizer already built over the same parameters.
        rho (float, default 0.05): perturbation radius (finite, >= 0).
        adaptive (bool, default False): ASAM's element-wise perturbation.
        model (nn.Module, default None): the model being trained; its BatchNorm running statistics
            are then updated by the first pass only, and restored if a step fails. Required for
            ``per_replica_perturbation`` (the DDP module).
        per_replica_perturbation (bool, default False): under DDP, run the first pass under
            ``model.no_sync()`` so each replica perturbs by its own gradient (docs/distributed.md).
        process_group (default "auto"): where Hessian-vector products are averaged (X-SAM,
            Eigen-SAM; unused by SAM): "auto" takes a DDP model's group, or a group, or None.
        backend (str, default "auto"): op-set backend, "auto" | "reference" | "triton" | "native".
        eps (float, default None = 1e-12): keeps ``1 / (||g|| + eps)`` finite (finite, > 0). With a base
            optimizer class that takes ``eps`` too (Adam), pass that optimizer built: the name is ambiguous.
        max_grad_norm (float, default None): clip the gradient handed to the base optimizer to this
            norm (as ``clip_grad_norm_``, after the second pass); the first pass and HVPs never see it.
        **base_kwargs: arguments of the base optimizer class (lr, momentum, weight_decay, ...).
    """

    KIND = "SAM"

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None, per_replica_perturbation: bool = False, process_group="auto",
                 backend: str = "auto", eps: float | None = None, max_grad_norm: float | None = None, **base_kwargs):
        check_bool("adaptive", adaptive, "True: ASAM, False: SAM")
        self.adaptive = adaptive
        super().__init__(params, base_optimizer, {"rho": rho}, model=model,
                         per_replica_perturbation=per_replica_perturbation, process_group=process_group,
                         backend=backend, eps=eps, max_grad_norm=max_grad_norm, base_kwargs=base_kwargs)
