"""GPU tests of the CuPy FP8-cache and sparse (DSA) decode kernels, issue #5 (``pytest -m gpu``).

These kernels have not run on a GPU before this file: it is the check that must pass before the
MLA_CUPY_UNVERIFIED gate in ``mla/backends/cupy_sparse_fp8.py`` is removed. Every test opens the
gate with monkeypatch. FlashMLA's test style as in test_cupy_gpu.py: poisoned caches (NaN / 0xFF
bytes past each length and in unused blocks, garbage block ids, shuffled blocks), outputs poisoned
with NaN before each launch, DESIGN §6 tolerances. The reference is ``fast_reference``
(tests/test_cupy_fp8_sparse_cpu.py checks it equals ``mla.reference``), on the dequantised cache
for FP8. ``MLA_GPU_EXAMPLES`` sets the hypothesis example count (default 150).
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
from test_cupy_fp8_sparse_cpu import fast_reference

import mla
from mla import _arrays, testing
from mla.backends import BackendUnavailable

cupy_backend = pytest.importorskip("mla.backends.cupy_backend")
_ok, _why = cupy_backend.available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _ok, reason=f"CuPy backend unavailable: {_why}")]

BF16 = _arrays.BFLOAT16


@pytest.fixture(autouse=True)
def _unverified(monkeypatch):
    monkeypatch.setenv("MLA_CUPY_UNVERIFIED", "1")
    monkeypatch.setattr(cupy_backend, "POISON_OUTPUTS", True)


def _run(case, on_device=True, plan="arrays", lse_atol=testing.LSE_ATOL, block_table=True):
    c = testing.to_device(case) if on_device else case
    s_q, h_q = case.q.shape[1], case.q.shape[2]
    h_kv = case.k_cache.shape[2]
    kw = c.kwargs()
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
    out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend="cupy", **kw)
    if plan == "lazy":
        out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend="cupy", **kw)
    if on_device:
        cp = _arrays.cupy_module()
        assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    assert out.dtype == case.q.dtype and lse.dtype == np.float32
    out_ref, lse_ref = fast_reference(*case.args(), causal=case.causal, is_fp8_kvcache=case.is_fp8_kvcache,
                                      indices=case.indices, topk_length=case.topk_length, attn_sink=case.attn_sink)
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=lse_atol)


# ---- FP8 dense: DeepSeek dims, bf16 q, h_q in {16, 64, 128}, varlen with empty sequences


@pytest.mark.parametrize("h_q", [16, 64, 128])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_fp8_dense_matrix(h_q, s_q, causal):
    rng = np.random.default_rng(h_q * 17 + s_q)
    seqlens = [0, 1, 63, 64, 65, 700, 1500][: 3 + (h_q % 5)]
    case = testing.make_decode_case(rng, b=len(seqlens), s_q=s_q, h_q=h_q, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)
    _run(case)


@pytest.mark.parametrize("b,seqlen,h_q", [(1, 20000, 16), (64, 300, 16), (2, 4097, 128)])
def test_fp8_dense_splits(b, seqlen, h_q):
    """One long sequence (many splits + combine), many short ones (direct writes)."""
    rng = np.random.default_rng(b + seqlen)
    seqlens = rng.integers(seqlen // 2, seqlen + 1, size=b)
    seqlens[0] = seqlen
    case = testing.make_decode_case(rng, b=b, s_q=1, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=seqlens, dtype=BF16, fp8=True)
    _run(case)


@pytest.mark.parametrize("plan", ["arrays", "lazy", "none"])
@pytest.mark.parametrize("on_device", [True, False], ids=["cupy-in", "numpy-in"])
def test_fp8_dense_plans_kinds_and_heads(plan, on_device):
    rng = np.random.default_rng(5)
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=32, h_kv=2, d=576, head_dim_v=512, page_block_size=16,
                                    seqlens=[0, 900, 130], dtype=BF16, causal=True, fp8=True)
    _run(case, on_device=on_device, plan=plan)


def test_fp8_dense_large_values():
    """Scales far from 1 (x 2^-20 and x 2^16): both paths of the dequantisation (scale < 2^8, >= 2^8)."""
    rng = np.random.default_rng(9)
    for scale in (2.0**-20, 2.0**16):
        case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[100, 200], dtype=BF16, fp8=True)
        # rescale the cache by a power of two through the stored fp32 scales (exact, q unchanged)
        k = case.k_cache.copy()
        sc = np.ascontiguousarray(k[..., 512:528]).view("<f4") * np.float32(scale)
        k[..., 512:528] = np.ascontiguousarray(sc).view(np.uint8)
        case.k_cache = k
        _run(case)


def test_fp8_float16_q_is_declined():
    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=np.float16, fp8=True)
    c = testing.to_device(case)
    with pytest.raises(BackendUnavailable, match="bfloat16"):
        mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="cupy")


def test_gate_closed_declines_on_gpu(monkeypatch):
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED")
    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=BF16, fp8=True)
    c = testing.to_device(case)
    with pytest.raises(BackendUnavailable, match="MLA_CUPY_UNVERIFIED"):
        mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="cupy")
    out, lse = mla.flash_mla_with_kvcache(*c.args(), is_fp8_kvcache=True, backend="auto")  # falls back
    testing.assert_close(out, lse, *fast_reference(*case.args(), is_fp8_kvcache=True))


# ---- sparse: b x s_q x h_q x topk x invalid ratio x cache kind


def _sparse_case(rng, b, s_q, h_q, topk, invalid, fp8, h_kv=1, d=576, dv=512, page=64, dtype=BF16,
                 max_len=3000):
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
    _run(_sparse_case(rng, b, s_q, h_q, topk, invalid, fp8))


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
    sink = rng.standard_normal(64).astype(np.float32) * 3
    sink[:3] = (np.inf, -np.inf, 0)
    case.attn_sink = sink
    _run(case)


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_sparse_sink_only_and_topk_length_only(fp8):
    rng = np.random.default_rng(21)
    case = _sparse_case(rng, 2, 1, 16, 512, 0.0, fp8)
    case.attn_sink = rng.standard_normal(16).astype(np.float32)
    _run(case)
    case.attn_sink = None
    case.topk_length = np.array([100, 3], np.int32)
    _run(case)


@pytest.mark.parametrize("dtype", [BF16, np.float16], ids=["bf16", "fp16"])
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


# ---- hypothesis: random sparse shapes

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    given = None

if given is not None:

    @settings(max_examples=int(os.environ.get("MLA_GPU_EXAMPLES", "150")), deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(kind=st.sampled_from(["fp8", "bf16", "bf16-small", "fp16-small"]), b=st.integers(1, 4),
           s_q=st.integers(1, 4), h_kv=st.sampled_from([1, 1, 2]), group=st.integers(1, 70),
           page=st.sampled_from([1, 16, 64]), max_len=st.integers(0, 600), topk=st.integers(1, 700),
           invalid=st.sampled_from([0.0, 0.3, 0.9, 1.0]), use_tl=st.booleans(), use_sink=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def test_hypothesis_random_sparse(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink,
                                      seed):
        rng = np.random.default_rng(seed)
        fp8 = kind == "fp8"
        d, dv = (576, 512) if kind in ("fp8", "bf16") else (64, 48)
        dtype = np.float16 if kind == "fp16-small" else BF16
        case = testing.make_decode_case(rng, b=b, s_q=s_q, h_q=h_kv * group, h_kv=h_kv, d=d, head_dim_v=dv,
                                        page_block_size=page, max_seqlen=max_len, dtype=dtype, fp8=fp8)
        case.indices = testing.make_sparse_indices(rng, case, topk, invalid_ratio=invalid)
        if use_tl:
            case.topk_length = rng.integers(0, topk + 1, size=b).astype(np.int32)
        if use_sink:
            case.attn_sink = (rng.standard_normal(h_kv * group) * 2).astype(np.float32)
        # lse atol 4e-6 as in test_cupy_gpu.py: with 1-2 keys lse is one fp32 dot product of 576 terms
        _run(case, lse_atol=4e-6)


# ---- compute-sanitizer on a representative subset

_SANITIZE = textwrap.dedent("""
    import os
    os.environ['MLA_CUPY_UNVERIFIED'] = '1'
    import numpy as np, mla
    from mla import testing
    from mla.backends import cupy_backend
    cupy_backend.POISON_OUTPUTS = True
    rng = np.random.default_rng(0)
    bf = mla._arrays.BFLOAT16
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[0, 70, 3000], dtype=bf, fp8=True, causal=True)
    c = testing.to_device(case)
    mla.flash_mla_with_kvcache(*c.args(), backend='cupy', **c.kwargs())[0].get()
    for fp8 in (False, True):
        case = testing.make_decode_case(rng, b=2, s_q=2, h_q=128, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[500, 0], dtype=bf, fp8=fp8)
        idx = testing.make_sparse_indices(rng, case, 300, invalid_ratio=0.5)
        c = testing.to_device(case)
        import cupy as cp
        mla.flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, is_fp8_kvcache=fp8, indices=cp.asarray(idx),
                                   attn_sink=cp.zeros(128, cp.float32), backend='cupy')[0].get()
    print('SANITIZE-DONE')
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(tool):
    result = testing.run_compute_sanitizer(tool, _SANITIZE)
    if result is None:
        pytest.skip("compute-sanitizer is not on PATH")
    ok, report = result
    assert ok, report
