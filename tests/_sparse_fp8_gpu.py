"""Shared by tests/test_numba_sparse_fp8_gpu.py and tests/test_cupy_fp8_sparse_gpu.py (GPU): one decode run through
a backend checked against ``fast_reference`` (tests/test_cupy_fp8_sparse_cpu.py), and the cases of the FP8 / sparse
test matrices both backends run (the same seeds, hence the same data, for both)."""

from __future__ import annotations

import textwrap

import numpy as np
from test_cupy_fp8_sparse_cpu import fast_reference

import mla
from mla import _arrays, testing

BF16 = _arrays.BFLOAT16


def run(case, backend, on_device=True, plan="arrays", block_table=True, lse_atol=testing.LSE_ATOL,
        host_outputs=False, out_atol=testing.OUT_ATOL):
    """Decode ``case`` with ``backend`` and compare with ``fast_reference`` (DESIGN §6 tolerances, lse_atol,
    out_atol: 8e-4, or ``testing.out_atol(case)`` for kernels that round bf16 P once).

    on_device: CuPy inputs (the outputs must be CuPy arrays), else the NumPy arrays as they are (host_outputs:
    the outputs must then be NumPy arrays). plan: "arrays" (``get_mla_metadata`` with the problem), "lazy" (an
    empty plan, filled by the first call and reused by a second) or "none". block_table=False passes neither
    block_table nor cache_seqlens (sparse mode needs neither)."""
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
    out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend=backend, **kw)
    if plan == "lazy":  # the second call reuses the filled plan
        out, lse = mla.flash_mla_with_kvcache(*args, sched, splits, backend=backend, **kw)
    if on_device:
        cp = _arrays.cupy_module()
        assert isinstance(out, cp.ndarray) and isinstance(lse, cp.ndarray)
    elif host_outputs:
        assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    assert out.dtype == case.q.dtype and lse.dtype == np.float32
    out_ref, lse_ref = fast_reference(*case.args(), causal=case.causal, is_fp8_kvcache=case.is_fp8_kvcache,
                                      indices=case.indices, topk_length=case.topk_length, attn_sink=case.attn_sink)
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=lse_atol, out_atol=out_atol)


# ---- FP8 dense: DeepSeek dims, varlen with empty sequences


def fp8_dense_matrix_case(h_q, s_q, causal):
    rng = np.random.default_rng(h_q * 17 + s_q)
    seqlens = [0, 1, 63, 64, 65, 700, 1500][: 3 + (h_q % 5)]
    return testing.make_decode_case(rng, b=len(seqlens), s_q=s_q, h_q=h_q, d=576, head_dim_v=512,
                                    page_block_size=64, seqlens=seqlens, dtype=BF16, causal=causal, fp8=True)


def fp8_dense_splits_case(b, seqlen, h_q):
    """One sequence of ``seqlen`` tokens, the others (if any) between seqlen / 2 and seqlen."""
    rng = np.random.default_rng(b + seqlen)
    seqlens = rng.integers(seqlen // 2, seqlen + 1, size=b)
    seqlens[0] = seqlen
    return testing.make_decode_case(rng, b=b, s_q=1, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=seqlens, dtype=BF16, fp8=True)


def fp8_rescaled_cases():
    """Two FP8 cases whose stored fp32 scales are multiplied by 2^-20 and by 2^16 (exact: powers of two), q
    unchanged."""
    rng = np.random.default_rng(9)
    for scale in (2.0**-20, 2.0**16):
        case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[100, 200], dtype=BF16, fp8=True)
        k = case.k_cache.copy()
        sc = np.ascontiguousarray(k[..., 512:528]).view("<f4") * np.float32(scale)
        k[..., 512:528] = np.ascontiguousarray(sc).view(np.uint8)
        case.k_cache = k
        yield case


# ---- sparse


def sparse_case(rng, b, s_q, h_q, topk, invalid, fp8, h_kv=1, d=576, dv=512, page=64, dtype=BF16, max_len=3000):
    """b <= 2: lengths up to max_len (with b = 2 the second sequence is empty: all its indices are -1); else
    lengths up to 300. ``invalid``: the fraction of indices set to -1."""
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


# the sampled sparse matrix: every (cache, h_q, s_q, topk); b and the invalid ratio cycle with the case number k
SPARSE = [(fp8, h_q, s_q, topk) for fp8 in (False, True) for h_q in (16, 64, 128) for s_q in (1, 2, 4)
          for topk in (64, 512, 2048)]
SPARSE_PARAMS = [(k, *c) for k, c in enumerate(SPARSE)]
SPARSE_IDS = [f"{'fp8' if c[0] else 'bf16'}-hq{c[1]}-sq{c[2]}-topk{c[3]}" for c in SPARSE]


def sparse_matrix_case(k, fp8, h_q, s_q, topk, odd_topk_length=False):
    """Case k of SPARSE_PARAMS. odd_topk_length: odd k also get a random topk_length, the entries past it
    pointing at poisoned slots."""
    b = (1, 2, 64)[k % 3]
    invalid = (0.0, 0.5, 1.0)[(k // 3) % 3]
    rng = np.random.default_rng(k)
    case = sparse_case(rng, b, s_q, h_q, topk, invalid, fp8)
    if odd_topk_length and k % 2:
        case.topk_length = rng.integers(0, topk + 1, size=b).astype(np.int32)
        testing.poison_sparse_tail(rng, case)
    return case


def topk_length_and_sink_case(fp8, b, topk, poison_tail=False):
    """h_q = 64, s_q = 2: topk_length (the first topk, the last 0 when b > 1) and attn_sink (with +-inf and 0).
    poison_tail: the entries past topk_length point at poisoned slots."""
    rng = np.random.default_rng(b + topk + fp8)
    case = sparse_case(rng, b, 2, 64, topk, 0.2, fp8, max_len=9000)
    tl = rng.integers(0, topk + 1, size=b).astype(np.int32)
    tl[0] = topk
    if b > 1:
        tl[-1] = 0
    case.topk_length = tl
    if poison_tail:
        testing.poison_sparse_tail(rng, case)
    sink = rng.standard_normal(64).astype(np.float32) * 3
    sink[:3] = (np.inf, -np.inf, 0)
    case.attn_sink = sink
    return case


GENERIC_SHAPES = [(576, 512, 64, 2), (64, 48, 16, 2), (40, 33, 7, 3), (16, 16, 1, 1)]  # d, dv, page, h_kv


def generic_shape_case(dtype, d, dv, page, h_kv):
    rng = np.random.default_rng(d + dv + page)
    return sparse_case(rng, 2, 2, 6 * h_kv, 100, 0.3, False, h_kv=h_kv, d=d, dv=dv, page=page, dtype=dtype,
                       max_len=400)


def plans_case():
    """The sparse FP8 case of the plan-kind / input-kind / no-block-table tests."""
    return sparse_case(np.random.default_rng(8), 2, 2, 32, 700, 0.1, True)


def random_sparse_strategies(kinds, group):
    """hypothesis strategies of random_sparse_case's arguments, for ``given(**...)``: kind sampled from kinds, the
    query heads per KV head (group) from the strategy ``group``."""
    from hypothesis import strategies as st

    return dict(kind=st.sampled_from(kinds), b=st.integers(1, 4), s_q=st.integers(1, 4),
                h_kv=st.sampled_from([1, 1, 2]), group=group, page=st.sampled_from([1, 16, 64]),
                max_len=st.integers(0, 600), topk=st.integers(1, 700), invalid=st.sampled_from([0.0, 0.3, 0.9, 1.0]),
                use_tl=st.booleans(), use_sink=st.booleans(), seed=st.integers(0, 2**31 - 1))


def random_sparse_case(kind, b, s_q, h_kv, group, page, max_len, topk, invalid, use_tl, use_sink, seed):
    """The case of one hypothesis example. kind: "fp8" or "bf16" (d = 576, d_v = 512), "bf16-small",
    "fp16-small" or "fp32-small" (d = 64, d_v = 48)."""
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
    return case


def sanitize_script(backend, topk_length=None):
    """The compute-sanitizer script (a representative subset, outputs poisoned): two FP8 dense launches (varlen with
    an empty sequence; causal, s_q = 2, h_q = 16: 32 rows a KV head; s_q = 1, h_q = 16: 16 rows: the CuPy FP8
    register kernel; CuPy: that one again through the narrow kernel's 16-row FP8 build, and h_kv = 2 on pages of 32
    through the register kernel), then a sparse one on a bf16 and
    on an FP8 cache (h_q = 128, topk 300 with half the indices -1, an empty sequence, attn_sink). backend: "numba"
    or "cupy"; topk_length: the two sequences' topk_length in the sparse launches (else none)."""
    # CuPy: the last FP8 dense problem (16 rows: "auto" takes the FP8 register kernel, kernels/mla_decode_fp8_regs.cu)
    # again with the narrow kernel's 16-row FP8 build forced
    # and a problem whose 16 rows a KV head take the register kernel's other copy path: h_kv = 2 (one bulk copy a
    # token row) on pages of 32 (a tile spans pages), with a partial last tile and a split
    narrow16 = ("import os; os.environ['MLA_CUPY_FP8_KERNEL'] = 'narrow'; "
                "mla.flash_mla_with_kvcache(*c.args(), backend='cupy', **c.kwargs())[0].get(); "
                "del os.environ['MLA_CUPY_FP8_KERNEL']; "
                "c = testing.to_device(testing.make_decode_case(rng, b=2, s_q=1, h_q=32, h_kv=2, d=576, "
                "head_dim_v=512, page_block_size=32, seqlens=[333, 5], dtype=bf, fp8=True)); "
                "mla.flash_mla_with_kvcache(*c.args(), backend='cupy', **c.kwargs())[0].get()")
    if backend != "cupy":
        narrow16 = ""
    tl = "" if topk_length is None else f"topk_length=cp.asarray(np.array({list(topk_length)}, np.int32)), "
    return textwrap.dedent(f"""
        import numpy as np, cupy as cp, mla
        from mla import testing
        from mla.backends import {backend}_backend
        {backend}_backend.POISON_OUTPUTS = True
        rng = np.random.default_rng(0)
        bf = mla._arrays.BFLOAT16
        case = testing.make_decode_case(rng, b=3, s_q=2, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[0, 70, 3000], dtype=bf, fp8=True, causal=True)
        c = testing.to_device(case)
        mla.flash_mla_with_kvcache(*c.args(), backend='{backend}', **c.kwargs())[0].get()
        case = testing.make_decode_case(rng, b=3, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                        seqlens=[70, 0, 700], dtype=bf, fp8=True)
        c = testing.to_device(case)
        mla.flash_mla_with_kvcache(*c.args(), backend='{backend}', **c.kwargs())[0].get()
        {narrow16}
        for fp8 in (False, True):
            case = testing.make_decode_case(rng, b=2, s_q=2, h_q=128, d=576, head_dim_v=512, page_block_size=64,
                                            seqlens=[500, 0], dtype=bf, fp8=fp8)
            idx = testing.make_sparse_indices(rng, case, 300, invalid_ratio=0.5)
            c = testing.to_device(case)
            mla.flash_mla_with_kvcache(c.q, c.k_cache, None, None, 512, is_fp8_kvcache=fp8, indices=cp.asarray(idx),
                                       {tl}attn_sink=cp.zeros(128, cp.float32), backend='{backend}')[0].get()
        print('SANITIZE-DONE')
    """)
