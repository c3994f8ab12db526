"""The naive CuPy baseline: gather the pages, matmul, softmax, matmul (what one writes first).

fp16/fp32 only for the matmuls (CuPy's batched bf16 matmul is not dependable): bf16 inputs are
computed in fp16 after a cast, as DESIGN.md §5's naive number was. Dense mode, any shapes.
"""

from __future__ import annotations

import math

import numpy as np


def naive_decode(q, k_cache, block_table, cache_seqlens, head_dim_v, softmax_scale=None, causal=False,
                 max_seqlen=None):
    """out [b, s_q, h_q, d_v] (q's dtype), lse f32 [b, h_q, s_q]; CuPy arrays in, CuPy out.

    max_seqlen: the padded key length (a host int, so no device->host sync); default: the block
    table's capacity.
    """
    import cupy as cp

    b, s_q, h_q, d = q.shape
    _, page, h_kv, _ = k_cache.shape
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    work = np.float16 if q.dtype not in (np.float16, np.float32) else q.dtype
    n_pages = block_table.shape[1] if max_seqlen is None else -(-int(max_seqlen) // page)
    table = cp.clip(block_table[:, :n_pages], 0, k_cache.shape[0] - 1)
    keys = k_cache[table].reshape(b, n_pages * page, h_kv, d).astype(work, copy=False)  # the gather
    pos = cp.arange(n_pages * page)
    L = cache_seqlens.astype(cp.int64)[:, None, None, None]
    keys = cp.where((pos[None, :, None, None] < L[:, :, :, 0:1].reshape(b, 1, 1, 1)), keys, 0)  # NaN tails
    group = h_q // h_kv
    qh = q.astype(work, copy=False).reshape(b, s_q, h_kv, group, d).transpose(0, 2, 1, 3, 4)
    qh = qh.reshape(b, h_kv, s_q * group, d)
    kh = keys.transpose(0, 2, 3, 1)  # [b, h_kv, d, n]
    scores = cp.matmul(qh, kh).astype(cp.float32) * scale  # [b, h_kv, s_q*group, n]
    row = cp.repeat(cp.arange(s_q), group)[None, None, :, None]
    visible = pos[None, None, None, :] < L
    if causal:
        visible &= pos[None, None, None, :] <= L - s_q + row
    scores = cp.where(visible, scores, -cp.inf)
    m = scores.max(axis=-1, keepdims=True)
    m = cp.where(cp.isfinite(m), m, 0)
    p = cp.exp(scores - m)
    l = p.sum(axis=-1, keepdims=True)
    vh = keys[..., :head_dim_v].transpose(0, 2, 1, 3)  # [b, h_kv, n, d_v]
    o = cp.matmul((p / cp.where(l > 0, l, 1)).astype(work), vh).astype(cp.float32)
    lse = cp.where(l > 0, m + cp.log(l), cp.inf)[..., 0]  # [b, h_kv, s_q*group]
    out = o.reshape(b, h_kv, s_q, group, head_dim_v).transpose(0, 2, 1, 3, 4).reshape(b, s_q, h_q, head_dim_v)
    lse = lse.reshape(b, h_kv, s_q, group).transpose(0, 1, 3, 2).reshape(b, h_q, s_q)
    return out.astype(q.dtype), lse
