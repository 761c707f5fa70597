"""Hand-written baselines the op set is measured against: what a skilled user writes without xsam.

- ``foreach_*`` (``skilled_foreach``): the op on whole lists with ``torch._foreach_*``, scalars
  kept on the device (no ``.item()``), no full-size temporary where PyTorch has an in-place
  form. It does not go through the op layer (no dispatch, no grouping): the reference backend
  must stay within 1.15x of it.
- ``loop_*`` (``per_param_loop``): a Python loop over the tensors in the style of the most
  used SAM implementation (davda54/sam), without temporaries that code does not have:
  ``torch.dot``, ``mul(out=)``, ``addcmul_``. What is faithful is kept: the norm as a
  stack of per-tensor norms, and the clone-and-swap of the weights (``old_p = p.clone()``
  before the ascent, ``p.data = old_p`` to restore, which copies nothing but allocates a
  new tensor every step).
- ``PeerSAM``: davda54/sam's SAM as it is written (its temporaries included), for whole
  training steps side by side with ``xsam.SAM`` (``bench/overhead_bench.py``).

Every function computes what the op of the same name computes (tests/test_bench.py checks
it), on the bench's argument conventions: lists aligned, scalars 0-d tensors on the device.
In fp16/bf16 the foreach baseline accumulates in fp32 as the op set does; the loop reduces in
the storage dtype, as davda54/sam does.
"""
from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-12


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _scaled_add_(ys: list[Tensor], xs: list[Tensor], scale: Tensor) -> None:
    """``y += scale * x`` with a device scalar, the best foreach form per device."""
    if ys[0].device.type == "cpu":
        # CPU foreach ops loop over the tensors in C++; a broadcast 0-d factor needs no temporary.
        torch._foreach_addcmul_(ys, xs, [scale] * len(ys))
    else:
        # On CUDA the broadcasting addcmul_ leaves the fused multi-tensor kernel (one launch per
        # tensor); one scaled temporary through the fused _foreach_mul is faster.
        torch._foreach_add_(ys, torch._foreach_mul(xs, scale))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32  # as the op set accumulates


def _sumsq(xs: list[Tensor]) -> Tensor:
    return torch.stack(torch._foreach_norm(xs, 2, dtype=_acc(xs[0].dtype))).square().sum()


def _dot(xs: list[Tensor], ys: list[Tensor]) -> Tensor:
    acc = _acc(xs[0].dtype)
    if xs[0].dtype == acc:
        return torch.stack([torch.dot(_flat(x), _flat(y)) for x, y in zip(xs, ys)]).sum()
    return torch.stack([torch.dot(_flat(x).to(acc), _flat(y).to(acc)) for x, y in zip(xs, ys)]).sum()


# ----- skilled foreach ----------------------------------------------------------------------
def foreach_dots_gg_gv(gs: list[Tensor], vs: list[Tensor]) -> Tensor:
    return torch.stack([_sumsq(gs), _dot(gs, vs)])


def foreach_weighted_sumsq(ws: list[Tensor], gs: list[Tensor]) -> Tensor:
    acc = _acc(ws[0].dtype)
    if ws[0].dtype != acc:  # products in the accumulation dtype, as the op set computes them
        ws, gs = [w.to(acc) for w in ws], [g.to(acc) for g in gs]
    return _sumsq(torch._foreach_mul(ws, gs))


def foreach_perturb_(ws: list[Tensor], gs: list[Tensor], saved: list[Tensor], scale: Tensor) -> None:
    torch._foreach_copy_(saved, ws)
    _scaled_add_(ws, gs, scale)


def foreach_correct_restore_(ws: list[Tensor], gs: list[Tensor], saved: list[Tensor], vs: list[Tensor], a: Tensor,
                             b: Tensor) -> None:
    torch._foreach_mul_(gs, a)
    _scaled_add_(gs, vs, -b)
    torch._foreach_copy_(ws, saved)


def foreach_axpy_(ys: list[Tensor], xs: list[Tensor], alpha: Tensor) -> None:
    _scaled_add_(ys, xs, alpha)


def foreach_scale_copy_(dsts: list[Tensor], srcs: list[Tensor], scale: Tensor) -> None:
    torch._foreach_copy_(dsts, srcs)
    torch._foreach_mul_(dsts, scale)


def foreach_power_update_(us: list[Tensor], vs: list[Tensor]) -> Tensor:
    uu, vu, vv = _sumsq(us), _dot(vs, us), _sumsq(vs)
    lam = vu / vv
    residual = torch._foreach_mul(vs, -lam)
    torch._foreach_add_(residual, us)
    _sumsq(residual).sqrt()
    foreach_scale_copy_(vs, us, 1.0 / (uu.sqrt() + EPS))
    return lam


# ----- per-parameter loop (davda54/sam style) -----------------------------------------------
def loop_dots_gg_gv(gs: list[Tensor], vs: list[Tensor]) -> Tensor:
    norm = torch.norm(torch.stack([g.norm(p=2) for g in gs]), p=2)  # davda54's _grad_norm
    gv = torch.stack([torch.dot(_flat(g), _flat(v)) for g, v in zip(gs, vs)]).sum()
    return torch.stack([norm * norm, gv])


def loop_weighted_sumsq(ws: list[Tensor], gs: list[Tensor]) -> Tensor:
    # davda54's adaptive norm is ||abs(w) * g||; abs does not change it, the product is needed.
    norm = torch.norm(torch.stack([(w * g).norm(p=2) for w, g in zip(ws, gs)]), p=2)
    return norm * norm


def loop_perturb_(params: list[Tensor], grads: list[Tensor], state: dict[int, Tensor], scale: Tensor) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        state[i] = p.data.clone()  # davda54: self.state[p]["old_p"] = p.data.clone()
        p.addcmul_(g, scale)


def loop_correct_restore_(params: list[Tensor], grads: list[Tensor], state: dict[int, Tensor], vecs: list[Tensor],
                          a: Tensor, b: Tensor) -> None:
    neg_b = -b
    for i, (p, g, v) in enumerate(zip(params, grads, vecs)):
        g.mul_(a).addcmul_(v, neg_b)
        p.data = state[i]  # davda54 restores by swapping the storage back, copying nothing


def loop_axpy_(ys: list[Tensor], xs: list[Tensor], alpha: float) -> None:
    for y, x in zip(ys, xs):
        y.add_(x, alpha=alpha)


def loop_scale_copy_(dsts: list[Tensor], srcs: list[Tensor], scale: Tensor) -> None:
    for d, s in zip(dsts, srcs):
        torch.mul(s, scale, out=d)


def loop_power_update_(us: list[Tensor], vs: list[Tensor]) -> Tensor:
    sums = torch.stack([torch.stack([torch.dot(u, u), torch.dot(v, u), torch.dot(v, v)])
                        for u, v in ((_flat(u), _flat(v)) for u, v in zip(us, vs))]).sum(0)
    lam = sums[1] / sums[2]
    neg_lam = -lam
    torch.stack([torch.addcmul(u, v, neg_lam).norm() for u, v in zip(us, vs)]).norm()  # the residual
    loop_scale_copy_(vs, us, 1.0 / (sums[0].sqrt() + EPS))
    return lam


# ----- davda54/sam ------------------------------------------------------------------------
class PeerSAM(torch.optim.Optimizer):
    """SAM as davda54/sam (github.com/davda54/sam, sam.py) computes it, for side-by-side timing.

    The same arithmetic in the same order: the gradient norm as the norm of the stacked
    per-tensor norms; per parameter, a clone of the weights, then ``p += (1.0 * g) * scale``
    (two temporaries, as there); the restore swaps the clone back in (``p.data = old_p``); then
    the base optimizer steps. SAM only (no ``adaptive``), as benchmarked.
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grad_norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(1.0 * p.grad * scale.to(p))
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _grad_norm(self) -> Tensor:
        device = self.param_groups[0]["params"][0].device
        return torch.norm(torch.stack([p.grad.norm(p=2).to(device) for group in self.param_groups
                                       for p in group["params"] if p.grad is not None]), p=2)
