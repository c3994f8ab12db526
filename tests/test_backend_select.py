"""backend="auto" never picks a kernel that has not run on a GPU unless MLA_CUPY_UNVERIFIED=1."""

from __future__ import annotations

import types

import numpy as np
import pytest

from mla import backends
from mla.testing import make_decode_case


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


def test_nothing_is_gated():
    """Every CuPy kernel has passed its GPU tests: the FP8 / sparse decode, sparse prefill and tensor-core
    prefill on 2026-11-25, the Hopper (wgmma) decode kernels on 2026-11-26. None carries a gate."""
    from mla.backends import cupy_backend, cupy_hopper, cupy_sparse_fp8, cupy_sparse_prefill, prefill_cupy

    assert getattr(cupy_backend, "unverified", None) is None  # "auto" may pick CuPy for every problem it takes
    for module in (cupy_hopper, cupy_sparse_fp8, cupy_sparse_prefill, prefill_cupy):
        assert not any(hasattr(module, name) for name in ("GATE", "gate_open", "_gate_open", "gate_reason",
                                                          "check_gate"))


def test_numba_tensor_core_versions_need_16_channels_a_warp(monkeypatch):
    """v5/v6 (8 warps) need d_v % 128 == 0, v4 (4 warps) d_v % 64 == 0: with d_v = 64 an 8-warp CTA gave
    each warp 8 output channels and wrote out = 0 (GPU hypothesis run, 2026-11-26). Such shapes fall back
    to v4, and building v5/v6 for them raises."""
    import ml_dtypes

    from mla import api
    from mla.backends import numba_backend

    nd = numba_backend._kernels()
    assert nd.v4_supported(64, 64, "bf16", 4) and not nd.v4_supported(64, 64, "bf16", 8)
    assert nd.v4_supported(576, 512, "bf16", 8) and nd.v4_supported(128, 128, "f16", 8)
    with pytest.raises(ValueError, match="d_v % 128 == 0"):
        nd.DecodeLaunch(6, "bf16", 1, 16, 1, 64, 64, 64, 4)
    case = make_decode_case(np.random.default_rng(0), b=1, s_q=1, h_q=16, d=64, head_dim_v=64, page_block_size=16,
                            seqlens=[5], dtype=ml_dtypes.bfloat16)
    problem = api._validate(*case.args(), None, False, False, None, None, None, True)
    for requested, picked in (("6", 4), ("5", 4), ("4", 4)):
        monkeypatch.setenv("MLA_NUMBA_VERSION", requested)
        assert numba_backend.selected_version(problem) == picked
    wide = make_decode_case(np.random.default_rng(0), b=1, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                            seqlens=[5], dtype=ml_dtypes.bfloat16)
    monkeypatch.setenv("MLA_NUMBA_VERSION", "6")
    assert numba_backend.selected_version(api._validate(*wide.args(), None, False, False, None, None, None, True)) == 6
