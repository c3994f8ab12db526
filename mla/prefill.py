"""Prefill attention with a backward pass: flash-attention style, varlen, causal, dropout.

This is MLA's *prefill* (MHA mode): every query head has its own key and value, decompressed
from the latent (``K = [W_UK c_kv, k_pe]``, ``V = W_UV c_kv``; d_qk = 192, d_v = 128 for
DeepSeek-V2/V3). Sequences are packed back to back (flash-attn's varlen layout)::

    q    [total_q, h, d_qk]      cu_seqlens_q int32 [b + 1]: sequence i is rows cu[i]:cu[i+1]
    k    [total_k, h_k, d_qk]    cu_seqlens_k int32 [b + 1]; h % h_k == 0 (GQA; MLA prefill: h_k = h)
    v    [total_k, h_k, d_v]
    out  [total_q, h, d_v]       in q's dtype
    lse  [h, total_q]            float32 (float64 for float64 inputs), natural log

Math, for query row r (0 <= r < L_q) of sequence i and head hh (KV head hh // (h // h_k))::

    s_j  = softmax_scale * q_r . k_j                  visible keys j (0 <= j < L_k)
    P_j  = exp(s_j - lse),  lse = log sum_j exp(s_j)
    out  = sum_j P_j * Z_j / (1 - p) * v_j            Z_j = keep bit of dropout (1 when p = 0)

Causal masking is bottom-right aligned (flash-attn >= 2.1 and DESIGN.md §4.2): row r sees keys
``j <= r + L_k - L_q``. A row that sees nothing has out = 0 and lse = +inf (never NaN).

Backward (FlashAttention-2, recompute from lse; no [s, s] matrix is ever stored, only one
[h, L_q, block_n] tile at a time, so memory is O(s * d))::

    D_r   = sum(dout_r * out_r)                        (equals sum_j P_rj dP_rj, with dropout too)
    P     = exp(s - lse)                                recomputed
    dV_j += sum_r P_rj Z_rj / (1 - p) dout_r
    dP_rj = Z_rj / (1 - p) * dout_r . v_j
    dS_rj = P_rj (dP_rj - D_r)
    dQ_r += scale * sum_j dS_rj k_j,   dK_j += scale * sum_r dS_rj q_r

Dropout RNG: counter-based, stateless, the same bits on NumPy and on the GPU kernel. The keep bit
of (head, global query row, global key row) is ``hash32(seed, head, row, col) >> 8 >= p * 2**24``,
where hash32 chains Chris Wellons' "lowbias32" integer mixer (see :func:`dropout_keep_mask`).
Forward and backward call it with the same seed, so their masks agree without storing them.

Backends: "numpy" (this module, block-wise, float32 or float64 compute), "cupy" (CuPy RawKernels,
``kernels/prefill_fwd_bwd.cu`` through ``mla.backends.prefill_cupy``), "auto" (CuPy for device
arrays, NumPy for host arrays).
"""

from __future__ import annotations

import math

import numpy as np

from . import _arrays

__all__ = [
    "flash_attn_varlen_func",
    "flash_attn_varlen_forward",
    "flash_attn_varlen_backward",
    "dropout_keep_mask",
    "attention_naive",
    "attention_naive_backward",
    "PREFILL_BACKENDS",
]

PREFILL_BACKENDS = ("auto", "numpy", "cupy")
BLOCK_N = 128  # keys per tile in the NumPy reference (the [h, L_q, BLOCK_N] tile is all it keeps)

_M1 = np.uint32(0x7FEB352D)
_M2 = np.uint32(0x846CA68B)
_GOLDEN = np.uint32(0x9E3779B9)


# ----------------------------------------------------------------------------------------------
# dropout RNG


def _mix32(x):
    """lowbias32: a bijective 32-bit integer mixer (uint32 in, uint32 out, wrapping arithmetic)."""
    x = x ^ (x >> np.uint32(16))
    x = x * _M1
    x = x ^ (x >> np.uint32(15))
    x = x * _M2
    x = x ^ (x >> np.uint32(16))
    return x


def _seed32(seed) -> np.uint32:
    seed = int(seed)
    return np.uint32((seed ^ (seed >> 32)) & 0xFFFFFFFF)


def dropout_keep_mask(seed, head, rows, cols, dropout_p: float, xp=np):
    """Keep bits of dropout: bool array broadcast over (head, rows, cols).

    ``hash = mix(mix(mix(mix(seed ^ 0x9E3779B9) ^ head) ^ row) ^ col)`` with 32-bit wrap-around;
    keep when ``hash >> 8 >= round(p * 2**24)``. rows / cols are *global* packed indices (into
    total_q / total_k), so every sequence of a batch gets independent bits. The CUDA kernel
    computes exactly the same function (``kernels/mla_dropout.cuh``, used by both prefill kernels).
    """
    with np.errstate(over="ignore"):
        s = _mix32(xp.asarray(_seed32(seed) ^ _GOLDEN, dtype=xp.uint32))
        hh = xp.asarray(head).astype(xp.uint32)
        r = xp.asarray(rows).astype(xp.uint32)
        c = xp.asarray(cols).astype(xp.uint32)
        x = _mix32(s ^ hh)
        x = _mix32(x ^ r)
        x = _mix32(x ^ c)
    threshold = _dropout_threshold(dropout_p)
    return (x >> np.uint32(8)) >= np.uint32(threshold)


def _dropout_threshold(dropout_p: float) -> int:
    return int(round(float(dropout_p) * (1 << 24)))


# ----------------------------------------------------------------------------------------------
# validation


def _check_cu(name, cu, total, xp):
    cu_h = _arrays.asnumpy(cu)
    if cu_h.ndim != 1 or cu_h.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D [b + 1] with b >= 1, got shape {tuple(cu_h.shape)}")
    if not np.issubdtype(cu_h.dtype, np.integer):
        raise TypeError(f"{name} must be int32, got {cu_h.dtype}")
    if cu_h[0] != 0 or (np.diff(cu_h) < 0).any() or cu_h[-1] != total:
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at the packed length "
                         f"{total}, got {cu_h.tolist()[:8]}{'...' if cu_h.shape[0] > 8 else ''}")
    return cu_h.astype(np.int64)


class _Args:
    """Validated prefill arguments: arrays of one kind, the sizes and the options."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                 softmax_scale, causal, seed, backend):
        if not isinstance(backend, str) or backend not in PREFILL_BACKENDS:
            raise ValueError(f"backend must be one of {PREFILL_BACKENDS}, got {backend!r}")
        named = {"q": q, "k": k, "v": v}
        on_device = _arrays.is_device_array(q)
        for name, x in named.items():
            if _arrays.is_device_array(x) != on_device:
                raise ValueError(f"{name} must be on the same side (host / device) as q")
        conv = _arrays.to_cupy if on_device else _arrays.to_host
        q, k, v = (conv(x, n) for n, x in named.items())
        for name, x in (("q", q), ("k", k), ("v", v)):
            if x.ndim != 3:
                raise ValueError(f"{name} must be 3-D [total, heads, dim], got shape {tuple(x.shape)}")
            if np.dtype(x.dtype) not in _arrays.FLOAT_DTYPES + (np.dtype(np.float64),):
                raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got "
                                f"{_arrays.dtype_name(x.dtype)}")
        if not (q.dtype == k.dtype == v.dtype):
            raise TypeError(f"q, k, v must share one dtype, got {_arrays.dtype_name(q.dtype)}, "
                            f"{_arrays.dtype_name(k.dtype)}, {_arrays.dtype_name(v.dtype)}")
        total_q, h, d = (int(n) for n in q.shape)
        total_k, h_k, d_k = (int(n) for n in k.shape)
        if d_k != d:
            raise ValueError(f"k.shape[2] must equal q's d_qk = {d}, got {d_k}")
        if tuple(v.shape[:2]) != (total_k, h_k):
            raise ValueError(f"v must have shape [total_k, h_k, d_v] = [{total_k}, {h_k}, d_v], got "
                             f"{tuple(v.shape)}")
        if h_k < 1 or h % h_k:
            raise ValueError(f"q heads ({h}) must be a multiple of k/v heads ({h_k})")
        self.cu_q = _check_cu("cu_seqlens_q", cu_seqlens_q, total_q, np)
        self.cu_k = _check_cu("cu_seqlens_k", cu_seqlens_k, total_k, np)
        if self.cu_q.shape != self.cu_k.shape:
            raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [b + 1], got "
                             f"{self.cu_q.shape[0]} and {self.cu_k.shape[0]} entries")
        lq, lk = np.diff(self.cu_q), np.diff(self.cu_k)
        self.max_seqlen_q = int(lq.max()) if max_seqlen_q is None else int(max_seqlen_q)
        self.max_seqlen_k = int(lk.max()) if max_seqlen_k is None else int(max_seqlen_k)
        if self.max_seqlen_q < lq.max() or self.max_seqlen_k < lk.max():
            raise ValueError(f"max_seqlen_q / max_seqlen_k ({self.max_seqlen_q}, {self.max_seqlen_k}) must be "
                             f">= the longest sequences ({int(lq.max())}, {int(lk.max())})")
        if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float, np.floating)) \
                or not 0.0 <= float(dropout_p) < 1.0:
            raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
        if softmax_scale is None:
            softmax_scale = 1.0 / math.sqrt(d)
        softmax_scale = float(softmax_scale)
        if not math.isfinite(softmax_scale):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
        if not isinstance(causal, (bool, np.bool_)):
            raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
        self.q, self.k, self.v = q, k, v
        self.total_q, self.total_k, self.h, self.h_k, self.d, self.d_v = total_q, total_k, h, h_k, d, int(
            v.shape[2])
        self.b = self.cu_q.shape[0] - 1
        self.dropout_p = float(dropout_p)
        self.softmax_scale = softmax_scale
        self.causal = bool(causal)
        self.seed = int(seed)
        self.on_device = on_device
        self.backend = backend
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k

    def resolve_backend(self) -> str:
        if self.backend == "numpy":
            return "numpy"
        if self.backend == "cupy":
            from .backends import prefill_cupy
            ok, reason = prefill_cupy.available()
            if not ok:
                raise ValueError(f"backend='cupy' is not available here: {reason}")
            if not self.on_device:
                raise ValueError("backend='cupy' needs device (CuPy) arrays; got host arrays")
            if not prefill_cupy.supports_dtype(self.q.dtype):
                raise ValueError(f"backend='cupy' supports float32, float16 and bfloat16, got "
                                 f"{_arrays.dtype_name(self.q.dtype)}")
            return "cupy"
        if self.on_device:
            from .backends import prefill_cupy
            ok, _ = prefill_cupy.available()
            return "cupy" if ok and prefill_cupy.supports_dtype(self.q.dtype) else "numpy"
        return "numpy"


def _compute_dtype(dtype):
    return np.float64 if np.dtype(dtype) == np.float64 else np.float32


# ----------------------------------------------------------------------------------------------
# NumPy reference: block-wise forward and backward


def _visible(r0: int, n_q: int, c0: int, n_c: int, L_q: int, L_k: int, causal: bool):
    """bool [n_q, n_c]: may local query row r0 + a see local key c0 + c?"""
    rows = np.arange(r0, r0 + n_q)[:, None]
    cols = np.arange(c0, c0 + n_c)[None, :]
    mask = cols < L_k
    if causal:
        mask = mask & (cols <= rows + (L_k - L_q))
    return np.broadcast_to(mask, (n_q, n_c))


def _keep_tile(a: _Args, q0: int, k0: int, n_q: int, c0: int, n_c: int, heads, ct):
    """float [h, n_q, n_c]: Z / (1 - p) for a tile (global rows q0.., global cols k0 + c0..)."""
    keep = dropout_keep_mask(a.seed, heads[:, None, None], np.arange(q0, q0 + n_q)[None, :, None],
                             np.arange(k0 + c0, k0 + c0 + n_c)[None, None, :], a.dropout_p)
    return keep.astype(ct) / ct(1.0 - a.dropout_p)


def _forward_numpy(a: _Args):
    ct = _compute_dtype(a.q.dtype)
    q = _arrays.asnumpy(a.q).astype(ct)
    k = _arrays.asnumpy(a.k).astype(ct)
    v = _arrays.asnumpy(a.v).astype(ct)
    group = a.h // a.h_k
    out = np.zeros((a.total_q, a.h, a.d_v), dtype=ct)
    lse = np.full((a.h, a.total_q), np.inf, dtype=ct)
    heads = np.arange(a.h)
    for i in range(a.b):
        q0, q1, k0, k1 = int(a.cu_q[i]), int(a.cu_q[i + 1]), int(a.cu_k[i]), int(a.cu_k[i + 1])
        L_q, L_k = q1 - q0, k1 - k0
        if L_q == 0:
            continue
        qi = q[q0:q1].transpose(1, 0, 2) * ct(a.softmax_scale)          # [h, L_q, d]
        m = np.full((a.h, L_q), -np.inf, dtype=ct)
        l = np.zeros((a.h, L_q), dtype=ct)
        acc = np.zeros((a.h, L_q, a.d_v), dtype=ct)
        for c0 in range(0, L_k, BLOCK_N):
            n_c = min(BLOCK_N, L_k - c0)
            vis = _visible(0, L_q, c0, n_c, L_q, L_k, a.causal)
            if not vis.any():
                continue
            kb = np.repeat(k[k0 + c0:k0 + c0 + n_c], group, axis=1).transpose(1, 2, 0)  # [h, d, n_c]
            vb = np.repeat(v[k0 + c0:k0 + c0 + n_c], group, axis=1).transpose(1, 0, 2)  # [h, n_c, d_v]
            s = np.where(vis, qi @ kb, -np.inf)                             # [h, L_q, n_c]
            # online softmax: m_new = max(m, rowmax s); rescale l and acc by exp(m - m_new)
            m_new = np.maximum(m, s.max(axis=-1))
            m_safe = np.where(np.isfinite(m_new), m_new, 0)
            alpha = np.exp(m - m_safe)
            p = np.exp(s - m_safe[..., None])
            l = l * alpha + p.sum(axis=-1)
            if a.dropout_p > 0:
                p = p * _keep_tile(a, q0, k0, L_q, c0, n_c, heads, ct)
            acc = acc * alpha[..., None] + p @ vb
            m = m_new
        with np.errstate(divide="ignore", invalid="ignore"):
            o = np.where(l[..., None] > 0, acc / l[..., None], 0)
            lse[:, q0:q1] = np.where(l > 0, m + np.log(l), np.inf)
        out[q0:q1] = o.transpose(1, 0, 2)
    lse_dtype = np.float64 if ct == np.float64 else np.float32
    return out.astype(a.q.dtype), lse.astype(lse_dtype)


def _backward_numpy(a: _Args, dout, out, lse):
    ct = _compute_dtype(a.q.dtype)
    q = _arrays.asnumpy(a.q).astype(ct)
    k = _arrays.asnumpy(a.k).astype(ct)
    v = _arrays.asnumpy(a.v).astype(ct)
    do = _arrays.asnumpy(dout).astype(ct)
    o = _arrays.asnumpy(out).astype(ct)
    lse = _arrays.asnumpy(lse).astype(ct)
    group = a.h // a.h_k
    dq = np.zeros((a.total_q, a.h, a.d), dtype=ct)
    dk = np.zeros((a.total_k, a.h_k, a.d), dtype=ct)
    dv = np.zeros((a.total_k, a.h_k, a.d_v), dtype=ct)
    heads = np.arange(a.h)
    scale = ct(a.softmax_scale)
    for i in range(a.b):
        q0, q1, k0, k1 = int(a.cu_q[i]), int(a.cu_q[i + 1]), int(a.cu_k[i]), int(a.cu_k[i + 1])
        L_q, L_k = q1 - q0, k1 - k0
        if L_q == 0 or L_k == 0:
            continue
        qi = q[q0:q1].transpose(1, 0, 2)                                    # [h, L_q, d]
        doi = do[q0:q1].transpose(1, 0, 2)                                  # [h, L_q, d_v]
        D = (do[q0:q1] * o[q0:q1]).sum(-1).T                                # [h, L_q]
        lse_i = lse[:, q0:q1]                                               # +inf for empty rows -> P = 0
        dqi = np.zeros_like(qi)
        for c0 in range(0, L_k, BLOCK_N):
            n_c = min(BLOCK_N, L_k - c0)
            vis = _visible(0, L_q, c0, n_c, L_q, L_k, a.causal)
            if not vis.any():
                continue
            kb = np.repeat(k[k0 + c0:k0 + c0 + n_c], group, axis=1).transpose(1, 0, 2)  # [h, n_c, d]
            vb = np.repeat(v[k0 + c0:k0 + c0 + n_c], group, axis=1).transpose(1, 0, 2)  # [h, n_c, d_v]
            s = (qi @ kb.transpose(0, 2, 1)) * scale
            with np.errstate(invalid="ignore", over="ignore"):
                p = np.where(vis, np.exp(s - lse_i[..., None]), 0)          # [h, L_q, n_c]
            dp = doi @ vb.transpose(0, 2, 1)
            if a.dropout_p > 0:
                z = _keep_tile(a, q0, k0, L_q, c0, n_c, heads, ct)
                pd, dp = p * z, dp * z
            else:
                pd = p
            ds = p * (dp - D[..., None])
            dv_h = pd.transpose(0, 2, 1) @ doi                             # [h, n_c, d_v]
            dk_h = ds.transpose(0, 2, 1) @ qi * scale                      # [h, n_c, d]
            dqi += ds @ kb * scale
            # heads of one KV group add up into their shared k / v
            dv[k0 + c0:k0 + c0 + n_c] += dv_h.reshape(a.h_k, group, n_c, a.d_v).sum(1).transpose(1, 0, 2)
            dk[k0 + c0:k0 + c0 + n_c] += dk_h.reshape(a.h_k, group, n_c, a.d).sum(1).transpose(1, 0, 2)
        dq[q0:q1] = dqi.transpose(1, 0, 2)
    dt = a.q.dtype
    return dq.astype(dt), dk.astype(dt), dv.astype(dt)


# ----------------------------------------------------------------------------------------------
# public API


def flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                              dropout_p: float = 0.0, softmax_scale: float | None = None,
                              causal: bool = False, seed: int = 0, backend: str = "auto"):
    """Autograd-free prefill forward. Returns ``(out [total_q, h, d_v], lse [h, total_q])``.

    See the module docstring for layouts and math; softmax_scale defaults to ``1/sqrt(d_qk)``.
    Keep ``lse`` (and ``seed``) for :func:`flash_attn_varlen_backward`.
    """
    a = _Args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              causal, seed, backend)
    if a.resolve_backend() == "cupy":
        from .backends import prefill_cupy
        return prefill_cupy.forward(a)
    out, lse = _forward_numpy(a)
    if a.on_device:
        cp = _arrays.cupy_module()
        return cp.asarray(out), cp.asarray(lse)
    return out, lse


def flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                               max_seqlen_k=None, dropout_p: float = 0.0,
                               softmax_scale: float | None = None, causal: bool = False, seed: int = 0,
                               backend: str = "auto"):
    """Prefill backward from the forward's (out, lse): returns ``(dq, dk, dv)`` shaped like q, k, v.

    P is recomputed tile by tile from lse (no [s, s] matrix); the dropout mask is recomputed from
    ``seed`` (pass the forward's). For GQA (h_k < h), dk / dv sum over each KV head's group.
    """
    a = _Args(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
              causal, seed, backend)
    conv = _arrays.to_cupy if a.on_device else _arrays.to_host
    dout, out, lse = conv(dout, "dout"), conv(out, "out"), conv(lse, "lse")
    if tuple(dout.shape) != (a.total_q, a.h, a.d_v) or tuple(out.shape) != tuple(dout.shape):
        raise ValueError(f"dout and out must have shape [total_q, h, d_v] = {[a.total_q, a.h, a.d_v]}, got "
                         f"{tuple(dout.shape)} and {tuple(out.shape)}")
    if tuple(lse.shape) != (a.h, a.total_q):
        raise ValueError(f"lse must have shape [h, total_q] = {[a.h, a.total_q]}, got {tuple(lse.shape)}")
    if a.resolve_backend() == "cupy":
        from .backends import prefill_cupy
        return prefill_cupy.backward(a, dout, out, lse)
    dq, dk, dv = _backward_numpy(a, dout, out, lse)
    if a.on_device:
        cp = _arrays.cupy_module()
        return cp.asarray(dq), cp.asarray(dk), cp.asarray(dv)
    return dq, dk, dv


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None,
                           dropout_p: float = 0.0, softmax_scale: float | None = None, causal: bool = False,
                           return_lse: bool = False, seed: int = 0, backend: str = "auto"):
    """flash-attn's ``flash_attn_varlen_func``: ``out``, or ``(out, lse)`` with ``return_lse=True``.

    q [total_q, h, d_qk], k [total_k, h_k, d_qk], v [total_k, h_k, d_v], cu_seqlens_* int32 [b + 1].
    There is no autograd here: for training call :func:`flash_attn_varlen_forward` /
    :func:`flash_attn_varlen_backward` (or use ``mla.MultiHeadLatentAttention.forward/backward``).
    """
    out, lse = flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         dropout_p, softmax_scale, causal, seed, backend)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# naive (full [s, s]) versions, for tests and as the benchmark baseline


def attention_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p=0.0, softmax_scale=None, causal=False,
                    seed=0, xp=np):
    """Brute force: the full score matrix per sequence (float64 on NumPy). Returns (out, lse)."""
    cu_q, cu_k = _arrays.asnumpy(cu_seqlens_q).astype(int), _arrays.asnumpy(cu_seqlens_k).astype(int)
    total_q, h, d = q.shape
    h_k, d_v = k.shape[1], v.shape[2]
    group = h // h_k
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    ct = xp.float64 if xp is np else xp.float32
    out = xp.zeros((total_q, h, d_v), dtype=ct)
    lse = xp.full((h, total_q), xp.inf, dtype=ct)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0:
            continue
        qi = q[q0:q1].astype(ct).transpose(1, 0, 2)
        ki = xp.repeat(k[k0:k1].astype(ct), group, axis=1).transpose(1, 0, 2)
        vi = xp.repeat(v[k0:k1].astype(ct), group, axis=1).transpose(1, 0, 2)
        s = qi @ ki.transpose(0, 2, 1) * scale
        vis = xp.asarray(_visible(0, q1 - q0, 0, k1 - k0, q1 - q0, k1 - k0, causal))
        s = xp.where(vis, s, -xp.inf)
        m = s.max(axis=-1, keepdims=True) if k1 > k0 else xp.full(s.shape[:-1] + (1,), -xp.inf, ct)
        m_safe = xp.where(xp.isfinite(m), m, 0)
        p = xp.exp(s - m_safe)
        l = p.sum(-1, keepdims=True)
        if dropout_p > 0:
            z = dropout_keep_mask(seed, xp.arange(h)[:, None, None], xp.arange(q0, q1)[None, :, None],
                                  xp.arange(k0, k1)[None, None, :], dropout_p, xp=xp)
            p = p * z / (1.0 - dropout_p)
        safe_l = xp.where(l > 0, l, 1)
        out[q0:q1] = xp.where(l > 0, (p @ vi) / safe_l, 0).transpose(1, 0, 2)
        lse[:, q0:q1] = xp.where(l[..., 0] > 0, m_safe[..., 0] + xp.log(safe_l[..., 0]), xp.inf)
    return out, lse


def attention_naive_backward(dout, q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p=0.0, softmax_scale=None,
                             causal=False, seed=0):
    """Brute-force gradients (float64, full [s, s] matrices) for checking the block-wise backward."""
    cu_q, cu_k = np.asarray(cu_seqlens_q).astype(int), np.asarray(cu_seqlens_k).astype(int)
    q, k, v, dout = (np.asarray(x, dtype=np.float64) for x in (q, k, v, dout))
    total_q, h, d = q.shape
    h_k = k.shape[1]
    group = h // h_k
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    for i in range(len(cu_q) - 1):
        q0, q1, k0, k1 = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if q1 == q0 or k1 == k0:
            continue
        qi = q[q0:q1].transpose(1, 0, 2)
        ki = np.repeat(k[k0:k1], group, axis=1).transpose(1, 0, 2)
        vi = np.repeat(v[k0:k1], group, axis=1).transpose(1, 0, 2)
        doi = dout[q0:q1].transpose(1, 0, 2)
        vis = _visible(0, q1 - q0, 0, k1 - k0, q1 - q0, k1 - k0, causal)
        s = np.where(vis, qi @ ki.transpose(0, 2, 1) * scale, -np.inf)
        m = s.max(-1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = np.exp(s - m)
        l = e.sum(-1, keepdims=True)
        p = np.where(l > 0, e / np.where(l > 0, l, 1), 0)
        z = np.ones_like(p)
        if dropout_p > 0:
            z = dropout_keep_mask(seed, np.arange(h)[:, None, None], np.arange(q0, q1)[None, :, None],
                                  np.arange(k0, k1)[None, None, :], dropout_p) / (1.0 - dropout_p)
        dv_h = (p * z).transpose(0, 2, 1) @ doi
        dpz = (doi @ vi.transpose(0, 2, 1)) * z
        ds = p * (dpz - (p * dpz).sum(-1, keepdims=True))
        dq[q0:q1] = (ds @ ki * scale).transpose(1, 0, 2)
        dk_h = ds.transpose(0, 2, 1) @ qi * scale
        dk[k0:k1] += dk_h.reshape(h_k, group, k1 - k0, d).sum(1).transpose(1, 0, 2)
        dv[k0:k1] += dv_h.reshape(h_k, group, k1 - k0, -1).sum(1).transpose(1, 0, 2)
    return dq, dk, dv
