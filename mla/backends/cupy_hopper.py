"""Launch preparation for the Hopper (sm_90a, wgmma) MLA decode kernels.

Three kernels, all verified on an H100 (``tests/test_cupy_gpu.py``: FlashMLA's case matrix, hypothesis,
compute-sanitizer memcheck / racecheck) and all wgmma + cp.async with the portable kernel's signature,
plan, partial buffers and combine kernel:

* **narrow** -- ``kernels/mla_decode_hopper_narrow.cu``: keys and value channels on wgmma's M, 16 (or 32,
  ``narrow_nq``) query rows of a KV head on N (S^T = K Q^T, O^T = V^T P^T), 128-byte swizzled K tiles; both
  warpgroups on one tile while the next loads. Launch: grid (workers, h_kv, ceil(rows / nq)), 256 threads,
  ``narrow_smem_bytes`` of shared memory. 96–99% of the copy bandwidth at 128,1,16,8192 (0.42 ms) and 95%
  with 32 rows (128,2,16,8192: 0.43 ms). Its FP8 build (``fp8_variant``) takes dense FP8 caches with 17-32 rows.
* **FP8 register kernel** -- ``kernels/mla_decode_fp8_regs.cu``: dense FP8 caches with at most 16 query rows a KV
  head (the narrow kernel's grid, signature and plan): raw 656-byte rows by bulk copies into 4 stages, the codes
  dequantised straight into wgmma's A registers (never a bf16 tile), the scales carried by fp32 block partials
  (S^T) and by 4 scaled copies of P^T (O^T), the two warpgroups on alternate tiles. 203664 B of shared memory;
  128,1,16,8192: 0.263-0.266 ms = 1.58x the bf16 narrow kernel (2026-11-27).
* **wide** -- ``kernels/mla_decode_hopper.cu``: 64 query rows a CTA on M, two warpgroups splitting the
  64 x 512 output, 128-byte swizzled K tiles. Grid (workers, h_kv, ceil(rows / 64)), 256 threads, 229376 B
  of shared memory. Faster than the portable kernel above 16 rows a KV head (128,2,128,8192: 1.94 ms,
  301 TFLOP/s, vs 4.09 ms).

Which one: ``backend="cupy"`` with ``kernel="auto"`` (the default) or ``kernel="hopper"`` takes the narrow
kernel up to 32 query rows a KV head (16 a CTA, or 32 with -DMLA_NQ=32) and the seesaw one above
(``variant``, ``WIDE_MIN_ROWS``); the portable kernel on every other GPU and for other dims / dtypes.
``MLA_HOPPER_VARIANT=narrow|wide|seesaw`` forces one (tests, benchmarks; each computes any dense shape). Since
2026-11-26 (sixth session) "auto" takes the seesaw kernel above 32 rows; the wide kernel keeps its FP8 and sparse
builds, and its dense build is the readable lock-step version the seesaw one is measured against.

* **seesaw** -- ``kernels/mla_decode_seesaw.cu``: the wide kernel's 64-row tile, plan and numerics, with
  FlashMLA's alternating ("seesaw") schedule: each warpgroup scores its own 64-key block of a pair, the two
  exchange row maxima and P through shared memory, so one's softmax runs under the other's wgmma. Dense
  bf16 / fp16 only (FP8 and sparse problems keep the wide kernel's builds). 230560 B of shared memory;
  128,2,128,8192 (H100, ninth session, bf16 P rounded once): 1.04 ms kernels only, 547-563 TFLOP/s (median of
  five runs 559); 1.19 ms in an API loop (the shape runs at the power cap; with the P split, MLA_CUPY_PSPLIT=1:
  1.44 ms). Its K pieces come by bulk tensor copies on mbarriers (``_tma``; the default since 2026-11-26, eighth
  session: -1..+6% kernels only, faster in every API loop, racecheck-clean since zero_tail meets on an mbarrier) or,
  where a tensor map cannot describe the cache (page not a multiple of 64), by cp.async (``seesaw_loads``,
  MLA_SEESAW_LOADS).

Scope: compute capability 9.0 (the sm_90a code runs nowhere else), bfloat16 / float16, d = 576 and
d_v = 512; any page size, h_kv, s_q, h_q. Other problems go to the portable kernel
(``cupy_backend._prepare`` falls back); the reason is ``shape_reason`` / ``device_reason``.
"""

from __future__ import annotations

import os

import numpy as np

from .. import _arrays
from . import _nvrtc

D, DV = 576, 512
BLOCK_M = 64
THREADS = 256
TILE_BYTES = BLOCK_M * D * 2
XCHG_BYTES = 128 * 16 * 4
SMEM_BYTES = 3 * TILE_BYTES + XCHG_BYTES
"""Dynamic shared memory: Q tile + 2 K tiles + the warpgroup exchange (kernels/mla_decode_hopper.cu)."""
ARCH = "sm_90a"
SOURCE, FUNCTION = "mla_decode_hopper.cu", "mla_decode_hopper"

# The narrow kernel (kernels/mla_decode_hopper_narrow.cu): keys / channels on wgmma's M, up to 16 query
# rows of a KV head on N, so h_q = 16 decode pays no 64-row padding. Same signature and plan.
NARROW_SOURCE, NARROW_FUNCTION = "mla_decode_hopper_narrow.cu", "mla_decode_hopper_narrow"
NARROW_ROWS = 16
# The seesaw kernel (kernels/mla_decode_seesaw.cu): the wide kernel's tile and numerics with FlashMLA's
# alternating warpgroup schedule. Same signature (the wide kernel's), grid, plan and partials.
SEESAW_SOURCE, SEESAW_FUNCTION = "mla_decode_seesaw.cu", "mla_decode_seesaw"
SEESAW_SMEM_BYTES = 3 * TILE_BYTES + 64 * 128 + 4 * 64 * 4 + (2 * 9 + 2) * 8
"""Dynamic shared memory of the seesaw kernel: Q + 2 K buffers + P_B lo + m_A, m_B, l + 20 mbarriers (230560 B)."""
SEESAW_LOADS = ("auto", "tma", "cpasync")
FP8_BYTES = 656  # one token of FlashMLA's FP8 cache (kernels/mla_fp8.cuh)
# The FP8 register kernel (kernels/mla_decode_fp8_regs.cu): dense FP8 caches, at most 16 query rows a CTA (the narrow
# kernel's grid, signature and plan); raw token rows by bulk copies, codes dequantised straight into wgmma's A
# registers, the warpgroups on alternate tiles.
FP8_REGS_SOURCE, FP8_REGS_FUNCTION = "mla_decode_fp8_regs.cu", "mla_decode_fp8_regs"
FP8_REGS_SMEM_BYTES = 4 * 64 * FP8_BYTES + 2 * (16 * D + 2 * 4 * 16 * 64) + 4 * (2 * 4 * 16 + 2 * 2 * 16 + 16) + 80
"""Dynamic shared memory of the FP8 register kernel: 4 raw stages (the piece-end merge exchanges O through two of them)
+ Q + 2 x 4 P^T copies + reductions + m + last keys + 10 mbarriers (203664 B)."""
VARIANTS = ("auto", "narrow", "wide", "seesaw")



def narrow_smem_bytes(p_split: bool, nq: int = NARROW_ROWS) -> int:
    """Dynamic shared memory of the narrow kernel with nq (16 or 32) query rows a CTA: Q + 2 K tiles + 2 P^T
    tiles + the S^T swap area + reductions + the columns' last keys. The FP8 build has the same layout (its raw
    rows wait in registers, kernels/mla_wgmma.cuh "register stages")."""
    npv = 2 * nq if p_split else nq
    return 2 * (nq * D + 2 * BLOCK_M * D + 2 * npv * 64) + 4 * (2 * (nq // 2) * 128 + 2 * 4 * nq + nq)


def narrow_nq(problem) -> int:
    """Query rows a CTA of the narrow kernel: 16 when a KV head has at most 16 (s_q h_q / h_kv), else 32
    (-DMLA_NQ=32; more rows than 32 run as several row tiles, each reading the keys again)."""
    return NARROW_ROWS if problem.s_q * problem.h_q // problem.h_kv <= NARROW_ROWS else 2 * NARROW_ROWS


FP8_KERNELS = ("auto", "regs", "narrow", "wide", "portable")


def wide_smem_bytes(fp8: bool = False, sparse: bool = False) -> int:
    """Dynamic shared memory of the wide kernel: Q + 2 K tiles + exchange (the FP8 build too: its raw rows wait
    in registers); sparse: + the key rows' valid flags (2 x 64 ints; FP8: 4 x 64)."""
    return 2 * BLOCK_M * D * 3 + XCHG_BYTES + ((4 if fp8 else 2) * BLOCK_M * 4 if sparse else 0)


def seesaw_smem_bytes() -> int:
    """Dynamic shared memory of the seesaw kernel (kernels/mla_decode_seesaw.cu, SMEM_BYTES there)."""
    return SEESAW_SMEM_BYTES


def seesaw_loads(k_cache) -> str:
    """How the seesaw kernel brings the pieces of ``k_cache`` [num_blocks, page, h_kv, d] (the device array launched;
    NumPy in the emulator tests) in: "tma" (the TMA build ``MLA_SEESAW_TMA=1``: bulk tensor copies of 64 x 64
    pieces completing on mbarriers, each piece waited for before its wgmma; page sizes a multiple of 64, 16-byte
    aligned cache: ``_tma.kv_map_reason``) or "cpasync" (every thread copies 16-byte chunks, the whole buffer
    waited for; any page size). MLA_SEESAW_LOADS: "auto" (default) takes "tma" where the map can describe the cache
    and the driver can encode it (``_tma.driver_reason``), else "cpasync"; "tma" forced on a cache it cannot
    describe is a ValueError that says why.

    History: the TMA build (seventh session) was opt-in because racecheck reported hazards on m_A and l accesses
    that full barriers order. The eighth session traced them (hazard by hazard: warps 1-3 of warpgroup 0 against
    warpgroup 1, only in CTAs whose tile runs zero_tail) to racecheck losing the order of a 256-thread named barrier
    after a 128-thread named barrier that only one warpgroup runs -- a pattern a 16-line probe reproduces with no
    copies at all (benchmarks/racecheck_mbarrier_probe.py wg_bar_before). zero_tail's warpgroup now meets on an
    mbarrier, racecheck is clean on the TMA build, and it became the default: H100, kernels only, 128,2,128,8192
    1.484 vs 1.507 ms, 128,1,64,8192 0.450 vs 0.477 (benchmarks/BENCHMARKS.md, eighth session)."""
    from . import _tma

    forced = os.environ.get("MLA_SEESAW_LOADS", "auto") or "auto"
    if forced not in SEESAW_LOADS:
        raise ValueError(f"MLA_SEESAW_LOADS must be one of {SEESAW_LOADS}, got {forced!r}")
    if forced == "cpasync":
        return "cpasync"
    address = int(k_cache.ctypes.data) if isinstance(k_cache, np.ndarray) else int(k_cache.data.ptr)
    reason = _tma.kv_map_reason(address, *(int(x) for x in k_cache.shape)) or _tma.driver_reason()
    if reason and forced == "tma":
        raise ValueError(f"MLA_SEESAW_LOADS=tma: {reason}")
    return "cpasync" if reason else "tma"


SPARSE_KERNELS = ("auto", "hopper", "portable")


def sparse_ok(problem, dev: int) -> bool:
    """Whether the wide kernel's sparse build (mla_decode_hopper_sparse) takes this sparse problem on device
    ``dev``: compute capability 9.0, d = 576, d_v = 512, bf16 (or fp16 with a bf16/fp16 cache), and h_q / h_kv
    a multiple of 64 (a CTA's 64 rows are heads of one query token). MLA_CUPY_SPARSE_KERNEL=portable keeps
    the mma.sync sparse kernel."""
    forced = os.environ.get("MLA_CUPY_SPARSE_KERNEL", "auto") or "auto"
    if forced not in SPARSE_KERNELS:
        raise ValueError(f"MLA_CUPY_SPARSE_KERNEL must be one of {SPARSE_KERNELS}, got {forced!r}")
    if forced == "portable" or not problem.is_sparse or problem.d != D or problem.head_dim_v != DV:
        return False
    dt = np.dtype(problem.q.dtype)
    if dt != _arrays.BFLOAT16 and (problem.is_fp8_kvcache or dt != np.dtype(np.float16)):
        return False
    if (problem.h_q // problem.h_kv) % BLOCK_M:
        return False
    return device_reason(dev) is None


def fp8_variant(problem, dev: int) -> str | None:
    """The Hopper kernel that takes this dense FP8-cache problem on device ``dev`` (compute capability 9.0, bf16 q):
    "regs" (the FP8 register kernel, kernels/mla_decode_fp8_regs.cu) up to NARROW_ROWS (16) query rows a KV head,
    the narrow kernel's FP8 build ("narrow") up to NARROW_MAX_ROWS (32), the wide kernel's ("wide") above; None (the
    mma.sync FP8 kernel of cupy_sparse_fp8) elsewhere. H100: 128,1,16,8192: regs 0.263-0.266 ms = 1.58x the bf16
    narrow kernel's 0.419 (2026-11-27, tenth session), narrow FP8 0.362-0.365, mma.sync 0.796; 128,1,32: narrow
    0.514 (wide 0.556, mma.sync 0.888); 128,2,128: wide 2.09 vs 4.82.
    MLA_CUPY_FP8_KERNEL=portable|regs|narrow|wide forces one (regs / narrow / wide: any row count)."""
    forced = os.environ.get("MLA_CUPY_FP8_KERNEL", "auto") or "auto"
    if forced not in FP8_KERNELS:
        raise ValueError(f"MLA_CUPY_FP8_KERNEL must be one of {FP8_KERNELS}, got {forced!r}")
    if forced == "portable" or problem.is_sparse or not problem.is_fp8_kvcache:
        return None
    if np.dtype(problem.q.dtype) != _arrays.BFLOAT16 or problem.d != D or problem.head_dim_v != DV:
        return None
    if device_reason(dev) is not None:
        return None
    if forced in ("regs", "narrow", "wide"):
        return forced
    rows = problem.s_q * problem.h_q // problem.h_kv
    return "regs" if rows <= NARROW_ROWS else "narrow" if rows <= NARROW_MAX_ROWS else "wide"


NARROW_MAX_ROWS = 2 * NARROW_ROWS
"""The narrow kernel takes up to this many query rows a KV head (16 a CTA, or 32 with -DMLA_NQ=32)."""
WIDE_MIN_ROWS = NARROW_MAX_ROWS + 1
"""``kernel="auto"`` takes the 64-row (wide) kernel from this many query rows a KV head up. H100, in a loop
(benchmarks/BENCHMARKS.md): 32 rows narrow 0.431 ms vs wide 0.527 (portable 0.700); 64 rows wide 0.561 vs
narrow 0.856 (two 32-row tiles re-read the keys) vs portable 1.091; 16 rows narrow 0.424 vs wide 0.508."""


def _forced_variant() -> str:
    forced = os.environ.get("MLA_HOPPER_VARIANT", "auto") or "auto"
    if forced not in VARIANTS:
        raise ValueError(f"MLA_HOPPER_VARIANT must be one of {VARIANTS}, got {forced!r}")
    return forced


def variant(problem) -> str:
    """The Hopper kernel for a dense bf16 / fp16 ``problem`` (``kernel="auto"`` and ``kernel="hopper"`` alike: on an
    H100 a Hopper kernel was measured faster than the portable one at every row count): MLA_HOPPER_VARIANT if
    set, else "narrow" when a KV head has at most NARROW_MAX_ROWS (32) query rows (s_q * h_q / h_kv), else
    "seesaw" (the wide kernel's tile on FlashMLA's schedule; H100, 2026-11-26, same calls: 128,2,128,8192
    1.65-1.68 ms in a loop against the wide kernel's 2.01-2.10, 128,1,128,4096 0.46-0.47 against 0.56;
    benchmarks/BENCHMARKS.md). FP8 caches take the kernel ``fp8_variant`` names."""
    forced = _forced_variant()
    if forced != "auto":
        return forced
    return "narrow" if problem.s_q * problem.h_q // problem.h_kv <= NARROW_MAX_ROWS else "seesaw"


def shape_reason(problem) -> str | None:
    """Why the kernel does not take this problem's shapes / dtype (None when it does)."""
    if problem.is_sparse or problem.is_fp8_kvcache:
        return "the Hopper kernel computes dense bf16/fp16 caches only"
    dt = np.dtype(problem.q.dtype)
    if dt not in (np.dtype(np.float16), _arrays.BFLOAT16):
        return f"the Hopper kernel computes bfloat16 and float16 only, got {_arrays.dtype_name(dt)}"
    if problem.d != D or problem.head_dim_v != DV:
        return f"the Hopper kernel is specialised for d = {D}, d_v = {DV}, got {problem.d}, {problem.head_dim_v}"
    return None


def device_reason(dev: int) -> str | None:
    """Why device ``dev`` cannot run the kernel (None when it can)."""
    from . import cupy_backend as _cb

    major, minor = _cb._capability(dev)
    if (major, minor) != (9, 0):
        return f"the Hopper kernel is sm_90a code (compute capability 9.0), device {dev} is {major}.{minor}"
    smem, need = _cb._max_smem(dev), max(SMEM_BYTES, SEESAW_SMEM_BYTES)
    if smem < need:
        return f"the Hopper kernels need {need} bytes of shared memory a block, device {dev} has {smem}"
    return None


def supports(problem, dev: int | None = None):
    """(True, "") when the Hopper kernel computes this problem on device ``dev``, else (False, the reason).
    The gate is not checked here (``check_gate``)."""
    reason = shape_reason(problem)
    if reason is None:
        try:
            from . import cupy_backend as _cb

            reason = device_reason(_cb._device_id(problem) if dev is None else dev)
        except Exception as exc:  # no GPU / driver
            reason = f"cannot query the GPU: {exc}"
    return (reason is None), (reason or "")


def defines(fp16: bool) -> dict:
    """-D values of the Hopper kernels. bf16 P is rounded once before P V, as FlashMLA does (DESIGN §6 on FlashMLA's
    inputs; docs/decisions.md, 2026-11-26 ninth session); MLA_CUPY_PSPLIT=1 builds the precise variant, P = P_hi +
    P_lo in two products (about 10x smaller rounding error in out, 47% more tensor-core work: 128,2,128,8192 takes
    1.44 instead of 1.04 ms on an H100)."""
    result = {"MLA_FP16": int(bool(fp16))}
    if os.environ.get("MLA_CUPY_PSPLIT") is not None:
        result["MLA_P_SPLIT"] = int(os.environ["MLA_CUPY_PSPLIT"])
    if os.environ.get("MLA_WG_DIAG_SW_SWAP_MN"):  # diagnostics only (mla_wgmma.cuh): the other SW128 reading
        result["MLA_WG_DIAG_SW_SWAP_MN"] = int(os.environ["MLA_WG_DIAG_SW_SWAP_MN"])
    return result


def compile_variants() -> list[dict]:
    """The -D sets compiled by tests/test_hopper_compile.py: bf16 (P rounded once, the default), bf16 with the
    P split (MLA_CUPY_PSPLIT=1), fp16."""
    return [{"MLA_FP16": 0}, {"MLA_FP16": 0, "MLA_P_SPLIT": 1}, {"MLA_FP16": 1}]


def p_split(d: dict) -> bool:
    """Whether a -D set (``defines``) builds the bf16 P = P_hi + P_lo split (the kernels' default: no split, bf16
    P rounded once as FlashMLA does; MLA_CUPY_PSPLIT=1 asks for it)."""
    return bool(d.get("MLA_P_SPLIT", 0))


def assemble(xp, decode_fn, combine_fn, problem, q, k_cache, block_table, seqlens, sched, splits, host_splits=None,
             poison: bool = False, narrow: bool = False, smem: int | None = None, nq: int = NARROW_ROWS,
             seesaw: bool = False, k_map=None, fused_fn=None):
    """Outputs, partial buffers and the launch list [(fn, grid, block, args, smem)] for arrays of the array
    module ``xp`` (CuPy; NumPy for the CPU emulator in the tests): the portable kernel's
    ``cupy_backend.assemble_dense`` with the 64-row kernel's tile, 256 threads and shared memory, or
    (narrow) the narrow kernel's 16-row tile and ``smem`` bytes (``narrow_smem_bytes``). seesaw: the seesaw
    kernel's last parameter, ``k_map`` (its TMA build's tensor map in device memory; None: a null pointer, the
    cp.async build). fused_fn: the decode kernel loaded for cooperative launches, which merges its own split
    sequences (``fused_reason``; ``cupy_backend.assemble_dense``)."""
    from .cupy_backend import assemble_dense

    block_m, smem = (nq, smem) if narrow else (BLOCK_M, smem or SMEM_BYTES)
    launches, out, lse = assemble_dense(xp, decode_fn, combine_fn, problem,
                                        (q, k_cache, block_table, seqlens, sched, splits), host_splits, block_m,
                                        THREADS, smem, poison, fused_fn)
    if not narrow:  # the wide kernel takes the sparse kernel's parameter list (its sparse build shares it)
        fn, grid, block, a, sm = launches[0]
        null = np.uint64(0)
        a = (*a[:5], null, np.int32(0), null, np.int32(0), a[17], *a[5:17])
        if seesaw:
            a = (*a, null if k_map is None else k_map)
        launches[0] = (fn, grid, block, a, sm)
    return launches, out, lse


def prepare(cp, problem, metadata, num_splits, dev, which: str | None = None):
    """Device arrays, outputs and the launch list of one decode on device ``dev`` with the "narrow" or
    "wide" kernel (``which``; None: ``variant(problem)``)."""
    from . import cupy_backend as _cb

    fp8 = bool(problem.is_fp8_kvcache)
    reason = (None if fp8 and fp8_variant(problem, dev) else shape_reason(problem)) or device_reason(dev)
    if reason:
        raise ValueError(f"backend='cupy': {reason}")
    fp16 = np.dtype(problem.q.dtype) == np.float16
    which = which or (fp8_variant(problem, dev) if fp8 else variant(problem))
    if which == "seesaw" and fp8:
        raise ValueError("the seesaw kernel has no FP8 build: an FP8 cache takes 'narrow' or 'wide' (fp8_variant)")
    if which == "regs" and not fp8:
        raise ValueError("the FP8 register kernel ('regs') takes FP8 caches only")
    narrow = which in ("narrow", "regs")
    d = defines(fp16)
    if fp8 and which != "regs":
        d["MLA_FP8"] = 1
    nq = NARROW_ROWS if which == "regs" else narrow_nq(problem)
    if narrow and nq != NARROW_ROWS:
        d["MLA_NQ"] = nq
    source, function = {"narrow": (NARROW_SOURCE, NARROW_FUNCTION), "regs": (FP8_REGS_SOURCE, FP8_REGS_FUNCTION),
                        "seesaw": (SEESAW_SOURCE, SEESAW_FUNCTION)}.get(which, (SOURCE, FUNCTION))
    smem = (FP8_REGS_SMEM_BYTES if which == "regs" else narrow_smem_bytes(p_split(d), nq) if narrow
            else SEESAW_SMEM_BYTES if which == "seesaw" else wide_smem_bytes(fp8))
    arrays = [_cb._to_device(cp, problem.q), _cb._to_device(cp, problem.k_cache),
              _cb._to_device(cp, problem.block_table, np.int32), _cb._to_device(cp, problem.cache_seqlens, np.int32),
              _cb._to_device(cp, metadata, np.int32), _cb._to_device(cp, num_splits, np.int32)]
    k_map = None
    if which == "seesaw" and seesaw_loads(arrays[1]) == "tma":  # the map describes the device array launched
        from . import _tma

        d["MLA_SEESAW_TMA"] = 1
        k_map = _tma.kv_map_device(cp, arrays[1], dev)
        _cb.keep_alive_if_capturing(cp, [k_map])
    fn = _nvrtc.load_function(source, function, d, arch=ARCH)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    fused_fn = None
    if fused_reason(problem, which, grid_ctas(problem, which, int(arrays[4].shape[0])), dev) is None:
        fused_fn = _nvrtc.load_function(source, function, {**d, "MLA_FUSED": 1}, arch=ARCH, cooperative=True)
        if fused_fn.max_dynamic_shared_size_bytes < smem:
            fused_fn.max_dynamic_shared_size_bytes = smem
    comb = _cb.combine_function(DV, fp16, problem.out_float32, problem.b * problem.s_q * problem.h_q)
    host_splits = num_splits if isinstance(num_splits, np.ndarray) else None
    return assemble(cp, fn, comb, problem, *arrays, host_splits=host_splits, poison=_cb.POISON_OUTPUTS,
                    narrow=narrow, smem=smem, nq=nq, seesaw=which == "seesaw", k_map=k_map, fused_fn=fused_fn)


FUSED_KERNELS = ("narrow", "seesaw")


def grid_ctas(problem, which: str, num_workers: int) -> int:
    """CTAs of the grid of kernel ``which`` for ``problem`` on a plan of ``num_workers`` workers: workers x h_kv x
    the row tiles of a KV head (16 or 32 rows for "narrow" / "regs", ``narrow_nq``; 64 otherwise)."""
    tile = (NARROW_ROWS if which == "regs" else narrow_nq(problem)) if which in ("narrow", "regs") else BLOCK_M
    return num_workers * problem.h_kv * -(-(problem.s_q * problem.h_q // problem.h_kv) // tile)


FUSED_MAX_ROWS = 512
"""The fused merge is taken up to this many query rows in all (b s_q h_q): it saves the combine kernel's launch and
ramp, a few microseconds, which matter to small calls; its merge runs on the split sequences' own CTAs only, so on a
large batch (few CTAs a sequence, many rows) the combine kernel, which spreads over the whole GPU, is as fast or
faster (benchmarks/NOTES_cupy.md, 2026-11-27 eleventh session)."""


def fused_combine_mode() -> str:
    """MLA_CUPY_FUSED_COMBINE: "1" (default) -- the narrow and seesaw kernels merge their own split sequences
    (kernels/mla_fused_combine.cuh) when the call has at most FUSED_MAX_ROWS query rows; "all" -- at any size
    (benchmarks); "0" -- never (the combine kernel after them)."""
    value = os.environ.get("MLA_CUPY_FUSED_COMBINE", "1") or "1"
    if value not in ("0", "1", "all"):
        raise ValueError(f"MLA_CUPY_FUSED_COMBINE must be 0, 1 or all, got {value!r}")
    return value


def fused_reason(problem, which: str, ctas: int, dev: int) -> str | None:
    """Why a decode of ``problem`` with kernel ``which`` on a grid of ``ctas`` CTAs may not merge its own split
    sequences (None when it may; kernels/mla_fused_combine.cuh, docs/decisions.md 2026-11-27 eleventh session).
    The CTAs of a sequence wait for each other, so all of them must be resident at once: a cooperative launch, and a
    grid of at most one CTA an SM (these kernels' shared memory allows one; CuPy would silently shrink a larger
    cooperative grid). FP8 caches, out_dtype=float32 and calls of more than FUSED_MAX_ROWS query rows keep the
    combine kernel (``fused_combine_mode``)."""
    mode = fused_combine_mode()
    if mode == "0":
        return "MLA_CUPY_FUSED_COMBINE=0"
    rows = problem.b * problem.s_q * problem.h_q
    if mode == "1" and rows > FUSED_MAX_ROWS:
        return f"{rows} query rows: above FUSED_MAX_ROWS ({FUSED_MAX_ROWS}) the combine kernel is as fast"
    if which not in FUSED_KERNELS:
        return f"only the {' and '.join(FUSED_KERNELS)} kernels merge their own splits, not {which!r}"
    if problem.is_fp8_kvcache:
        return "FP8 caches keep the combine kernel"
    if problem.out_float32:
        return "out_dtype=float32 keeps the combine kernel (every piece is a partial)"
    from . import cupy_backend as _cb

    sms = _cb._num_sms(dev)
    if ctas > sms:
        return f"a grid of {ctas} CTAs cannot be resident at once on {sms} SMs (one CTA an SM)"
    return None
