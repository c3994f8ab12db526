"""Sparse prefill (flash_mla_sparse_fwd) reference: brute force, base-2 lse, masking, sink, validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mla
from mla.sparse import flash_mla_sparse_fwd


def brute(q, kv, indices, scale, d_v, sink=None, topk_length=None):
    q = q.astype(np.float64)
    kv = kv.astype(np.float64)
    s_q, h_q, _ = q.shape
    h_kv = kv.shape[1]
    out = np.zeros((s_q, h_q, d_v))
    ml = np.full((s_q, h_q), -np.inf)
    lse2 = np.full((s_q, h_q), np.inf)
    for r in range(s_q):
        for h in range(h_q):
            g = h // (h_q // h_kv)
            n = indices.shape[-1] if topk_length is None else topk_length[r]
            idx = [int(i) for i in indices[r, g, :n] if i >= 0]
            if not idx:
                continue
            s = np.array([q[r, h] @ kv[i, g] * scale for i in idx])
            p = np.exp(s - s.max())
            out[r, h] = sum(pi * kv[i, g, :d_v] for pi, i in zip(p, idx)) / p.sum()
            ml[r, h] = s.max()
            lse_e = s.max() + np.log(p.sum())
            lse2[r, h] = lse_e / np.log(2)
            if sink is not None:
                out[r, h] *= np.exp(lse_e) / (np.exp(lse_e) + np.exp(sink[h]))
    return out, ml, lse2


@settings(deadline=None, max_examples=40)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.sampled_from([(4, 1), (4, 2), (3, 3)]),
       st.sampled_from([1, 7, 16]), st.sampled_from([0.0, 0.5, 1.0]), st.booleans(), st.booleans())
def test_matches_brute_force(seed, s_q, heads, topk, invalid, use_sink, use_len):
    rng = np.random.default_rng(seed)
    h_q, h_kv = heads
    s_kv, d, d_v = 20, 24, 16
    q = rng.standard_normal((s_q, h_q, d)).astype(np.float32)
    kv = rng.standard_normal((s_kv, h_kv, d)).astype(np.float32)
    idx = rng.integers(0, s_kv, size=(s_q, h_kv, topk)).astype(np.int32)
    idx[rng.random(idx.shape) < invalid] = -1
    sink = rng.standard_normal(h_q).astype(np.float32) if use_sink else None
    tl = rng.integers(0, topk + 1, size=s_q).astype(np.int32) if use_len else None
    out, ml, lse = flash_mla_sparse_fwd(q, kv, idx, 0.2, d_v, attn_sink=sink, topk_length=tl)
    r_out, r_ml, r_lse = brute(q, kv, idx, 0.2, d_v, sink, tl)
    assert out.dtype == np.float32 and ml.dtype == np.float32 and lse.dtype == np.float32
    np.testing.assert_allclose(out, r_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.isinf(lse), np.isinf(r_lse))
    np.testing.assert_array_equal(np.isneginf(ml), np.isneginf(r_ml))
    fin = np.isfinite(r_lse)
    # lse is float32: near zero only an absolute bound is meaningful
    np.testing.assert_allclose(lse[fin], r_lse[fin], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ml[fin], r_ml[fin], rtol=1e-5, atol=1e-5)
    assert (out[~fin] == 0).all()


def test_lse_is_base_two():
    q = np.ones((1, 1, 4), np.float32)
    kv = np.zeros((2, 1, 4), np.float32)  # two keys with logit 0: lse_e = ln 2, lse_2 = 1
    out, ml, lse = flash_mla_sparse_fwd(q, kv, np.array([[[0, 1]]], np.int32), 1.0, 4)
    assert ml[0, 0] == 0 and abs(lse[0, 0] - 1.0) < 1e-6


def test_infinite_sink():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    kv = rng.standard_normal((5, 1, 8)).astype(np.float32)
    idx = np.array([[[0, 1, 2]], [[3, 4, -1]]], np.int32)
    base = flash_mla_sparse_fwd(q, kv, idx, 0.3, 8)
    neg = flash_mla_sparse_fwd(q, kv, idx, 0.3, 8, attn_sink=np.full(2, -np.inf, np.float32))
    pos = flash_mla_sparse_fwd(q, kv, idx, 0.3, 8, attn_sink=np.full(2, np.inf, np.float32))
    np.testing.assert_allclose(neg[0], base[0])
    assert (pos[0] == 0).all()
    np.testing.assert_array_equal(pos[2], base[2])


def test_bfloat16_in_bfloat16_out():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, 16)).astype(mla.bfloat16)
    kv = rng.standard_normal((9, 1, 16)).astype(mla.bfloat16)
    idx = rng.integers(0, 9, size=(2, 1, 5)).astype(np.int32)
    out, _, _ = flash_mla_sparse_fwd(q, kv, idx, 0.25, 8)
    assert out.dtype == mla.bfloat16 and out.shape == (2, 4, 8)


@pytest.mark.parametrize("change,exc,match", [
    (dict(q=np.zeros((2, 4), np.float32)), ValueError, "q must be 3-D"),
    (dict(kv=np.zeros((9, 1, 8), np.float16)), TypeError, "kv dtype must equal q's"),
    (dict(indices=np.zeros((2, 1, 3), np.int64)), TypeError, "indices must be int32"),
    (dict(indices=np.full((2, 1, 3), 9, np.int32)), ValueError, r"indices must be in \[-1, s_kv\)"),
    (dict(indices=np.zeros((3, 1, 3), np.int32)), ValueError, "indices must have shape"),
    (dict(d_v=17), ValueError, "d_v must be an int"),
    (dict(sm_scale=float("nan")), ValueError, "sm_scale must be a finite float"),
    (dict(topk_length=np.array([4, 0], np.int32)), ValueError, "topk_length must be in"),
    (dict(attn_sink=np.zeros(3, np.float32)), ValueError, "attn_sink must be float32"),
    (dict(backend="torch"), ValueError, "backend must be"),
])
def test_validation(change, exc, match):
    args = dict(q=np.zeros((2, 4, 16), np.float32), kv=np.zeros((9, 1, 16), np.float32),
                indices=np.zeros((2, 1, 3), np.int32), sm_scale=0.1, d_v=16)
    if "kv" in change:
        args["q"] = np.zeros((2, 4, 8), np.float32)
    args.update(change)
    with pytest.raises(exc, match=match):
        flash_mla_sparse_fwd(**args)
