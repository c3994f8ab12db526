"""Tensor maps (CUtensorMap) for the Hopper bulk tensor copies (TMA) of the seesaw kernel's K pieces.

CuPy 14 does not expose ``cuTensorMapEncodeTiled``; the driver library (libcuda) does, so the map is encoded here
through ctypes and stored in device memory by ``kernels/mla_tensor_map.cu`` (a launch: capture-safe in CUDA
graphs). The seesaw kernel's TMA build (``MLA_SEESAW_TMA=1``) reads it from there (after a tensormap acquire fence).

The map describes a paged cache ``k_cache [num_blocks, page, h_kv, d]`` of 16-bit elements as a 3-D tensor
(channels d, KV heads h_kv, token rows num_blocks * page), innermost first, with strides d * 2 bytes (a head) and
h_kv * d * 2 bytes (a token row), and a box of (64 channels, 1 head, 64 rows) with the 128-byte swizzle: one copy
brings one 64 x 64 piece into shared memory exactly as the kernel's SW128 channel blocks lay it out. Rows or
channels outside the tensor are filled with zeros (the kernel aims out-of-range block-table entries there).
"""

from __future__ import annotations

import ctypes

import numpy as np

# cuda.h enums (CUDA 12 / 13)
_DTYPE_UINT16 = 1  # CU_TENSOR_MAP_DATA_TYPE_UINT16: the copy moves bits; bf16 and fp16 alike
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_NONE = 0  # zeros

BOX = (64, 1, 64)
"""Box of one copy: 64 channels (128 bytes, the swizzle span), one KV head, 64 token rows."""

_LIB = None


def _driver():
    global _LIB
    if _LIB is None:
        lib = ctypes.CDLL("libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                       ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64),
                       ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
                       ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        _LIB = lib
    return _LIB


def driver_reason() -> str | None:
    """Why tensor maps cannot be encoded here (None when they can): libcuda or its cuTensorMapEncodeTiled missing
    (a CPU-only machine, a driver older than CUDA 12)."""
    try:
        _driver()
    except (OSError, AttributeError) as exc:
        return f"cuTensorMapEncodeTiled unavailable ({exc})"
    return None


def kv_map_reason(address: int, num_blocks: int, page: int, h_kv: int, d: int) -> str | None:
    """Why a cache ``[num_blocks, page, h_kv, d]`` at ``address`` cannot be described by the map (None when it can):
    the copy's rules (16-byte aligned base; strides a multiple of 16 bytes, which d % 64 == 0 gives) and the
    kernel's (a 64-row box inside one page: page a multiple of 64; row coordinates in int32)."""
    if page % 64:
        return f"page size {page} is not a multiple of 64"
    if d % 64:
        return f"head dim {d} is not a multiple of 64"
    if address % 16:
        return "the cache's base address is not 16-byte aligned"
    if num_blocks * page > 2**31 - 1 - 64:
        return "more than 2^31 token rows"
    return None


def encode_kv_map(address: int, num_blocks: int, page: int, h_kv: int, d: int) -> np.ndarray:
    """The 128-byte CUtensorMap of the cache ``[num_blocks, page, h_kv, d]`` (16-bit elements) at ``address`` (a
    device pointer) as a uint64 [16] NumPy array."""
    reason = kv_map_reason(address, num_blocks, page, h_kv, d)
    if reason:
        raise ValueError(f"no tensor map for this cache: {reason}")
    out = np.zeros(16, dtype=np.uint64)
    dims = (ctypes.c_uint64 * 3)(d, h_kv, num_blocks * page)
    strides = (ctypes.c_uint64 * 2)(d * 2, h_kv * d * 2)
    box = (ctypes.c_uint32 * 3)(*BOX)
    elem = (ctypes.c_uint32 * 3)(1, 1, 1)
    res = _driver().cuTensorMapEncodeTiled(out.ctypes.data, _DTYPE_UINT16, 3, ctypes.c_void_p(address), dims, strides,
                                           box, elem, _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B,
                                           _OOB_FILL_NONE)
    if res != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {res}")
    return out


_CACHE: dict = {}
_CACHE_MAX = 32


def kv_map_device(cp, k_cache, dev: int):
    """The tensor map of ``k_cache`` (a C-contiguous CuPy array [num_blocks, page, h_kv, d] of 16-bit elements on
    device ``dev``) in device memory, a CuPy uint64 [16] array; encoded and stored once per (device, address,
    shape), the newest ``_CACHE_MAX`` kept."""
    from . import _nvrtc

    num_blocks, page, h_kv, d = (int(x) for x in k_cache.shape)
    key = (dev, int(k_cache.data.ptr), num_blocks, page, h_kv, d)
    arr = _CACHE.get(key)
    if arr is None:
        words = encode_kv_map(key[1], num_blocks, page, h_kv, d)
        arr = cp.empty(16, dtype=cp.uint64)
        fn = _nvrtc.load_function("mla_tensor_map.cu", "mla_tensor_map_store", {})
        fn((1,), (32,), (arr, *(np.uint64(w) for w in words)))
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = arr
    return arr
