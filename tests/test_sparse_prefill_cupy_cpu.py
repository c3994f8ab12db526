"""CPU checks of the CuPy sparse prefill kernel (issue #5) that need no GPU.

* ``emulate_kernel``: a NumPy model of kernels/mla_sparse_prefill.cu's steps (tiles of BLOCK_N list
  positions, validity flags, scores in base 2, online softmax, P rounded to the 16-bit type as
  P_hi + P_lo, the sink folded into the normaliser) matches the reference within DESIGN §6's
  tolerances, so the algorithm the kernel runs is right before it ever runs;
* the tilings ``cupy_sparse_prefill.config`` picks fit the shared memory and the kernel's static rules;
* no gate (the kernel was verified on an H100 2026-11-25): ``supports`` takes the problem and
  ``backend="cupy"`` runs the kernel without MLA_CUPY_UNVERIFIED; declined problems and
  ``backend="cupy"`` without a GPU give a clear reason / BackendUnavailable.

``make_case`` (poisoned inputs) and ``reference`` are shared with tests/test_sparse_prefill_gpu.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import mla
from mla import _arrays, testing
from mla.backends import BackendUnavailable, cupy_backend, cupy_sparse_prefill
from mla.sparse import sparse_prefill_reference

BF16 = _arrays.BFLOAT16
SMEMS = {"H100": 232448, "A100": 166912, "Ada": 101376}
LOG2E = 1.0 / math.log(2.0)
LSE_ATOL = 4e-6
"""lse / max_logits absolute tolerance: fp32 accumulation of d = 576 products differs from the float64
reference by up to ~1.5e-6 in base-2 units, which DESIGN's 1e-6 only covers away from zero."""


# ---------------------------------------------------------------------------------------------
# inputs and reference (shared with the GPU tests)


def make_case(rng, s_q=3, h_q=16, h_kv=1, s_kv=300, d=576, d_v=512, topk=64, invalid=0.0, dtype=BF16,
              topk_length=False, sink=None, scale=1.0):
    """Random arguments of ``flash_mla_sparse_fwd``, poisoned where a kernel must not look.

    Half the kv rows (those no counted index points to) hold NaN; indices past a row's topk_length
    point at NaN rows (valid positions the kernel must not read); a fraction ``invalid`` of the
    counted entries is -1. sink: None, "finite", "+inf", "-inf" or "mixed" (finite, +inf and -inf
    heads). Returns a dict of keyword arguments (sm_scale = d^-0.5).
    """
    n_used = max(1, s_kv // 2)
    perm = rng.permutation(s_kv)
    used, unused = perm[:n_used], perm[n_used:]
    kv = np.full((s_kv, h_kv, d), np.nan, np.float32)
    kv[used] = rng.standard_normal((n_used, h_kv, d)) * scale
    q = rng.standard_normal((s_q, h_q, d)) * scale
    idx = rng.choice(used, size=(s_q, h_kv, topk)).astype(np.int32)
    idx[rng.random(idx.shape) < invalid] = -1
    tl = None
    if topk_length:
        tl = rng.integers(0, topk + 1, size=s_q).astype(np.int32)
        if unused.size:
            for r in range(s_q):
                idx[r, :, tl[r]:] = rng.choice(unused, size=(h_kv, topk - tl[r]))
    attn_sink = None
    if sink == "finite":
        attn_sink = rng.standard_normal(h_q).astype(np.float32) * 2
    elif sink in ("+inf", "-inf"):
        attn_sink = np.full(h_q, np.inf if sink == "+inf" else -np.inf, np.float32)
    elif sink == "mixed":
        attn_sink = rng.choice(np.array([-np.inf, np.inf, -1.0, 0.5, 3.0], np.float32), size=h_q)
    elif sink is not None:
        raise ValueError(sink)
    dtype = _arrays.resolve_dtype(dtype)
    return dict(q=q.astype(dtype), kv=kv.astype(dtype), indices=idx, sm_scale=d ** -0.5, d_v=d_v,
                attn_sink=attn_sink, topk_length=tl)


def reference(args):
    """(out [s_q, h_q, d_v] in q's dtype, max_logits, lse) from the NumPy reference in float64."""
    a = {k: _arrays.asnumpy(v) if v is not None and not isinstance(v, (int, float)) else v for k, v in args.items()}
    return sparse_prefill_reference(a["q"], a["kv"], a["indices"], a["sm_scale"], a["d_v"], a["attn_sink"],
                                    a["topk_length"], compute_dtype=np.float64)


def assert_results_close(got, ref, lse_atol=LSE_ATOL):
    """out / lse with DESIGN §6's tolerances (testing.assert_close), max_logits like lse."""
    out, ml, lse = (_arrays.asnumpy(x) for x in got)
    out_ref, ml_ref, lse_ref = ref
    assert out.dtype == out_ref.dtype and ml.dtype == np.float32 and lse.dtype == np.float32
    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=lse_atol)
    ml, ml_ref = ml.astype(np.float64), ml_ref.astype(np.float64)
    assert not np.isnan(ml).any(), "max_logits has NaN"
    np.testing.assert_array_equal(np.isneginf(ml), np.isneginf(ml_ref), err_msg="max_logits -inf positions")
    fin = np.isfinite(ml_ref)
    np.testing.assert_allclose(ml[fin], ml_ref[fin], atol=lse_atol, rtol=testing.LSE_RTOL, err_msg="max_logits")


# ---------------------------------------------------------------------------------------------
# the kernel's algorithm in NumPy


def _round16(x, dtype):
    return x.astype(np.float32).astype(dtype).astype(np.float32)


def emulate_kernel(q, kv, indices, sm_scale, d_v, attn_sink=None, topk_length=None, block_n=32, p_split=None):
    """kernels/mla_sparse_prefill.cu step by step (one CTA = one (r, g); all heads of the group at once)."""
    dtype = q.dtype
    p_split = dtype == BF16 if p_split is None else p_split
    s_q, h_q, d = q.shape
    s_kv, h_kv, _ = kv.shape
    topk = indices.shape[-1]
    group = h_q // h_kv
    scale_log2 = np.float32(sm_scale * LOG2E)
    out = np.zeros((s_q, h_q, d_v), np.float32)
    max_logits = np.full((s_q, h_q), -np.inf, np.float32)
    lse = np.full((s_q, h_q), np.inf, np.float32)
    kvf, qf = kv.astype(np.float32), q.astype(np.float32)
    for r in range(s_q):
        n = topk if topk_length is None else min(int(topk_length[r]), topk)
        for g in range(h_kv):
            heads = slice(g * group, (g + 1) * group)
            m = np.full(group, -np.inf, np.float32)
            l = np.zeros(group, np.float32)
            o = np.zeros((group, d_v), np.float32)
            for t in range(-(-n // block_n)):
                pos = t * block_n + np.arange(block_n)
                j = np.where(pos < n, indices[r, g, np.minimum(pos, topk - 1)], -1)
                valid = (j >= 0) & (j < s_kv)  # the smem flags; invalid rows zero-filled
                keys = np.where(valid[:, None], kvf[np.clip(j, 0, s_kv - 1), g], np.float32(0))
                s = (qf[r, heads] @ keys.T) * scale_log2
                s[:, ~valid] = -np.inf
                mn = np.maximum(m, s.max(axis=1))
                mu = np.where(mn == -np.inf, np.float32(0), mn)
                alpha = np.exp2(m - mu)
                p = np.exp2(s - mu[:, None])
                l = l * alpha + p.sum(axis=1)
                p_hi = _round16(p, dtype)
                pv = p_hi @ keys[:, :d_v]
                if p_split:
                    pv = pv + _round16(p - p_hi, dtype) @ keys[:, :d_v]
                o = o * alpha[:, None] + pv
                m = mn
            with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
                sink_term = (np.zeros(group, np.float32) if attn_sink is None
                             else np.exp2(attn_sink[heads] * np.float32(LOG2E) - m))
                inv = np.where(l > 0, 1 / (l + sink_term), 0).astype(np.float32)
                out[r, heads] = o * inv[:, None]
                lse[r, heads] = np.where(l > 0, m + np.log2(l), np.inf)
                max_logits[r, heads] = np.where(l > 0, m * np.float32(math.log(2.0)), -np.inf)
    return out.astype(dtype), max_logits, lse


EMULATION_CASES = [
    dict(h_q=16, topk=64),
    dict(h_q=16, topk=64, invalid=0.5, topk_length=True),
    dict(h_q=64, topk=512, invalid=0.5, sink="finite"),
    dict(h_q=128, topk=300, sink="mixed", topk_length=True),
    dict(h_q=16, topk=64, invalid=1.0, sink="+inf"),
    dict(h_q=6, h_kv=2, topk=40, d=40, d_v=33, invalid=0.5, sink="-inf"),
    dict(h_q=16, topk=2048, s_q=1, s_kv=4096, scale=2.0),  # peaked softmax
    dict(h_q=16, topk=8, s_q=6, invalid=0.5, scale=3.0),   # few keys, P concentrated (needs P_lo in bf16)
]


@pytest.mark.parametrize("dtype", [BF16, np.float16])
@pytest.mark.parametrize("case", EMULATION_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_emulated_kernel_matches_reference(case, dtype):
    rng = np.random.default_rng(len(str(case)) + (dtype == BF16))
    args = make_case(rng, dtype=dtype, **case)
    block_n = 64 if args["q"].shape[1] <= 32 else 32
    assert_results_close(emulate_kernel(**args, block_n=block_n), reference(args))


def test_sink_folded_into_normaliser():
    """o / (l + 2^(sink log2 e - m)) == o / l / (1 + e^(sink - lse_e)), including sink = +-inf."""
    m, l = np.float32(1.7), np.float32(5.5)
    lse_e = (m + np.log2(l)) * math.log(2.0)
    for sink in (-np.inf, -3.0, 0.0, 2.5, 40.0, np.inf):
        with np.errstate(over="ignore"):
            folded = 1 / (l + np.exp2(np.float32(sink) * np.float32(LOG2E) - m))
            expect = 1 / l / (1 + np.exp(sink - lse_e))
        np.testing.assert_allclose(folded, expect, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------
# the kernel itself on the CPU (tests/_cuda_emu.py: each CUDA thread a fiber, mma.sync / ldmatrix /
# cp.async emulated per the PTX ISA, shared memory starting as NaN bytes)


def run_kernel_emulated(args, cfg):
    """kernels/mla_sparse_prefill.cu with tiling ``cfg`` on the CPU emulator; outputs poisoned first."""
    emu = pytest.importorskip("_cuda_emu", reason="the CPU emulator of the CUDA sources (tests/_cuda_emu.py)")
    if emu.compiler() is None:
        pytest.skip("g++ is not on PATH (needed by the CPU emulator)")
    q, kv, idx = args["q"], args["kv"], args["indices"]
    (s_q, h_q, d), (s_kv, h_kv, _), topk, dv = q.shape, kv.shape, idx.shape[-1], args["d_v"]
    block_m, warps, block_n, stages = cfg
    fn = emu.EmuModule(cupy_sparse_prefill.SOURCE, cupy_sparse_prefill.defines(d, dv, cfg, q.dtype == np.float16)
                       ).get_function(cupy_sparse_prefill.FUNCTION)
    out = np.full((s_q, h_q, dv), 0xFFFF, np.uint16)  # NaN in bf16 and fp16
    max_logits, lse = np.full((s_q, h_q), np.nan, np.float32), np.full((s_q, h_q), np.nan, np.float32)
    ptrs = [np.ascontiguousarray(q).view(np.uint16), np.ascontiguousarray(kv).view(np.uint16), idx,
            args["topk_length"], args["attn_sink"], out, max_logits, lse]
    scalars = [h_q, h_kv, s_kv, topk, np.float32(args["sm_scale"] * LOG2E).item()]
    ctas = s_q * h_kv * -(-(h_q // h_kv) // block_m)
    smem = cupy_sparse_prefill.smem_bytes(d, dv, block_m, block_n, warps, stages)
    # the emulator's ctypes entry point directly: it takes None as a null pointer (no topk_length / sink)
    fn._fn(ctas, 1, 1, warps * 32, smem, *[None if a is None else a.ctypes.data for a in ptrs], *scalars)
    return out.view(q.dtype), max_logits, lse


EMULATOR_CASES = [  # (tiling, make_case arguments): every tiling the backend picks on H100 / A100 / Ada
    ((16, 8, 64, 2), dict(s_q=2, h_q=16, s_kv=300, topk=70, invalid=0.3, topk_length=True, sink="mixed")),
    ((64, 8, 32, 2), dict(s_q=1, h_q=128, s_kv=4096, topk=300, invalid=0.3, sink="mixed", topk_length=True)),
    ((64, 8, 32, 2), dict(s_q=2, h_q=64, s_kv=300, topk=33)),
    ((64, 8, 32, 2), dict(s_q=1, h_q=64, s_kv=4096, topk=2048, scale=2.0)),
    ((32, 8, 64, 2), dict(s_q=2, h_q=32, s_kv=300, topk=100, invalid=0.5, sink="finite")),
    ((16, 8, 64, 2), dict(s_q=2, h_q=16, s_kv=300, topk=64, invalid=1.0, sink="+inf")),
    ((16, 8, 64, 2), dict(s_q=2, h_q=9, h_kv=3, s_kv=50, d=40, d_v=33, topk=70, invalid=0.3, topk_length=True,
                          sink="mixed")),
    ((16, 8, 64, 2), dict(s_q=2, h_q=6, h_kv=2, s_kv=50, d=128, d_v=128, topk=20, invalid=0.3, dtype=np.float16,
                          sink="-inf")),
    ((64, 8, 64, 2), dict(s_q=2, h_q=96, s_kv=60, d=192, d_v=128, topk=40, invalid=0.2, topk_length=True)),
    ((16, 4, 32, 2), dict(s_q=1, h_q=16, s_kv=80, topk=50, invalid=0.2, dtype=np.float16)),
    ((32, 8, 32, 2), dict(s_q=1, h_q=32, s_kv=80, topk=50, invalid=0.2)),
    ((32, 4, 16, 2), dict(s_q=1, h_q=64, s_kv=80, topk=40, invalid=0.2, sink="finite")),
    ((64, 8, 32, 3), dict(s_q=2, h_q=64, s_kv=1000, topk=200, invalid=0.3)),
    ((16, 8, 64, 2), dict(s_q=1, h_q=1, s_kv=5, d=16, d_v=16, topk=3)),
]


@pytest.mark.parametrize("cfg,case", EMULATOR_CASES,
                         ids=[f"{c}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for c, kw in EMULATOR_CASES])
def test_kernel_on_cpu_emulator(cfg, case):
    args = make_case(np.random.default_rng(len(str(case))), **case)
    assert_results_close(run_kernel_emulated(args, cfg), reference(args))


# ---------------------------------------------------------------------------------------------
# tilings


@pytest.mark.parametrize("gpu", list(SMEMS))
@pytest.mark.parametrize("group", [1, 3, 16, 17, 32, 64, 128])
@pytest.mark.parametrize("d,d_v", [(576, 512), (64, 48), (40, 33), (256, 256), (192, 128)])
def test_config_fits_and_is_valid(gpu, group, d, d_v):
    cfg = cupy_sparse_prefill.config(d, d_v, group, SMEMS[gpu])
    assert cfg is not None, (gpu, group, d, d_v)
    block_m, warps, block_n, stages = cfg
    rg = block_m // 16
    assert block_m in (16, 32, 64) and stages >= 2 and warps % rg == 0
    cg = warps // rg
    assert block_n % 16 == 0 and block_n % (8 * cg) == 0 and block_n % (2 * warps) == 0
    assert -(-d_v // (16 * cg)) * (16 * cg) // (8 * cg) <= 32  # O accumulator in registers
    assert cupy_sparse_prefill.smem_bytes(d, d_v, block_m, block_n, warps, stages) <= SMEMS[gpu]
    if group <= 16:
        assert block_m == 16


def test_deepseek_tilings():
    """What the benchmark runs on an H100, and that nothing fits a tiny shared memory."""
    h100 = SMEMS["H100"]
    assert cupy_sparse_prefill.config(576, 512, 128, h100) == (64, 8, 32, 2)
    assert cupy_sparse_prefill.config(576, 512, 64, h100) == (64, 8, 32, 2)
    assert cupy_sparse_prefill.config(576, 512, 16, h100) == (16, 8, 64, 2)
    assert cupy_sparse_prefill.smem_bytes(576, 512, 64, 32, 8, 2) == 160000
    assert cupy_sparse_prefill.config(576, 512, 128, 20000) is None


def test_config_can_be_forced(monkeypatch):
    monkeypatch.setenv("MLA_CUPY_SPARSE_CONFIG", "8,32,3")
    assert cupy_sparse_prefill.config(576, 512, 128, SMEMS["H100"]) == (64, 8, 32, 3)


def test_compile_variants_cover_deepseek():
    variants = cupy_sparse_prefill.compile_variants("sm_90a", (SMEMS["H100"],))
    tilings = {(v["MLA_BLOCK_M"], v["MLA_NWARPS"], v["MLA_BLOCK_N"], v["MLA_STAGES"], v["MLA_FP16"])
               for v in variants if v["MLA_D"] == 576}
    assert {(64, 8, 32, 2, 0), (64, 8, 32, 2, 1), (16, 8, 64, 2, 0), (32, 8, 64, 2, 0)} <= tilings


def test_psplit_override(monkeypatch):
    monkeypatch.setenv("MLA_CUPY_PSPLIT", "0")
    assert cupy_sparse_prefill.defines(576, 512, (64, 8, 32, 2), False)["MLA_P_SPLIT"] == 0
    monkeypatch.delenv("MLA_CUPY_PSPLIT")
    assert "MLA_P_SPLIT" not in cupy_sparse_prefill.defines(576, 512, (64, 8, 32, 2), False)


# ---------------------------------------------------------------------------------------------
# backend selection (no gate: the kernel ran on an H100, 2026-11-25)


def _small_args():
    return make_case(np.random.default_rng(3), s_q=2, h_q=16, s_kv=40, topk=8)


@pytest.fixture
def fake_h100(monkeypatch):
    """The device queries answer as an H100 (compute capability 9.0, 227 KiB of shared memory)."""
    monkeypatch.setattr(cupy_sparse_prefill, "_device_of", lambda q: 0)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: SMEMS["H100"])


@pytest.mark.parametrize("gate", [None, "0", "1"])
def test_supported_without_gate(monkeypatch, fake_h100, gate):
    """MLA_CUPY_UNVERIFIED no longer matters for this kernel: unset, "0" or "1", it takes the problem."""
    if gate is None:
        monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    else:
        monkeypatch.setenv("MLA_CUPY_UNVERIFIED", gate)
    a = _small_args()
    assert cupy_sparse_prefill.supports(a["q"], a["kv"], a["indices"], a["d_v"]) == (True, "")
    assert not hasattr(cupy_sparse_prefill, "gate_reason")


def test_backend_cupy_runs_the_kernel_without_gate(monkeypatch, fake_h100):
    """flash_mla_sparse_fwd(backend="cupy") hands a problem the kernel computes to it, env var unset."""
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.setattr(cupy_sparse_prefill, "available", lambda: (True, ""))
    calls = []

    def fake_kernel(q, kv, indices, sm_scale, d_v, attn_sink, topk_length):
        calls.append((q.shape, kv.shape, indices.shape, sm_scale, d_v))
        return "kernel result"

    monkeypatch.setattr(cupy_sparse_prefill, "sparse_prefill", fake_kernel)
    a = _small_args()
    assert mla.flash_mla_sparse_fwd(**a, backend="cupy") == "kernel result"
    assert calls == [(a["q"].shape, a["kv"].shape, a["indices"].shape, float(a["sm_scale"]), int(a["d_v"]))]


def test_compute_capability_below_8_declined(monkeypatch, fake_h100):
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (7, 5))
    a = _small_args()
    ok, reason = cupy_sparse_prefill.supports(a["q"], a["kv"], a["indices"], a["d_v"])
    assert not ok and "compute capability >= 8.0" in reason


def test_float32_declined_with_reason():
    a = make_case(np.random.default_rng(4), s_q=1, h_q=4, s_kv=10, d=16, d_v=16, topk=4, dtype=np.float32)
    ok, reason = cupy_sparse_prefill.supports(a["q"], a["kv"], a["indices"], a["d_v"])
    assert not ok and "float32" in reason and "backend='numpy'" in reason


def test_d_not_multiple_of_8_declined():
    a = make_case(np.random.default_rng(5), s_q=1, h_q=4, s_kv=10, d=12, d_v=8, topk=4)
    ok, reason = cupy_sparse_prefill.supports(a["q"], a["kv"], a["indices"], a["d_v"])
    assert not ok and "d % 8 == 0" in reason


def test_cupy_backend_without_gpu_raises_clearly(monkeypatch):
    if _arrays.gpu_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    a = _small_args()
    with pytest.raises(BackendUnavailable, match=r"flash_mla_sparse_fwd: backend='cupy' is not available here"):
        mla.flash_mla_sparse_fwd(**a, backend="cupy")


def test_without_gpu_declines_cleanly(monkeypatch):
    """supports() answers (False, reason) rather than raising when no GPU is there."""
    if _arrays.gpu_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    a = _small_args()
    ok, reason = cupy_sparse_prefill.supports(a["q"], a["kv"], a["indices"], a["d_v"])
    assert not ok and reason


def test_auto_on_host_is_the_reference(monkeypatch):
    """Host inputs with backend="auto" run the NumPy reference (the kernel is for CuPy inputs)."""
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    a = _small_args()
    got = mla.flash_mla_sparse_fwd(**a, backend="auto")
    assert all(isinstance(x, np.ndarray) for x in got)
    want = mla.flash_mla_sparse_fwd(**a, backend="numpy")
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be"):
        mla.flash_mla_sparse_fwd(**_small_args(), backend="numba")


def test_bf16_needs_p_split():
    """Why the kernel splits bf16 P into P_hi + P_lo: with P rounded once (8 mantissa bits) a few
    outputs near zero miss DESIGN §6's tolerance (the same finding as the decode kernels')."""
    args = make_case(np.random.default_rng(len(str(EMULATION_CASES[0])) + 1), dtype=BF16, **EMULATION_CASES[0])
    with pytest.raises(AssertionError, match="out"):
        assert_results_close(emulate_kernel(**args, block_n=64, p_split=False), reference(args))
