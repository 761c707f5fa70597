"""Eigen-SAM: SAM whose ascent is tilted toward the top Hessian eigenvector (Luo et al., NeurIPS 2024)."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .base import FirstPassSums, StepTransaction
from .eigenvector_base import EigenvectorBase, passed_on
from .functional import eigensam_tilt
from .lists import GroupLists, ParamLists
from .validation import check_number, register_arguments

__all__ = ["EigenSAM"]


@register_arguments
class EigenSAM(EigenvectorBase):
    r"""Eigen-SAM: the perturbation leans toward the top Hessian eigenvector v (docs/algorithm.md).

    Every ``eig_interval`` steps (step 0 included) v is refreshed exactly as for ``XSAM`` (same
    schedule, HVP modes, power iteration, rejection rule). Then, with ``g`` the first pass's
    gradient, ``gh = g / (||g|| + eps)``, ``c = <gh, v>`` and ``s = sign(<g, v>)``::

        e = rho * (gh + alpha * s * (v - c * gh))      (not renormalised)
          = a * g + b * v,   a = rho * (1 - alpha * |c|) / (||g|| + eps),   b = rho * alpha * s

    ``g_adv = grad L(w + e)``, ``w`` is restored bit-exactly and the base optimizer steps with
    the raw ``g_adv`` (as SAM). ``s * v`` does not depend on the sign of v, so neither does the
    step; ``alpha = 0`` is SAM. Before the first v exists the step is SAM. Steps are
    all-or-nothing, as for ``SAM``.

    There is no ``adaptive`` (ASAM) option: Eigen-SAM's tilt is defined for SAM's ascent only.
    Diagnostics (``diagnostics()``, ``register_diagnostics_hook``): those of ``XSAM`` that concern
    the first pass and v (``grad_norm``, ``cos_g_v``, ``eigenvalue``, ``eigen_residual``,
    ``refresh_rejected``), and ``tilt_a``, ``tilt_b``: the ``a`` and ``b`` of the first param group.

    Args:
        params, base_optimizer, rho, model, per_replica_perturbation, process_group, backend, eps,
        max_grad_norm, **base_kwargs: as for ``SAM``; a param group may set its own ``rho`` and
            ``alpha``.
        alpha (float, default 0.2): tilt toward v, >= 0 (the authors tuned it over 0.05-0.2).
        eig_interval (int, default 5): steps between eigenvector refreshes (the authors used 100).
        eig_interval_max (int, default None): an adaptive schedule, as for ``XSAM``.
        power_iters (int, default 5): power iterations per refresh.
        eig_tol (float, default None): stop a refresh early once the eigenvalue and the residual
            settle to this relative tolerance.
        hvp (str, default "auto"): "exact" (needs ``step(closure, loss_fn)``), "finite_difference",
            "forward_difference" or "auto", as for ``XSAM``.
        hvp_eval_mode (bool, default True): run the HVPs with ``model`` in eval mode.
        seed (int, default 0): seed of the first start vector, in [0, 2**64).
    """

    KIND = "EigenSAM"

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2, eig_interval: int = 5,
                 eig_interval_max: int | None = None, power_iters: int = 5, eig_tol: float | None = None,
                 hvp: str = "auto",
                 model: nn.Module | None = None, hvp_eval_mode: bool = True, seed: int = 0,
                 per_replica_perturbation: bool = False, process_group="auto", backend: str = "auto",
                 eps: float | None = None, max_grad_norm: float | None = None, **base_kwargs):
        super().__init__(params, base_optimizer, {"rho": rho, "alpha": alpha}, **passed_on(locals()))

    def _check_hyperparameters(self, values: dict, where: str) -> None:
        super()._check_hyperparameters(values, where)
        values["alpha"] = check_number("alpha", values["alpha"], 0.0, where=where,
                                       hint="alpha=0 is SAM; the authors used 0.05-0.2.")

    def _first_pass_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> FirstPassSums:
        """``||g||^2`` and ``<g, v>`` in one fused reduction (just ``||g||^2`` before the first v)."""
        return self._gradient_and_v_sums(txn, active, grads) or super()._first_pass_sums(txn, active, grads)

    def _perturb_group(self, txn: StepTransaction, active: ParamLists, group: GroupLists, grads: list[Tensor],
                       sums: FirstPassSums) -> None:
        if sums.vecs is None:  # before the first v: SAM's ascent
            super()._perturb_group(txn, active, group, grads, sums)
            return
        tilt = eigensam_tilt(sums.inv_norm, sums.gv, group.group["rho"], group.group["alpha"])
        if group is active.groups[0]:  # the coefficients of the first group (the others differ by rho, alpha)
            txn.diagnostics.update(tilt_a=tilt.a, tilt_b=tilt.b)
        ops.tilted_perturb_(group.of(active.params), grads, group.of(active.saved), group.of(sums.vecs), tilt.a,
                            tilt.b, backend=self.backend, layout=group.layout)
