"""GPU tests of the Numba FP8-cache / sparse (DSA) decode, issue #5 (``pytest -m gpu``).

``mla.kernels.numba_sparse_fp8`` through ``backend="numba"``, FlashMLA's test style: poisoned caches
(NaN / 0xFF bytes past each length and in unused blocks, garbage block ids, shuffled blocks),
index-list entries past ``topk_length`` pointing at poisoned slots, outputs and partial buffers
filled with NaN before each launch (``numba_backend.POISON_OUTPUTS``), DESIGN §6 tolerances (lse
atol 4e-6, as in the CuPy tests: with one or two keys lse is a single fp32 dot product of 576
terms). The reference is ``fast_reference`` from test_cupy_fp8_sparse_cpu.py (checked there to equal
``mla.reference``; the plain reference would build [topk, h_q, 576] arrays per row), run on the
dequantised cache for FP8.

The issue's matrix b in {1, 2, 64} x s_q in {1, 2, 4} x h_q in {16, 64, 128} x topk in {64, 512, 2048}
x invalid ratio {0, 0.5, 1} x {bf16, FP8} cache is 486 cases; its reference alone would take
minutes, so ``test_sparse_matrix`` runs a fixed sample of 54 that holds every value of every
dimension (all (cache, h_q, s_q, topk) combinations, with b and the invalid ratio cycling through
their values), as the CuPy tests do. Not yet run on a GPU (written without one).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from mla import _arrays, testing

pytestmark = pytest.mark.gpu

if not _arrays.gpu_available() or os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    pytest.skip("needs a CUDA GPU with CuPy (run on the GPU machine with -m gpu)", allow_module_level=True)

import cupy as cp  # noqa: E402
import ml_dtypes  # noqa: E402
from mla.kernels import numba_sparse_fp8 as nsf  # noqa: E402
from numba import cuda  # noqa: E402
from test_cupy_fp8_sparse_cpu import fast_reference  # noqa: E402

import mla  # noqa: E402
from mla.backends import BackendUnavailable, numba_backend  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
import _sparse_fp8_gpu as shared  # noqa: E402
from _sanitizer import check_compute_sanitizer  # noqa: E402

_ok, _why = numba_backend.available()
if not _ok:
    pytest.skip(f"Numba backend unavailable: {_why}", allow_module_level=True)

BF16 = _arrays.BFLOAT16
LSE_ATOL = 4e-6


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(numba_backend, "POISON_OUTPUTS", True)


def _run(case, on_device=True, plan="arrays", block_table=True):
    """Through backend="numba" against fast_reference; NumPy inputs give NumPy outputs."""
    shared.run(case, "numba", on_device=on_device, plan=plan, block_table=block_table, lse_atol=LSE_ATOL,
               host_outputs=True)


# ---- the bit-level helpers on the device, exhaustively


def test_bit_helpers_on_device():
    @cuda.jit
    def decode(codes, bits, x, e4m3, widened, narrowed):
        t = cuda.grid(1)
        if t < codes.shape[0]:
            e4m3[t] = nsf.e4m3_to_f32(codes[t])
        if t < bits.shape[0]:
            widened[t] = nsf.bf16_bits_to_f32(bits[t])
        if t < x.shape[0]:
            narrowed[t] = nsf.f32_to_bf16_bits(x[t])

    rng = np.random.default_rng(0)
    codes = np.arange(256, dtype=np.uint8)
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    x = (rng.standard_normal(50000) * 2.0 ** rng.integers(-140, 120, 50000)).astype(np.float32)
    x[:6] = (np.inf, -np.inf, 0.0, -0.0, 3.4028235e38, 1e-45)
    e4m3, widened, narrowed = cp.full(256, 7, cp.float32), cp.zeros(65536, cp.float32), cp.zeros(x.size, cp.uint16)
    decode[(65536 + 255) // 256, 256](cp.asarray(codes), cp.asarray(bits), cp.asarray(x), e4m3, widened, narrowed)
    for got, want in ((e4m3.get(), codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)),
                      (widened.get(), bits.view(BF16).astype(np.float32))):
        nan = np.isnan(want)
        assert np.array_equal(np.isnan(got), nan)
        assert np.array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))
    assert np.array_equal(narrowed.get(), x.astype(BF16).view(np.uint16))


# ---- FP8 dense: DeepSeek dims, h_q in {16, 64, 128}, varlen with empty sequences, every q dtype


@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_fp8_dense_matrix(h_q, s_q, causal):
    _run(shared.fp8_dense_matrix_case(h_q, s_q, causal))


@pytest.mark.parametrize("dtype", [np.float16, np.float32], ids=["f16-q", "f32-q"])
def test_fp8_other_q_dtypes(dtype):
    """The Numba backend takes FP8 caches with float16 / float32 q too (the CuPy backend: bf16 only)."""
    rng = np.random.default_rng(3)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[0, 300, 1000], dtype=dtype, causal=True, fp8=True)
    _run(case)
    case.indices = testing.make_sparse_indices(rng, case, 256, invalid_ratio=0.3)
    case.causal = False
    _run(case)


@pytest.mark.parametrize("b,seqlen,h_q", [(1, 20000, 16), (64, 300, 16), (2, 4097, 128)])
def test_fp8_dense_splits(b, seqlen, h_q):
    """One long sequence (many splits + combine), many short ones."""
    _run(shared.fp8_dense_splits_case(b, seqlen, h_q))


def test_fp8_dense_scales_far_from_one():
    """Stored scales x 2^-20 and x 2^16 (exact: powers of two), q unchanged."""
    for case in shared.fp8_rescaled_cases():
        _run(case)


# ---- sparse: the matrix, sampled (see the module docstring)


@pytest.mark.parametrize("k,fp8,h_q,s_q,topk", shared.SPARSE_PARAMS, ids=shared.SPARSE_IDS)
def test_sparse_matrix(k, fp8, h_q, s_q, topk):
    # every other case (odd k): a topk_length, its tail pointing at poisoned slots
    _run(shared.sparse_matrix_case(k, fp8, h_q, s_q, topk, odd_topk_length=True))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("b,topk", [(1, 8192), (2, 300), (64, 2048)])
def test_sparse_topk_length_and_sink(fp8, b, topk):
    """topk_length (incl. 0 and topk) and attn_sink (incl. +-inf); one long list (many splits)."""
    _run(shared.topk_length_and_sink_case(fp8, b, topk, poison_tail=True))


def test_dense_bf16_with_sink():
    """attn_sink without indices (dense, bf16 cache) also goes to the new kernels."""
    rng = np.random.default_rng(12)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[0, 77, 900], dtype=BF16, causal=True)
    case.attn_sink = rng.standard_normal(16).astype(np.float32)
    _run(case)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d,dv,page,h_kv", shared.GENERIC_SHAPES)
def test_sparse_generic_shapes(dtype, d, dv, page, h_kv):
    _run(shared.generic_shape_case(dtype, d, dv, page, h_kv))


@pytest.mark.parametrize("plan", ["arrays", "lazy", "none"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cupy-in", "numpy-in"])
def test_sparse_plans_kinds_no_block_table(plan, on_device):
    _run(shared.plans_case(), on_device=on_device, plan=plan, block_table=(plan != "none"))


def test_indices_out_of_range_with_validate_false_are_skipped():
    """validate=False: indices outside [0, num_blocks * page) are treated as -1 (never read)."""
    rng = np.random.default_rng(4)
    case = shared.sparse_case(rng, 2, 2, 16, 300, 0.1, True)
    limit = case.k_cache.shape[0] * case.k_cache.shape[1]
    bad = rng.random(case.indices.shape) < 0.2
    wild = np.where(rng.random(bad.shape) < 0.5, limit + 5, -7).astype(np.int32)
    c = testing.to_device(case)
    out, lse = mla.flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, is_fp8_kvcache=True,
                                          indices=cp.asarray(np.where(bad, wild, case.indices)), backend="numba",
                                          validate=False)
    ref = fast_reference(*case.args(), is_fp8_kvcache=True, indices=np.where(bad, -1, case.indices))
    testing.assert_close(out, lse, *ref, lse_atol=LSE_ATOL)


def test_declines_too_large_d():
    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=1, s_q=1, h_q=2, d=8192, head_dim_v=64, page_block_size=16, seqlens=[20],
                                    dtype=BF16)
    c = testing.to_device(case)
    with pytest.raises(BackendUnavailable, match="too large"):
        mla.flash_mla_with_kvcache(*c.args(), indices=cp.zeros((1, 1, 4), cp.int32), backend="numba")


# ---- hypothesis: random sparse shapes (few distinct head groups: each new group size compiles)

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=int(os.environ.get("MLA_GPU_EXAMPLES", "60")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(**shared.random_sparse_strategies(["fp8", "bf16", "bf16-small", "fp16-small", "fp32-small"],
                                             group=st.sampled_from([1, 3, 16, 20, 64])))
    def test_hypothesis_random_sparse(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                      seed):
        _run(shared.random_sparse_case(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                       seed))


# ---- compute-sanitizer on a representative subset

_SANITIZE = shared.sanitize_script("numba", topk_length=[250, 0])


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    check_compute_sanitizer(tool, _SANITIZE)
