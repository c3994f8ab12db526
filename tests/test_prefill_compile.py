"""CPU-only checks of the tensor-core prefill kernels (kernels/prefill_mma.cu) and their adapter.

* NVRTC: the source compiles for sm_90a and sm_80 for every (dtype, d_qk, d_v, forward tiling) the
  adapter can pick, without register spills or a local-memory stack (ptxas -v);
* the adapter's kernel choice: "mma" by default wherever it fits (no MLA_CUPY_UNVERIFIED gate since
  the H100 run of 2026-11-25), MLA_PREFILL_KERNEL, dtype / head-dim / shared-memory limits, each
  refusal with its reason;
* the kernels *run* on the CPU through tests/_cuda_emu.py (each CUDA thread a fiber, ldmatrix / mma /
  cp.async emulated from the PTX ISA), driven by the adapter's own launch code on NumPy arrays, against
  the NumPy reference: varlen with empty sequences, causal and not, L_q < L_k and L_q > L_k, GQA,
  dropout (keep bits equal to mla.prefill.dropout_keep_mask), bf16 and fp16, outputs poisoned with NaN,
  and several warp schedules and cp.async timings (a missing barrier or an early buffer refill shows).
  The emulator itself is checked first on mla_decode_portable.cu, which passed its GPU tests on an H100.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from mla import _arrays
from mla.backends import _nvrtc, prefill_cupy

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helpers beside this file, any import mode
import _cuda_emu  # noqa: E402
from _prefill_check import check_against_reference, problem, rel_err  # noqa: E402

BF16 = _arrays.BFLOAT16
ARCHS = ("sm_90a", "sm_80")
H100_SMEM, A100_SMEM, ADA_SMEM = 232448, 166912, 101376




needs_nvrtc = pytest.mark.skipif(_nvrtc.unavailable_reason() is not None,
                                 reason=str(_nvrtc.unavailable_reason()))


def _compile_variants():
    """The -D sets the adapter uses for the MLA shapes on H100 / A100 (8-warp forward) and where only
    the 4-warp forward fits, both dtypes; plus other supported head dims (bf16, 8 warps)."""
    seen = []
    for dtype in (BF16, np.float16):
        for warps in (8, 4):
            seen.append(prefill_cupy.mma_defines(dtype, 192, 128, warps))
    for d, d_v in ((32, 32), (64, 64), (96, 96), (128, 128), (160, 64), (256, 128), (256, 32)):
        seen.append(prefill_cupy.mma_defines(BF16, d, d_v, 8))
    return seen


COMPILE_CASES = [(arch, defines) for arch in ARCHS for defines in _compile_variants()]


@needs_nvrtc
@pytest.mark.parametrize("arch,defines", COMPILE_CASES,
                         ids=[f"{a}-" + "-".join(f"{k}{v}" for k, v in d.items()) for a, d in COMPILE_CASES])
def test_prefill_mma_compiles_without_spills(arch, defines):
    cubin, log = _nvrtc.compile_cubin("prefill_mma.cu", arch, defines)
    assert len(cubin) > 0
    reports = {rep["function"]: rep for rep in _nvrtc.parse_ptxas(log)}
    assert set(reports) == {"prefill_mma_fwd", "prefill_mma_bwd", "prefill_mma_bwd_prep", "prefill_mma_f32_to_elem"}
    for rep in reports.values():
        assert rep["arch"] == arch
        assert rep["spill_stores"] == 0 and rep["spill_loads"] == 0, f"register spills: {rep}\n{log}"
        assert rep["stack"] == 0, f"local-memory stack frame: {rep}\n{log}"
        assert rep["registers"] is not None and rep["registers"] <= 255, rep


def test_smem_bytes_mirror_the_kernel_header():
    # kernels/prefill_mma.cu's header: 137,216 B forward (128 query rows), 148,480 B backward for 192 / 128
    assert prefill_cupy.mma_smem_bytes(192, 128, 8) == (137216, 148480)
    assert prefill_cupy.mma_smem_bytes(192, 128, 4)[0] == 2 * (64 * 200 + 2 * 64 * 200 + 2 * 64 * 136)
    assert prefill_cupy.mma_fwd_warps(192, 128, H100_SMEM) == 8
    assert prefill_cupy.mma_fwd_warps(192, 128, A100_SMEM) == 8
    assert prefill_cupy.mma_fwd_warps(192, 128, 120000) == 4
    assert prefill_cupy.mma_fwd_warps(192, 128, ADA_SMEM) is None


# ---------------------------------------------------------------------------------------------- selection


@pytest.mark.parametrize("gate", [None, "0", "1"])
def test_select_kernel_default_and_override(monkeypatch, gate):
    """The "auto" choice is "mma" wherever it fits, whatever MLA_CUPY_UNVERIFIED says (no gate since the H100 run)."""
    sel = prefill_cupy.select_kernel
    monkeypatch.delenv("MLA_PREFILL_KERNEL", raising=False)
    if gate is None:
        monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    else:
        monkeypatch.setenv("MLA_CUPY_UNVERIFIED", gate)
    for direction in ("fwd", "bwd"):
        for dtype in (BF16, np.float16):
            assert sel(direction, dtype, 192, 128, H100_SMEM) == ("mma", "tensor cores (mma.sync)")
            assert sel(direction, dtype, 192, 128, A100_SMEM)[0] == "mma"
            assert sel(direction, dtype, 192, 128, H100_SMEM, forced="auto")[0] == "mma"
            assert sel(direction, dtype, 192, 128, H100_SMEM, forced="mma")[0] == "mma"
    assert sel("fwd", np.float32, 192, 128, H100_SMEM)[0] == "simt"  # float32 stays on the SIMT kernel
    monkeypatch.setenv("MLA_PREFILL_KERNEL", "simt")
    assert sel("fwd", BF16, 192, 128, H100_SMEM) == ("simt", "MLA_PREFILL_KERNEL=simt")
    assert sel("fwd", BF16, 192, 128, H100_SMEM, forced="mma")[0] == "mma"  # the argument wins
    monkeypatch.setenv("MLA_PREFILL_KERNEL", "tensor")
    with pytest.raises(ValueError, match="MLA_PREFILL_KERNEL"):
        sel("fwd", BF16, 192, 128, H100_SMEM)
    with pytest.raises(ValueError, match="direction"):
        sel("both", BF16, 192, 128, H100_SMEM, forced="auto")


@pytest.mark.parametrize("dtype,d,d_v,smem,why", [
    (np.float32, 192, 128, H100_SMEM, "float16 / bfloat16"),
    (BF16, 200, 128, H100_SMEM, "multiples of 32"),
    (BF16, 192, 192, H100_SMEM, "up to 128"),
    (BF16, 288, 128, H100_SMEM, "up to 256"),
    (BF16, 192, 128, ADA_SMEM, "shared memory"),
])
def test_select_kernel_falls_back_with_a_reason(monkeypatch, dtype, d, d_v, smem, why):
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.delenv("MLA_PREFILL_KERNEL", raising=False)
    kernel, reason = prefill_cupy.select_kernel("bwd", dtype, d, d_v, smem)
    assert kernel == "simt" and why in reason
    assert "MLA_CUPY_UNVERIFIED" not in reason
    with pytest.raises(ValueError, match=why):
        prefill_cupy.select_kernel("bwd", dtype, d, d_v, smem, forced="mma")


# ---------------------------------------------------------------------------------------------- emulator

needs_gxx = pytest.mark.skipif(_cuda_emu.compiler() is None, reason="the CPU emulator needs g++")

_MODULES: dict = {}


def _emu_loader(eager=False, schedule="lockstep"):
    """get_function(name, defines, smem) for prefill_cupy.mma_forward / mma_backward, on the emulator."""

    def get_function(name, defines, smem):
        key = tuple(sorted(defines.items()))
        if key not in _MODULES:
            _MODULES[key] = _cuda_emu.EmuModule("prefill_mma.cu", defines)
        module = _MODULES[key]
        module.configure(eager, schedule)
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = max(smem, 48 * 1024)
        return fn

    return get_function


def _emu_fns(eager, schedule):
    from mla.prefill import _Args
    loader = _emu_loader(eager, schedule)

    def args(q, k, v, cu_q, cu_k, **kw):
        return _Args(q, k, v, cu_q, cu_k, None, None, kw["dropout_p"], kw["softmax_scale"], kw["causal"],
                     kw["seed"], "numpy")

    def forward(q, k, v, cu_q, cu_k, **kw):
        return prefill_cupy.mma_forward(args(q, k, v, cu_q, cu_k, **kw), np, loader, H100_SMEM)

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, **kw):
        return prefill_cupy.mma_backward(args(q, k, v, cu_q, cu_k, **kw), dout, out, lse, np, loader, H100_SMEM)

    return forward, backward


EMU_CASES = [
    # lens_q, lens_k, h, h_k, d, d_v, dtype, causal, dropout_p, cp.async timing (eager?), warp schedule,
    # forward warps (None: the adapter's choice for an H100, 8)
    # varlen: a 130-row sequence (3 key tiles), L_q = 0, L_k = 0 (out 0, lse +inf), a 1-token one
    ([130, 0, 77, 1, 6], [130, 3, 77, 1, 0], 2, 2, 192, 128, BF16, True, 0.0, False, "lockstep", None),
    ([130, 0, 77, 1, 6], [130, 3, 77, 1, 0], 2, 2, 192, 128, BF16, False, 0.2, True, "reverse", None),
    # chunked prefill (L_q < L_k), GQA, dropout
    ([40, 70], [100, 180], 4, 2, 192, 128, BF16, True, 0.2, True, "skewed", None),
    # L_q > L_k: causal rows that see nothing; GQA with one KV head; fp16; other head dims
    ([9, 150], [4, 70], 2, 1, 64, 64, np.float16, True, 0.0, False, "reverse", None),
    # the 4-warp forward (64 query rows a CTA: GPUs with less shared memory)
    ([70, 130], [200, 130], 2, 2, 96, 32, np.float16, True, 0.2, True, "skewed", 4),
]


@needs_gxx
@pytest.mark.parametrize("lens_q,lens_k,h,h_k,d,d_v,dtype,causal,dropout_p,eager,schedule,fwd_warps", EMU_CASES,
                         ids=[f"case{i}" for i in range(len(EMU_CASES))])
def test_mma_kernels_emulated_match_reference(monkeypatch, lens_q, lens_k, h, h_k, d, d_v, dtype, causal,
                                              dropout_p, eager, schedule, fwd_warps):
    monkeypatch.setattr(prefill_cupy, "POISON_OUTPUTS", True)
    if fwd_warps:
        monkeypatch.setenv(prefill_cupy.FWD_WARPS_ENV, str(fwd_warps))
    forward, backward = _emu_fns(eager, schedule)
    check_against_reference(forward, backward, lens_q, lens_k, h, h_k, d, d_v, dtype, causal, dropout_p)


@needs_gxx
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_mma_dropout_bits_emulated(p):
    """v = identity: out[r, h, c] != 0 exactly where the keep bit of (h, r, c) is set."""
    from mla.prefill import dropout_keep_mask
    n, h = 64, 2
    q, k, _, cu_q, cu_k = problem([n], [n], h, h, 32, 32, BF16, seed=3)
    v = np.ascontiguousarray(np.broadcast_to(np.eye(n, dtype=np.float32)[:, None, :], (n, h, n))).astype(BF16)
    forward, _ = _emu_fns(False, "lockstep")
    out, _ = forward(q, k, v, cu_q, cu_k, causal=False, dropout_p=p, seed=99, softmax_scale=32 ** -0.5)
    keep = dropout_keep_mask(99, np.arange(h)[None, :, None], np.arange(n)[:, None, None],
                             np.arange(n)[None, None, :], p)
    np.testing.assert_array_equal(out.astype(np.float32) != 0, keep)


@needs_gxx
def test_emulator_runs_the_gpu_verified_decode_kernel():
    """The emulator's ldmatrix / mma / cp.async semantics reproduce mla_decode_portable.cu (which passed
    157 GPU tests on an H100) against the NumPy reference: the emulator is trustworthy where it counts."""
    import mla
    from mla.backends import cupy_backend
    from mla.testing import make_decode_case
    d, dv, page, b, s_q, h_q = 576, 512, 64, 2, 2, 32
    c = make_decode_case(np.random.default_rng(0), b=b, s_q=s_q, h_q=h_q, h_kv=1, d=d, head_dim_v=dv,
                         page_block_size=page, seqlens=[137, 70], dtype=BF16, causal=True)
    sched, splits = mla.get_mla_metadata(c.cache_seqlens, s_q * h_q, 1, num_sms=2)
    assert list(splits) == [0, 1, 2]  # one split a sequence: the kernel writes out / lse directly
    want, lse_want = mla.flash_mla_with_kvcache(*c.args(), sched, splits, causal=True, backend="numpy")
    block_m, warps, block_n, stages = 64, 8, 64, 2
    defines = {"MLA_D": d, "MLA_DV": dv, "MLA_BLOCK_M": block_m, "MLA_BLOCK_N": block_n, "MLA_NWARPS": warps,
               "MLA_STAGES": stages, "MLA_FP16": 0}
    fn = _cuda_emu.EmuModule("mla_decode_portable.cu", defines).get_function("mla_decode_portable")
    smem = cupy_backend.portable_smem_bytes(d, dv, block_m, block_n, warps, stages)
    fn.max_dynamic_shared_size_bytes = smem
    out = np.full((b, s_q, h_q, dv), np.nan, dtype=BF16)
    lse = np.full((b, h_q, s_q), np.nan, np.float32)
    part = np.full((4, s_q, h_q, dv), np.nan, np.float32)
    lse_part = np.full((4, s_q, h_q), np.nan, np.float32)
    args = (c.q, c.k_cache, c.block_table, np.int32(c.block_table.shape[1]), c.cache_seqlens,
            np.ascontiguousarray(sched, dtype=np.int32), np.ascontiguousarray(splits, dtype=np.int32), part,
            lse_part, out, lse, np.int32(s_q), np.int32(h_q), np.int32(1), np.int32(page),
            np.float32(d ** -0.5 * np.log2(np.e)), np.int32(1), np.int32(0))
    fn((sched.shape[0], 1, -(-(s_q * h_q) // block_m)), (warps * 32,), args, shared_mem=smem)
    assert rel_err(out, want) < 2.01 / 128
    np.testing.assert_allclose(lse, lse_want, rtol=8.01 / 65536, atol=1e-6)


@needs_gxx
def test_emulator_catches_a_missing_barrier():
    """Self-test: prefill_mma.cu without the barrier between writing P / dS and reading them back
    gives NaN (smem starts as NaN bytes) under a skewed warp schedule."""
    src = _nvrtc.read_source("prefill_mma.cu")
    barrier = "__syncthreads();  // the whole P and dS tiles are in smem"
    assert barrier in src
    defines = prefill_cupy.mma_defines(BF16, 32, 32, 8)
    module = _cuda_emu.EmuModule("prefill_mma.cu", defines, source=src.replace(barrier, ""))
    module.configure(False, "skewed")

    def loader(name, defines_asked, smem):
        assert defines_asked == defines
        fn = module.get_function(name)
        fn.max_dynamic_shared_size_bytes = max(smem, 48 * 1024)
        return fn

    from mla.prefill import _Args
    q, k, v, cu_q, cu_k = problem([70], [70], 1, 1, 32, 32, BF16)
    a = _Args(q, k, v, cu_q, cu_k, None, None, 0.0, 0.2, True, 0, "numpy")
    out, lse = prefill_cupy.mma_forward(a, np, loader, H100_SMEM)
    assert not np.isnan(out.astype(np.float32)).any()  # the forward does not use that barrier
    grads = prefill_cupy.mma_backward(a, out, out, lse, np, loader, H100_SMEM)
    assert any(np.isnan(g.astype(np.float32)).any() for g in grads)
