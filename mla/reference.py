"""The NumPy reference: it defines every number the GPU backends must reproduce.

Shapes (DESIGN.md §2)::

    q            [b, s_q, h_q, d]           query (d = 576 for DeepSeek: 512 latent + 64 RoPE)
    k_cache      [num_blocks, page, h_kv, d] paged cache; V is its first d_v channels
                 (uint8 [..., 656] for the FP8 layout, see mla.fp8)
    block_table  int32 [b, max_blocks_per_seq]  logical page -> physical block
    cache_seqlens int32 [b]                  L_i, number of cached tokens of sequence i
    indices      int32 [b, s_q, topk]        sparse mode: block * page + offset, -1 = unused
    out          [b, s_q, h_q, d_v]          in q's dtype
    lse          float32 [b, h_q, s_q]       natural log of the softmax denominator

Math, for query row r of sequence i and query head h (KV head g = h // (h_q // h_kv))::

    s_j   = softmax_scale * q[i, r, h] . k[i, j, g]          for visible keys j
    m     = max_j s_j,   l = sum_j exp(s_j - m)
    out   = sum_j exp(s_j - m) v[i, j, g] / l,   lse = m + log(l)

Key j is visible if j < L_i and, when causal, j <= L_i - s_q + r (the query rows are the last
s_q tokens of the sequence, as in speculative decoding / MTP). A row that sees no key gives
out = 0 and lse = +inf (never NaN). Keys are *gathered* before any arithmetic, so cache slots
at or past L_i and block-table entries past the used pages are never read: NaN there cannot
reach a result.

Split-KV (what the kernels do): the scheduler (``mla.scheduler.plan``) cuts each sequence's keys
into splits; each split gives a partial (o_s normalised by its own l_s, lse_s; an empty split has
lse_s = -inf), and ``combine_splits`` merges them::

    lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s

which equals the unsplit result exactly in real arithmetic.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import scheduler as _scheduler
from .fp8 import dequantize_kv_fp8

__all__ = [
    "flash_mla_reference",
    "split_partials",
    "combine_splits",
    "split_decode",
    "gather_keys",
    "visible_mask",
    "default_softmax_scale",
]


def default_softmax_scale(d: int) -> float:
    """1 / sqrt(d), FlashMLA's default (d is q's last dimension, 576 for DeepSeek)."""
    return 1.0 / float(np.sqrt(d))


def _as_compute(x: np.ndarray, compute_dtype) -> np.ndarray:
    return np.asarray(x).astype(compute_dtype, copy=False)


def _dense_cache(k_cache: np.ndarray, is_fp8_kvcache: bool, compute_dtype) -> np.ndarray:
    """The cache as floats [num_blocks, page, h_kv, d] (dequantised when FP8)."""
    if is_fp8_kvcache:
        return dequantize_kv_fp8(k_cache, dtype=np.float32).astype(compute_dtype, copy=False)
    return _as_compute(k_cache, compute_dtype)


def gather_keys(cache: np.ndarray, block_table_row: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Keys [stop - start, h_kv, d] at logical positions start..stop-1 of one sequence.

    Only the pages that hold these positions are looked up, so unused table entries are never used.
    """
    page = cache.shape[1]
    pos = np.arange(start, stop)
    blocks = np.asarray(block_table_row)[pos // page]
    return cache[blocks, pos % page]


def visible_mask(s_q: int, key_pos: np.ndarray, seqlen: int, causal: bool) -> np.ndarray:
    """bool [s_q, n]: may query row r see the key at logical position key_pos[j]?"""
    key_pos = np.asarray(key_pos)
    mask = np.broadcast_to(key_pos[None, :] < seqlen, (s_q, key_pos.shape[0]))
    if causal:
        last_visible = seqlen - s_q + np.arange(s_q)  # row r sees j <= L - s_q + r
        mask = mask & (key_pos[None, :] <= last_visible[:, None])
    return mask


def _attend(q_i, keys, valid, head_dim_v, softmax_scale, compute_dtype):
    """Attention of one sequence's queries over a set of keys, masked.

    q_i [s_q, h_q, d], keys [n, h_kv, d], valid bool [s_q, n] (same for every head) or
    [s_q, h_q, n]. Returns (o [s_q, h_q, d_v] normalised, lse [s_q, h_q]) with lse = -inf and
    o = 0 where nothing is visible.
    """
    s_q, h_q, d = q_i.shape
    n, h_kv, _ = keys.shape
    group = h_q // h_kv  # head h uses KV head h // group
    # one matmul per KV head over its query heads (no per-head copy of the keys: at h_q = 128 and
    # a million keys that copy would be 36 GB)
    q_grouped = q_i.reshape(s_q, h_kv, group, d).transpose(1, 0, 2, 3).reshape(h_kv, s_q * group, d)
    k_heads = keys.transpose(1, 0, 2)  # [h_kv, n, d]
    scores = np.matmul(q_grouped, k_heads.transpose(0, 2, 1)) * compute_dtype(softmax_scale)  # [h_kv, s_q*group, n]
    scores = scores.reshape(h_kv, s_q, group, n).transpose(1, 0, 2, 3).reshape(s_q, h_q, n)
    if valid.ndim == 2:
        valid = valid[:, None, :]
    valid = np.broadcast_to(valid, scores.shape)
    scores = np.where(valid, scores, -np.inf)
    m = scores.max(axis=-1, initial=-np.inf)  # [s_q, h_q]
    m_safe = np.where(np.isfinite(m), m, 0)
    p = np.where(valid, np.exp(scores - m_safe[..., None]), 0)
    l = p.sum(axis=-1)
    p_grouped = p.reshape(s_q, h_kv, group, n).transpose(1, 0, 2, 3).reshape(h_kv, s_q * group, n)
    o = np.matmul(p_grouped, k_heads[..., :head_dim_v])  # [h_kv, s_q*group, d_v]
    o = o.reshape(h_kv, s_q, group, head_dim_v).transpose(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
    with np.errstate(divide="ignore", invalid="ignore"):
        o = np.where(l[..., None] > 0, o / l[..., None], 0)
        lse = np.where(l > 0, m_safe + np.log(l), -np.inf)
    return o.astype(compute_dtype), lse.astype(compute_dtype)


def _sparse_keys(cache, indices_row, start, stop, topk_len):
    """Keys at indices_row[start:stop] for sparse mode, and which of them are valid.

    Indices are physical positions (block * page + offset); -1 marks an unused slot, and so does
    any position at or past topk_len (only the first topk_length entries count).
    """
    flat = cache.reshape(-1, *cache.shape[2:])  # [num_blocks * page, h_kv, d]
    idx = np.asarray(indices_row)[start:stop]
    valid = (idx >= 0) & (np.arange(start, stop) < topk_len)
    keys = flat[np.where(valid, idx, 0)]  # slot 0 stands in for invalid entries ...
    keys = np.where(valid[:, None, None], keys, 0)  # ... and is zeroed: it may hold NaN
    return keys, valid


def _finalize(o, lse, out_dtype):
    """Empty rows (lse = -inf) become out = 0, lse = +inf; cast out to q's dtype."""
    empty = ~np.isfinite(lse) & (lse < 0)
    o = np.where(empty[..., None], 0, o)
    lse = np.where(empty, np.inf, lse)
    return o.astype(out_dtype), lse


def _apply_sink(o, lse, attn_sink):
    """out *= exp(lse) / (exp(lse) + exp(sink)) per head; lse unchanged. o [.., h_q, d_v], lse [.., h_q]."""
    if attn_sink is None:
        return o
    sink = np.asarray(attn_sink, dtype=np.float64)
    lse64 = lse.astype(np.float64)
    # exp(lse)/(exp(lse)+exp(sink)) = 1 / (1 + exp(sink - lse)); rows with lse = -inf stay 0
    with np.errstate(over="ignore", invalid="ignore"):  # inf - inf on rows np.where drops
        factor = np.where(np.isfinite(lse64), 1.0 / (1.0 + np.exp(sink - lse64)), 0.0)
    return (o * factor[..., None]).astype(o.dtype)


def flash_mla_reference(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v: int,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices=None,
    topk_length=None,
    attn_sink=None,
    compute_dtype=np.float32,
):
    """Unsplit MLA decode. Returns (out [b, s_q, h_q, d_v] in q's dtype, lse float32 [b, h_q, s_q]).

    Inputs are assumed valid (``mla.flash_mla_with_kvcache`` validates). ``compute_dtype`` is
    float32 (the contract) or float64 (for checking the float32 path).
    """
    q = np.asarray(q)
    b, s_q, h_q, d = q.shape
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(d)
    cache = _dense_cache(np.asarray(k_cache), is_fp8_kvcache, compute_dtype)
    qc = _as_compute(q, compute_dtype)
    out = np.zeros((b, s_q, h_q, head_dim_v), dtype=compute_dtype)
    lse = np.full((b, s_q, h_q), -np.inf, dtype=compute_dtype)
    for i in range(b):
        if indices is not None:
            topk = np.asarray(indices).shape[-1]
            tl = topk if topk_length is None else int(np.asarray(topk_length)[i])
            for r in range(s_q):  # each query row has its own key set
                keys, valid = _sparse_keys(cache, np.asarray(indices)[i, r], 0, topk, tl)
                o_r, lse_r = _attend(qc[i, r : r + 1], keys, valid[None, :], head_dim_v,
                                     softmax_scale, compute_dtype)
                out[i, r], lse[i, r] = o_r[0], lse_r[0]
            continue
        L = int(cache_seqlens[i])
        keys = gather_keys(cache, np.asarray(block_table)[i], 0, L)
        valid = visible_mask(s_q, np.arange(L), L, causal)
        out[i], lse[i] = _attend(qc[i], keys, valid, head_dim_v, softmax_scale, compute_dtype)
    out = _apply_sink(out, lse, attn_sink)
    out, lse = _finalize(out, lse, q.dtype)
    return out, np.ascontiguousarray(lse.transpose(0, 2, 1)).astype(np.float32)


def split_partials(
    q,
    k_cache,
    block_table,
    cache_seqlens,
    head_dim_v: int,
    tile_scheduler_metadata,
    num_splits,
    softmax_scale: float | None = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices=None,
    topk_length=None,
    compute_dtype=np.float32,
):
    """Run every worker of a scheduler plan, as the kernels do, and return the partials.

    Returns (o_partial [total_splits, s_q, h_q, d_v], lse_partial [total_splits, s_q, h_q]) in
    compute_dtype; o_partial is normalised by its own split's sum, lse_partial is -inf for an
    empty split. In sparse mode the plan's positions index the ``indices`` list (0..topk).
    """
    q = np.asarray(q)
    b, s_q, h_q, d = q.shape
    if softmax_scale is None:
        softmax_scale = default_softmax_scale(d)
    metadata = np.asarray(tile_scheduler_metadata)
    num_splits = np.asarray(num_splits)
    cache = _dense_cache(np.asarray(k_cache), is_fp8_kvcache, compute_dtype)
    qc = _as_compute(q, compute_dtype)
    seqlens = _plan_lengths(cache_seqlens, indices, b)
    total = int(num_splits[b])
    o_partial = np.zeros((total, s_q, h_q, head_dim_v), dtype=compute_dtype)
    lse_partial = np.full((total, s_q, h_q), -np.inf, dtype=compute_dtype)
    for row in metadata:
        for i, start, stop, p in _scheduler.worker_pieces(row, num_splits, seqlens):
            if indices is not None:
                topk = np.asarray(indices).shape[-1]
                tl = topk if topk_length is None else int(np.asarray(topk_length)[i])
                for r in range(s_q):
                    keys, valid = _sparse_keys(cache, np.asarray(indices)[i, r], start, stop, tl)
                    o_r, lse_r = _attend(qc[i, r : r + 1], keys, valid[None, :], head_dim_v,
                                         softmax_scale, compute_dtype)
                    o_partial[p, r], lse_partial[p, r] = o_r[0], lse_r[0]
                continue
            L = int(cache_seqlens[i])
            keys = gather_keys(cache, np.asarray(block_table)[i], start, stop)
            valid = visible_mask(s_q, np.arange(start, stop), L, causal)
            o_partial[p], lse_partial[p] = _attend(qc[i], keys, valid, head_dim_v, softmax_scale,
                                                   compute_dtype)
    return o_partial, lse_partial


def _plan_lengths(cache_seqlens, indices, b):
    """Key counts the scheduler plans over: L_i (dense) or topk for every sequence (sparse;
    topk_length only masks, so one plan serves every topk_length)."""
    if indices is None:
        return np.asarray(cache_seqlens).astype(np.int64)
    return np.full(b, np.asarray(indices).shape[-1], dtype=np.int64)


def combine_splits(o_partial, lse_partial, num_splits, out_dtype=np.float32, attn_sink=None):
    """Merge the partials of each sequence by their lse.

    o_partial [total_splits, s_q, h_q, d_v], lse_partial [total_splits, s_q, h_q] (-inf = empty),
    num_splits int [b + 1]. Returns (out [b, s_q, h_q, d_v] in out_dtype, lse float32 [b, h_q, s_q])
    with empty rows as out = 0, lse = +inf.
    """
    num_splits = np.asarray(num_splits)
    b = num_splits.shape[0] - 1
    _, s_q, h_q, d_v = o_partial.shape
    out = np.zeros((b, s_q, h_q, d_v), dtype=o_partial.dtype)
    lse = np.full((b, s_q, h_q), -np.inf, dtype=lse_partial.dtype)
    for i in range(b):
        lo, hi = int(num_splits[i]), int(num_splits[i + 1])
        lse_s = lse_partial[lo:hi]  # [n_i, s_q, h_q]
        m = lse_s.max(axis=0)
        m_safe = np.where(np.isfinite(m), m, 0)
        w = np.exp(lse_s - m_safe)  # exp(-inf) = 0 drops empty splits
        total = w.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[i] = np.where(total > 0, m_safe + np.log(total), -np.inf)
            scale = np.where(total > 0, w / total, 0)
        out[i] = np.einsum("srh,srhd->rhd", scale, o_partial[lo:hi])
    out = _apply_sink(out, lse, attn_sink)
    out, lse = _finalize(out, lse, out_dtype)
    return out, np.ascontiguousarray(lse.transpose(0, 2, 1)).astype(np.float32)


def split_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
                 softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, topk_length=None,
                 attn_sink=None, compute_dtype=np.float32, out_dtype=None):
    """Split-KV decode: ``split_partials`` then ``combine_splits`` (the NumPy backend's path); out in
    out_dtype (default q's dtype)."""
    o_partial, lse_partial = split_partials(
        q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits,
        softmax_scale, causal, is_fp8_kvcache, indices, topk_length, compute_dtype)
    return combine_splits(o_partial, lse_partial, num_splits, np.asarray(q).dtype if out_dtype is None else out_dtype,
                          attn_sink)


def bf16_round(x: np.ndarray) -> np.ndarray:
    """x rounded to bfloat16 and back (for building inputs the kernels see exactly)."""
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32)

