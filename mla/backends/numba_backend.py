"""Numba CUDA backend: adapts arrays, launches ``mla.kernels.numba_decode`` (dense decode) or
``mla.kernels.numba_sparse_fp8`` (FP8 cache, sparse indices, attn_sink), returns the caller's kind.

- NumPy in -> copied to the device once, results copied back as NumPy.
- Device in (CuPy, or anything the API turned into CuPy) -> zero-copy; results are CuPy arrays.
- bfloat16 goes to the kernels as its uint16 bit pattern (widened in-register there).
- The plan (tile_scheduler_metadata, num_splits) from ``get_mla_metadata`` drives the splits:
  the partial buffers have ``b + num_workers`` rows (the scheduler's bound on the split count),
  so no device->host sync is needed to size them.

Version selection: env ``MLA_NUMBA_VERSION`` (1 ... 6; default: the fastest measured that supports
the shape: 5 for bf16/fp16 with d % 32 == 0 and d_v % 64 == 0, else 3, else 1; v6 is written but
not yet run on a GPU, so it is used only when asked for);
``MLA_NUMBA_BLOCK_N`` (16 or 32) picks the key tile of versions 2 and 3.
Compiled kernels, launch geometries and partial buffers are cached per shape, so repeated decode
steps pay one launch each for decode and combine. Numba's own launch costs ~25 us; wrapping CuPy
arrays costs more, which is why device arrays are wrapped once per call and nothing else is
converted. numba-cuda <= 0.30 needs ``numpy.row_stack`` (gone in NumPy 2.5): the kernel module
puts the alias back before the first compile (see its top).

FP8 cache, sparse (indices) mode and attn_sink go to ``mla.kernels.numba_sparse_fp8`` (one generic
kernel, v1 style; ``MLA_NUMBA_VERSION`` does not apply to it). Accepted: every q dtype the API accepts
(float32 / float16 / bfloat16) with the FP8 cache -- wider than the CuPy backend's bf16-only rule,
because this kernel dequantises to float32 and computes in float32 anyway; sparse and attn_sink with
float32 / float16 / bfloat16 caches, any d (up to what fits 48 KB of shared memory: d <= ~6000),
d_v, h_kv and page size. The FP8 cache is read as uint32 words (656 = 4 * 164 bytes a token), so a
non-C-contiguous FP8 cache is copied once per call.
"""

from __future__ import annotations

import os

import numpy as np

from .. import _arrays

__all__ = ["available", "supports", "decode", "selected_version"]

_KIND = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", _arrays.BFLOAT16: "bf16"}
FASTEST = 6
"""The version "auto" runs on tensor-core shapes: v6 measured 0.848 ms against v5's 1.013 ms on
b=128, s_q=1, h_q=16, s_k=8192 (H100, 2026-11-25; benchmarks/BENCHMARKS.md)."""


def _kernels():
    from ..kernels import numba_decode  # applies the numpy.row_stack shim before numba.cuda

    return numba_decode


_AVAILABLE = None


def available():
    """(ok, reason); checked once per process (the API asks on every call)."""
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = _check_available()
    return _AVAILABLE


def _check_available():
    try:
        nd = _kernels()
    except Exception as exc:  # numba / numba-cuda missing or broken
        return False, f"numba CUDA could not be imported: {exc}"
    from numba import cuda

    if nd.SIMULATOR:
        return True, ""
    try:
        if not cuda.is_available():
            return False, "numba.cuda sees no CUDA GPU (set NUMBA_ENABLE_CUDASIM=1 for the simulator)"
    except Exception as exc:
        return False, f"numba.cuda failed: {exc}"
    return True, ""


def supports(problem):
    """(True, "") for float32/float16/bfloat16 problems, dense or sparse, bf16/fp16/fp32 or FP8 cache,
    with or without attn_sink; else (False, the reason)."""
    if problem.q.dtype not in _KIND:
        return False, f"backend='numba' does not support dtype {problem.q.dtype}"
    if problem.out_float32:
        return False, "backend='numba' writes out in q's dtype only (out_dtype=float32: backend='cupy' or 'numpy')"
    if _uses_sparse_fp8(problem):
        from ..kernels import numba_sparse_fp8 as nsf

        if problem.is_fp8_kvcache and (problem.d != 576 or problem.head_dim_v != 512):
            return False, (f"backend='numba': the FP8 layout needs d = 576 and d_v = 512, got {problem.d}, "
                           f"{problem.head_dim_v}")
        if nsf.geometry(problem.d, problem.head_dim_v, problem.h_q // problem.h_kv) is None:
            return False, (f"backend='numba': d = {problem.d} is too large for the FP8/sparse kernel (a query "
                           f"row and a key row must fit {nsf.SMEM_LIMIT} bytes of shared memory)")
    return True, ""


def _uses_sparse_fp8(problem) -> bool:
    """FP8 cache, sparse indices or attn_sink: the numba_sparse_fp8 kernels, not numba_decode."""
    return bool(problem.is_fp8_kvcache or problem.is_sparse or problem.attn_sink is not None)


def selected_version(problem, kind=None) -> int:
    """The kernel version for this problem: MLA_NUMBA_VERSION if set, else the fastest that fits."""
    nd = _kernels()
    kind = kind or _KIND[problem.q.dtype]
    env = os.environ.get("MLA_NUMBA_VERSION")
    if env:
        version = int(env)
        if version not in nd.VERSIONS:
            raise ValueError(f"MLA_NUMBA_VERSION must be one of {nd.VERSIONS}, got {env!r}")
        if version in nd.TENSOR_CORE_VERSIONS and not _v4_ok(problem, kind, nd, version):
            version = 4 if _v4_ok(problem, kind, nd, 4) else 3
        if version > 1 and not _tiled_ok(problem, kind, nd):
            return 1
        return version
    if nd.SIMULATOR or not _tiled_ok(problem, kind, nd):
        return 1
    for version in (FASTEST, 4):  # v5/v6 need d_v % 128 == 0, v4 d_v % 64 == 0
        if _v4_ok(problem, kind, nd, version):
            return version
    return 3


def _v4_ok(problem, kind, nd, version=4):
    """The tensor-core versions copy 16-byte chunks of q and the cache with cp.async; each of
    their warps owns d_v / warps output channels (``numba_decode.v4_supported``)."""
    return (nd.v4_supported(problem.d, problem.head_dim_v, kind, nd.version_warps(version))
            and _tiled_ok(problem, kind, nd))


def _tiled_ok(problem, kind, nd):
    """Tiled versions read the cache in 16-byte chunks: C-contiguous, 16-byte aligned rows."""
    if not nd.tiled_supported(problem.d, problem.head_dim_v, kind):
        return False
    k = problem.k_cache
    if problem.on_device:
        return bool(k.flags.c_contiguous) and k.data.ptr % 16 == 0
    return True


POISON_OUTPUTS = False
"""Test hook: fill out, lse and the partial buffers with NaN before every launch, so that any
element a kernel fails to write shows up as NaN (also under the simulator for the FP8/sparse path)."""

_LAUNCHES: dict = {}
_BUFFERS: dict = {}


def _launches(version, kind, problem, num_workers, nd):
    key = (version, kind, problem.s_q, problem.h_q, problem.h_kv, problem.d, problem.head_dim_v,
           problem.page_block_size, num_workers, problem.b, nd.default_block_n())
    got = _LAUNCHES.get(key)
    if got is None:
        dec = nd.DecodeLaunch(version, kind, problem.s_q, problem.h_q, problem.h_kv, problem.d,
                              problem.head_dim_v, problem.page_block_size, num_workers)
        comb = nd.CombineLaunch(kind, problem.b, problem.s_q, problem.h_q)
        got = _LAUNCHES[key] = (dec, comb)
    return got


def _partials(cuda, rows, s_q, h_q, d_v):
    """Reusable partial buffers (o f32 [rows, s_q, h_q, d_v], lse f32 [rows, s_q, h_q])."""
    key = (rows, s_q, h_q, d_v)
    got = _BUFFERS.get(key)
    if got is None:
        got = _BUFFERS[key] = (cuda.device_array((rows, s_q, h_q, d_v), np.float32),
                               cuda.device_array((rows, s_q, h_q), np.float32))
    return got


def _bits(x):
    """bf16 arrays as their uint16 bits (same memory)."""
    return x.view(np.uint16) if x.dtype == _arrays.BFLOAT16 else x


_VIEWS: dict = {}
_VIEWS_MAX = 256


def _device_views(cp, cuda, arrays):
    """Numba views of CuPy arrays (None stays None), for a launch on CuPy's current stream.

    * No stream sync: Numba would otherwise synchronise the stream each array names in its
      ``__cuda_array_interface__`` before viewing it. The kernels are launched on that same current
      stream, so stream order already makes them wait for the writers of their inputs; the syncs only
      stalled the host (one per array, every call) and are illegal while a CUDA graph is captured.
    * Cached: a view is only (pointer, shape, strides, dtype), so one is made per such key and reused
      (a decode loop passes the same cache, block table and plan every step). Views hold no
      reference to their array (owner=None): a freed array's cached view is reused only by an
      array with the same pointer and layout, which it then describes exactly.
    * During a capture the arrays are kept alive for the graph's replays (keep_alive_if_capturing)."""
    from .cupy_backend import keep_alive_if_capturing

    keep_alive_if_capturing(cp, [a for a in arrays if a is not None])
    views = []
    for a in arrays:
        if a is None:
            views.append(None)
            continue
        key = (a.data.ptr, a.shape, a.strides, a.dtype.str)
        view = _VIEWS.get(key)
        if view is None:
            if len(_VIEWS) >= _VIEWS_MAX:
                _VIEWS.clear()
            view = _VIEWS[key] = cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=None, sync=False)
        views.append(view)
    return views


def _results(problem, out, lse, out_dev, lse_dev):
    """(out, lse) in the caller's kind: the CuPy arrays for device inputs, host copies (bf16 restored
    from its uint16 bits) for NumPy inputs."""
    if problem.on_device:
        return out, lse
    out_host = out_dev.copy_to_host()
    if problem.q.dtype == _arrays.BFLOAT16:
        out_host = out_host.view(_arrays.BFLOAT16)
    return out_host, lse_dev.copy_to_host()


def decode(problem, metadata, num_splits):
    """Launch decode + combine. Returns (out [b, s_q, h_q, d_v] in q's dtype, lse f32 [b, h_q, s_q])
    of the caller's array kind."""
    if _uses_sparse_fp8(problem):
        return _decode_sparse_fp8(problem, metadata, num_splits)
    nd = _kernels()
    from numba import cuda

    kind = _KIND[problem.q.dtype]
    version = selected_version(problem, kind)
    num_workers = int(metadata.shape[0])
    b, s_q, h_q, d_v = problem.b, problem.s_q, problem.h_q, problem.head_dim_v
    dec, comb = _launches(version, kind, problem, num_workers, nd)

    if problem.on_device:
        cp = _arrays.cupy_module()
        stream_ptr = cp.cuda.get_current_stream().ptr
        stream = cuda.external_stream(stream_ptr) if stream_ptr else 0
        out = cp.empty((b, s_q, h_q, d_v), dtype=problem.q.dtype)
        lse = cp.empty((b, h_q, s_q), dtype=np.float32)
        k_bits = _bits(problem.k_cache)
        q_bits = _bits(problem.q)
        if version in nd.TENSOR_CORE_VERSIONS and (not q_bits.flags.c_contiguous or q_bits.data.ptr % 16):
            q_bits = cp.ascontiguousarray(q_bits)  # cp.async reads 16-byte chunks of q rows
        *arrays, out_dev, lse_dev = _device_views(cp, cuda, [
            q_bits, k_bits, k_bits.reshape(-1).view(np.uint32) if version in (2, 3) else None,
            problem.block_table, problem.cache_seqlens, metadata, num_splits, _bits(out), lse])
    else:
        stream = 0
        k_bits = np.ascontiguousarray(_bits(problem.k_cache))
        host = [np.ascontiguousarray(_bits(problem.q)), k_bits, None,
                np.ascontiguousarray(problem.block_table), np.ascontiguousarray(problem.cache_seqlens),
                np.ascontiguousarray(metadata), np.ascontiguousarray(num_splits)]
        arrays = [None if a is None else cuda.to_device(a) for a in host]
        if version in (2, 3):
            arrays[2] = arrays[1].reshape(k_bits.size).view(np.uint32)
        out = lse = None  # results are copied back from out_dev / lse_dev
        out_dev = cuda.device_array((b, s_q, h_q, d_v), _bits(np.empty(0, problem.q.dtype)).dtype)
        lse_dev = cuda.device_array((b, h_q, s_q), np.float32)

    o_part, lse_part = _partials(cuda, b + num_workers, s_q, h_q, d_v)
    if POISON_OUTPUTS and not nd.SIMULATOR:
        cp = _arrays.cupy_module()
        for x in (o_part, lse_part, out_dev, lse_dev):
            view = cp.asarray(x)
            if view.dtype == np.uint16:
                view.fill(0x7FC0)  # a bf16 NaN
            else:
                view.fill(np.nan)
    dec(*arrays, o_part, lse_part, problem.softmax_scale, problem.causal, stream=stream)
    comb(o_part, lse_part, arrays[6], out_dev, lse_dev, stream=stream)

    return _results(problem, out, lse, out_dev, lse_dev)


# ----------------------------------------------------------------------------------------------
# FP8 cache / sparse indices / attn_sink: mla.kernels.numba_sparse_fp8

_SF_LAUNCHES: dict = {}
_DEVICE_CONSTANTS: dict = {}


def _sf_launches(problem, kind, num_workers, has_tl, has_sink):
    from ..kernels import numba_sparse_fp8 as nsf

    key = (kind, problem.is_fp8_kvcache, problem.is_sparse, has_tl, has_sink, problem.b, problem.s_q, problem.h_q,
           problem.h_kv, problem.d, problem.head_dim_v, num_workers)
    got = _SF_LAUNCHES.get(key)
    if got is None:
        dec = nsf.SparseFP8Launch(kind, problem.is_fp8_kvcache, problem.is_sparse, has_tl, problem.s_q, problem.h_q,
                                  problem.h_kv, problem.d, problem.head_dim_v, num_workers)
        comb = nsf.SinkCombineLaunch(kind, has_sink, problem.b, problem.s_q, problem.h_q)
        got = _SF_LAUNCHES[key] = (dec, comb)
    return got


def _fp8_words(xp, k_cache):
    """The FP8 cache (uint8 [..., 656]) as uint32 words [..., 164], same memory when C-contiguous."""
    if not k_cache.flags.c_contiguous:
        k_cache = xp.ascontiguousarray(k_cache)
    return k_cache.view(np.uint32)


def _plan_lengths(xp, problem):
    """What the plan split: cache_seqlens (dense) or topk for every sequence (sparse)."""
    if not problem.is_sparse:
        return problem.cache_seqlens
    topk = int(problem.indices.shape[-1])
    if xp is np:
        return np.full(problem.b, topk, dtype=np.int32)
    key = ("lens", _arrays.device_id(problem.q), problem.b, topk)
    got = _DEVICE_CONSTANTS.get(key)
    if got is None:
        got = _DEVICE_CONSTANTS[key] = xp.full(problem.b, topk, dtype=np.int32)
    return got


def _placeholder(xp, problem, ndim, dtype=np.int32):
    """A 1-element array standing in for an argument the kernel's mode never reads."""
    if xp is np:
        return np.zeros((1,) * ndim, dtype=dtype)
    key = ("dummy", _arrays.device_id(problem.q), ndim, np.dtype(dtype).str)
    got = _DEVICE_CONSTANTS.get(key)
    if got is None:
        got = _DEVICE_CONSTANTS[key] = xp.zeros((1,) * ndim, dtype=dtype)
    return got


def _poison(cuda, arrays, simulator):
    """Fill device arrays with NaN (bf16 bits: 0x7FC0) before a launch (POISON_OUTPUTS)."""
    for x in arrays:
        if simulator:
            fill = np.full(x.shape, 0x7FC0 if x.dtype == np.uint16 else np.nan, dtype=x.dtype)
            x.copy_to_device(fill)
            continue
        view = _arrays.cupy_module().asarray(x)
        if view.dtype == np.uint16:
            view.fill(0x7FC0)
        else:
            view.fill(np.nan)


def _decode_sparse_fp8(problem, metadata, num_splits):
    """FP8 / sparse / attn_sink decode + combine. Returns (out, lse) of the caller's array kind."""
    from numba import cuda

    from ..kernels import numba_sparse_fp8 as nsf

    kind = _KIND[problem.q.dtype]
    b, s_q, h_q, d_v = problem.b, problem.s_q, problem.h_q, problem.head_dim_v
    num_workers = int(metadata.shape[0])
    has_tl = problem.topk_length is not None
    has_sink = problem.attn_sink is not None
    dec, comb = _sf_launches(problem, kind, num_workers, has_tl, has_sink)

    xp = _arrays.cupy_module() if problem.on_device else np
    k = _fp8_words(xp, problem.k_cache) if problem.is_fp8_kvcache else _bits(problem.k_cache)
    named = dict(
        q=_bits(problem.q),
        k=k,
        block_table=problem.block_table if not problem.is_sparse else _placeholder(xp, problem, 2),
        seqlens=problem.cache_seqlens if not problem.is_sparse else _placeholder(xp, problem, 1),
        plan_lens=_plan_lengths(xp, problem),
        indices=problem.indices if problem.is_sparse else _placeholder(xp, problem, 3),
        topk_length=problem.topk_length if has_tl else _placeholder(xp, problem, 1),
        metadata=metadata,
        num_splits=num_splits,
        sink=problem.attn_sink if has_sink else _placeholder(xp, problem, 1, np.float32),
    )
    if problem.on_device:
        cp = xp
        stream_ptr = cp.cuda.get_current_stream().ptr
        stream = cuda.external_stream(stream_ptr) if stream_ptr else 0
        out = cp.empty((b, s_q, h_q, d_v), dtype=problem.q.dtype)
        lse = cp.empty((b, h_q, s_q), dtype=np.float32)
        *views, out_dev, lse_dev = _device_views(cp, cuda, [*named.values(), _bits(out), lse])
        dev = dict(zip(named, views))
    else:
        stream = 0
        out = lse = None  # results are copied back from out_dev / lse_dev
        dev = {name: cuda.to_device(np.ascontiguousarray(a)) for name, a in named.items()}
        out_dev = cuda.device_array((b, s_q, h_q, d_v), _bits(np.empty(0, problem.q.dtype)).dtype)
        lse_dev = cuda.device_array((b, h_q, s_q), np.float32)

    o_part, lse_part = _partials(cuda, b + num_workers, s_q, h_q, d_v)
    if POISON_OUTPUTS:
        _poison(cuda, (o_part, lse_part, out_dev, lse_dev), nsf.SIMULATOR)
    dec(dev["q"], dev["k"], dev["block_table"], dev["seqlens"], dev["plan_lens"], dev["indices"],
        dev["topk_length"], dev["metadata"], dev["num_splits"], o_part, lse_part, problem.softmax_scale,
        problem.causal, stream=stream)
    comb(o_part, lse_part, dev["num_splits"], dev["sink"], out_dev, lse_dev, stream=stream)

    return _results(problem, out, lse, out_dev, lse_dev)
