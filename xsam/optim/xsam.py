"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector."""
from __future__ import annotations

from torch import Tensor, nn

from .. import ops
from .base import FirstPassSums, StepTransaction
from .eigenvector_base import EigenvectorBase, passed_on
from .functional import CORRECTIONS, inverse_norm, xsam_correction
from .lists import ParamLists
from .streaming import StreamingUpdate
from .validation import check_bool, check_choice, check_number, register_arguments

__all__ = ["XSAM"]


@register_arguments
class XSAM(EigenvectorBase):
    r"""X-SAM: SAM whose perturbed gradient is corrected along the top Hessian eigenvector (docs/algorithm.md).

    Every ``eig_interval`` steps (step 0 included) the top eigenvector v of the mini-batch
    Hessian at the unperturbed weights is refreshed by ``power_iters`` power iterations
    (warm-started from the previous v). Then, with ``gh = g_adv / (||g_adv|| + eps)``
    (``normalize=True``) and ``c = <gh, v>``, the base optimizer steps with
    ``gh - alpha * beta(c) * v``, ``beta = |c|`` ("signed"), ``c`` ("symmetric") or ``max(c, 0)``
    ("acute"). Steps are all-or-nothing, as for ``SAM``.

    Args:
        params, base_optimizer, rho, adaptive, model, per_replica_perturbation, process_group,
        backend, eps, max_grad_norm, **base_kwargs: as for ``SAM``; a param group may set its own
            ``rho`` and ``alpha``.
        alpha (float, default 0.2): correction strength in [0, 2]; 0 is SAM with a normalised
            gradient, 1 removes the component along v ("symmetric").
        correction (str, default "signed"): "signed" | "symmetric" | "acute".
        normalize (bool, default True): correct the normalised g_adv (the authors' rule).
        eig_interval (int, default 5): steps between eigenvector refreshes.
        eig_interval_max (int, default None): an adaptive schedule: after a refresh, the interval
            doubles (up to this) while successive refreshes agree (|cos(v_new, v_old)| >= 0.9), and
            falls back to ``eig_interval`` when they do not; read a refresh late, so no step waits
            on the device. None: every ``eig_interval`` steps.
        power_iters (int, default 5): power iterations per refresh.
        eig_tol (float, default None): stop a refresh early once the eigenvalue and the residual
            settle to this relative tolerance (reads them on the host each iteration).
        hvp (str, default "auto"): "exact" (needs ``step(closure, loss_fn)``), "finite_difference"
            (2 evaluations per product), "forward_difference" (1 per product, reusing the first
            pass), "auto" (exact with a ``loss_fn``, else finite differences), or "streaming"
            (no evaluation: every step updates v from the product its two passes contain, by
            Oja's rule; ``eig_interval``, ``power_iters`` and ``eig_tol`` are not used, and the
            eigenvalue is not estimated: NaN in the diagnostics).
        hvp_eval_mode (bool, default True): run the HVPs with ``model`` in eval mode. With
            "forward_difference" this costs one more evaluation per refresh (grad L(w) in eval
            mode); False reuses the first pass's gradient (train-mode Hessian, BatchNorm
            statistics still frozen; needs a model without dropout or other randomness).
        seed (int, default 0): seed of the first start vector, in [0, 2**64).
    """

    KIND = "XSAM"
    STREAMING = True

    def __init__(self, params, base_optimizer, *, rho: float = 0.05, alpha: float = 0.2,
                 correction: str = "signed", normalize: bool = True, adaptive: bool = False,
                 eig_interval: int = 5, eig_interval_max: int | None = None, power_iters: int = 5,
                 eig_tol: float | None = None, hvp: str = "auto",
                 model: nn.Module | None = None, hvp_eval_mode: bool = True, seed: int = 0,
                 per_replica_perturbation: bool = False, process_group="auto", backend: str = "auto",
                 eps: float | None = None, max_grad_norm: float | None = None, **base_kwargs):
        check_choice("correction", correction, CORRECTIONS)
        check_bool("normalize", normalize)
        check_bool("adaptive", adaptive, "True: ASAM's perturbation")
        self.correction = correction
        self.normalize = normalize
        self.adaptive = adaptive
        self._streaming = StreamingUpdate()
        super().__init__(params, base_optimizer, {"rho": rho, "alpha": alpha}, **passed_on(locals()))

    def _check_hyperparameters(self, values: dict, where: str) -> None:
        super()._check_hyperparameters(values, where)
        values["alpha"] = check_number("alpha", values["alpha"], 0.0, 2.0, where=where,
                                       hint="alpha=0 is SAM, 1 removes the component along v.")

    def _first_pass_sums(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> FirstPassSums:
        if self.tracker.streaming:
            txn.first_pass_gradient = self._streaming.capture_first_pass(self._tracker_inputs, txn.lists, active,
                                                                         grads)
        sums = self._gradient_and_v_sums(txn, active, grads)
        if sums is None or self.adaptive:  # the ascent is SAM's (ASAM's); only the descent uses v
            return super()._first_pass_sums(txn, active, grads)
        return sums

    def _descent(self, txn: StepTransaction, active: ParamLists, grads: list[Tensor]) -> None:
        vecs = self._vectors(txn, active)
        if txn.first_pass_gradient is not None:  # streaming: this step's v, updated from g - g_adv, corrects it
            streamed = self._streaming.stream(self._tracker_inputs, txn.lists, txn.first_pass_gradient, active,
                                              grads, vecs)
            txn.refresh, vecs, gg, gv = streamed.refresh, streamed.vectors, streamed.gg, streamed.gv
        elif vecs is None:  # before the first v: the normalised (or raw) g_adv
            gg = ops.dots([grads], [(0, 0)], backend=self.backend, layout=active.layout)[0]
            a = inverse_norm(gg, self.eps) if self.normalize else 1.0
            txn.diagnostics["adv_grad_norm"] = gg.sqrt()
            for g in active.groups:
                ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), None, a, 0.0,
                                     backend=self.backend, layout=g.layout)
            return
        else:
            gg, gv = ops.dots([grads, vecs], [(0, 0), (0, 1)], backend=self.backend, layout=active.layout).unbind()
        corr = xsam_correction(gg, gv, normalize=self.normalize, rule=self.correction, eps=self.eps)
        txn.diagnostics.update(adv_grad_norm=corr.adv_grad_norm, cos_gadv_v=corr.cos_gadv_v, correction=corr.beta)
        for g in active.groups:
            ops.correct_restore_(g.of(active.params), g.of(grads), g.of(active.saved), g.of(vecs), corr.a,
                                 g.group["alpha"] * corr.beta, backend=self.backend, layout=g.layout)

    def scratch_tensors(self) -> list[Tensor]:
        return super().scratch_tensors() + self._streaming.scratch_tensors()
