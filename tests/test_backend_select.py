"""backend="auto" never picks a kernel that has not run on a GPU unless MLA_CUPY_UNVERIFIED=1."""

from __future__ import annotations

import types

import pytest

from mla import backends


def _fake(name, supported=True, unverified=""):
    module = types.SimpleNamespace(name=name, supports=lambda p: (supported, "" if supported else "no"))
    if unverified is not None:
        module.unverified = lambda p: unverified
    return module


@pytest.fixture
def fake_backends(monkeypatch):
    table = {}

    def load(name):
        if name not in table:
            raise backends.BackendUnavailable(f"{name} unavailable (test)")
        return table[name]

    monkeypatch.setattr(backends, "load", load)
    monkeypatch.delenv(backends.UNVERIFIED_GATE, raising=False)
    return table


def test_auto_skips_unverified_paths_on_device(fake_backends, monkeypatch):
    problem = types.SimpleNamespace(on_device=True)
    fake_backends.update(numpy=_fake("numpy"), numba=_fake("numba", unverified="not run on a GPU yet"))
    assert backends.select("auto", problem).name == "numpy"
    assert backends.select("numba", problem).name == "numba"  # asked for by name: runs
    monkeypatch.setenv(backends.UNVERIFIED_GATE, "1")
    assert backends.select("auto", problem).name == "numba"


def test_auto_prefers_cupy_then_numba(fake_backends):
    problem = types.SimpleNamespace(on_device=True)
    fake_backends.update(numpy=_fake("numpy"), numba=_fake("numba"), cupy=_fake("cupy", supported=False))
    assert backends.select("auto", problem).name == "numba"
    fake_backends["cupy"] = _fake("cupy", unverified=None)  # a backend without the hook
    assert backends.select("auto", problem).name == "cupy"
    assert backends.select("auto", types.SimpleNamespace(on_device=False)).name == "numpy"


def test_only_hopper_is_still_gated(monkeypatch):
    """The CuPy FP8 / sparse decode, sparse prefill and tensor-core prefill passed on an H100 (2026-11-25)
    and are not gated; the Hopper (wgmma) decode kernel still is (cupy_hopper.check_gate)."""
    from mla.backends import cupy_backend, cupy_hopper, cupy_sparse_fp8, cupy_sparse_prefill, prefill_cupy

    assert getattr(cupy_backend, "unverified", None) is None  # "auto" may pick CuPy for FP8 / sparse problems
    for module in (cupy_sparse_fp8, cupy_sparse_prefill, prefill_cupy):
        assert not any(hasattr(module, name) for name in ("GATE", "gate_open", "_gate_open", "gate_reason"))
    monkeypatch.delenv(backends.UNVERIFIED_GATE, raising=False)
    with pytest.raises(backends.BackendUnavailable, match=f"Hopper.*{backends.UNVERIFIED_GATE}=1"):
        cupy_hopper.check_gate()
    monkeypatch.setenv(backends.UNVERIFIED_GATE, "1")
    cupy_hopper.check_gate()
