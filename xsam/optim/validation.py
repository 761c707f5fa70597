"""Argument and hyper-parameter checks: every refusal names the argument (and the param group) and the fix.

Construction arguments are checked once; per-group values (``rho``, ``alpha``) again before every step,
because users and schedulers may edit ``param_groups`` between steps. The number checks accept numpy
scalars and return Python numbers, which the caller stores: a numpy scalar in ``param_groups`` would make
``state_dict()`` fail to load with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import inspect
import math
import numbers

import torch

__all__ = ["ARGUMENTS_OF", "DEFAULT_EPS", "FLOAT32_MAX", "check_base_optimizer", "check_bool", "check_choice",
           "check_count", "check_eps", "check_model", "check_number", "check_parameters", "check_process_group",
           "check_rho", "check_seed", "fill_prebuilt_groups", "own_arguments", "own_eps", "register_arguments",
           "split_base_kwargs"]

# The step's scalars are float32 device tensors for all but float64 weights: a hyper-parameter that
# scales them (rho, eps) must be finite in float32.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _as_float(value) -> float | None:
    """``value`` as a finite Python float, or None when it is not a finite real number (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numbers.Real includes numpy's
        return None
    try:
        number = float(value)
    except OverflowError:  # an int beyond float's range
        return None
    return number if math.isfinite(number) else None


def _as_int(value) -> int | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numbers.Integral includes numpy's
        return None
    return int(value)


def check_number(name: str, value, low: float, high: float = math.inf, *, low_open: bool = False, hint: str = "",
                 where: str = "") -> float:
    """``value`` is a finite real number in [low, high] (or (low, high] with ``low_open``); returns it as a float."""
    number = _as_float(value)
    if number is None or not (number > low if low_open else number >= low) or number > high:
        if high == math.inf:
            bounds = f"> {low}" if low_open else f">= {low}"
        else:
            bounds = f"in ({low}, {high:g}]" if low_open else f"in [{low}, {high:g}]"
        raise ValueError(f"{where}{name}={value!r} is invalid: {name} must be a finite number {bounds}. "
                         f"{hint}".rstrip())
    return number


def check_rho(value, where: str = "") -> float:
    return check_number("rho", value, 0.0, FLOAT32_MAX, where=where, hint=(
        "It is the perturbation radius; the usual value is 0.05. The bound is float32's largest value: the "
        "ascent's scale rho / ||g|| is a float32 on the device (for all but float64 weights), which a larger rho "
        "makes inf: NaN weights."))


def check_eps(value) -> float:
    return check_number("eps", value, 0.0, FLOAT32_MAX, low_open=True, hint=(
        "It keeps 1 / (||g|| + eps) finite; the usual value is 1e-12. The bound is float32's largest value: "
        "1 / (||g|| + eps) is a float32 on the device (for all but float64 weights), which a larger eps makes 0: "
        "no perturbation, and with X-SAM's normalize=True every update exactly zero."))


def check_count(name: str, value, hint: str) -> int:
    """``value`` is an integer >= 1; returns it as a Python int."""
    count = _as_int(value)
    if count is None or count < 1:
        raise ValueError(f"{name}={value!r} is invalid: {name} must be an integer >= 1. {hint}")
    return count


def check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; use one of {', '.join(map(repr, choices))}")


def check_bool(name: str, value, meaning: str = "") -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is invalid: pass True or False{f' ({meaning})' if meaning else ''}")


def check_seed(seed) -> int:
    """Returns the seed as a Python int: torch.Generator.manual_seed refuses numpy integers."""
    # manual_seed takes 64-bit seeds; larger ones fail deep inside it.
    value = _as_int(seed)
    if value is None or not 0 <= value < 2 ** 64:
        raise ValueError(f"seed={seed!r} is invalid: pass an integer in [0, 2**64)")
    return value


def check_process_group(process_group) -> None:
    """'auto', None or a torch.distributed ProcessGroup (anything else would fail inside the first collective)."""
    if process_group is None or isinstance(process_group, str) and process_group == "auto":
        return
    if isinstance(process_group, str):
        raise ValueError(f"process_group={process_group!r} is invalid: pass 'auto', None, or a "
                         "torch.distributed ProcessGroup")
    group_type = getattr(torch.distributed, "ProcessGroup", None) if torch.distributed.is_available() else None
    if group_type is None or not isinstance(process_group, group_type):
        raise TypeError(f"process_group={process_group!r} (type {type(process_group).__name__}) is not a "
                        "torch.distributed ProcessGroup: pass 'auto' (the group of model=<the "
                        "DistributedDataParallel module>), None (each rank keeps its own Hessian-vector products) "
                        "or a group such as torch.distributed.group.WORLD or torch.distributed.new_group(ranks)")


def check_model(model, per_replica_perturbation) -> None:
    """``model`` is an nn.Module or None; ``per_replica_perturbation`` needs a DDP module without a static graph."""
    if model is not None and not isinstance(model, torch.nn.Module):
        raise ValueError(f"model={type(model).__name__} is invalid: pass the nn.Module being trained, or None")
    check_bool("per_replica_perturbation", per_replica_perturbation)
    if per_replica_perturbation and not hasattr(model, "no_sync"):
        raise ValueError("per_replica_perturbation=True needs model=<the DistributedDataParallel module>: the "
                         "first pass runs under model.no_sync() so each replica perturbs by its own gradient")
    if per_replica_perturbation and getattr(model, "static_graph", False):
        raise ValueError("per_replica_perturbation=True does not work with DistributedDataParallel("
                         "static_graph=True): DDP's static graph cannot skip the gradient all-reduce of the "
                         "first pass (it fails with an internal assert, with or without xsam). Build the DDP "
                         "module with static_graph=False, or use per_replica_perturbation=False")


def fill_prebuilt_groups(base_groups: list[dict], own_groups: list[dict], defaults: dict) -> None:
    """Give a prebuilt base optimizer's groups (they may split the parameters differently) the wrapper's keys
    from the groups of ``own_groups`` their parameters were in, which must agree on them."""
    ours = {id(p): (i, g) for i, g in enumerate(own_groups) for p in g["params"]}
    for index, group in enumerate(base_groups):
        sources = dict(ours[id(p)] for p in group["params"])
        values = {key: {j: g.get(key, default) for j, g in sources.items()}
                  for key, default in defaults.items() if key not in group}
        for key, by_group in values.items():
            if len(set(map(repr, by_group.values()))) > 1:
                raise ValueError(f"base_optimizer's param_groups[{index}] holds parameters of param_groups "
                                 f"{' and '.join(map(str, by_group))}, which set different {key} "
                                 f"({', '.join(map(repr, by_group.values()))}); build the base optimizer "
                                 "with the same groups, or pass its class instead")
            group[key] = next(iter(by_group.values()), defaults[key])


def check_parameters(param_groups: list[dict], owner: str) -> None:
    """Real floating-point parameters, at least one of which is trainable."""
    params = [p for g in param_groups for p in g["params"]]
    for i, p in enumerate(params):
        if p.is_complex():
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is complex ({p.dtype}); {owner} supports real "
                             "floating-point parameters only: view complex weights as real pairs "
                             "(torch.view_as_real) in the model")
        if not p.is_floating_point():
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) has dtype {p.dtype}; {owner} optimizes "
                             "floating-point parameters only")
    if params and not any(p.requires_grad for p in params):
        raise ValueError(f"none of the {len(params)} parameters given to {owner} requires a gradient (all are "
                         "frozen); pass the trainable ones, e.g. [p for p in model.parameters() if p.requires_grad]")


# Base optimizers that cannot be wrapped: they need a closure of their own or sparse gradients.
_REFUSED_BASES = {
    "LBFGS": "LBFGS re-evaluates the closure inside its own step (line search), which a SAM-type step cannot "
             "offer; use a first-order optimizer such as torch.optim.SGD or torch.optim.AdamW",
    "SparseAdam": "SparseAdam needs sparse gradients, and SAM-type optimizers need dense ones; use "
                  "torch.optim.Adam with nn.Embedding(sparse=False)",
}


def check_base_optimizer(base) -> None:
    cls = type(base) if isinstance(base, torch.optim.Optimizer) else base
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"base_optimizer={base!r} is invalid: pass a torch.optim.Optimizer subclass "
                         "(e.g. torch.optim.SGD) or an optimizer instance")
    for name, why in _REFUSED_BASES.items():
        refused = getattr(torch.optim, name, None)
        if refused is not None and issubclass(cls, refused):
            raise ValueError(f"base_optimizer={cls.__name__} is not supported: {why}")


def split_base_kwargs(cls: type, base: type, base_kwargs: dict) -> None:
    """Refuse keyword arguments that neither ``cls`` nor the base optimizer class takes, saying whose they are."""
    owner = cls.__name__
    try:
        accepted = inspect.signature(base.__init__).parameters
    except (TypeError, ValueError):  # a C extension or odd signature: let the base class decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        return
    for key in base_kwargs:
        if key in accepted:
            continue
        owners = [name for name, keys in ARGUMENTS_OF.items() if key in keys]
        belongs = f" It is an argument of {' and '.join(owners)}, not of {owner}." if owners else ""
        raise ValueError(f"{key}={base_kwargs[key]!r} is not an argument of {owner} nor of its base optimizer "
                         f"{base.__name__}.{belongs} {owner}'s own arguments are {', '.join(own_arguments(cls))}; "
                         f"{base.__name__} takes {', '.join(k for k in accepted if k not in ('self', 'params'))}.")


DEFAULT_EPS = 1e-12


def own_eps(owner: str, base_optimizer, eps: float | None) -> float:
    """The norm guard ``eps``, refusing the ambiguous case of a base optimizer class that takes ``eps`` too."""
    if eps is None:
        return DEFAULT_EPS
    if isinstance(base_optimizer, type):
        try:
            takes_eps = "eps" in inspect.signature(base_optimizer.__init__).parameters
        except (TypeError, ValueError):
            takes_eps = False
        if takes_eps:
            name = base_optimizer.__name__
            raise ValueError(
                f"eps={eps!r} is ambiguous: {owner} (the guard in 1 / (||g|| + eps)) and {name} both take eps. To set "
                f"{name}'s, build it first and pass it: {owner}(params, torch.optim.{name}(params, eps={eps!r}, ...), "
                f"...); {owner}'s own eps can then be passed too (its default is {DEFAULT_EPS:g})")
    return eps


def own_arguments(cls: type) -> tuple[str, ...]:
    """The keyword-only arguments of ``cls``'s constructor: its own (the base optimizer's come as ``**kwargs``)."""
    return tuple(name for name, p in inspect.signature(cls.__init__).parameters.items()
                 if p.kind is inspect.Parameter.KEYWORD_ONLY)


# Whose argument is whose, for the message when a keyword reaches the wrong class.
ARGUMENTS_OF: dict[str, tuple[str, ...]] = {}


def register_arguments(cls: type) -> type:
    ARGUMENTS_OF[cls.__name__] = own_arguments(cls)
    return cls
