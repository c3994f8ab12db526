"""The Numba backend on a GPU against the reference (``pytest -m gpu``).

FlashMLA's case matrix (DESIGN.md §6): b, s_q, s_k, h_q in {1,3,9,63,64,126,128}, h_kv in
{1,2,3,8}, varlen, causal, zero-length sequences, NaN-poisoned cache tails and garbage block-table
entries (mla.testing), bf16 and fp16, every kernel version; outputs and partial buffers are
filled with NaN before each launch (numba_backend.POISON_OUTPUTS). Plus hypothesis over random
shapes (>= 200 examples).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from mla import _arrays, reference, testing

pytestmark = pytest.mark.gpu

if not _arrays.gpu_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("needs a CUDA GPU with CuPy (run on the GPU machine with -m gpu)", allow_module_level=True)

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla.backends import numba_backend  # noqa: E402


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(numba_backend, "POISON_OUTPUTS", True)


_REFS: dict = {}


def _run(case, version, monkeypatch, on_device=True, key=None):
    monkeypatch.setenv("MLA_NUMBA_VERSION", str(version))
    args = testing.to_device(case).args() if on_device else case.args()
    out, lse = mla.flash_mla_with_kvcache(*args, causal=case.causal, backend="numba")
    if key is None or key not in _REFS:
        ref = reference.flash_mla_reference(*case.args(), causal=case.causal)
        if key is not None:
            _REFS[key] = ref
    ref_out, ref_lse = _REFS[key] if key is not None else ref
    if on_device:
        assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    else:
        assert isinstance(out, np.ndarray)
    assert out.dtype == case.q.dtype and lse.dtype == np.float32
    testing.assert_close(out, lse, ref_out, ref_lse)


# versions the case matrix runs (all by default; MLA_TEST_NUMBA_VERSIONS=5,6 narrows a quick re-check)
MATRIX_VERSIONS = [int(v) for v in os.environ.get("MLA_TEST_NUMBA_VERSIONS", "1,2,3,4,5,6").split(",")]

# (b, s_q, s_k, h_q, h_kv, varlen, causal): every value of the matrix appears; DeepSeek dims
MATRIX = [
    (1, 1, 1, 1, 1, False, False),
    (4, 1, 4096, 1, 1, True, False),
    (3, 2, 257, 3, 1, False, True),
    (9, 1, 1024, 3, 3, True, False),
    (2, 4, 63, 9, 3, False, True),
    (9, 1, 2048, 9, 1, True, False),
    (4, 1, 4097, 63, 3, True, False),
    (2, 2, 777, 63, 1, False, True),
    (8, 1, 4096, 64, 1, True, False),
    (3, 2, 1025, 64, 2, False, True),
    (2, 1, 300, 64, 8, True, False),
    (2, 1, 2000, 126, 1, True, False),
    (2, 2, 513, 126, 2, False, True),
    (3, 1, 129, 126, 3, True, True),
    (2, 1, 4096, 128, 1, True, False),
    (2, 2, 1000, 128, 8, False, True),
    (1, 1, 32768, 128, 1, False, False),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("version", MATRIX_VERSIONS)
@pytest.mark.parametrize("b,s_q,s_k,h_q,h_kv,varlen,causal", MATRIX)
def test_case_matrix(monkeypatch, dtype, version, b, s_q, s_k, h_q, h_kv, varlen, causal):
    if version == 1 and s_k * h_q * b > 4096 * 64 * 2:
        pytest.skip("v1 (a barrier per key) is covered on the smaller cases; this one is slow")
    key = (b, s_q, s_k, h_q, h_kv, varlen, causal, dtype)
    rng = np.random.default_rng(abs(hash(key[:-1])) % 2**32)
    if varlen:
        seqlens = rng.integers(s_k // 2, s_k + 1, size=b)
        seqlens[0] = 0  # a zero-length sequence in every varlen case
    else:
        seqlens = np.full(b, s_k)
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=dtype, causal=causal)
    _run(case, version, monkeypatch, key=key)


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
def test_host_arrays_in_host_arrays_out(monkeypatch, version):
    rng = np.random.default_rng(7)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, h_kv=1, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=[0, 100, 700], dtype="bfloat16", causal=True)
    _run(case, version, monkeypatch, on_device=False)


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_other_dims_and_pages(monkeypatch, version, dtype):
    rng = np.random.default_rng(11)
    case = testing.make_decode_case(rng, b=4, s_q=3, h_q=6, h_kv=2, d=64, head_dim_v=48, page_block_size=16,
                                    max_seqlen=300, dtype=dtype, causal=True)
    _run(case, version, monkeypatch)


def test_hypothesis_random_shapes(monkeypatch):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.delenv("MLA_NUMBA_VERSION", raising=False)

    @settings(max_examples=200, deadline=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(
        b=st.integers(1, 4), s_q=st.integers(1, 3), h_kv=st.sampled_from([1, 2, 3]),
        group=st.integers(1, 20), dims=st.sampled_from([(64, 64), (64, 32), (576, 512), (128, 96), (40, 24)]),
        page=st.sampled_from([1, 16, 64, 100]), max_len=st.integers(0, 400), causal=st.booleans(),
        dtype=st.sampled_from(["bfloat16", "float16"]), version=st.sampled_from([None, 1, 2, 3, 4, 5, 6]),
        seed=st.integers(0, 2**31),
    )
    def check(b, s_q, h_kv, group, dims, page, max_len, causal, dtype, version, seed):
        d, d_v = dims
        rng = np.random.default_rng(seed)
        case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_kv * group, h_kv=h_kv, d=d, head_dim_v=d_v,
                                        page_block_size=page, max_seqlen=max_len, dtype=dtype, causal=causal)
        if version is None:
            os.environ.pop("MLA_NUMBA_VERSION", None)
        else:
            os.environ["MLA_NUMBA_VERSION"] = str(version)
        try:
            dev = testing.to_device(case)
            out, lse = mla.flash_mla_with_kvcache(*dev.args(), causal=causal, backend="numba")
        finally:
            os.environ.pop("MLA_NUMBA_VERSION", None)
        ref_out, ref_lse = reference.flash_mla_reference(*case.args(), causal=causal)
        testing.assert_close(out, lse, ref_out, ref_lse)

    assert hypothesis is not None
    check()
