"""Backends: each adapts arrays, launches its kernels and returns arrays of the caller's kind.

A backend module provides ``available() -> (bool, reason)`` and ``decode(problem, metadata,
num_splits) -> (out, lse)``, where ``problem`` is the API's validated ``_Problem`` (arrays of one
kind, sizes, flags) and (metadata, num_splits) is the scheduler plan. Backends never parse user
arguments; the API never knows launch geometry.
"""

from __future__ import annotations

import importlib
import os

from .. import _arrays

_MODULES = {
    "numpy": "mla.backends.numpy_backend",
    "numba": "mla.backends.numba_backend",
    "cupy": "mla.backends.cupy_backend",
}


class BackendUnavailable(NotImplementedError):
    """The backend exists in the API but cannot run here (not built yet, or no GPU / package)."""


def load(name: str):
    """The backend module, or raise BackendUnavailable with the reason."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == _MODULES[name]:
            raise BackendUnavailable(f"backend={name!r} is not implemented yet") from exc
        raise BackendUnavailable(f"backend={name!r} needs {exc.name!r}, which is not installed") from exc
    ok, reason = module.available()
    if not ok:
        raise BackendUnavailable(f"backend={name!r} is not available here: {reason}")
    return module


def status() -> dict[str, str]:
    """{backend name: 'available' or the reason it is not} (for `python -m mla info`)."""
    result = {}
    for name in _MODULES:
        try:
            load(name)
            result[name] = "available"
        except BackendUnavailable as exc:
            result[name] = str(exc)
    return result


UNVERIFIED_GATE = "MLA_CUPY_UNVERIFIED"
"""A kernel written but not yet run on a GPU is used only when this variable is 1: "auto" skips a backend
whose ``unverified(problem)`` names a reason, unless the variable is set. Today no backend does (every
kernel has passed its GPU tests; the Hopper decode kernels were the last, 2026-11-26)."""


def select(name: str, problem):
    """The backend to run ``problem`` with. "auto": CuPy for device arrays (then Numba, then a NumPy
    round trip), never a path that has not run on a GPU yet (see UNVERIFIED_GATE); else NumPy."""
    if name == "auto":
        if problem.on_device:
            for candidate in ("cupy", "numba"):
                try:
                    module = _supporting(load(candidate), problem)
                except BackendUnavailable:
                    continue
                unverified = getattr(module, "unverified", None)
                if unverified is not None and unverified(problem) and os.environ.get(UNVERIFIED_GATE) != "1":
                    continue
                return module
            return load("numpy")  # host round trip; results go back to the device
        return load("numpy")
    return _supporting(load(name), problem)


def _supporting(module, problem):
    supports = getattr(module, "supports", None)
    if supports is not None:
        ok, reason = supports(problem)
        if not ok:
            raise BackendUnavailable(reason)
    return module


__all__ = ["BackendUnavailable", "UNVERIFIED_GATE", "load", "select", "status", "_arrays"]
