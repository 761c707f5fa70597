"""Loading a checkpoint into a SAM-type optimizer: checked first, then all-or-nothing.

A state_dict holds the wrapper's own state (per-parameter entries such as the eigenvector,
and the global ``"xsam"`` entry: kind, counters, generator) and the base optimizer's under
``"base_optimizer"``. Everything is checked before anything is loaded, and if a load still
fails half-way, the previous state and param groups (of both optimizers) are put back, still
shared, so later learning-rate changes keep reaching the base optimizer.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["load_state_dict_atomically", "params_in_order"]

GLOBAL = "xsam"


def params_in_order(param_groups: list[dict]) -> list[Tensor]:
    return [p for g in param_groups for p in g["params"]]


def _kind_of(global_state: dict) -> str:
    # Checkpoints written before the kind was recorded: X-SAM's global state has refresh counters.
    if "kind" in global_state:
        return global_state["kind"]
    return "XSAM" if "refreshes" in global_state else "SAM"


def check_state_dict(optimizer, state_dict: dict) -> None:
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"state_dict is not an optimizer state_dict (no 'state' / 'param_groups'); pass what "
                         f"{name}.state_dict() returned")
    if "base_optimizer" not in state_dict:
        raise ValueError(f"state_dict has no 'base_optimizer' entry; it was not saved by {name}.state_dict() "
                         "(a base optimizer's own state_dict cannot be loaded into the wrapper)")
    global_state = state_dict["state"].get(GLOBAL)
    if not isinstance(global_state, dict) or "step" not in global_state:
        raise ValueError(f"state_dict has no '{GLOBAL}' entry with the step counter in its 'state'; it was not "
                         f"saved by an xsam optimizer's state_dict()")
    kind = _kind_of(global_state)
    if kind != optimizer.KIND:
        raise ValueError(f"state_dict was saved by {kind}, but this optimizer is {optimizer.KIND}; load it into "
                         f"a {kind} (the eigenvector state of X-SAM and Eigen-SAM does not carry over to "
                         "another method)")
    groups = state_dict["param_groups"]
    if len(groups) != len(optimizer.param_groups) or any(
            len(saved["params"]) != len(live["params"]) for saved, live in zip(groups, optimizer.param_groups)):
        raise ValueError(f"state_dict has {len(groups)} param groups of sizes "
                         f"{[len(g['params']) for g in groups]}, but the optimizer has "
                         f"{len(optimizer.param_groups)} of sizes {[len(g['params']) for g in optimizer.param_groups]}; "
                         "build the optimizer over the same parameters in the same groups")
    params = params_in_order(optimizer.param_groups)
    per_param = {k: v for k, v in state_dict["state"].items() if k != GLOBAL}
    optimizer._check_checkpoint(global_state, per_param, params, _positions(groups))


def _positions(groups: list[dict]) -> dict:
    """Saved parameter id -> position in the flat parameter order."""
    out, i = {}, 0
    for g in groups:
        for pid in g["params"]:
            out[pid] = i
            i += 1
    return out


def load_state_dict_atomically(optimizer, state_dict: dict) -> None:
    check_state_dict(optimizer, state_dict)
    own = dict(state_dict)
    base_state = own.pop("base_optimizer")
    base = optimizer.base_optimizer
    before = (optimizer.state, optimizer.param_groups, base.state, base.param_groups)
    try:
        base.load_state_dict(base_state)
        torch.optim.Optimizer.load_state_dict(optimizer, own)
    except BaseException:
        optimizer.state, optimizer.param_groups, base.state, base.param_groups = before
        raise
    # Both loads built new group dicts: share one list again.
    base.param_groups = optimizer.param_groups
