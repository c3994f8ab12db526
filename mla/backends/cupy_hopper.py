"""Launch preparation for the Hopper (sm_90a, wgmma) MLA decode kernel. NOT YET RUN ON A GPU.

``kernels/mla_decode_hopper.cu`` (building blocks in ``kernels/mla_wgmma.cuh``) compiles with NVRTC
for sm_90a without spills (``tests/test_hopper_compile.py``) and runs on the CPU emulator with a wgmma
model, but it has not executed on a GPU yet. So ``backend="cupy"`` reaches it **only when
``MLA_CUPY_UNVERIFIED=1``** (``mla.backends.UNVERIFIED_GATE``) and the kernel is forced
(``MLA_CUPY_KERNEL=hopper`` or ``decode(..., kernel="hopper")``); forcing it without the gate raises
``BackendUnavailable`` saying so, and ``"auto"`` keeps the portable kernel. The checks to run on an H100
before the gate goes: ``tests/test_wgmma_probe_gpu.py`` (each building block against NumPy), then
``tests/test_cupy_gpu.py -k hopper`` (the case matrix).

Scope: compute capability 9.0 (the sm_90a code runs nowhere else), bfloat16 / float16, d = 576 and
d_v = 512; any page size, h_kv, s_q, h_q (query rows are padded to 64 a CTA). Other problems go to the
portable kernel (``cupy_backend._prepare`` falls back), the reason is ``shape_reason``/``device_reason``.

Same plan, partial buffers and combine kernel as the portable kernel: the launch list is
[mla_decode_hopper (grid (workers, h_kv, ceil(rows / 64)), 256 threads, 229376 B of shared memory),
mla_combine (when a sequence has several splits)].
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
VARIANTS = ("auto", "narrow", "wide")


def narrow_smem_bytes(p_split: bool) -> int:
    """Dynamic shared memory of the narrow kernel: Q (16 rows) + 2 K tiles + 2 P^T tiles + the S^T swap
    area + reductions."""
    npv = 2 * NARROW_ROWS if p_split else NARROW_ROWS
    return 2 * (NARROW_ROWS * D + 2 * BLOCK_M * D + 2 * npv * 64) + 4 * (2 * 8 * 128 + 2 * 4 * NARROW_ROWS)


def variant(problem) -> str:
    """"narrow" when a KV head has at most 16 query rows (s_q * h_q / h_kv), else "wide" (the 64-row
    kernel). MLA_HOPPER_VARIANT=narrow|wide forces one (tests, benchmarks); both compute any shape."""
    forced = os.environ.get("MLA_HOPPER_VARIANT", "auto") or "auto"
    if forced not in VARIANTS:
        raise ValueError(f"MLA_HOPPER_VARIANT must be one of {VARIANTS}, got {forced!r}")
    if forced != "auto":
        return forced
    rows = problem.s_q * problem.h_q // problem.h_kv
    return "narrow" if rows <= NARROW_ROWS else "wide"


def gate_open() -> bool:
    """True only when MLA_CUPY_UNVERIFIED=1 (``mla.backends.UNVERIFIED_GATE``): the kernel has not run on a GPU yet."""
    from . import UNVERIFIED_GATE

    return os.environ.get(UNVERIFIED_GATE, "") == "1"


def gate_reason() -> str:
    from . import UNVERIFIED_GATE

    return ("backend='cupy': the Hopper (wgmma) kernel is written but not yet verified on a GPU (issue #4); "
            f"set {UNVERIFIED_GATE}=1 to use it anyway, or use kernel='portable'")


def check_gate() -> None:
    """Raise BackendUnavailable unless MLA_CUPY_UNVERIFIED=1 (the kernel has not run on a GPU yet)."""
    if not gate_open():
        from . import BackendUnavailable

        raise BackendUnavailable(gate_reason())


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
    smem = _cb._max_smem(dev)
    if smem < SMEM_BYTES:
        return f"the Hopper kernel needs {SMEM_BYTES} bytes of shared memory a block, device {dev} has {smem}"
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
    """-D values of mla_decode_hopper.cu (MLA_CUPY_PSPLIT=0/1 forces the bf16 P = P_hi + P_lo split)."""
    result = {"MLA_FP16": int(bool(fp16))}
    if os.environ.get("MLA_CUPY_PSPLIT") is not None:  # benchmarks
        result["MLA_P_SPLIT"] = int(os.environ["MLA_CUPY_PSPLIT"])
    if os.environ.get("MLA_WG_DIAG_SW_SWAP_MN"):  # diagnostics only (mla_wgmma.cuh): the other SW128 reading
        result["MLA_WG_DIAG_SW_SWAP_MN"] = int(os.environ["MLA_WG_DIAG_SW_SWAP_MN"])
    return result


def compile_variants() -> list[dict]:
    """The -D sets compiled by tests/test_hopper_compile.py: bf16 (P split), bf16 unsplit, fp16."""
    return [{"MLA_FP16": 0}, {"MLA_FP16": 0, "MLA_P_SPLIT": 0}, {"MLA_FP16": 1}]


def p_split(d: dict) -> bool:
    """Whether a -D set (``defines``) builds the bf16 P = P_hi + P_lo split (the kernels' default: bf16)."""
    return bool(d.get("MLA_P_SPLIT", not d.get("MLA_FP16", 0)))


def assemble(xp, decode_fn, combine_fn, problem, q, k_cache, block_table, seqlens, sched, splits, host_splits=None,
             poison: bool = False, narrow: bool = False, smem: int | None = None):
    """Outputs, partial buffers and the launch list [(fn, grid, block, args, smem)] for arrays of the array
    module ``xp`` (CuPy; NumPy for the CPU emulator in the tests): the portable kernel's
    ``cupy_backend.assemble_dense`` with the 64-row kernel's tile, 256 threads and shared memory, or
    (narrow) the narrow kernel's 16-row tile and ``smem`` bytes (``narrow_smem_bytes``)."""
    from .cupy_backend import assemble_dense

    block_m, smem = (NARROW_ROWS, smem) if narrow else (BLOCK_M, SMEM_BYTES)
    return assemble_dense(xp, decode_fn, combine_fn, problem, (q, k_cache, block_table, seqlens, sched, splits),
                          host_splits, block_m, THREADS, smem, poison)


def prepare(cp, problem, metadata, num_splits, dev):
    """Device arrays, outputs and the launch list of one decode on device ``dev`` (no gate check: for
    benchmarks and tests calling it directly; ``cupy_backend.decode`` checks the gate)."""
    from . import cupy_backend as _cb

    reason = shape_reason(problem) or device_reason(dev)
    if reason:
        raise ValueError(f"backend='cupy': {reason}")
    fp16 = np.dtype(problem.q.dtype) == np.float16
    narrow = variant(problem) == "narrow"
    d = defines(fp16)
    smem = narrow_smem_bytes(p_split(d)) if narrow else SMEM_BYTES
    fn = _nvrtc.load_function(NARROW_SOURCE if narrow else SOURCE, NARROW_FUNCTION if narrow else FUNCTION, d,
                              arch=ARCH)
    if fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem
    comb = _cb.combine_function(DV, fp16, problem.out_float32)
    arrays = [_cb._to_device(cp, problem.q), _cb._to_device(cp, problem.k_cache),
              _cb._to_device(cp, problem.block_table, np.int32), _cb._to_device(cp, problem.cache_seqlens, np.int32),
              _cb._to_device(cp, metadata, np.int32), _cb._to_device(cp, num_splits, np.int32)]
    host_splits = num_splits if isinstance(num_splits, np.ndarray) else None
    return assemble(cp, fn, comb, problem, *arrays, host_splits=host_splits, poison=_cb.POISON_OUTPUTS,
                    narrow=narrow, smem=smem)
