"""CuPy adapter for the prefill attention kernels (``kernels/prefill_fwd_bwd.cu``).

Takes the validated arguments of ``mla.prefill`` (``_Args``: CuPy arrays, sizes, options), compiles
the RawModule for (dtype, d_qk, d_v) once, launches, and returns CuPy arrays. Supports float32,
float16 and bfloat16 inputs (fp32 accumulation); float64 stays on the NumPy reference.
"""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np

from .. import _arrays

_ELEM_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}
_BLOCK = 64
_THREADS = 256


def available():
    """(True, "") when CuPy sees a CUDA GPU, else (False, the reason)."""
    if _arrays.cupy_module() is None:
        return False, "CuPy is not installed"
    if not _arrays.gpu_available():
        return False, "no CUDA GPU visible to CuPy"
    return True, ""


def supports_dtype(dtype) -> bool:
    """Does the prefill kernel have an element type for this dtype (float32/float16/bfloat16)?"""
    return _arrays.dtype_name(dtype) in _ELEM_KIND


def kernel_source() -> str:
    """The CUDA source of kernels/prefill_fwd_bwd.cu (shipped as mla.kernels package data)."""
    import mla.kernels
    return (pathlib.Path(mla.kernels.__file__).resolve().parent / "prefill_fwd_bwd.cu").read_text()


@functools.lru_cache(maxsize=32)
def _module(kind: int, d: int, d_v: int):
    cp = _arrays.cupy_module()
    options = ("-std=c++17", f"-DELEM_KIND={kind}", f"-DQK_DIM={d}", f"-DV_DIM={d_v}")
    return cp.RawModule(code=kernel_source(), options=options)


def _common(a):
    cp = _arrays.cupy_module()
    name = _arrays.dtype_name(a.q.dtype)
    if name not in _ELEM_KIND:
        raise ValueError(f"backend='cupy' supports float32, float16 and bfloat16, got {name}")
    mod = _module(_ELEM_KIND[name], a.d, a.d_v)
    cu_q = cp.asarray(a.cu_q.astype(np.int32))
    cu_k = cp.asarray(a.cu_k.astype(np.int32))
    from ..prefill import _dropout_threshold, _seed32
    p = a.dropout_p
    tail = (np.int32(a.h), np.int32(a.h_k), np.int32(a.total_q), np.float32(a.softmax_scale),
            np.int32(a.causal), np.uint32(_seed32(a.seed)), np.uint32(_dropout_threshold(p) if p > 0 else 0),
            np.float32(1.0 / (1.0 - p)))
    return cp, mod, cu_q, cu_k, tail


def forward(a):
    """(out [total_q, h, d_v] in q's dtype, lse float32 [h, total_q])."""
    cp, mod, cu_q, cu_k, tail = _common(a)
    q, k, v = (cp.ascontiguousarray(x) for x in (a.q, a.k, a.v))
    out = cp.empty((a.total_q, a.h, a.d_v), dtype=q.dtype)
    lse = cp.empty((a.h, a.total_q), dtype=cp.float32)
    if a.total_q == 0:
        return out, lse
    grid = (max(1, math.ceil(a.max_seqlen_q / _BLOCK)), a.h, a.b)
    mod.get_function("prefill_fwd")(grid, (_THREADS,), (q, k, v, cu_q, cu_k, out, lse) + tail)
    return out, lse


def backward(a, dout, out, lse):
    """(dq, dk, dv) shaped and typed like q, k, v."""
    cp, mod, cu_q, cu_k, tail = _common(a)
    q, k, v = (cp.ascontiguousarray(x) for x in (a.q, a.k, a.v))
    dout = cp.ascontiguousarray(dout.astype(q.dtype, copy=False))
    lse = cp.ascontiguousarray(lse.astype(cp.float32, copy=False))
    # D_r = sum(dout_r * out_r): one fused elementwise + reduction pass
    dr = cp.ascontiguousarray((dout.astype(cp.float32) * out.astype(cp.float32)).sum(axis=-1).T)
    dq = cp.zeros_like(q)
    dk_h = cp.zeros((a.total_k, a.h, a.d), dtype=cp.float32)
    dv_h = cp.zeros((a.total_k, a.h, a.d_v), dtype=cp.float32)
    if a.total_q and a.total_k:
        grid_k = (max(1, math.ceil(a.max_seqlen_k / _BLOCK)), a.h, a.b)
        mod.get_function("prefill_bwd_dkdv")(grid_k, (_THREADS,),
                                             (q, k, v, dout, lse, dr, cu_q, cu_k, dk_h, dv_h) + tail)
        grid_q = (max(1, math.ceil(a.max_seqlen_q / _BLOCK)), a.h, a.b)
        mod.get_function("prefill_bwd_dq")(grid_q, (_THREADS,), (q, k, v, dout, lse, dr, cu_q, cu_k, dq) + tail)
    group = a.h // a.h_k
    dk = dk_h.reshape(a.total_k, a.h_k, group, a.d).sum(axis=2).astype(q.dtype)
    dv = dv_h.reshape(a.total_k, a.h_k, group, a.d_v).sum(axis=2).astype(q.dtype)
    return dq, dk, dv
