"""Curvature products that cost less than a double backward: compiled exact products and Gauss-Newton products.

Both take the forward-only ``loss_fn`` as users write it, with the ``model`` whose parameters it
reads: ``torch.func.functional_call`` swaps the parameters for function inputs on a module that
holds ``model`` and calls ``loss_fn``, so ``loss_fn`` needs no change. The model's buffers are
read, never written: run the products in eval mode (as the optimizers do with ``model=``).
"""
from __future__ import annotations

import functools
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

from .hessian import HvpFn, Vector, _averaged, _zeros_for_missing, exact_hvp

__all__ = ["PRODUCT_MODES", "CompiledProduct", "compiled_hvp", "ggn_hvp", "product_function"]

PRODUCT_MODES = ("compiled", "ggn")  # the optimizers' hvp= values served here
# The first compiled product of a model is checked against double backward once: fp32 rounding
# stays near 1e-6 relative; beyond this the compiled code computes something else.
VERIFY_RTOL = 1e-4


class _LossOfModel(nn.Module):
    """Calls ``loss_fn``; holding ``model`` as a child lets ``functional_call`` swap its parameters meanwhile."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, loss_fn: Callable[[], Tensor]) -> Tensor:
        return loss_fn()


def _parameter_names(model: nn.Module, params: Sequence[Tensor], method: str) -> tuple[str, ...]:
    if not isinstance(model, nn.Module):
        raise ValueError(f"hvp={method!r} needs the model loss_fn calls: pass model=<the nn.Module> "
                         f"(got {type(model).__name__})")
    by_id = {id(p): name for name, p in model.named_parameters()}
    names = []
    for i, p in enumerate(params):
        if id(p) not in by_id:
            raise ValueError(f"hvp={method!r}: params[{i}] (shape {tuple(p.shape)}) is not a parameter of "
                             f"model={type(model).__name__}; pass the model that owns every trainable parameter")
        names.append("model." + by_id[id(p)])
    return tuple(names)


@dataclass(frozen=True)
class _LayoutKey:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    devices: tuple[torch.device, ...]
    backend: str | Callable


class CompiledProduct:
    """The compiled forward-over-reverse product for one model and parameter layout (see ``compiled_hvp``)."""

    def __init__(self, model: nn.Module, names: tuple[str, ...], backend: str | Callable):
        self._holder = _LossOfModel(model)
        self._names = names
        self._compiled = torch.compile(self._product, fullgraph=True, backend=backend)
        self.fallback_reason: str | None = None  # why products run eagerly (compilation failed or was inexact)
        self.verified = False  # whether a compiled product was compared with double backward's

    def _product(self, loss_fn, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        def loss_of(weights):
            return functional_call(self._holder, dict(zip(self._names, weights)), (loss_fn,))

        return jvp(grad(loss_of), (primals,), (tangents,))[1]

    def _fall_back(self, reason: str) -> None:
        self.fallback_reason = reason
        warnings.warn(f"hvp='compiled' on {type(self._holder.model).__name__}: {reason}; this model's products run "
                      "as eager double backward from now on", RuntimeWarning, stacklevel=3)

    def bind(self, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], process_group=None) -> HvpFn:
        """``hvp(vectors)`` at the current weights and ``loss_fn``'s batch."""
        params = list(params)

        @functools.cache
        def eager() -> HvpFn:  # the double-backward product, built on first need
            return exact_hvp(loss_fn, params)[0]

        def compiled(v: Vector) -> Vector:
            primals = tuple(p.detach() for p in params)
            # Past dynamo's recompile limit the frame would run eagerly without a word: make it raise.
            with torch.enable_grad(), torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
                return list(self._compiled(loss_fn, primals, tuple(v)))

        def hvp(vectors: Sequence[Vector]) -> list[Vector]:
            if self.fallback_reason is not None or not vectors:
                return [_averaged(p, process_group) for p in eager()(vectors)]
            try:
                products = [compiled(v) for v in vectors]
            except Exception as error:  # noqa: BLE001 - a failure of loss_fn itself is raised by eager()
                products = eager()(vectors)
                self._fall_back(f"torch.compile could not compile the product ({type(error).__name__}: "
                                f"{str(error).strip().splitlines()[0]})")
            else:
                if not self.verified:
                    self.verified = True
                    expected = eager()(vectors[:1])[0]
                    difference = _relative_difference(products[0], expected)
                    if difference > VERIFY_RTOL:
                        self._fall_back(f"its first product differs from double backward's by {difference:.1e} "
                                        f"relative (more than {VERIFY_RTOL:g})")
                        products = [expected, *eager()(vectors[1:])]
            return [_averaged(p, process_group) for p in products]

        return hvp


def _relative_difference(a: Vector, b: Vector) -> float:
    diff = sum(float((x.double() - y.double()).square().sum()) for x, y in zip(a, b))
    norm = sum(float(y.double().square().sum()) for y in b)
    return math.sqrt(diff / max(norm, 1e-300))


_COMPILED: "weakref.WeakKeyDictionary[nn.Module, dict[_LayoutKey, CompiledProduct]]" = weakref.WeakKeyDictionary()


def compiled_hvp(model: nn.Module, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *,
                 backend: str | Callable = "inductor", process_group=None) -> HvpFn:
    """Exact ``H v`` at the current weights by ``torch.func`` forward-over-reverse under ``torch.compile``.

    ``loss_fn`` runs ``model``'s forward on a fixed batch and returns the scalar loss; ``params`` are
    parameters of ``model``. The compiled function is cached per model and parameter layout; its first
    call compiles and checks one product against double backward. ``backend``: the ``torch.compile``
    backend. ``process_group``: average every product over its ranks (as ``exact_hvp``). Nothing is
    written to the weights, the buffers or ``.grad``.
    """
    params = list(params)
    names = _parameter_names(model, params, "compiled")
    key = _LayoutKey(names, tuple(p.shape for p in params), tuple(p.dtype for p in params),
                     tuple(p.device for p in params), backend)
    products = _COMPILED.setdefault(model, {})
    if key not in products:
        products[key] = CompiledProduct(model, names, backend)
    return products[key].bind(loss_fn, params, process_group)


class _OutputSplit:
    """A forward hook that hands the loss head a detached copy of the model's output (one call only)."""

    def __init__(self):
        self.output: Tensor | None = None  # the model's output, still dual and connected to the weights
        self.head_input: Tensor | None = None  # the leaf the loss head computes from

    def __call__(self, module, args, output):
        if self.output is not None:
            raise ValueError("hvp='ggn' splits loss_fn at model's output, but loss_fn called model more than "
                             "once; use hvp='exact' or a loss_fn with a single forward of model")
        if not isinstance(output, Tensor):
            raise ValueError(f"hvp='ggn' needs model's output to be a tensor (got {type(output).__name__}); "
                             "use hvp='exact', or pass as model= a module that returns the logits")
        self.output = output
        self.head_input = fwAD.unpack_dual(output).primal.detach().requires_grad_()
        return self.head_input


def ggn_hvp(model: nn.Module, loss_fn: Callable[[], Tensor], params: Sequence[Tensor], *,
            process_group=None) -> HvpFn:
    """Generalised Gauss-Newton products ``G v = J^T H_out J v`` at the current weights.

    ``loss_fn`` must call ``model`` once; the network is what ``model`` computes, the loss head is
    what ``loss_fn`` does with ``model``'s output (a tensor). Each product is one forward pass in
    forward mode (``J v``, with the weights' backward graph kept), a second derivative of the loss
    head at the output (small: batch x outputs), and one backward (``J^T``). ``process_group``:
    average every product over its ranks (as ``exact_hvp``). Nothing is written to the weights,
    the buffers or ``.grad``.
    """
    params = list(params)
    names = _parameter_names(model, params, "ggn")
    holder = _LossOfModel(model)

    def product(v: Vector) -> Vector:
        split = _OutputSplit()
        with torch.enable_grad(), fwAD.dual_level(), model.register_forward_hook(split):
            duals = {name: fwAD.make_dual(p, t) for name, p, t in zip(names, params, v)}
            loss = functional_call(holder, duals, (loss_fn,))
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                raise ValueError("hvp='ggn': loss_fn must return the scalar loss tensor (forward only, no backward)")
            if split.output is None:
                raise ValueError("hvp='ggn': loss_fn did not call model; pass as model= the module loss_fn calls")
            output, jv = fwAD.unpack_dual(split.output)
            rows: Sequence[Tensor | None] = [None] * len(params)
            # Zero rows where the output does not depend on the weights (no J v), or the loss is linear in it.
            if jv is not None:
                (head_grad,) = torch.autograd.grad(fwAD.unpack_dual(loss).primal, split.head_input,
                                                   create_graph=True)
                if head_grad.requires_grad:
                    (h_jv,) = torch.autograd.grad(head_grad, split.head_input, jv)
                    rows = torch.autograd.grad(output, params, h_jv, allow_unused=True)
        return _averaged(_zeros_for_missing([None if r is None else r.detach() for r in rows], params),
                         process_group)

    def hvp(vectors: Sequence[Vector]) -> list[Vector]:
        return [product(v) for v in vectors]

    return hvp


def product_function(mode: str, model: nn.Module | None, loss_fn: Callable[[], Tensor],
                     params: Sequence[Tensor], *, process_group=None) -> HvpFn:
    """The product of an optimizer's ``hvp=`` mode that needs ``loss_fn``: "exact", "compiled" or "ggn"."""
    if mode == "exact":
        return exact_hvp(loss_fn, params, process_group=process_group)[0]
    if mode not in PRODUCT_MODES:
        raise ValueError(f"mode={mode!r} is invalid: use 'exact' or one of {list(PRODUCT_MODES)}")
    if model is None:
        raise ValueError(f"hvp={mode!r} needs model=<the nn.Module that loss_fn calls> on the optimizer: its "
                         "parameters are swapped for the product's inputs while loss_fn runs")
    build = compiled_hvp if mode == "compiled" else ggn_hvp
    return build(model, loss_fn, params, process_group=process_group)
