"""The per-layer reading of X-SAM (experiment arm ``layerwise-<rule>-<alpha>``).

The ascent is SAM's (global); then per layer ``l`` (a module that owns parameters, so a weight
and its bias share one Hessian block) ``gh_l = g_adv_l / ||g_adv_l||``, ``c_l = <gh_l, v_l>`` and
``g_l = gh_l - alpha * beta(c_l) * v_l`` with the rules of ``xsam.optim.functional.xsam_correction``,
``v_l`` the top eigenvector of the layer's diagonal Hessian block, refreshed every ``eig_interval``
steps by power iteration at the unperturbed weights (BatchNorm in eval mode). Plain torch, for the
experiment's small CPU models; why it is not an option of ``xsam.XSAM``: docs/results/README.md.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..optim.functional import xsam_correction
from ..optim.model_state import batchnorm_statistics_frozen, eval_mode

__all__ = ["LayerwiseXSAM", "layers_of"]


def layers_of(model: nn.Module) -> list[list[nn.Parameter]]:
    """The parameters of every module that owns some directly, in module order."""
    layers = [[p for p in m.parameters(recurse=False) if p.requires_grad] for m in model.modules()]
    return [layer for layer in layers if layer]


class LayerwiseXSAM(torch.optim.SGD):
    """SGD (with its usual arguments) stepping along the per-layer X-SAM direction."""

    def __init__(self, model: nn.Module, *, rho: float, alpha: float, rule: str = "signed", eig_interval: int = 5,
                 power_iters: int = 5, seed: int = 0, eps: float = 1e-12, **sgd):
        self.layers = layers_of(model)
        self.params = [p for layer in self.layers for p in layer]
        super().__init__(self.params, **sgd)
        self.model, self.rho, self.alpha, self.rule = model, rho, alpha, rule
        self.eig_interval, self.power_iters, self.eps = eig_interval, power_iters, eps
        gen = torch.Generator().manual_seed(seed)
        self.vectors = [_unit([torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) for p in layer])
                        for layer in self.layers]
        self.eigenvalues = [0.0] * len(self.layers)
        self.steps = self.refreshes = 0

    def diagnostics(self) -> dict:
        return dict(refresh_attempts=self.refreshes, hvps=self.refreshes * self.power_iters * len(self.layers))

    def refresh(self, loss_fn) -> None:
        """``power_iters`` power iterations on every layer's diagonal Hessian block (eval mode)."""
        with eval_mode(self.model):
            grads = torch.autograd.grad(loss_fn(), self.params, create_graph=True)
            start = 0
            for i, layer in enumerate(self.layers):
                mine = grads[start:start + len(layer)]
                start += len(layer)
                for _ in range(self.power_iters):
                    dot = sum((g * v).sum() for g, v in zip(mine, self.vectors[i]))
                    hv = torch.autograd.grad(dot, layer, retain_graph=True)
                    self.eigenvalues[i] = float(sum((h * v).sum() for h, v in zip(hv, self.vectors[i])))
                    self.vectors[i] = _unit([h.detach() for h in hv], self.eps)
        self.refreshes += 1

    def step(self, closure, loss_fn):
        if self.steps % self.eig_interval == 0:
            self.refresh(loss_fn)
        self.zero_grad(set_to_none=True)
        loss = closure()
        g = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        scale = self.rho / (torch.sqrt(sum((x * x).sum() for x in g)) + self.eps)
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, x in zip(self.params, g):
                p.add_(x, alpha=float(scale))
        self.zero_grad(set_to_none=True)
        with batchnorm_statistics_frozen(self.model):  # the second pass does not move the running statistics
            closure()
        with torch.no_grad():
            for p, w in zip(self.params, saved):
                p.copy_(w)  # exact restore
            for layer, v in zip(self.layers, self.vectors):
                adv = [p.grad if p.grad is not None else torch.zeros_like(p) for p in layer]
                gg = sum((a * a).sum() for a in adv)
                gv = sum((a * u).sum() for a, u in zip(adv, v))
                corr = xsam_correction(gg, gv, normalize=True, rule=self.rule, eps=self.eps)
                for p, a, u in zip(layer, adv, v):
                    p.grad = corr.a * a - self.alpha * corr.beta * u
        super().step()
        self.steps += 1
        return loss


def _unit(vector: list[Tensor], eps: float = 1e-12) -> list[Tensor]:
    norm = torch.sqrt(sum((x * x).sum() for x in vector))
    return [x / (norm + eps) for x in vector]
