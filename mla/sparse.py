"""Token-level sparse attention prefill (DeepSeek-V3.2 DSA), FlashMLA's ``flash_mla_sparse_fwd``.

Shapes::

    q        [s_q, h_q, d_qk]         bfloat16 / float16 / float32 (d_qk = 576 for DeepSeek)
    kv       [s_kv, h_kv, d_qk]       same dtype; V is the first d_v channels
    indices  int32 [s_q, h_kv, topk]  token positions in kv; -1 = invalid
    out      [s_q, h_q, d_v]          q's dtype
    max_logits float32 [s_q, h_q]     max_j softmax_scale * q.k_j  (-inf when no valid index)
    lse      float32 [s_q, h_q]       **base 2**: log2 sum_j 2^(s_j * log2(e)) = ln-lse * log2(e),
                                      +inf when no valid index (out is then 0)

Query head h uses KV head g = h // (h_q // h_kv) and the index list indices[r, g]. Optional
``topk_length [s_q]`` keeps only the first entries of each row; ``attn_sink [h_q]`` scales out by
exp(lse_e) / (exp(lse_e) + exp(sink)) with lse_e the natural-log lse, leaving lse and max_logits
unchanged (sink = -inf: no effect; +inf: out = 0).

The base-2 lse follows FlashMLA's documentation of this function (its kernels work in base 2);
``mla.flash_mla_with_kvcache`` returns natural-log lse, as FlashMLA's decode does.

Backends: ``sparse_prefill_reference`` (NumPy, the spec) and the CuPy kernel
``kernels/mla_sparse_prefill.cu`` (``mla.backends.cupy_sparse_prefill``; verified on an H100 on
2026-11-25).
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays

__all__ = ["flash_mla_sparse_fwd", "sparse_prefill_reference"]

LOG2E = 1.0 / math.log(2.0)


def sparse_prefill_reference(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None,
                             compute_dtype=np.float32):
    """NumPy reference. Returns (out [s_q, h_q, d_v] in q's dtype, max_logits, lse (base 2))."""
    q = np.asarray(q)
    s_q, h_q, d = q.shape
    kv_c = np.asarray(kv).astype(compute_dtype)
    h_kv = kv_c.shape[1]
    group = h_q // h_kv
    idx_all = np.asarray(indices)
    topk = idx_all.shape[-1]
    qc = q.astype(compute_dtype)
    out = np.zeros((s_q, h_q, d_v), dtype=compute_dtype)
    max_logits = np.full((s_q, h_q), -np.inf, dtype=compute_dtype)
    lse = np.full((s_q, h_q), np.inf, dtype=compute_dtype)
    for r in range(s_q):
        n = topk if topk_length is None else int(np.asarray(topk_length)[r])
        for g in range(h_kv):
            idx = idx_all[r, g, :n]
            idx = idx[(idx >= 0) & (idx < kv_c.shape[0])]
            if idx.size == 0:
                continue
            keys = kv_c[idx, g]  # [n, d]
            heads = slice(g * group, (g + 1) * group)
            s = qc[r, heads] @ keys.T * compute_dtype(sm_scale)  # [group, n]
            m = s.max(axis=-1)
            p = np.exp(s - m[:, None])
            l = p.sum(axis=-1)
            out[r, heads] = (p @ keys[:, :d_v]) / l[:, None]
            max_logits[r, heads] = m
            lse[r, heads] = (m + np.log(l)) * compute_dtype(LOG2E)
    if attn_sink is not None:
        sink = np.asarray(attn_sink, dtype=np.float64)
        lse_e = lse.astype(np.float64) / LOG2E
        with np.errstate(over="ignore", invalid="ignore"):
            factor = np.where(np.isfinite(lse_e), 1.0 / (1.0 + np.exp(sink[None, :] - lse_e)), 0.0)
        out = (out * factor[..., None]).astype(compute_dtype)
    return out.astype(q.dtype), max_logits.astype(np.float32), lse.astype(np.float32)


def _validate_sparse_prefill(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
    if q.ndim != 3:
        raise ValueError(f"q must be 3-D [s_q, h_q, d_qk], got shape {tuple(q.shape)}")
    if q.dtype not in _arrays.FLOAT_DTYPES:
        raise TypeError(f"q must be {_arrays.FLOAT_DTYPE_NAMES}, got {_arrays.dtype_name(q.dtype)}")
    if kv.ndim != 3:
        raise ValueError(f"kv must be 3-D [s_kv, h_kv, d_qk], got shape {tuple(kv.shape)}")
    if kv.dtype != q.dtype:
        raise TypeError(f"kv dtype must equal q's ({_arrays.dtype_name(q.dtype)}), got {_arrays.dtype_name(kv.dtype)}")
    s_q, h_q, d = q.shape
    s_kv, h_kv, d_kv = kv.shape
    if d_kv != d:
        raise ValueError(f"kv.shape[-1] must equal q.shape[-1] = {d}, got {d_kv}")
    if h_kv < 1 or h_q % h_kv:
        raise ValueError(f"h_q ({h_q}) must be a multiple of h_kv ({h_kv})")
    if isinstance(d_v, bool) or not isinstance(d_v, (int, np.integer)) or not 0 < d_v <= d:
        raise ValueError(f"d_v must be an int in (0, {d}], got {d_v!r}")
    if indices.ndim != 3 or tuple(indices.shape[:2]) != (s_q, h_kv):
        raise ValueError(f"indices must have shape [s_q, h_kv, topk] = [{s_q}, {h_kv}, topk], got "
                         f"{tuple(indices.shape)}")
    if indices.dtype != np.int32:
        raise TypeError(f"indices must be int32, got {_arrays.dtype_name(indices.dtype)}")
    if isinstance(sm_scale, bool) or not isinstance(sm_scale, (int, float, np.number)) or not math.isfinite(sm_scale):
        raise ValueError(f"sm_scale must be a finite float, got {sm_scale!r}")
    if attn_sink is not None and (attn_sink.shape != (h_q,) or attn_sink.dtype != np.float32):
        raise ValueError(f"attn_sink must be float32 [h_q] = [{h_q}], got {attn_sink.dtype} {tuple(attn_sink.shape)}")
    if topk_length is not None:
        if topk_length.shape != (s_q,) or topk_length.dtype != np.int32:
            raise ValueError(f"topk_length must be int32 [s_q] = [{s_q}], got {topk_length.dtype} "
                             f"{tuple(topk_length.shape)}")
        lo, hi = _min_max(topk_length)
        if topk_length.size and (lo < 0 or hi > indices.shape[-1]):
            raise ValueError(f"topk_length must be in [0, topk] = [0, {indices.shape[-1]}]")
    lo, hi = _min_max(indices)
    if indices.size and (lo < -1 or hi >= s_kv):
        raise ValueError(f"indices must be in [-1, s_kv) = [-1, {s_kv}), got min {lo}, max {hi}")


def _min_max(x) -> tuple[int, int]:
    """(min, max) of an integer array; reduced on the device for CuPy arrays (two scalars cross,
    not the array)."""
    if x.size == 0:
        return 0, 0
    if isinstance(x, np.ndarray):
        return int(x.min()), int(x.max())
    cp = _arrays.cupy_module()
    lo, hi = cp.stack([x.min(), x.max()]).get()
    return int(lo), int(hi)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None, *, backend="auto"):
    """Sparse prefill attention: see the module docstring for shapes and the base-2 lse.

    Returns (out, max_logits, lse), NumPy for host inputs and CuPy for device inputs. Indices
    outside [-1, s_kv) raise ValueError.

    backend: "numpy" (the reference), "cupy" (the GPU kernel ``kernels/mla_sparse_prefill.cu``;
    bfloat16 / float16; host inputs are copied to the GPU and back) or "auto" (the kernel for device
    inputs when it computes the problem, else the reference; host inputs use the reference). When
    the kernel cannot compute the problem (float32, no GPU, ...), ``backend="cupy"`` raises
    ``BackendUnavailable`` saying why.
    """
    if backend not in ("auto", "numpy", "cupy"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'cupy', got {backend!r}")
    on_device = _arrays.is_device_array(q)
    conv = _arrays.to_cupy if on_device else _arrays.to_host
    q_a, kv_a, idx_a = conv(q, "q"), conv(kv, "kv"), conv(indices, "indices")
    sink_a = None if attn_sink is None else conv(attn_sink, "attn_sink")
    tl_a = None if topk_length is None else conv(topk_length, "topk_length")
    for name, arr in (("kv", kv), ("indices", indices), ("attn_sink", attn_sink), ("topk_length", topk_length)):
        if arr is not None and _arrays.is_device_array(arr) != on_device:
            raise ValueError(f"{name} must be on the same side (host/device) as q")
    _validate_sparse_prefill(q_a, kv_a, idx_a, sm_scale, d_v, sink_a, tl_a)
    if backend == "cupy" or (backend == "auto" and on_device):
        kernel = _cupy_kernel(q_a, kv_a, idx_a, d_v, required=backend == "cupy")
        if kernel is not None:
            return kernel.sparse_prefill(q_a, kv_a, idx_a, float(sm_scale), int(d_v), sink_a, tl_a)
    h = _arrays.asnumpy
    res = sparse_prefill_reference(h(q_a), h(kv_a), h(idx_a), float(sm_scale), int(d_v),
                                   None if sink_a is None else h(sink_a), None if tl_a is None else h(tl_a))
    if on_device:
        cp = _arrays.cupy_module()
        return tuple(cp.asarray(x) for x in res)
    return res


def _cupy_kernel(q, kv, indices, d_v, required: bool):
    """The CuPy kernel module when it can run this problem; else None ("auto") or raise
    BackendUnavailable with the reason (backend="cupy")."""
    from .backends import BackendUnavailable, cupy_sparse_prefill

    ok, why = cupy_sparse_prefill.available()
    if ok:
        ok, why = cupy_sparse_prefill.supports(q, kv, indices, d_v)
    else:
        why = f"backend='cupy' is not available here: {why}"
    if ok:
        return cupy_sparse_prefill
    if required:
        raise BackendUnavailable(f"flash_mla_sparse_fwd: {why}")
    return None
