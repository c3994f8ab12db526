"""The NumPy reference against an independent float64 brute force, and its properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mla
from mla import reference, scheduler
from mla.testing import make_decode_case, make_sparse_indices

SETTINGS = settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])


def brute_force(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False):
    """Loop-by-loop float64 attention, written without the reference's helpers."""
    q = np.asarray(q, dtype=np.float64)
    k_cache = np.asarray(k_cache, dtype=np.float64)
    b, s_q, h_q, d = q.shape
    page, h_kv = k_cache.shape[1], k_cache.shape[2]
    scale = 1 / np.sqrt(d) if softmax_scale is None else softmax_scale
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        L = int(cache_seqlens[i])
        keys = np.stack([k_cache[block_table[i, t // page], t % page] for t in range(L)]) if L else None
        for r in range(s_q):
            n_visible = L if not causal else max(0, min(L, L - s_q + r + 1))
            if n_visible == 0:
                continue
            for h in range(h_q):
                g = h // (h_q // h_kv)
                k = keys[:n_visible, g]
                s = k @ q[i, r, h] * scale
                m = s.max()
                p = np.exp(s - m)
                out[i, r, h] = p @ k[:, :head_dim_v] / p.sum()
                lse[i, h, r] = m + np.log(p.sum())
    return out, lse


def check_against_brute(case, out, lse, atol=2e-5):
    ref_out, ref_lse = brute_force(case.q.astype(np.float64), case.k_cache, case.block_table,
                                   case.cache_seqlens, case.head_dim_v, causal=case.causal)
    assert out.dtype == case.q.dtype and lse.dtype == np.float32
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    assert (lse[np.isinf(lse)] > 0).all(), "empty rows must have lse = +inf"
    np.testing.assert_allclose(out.astype(np.float64), ref_out, atol=atol, rtol=atol)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], atol=atol, rtol=atol)


case_params = st.fixed_dictionaries({
    "b": st.integers(1, 4),
    "s_q": st.integers(1, 4),
    "h_kv": st.sampled_from([1, 2, 3]),
    "group": st.sampled_from([1, 2, 5]),
    "d": st.sampled_from([8, 24, 40]),
    "dv_frac": st.sampled_from([0.25, 0.5, 1.0]),
    "page": st.sampled_from([1, 4, 16, 64]),
    "max_seqlen": st.sampled_from([0, 3, 40, 150]),
    "causal": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def build(p, dtype=np.float32):
    rng = np.random.default_rng(p["seed"])
    d = p["d"]
    return make_decode_case(rng, b=p["b"], s_q=p["s_q"], h_q=p["h_kv"] * p["group"], h_kv=p["h_kv"], d=d,
                            head_dim_v=max(1, int(d * p["dv_frac"])), page_block_size=p["page"],
                            max_seqlen=p["max_seqlen"], causal=p["causal"], dtype=dtype)


@SETTINGS
@given(case_params)
def test_reference_matches_brute_force(p):
    case = build(p)
    out, lse = reference.flash_mla_reference(*case.args(), causal=case.causal)
    check_against_brute(case, out, lse)


@SETTINGS
@given(case_params, st.integers(1, 40), st.sampled_from([1, 16, 64]))
def test_split_combine_equals_unsplit(p, num_workers, block_n):
    case = build(p)
    metadata, num_splits = scheduler.plan(case.cache_seqlens, num_workers, block_n=block_n)
    out_s, lse_s = reference.split_decode(*case.args(), metadata, num_splits, causal=case.causal)
    out_u, lse_u = reference.flash_mla_reference(*case.args(), causal=case.causal)
    np.testing.assert_array_equal(np.isinf(lse_s), np.isinf(lse_u))
    np.testing.assert_allclose(out_s, out_u, atol=2e-6, rtol=2e-5)
    fin = np.isfinite(lse_u)
    np.testing.assert_allclose(lse_s[fin], lse_u[fin], atol=2e-6, rtol=2e-6)


@SETTINGS
@given(case_params)
def test_api_numpy_backend_matches_brute_force(p):
    case = build(p)
    out, lse = mla.flash_mla_with_kvcache(*case.args(), causal=case.causal, backend="numpy")
    check_against_brute(case, out, lse)


@SETTINGS
@given(case_params)
def test_permuting_physical_blocks_changes_nothing(p):
    case = build(p)
    rng = np.random.default_rng(p["seed"] + 1)
    nb = case.k_cache.shape[0]
    perm = rng.permutation(nb)  # new position of old block j is perm[j]
    new_cache = np.empty_like(case.k_cache)
    new_cache[perm] = case.k_cache
    table = case.block_table.copy()
    used = (np.arange(table.shape[1])[None] < (-(-case.cache_seqlens // case.k_cache.shape[1]))[:, None])
    table[used] = perm[table[used]]
    out1, lse1 = reference.flash_mla_reference(*case.args(), causal=case.causal)
    out2, lse2 = reference.flash_mla_reference(case.q, new_cache, table, case.cache_seqlens, case.head_dim_v,
                                               causal=case.causal)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(lse1, lse2)


@SETTINGS
@given(case_params, st.sampled_from([np.nan, np.inf, -1e30]))
def test_garbage_in_unused_slots_and_table_changes_nothing(p, junk):
    case = build(p)
    out1, lse1 = mla.flash_mla_with_kvcache(*case.args(), causal=case.causal, backend="numpy")
    cache = case.k_cache.copy()
    table = case.block_table.copy()
    page = cache.shape[1]
    touched = np.zeros(cache.shape[:2], dtype=bool)
    for i, L in enumerate(case.cache_seqlens):
        for t in range(int(L)):
            touched[table[i, t // page], t % page] = True
        table[i, -(-int(L) // page):] = -777  # every unused entry, garbage
    cache[~touched] = junk
    out2, lse2 = mla.flash_mla_with_kvcache(case.q, cache, table, case.cache_seqlens, case.head_dim_v,
                                            causal=case.causal, backend="numpy")
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(lse1, lse2)


@SETTINGS
@given(case_params)
def test_causal_with_one_query_equals_non_causal(p):
    p = dict(p, s_q=1)
    case = build(p)
    out_c, lse_c = reference.flash_mla_reference(*case.args(), causal=True)
    out_n, lse_n = reference.flash_mla_reference(*case.args(), causal=False)
    np.testing.assert_array_equal(out_c, out_n)
    np.testing.assert_array_equal(lse_c, lse_n)


@SETTINGS
@given(case_params)
def test_padding_heads_duplicates_outputs(p):
    case = build(p)
    h_q = case.q.shape[2]
    h_kv = case.k_cache.shape[2]
    group = h_q // h_kv
    # double every KV head's group by repeating each query head of it twice
    q2 = case.q.reshape(*case.q.shape[:2], h_kv, group, -1).repeat(2, axis=3).reshape(
        *case.q.shape[:2], 2 * h_q, -1)
    out1, lse1 = reference.flash_mla_reference(*case.args(), causal=case.causal)
    out2, lse2 = reference.flash_mla_reference(q2, *case.args()[1:], causal=case.causal)
    # equal up to float32 summation order (einsum may block a larger head count differently)
    np.testing.assert_allclose(out2[:, :, 0::2], out1, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out2[:, :, 0::2], out2[:, :, 1::2])
    np.testing.assert_allclose(lse2[:, 0::2], lse1, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(lse2[:, 0::2], lse2[:, 1::2])


def test_float64_compute_is_closer_to_brute_force():
    rng = np.random.default_rng(0)
    case = make_decode_case(rng, b=3, s_q=2, h_q=4, h_kv=2, d=32, head_dim_v=16, page_block_size=8,
                            seqlens=[0, 37, 64], causal=True)
    out64, lse64 = reference.flash_mla_reference(*case.args(), causal=True, compute_dtype=np.float64)
    ref_out, ref_lse = brute_force(case.q, case.k_cache, case.block_table, case.cache_seqlens, 16, causal=True)
    np.testing.assert_allclose(out64, ref_out, atol=1e-6)  # out is cast back to q's float32
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse64[fin], ref_lse[fin], rtol=1e-6)


@pytest.mark.parametrize("dtype", [np.float16, mla.bfloat16])
def test_low_precision_inputs_return_their_dtype(dtype):
    rng = np.random.default_rng(1)
    case = make_decode_case(rng, b=2, s_q=1, h_q=4, d=32, head_dim_v=32, dtype=dtype, seqlens=[5, 70])
    out, lse = mla.flash_mla_with_kvcache(*case.args(), backend="numpy")
    assert out.dtype == np.dtype(dtype) and lse.dtype == np.float32
    ref_out, _ = brute_force(case.q.astype(np.float64), case.k_cache.astype(np.float64), case.block_table,
                             case.cache_seqlens, 32)
    np.testing.assert_allclose(out.astype(np.float64), ref_out, atol=2e-2, rtol=2e-2)


def test_empty_rows_give_zero_and_plus_inf():
    rng = np.random.default_rng(2)
    # L = 0 rows, and causal rows that see nothing (L < s_q)
    case = make_decode_case(rng, b=3, s_q=4, h_q=2, d=16, head_dim_v=8, seqlens=[0, 2, 9], causal=True)
    out, lse = mla.flash_mla_with_kvcache(*case.args(), causal=True, backend="numpy")
    assert not np.isnan(out).any()
    assert (out[0] == 0).all() and np.isposinf(lse[0]).all()
    assert (out[1, :2] == 0).all() and np.isposinf(lse[1, :, :2]).all()  # rows 0, 1 see j <= -2, -1
    assert np.isfinite(lse[1, :, 2:]).all() and np.isfinite(lse[2]).all()


def test_causal_rows_see_the_right_keys():
    """Row r of s_q sees keys j <= L - s_q + r: check by truncating the cache per row."""
    rng = np.random.default_rng(3)
    case = make_decode_case(rng, b=1, s_q=3, h_q=2, d=16, head_dim_v=16, seqlens=[20], causal=True)
    out, lse = reference.flash_mla_reference(*case.args(), causal=True)
    for r in range(3):
        L_r = np.array([20 - 3 + r + 1], dtype=np.int32)
        o, l = reference.flash_mla_reference(case.q[:, r : r + 1], case.k_cache, case.block_table, L_r, 16)
        np.testing.assert_allclose(out[:, r], o[:, 0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(lse[:, :, r], l[:, :, 0], rtol=1e-6)


def test_softmax_scale_is_used():
    rng = np.random.default_rng(4)
    case = make_decode_case(rng, b=1, s_q=1, h_q=2, d=16, head_dim_v=16, seqlens=[10])
    out, lse = reference.flash_mla_reference(*case.args(), softmax_scale=0.3)
    ref_out, ref_lse = brute_force(case.q, case.k_cache, case.block_table, case.cache_seqlens, 16, 0.3)
    np.testing.assert_allclose(out, ref_out, atol=1e-5)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# sparse (DSA) mode


def sparse_brute_force(q, k_cache, indices, head_dim_v, topk_length=None, attn_sink=None):
    q = np.asarray(q, dtype=np.float64)
    flat = np.asarray(k_cache, dtype=np.float64).reshape(-1, *k_cache.shape[2:])
    b, s_q, h_q, d = q.shape
    h_kv = flat.shape[1]
    out = np.zeros((b, s_q, h_q, head_dim_v))
    lse = np.full((b, h_q, s_q), np.inf)
    for i in range(b):
        n = indices.shape[-1] if topk_length is None else int(topk_length[i])
        for r in range(s_q):
            idx = [int(x) for x in indices[i, r, :n] if x >= 0]
            if not idx:
                continue
            for h in range(h_q):
                k = flat[idx, h // (h_q // h_kv)]
                s = k @ q[i, r, h] / np.sqrt(d)
                m = s.max()
                p = np.exp(s - m)
                out[i, r, h] = p @ k[:, :head_dim_v] / p.sum()
                lse[i, h, r] = m + np.log(p.sum())
                if attn_sink is not None:
                    out[i, r, h] *= np.exp(lse[i, h, r]) / (np.exp(lse[i, h, r]) + np.exp(attn_sink[h]))
    return out, lse


sparse_params = st.fixed_dictionaries({
    "b": st.integers(1, 3), "s_q": st.integers(1, 3), "h_q": st.sampled_from([1, 4]),
    "topk": st.sampled_from([1, 8, 33]), "invalid": st.sampled_from([0.0, 0.5, 1.0]),
    "use_topk_length": st.booleans(), "use_sink": st.booleans(), "seed": st.integers(0, 2**31 - 1),
})


@SETTINGS
@given(sparse_params)
def test_sparse_matches_brute_force(p):
    rng = np.random.default_rng(p["seed"])
    case = make_decode_case(rng, b=p["b"], s_q=p["s_q"], h_q=p["h_q"], d=16, head_dim_v=8, page_block_size=8,
                            max_seqlen=50)
    indices = make_sparse_indices(rng, case, p["topk"], p["invalid"])
    topk_length = rng.integers(0, p["topk"] + 1, size=p["b"]).astype(np.int32) if p["use_topk_length"] else None
    sink = rng.standard_normal(p["h_q"]).astype(np.float32) if p["use_sink"] else None
    out, lse = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 8, indices=indices,
                                          topk_length=topk_length, attn_sink=sink, backend="numpy")
    ref_out, ref_lse = sparse_brute_force(case.q, case.k_cache, indices, 8, topk_length, sink)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(ref_lse))
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=2e-5)
    fin = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[fin], ref_lse[fin], rtol=2e-5, atol=2e-5)


@SETTINGS
@given(st.integers(0, 2**31 - 1), st.integers(1, 3))
def test_sparse_with_all_indices_in_order_equals_dense(seed, s_q):
    rng = np.random.default_rng(seed)
    case = make_decode_case(rng, b=2, s_q=s_q, h_q=4, d=16, head_dim_v=16, page_block_size=4, seqlens=[13, 30])
    page = case.k_cache.shape[1]
    topk = 32
    indices = np.full((2, s_q, topk), -1, dtype=np.int32)
    for i, L in enumerate(case.cache_seqlens):
        pos = np.arange(L)
        indices[i, :, :L] = case.block_table[i, pos // page] * page + pos % page
    out_s, lse_s = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 16, indices=indices,
                                              backend="numpy")
    out_d, lse_d = mla.flash_mla_with_kvcache(*case.args(), backend="numpy")
    np.testing.assert_allclose(out_s, out_d, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(lse_s, lse_d, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(st.integers(0, 2**31 - 1))
def test_topk_length_equals_minus_one_tail(seed):
    rng = np.random.default_rng(seed)
    case = make_decode_case(rng, b=3, s_q=2, h_q=2, d=16, head_dim_v=8, max_seqlen=40)
    indices = make_sparse_indices(rng, case, 16, 0.2)
    topk_length = rng.integers(0, 17, size=3).astype(np.int32)
    cut = indices.copy()
    for i, n in enumerate(topk_length):
        cut[i, :, n:] = -1
    a = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 8, indices=indices,
                                   topk_length=topk_length, backend="numpy")
    b = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 8, indices=cut, backend="numpy")
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_attn_sink_scales_out_and_keeps_lse():
    rng = np.random.default_rng(5)
    case = make_decode_case(rng, b=2, s_q=1, h_q=3, d=16, head_dim_v=8, seqlens=[10, 20])
    indices = make_sparse_indices(rng, case, 8)
    sink = np.array([-1.0, 0.5, 3.0], dtype=np.float32)
    o0, l0 = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 8, indices=indices, backend="numpy")
    o1, l1 = mla.flash_mla_with_kvcache(case.q, case.k_cache, None, None, 8, indices=indices, attn_sink=sink,
                                        backend="numpy")
    np.testing.assert_array_equal(l0, l1)
    factor = 1 / (1 + np.exp(sink[None, :, None] - l0.astype(np.float64)))  # [b, h, s_q]
    np.testing.assert_allclose(o1, o0 * factor.transpose(0, 2, 1)[..., None], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# FP8 cache


def test_fp8_cache_matches_reference_on_dequantised_cache():
    rng = np.random.default_rng(6)
    case = make_decode_case(rng, b=2, s_q=2, h_q=4, d=576, head_dim_v=512, page_block_size=16,
                            seqlens=[0, 40], fp8=True)
    out, lse = mla.flash_mla_with_kvcache(*case.args(), is_fp8_kvcache=True, backend="numpy")
    deq = mla.dequantize_kv_fp8(case.k_cache)
    out_ref, lse_ref = brute_force(case.q, np.nan_to_num(deq), case.block_table, case.cache_seqlens, 512)
    np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-4)
    fin = np.isfinite(lse_ref)
    np.testing.assert_array_equal(np.isinf(lse), ~fin)
    np.testing.assert_allclose(lse[fin], lse_ref[fin], rtol=1e-5)
