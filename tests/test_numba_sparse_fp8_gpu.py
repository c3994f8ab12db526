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
import textwrap

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

_ok, _why = numba_backend.available()
if not _ok:
    pytest.skip(f"Numba backend unavailable: {_why}", allow_module_level=True)

BF16 = _arrays.BFLOAT16
LSE_ATOL = 4e-6


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(numba_backend, "POISON_OUTPUTS", True)


def _unused_positions(case):
    """Token positions in blocks no sequence uses (NaN / 0xFF there)."""
    page = case.k_cache.shape[1]
    used = set()
    for i, L in enumerate(case.cache_seqlens):
        used.update(int(x) for x in case.block_table[i, : -(-int(L) // page)])
    free = [blk for blk in range(case.k_cache.shape[0]) if blk not in used]
    return np.array([blk * page + o for blk in free for o in range(page)], np.int32)


def _poison_tail(rng, case):
    """Entries past topk_length point at poisoned slots: a kernel that reads them gives NaN."""
    free = _unused_positions(case)
    for i in range(case.q.shape[0]):
        tail = case.indices[i, :, case.topk_length[i]:]
        tail[...] = rng.choice(free, size=tail.shape)


def _run(case, on_device=True, plan="arrays", block_table=True):
    c = testing.to_device(case) if on_device else case
    s_q, h_q = case.q.shape[1], case.q.shape[2]
    h_kv = case.k_cache.shape[2]
    kw = c.kwargs()
    kw["attn_sink"] = c.attn_sink  # DecodeCase.kwargs passes the sink in sparse mode only
    topk = None if case.indices is None else case.indices.shape[-1]
    if plan == "arrays":
        sched, splits = mla.get_mla_metadata(c.cache_seqlens, s_q * h_q // h_kv, h_kv, topk=topk)
    elif plan == "lazy":
        sched, splits = mla.get_mla_metadata()
    else:
        sched = splits = None
    args = list(c.args())
    if not block_table:
        args[2] = args[3] = None  # sparse mode needs neither
    out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend="numba", **kw)
    if plan == "lazy":  # the second call reuses the filled plan
        out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend="numba", **kw)
    if on_device:
        assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    else:
        assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == case.q.dtype and lse.dtype == np.float32
    out_ref, lse_ref = fast_reference(*case.args(), causal=case.causal, is_fp8_kvcache=case.is_fp8_kvcache,
                                      indices=case.indices, topk_length=case.topk_length, attn_sink=case.attn_sink)
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=LSE_ATOL)


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
    rng = np.random.default_rng(h_q * 17 + s_q)
    seqlens = [0, 1, 63, 64, 65, 700, 1500][: 3 + (h_q % 5)]
    case = testing.make_decode_case(rng, b=len(seqlens), s_q=s_q, h_q=h_q, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)
    _run(case)


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
    rng = np.random.default_rng(b + seqlen)
    seqlens = rng.integers(seqlen // 2, seqlen + 1, size=b)
    seqlens[0] = seqlen
    case = testing.make_decode_case(rng, b=b, s_q=1, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=seqlens, dtype=BF16, fp8=True)
    _run(case)


def test_fp8_dense_scales_far_from_one():
    """Stored scales x 2^-20 and x 2^16 (exact: powers of two), q unchanged."""
    rng = np.random.default_rng(9)
    for scale in (2.0**-20, 2.0**16):
        case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[100, 200], dtype=BF16, fp8=True)
        k = case.k_cache.copy()
        sc = np.ascontiguousarray(k[..., 512:528]).view("<f4") * np.float32(scale)
        k[..., 512:528] = np.ascontiguousarray(sc).view(np.uint8)
        case.k_cache = k
        _run(case)


# ---- sparse: the matrix, sampled (see the module docstring)


def _sparse_case(rng, b, s_q, h_q, topk, invalid, fp8, h_kv=1, d=576, dv=512, page=64, dtype=BF16, max_len=3000):
    if b <= 2:
        seqlens = rng.integers(1, max_len + 1, size=b)
        if b == 2:
            seqlens[1] = 0  # an empty sequence: all its indices are -1
    else:
        seqlens = rng.integers(0, 301, size=b)
    case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, d=d, head_dim_v=dv, page_block_size=page,
                                    seqlens=seqlens, dtype=dtype, fp8=fp8)
    case.indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=invalid)
    return case


SPARSE = [(fp8, h_q, s_q, topk) for fp8 in (False, True) for h_q in (16, 64, 128) for s_q in (1, 2, 4)
          for topk in (64, 512, 2048)]


@pytest.mark.parametrize("k,fp8,h_q,s_q,topk", [(k, *c) for k, c in enumerate(SPARSE)],
                         ids=[f"{'fp8' if c[0] else 'bf16'}-hq{c[1]}-sq{c[2]}-topk{c[3]}" for c in SPARSE])
def test_sparse_matrix(k, fp8, h_q, s_q, topk):
    b = (1, 2, 64)[k % 3]
    invalid = (0.0, 0.5, 1.0)[(k // 3) % 3]
    rng = np.random.default_rng(k)
    case = _sparse_case(rng, b, s_q, h_q, topk, invalid, fp8)
    if k % 2:  # every other case: a topk_length, its tail pointing at poisoned slots
        case.topk_length = rng.integers(0, topk + 1, size=b).astype(np.int32)
        _poison_tail(rng, case)
    _run(case)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("b,topk", [(1, 8192), (2, 300), (64, 2048)])
def test_sparse_topk_length_and_sink(fp8, b, topk):
    """topk_length (incl. 0 and topk) and attn_sink (incl. +-inf); one long list (many splits)."""
    rng = np.random.default_rng(b + topk + fp8)
    case = _sparse_case(rng, b, 2, 64, topk, 0.2, fp8, max_len=9000)
    tl = rng.integers(0, topk + 1, size=b).astype(np.int32)
    tl[0] = topk
    if b > 1:
        tl[-1] = 0
    case.topk_length = tl
    _poison_tail(rng, case)
    sink = rng.standard_normal(64).astype(np.float32) * 3
    sink[:3] = (np.inf, -np.inf, 0)
    case.attn_sink = sink
    _run(case)


def test_dense_bf16_with_sink():
    """attn_sink without indices (dense, bf16 cache) also goes to the new kernels."""
    rng = np.random.default_rng(12)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[0, 77, 900], dtype=BF16, causal=True)
    case.attn_sink = rng.standard_normal(16).astype(np.float32)
    _run(case)


@pytest.mark.parametrize("dtype", [BF16, np.float16, np.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("d,dv,page,h_kv", [(576, 512, 64, 2), (64, 48, 16, 2), (40, 33, 7, 3), (16, 16, 1, 1)])
def test_sparse_generic_shapes(dtype, d, dv, page, h_kv):
    rng = np.random.default_rng(d + dv + page)
    _run(_sparse_case(rng, 2, 2, 6 * h_kv, 100, 0.3, False, h_kv=h_kv, d=d, dv=dv, page=page, dtype=dtype,
                      max_len=400))


@pytest.mark.parametrize("plan", ["arrays", "lazy", "none"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cupy-in", "numpy-in"])
def test_sparse_plans_kinds_no_block_table(plan, on_device):
    rng = np.random.default_rng(8)
    case = _sparse_case(rng, 2, 2, 32, 700, 0.1, True)
    _run(case, on_device=on_device, plan=plan, block_table=(plan != "none"))


def test_indices_out_of_range_with_validate_false_are_skipped():
    """validate=False: indices outside [0, num_blocks * page) are treated as -1 (never read)."""
    rng = np.random.default_rng(4)
    case = _sparse_case(rng, 2, 2, 16, 300, 0.1, True)
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
    @given(kind=st.sampled_from(["fp8", "bf16", "bf16-small", "fp16-small", "fp32-small"]), b=st.integers(1, 4),
           s_q=st.integers(1, 4), h_kv=st.sampled_from([1, 1, 2]), group=st.sampled_from([1, 3, 16, 20, 64]),
           page=st.sampled_from([1, 16, 64]), max_len=st.integers(0, 600), topk=st.integers(1, 700),
           invalid=st.sampled_from([0.0, 0.3, 0.9, 1.0]), use_tl=st.booleans(), use_sink=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def test_hypothesis_random_sparse(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                      seed):
        rng = np.random.default_rng(seed)
        fp8 = kind == "fp8"
        d, dv = (576, 512) if kind in ("fp8", "bf16") else (64, 48)
        dtype = {"fp16-small": np.float16, "fp32-small": np.float32}.get(kind, BF16)
        case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_kv * group, h_kv=h_kv, d=d, head_dim_v=dv,
                                        page_block_size=page, max_seqlen=max_len, dtype=dtype, fp8=fp8)
        case.indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=invalid)
        if use_tl:
            case.topk_length = rng.integers(0, topk + 1, size=b).astype(np.int32)
        if use_sink:
            case.attn_sink = (rng.standard_normal(h_kv * group) * 2).astype(np.float32)
        _run(case)


# ---- compute-sanitizer on a representative subset

_SANITIZE = textwrap.dedent("""
    import numpy as np, cupy as cp, mla
    from mla import testing
    from mla.backends import numba_backend
    numba_backend.POISON_OUTPUTS = True
    rng = np.random.default_rng(0)
    bf = mla._arrays.BFLOAT16
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[0, 70, 3000], dtype=bf, fp8=True, causal=True)
    c = testing.to_device(case)
    mla.flash_mla_with_kvcache(*c.args(), backend='numba', **c.kwargs())[0].get()
    for fp8 in (False, True):
        case = testing.make_decode_case(rng, b=2, s_q=2, h_q=128, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[500, 0], dtype=bf, fp8=fp8)
        idx = testing.make_sparse_indices(rng, case, 300, invalid_ratio=0.5)
        c = testing.to_device(case)
        mla.flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, is_fp8_kvcache=fp8, indices=cp.asarray(idx),
                                   topk_length=cp.asarray(np.array([250, 0], np.int32)),
                                   attn_sink=cp.zeros(128, cp.float32), backend='numba')[0].get()
    print('SANITIZE-DONE')
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    result = testing.run_compute_sanitizer(tool, _SANITIZE)
    if result is None:
        pytest.skip("compute-sanitizer is not on PATH")
    ok, report = result
    assert ok, report
