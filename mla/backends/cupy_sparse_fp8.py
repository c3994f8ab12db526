"""CuPy kernels for the FP8 KV cache and token-level sparse (DSA) decode (issue #5).

These kernels compile (NVRTC, sm_90a and sm_80, no spills; ``tests/test_cupy_compile.py``) and were
verified on an H100 on 2026-11-25: ``tests/test_cupy_fp8_sparse_gpu.py`` 95 passed, and its two
compute-sanitizer tests (memcheck, racecheck) passed. ``backend="cupy"`` (and "auto" for device arrays)
takes FP8 and sparse problems they compute; ``supports`` says why it declines the others.

Kernels (on an H100-class GPU the Hopper kernels of ``mla.backends.cupy_hopper`` take over where they
were measured faster: dense FP8 -> their FP8 builds (``cupy_hopper.fp8_variant``), sparse with h_q / h_kv a
multiple of 64 -> the wide kernel's sparse build ``mla_decode_hopper_sparse`` (``cupy_hopper.sparse_ok``),
launched here with the same arguments; ``MLA_CUPY_FP8_KERNEL`` / ``MLA_CUPY_SPARSE_KERNEL`` force a choice):

* ``kernels/mla_decode_fp8.cu`` (``mla_decode_fp8``): dense decode of the 656-byte FP8 cache
  (``mla.fp8``): raw tokens to shared memory with cp.async, dequantised there to bf16, then the
  portable kernel's mma.sync math. Same plan / partial semantics as ``mla_decode_portable``;
  partials are merged by ``kernels/mla_combine.cu``. q must be bfloat16 (as in FlashMLA).
* ``kernels/mla_decode_sparse.cu`` (``mla_decode_sparse`` + ``mla_combine_sink``): sparse decode
  over ``indices [b, s_q, topk]`` (physical token positions, -1 invalid; optional ``topk_length``
  and ``attn_sink``), bf16/fp16 or FP8 cache. The plan splits the index list (0..topk). With
  ``attn_sink`` every piece is written as a partial and the combine applies the sink.

``cupy_backend.supports`` / ``cupy_backend.decode`` route FP8 and sparse problems here.
"""

from __future__ import annotations

import os

import numpy as np

from .. import _arrays
from . import _nvrtc
from . import cupy_backend as _cb

FP8_TOKEN_BYTES = 656

_FP8_CANDIDATES = ((8, 64, 3), (8, 64, 2), (8, 32, 3), (8, 32, 2), (4, 32, 3), (4, 32, 2), (8, 16, 2), (4, 16, 2))
"""(warps, BLOCK_N, raw STAGES) in order of preference for FP8 caches (not measured yet: the
raw tiles are 57% of a bf16 tile, so a third stage fits for the 16-row tiling on an H100)."""
_BF16_CANDIDATES = ((8, 64, 2), (8, 32, 2), (4, 64, 2), (4, 32, 2), (8, 16, 2), (4, 16, 2))
"""The portable kernel's measured order (benchmarks/NOTES_cupy.md), for sparse bf16/fp16 caches."""


def smem_bytes(d: int, dv: int, block_m: int, block_n: int, warps: int, stages: int, fp8: bool,
               sparse: bool) -> int:
    """Dynamic shared memory of mla_decode_fp8 / mla_decode_sparse (mirrors the kernel header)."""
    cg = warps // (block_m // 16)
    kstride = max(_cb._round_up(d, 16), _cb._round_up(dv, 16 * cg)) + 8
    total = 2 * kstride * (block_m + (1 if fp8 else stages) * block_n) + 4 * block_m * (block_n + 8)
    if fp8:
        total += stages * block_n * FP8_TOKEN_BYTES
    if sparse:
        total += 4 * stages * block_n
    return total


def config(d: int, dv: int, rows: int, max_smem: int, fp8: bool, sparse: bool, max_block_m: int = 64):
    """(block_m, warps, block_n, stages) for ``rows`` query rows a CTA (dense: s_q * h_q / h_kv;
    sparse: h_q / h_kv, one query row each), or None if no tiling fits ``max_smem``."""
    preferred = 16 if rows <= 16 else 32 if rows <= 32 else 64
    preferred = min(preferred, max_block_m)
    forced = os.environ.get("MLA_CUPY_FP8_CONFIG" if fp8 else "MLA_CUPY_SPARSE_CONFIG")  # benchmarks
    candidates = [tuple(int(x) for x in forced.split(","))] if forced else (
        _FP8_CANDIDATES if fp8 else _BF16_CANDIDATES)
    for block_m in (64, 32, 16):
        if block_m > preferred:
            continue
        for warps, block_n, stages in candidates:
            rg = block_m // 16
            if warps % rg or stages < 2:
                continue
            cg = warps // rg
            if block_n % 16 or block_n % (8 * cg) or block_n % (2 * warps):
                continue
            if _cb._round_up(dv, 16 * cg) // (8 * cg) > 32:
                continue
            if smem_bytes(d, dv, block_m, block_n, warps, stages, fp8, sparse) <= max_smem:
                return block_m, warps, block_n, stages
    return None


def _max_block_m(sparse: bool, major: int) -> int:
    # The 64-row sparse tiling compiles with an 8-byte spill for sm_80 (clean for sm_90a); use 32 rows there.
    return 32 if sparse and major < 9 else 64


def _rows(problem) -> int:
    group = problem.h_q // problem.h_kv
    return group if problem.is_sparse else problem.s_q * group


def _what(problem) -> str:
    if problem.is_sparse:
        return "sparse (indices) decode" + (" with an FP8 cache" if problem.is_fp8_kvcache else "")
    return "FP8 KV cache decode"


def supports(problem):
    """(True, "") if these kernels compute this FP8 and/or sparse problem, else (False, the reason)."""
    dt = np.dtype(problem.q.dtype)
    if problem.is_fp8_kvcache:
        if dt != _arrays.BFLOAT16:
            return False, (f"backend='cupy' decodes the FP8 KV cache with bfloat16 q only, got "
                           f"{_arrays.dtype_name(dt)} (FP8's RoPE part is bfloat16; use backend='numpy')")
        if problem.d != 576 or problem.head_dim_v != 512:
            return False, f"the FP8 layout needs d = 576, d_v = 512, got {problem.d}, {problem.head_dim_v}"
    else:
        if dt not in (np.dtype(np.float16), _arrays.BFLOAT16):
            return False, (f"backend='cupy' computes bfloat16 and float16 only, got {_arrays.dtype_name(dt)} "
                           "(use backend='numba' or 'numpy' for float32)")
        if problem.d % 8:
            return False, f"backend='cupy' needs d % 8 == 0 (16-byte rows), got d = {problem.d}"
    reason = _cb._layout_reason(problem)
    if reason:
        return False, reason
    try:
        dev = _cb._device_id(problem)
        major, minor = _cb._capability(dev)
        smem = _cb._max_smem(dev)
    except Exception as exc:
        return False, f"cannot query the GPU: {exc}"
    if major < 8:
        return False, f"backend='cupy' needs compute capability >= 8.0, got {major}.{minor} on device {dev}"
    cfg = config(problem.d, problem.head_dim_v, _rows(problem), smem, problem.is_fp8_kvcache, problem.is_sparse,
                 _max_block_m(problem.is_sparse, major))
    if cfg is None:
        return False, (f"backend='cupy': no tiling of the {_what(problem)} kernel for d = {problem.d}, "
                       f"d_v = {problem.head_dim_v} fits {smem} bytes of shared memory")
    return True, ""


def supports_fp8(problem):
    """``supports`` for a dense FP8 problem (the name the issue asks for)."""
    return supports(problem)


def supports_sparse(problem):
    """``supports`` for a sparse problem, bf16/fp16 or FP8 cache."""
    return supports(problem)


def decode(problem, metadata, num_splits):
    """Run the FP8 or sparse decode. Returns (out, lse) of the inputs' kind."""
    cp = _arrays.cupy_module()
    dev = _cb._device_id(problem)
    with cp.cuda.Device(dev):
        launches, out, lse = prepare(problem, metadata, num_splits, dev)
        _cb.run_launches(cp, launches)
        if problem.on_device:
            return out, lse
        out_h = out.get()
        if out_h.dtype == np.uint16:
            out_h = out_h.view(np.dtype(problem.q.dtype))
        return out_h, lse.get()


def decode_fp8(problem, metadata, num_splits):
    """Dense decode of an FP8 cache (``problem.is_fp8_kvcache`` and not sparse)."""
    if problem.is_sparse or not problem.is_fp8_kvcache:
        raise ValueError("decode_fp8 needs a dense problem with is_fp8_kvcache=True")
    return decode(problem, metadata, num_splits)


def decode_sparse(problem, metadata, num_splits):
    """Sparse decode (``problem.indices`` given), bf16/fp16 or FP8 cache."""
    if not problem.is_sparse:
        raise ValueError("decode_sparse needs indices (sparse mode)")
    return decode(problem, metadata, num_splits)


_NULL = np.uint64(0)  # a null pointer kernel argument


def prepare(problem, metadata, num_splits, dev):
    """Device arrays, outputs and the launch list [(fn, grid, block, args, smem)] (for ``decode``, and
    for benchmarks and tests that call it directly)."""
    cp = _arrays.cupy_module()
    from . import cupy_hopper

    hopper = cupy_hopper.fp8_variant(problem, dev)  # dense FP8 on an H100-class GPU: a Hopper kernel's FP8 build
    if hopper is not None:
        return cupy_hopper.prepare(cp, problem, metadata, num_splits, dev, hopper)
    b, s_q, h_q, d = problem.b, problem.s_q, problem.h_q, problem.d
    h_kv, dv = problem.h_kv, problem.head_dim_v
    fp8, sparse = bool(problem.is_fp8_kvcache), bool(problem.is_sparse)
    group = h_q // h_kv
    major, _ = _cb._capability(dev)
    cfg = config(d, dv, _rows(problem), _cb._max_smem(dev), fp8, sparse, _max_block_m(sparse, major))
    if cfg is None:
        raise ValueError(f"backend='cupy': no tiling for the {_what(problem)} kernel with d = {d}, d_v = {dv}")
    block_m, warps, block_n, stages = cfg
    fp16 = np.dtype(problem.q.dtype) == np.float16
    name = "mla_decode_sparse.cu" if sparse else "mla_decode_fp8.cu"
    defines = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n, "MLA_NWARPS": warps,
               "MLA_STAGES": stages, "MLA_FP16": int(fp16), "MLA_FP8": int(fp8)}
    if sparse and cupy_hopper.sparse_ok(problem, dev):  # the wide Hopper kernel's sparse build, same arguments
        block_m, warps = cupy_hopper.BLOCK_M, cupy_hopper.THREADS // 32
        hdefs = {**cupy_hopper.defines(fp16), "MLA_FP8": int(fp8), "MLA_SPARSE": 1}
        fn = _nvrtc.load_function(cupy_hopper.SOURCE, "mla_decode_hopper_sparse", hdefs, arch=cupy_hopper.ARCH)
        smem = cupy_hopper.wide_smem_bytes(fp8, sparse=True)
    else:
        fn = _nvrtc.load_function(name, "mla_decode_sparse" if sparse else "mla_decode_fp8", defines)
        smem = smem_bytes(d, dv, block_m, block_n, warps, stages, fp8, sparse)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem

    q = _cb._to_device(cp, problem.q)
    k_cache = _cb._to_device(cp, problem.k_cache)
    sched = _cb._to_device(cp, metadata, np.int32)
    splits = _cb._to_device(cp, num_splits, np.int32)
    num_workers = int(sched.shape[0])
    host_plan = isinstance(num_splits, np.ndarray)
    total = int(num_splits[-1]) if host_plan else b + num_workers
    sink = None
    if sparse:
        indices = _cb._to_device(cp, problem.indices, np.int32)
        topk = int(indices.shape[-1])
        topk_length = _NULL if problem.topk_length is None else _cb._to_device(cp, problem.topk_length, np.int32)
        if problem.attn_sink is not None:
            sink = _cb._to_device(cp, problem.attn_sink, np.float32)
        num_tokens = min(problem.num_blocks * problem.page_block_size, 2**31 - 1)
        block_table, bt_stride, seqlens = _NULL, 0, _NULL
        grid = (num_workers, h_kv, s_q * -(-group // block_m))
    else:
        indices, topk, topk_length, num_tokens = _NULL, 0, _NULL, 0
        block_table = _cb._to_device(cp, problem.block_table, np.int32)
        bt_stride = int(block_table.shape[1])
        seqlens = _cb._to_device(cp, problem.cache_seqlens, np.int32)
        grid = (num_workers, h_kv, -(-(s_q * group) // block_m))
    out_f32 = problem.out_float32  # dense only (the API rejects it with indices)
    force_partials = sink is not None or out_f32
    needs_combine = (not host_plan) or total > b or force_partials
    out, lse, o_part, lse_part = _cb.allocate_outputs(cp, problem, q.dtype, total, out_f32, _cb.POISON_OUTPUTS)

    scale_log2 = np.float32(problem.softmax_scale * np.log2(np.e))
    args = (q, k_cache, block_table, np.int32(bt_stride), seqlens, indices, np.int32(topk), topk_length,
            np.int32(num_tokens), np.int32(force_partials), sched, splits, o_part, lse_part, out, lse,
            np.int32(s_q), np.int32(h_q), np.int32(h_kv), np.int32(problem.page_block_size), scale_log2,
            np.int32(bool(problem.causal)))
    launches = [(fn, grid, (warps * 32,), args, smem)]
    if needs_combine:
        comb_grid = (-(-(s_q * h_q) // 4), b)
        if sparse:
            comb = _nvrtc.load_function(name, "mla_combine_sink", defines)
            launches.append((comb, comb_grid, (128,), (o_part, lse_part, splits, _NULL if sink is None else sink,
                                                       out, lse, np.int32(s_q), np.int32(h_q),
                                                       np.int32(force_partials)), 0))
        else:  # mla_combine.cu: combine_parts(dv, rows) warps a row (grid z)
            comb = _cb.combine_function(dv, fp16, out_f32, b * s_q * h_q)
            launches.append((comb, comb_grid + (_cb.combine_parts(dv, b * s_q * h_q),), (128,),
                             (o_part, lse_part, splits, out, lse, np.int32(s_q), np.int32(h_q),
                              np.int32(force_partials)), 0))
    return launches, out, lse


def compile_variants(arch: str, max_smems) -> dict[str, list[dict]]:
    """{source: [-D dicts]} the backend picks on ``arch`` ("sm_90a", "sm_80", ...) for DeepSeek shapes
    (h_q 16 / 32 / 128) and a small generic bf16 shape, for each shared-memory size in ``max_smems``
    (for ``tests/test_cupy_compile.py``)."""
    major = int(arch[3:].rstrip("a")) // 10
    result: dict[str, list[dict]] = {"mla_decode_fp8.cu": [], "mla_decode_sparse.cu": []}
    shapes = [(576, 512, True, 0), (576, 512, False, 0), (576, 512, False, 1), (64, 48, False, 0)]
    for smem in max_smems:
        for d, dv, fp8, fp16 in shapes:
            for sparse in (False, True) if fp8 else (True,):
                for rows in (16, 32, 128) if d == 576 else (8,):
                    cfg = config(d, dv, rows, smem, fp8, sparse, _max_block_m(sparse, major))
                    if cfg is None:
                        continue
                    block_m, warps, block_n, stages = cfg
                    defines = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n,
                               "MLA_NWARPS": warps, "MLA_STAGES": stages, "MLA_FP16": fp16, "MLA_FP8": int(fp8)}
                    lst = result["mla_decode_sparse.cu" if sparse else "mla_decode_fp8.cu"]
                    if defines not in lst:
                        lst.append(defines)
    return result
