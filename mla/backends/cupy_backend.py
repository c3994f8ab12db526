"""CuPy RawKernel backend: CUDA C++ kernels from ``kernels/`` compiled at run time by NVRTC.

Kernels (``MLA_CUPY_KERNEL`` or ``decode(..., kernel=)`` forces one; default "auto"):

* ``portable`` -- ``kernels/mla_decode_portable.cu``: mma.sync m16n8k16 + cp.async, any
  D % 8 == 0, d_v <= D, page size and h_kv; sm_80 and newer. Writes split-KV partials per the
  scheduler plan (``mla.scheduler``); ``kernels/mla_combine.cu`` merges them.
* ``hopper`` -- the wgmma kernels of ``mla.backends.cupy_hopper`` for d = 576, d_v = 512 on compute
  capability 9.0 (``kernels/mla_decode_hopper_narrow.cu`` up to 32 query rows a KV head,
  ``kernels/mla_decode_hopper.cu`` above), same plan / partials / combine; problems they do not take
  (other d / d_v / dtype, other GPUs) run on the portable kernel.
* ``auto`` (default) -- the same choice as ``hopper`` (on an H100-class GPU a Hopper kernel was measured
  faster than the portable kernel at every row count, benchmarks/BENCHMARKS.md), else the portable kernel.

Arrays: device inputs (CuPy or anything CUDA-array-like, as ``mla.api`` converted them) give
CuPy outputs on the inputs' device; NumPy inputs are copied to the current device and the
results copied back. Computation is bf16/fp16 in, fp32 accumulate (float32 problems are declined
by ``supports`` so that "auto" falls back to another backend). FP8-cache and sparse (indices)
problems go to ``mla.backends.cupy_sparse_fp8`` (issue #5; verified on an H100 on 2026-11-25).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .. import _arrays
from . import _nvrtc

KERNELS = ("auto", "portable", "hopper")

POISON_OUTPUTS = False
"""Tests set this to fill every output / partial buffer with NaN before the launch."""

_GRAPH_KEEPALIVE: list = []
"""Device arrays used by launches recorded into a CUDA graph (partials, plans, converted inputs).
CuPy's memory pool would hand their memory to new arrays once Python drops them, while a replay
of the graph still writes there; so arrays touched during a stream capture live until
``release_graph_buffers()`` (call it once the graphs are destroyed)."""


def _capturing(cp) -> bool:
    try:
        return bool(cp.cuda.get_current_stream().is_capturing())
    except Exception:  # an older CuPy without is_capturing: no capture support either
        return False


def keep_alive_if_capturing(cp, arrays) -> None:
    """During a CUDA-graph capture, keep the CuPy arrays among ``arrays`` alive (see _GRAPH_KEEPALIVE)."""
    if _capturing(cp):
        _GRAPH_KEEPALIVE.extend(a for a in arrays if isinstance(a, cp.ndarray))


def release_graph_buffers() -> int:
    """Drop the buffers kept for captured graphs (after the graphs are gone). Returns how many."""
    n = len(_GRAPH_KEEPALIVE)
    _GRAPH_KEEPALIVE.clear()
    return n


def run_launches(cp, launches) -> None:
    """Launch [(fn, grid, block, args, smem)] on the current stream (capture-safe: see _GRAPH_KEEPALIVE)."""
    for fn, grid, block, args, smem in launches:
        keep_alive_if_capturing(cp, args)
        fn(grid, block, args, shared_mem=smem)

_PORTABLE_CANDIDATES = ((8, 64, 2), (8, 32, 2), (4, 64, 2), (4, 32, 2), (8, 16, 2), (4, 16, 2))
"""(warps, BLOCK_N, STAGES) in order of preference; the first that compiles to a valid tiling and
fits the device's shared memory is used. Measured on the H100 (benchmarks/NOTES_cupy.md): 8 warps
and 64-key tiles beat 4 warps or deeper pipelines of 32-key tiles on every DeepSeek shape."""


def available():
    """(True, "") when CuPy sees a CUDA GPU, else (False, the reason)."""
    cp = _arrays.cupy_module()
    if cp is None:
        return False, "CuPy is not installed (pip install cupy-cuda13x or cupy-cuda12x)"
    if not _arrays.gpu_available():
        return False, "no CUDA GPU is visible"
    try:
        major, minor = _capability(cp.cuda.Device().id)
    except Exception as exc:  # pragma: no cover - broken driver
        return False, f"cannot query the GPU: {exc}"
    if major < 8:
        return False, f"the CuPy kernels need compute capability >= 8.0 (mma.sync bf16), got {major}.{minor}"
    return True, ""


def _capability(device_id: int) -> tuple[int, int]:
    cp = _arrays.cupy_module()
    cc = cp.cuda.Device(device_id).compute_capability
    return int(cc[:-1]), int(cc[-1])


@functools.cache
def _device_attributes(device_id: int) -> dict:
    """CuPy's attribute dict of device ``device_id``, read once: building it queries every attribute, and the launch
    path asks for some on every call."""
    return dict(_arrays.cupy_module().cuda.Device(device_id).attributes)


def _max_smem(device_id: int) -> int:
    return int(_device_attributes(device_id)["MaxSharedMemoryPerBlockOptin"])


def _num_sms(device_id: int) -> int:
    return int(_device_attributes(device_id)["MultiProcessorCount"])


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def portable_smem_bytes(d: int, dv: int, block_m: int, block_n: int, warps: int, stages: int) -> int:
    """Dynamic shared memory of mla_decode_portable (mirrors the formula in its header)."""
    cg = warps // (block_m // 16)
    kstride = max(_round_up(d, 16), _round_up(dv, 16 * cg)) + 8
    return 2 * kstride * (block_m + stages * block_n) + 4 * block_m * (block_n + 8)


def portable_config(d: int, dv: int, rows: int, max_smem: int):
    """(block_m, warps, block_n, stages) for M = ``rows`` query rows per KV head, or None.

    BLOCK_M is the smallest of 16/32/64 that holds the rows (64 for more, as the scheduler
    assumes); smaller ones are tried when it does not fit the shared memory (e.g. on Ada).
    """
    preferred = 16 if rows <= 16 else 32 if rows <= 32 else 64
    forced = os.environ.get("MLA_CUPY_PORTABLE_CONFIG")  # "warps,block_n,stages" (benchmarks)
    candidates = [tuple(int(x) for x in forced.split(","))] if forced else _PORTABLE_CANDIDATES
    for block_m in (64, 32, 16):
        if block_m > preferred:
            continue
        for warps, block_n, stages in candidates:
            rg = block_m // 16
            if warps % rg:
                continue
            cg = warps // rg
            if block_n % 16 or block_n % (8 * cg) or block_n % warps:
                continue
            if _round_up(dv, 16 * cg) // (8 * cg) > 32:  # O accumulator > 128 registers a thread
                continue
            if portable_smem_bytes(d, dv, block_m, block_n, warps, stages) <= max_smem:
                return block_m, warps, block_n, stages
    return None


def _device_id(problem) -> int:
    cp = _arrays.cupy_module()
    if problem.on_device:
        return int(problem.q.device.id)
    return int(cp.cuda.Device().id)


def _contiguous(x) -> bool:
    return bool(x.flags.c_contiguous)


def _layout_reason(problem) -> str | None:
    """Why q / k_cache cannot be read with 16-byte cp.async copies (None when they can)."""
    if not problem.on_device:
        return None
    for name in ("q", "k_cache"):
        arr = getattr(problem, name)
        if not _contiguous(arr):
            return (f"backend='cupy' needs a C-contiguous {name}, got strides {arr.strides} "
                    f"for shape {tuple(arr.shape)} (pass cupy.ascontiguousarray({name}))")
        if arr.data.ptr % 16:
            return f"backend='cupy' needs {name} 16-byte aligned, got address {arr.data.ptr:#x}"
    return None


def supports(problem):
    """(True, "") if the CuPy kernels compute this problem, else (False, the reason)."""
    # --- issue #5: FP8 / sparse kernels
    if problem.is_sparse or problem.is_fp8_kvcache:
        from . import cupy_sparse_fp8

        return cupy_sparse_fp8.supports(problem)
    # --- end issue #5
    dt = np.dtype(problem.q.dtype)
    if dt not in (np.dtype(np.float16), _arrays.BFLOAT16):
        return False, (f"backend='cupy' computes bfloat16 and float16 only, got {_arrays.dtype_name(dt)} "
                       "(use backend='numba' or 'numpy' for float32)")
    if problem.d % 8:
        return False, f"backend='cupy' needs d % 8 == 0 (16-byte rows), got d = {problem.d}"
    reason = _layout_reason(problem)
    if reason:
        return False, reason
    try:
        dev = _device_id(problem)
        major, minor = _capability(dev)
        smem = _max_smem(dev)
    except Exception as exc:
        return False, f"cannot query the GPU: {exc}"
    if major < 8:
        return False, f"backend='cupy' needs compute capability >= 8.0, got {major}.{minor} on device {dev}"
    rows = problem.s_q * problem.h_q // problem.h_kv
    if portable_config(problem.d, problem.head_dim_v, rows, smem) is None:
        return False, (f"backend='cupy': no tiling of d = {problem.d}, d_v = {problem.head_dim_v} fits "
                       f"{smem} bytes of shared memory")
    return True, ""


def _pick_kernel(kernel: str | None) -> str:
    """"auto", "portable" or "hopper" from the argument or MLA_CUPY_KERNEL (default "auto")."""
    kernel = kernel or os.environ.get("MLA_CUPY_KERNEL") or "auto"
    if kernel not in KERNELS:
        raise ValueError(f"kernel (or MLA_CUPY_KERNEL) must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _to_device(cp, x, dtype=None):
    """A C-contiguous device array; bf16 host arrays travel as their uint16 bits."""
    if isinstance(x, np.ndarray):
        x = np.ascontiguousarray(x)
        if x.dtype == _arrays.BFLOAT16 or x.dtype == np.float16:
            x = x.view(np.uint16)
        return cp.asarray(x if dtype is None else x.astype(dtype))
    x = cp.ascontiguousarray(x)
    return x if dtype is None else x.astype(dtype, copy=False)


def device_plan(cache_seqlens, num_q_tokens_per_head_k: int, num_heads_k: int, num_sms: int | None = None):
    """``mla.get_mla_metadata`` on the device: (tile_scheduler_metadata, num_splits) as CuPy int32
    arrays, computed by kernels/mla_metadata.cu with no host sync (CUDA-graph capturable;
    ``get_mla_metadata`` calls this for device lengths).

    cache_seqlens: int32 [b] CuPy array. The result equals ``mla.scheduler.plan`` exactly.
    """
    from .. import scheduler

    cp = _arrays.cupy_module()
    seqlens = cp.ascontiguousarray(cache_seqlens, dtype=cp.int32)
    b = int(seqlens.shape[0])
    if num_sms is None:
        num_sms = int(cp.cuda.Device().attributes["MultiProcessorCount"])
    workers = scheduler.num_sm_parts(num_sms, num_q_tokens_per_head_k, num_heads_k)
    metadata = cp.empty((workers, scheduler.METADATA_WIDTH), dtype=cp.int32)
    num_splits = cp.empty((b + 1,), dtype=cp.int32)
    fn = _nvrtc.load_function("mla_metadata.cu", "mla_plan")
    args = (seqlens, np.int32(b), np.int32(workers), np.int32(scheduler.BLOCK_N),
            np.int32(scheduler.FIXED_OVERHEAD_TILES), np.int32(scheduler.tight_payload()), metadata, num_splits)
    run_launches(cp, [(fn, (1,), (256,), args, 0)])
    return metadata, num_splits


def decode(problem, metadata, num_splits, kernel: str | None = None):
    """Run the decode; see the module docstring. Returns (out, lse) of the inputs' kind."""
    cp = _arrays.cupy_module()
    which = _pick_kernel(kernel)
    # --- issue #5: FP8 / sparse kernels
    if problem.is_sparse or problem.is_fp8_kvcache:
        from . import cupy_sparse_fp8

        return cupy_sparse_fp8.decode(problem, metadata, num_splits)
    # --- end issue #5
    dev = _device_id(problem)
    with cp.cuda.Device(dev):
        return _decode_dense(cp, problem, metadata, num_splits, dev, which)


def _prepare(cp, problem, metadata, num_splits, dev, kernel: str = "portable"):
    """The launch list of the chosen dense kernel ("auto", "portable", "hopper"; see the module
    docstring); "hopper" / "auto" fall back to the portable kernel for problems or devices the Hopper
    kernels do not take (``cupy_hopper.supports`` says why)."""
    if kernel in ("hopper", "auto"):
        from . import cupy_hopper

        if cupy_hopper.supports(problem, dev)[0]:
            return cupy_hopper.prepare(cp, problem, metadata, num_splits, dev, cupy_hopper.variant(problem))
    return _prepare_portable(cp, problem, metadata, num_splits, dev)


def _decode_dense(cp, problem, metadata, num_splits, dev, kernel: str = "portable"):
    launches, out, lse = _prepare(cp, problem, metadata, num_splits, dev, kernel)
    run_launches(cp, launches)
    if problem.on_device:
        return out, lse
    out_h = out.get()
    if out_h.dtype == np.uint16:
        out_h = out_h.view(np.dtype(problem.q.dtype))
    return out_h, lse.get()


def _prepare_portable(cp, problem, metadata, num_splits, dev):
    """Device arrays, outputs and the launch list [(fn, grid, block, args, smem)] of one decode."""
    s_q, h_q, d = problem.s_q, problem.h_q, problem.d
    h_kv, dv = problem.h_kv, problem.head_dim_v
    rows = s_q * h_q // h_kv
    cfg = portable_config(d, dv, rows, _max_smem(dev))
    if cfg is None:
        raise ValueError(f"backend='cupy': no tiling for d = {d}, d_v = {dv}")
    block_m, warps, block_n, stages = cfg
    fp16 = np.dtype(problem.q.dtype) == np.float16
    defines = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n,
               "MLA_NWARPS": warps, "MLA_STAGES": stages, "MLA_FP16": int(fp16)}
    if os.environ.get("MLA_CUPY_PSPLIT") is not None:  # benchmarks: bf16 P V in one product (0) or two (1)
        defines["MLA_P_SPLIT"] = int(os.environ["MLA_CUPY_PSPLIT"])
    fn = _nvrtc.load_function("mla_decode_portable.cu", "mla_decode_portable", defines)
    smem = portable_smem_bytes(d, dv, block_m, block_n, warps, stages)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem

    comb = combine_function(dv, fp16, problem.out_float32, problem.b * problem.s_q * problem.h_q)
    arrays = (_to_device(cp, problem.q), _to_device(cp, problem.k_cache), _to_device(cp, problem.block_table, np.int32),
              _to_device(cp, problem.cache_seqlens, np.int32), _to_device(cp, metadata, np.int32),
              _to_device(cp, num_splits, np.int32))
    host_splits = num_splits if isinstance(num_splits, np.ndarray) else None
    return assemble_dense(cp, fn, comb, problem, arrays, host_splits, block_m, warps * 32, smem, POISON_OUTPUTS)


COMBINE_WIDE_ROWS = 512
"""From this many query rows (b * s_q * h_q) on, the combine takes 128 channels a warp (enough warps already)."""


def combine_parts(dv: int, rows: int) -> int:
    """Warps a query row in kernels/mla_combine.cu (its grid's z) for ``rows`` = b * s_q * h_q query rows: few rows
    (fewer than COMBINE_WIDE_ROWS): d_v / 32 (32 channels a warp, one a lane) when d_v % 32 == 0; more: 4 (128
    channels a warp) when d_v % 128 == 0; else 1. H100 (benchmarks/NOTES_cupy.md, 2026-11-26): b = 1, h_q = 128,
    s_k = 32768 (64 splits): 4 warps a row 42 us alone, L2 flushed, 16 warps 14 us; but b = 128, s_q = 2,
    h_q = 128 with 16 warps a row launched 131k CTAs, most with nothing to do (single-split rows): 1.94 -> 2.03 ms."""
    if rows < COMBINE_WIDE_ROWS and dv % 32 == 0:
        return dv // 32
    return 4 if dv % 128 == 0 else 1


def combine_function(dv: int, fp16: bool, out_float32: bool, rows: int):
    """kernels/mla_combine.cu for d_v = dv: out in q's 16-bit type, or float32 (MLA_OUT_F32); launched
    with grid z = combine_parts(dv, rows) (rows = b * s_q * h_q)."""
    defines = {"MLA_DV": dv, "MLA_FP16": int(fp16), "MLA_COMBINE_PARTS": combine_parts(dv, rows)}
    if out_float32:
        defines["MLA_OUT_F32"] = 1
    return _nvrtc.load_function("mla_combine.cu", "mla_combine", defines)


MODE_FUSED = 2
"""Bit 1 of the decode kernels' force_partials argument: the launch merges its own split sequences
(kernels/mla_fused_combine.cuh, MLA_MODE_FUSED); bit 0 is force_partials proper."""


def allocate_outputs(xp, problem, q_dtype, partial_rows: int, out_float32: bool, poison: bool):
    """out [b, s_q, h_q, d_v] (q's dtype, or float32 when out_float32), lse f32 [b, h_q, s_q] and the
    partial buffers o_part f32 [partial_rows, s_q, h_q, d_v], lse_part f32 [partial_rows, s_q, h_q]
    of one decode; poison: all filled with NaN (unwritten elements show in the tests)."""
    b, s_q, h_q, dv = problem.b, problem.s_q, problem.h_q, problem.head_dim_v
    out = xp.empty((b, s_q, h_q, dv), dtype=xp.float32 if out_float32 else q_dtype)
    lse = xp.empty((b, h_q, s_q), dtype=xp.float32)
    o_part = xp.empty((max(partial_rows, 1), s_q, h_q, dv), dtype=xp.float32)
    lse_part = xp.empty((max(partial_rows, 1), s_q, h_q), dtype=xp.float32)
    if poison:
        if not out_float32:
            out.view(xp.uint16).fill(0xFFFF)  # NaN in bf16 and fp16
        for arr in (lse, o_part, lse_part) + ((out,) if out_float32 else ()):
            arr.fill(np.nan)
    return out, lse, o_part, lse_part


def assemble_dense(xp, decode_fn, combine_fn, problem, arrays, host_splits, block_m: int, threads: int, smem: int,
                   poison: bool = False, fused_fn=None):
    """Outputs, partial buffers and the launch list [(fn, grid, block, args, smem)] of a dense decode kernel
    with the portable kernel's signature (mla_decode_portable.cu, mla_decode_hopper.cu) + mla_combine.cu.

    arrays: (q, k_cache, block_table, seqlens, sched, splits) of the array module ``xp`` (CuPy; NumPy for
    the CPU emulator in the tests). ``host_splits``: num_splits as a NumPy array when the plan is on the
    host (the exact partial count is known without a device sync); None: the documented bound
    b + num_workers rows are allocated and the combine always launched (it skips single-split rows).
    ``problem.out_float32``: out is float32, the decode kernel writes every piece as a partial
    (force_partials) and the combine (built with MLA_OUT_F32) merges every row.
    ``fused_fn``: the decode kernel loaded for cooperative launches, when it can merge its own split sequences
    (kernels/mla_fused_combine.cuh; the caller checked ``cupy_hopper.fused_reason``): then, if anything needs a
    merge, it is launched with bit 1 (MLA_MODE_FUSED) of force_partials set and no combine kernel follows.
    """
    q, k_cache, block_table, seqlens, sched, splits = arrays
    b, s_q, h_q = problem.b, problem.s_q, problem.h_q
    h_kv = problem.h_kv
    rows = s_q * h_q // h_kv
    num_workers = int(sched.shape[0])
    host_plan = host_splits is not None
    total = int(host_splits[-1]) if host_plan else b + num_workers
    force = problem.out_float32
    needs_combine = (not host_plan) or total > b or force
    fused = fused_fn is not None and needs_combine and not force
    out, lse, o_part, lse_part = allocate_outputs(xp, problem, q.dtype, total, force, poison)
    scale_log2 = np.float32(problem.softmax_scale * np.log2(np.e))
    grid = (num_workers, h_kv, -(-rows // block_m))
    mode = int(force) | (MODE_FUSED if fused else 0)
    args = (q, k_cache, block_table, np.int32(block_table.shape[1]), seqlens, sched, splits, o_part, lse_part,
            out, lse, np.int32(s_q), np.int32(h_q), np.int32(h_kv), np.int32(problem.page_block_size),
            scale_log2, np.int32(bool(problem.causal)), np.int32(mode))
    launches = [(fused_fn if fused else decode_fn, grid, (threads,), args, smem)]
    if needs_combine and not fused:
        launches.append((combine_fn, (-(-(s_q * h_q) // 4), b, combine_parts(problem.head_dim_v, b * s_q * h_q)),
                         (128,),
                         (o_part, lse_part, splits, out, lse, np.int32(s_q), np.int32(h_q), np.int32(force)), 0))
    return launches, out, lse


# ----------------------------------------------------------------------------------------------
# python -m mla.backends.cupy_backend: time the shapes (kernels only, L2 flushed)

BENCH_SHAPES = ((128, 1, 16, 8192), (128, 2, 128, 8192), (128, 1, 128, 4096), (1, 1, 128, 32768),
                (8, 1, 16, 8192))


def _random_device(cp, shape, dtype):
    x = cp.random.standard_normal(shape, dtype=cp.float32)
    if dtype == np.float16:
        return x.astype(cp.float16)
    bits = (x.view(cp.uint32) >> 16).astype(cp.uint16)  # bf16 by truncation
    return bits.view(dtype)


def time_launches(cp, launches, flush, reps: int, clean_flush: bool = False) -> float:
    """Median seconds of one pass over ``launches`` ((fn, grid, block, args, smem) tuples): CUDA
    events, the L2 flushed by rewriting ``flush`` before every rep (as FlashMLA's benchmark zeroes a buffer), 3
    warm-up reps dropped. clean_flush: flush by *reading* ``flush`` instead (a sum), so that the L2 holds clean lines
    when the launches start: rewriting leaves up to the L2's 50 MB dirty, and the launches' first reads then pay
    for writing them back (benchmarks/BENCHMARKS.md, 2026-11-27)."""
    times = []
    for rep in range(reps + 3):
        if clean_flush:
            flush.view(cp.uint64).sum()
        else:
            flush.fill(rep & 0xFF)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        for fn, grid, block, args, smem in launches:
            fn(grid, block, args, shared_mem=smem)
        stop.record()
        stop.synchronize()
        if rep >= 3:
            times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return float(np.median(times))


def bench(shapes=BENCH_SHAPES, reps: int = 30, dtype=None):
    """Median kernel time of each (b, s_q, h_q, s_k) DeepSeek shape; prints and returns rows."""
    from .. import api

    cp = _arrays.cupy_module()
    dtype = _arrays.BFLOAT16 if dtype is None else np.dtype(dtype)
    dev = cp.cuda.Device().id
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    rng = np.random.default_rng(0)
    rows = []
    for b, s_q, h_q, s_k in shapes:
        d, dv, page = 576, 512, 64
        blocks = b * s_k // page
        q = _random_device(cp, (b, s_q, h_q, d), dtype)
        k = _random_device(cp, (blocks, page, 1, d), dtype)
        table = cp.asarray(rng.permutation(blocks).astype(np.int32).reshape(b, s_k // page))
        seqlens = cp.full((b,), s_k, dtype=cp.int32)
        problem = api._validate(q, k, table, seqlens, dv, None, False, False, None, None, None, False)
        sched, splits = api.get_mla_metadata(seqlens.get(), s_q * h_q, 1)
        launches, _, _ = _prepare(cp, problem, sched, splits, dev, _pick_kernel(None))  # MLA_CUPY_KERNEL
        t = time_launches(cp, launches, flush, reps)
        nbytes = b * (s_q * h_q * d * 2 + s_k * d * 2 + s_q * h_q * dv * 2)
        flops = 2 * b * h_q * s_q * s_k * (d + dv)
        rows.append((b, s_q, h_q, s_k, t, nbytes / t, flops / t))
        name = getattr(launches[0][0], "name", "")  # which kernel ran (MLA_CUPY_KERNEL=hopper may fall back)
        print(f"{name}: b={b:4d} s_q={s_q} h_q={h_q:4d} s_k={s_k:6d}: {t * 1e3:8.3f} ms "
              f"{nbytes / t / 1e9:7.0f} GB/s {flops / t / 1e12:6.1f} TFLOP/s", flush=True)
        del q, k, table, launches
    return rows


def selfcheck() -> bool:
    """Compare partials and results with the reference on a few small poisoned cases; print errors."""
    from .. import api, reference, testing

    cp = _arrays.cupy_module()
    rng = np.random.default_rng(1)
    cases = [dict(b=3, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64, seqlens=[0, 100, 1000]),
             dict(b=2, s_q=2, h_q=128, d=576, head_dim_v=512, page_block_size=64, seqlens=[300, 5000],
                  causal=True),
             dict(b=2, s_q=2, h_q=6, h_kv=3, d=40, head_dim_v=33, page_block_size=7, seqlens=[0, 90])]
    ok = True
    for kw in cases:
        for dtype in (_arrays.BFLOAT16, np.float16):
            case = testing.make_decode_case(rng, dtype=dtype, **kw)
            problem = api._validate(*case.args(), None, case.causal, False, None, None, None, True)
            sched, splits = api.get_mla_metadata(case.cache_seqlens, kw["s_q"] * kw["h_q"] // kw.get("h_kv", 1),
                                                 kw.get("h_kv", 1))
            launches, out, lse = _prepare(cp, problem, sched, splits, cp.cuda.Device().id, _pick_kernel(None))
            for fn, grid, block, args, smem in launches:
                fn(grid, block, args, shared_mem=smem)
            o_part, lse_part = launches[0][3][7].get(), launches[0][3][8].get()
            o_ref, l_ref = reference.split_partials(*case.args(), sched, splits, causal=case.causal)
            multi = np.repeat(np.diff(splits) > 1, np.diff(splits))  # partial rows of combined sequences
            err_p = float(np.nanmax(np.abs(o_part[: len(multi)][multi] - o_ref[multi]), initial=0))
            fin = np.isfinite(l_ref[multi])
            err_lp = float(np.nanmax(np.abs(lse_part[: len(multi)][multi][fin] - l_ref[multi][fin]), initial=0))
            out_ref, lse_ref = reference.flash_mla_reference(*case.args(), causal=case.causal)
            out_h = out.get().view(np.uint16).view(dtype).astype(np.float32)
            err_o = float(np.max(np.abs(out_h - out_ref.astype(np.float32)), initial=0))
            err_l = float(np.max(np.abs(np.nan_to_num(lse.get(), posinf=9e9) - np.nan_to_num(lse_ref, posinf=9e9)),
                                 initial=0))
            nan = int(np.isnan(out_h).sum() + np.isnan(lse.get()).sum())
            good = err_o < 2e-2 and err_l < 1e-3 and nan == 0
            ok &= good
            print(f"{'OK ' if good else 'BAD'} {kw} {np.dtype(dtype).name}: partial o {err_p:.2e} lse {err_lp:.2e}; "
                  f"out {err_o:.2e} lse {err_l:.2e} nan {nan}", flush=True)
    return ok


if __name__ == "__main__":
    import sys

    if "check" in sys.argv[1:]:
        selfcheck()
    if "bench" in sys.argv[1:] or len(sys.argv) == 1:
        bench()
