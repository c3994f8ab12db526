"""CuPy adapter for the prefill attention kernels.

Takes the validated arguments of ``mla.prefill`` (``_Args``: CuPy arrays, sizes, options), compiles
the RawModule for (dtype, d_qk, d_v) once, launches, and returns CuPy arrays. Two kernel families:

* ``kernels/prefill_fwd_bwd.cu`` ("simt"): fp32 math on the CUDA cores for float32, float16 and
  bfloat16 inputs. Verified on an H100 (tests/test_prefill_gpu.py).
* ``kernels/prefill_mma.cu`` ("mma"): tensor cores (mma.sync m16n8k16, fp32 accumulate),
  FlashAttention-2 forward and backward, for float16 / bfloat16 with d_qk, d_v multiples of 32,
  d_qk <= 256, d_v <= 128 (the MLA shapes are 192 / 128). Verified on an H100 on 2026-11-25
  (tests/test_prefill_gpu.py: 63 passed, 8 skipped by design, and its two compute-sanitizer tests,
  memcheck and racecheck, passed); 36-45x faster than naive CuPy there.

Which kernel runs: :func:`select_kernel` (the reason is kept in ``last_choice``): "mma" where it
supports the problem (dtype, head dims, shared memory), else "simt". The environment
variable ``MLA_PREFILL_KERNEL`` = ``mma`` | ``simt`` | ``auto`` (default) forces one (tests and
benchmarks); forcing "mma" where it cannot run raises ``ValueError`` with the reason instead of
silently running the other kernel. float32 always runs "simt"; float64 stays on the NumPy reference.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from .. import _arrays

_ELEM_KIND = {"float32": 0, "float16": 1, "bfloat16": 2}
_BLOCK = 64
_THREADS = 256

KERNEL_ENV = "MLA_PREFILL_KERNEL"
FWD_WARPS_ENV = "MLA_PREFILL_MMA_FWD_WARPS"  # benchmarks: 8 (128 query rows a CTA) or 4 (64)
POISON_OUTPUTS = False
"""Tests: fill every output the mma path allocates with NaN before the launch (a kernel that leaves
an element unwritten then shows it); accumulators that must start at zero stay zero."""

last_choice: dict = {}
"""{"fwd" | "bwd": (kernel, reason)} of the latest call (for tests, benchmarks and curious users)."""

_MMA_FILE = "prefill_mma.cu"
_MMA_BN = 64        # keys a forward tile / a backward CTA
_MMA_BBM = 64       # query rows a backward step
_MMA_BWD_THREADS = 256
_MMA_MAX_D = 256    # d_qk
_MMA_MAX_DV = 128   # the forward keeps a 16 x d_v fp32 accumulator a warp: 192 and 256 spill (ptxas -v)


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
    """The CUDA source of kernels/prefill_fwd_bwd.cu (shipped as mla.kernels package data), its local
    includes (mla_dropout.cuh) inlined."""
    from . import _nvrtc

    return _nvrtc.read_source("prefill_fwd_bwd.cu")


# ----------------------------------------------------------------------------------------------
# kernel selection


def mma_smem_bytes(d: int, d_v: int, fwd_warps: int = 8) -> tuple[int, int]:
    """(forward, backward) dynamic shared memory of prefill_mma.cu in bytes (mirrors its header)."""
    qs, vs = d + 8, d_v + 8
    fwd = 2 * (16 * fwd_warps * qs + 2 * _MMA_BN * qs + 2 * _MMA_BN * vs)
    bwd = 2 * (_MMA_BN * qs + _MMA_BN * vs + 2 * _MMA_BBM * qs + 2 * _MMA_BBM * vs + 2 * _MMA_BBM * (_MMA_BN + 8)) \
        + 4 * 4 * _MMA_BBM
    return fwd, bwd


def mma_fwd_warps(d: int, d_v: int, max_smem: int) -> int | None:
    """Warps of the forward CTA (8: 128 query rows, 4: 64) that fit ``max_smem``, or None."""
    forced = os.environ.get(FWD_WARPS_ENV)
    for warps in ((int(forced),) if forced else (8, 4)):
        if warps in (4, 8) and mma_smem_bytes(d, d_v, warps)[0] <= max_smem:
            return warps
    return None


def select_kernel(direction: str, dtype, d: int, d_v: int, max_smem: int, forced: str | None = None):
    """("mma" | "simt", reason) for a forward ("fwd") or backward ("bwd") call.

    forced: "mma", "simt", "auto" or None (then the ``MLA_PREFILL_KERNEL`` environment variable).
    Raises ValueError when "mma" is forced but cannot run here (the reason says why).
    """
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    forced = (forced if forced is not None else os.environ.get(KERNEL_ENV, "auto")) or "auto"
    if forced not in ("auto", "mma", "simt"):
        raise ValueError(f"{KERNEL_ENV} must be 'mma', 'simt' or 'auto', got {forced!r}")
    if forced == "simt":
        return "simt", f"{KERNEL_ENV}=simt"
    name = _arrays.dtype_name(dtype)
    reason = None
    if name not in ("float16", "bfloat16"):
        reason = f"the tensor-core kernel takes float16 / bfloat16, got {name}"
    elif d % 32 or d_v % 32 or not 0 < d <= _MMA_MAX_D or not 0 < d_v <= _MMA_MAX_DV:
        reason = (f"the tensor-core kernel needs d_qk and d_v multiples of 32, d_qk up to {_MMA_MAX_D} and d_v up "
                  f"to {_MMA_MAX_DV} (a wider forward accumulator would spill registers), got {d}, {d_v}")
    else:
        need = mma_smem_bytes(d, d_v, 4)[0] if direction == "fwd" else mma_smem_bytes(d, d_v)[1]
        if need > max_smem:
            reason = (f"the tensor-core {direction} kernel needs {need} B of shared memory for d_qk {d}, d_v {d_v}; "
                      f"this GPU allows {max_smem}")
    if reason is None:
        return "mma", "tensor cores (mma.sync)"
    if forced == "mma":
        raise ValueError(f"{KERNEL_ENV}=mma: {reason}")
    return "simt", reason


def _device_smem() -> int:
    cp = _arrays.cupy_module()
    return int(cp.cuda.Device().attributes["MaxSharedMemoryPerBlockOptin"])


def _choose(a, direction: str, kernel: str | None) -> str:
    choice = select_kernel(direction, a.q.dtype, a.d, a.d_v, _device_smem(), kernel)
    last_choice[direction] = choice
    return choice[0]


# ----------------------------------------------------------------------------------------------
# the fp32 SIMT kernels (prefill_fwd_bwd.cu)


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
    p = a.dropout_p
    tail = (np.int32(a.h), np.int32(a.h_k), np.int32(a.total_q), np.float32(a.softmax_scale),
            np.int32(a.causal), np.uint32(_seed(a)), np.uint32(_threshold(a)), np.float32(1.0 / (1.0 - p)))
    return cp, mod, cu_q, cu_k, tail


def _seed(a) -> int:
    from ..prefill import _seed32
    return int(_seed32(a.seed))


def _threshold(a) -> int:
    from ..prefill import _dropout_threshold
    return _dropout_threshold(a.dropout_p) if a.dropout_p > 0 else 0


def forward(a, kernel: str | None = None):
    """(out [total_q, h, d_v] in q's dtype, lse float32 [h, total_q]).

    kernel: "mma", "simt", "auto" or None (``MLA_PREFILL_KERNEL``); see :func:`select_kernel`.
    """
    if _choose(a, "fwd", kernel) == "mma":
        return mma_forward(a, _arrays.cupy_module(), _mma_function, _device_smem())
    cp, mod, cu_q, cu_k, tail = _common(a)
    q, k, v = (cp.ascontiguousarray(x) for x in (a.q, a.k, a.v))
    out = cp.empty((a.total_q, a.h, a.d_v), dtype=q.dtype)
    lse = cp.empty((a.h, a.total_q), dtype=cp.float32)
    if a.total_q == 0:
        return out, lse
    grid = (max(1, math.ceil(a.max_seqlen_q / _BLOCK)), a.h, a.b)
    mod.get_function("prefill_fwd")(grid, (_THREADS,), (q, k, v, cu_q, cu_k, out, lse) + tail)
    return out, lse


def backward(a, dout, out, lse, kernel: str | None = None):
    """(dq, dk, dv) shaped and typed like q, k, v."""
    if _choose(a, "bwd", kernel) == "mma":
        return mma_backward(a, dout, out, lse, _arrays.cupy_module(), _mma_function, _device_smem())
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


# ----------------------------------------------------------------------------------------------
# the tensor-core kernels (prefill_mma.cu). Written against an array module ``xp`` and a function
# loader so that tests can run the very same launch code on NumPy arrays through the CPU emulator
# (tests/_cuda_emu.py): get_function(name, defines, smem) returns a RawKernel-like callable.


def mma_defines(dtype, d: int, d_v: int, fwd_warps: int = 8) -> dict:
    """The -D values of prefill_mma.cu for a dtype and head dims."""
    return {"PF_D": d, "PF_DV": d_v, "PF_FWD_WARPS": fwd_warps, "MLA_FP16": int(np.dtype(dtype) == np.float16)}


def _mma_function(name: str, defines: dict, smem: int):
    from . import _nvrtc
    fn = _nvrtc.load_function(_MMA_FILE, name, defines)
    if smem and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    return fn


def _ptr(x) -> int:
    return int(x.ctypes.data) if isinstance(x, np.ndarray) else int(x.data.ptr)


def _aligned(xp, x, dtype=None):
    """C-contiguous, of `dtype`, and 16-byte aligned (what the kernels' cp.async rows need)."""
    x = xp.ascontiguousarray(x if dtype is None else x.astype(dtype, copy=False))
    if _ptr(x) % 16:
        x = x.copy()
    return x


def _new(xp, shape, dtype):
    out = xp.empty(shape, dtype=dtype)
    if POISON_OUTPUTS and out.size:
        out.view(xp.uint16 if out.dtype.itemsize == 2 else xp.uint32).fill(0xFFFF if out.dtype.itemsize == 2
                                                                            else 0x7FC00000)
    return out


def _to_elem(xp, get_function, defines, src, dst):
    """dst (16-bit) = src (float32), elementwise on the device."""
    n = int(src.size)
    if n:
        fn = get_function("prefill_mma_f32_to_elem", defines, 0)
        fn((min(-(-n // 256), 132 * 32),), (256,), (src, dst, np.int64(n)))


def _mma_tail(a):
    return (np.int32(a.h), np.int32(a.h_k), np.int32(a.total_q))


def _mma_rng(a):
    return (np.int32(a.causal), np.uint32(_seed(a)), np.uint32(_threshold(a)), np.float32(1.0 / (1.0 - a.dropout_p)))


def mma_forward(a, xp, get_function, max_smem: int):
    """prefill_mma_fwd: (out [total_q, h, d_v] in q's dtype, lse float32 [h, total_q])."""
    warps = mma_fwd_warps(a.d, a.d_v, max_smem)
    if warps is None:
        raise ValueError(f"prefill_mma_fwd does not fit {max_smem} B of shared memory for d {a.d}, d_v {a.d_v}")
    defines = mma_defines(a.q.dtype, a.d, a.d_v, warps)
    q, k, v = (_aligned(xp, x) for x in (a.q, a.k, a.v))
    out = _new(xp, (a.total_q, a.h, a.d_v), q.dtype)
    lse = _new(xp, (a.h, a.total_q), np.float32)
    if a.total_q == 0:
        return out, lse
    cu_q = xp.asarray(a.cu_q.astype(np.int32))
    cu_k = xp.asarray(a.cu_k.astype(np.int32))
    smem = mma_smem_bytes(a.d, a.d_v, warps)[0]
    fn = get_function("prefill_mma_fwd", defines, smem)
    scale_log2 = np.float32(a.softmax_scale * math.log2(math.e))
    grid = (max(1, -(-a.max_seqlen_q // (16 * warps))), a.h, a.b)
    args = (q, k, v, cu_q, cu_k, out, lse) + _mma_tail(a) + (scale_log2,) + _mma_rng(a)
    fn(grid, (32 * warps,), args, shared_mem=smem)
    return out, lse


def mma_backward(a, dout, out, lse, xp, get_function, max_smem: int):
    """prefill_mma_bwd_prep + prefill_mma_bwd (+ conversions): (dq, dk, dv) like q, k, v."""
    _, smem = mma_smem_bytes(a.d, a.d_v)
    if smem > max_smem:
        raise ValueError(f"prefill_mma_bwd needs {smem} B of shared memory, this GPU allows {max_smem}")
    defines = mma_defines(a.q.dtype, a.d, a.d_v, mma_fwd_warps(a.d, a.d_v, max_smem) or 4)
    q, k, v = (_aligned(xp, x) for x in (a.q, a.k, a.v))
    dout = _aligned(xp, dout, q.dtype)
    out = _aligned(xp, out, q.dtype)
    lse = _aligned(xp, lse, np.float32)
    group = a.h // a.h_k
    dq = _new(xp, q.shape, q.dtype)
    if group == 1:
        dk, dv = _new(xp, k.shape, q.dtype), _new(xp, v.shape, q.dtype)
        dk_acc = dv_acc = xp.zeros((2,), dtype=np.float32)  # unused
    else:
        dk, dv = _new(xp, k.shape, q.dtype), _new(xp, v.shape, q.dtype)
        dk_acc = xp.zeros(k.shape, dtype=np.float32)
        dv_acc = xp.zeros(v.shape, dtype=np.float32)
    dq_acc = xp.zeros(q.shape, dtype=np.float32)
    if a.total_k == 0:
        _to_elem(xp, get_function, defines, dq_acc, dq)
        return dq, dk, dv
    cu_q = xp.asarray(a.cu_q.astype(np.int32))
    cu_k = xp.asarray(a.cu_k.astype(np.int32))
    dr = _new(xp, (a.h, a.total_q), np.float32)
    if a.total_q:
        prep = get_function("prefill_mma_bwd_prep", defines, 0)
        prep((-(-(a.total_q * a.h) // 8),), (256,), (out, dout, dr, np.int32(a.total_q), np.int32(a.h)))
    fn = get_function("prefill_mma_bwd", defines, smem)
    grid = (max(1, -(-a.max_seqlen_k // _MMA_BN)), a.h, a.b)
    scale = np.float32(a.softmax_scale)
    scale_log2 = np.float32(a.softmax_scale * math.log2(math.e))
    args = (q, k, v, dout, lse, dr, cu_q, cu_k, dq_acc, dk, dv, dk_acc, dv_acc) + _mma_tail(a) + \
        (scale, scale_log2) + _mma_rng(a)
    fn(grid, (_MMA_BWD_THREADS,), args, shared_mem=smem)
    _to_elem(xp, get_function, defines, dq_acc, dq)
    if group > 1:
        _to_elem(xp, get_function, defines, dk_acc, dk)
        _to_elem(xp, get_function, defines, dv_acc, dv)
    return dq, dk, dv
