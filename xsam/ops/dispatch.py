"""Which implementation of the op set runs for a (device, dtype) group.

Backends: ``"reference"`` (pure PyTorch, always there), ``"triton"`` (``xsam.kernels``) and ``"native"``
(the compiled ``xsam._C``). ``"auto"`` picks the fastest available one per group; naming a backend that
cannot serve a group raises ``BackendUnavailableError`` with the reason. When a backend that "auto" would
use fails to load, "auto" warns once (``BackendLoadWarning``, with the import error) and uses the next
one. Before "auto" first uses a fused backend for a (device, dtype), a few ops run against the reference
(``xsam.ops.verify.trusted``; skipped when a backend is named or ``XSAM_SKIP_KERNEL_CHECK=1``); if they
disagree, "auto" warns once and uses the reference there.

A backend is a module with one function per op of ``xsam.ops.contract`` (the schema's argument names,
called with keywords on one non-empty group) and ``availability(device, dtype) -> str | None``.
"""
from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

import torch

from . import reference, verify

BACKEND_NAMES = ("auto", "reference", "triton", "native")

# Module that adapts each optional backend to the op-set signatures.
_ADAPTERS = {"triton": "xsam.ops.triton_backend", "native": "xsam.ops.native_backend"}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for by name but cannot run the given tensors."""


class BackendLoadWarning(UserWarning):
    """A backend that backend="auto" would have used failed to load; "auto" uses a slower one."""


def check_backend_name(backend: str) -> str:
    if backend not in BACKEND_NAMES:
        raise ValueError(
            f"backend={backend!r} is not a known backend; use one of {', '.join(map(repr, BACKEND_NAMES))}"
        )
    return backend


@functools.lru_cache(maxsize=None)
def _load(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend adapter once; return (module, None) or (None, why not)."""
    if name == "reference":
        return reference, None
    try:
        module = importlib.import_module(_ADAPTERS[name])
    except Exception as exc:  # an optional backend must never break `import xsam`
        return None, f"{type(exc).__name__}: {exc}"
    why = getattr(module, "UNAVAILABLE_REASON", None)
    return (None, why) if why else (module, None)


def unavailable_reason(name: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` can run tensors of this device and dtype, else why not."""
    module, why = _load(name)
    return why if module is None else module.availability(device, dtype)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    return ("native", "triton", "reference") if device.type == "cuda" else ("native", "reference")


# Plain dicts rather than functools.lru_cache: torch.compile traces a dict lookup, while
# an lru_cache wrapper (or the import behind a first resolution) breaks the graph.
_RESOLVED: dict[tuple[str, torch.device, torch.dtype], ModuleType] = {}


def resolve(backend: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    """The backend module that runs a group of tensors on ``device`` with ``dtype``."""
    key = (backend, device, dtype)
    module = _RESOLVED.get(key)
    if module is None:
        module = _resolve_uncached(backend, device, dtype)
        _RESOLVED[key] = module
    return module


def clear_cache() -> None:
    """Forget resolved backends and their checks (after a backend became (un)available or changed, e.g. in tests)."""
    _RESOLVED.clear()
    verify.clear_outcomes()


@functools.lru_cache(maxsize=None)
def _warn_not_loaded(name: str, why: str) -> None:
    """Once per process and backend: "auto" passes over a backend that should have loaded."""
    warnings.warn(f"xsam: the {name} backend failed to load, so backend='auto' runs a slower one instead "
                  f"(`xsam info` shows which): {why}", BackendLoadWarning, stacklevel=verify.caller_level())


def _resolve_uncached(backend: str, device: torch.device, dtype: torch.dtype) -> ModuleType:
    check_backend_name(backend)
    if backend == "auto":
        for name in _auto_order(device):
            module, load_error = _load(name)
            if load_error is not None:
                _warn_not_loaded(name, load_error)
            elif module.availability(device, dtype) is None:
                return module if name == "reference" or verify.trusted(name, device, dtype) else reference
        return reference
    why = unavailable_reason(backend, device, dtype)
    if why is not None:
        raise BackendUnavailableError(
            f"backend={backend!r} cannot run {dtype} tensors on {device}: {why}. "
            f"Use backend='auto' or backend='reference' instead."
        )
    return _load(backend)[0]


def describe(devices: tuple[torch.device, ...] | None = None) -> list[tuple[str, str, str]]:
    """(backend, device, status) rows for ``xsam info``."""
    if devices is None:
        devices = (torch.device("cpu"),)
        if torch.cuda.is_available():
            devices += (torch.device("cuda"),)
    rows = []
    for name in BACKEND_NAMES[1:]:
        for device in devices:
            why = unavailable_reason(name, device, torch.float32)
            rows.append((name, str(device), "available" if why is None else f"unavailable: {why}"))
    for device in devices:
        used = resolve("auto", device, torch.float32).__name__
        passed_over = [name for name in _auto_order(device) if _load(name)[1] is not None]
        note = f" ({', '.join(passed_over)} failed to load: see above)" if passed_over else ""
        rows.append(("auto", str(device), f"uses {used}{note}"))
    return rows


# Load the compiled extension now (cheap, and it registers torch.ops.xsam with their fake
# implementations) so that resolving "native" inside a torch.compile trace imports nothing.
# Triton stays lazy: importing it costs about a second.
_load("native")
