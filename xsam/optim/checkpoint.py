"""The checkpoint of a SAM-type optimizer: its layout, and a load that is checked first, then all-or-nothing.

Layout (docs/training-loops.md#checkpoints): one torch.optim state_dict, as torch.distributed.checkpoint
(DCP) expects it::

    {"state": {i: {<the base optimizer's state of parameter i>, "eigenvector": v_i (X-SAM, Eigen-SAM)},
               f: {..., "xsam": {"kind": "XSAM", "step": 12, "skipped_steps": 0, ...}}},
     "param_groups": [<the groups the wrapper and the base optimizer share>]}

Every key of ``"state"`` is a parameter position (DCP maps positions to names and drops anything else);
``f`` is the first trainable parameter. DCP loads in place, and only the entries a fresh optimizer's
state_dict has, so every entry exists from construction on: placeholders until then, dropped on load.
Everything is checked before anything is loaded; a load that still fails half-way puts the previous
state and the shared param groups back.
"""
from __future__ import annotations

import collections
import copy
import warnings

import torch
from torch import Tensor

__all__ = ["CheckpointMixin", "load_state_dict_atomically", "pack_state_dict", "params_in_order"]

GLOBAL = "xsam"  # the key of the global entry (live: in optimizer.state; saved: in the first trainable entry)
PLACEHOLDERS = "base_state_placeholders"


def params_in_order(param_groups: list[dict]) -> list[Tensor]:
    return [p for g in param_groups for p in g["params"]]


# ----- saving ------------------------------------------------------------------------------------
def pack_state_dict(optimizer) -> dict:
    """The optimizer's state_dict in the layout above (references to the live tensors, as torch's)."""
    base = optimizer.base_optimizer
    params = params_in_order(optimizer.param_groups)
    base_sd = base.state_dict()  # positions in the shared groups' order: the same as ours
    state = {i: dict(entry) for i, entry in base_sd["state"].items()}
    trainable = [i for i, p in enumerate(params) if p.requires_grad]
    if not trainable:  # refused at construction; a clear error if the parameters were frozen since
        raise ValueError(f"{type(optimizer).__name__} has no trainable parameter to keep its global state with")
    saved_global = optimizer._checkpoint_global()
    # Placeholders while the base optimizer has no state at all (before its first step).
    saved_global[PLACEHOLDERS] = not any(base.state.values())
    if saved_global[PLACEHOLDERS]:
        state.update(_base_state_placeholders(optimizer, params))
    for i in trainable:
        state.setdefault(i, {})
    for i, entry in optimizer._checkpoint_per_param(params, trainable).items():
        clash = sorted(set(entry) & set(state[i]))
        if clash:
            raise ValueError(f"the base optimizer {type(base).__name__} keeps {clash} in its state of parameter "
                             f"{i}, names {type(optimizer).__name__} uses too; the checkpoint would mix them up")
        state[i].update(entry)
    if GLOBAL in state[trainable[0]]:
        raise ValueError(f"the base optimizer {type(base).__name__} keeps '{GLOBAL}' in its state; the checkpoint "
                         "needs that name for the wrapper's global state")
    state[trainable[0]][GLOBAL] = saved_global
    return {"state": state, "param_groups": base_sd["param_groups"]}


def _base_state_placeholders(optimizer, params: list[Tensor]) -> dict:
    """Entries shaped like the base optimizer's state once it has stepped, from a copy stepped at lr=0
    (as DCP's ``_init_optim_state``, but leaving the optimizer itself alone). A base optimizer that keeps
    no state (SGD without momentum) is remembered while its groups and hyper-parameters other than the
    learning rate stay the same, so that not every checkpoint pays for the copy.
    """
    base = optimizer.base_optimizer
    key = tuple((id(g), tuple(map(id, g["params"])),
                 repr(sorted((k, v) for k, v in g.items() if k not in ("params", "lr", "initial_lr"))))
                for g in base.param_groups)
    if optimizer._stateless_base_key == key:
        return {}
    try:
        entries = _state_after_one_step(base, params, [p.detach().clone() for p in params])
    except Exception as exc:  # an optimizer that cannot be copied or stepped this way: say what is lost
        warnings.warn(f"xsam: could not build placeholders for {type(base).__name__}'s state ({exc}); a DCP "
                      "load into this optimizer before its first step will not restore the base optimizer's "
                      "state", stacklevel=3)
        return {}
    optimizer._stateless_base_key = None if entries else key
    return entries


def _state_after_one_step(base, params: list[Tensor], clones: list[Tensor]) -> dict:
    """The state_dict entries of a copy of ``base`` over ``clones`` stepped once at lr=0 with zero gradients."""
    twin = copy.deepcopy(base, memo={id(p): c for p, c in zip(params, clones)})
    for p, c in zip(params, clones):
        c.grad = torch.zeros_like(c) if p.requires_grad else None
    for group in twin.param_groups:
        if "lr" in group:
            group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], Tensor) else 0.0
    with torch.no_grad():
        twin.step()
    return twin.state_dict()["state"]


def _expected_base_state(optimizer, params: list[Tensor]) -> dict:
    """The base optimizer's state entries as they are or, before its first step, from a copy stepped on
    meta tensors (shapes without memory; {} for one that cannot step there)."""
    base = optimizer.base_optimizer
    if any(base.state.values()):
        return base.state_dict()["state"]
    try:
        return _state_after_one_step(base, params, [torch.empty_like(p, device="meta") for p in params])
    except Exception:
        return {}


def _check_base_state_shapes(optimizer, base_state: dict, params: list[Tensor], positions: dict) -> None:
    """Refuse base-optimizer state whose tensors are shaped otherwise than the base optimizer keeps them."""
    expected = None
    for k, entry in base_state.items():
        i = positions.get(k)
        if i is None or not entry:
            continue
        if expected is None:
            expected = _expected_base_state(optimizer, params)
        for key, value in entry.items():
            ref = expected.get(i, {}).get(key)
            if isinstance(value, Tensor) and isinstance(ref, Tensor) and value.shape != ref.shape:
                raise ValueError(f"state_dict's base-optimizer state of parameter {i} has {key!r} of shape "
                                 f"{tuple(value.shape)}, but {type(optimizer.base_optimizer).__name__} keeps one of "
                                 f"shape {tuple(ref.shape)} for it (the parameter's shape is "
                                 f"{tuple(params[i].shape)}); build the model and optimizer as they were saved")


# ----- loading -----------------------------------------------------------------------------------
def _split(optimizer, state_dict: dict) -> tuple[dict, dict, dict, list]:
    """(saved global entry, wrapper's per-parameter state, base optimizer's per-parameter state, groups)."""
    name = type(optimizer).__name__
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError(f"state_dict is not an optimizer state_dict (no 'state' / 'param_groups'); pass what "
                         f"{name}.state_dict() returned")
    state, groups = state_dict["state"], state_dict["param_groups"]
    if "base_optimizer" in state_dict:  # the earlier layout
        saved_global = state.get(GLOBAL)
        own = {k: v for k, v in state.items() if k != GLOBAL}
        base_state = state_dict["base_optimizer"].get("state", {})
    else:
        holders = [k for k, entry in state.items() if isinstance(entry, dict) and GLOBAL in entry]
        if len(holders) > 1:
            raise ValueError(f"state_dict has the '{GLOBAL}' entry in the state of {len(holders)} parameters; "
                             f"it was not saved by {name}.state_dict()")
        saved_global = state[holders[0]][GLOBAL] if holders else None
        own_keys = optimizer.STATE_KEYS
        own, base_state = {}, {}
        for k, entry in state.items():
            if not isinstance(entry, dict):
                raise ValueError(f"state_dict['state'][{k!r}] is a {type(entry).__name__}, not a dict; it was not "
                                 f"saved by {name}.state_dict()")
            own[k] = {key: v for key, v in entry.items() if key in own_keys}
            base_state[k] = {key: v for key, v in entry.items() if key not in own_keys and key != GLOBAL}
    if not isinstance(saved_global, dict) or "step" not in saved_global:
        raise ValueError(f"state_dict has no '{GLOBAL}' entry with the step counter; it was not saved by an xsam "
                         f"optimizer's state_dict() (a base optimizer's own state_dict cannot be loaded into "
                         f"{name}; DCP's flatten_optimizer_state_dict=True is not supported)")
    if saved_global.get(PLACEHOLDERS, False):
        base_state = {}
    return saved_global, own, base_state, groups


def check_state_dict(optimizer, saved_global: dict, own: dict, base_state: dict, groups: list) -> None:
    # Checkpoints written before the kind was recorded: X-SAM's global state has refresh counters.
    kind = saved_global.get("kind", "XSAM" if "refreshes" in saved_global else "SAM")
    if kind != optimizer.KIND:
        raise ValueError(f"state_dict was saved by {kind}, but this optimizer is {optimizer.KIND}; load it into "
                         f"a {kind} (the eigenvector state of X-SAM and Eigen-SAM does not carry over to "
                         "another method)")
    saved_sizes = [len(g["params"]) for g in groups]
    live_sizes = [len(g["params"]) for g in optimizer.param_groups]
    if saved_sizes != live_sizes:
        raise ValueError(f"state_dict has {len(groups)} param groups of sizes {saved_sizes}, but the optimizer has "
                         f"{len(live_sizes)} of sizes {live_sizes}; build the optimizer over the same parameters in "
                         "the same groups")
    params = params_in_order(optimizer.param_groups)
    positions = _positions(groups)
    stray = [k for k in own if k not in positions]
    if stray:
        raise ValueError(f"state_dict's 'state' has entries for {stray[:3]}, which are not parameters of its "
                         "'param_groups'; it was not saved by this optimizer's state_dict()")
    for i, group in enumerate(groups):
        values = {key: group.get(key, default) for key, default in optimizer._own_defaults.items()}
        optimizer._check_hyperparameters(values, f"state_dict's param_groups[{i}]: ")
    _check_base_state_shapes(optimizer, base_state, params, positions)
    optimizer._check_checkpoint(saved_global, own, params, positions)


def _positions(groups: list[dict]) -> dict:
    """Saved parameter id (a position, or a name under DCP) -> position in the flat parameter order."""
    return {pid: i for i, pid in enumerate(params_in_order(groups))}


def load_state_dict_atomically(optimizer, state_dict: dict) -> None:
    saved_global, own, base_state, groups = _split(optimizer, state_dict)
    check_state_dict(optimizer, saved_global, own, base_state, groups)
    live_global, own = optimizer._restore_global(saved_global, own)
    params = params_in_order(optimizer.param_groups)
    positions = _positions(groups)
    state: collections.defaultdict = collections.defaultdict(dict)
    for k, entry in own.items():
        if entry:
            p = params[positions[k]]
            # As torch.optim casts loaded state: to the parameter's device and floating dtype.
            state[p] = {key: v.to(device=p.device, dtype=p.dtype) if p.is_floating_point() else v.to(device=p.device)
                        for key, v in entry.items()}
    state[GLOBAL] = live_global
    base = optimizer.base_optimizer
    before = (base.state, base.param_groups)
    try:
        base.load_state_dict({"state": {k: v for k, v in base_state.items() if v}, "param_groups": groups})
    except BaseException:
        base.state, base.param_groups = before
        raise
    optimizer.state = state
    # The base optimizer's load built new group dicts: share them again.
    optimizer.param_groups = base.param_groups


class CheckpointMixin:
    """state_dict / load_state_dict of the SAM-type optimizers, and the hooks subclasses fill in."""

    STATE_KEYS: tuple[str, ...] = ()  # the wrapper's own per-parameter state (the rest is the base optimizer's)

    def state_dict(self) -> dict:
        """One torch.optim state_dict holding the wrapper's and the base optimizer's state, in the
        layout torch.distributed.checkpoint expects (see ``xsam.optim.checkpoint``)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = pack_state_dict(self)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a checkpoint of the same kind of optimizer; refused (and nothing changed) otherwise."""
        if self._open is not None:
            raise RuntimeError("load_state_dict() between first_step() and second_step(); finish the step first")
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        load_state_dict_atomically(self, state_dict)
        self._broken = None
        self._lists_key = None  # the group dicts are new objects
        self._after_load()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checkpoint_global(self) -> dict:
        """The global state as saved: fixed keys and types (counters as host integers)."""
        g = self._global
        return {"kind": self.KIND, "step": int(g["step"]), "skipped_steps": int(g["skipped_steps"])}

    def _checkpoint_per_param(self, params: list[Tensor], trainable: list[int]) -> dict[int, dict]:
        """The wrapper's own per-parameter entries as saved, by position (subclasses: the eigenvector)."""
        return {}

    def _restore_global(self, saved: dict, own: dict) -> tuple[dict, dict]:
        """The live global state from a saved one, and the own per-parameter entries without placeholders."""
        live = self._initial_global_state()
        live["step"] = saved["step"]
        live["skipped_steps"] = saved.get("skipped_steps", 0)
        return live, own

    def _check_checkpoint(self, global_state: dict, per_param: dict, params: list[Tensor], positions: dict) -> None:
        """Subclasses check their own entries of a checkpoint before it is loaded."""

    def _after_load(self) -> None:
        """Device placement of loaded global tensors (subclasses add their own checks)."""
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        for k, v in self._global.items():
            if isinstance(v, Tensor) and k != "generator":
                self._global[k] = v.to(device)


