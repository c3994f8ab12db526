"""NumPy backend: the reference's split-KV path (plan -> partials -> combine) on the host.

Device inputs are copied to the host and the results copied back (the "auto" fallback when no
GPU backend can run); this backend exists to be exact and readable, not fast.
"""

from __future__ import annotations

import numpy as np

from .. import _arrays, reference


def available():
    """Always (True, ""): NumPy is a dependency."""
    return True, ""


def decode(problem, metadata, num_splits):
    """reference.split_decode on host copies. Returns (out [b, s_q, h_q, d_v], lse f32 [b, h_q, s_q])
    of the caller's array kind."""
    h = _arrays.asnumpy
    out, lse = reference.split_decode(
        h(problem.q), h(problem.k_cache),
        None if problem.block_table is None else h(problem.block_table),
        None if problem.cache_seqlens is None else h(problem.cache_seqlens),
        problem.head_dim_v, h(metadata), h(num_splits), problem.softmax_scale, problem.causal,
        problem.is_fp8_kvcache,
        None if problem.indices is None else h(problem.indices),
        None if problem.topk_length is None else h(problem.topk_length),
        None if problem.attn_sink is None else h(problem.attn_sink),
        compute_dtype=np.float32,
        out_dtype=problem.out_dtype,
    )
    if problem.on_device:
        cp = _arrays.cupy_module()
        return cp.asarray(out), cp.asarray(lse)
    return out, lse
