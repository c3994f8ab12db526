"""CuPy kernel for sparse prefill, FlashMLA's ``flash_mla_sparse_fwd`` (issue #5).

``kernels/mla_sparse_prefill.cu`` compiles (NVRTC, sm_90a and sm_80, no spills;
``tests/test_cupy_compile.py``) and was verified on an H100 on 2026-11-25:
``tests/test_sparse_prefill_gpu.py`` 74 passed, and its two compute-sanitizer tests (memcheck,
racecheck) passed. ``mla.flash_mla_sparse_fwd`` uses it for CuPy inputs it computes (and for
``backend="cupy"``); ``supports`` says why it declines the others, and then "auto" uses the NumPy
reference while ``backend="cupy"`` raises that reason. It also runs on the CPU emulator of the CUDA
sources (``tests/_cuda_emu.py``, in ``tests/test_sparse_prefill_cupy_cpu.py``).

One launch per call, no split-KV and no combine: a CTA owns (query row r, KV head g, BLOCK_M heads
of g's group) and walks that row's whole index list (see the kernel header), writing out,
max_logits and the base-2 lse. The tiling and shared-memory layout are the bf16 sparse decode's, so
``cupy_sparse_fp8.config`` / ``smem_bytes`` (fp8=False, sparse=True) choose and size it
(``MLA_CUPY_SPARSE_CONFIG="warps,block_n,stages"`` forces one; ``MLA_CUPY_PSPLIT=0/1`` sets the bf16
P V split, as for the decode kernels).

Arrays: device inputs give CuPy outputs on q's device; NumPy inputs are copied to the current
device and the results copied back. bfloat16 and float16 only (float32 is declined).
"""

from __future__ import annotations

import math
import os

import numpy as np

from .. import _arrays
from . import _nvrtc
from . import cupy_backend as _cb
from . import cupy_sparse_fp8 as _sf

SOURCE, FUNCTION = "mla_sparse_prefill.cu", "mla_sparse_prefill"
WHAT = "sparse prefill (flash_mla_sparse_fwd)"
MAX_GRID_X = 2**31 - 1


def available():
    """(True, "") when CuPy sees a CUDA GPU of compute capability >= 8.0, else (False, the reason)."""
    return _cb.available()


def config(d: int, dv: int, group: int, max_smem: int):
    """(block_m, warps, block_n, stages) for ``group`` = h_q / h_kv heads a query row, or None when no
    tiling fits ``max_smem`` bytes. block_m is the smallest of 16 / 32 / 64 holding the group (64 for
    larger groups: DeepSeek's 128 heads are two CTAs a row). All tilings compile without spills on
    sm_80 and sm_90a (unlike the sparse decode's, which caps sm_8x at 32 rows)."""
    return _sf.config(d, dv, group, max_smem, fp8=False, sparse=True, max_block_m=64)


def smem_bytes(d: int, dv: int, block_m: int, block_n: int, warps: int, stages: int) -> int:
    """Dynamic shared memory of one CTA (the kernel header's formula)."""
    return _sf.smem_bytes(d, dv, block_m, block_n, warps, stages, fp8=False, sparse=True)


def defines(d: int, dv: int, cfg, fp16: bool) -> dict:
    """The kernel's -D values for a tiling ``cfg`` = (block_m, warps, block_n, stages)."""
    block_m, warps, block_n, stages = cfg
    result = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n, "MLA_NWARPS": warps,
              "MLA_STAGES": stages, "MLA_FP16": int(fp16)}
    if os.environ.get("MLA_CUPY_PSPLIT") is not None:  # benchmarks: bf16 P V in one product (0) or two (1)
        result["MLA_P_SPLIT"] = int(os.environ["MLA_CUPY_PSPLIT"])
    return result


def _device_of(q) -> int:
    cp = _arrays.cupy_module()
    return int(q.device.id) if _arrays.is_device_array(q) else int(cp.cuda.Device().id)


def supports(q, kv, indices, d_v: int):
    """(True, "") if the kernel computes this (already validated) problem, else (False, the reason).

    q [s_q, h_q, d], kv [s_kv, h_kv, d], indices [s_q, h_kv, topk]: NumPy or CuPy arrays.
    """
    dt = np.dtype(q.dtype)
    if dt not in (np.dtype(np.float16), _arrays.BFLOAT16):
        return False, (f"backend='cupy' computes the {WHAT} in bfloat16 and float16 only, got "
                       f"{_arrays.dtype_name(dt)} (use backend='numpy' for float32)")
    s_q, h_q, d = (int(x) for x in q.shape)
    h_kv = int(kv.shape[1])
    if d % 8:
        return False, f"backend='cupy' needs d % 8 == 0 (16-byte rows), got d = {d}"
    try:
        dev = _device_of(q)
        cc, smem = _cb._capability(dev), _cb._max_smem(dev)
    except Exception as exc:
        return False, f"cannot query the GPU: {exc}"
    if cc < (8, 0):
        return False, f"backend='cupy' needs compute capability >= 8.0, got {cc[0]}.{cc[1]} on device {dev}"
    cfg = config(d, int(d_v), h_q // h_kv, smem)
    if cfg is None:
        return False, (f"backend='cupy': no tiling of the {WHAT} kernel for d = {d}, d_v = {d_v} fits "
                       f"{smem} bytes of shared memory")
    ctas = s_q * h_kv * -(-(h_q // h_kv) // cfg[0])
    if ctas > MAX_GRID_X:
        return False, f"backend='cupy': {ctas} CTAs exceed the grid limit {MAX_GRID_X}; split the query rows"
    return True, ""


def _operand(cp, x, dtype=None):
    """A C-contiguous, 16-byte aligned device array (copied only when it is not one already).
    16-bit floats travel as their uint16 bits (copies of views then need no bf16 kernels)."""
    if isinstance(x, np.ndarray):
        return _cb._to_device(cp, x, dtype)  # a fresh (aligned) allocation
    if dtype is None and x.dtype.itemsize == 2 and x.dtype.kind not in "iu":
        x = x.view(cp.uint16)
    x = cp.ascontiguousarray(x)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    if x.size and x.data.ptr % 16:
        x = x.copy()
    return x


_NULL = np.uint64(0)


def prepare(q, kv, indices, sm_scale: float, d_v: int, attn_sink=None, topk_length=None, dev: int | None = None):
    """Device operands, outputs and the launch list [(fn, grid, block, args, smem)] (empty when there
    is nothing to launch); ``sparse_prefill`` runs it, benchmarks and tests call it directly.

    Returns (launches, out [s_q, h_q, d_v], max_logits [s_q, h_q], lse [s_q, h_q]) as CuPy arrays
    (out in q's dtype for device q, as uint16 bits for host q).
    """
    cp = _arrays.cupy_module()
    dev = _device_of(q) if dev is None else dev
    s_q, h_q, d = (int(x) for x in q.shape)
    s_kv, h_kv = int(kv.shape[0]), int(kv.shape[1])
    topk, dv, group = int(indices.shape[-1]), int(d_v), h_q // h_kv
    cfg = config(d, dv, group, _cb._max_smem(dev))
    if cfg is None:
        raise ValueError(f"backend='cupy': no tiling for the {WHAT} kernel with d = {d}, d_v = {dv}")
    block_m, warps, block_n, stages = cfg
    fp16 = np.dtype(q.dtype) == np.float16

    q_d, kv_d = _operand(cp, q), _operand(cp, kv)
    idx_d = _operand(cp, indices, np.int32)
    sink_d = _NULL if attn_sink is None else _operand(cp, attn_sink, np.float32)
    tl_d = _NULL if topk_length is None else _operand(cp, topk_length, np.int32)
    out = cp.empty((s_q, h_q, dv), dtype=q.dtype if _arrays.is_device_array(q) else cp.uint16)
    max_logits = cp.empty((s_q, h_q), dtype=cp.float32)
    lse = cp.empty((s_q, h_q), dtype=cp.float32)
    if _cb.POISON_OUTPUTS:
        out.view(cp.uint16).fill(0xFFFF)  # NaN in bf16 and fp16
        max_logits.fill(cp.nan)
        lse.fill(cp.nan)
    ctas = s_q * h_kv * -(-group // block_m)
    if ctas == 0:
        return [], out, max_logits, lse
    if ctas > MAX_GRID_X:
        raise ValueError(f"backend='cupy': {ctas} CTAs exceed the grid limit {MAX_GRID_X}")

    fn = _nvrtc.load_function(SOURCE, FUNCTION, defines(d, dv, cfg, fp16))
    smem = smem_bytes(d, dv, block_m, block_n, warps, stages)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    scale_log2 = np.float32(float(sm_scale) / math.log(2.0))
    args = (q_d, kv_d, idx_d, tl_d, sink_d, out, max_logits, lse, np.int32(h_q), np.int32(h_kv),
            np.int32(s_kv), np.int32(topk), scale_log2)
    return [(fn, (ctas,), (warps * 32,), args, smem)], out, max_logits, lse


def sparse_prefill(q, kv, indices, sm_scale: float, d_v: int, attn_sink=None, topk_length=None):
    """Run the kernel on arrays ``mla.sparse`` validated.

    Returns (out, max_logits, lse (base 2)) of the inputs' kind.
    """
    cp = _arrays.cupy_module()
    dev = _device_of(q)
    with cp.cuda.Device(dev):
        launches, out, max_logits, lse = prepare(q, kv, indices, sm_scale, d_v, attn_sink, topk_length, dev)
        _cb.run_launches(cp, launches)
        if _arrays.is_device_array(q):
            return out, max_logits, lse
        out_h = out.get()
        if out_h.dtype == np.uint16:
            out_h = out_h.view(np.dtype(q.dtype))
        return out_h, max_logits.get(), lse.get()


def compile_variants(arch: str, max_smems) -> list[dict]:
    """The -D dicts the backend picks on ``arch`` for DeepSeek shapes (d 576, d_v 512; groups of 16,
    32, 64 and 128 heads; bf16 and fp16) and a small generic one (d 64, d_v 48, group 8; d 40, d_v 33),
    for each shared-memory size in ``max_smems`` (``tests/test_cupy_compile.py``). ``arch`` is unused:
    the kernel has no per-architecture cap."""
    del arch
    result: list[dict] = []
    shapes = [(576, 512, g) for g in (16, 32, 64, 128)] + [(64, 48, 8), (40, 33, 3)]
    for smem in max_smems:
        for d, dv, group in shapes:
            cfg = config(d, dv, group, smem)
            if cfg is None:
                continue
            for fp16 in (False, True) if d == 576 else (False,):
                defs = defines(d, dv, cfg, fp16)
                if defs not in result:
                    result.append(defs)
    return result
