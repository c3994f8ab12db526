"""CPU checks of the CuPy FP8 / sparse decode (issue #5) that need no GPU.

* a NumPy emulation of the kernels' FP8 dequantisation (kernels/mla_decode_fp8.cu ``dequant8`` and
  the work-item indexing of a 656-byte token) equals ``mla.fp8.dequantize_kv_fp8(..., bfloat16)``;
* the tilings ``cupy_sparse_fp8.config`` picks fit the shared memory and the kernels' static rules;
* no gate (verified on an H100 2026-11-25): FP8 / sparse problems are taken without MLA_CUPY_UNVERIFIED,
  "auto" picks CuPy for them on a device, and declined problems say why;
* ``fast_reference`` (the vectorised reference the GPU tests use) equals ``mla.reference``.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from mla import _arrays, api, reference, testing
from mla.backends import BackendUnavailable, cupy_backend, cupy_sparse_fp8
from mla.fp8 import FP8_TOKEN_BYTES, dequantize_kv_fp8, quantize_kv_fp8

BF16 = _arrays.BFLOAT16


# ---------------------------------------------------------------------------------------------
# the vectorised reference used by tests/test_cupy_fp8_sparse_gpu.py


def fast_reference(q, k_cache, block_table, cache_seqlens, head_dim_v, causal=False, is_fp8_kvcache=False,
                   indices=None, topk_length=None, attn_sink=None, softmax_scale=None):
    """mla.reference.flash_mla_reference with per-(sequence, row, KV head) matmuls (fast for h_q = 128,
    topk = 2048). Returns (out [b, s_q, h_q, d_v] in q's dtype, lse float32 [b, h_q, s_q])."""
    q = np.asarray(q)
    b, s_q, h_q, d = q.shape
    scale = np.float32(1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale)
    if is_fp8_kvcache:
        cache = dequantize_kv_fp8(np.asarray(k_cache))
    else:
        cache = np.asarray(k_cache).astype(np.float32)
    nb, page, h_kv, _ = cache.shape
    group = h_q // h_kv
    flat = cache.reshape(nb * page, h_kv, d)
    qf = q.astype(np.float32)
    out = np.zeros((b, s_q, h_q, head_dim_v), np.float32)
    lse = np.full((b, s_q, h_q), -np.inf, np.float32)
    for i in range(b):
        for r in range(s_q):
            if indices is not None:
                idx = np.asarray(indices)[i, r]
                topk = idx.shape[0]
                tl = topk if topk_length is None else int(np.asarray(topk_length)[i])
                keys = flat[idx[(idx >= 0) & (np.arange(topk) < tl)]]
            else:
                L = int(cache_seqlens[i])
                n = min(max(L - s_q + r + 1, 0), L) if causal else L
                pos = np.arange(n)
                keys = cache[np.asarray(block_table)[i, pos // page], pos % page]
            if keys.shape[0] == 0:
                continue
            for g in range(h_kv):
                heads = slice(g * group, (g + 1) * group)
                kg = keys[:, g]
                s = (qf[i, r, heads] @ kg.T) * scale
                m = s.max(axis=-1)
                p = np.exp(s - m[:, None])
                l = p.sum(axis=-1)
                out[i, r, heads] = (p @ kg[:, :head_dim_v]) / l[:, None]
                lse[i, r, heads] = m + np.log(l)
    if attn_sink is not None:
        sink = np.asarray(attn_sink, np.float64)
        lse64 = lse.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            factor = np.where(np.isfinite(lse64), 1.0 / (1.0 + np.exp(sink - lse64)), 0.0)
        out = (out * factor[..., None]).astype(np.float32)
    empty = ~np.isfinite(lse)
    out[empty] = 0
    lse[empty] = np.inf
    return out.astype(q.dtype), np.ascontiguousarray(lse.transpose(0, 2, 1))


# ---------------------------------------------------------------------------------------------
# FP8 dequantisation: NumPy emulation of the kernel's integer / fp32 steps


def emulate_dequant8(codes: np.ndarray, scale: np.float32) -> np.ndarray:
    """kernels/mla_decode_fp8.cu ``dequant8``: 8 e4m3 code bytes and a float32 scale -> 8 bf16."""
    words = np.ascontiguousarray(codes, dtype=np.uint8).view("<u4")  # codes.x, codes.y
    f = []
    for w in words:
        for byte in range(4):
            x = np.array([(int(w) << (24 - 8 * byte)) & 0xFFFFFFFF], np.uint32).view(np.int32)
            bits = (x >> 4).view(np.uint32) & np.uint32(0x87F00000)  # arithmetic shift, as in the kernel
            f.append(bits.view(np.float32)[0])
    f = np.array(f, np.float32)
    with np.errstate(over="ignore", under="ignore"):
        if scale < np.float32(256):
            v = f * (np.float32(scale) * np.float32(2.0**120))
        else:
            v = (f * np.float32(2.0**120)) * np.float32(scale)
    return v.astype(np.float32).astype(ml_dtypes.bfloat16)  # cvt.rn.bf16x2.f32


def emulate_token(raw: np.ndarray) -> np.ndarray:
    """The dequant work items of one 656-byte token (c < 64: 8 codes with scale c >> 4; c >= 64: RoPE)."""
    out = np.zeros(576, ml_dtypes.bfloat16)
    for c in range(72):
        if c < 64:
            scale = raw[512 + (c >> 4) * 4: 516 + (c >> 4) * 4].view("<f4")[0]
            out[c * 8: c * 8 + 8] = emulate_dequant8(raw[c * 8: c * 8 + 8], scale)
        else:
            j = c - 64
            out[512 + j * 8: 520 + j * 8] = raw[528 + j * 16: 544 + j * 16].view("<u2").view(ml_dtypes.bfloat16)
    return out


SCALE_EXPONENTS = [-126, -125, -100, -20, -6, 0, 1, 7, 8, 9, 50, 119, 120]


@pytest.mark.parametrize("k", SCALE_EXPONENTS)
def test_dequant8_every_code(k):
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)  # all but the NaN codes
    scale = np.float32(2.0**k)
    with np.errstate(over="ignore"):  # 2^120 * 448 overflows to inf, in the kernel as in NumPy
        expect = (codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale).astype(ml_dtypes.bfloat16)
    for start in range(0, len(codes) - 7, 8):
        got = emulate_dequant8(codes[start: start + 8], scale)
        np.testing.assert_array_equal(got.view(np.uint16), expect[start: start + 8].view(np.uint16),
                                      err_msg=f"codes {codes[start: start + 8]}, scale 2^{k}")


def test_dequant8_zero_filled_row_is_zero():
    """cp.async zero-fills invalid rows: codes 0 and scale 0 must give exact zeros (not NaN)."""
    got = emulate_dequant8(np.zeros(8, np.uint8), np.float32(0))
    assert not np.isnan(got.astype(np.float32)).any() and (got.astype(np.float32) == 0).all()


def pow2_ok(scale: np.float32) -> bool:
    """kernels/mla_fp8.cuh ``fp8_pow2_ok``: scale = 2^k with -100 <= k <= 7."""
    bits = int(np.array([scale], np.float32).view(np.uint32)[0])
    e = bits >> 23
    return (bits & 0x007FFFFF) == 0 and 27 <= e <= 134


def emulate_dequant8_pow2(codes: np.ndarray, scale: np.float32) -> np.ndarray:
    """kernels/mla_fp8.cuh ``dequant8_pow2`` step by step, on the bits: prmt with sign fill (each code in the low
    byte of a 16-bit lane, its sign bit in all of the high byte), << 4, & 0x87F087F0 (bf16 bits of the code's
    value * 2^-120; E = 0 codes are bf16 subnormals), one bf16 product by bf16(scale * 2^120) (mul.rn.bf16x2: the
    exact fp32 product of two bf16, rounded once; subnormal inputs kept)."""
    c = codes.astype(np.uint32)
    lane = c | np.where(c & 0x80, np.uint32(0xFF00), np.uint32(0))  # prmt selector nibbles 0 / 8 (sign fill)
    bits = ((lane << 4) & np.uint32(0x87F0)).astype(np.uint16)
    values = bits.view(ml_dtypes.bfloat16).astype(np.float32)  # numpy keeps fp32 subnormals
    e = int(np.array([scale], np.float32).view(np.uint32)[0]) >> 23
    mult = np.array([(e + 120) << 7], np.uint16).view(ml_dtypes.bfloat16)[0]
    assert np.float32(mult) == np.float32(scale) * np.float32(2.0**120)
    return (values * np.float32(mult)).astype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("k", [-100, -99, -60, -20, -9, -6, -1, 0, 1, 6, 7])
def test_dequant8_pow2_every_code(k):
    """The Hopper kernels' fast path equals the reference dequantisation on every non-NaN code (negative zero
    and subnormals included) for every scale in its domain."""
    codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    scale = np.float32(2.0**k)
    assert pow2_ok(scale)
    expect = (codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale).astype(ml_dtypes.bfloat16)
    got = emulate_dequant8_pow2(codes, scale)
    np.testing.assert_array_equal(got.view(np.uint16), expect.view(np.uint16), err_msg=f"scale 2^{k}")


def test_dequant8_pow2_e0_codes_are_bf16_subnormals():
    """E = 0 codes (zero, subnormals) reach the multiply as bf16 subnormals: the GPU must not flush them
    (tests/test_cupy_fp8_sparse_gpu.py checks every code through the kernels, exactly)."""
    codes = np.arange(1, 8, dtype=np.uint8)  # +subnormals m * 2^-9
    c = codes.astype(np.uint32)
    bits = ((c << 4) & np.uint32(0x87F0)).astype(np.uint16)
    assert (bits >> 7 == 0).all() and (bits != 0).all()  # exponent field 0, not zero: subnormal


@pytest.mark.parametrize("scale", [2.0**-101, 2.0**8, 2.0**16, 0.0, -1.0, 3.0, 1.5 * 2.0**-8, float("inf"),
                                   float("nan"), 2.0**-127])
def test_dequant8_pow2_domain_excludes(scale):
    """Scales outside 2^-100 .. 2^7, or not powers of two, take the general dequant8."""
    assert not pow2_ok(np.float32(scale))


@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 300.0, 1e30])
def test_token_emulation_matches_dequantize(magnitude):
    rng = np.random.default_rng(int(math.log10(magnitude) + 40))
    kv = (rng.standard_normal((6, 576)) * magnitude).astype(np.float32)
    kv[1, :128] = 0  # an all-zero tile (scale 1)
    kv[2, 128:256] *= 1e-6  # a tile with tiny values next to normal ones
    raw = quantize_kv_fp8(kv)
    assert raw.shape == (6, FP8_TOKEN_BYTES)
    expect = dequantize_kv_fp8(raw, dtype=BF16)
    for t in range(raw.shape[0]):
        np.testing.assert_array_equal(emulate_token(raw[t]).view(np.uint16), expect[t].view(np.uint16))


# ---------------------------------------------------------------------------------------------
# tilings

SMEMS = {"H100": 232448, "A100": 166912, "Ada": 101376}


@pytest.mark.parametrize("gpu", list(SMEMS))
@pytest.mark.parametrize("fp8,sparse", [(True, False), (True, True), (False, True)])
@pytest.mark.parametrize("rows", [1, 16, 17, 32, 64, 128, 256])
def test_config_fits_and_is_valid(gpu, fp8, sparse, rows):
    major = 8 if gpu != "H100" else 9
    cfg = cupy_sparse_fp8.config(576, 512, rows, SMEMS[gpu], fp8, sparse, cupy_sparse_fp8._max_block_m(sparse, major))
    assert cfg is not None, (gpu, fp8, sparse, rows)
    block_m, warps, block_n, stages = cfg
    assert block_m in (16, 32, 64) and stages >= 2 and warps % (block_m // 16) == 0
    cg = warps // (block_m // 16)
    assert block_n % (8 * cg) == 0 and block_n % (2 * warps) == 0
    assert cupy_sparse_fp8.smem_bytes(576, 512, block_m, block_n, warps, stages, fp8, sparse) <= SMEMS[gpu]
    if rows <= 16:
        assert block_m == 16


def test_deepseek_configs_on_h100():
    """The tilings the benchmarks will run (predictions in benchmarks/NOTES_cupy.md)."""
    h100 = SMEMS["H100"]
    assert cupy_sparse_fp8.config(576, 512, 16, h100, True, False) == (16, 8, 64, 3)
    assert cupy_sparse_fp8.config(576, 512, 128, h100, True, True) == (64, 8, 32, 3)
    assert cupy_sparse_fp8.smem_bytes(576, 512, 16, 64, 8, 3, True, False) == 224000


# ---------------------------------------------------------------------------------------------
# no gate: the kernels ran on an H100 (2026-11-25), so they are ordinary, default-eligible paths


def _problem(fp8=False, sparse=False, dtype=BF16):
    rng = np.random.default_rng(0)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=dtype, fp8=fp8)
    indices = testing.make_sparse_indices(rng, case, 64) if sparse else None
    return api._validate(*case.args(), None, False, fp8, indices, None, None, True)


@pytest.fixture
def fake_h100(monkeypatch):
    """cupy_backend's device queries answer as an H100 (compute capability 9.0, 227 KiB of shared memory)."""
    monkeypatch.setattr(cupy_backend, "_device_id", lambda problem: 0)
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (9, 0))
    monkeypatch.setattr(cupy_backend, "_max_smem", lambda dev: SMEMS["H100"])


@pytest.mark.parametrize("gate", [None, "0", "1"])
@pytest.mark.parametrize("fp8,sparse", [(True, False), (False, True), (True, True)])
def test_fp8_and_sparse_supported_without_gate(monkeypatch, fake_h100, fp8, sparse, gate):
    """MLA_CUPY_UNVERIFIED no longer matters for these kernels: unset, "0" or "1", they take the problem."""
    if gate is None:
        monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    else:
        monkeypatch.setenv("MLA_CUPY_UNVERIFIED", gate)
    problem = _problem(fp8, sparse)
    for supports in (cupy_backend.supports, cupy_sparse_fp8.supports):
        assert supports(problem) == (True, "")
    assert not hasattr(cupy_sparse_fp8, "gate_open") and not hasattr(cupy_sparse_fp8, "GATE")


def test_declined_problems_say_why(monkeypatch, fake_h100):
    from mla import backends

    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.setattr(cupy_backend, "available", lambda: (True, ""))
    ok, reason = cupy_backend.supports(_problem(fp8=True, dtype=np.float16))
    assert not ok and "bfloat16 q only" in reason
    with pytest.raises(BackendUnavailable, match="bfloat16 q only"):
        backends.select("cupy", _problem(fp8=True, dtype=np.float16))
    ok, reason = cupy_backend.supports(_problem(sparse=True, dtype=np.float32))
    assert not ok and "bfloat16 and float16 only" in reason
    monkeypatch.setattr(cupy_backend, "_capability", lambda dev: (7, 5))
    ok, reason = cupy_backend.supports(_problem(fp8=True))
    assert not ok and "compute capability >= 8.0" in reason
    for _ok, reason in (cupy_backend.supports(_problem(fp8=True)), cupy_backend.supports(_problem(sparse=True))):
        assert "MLA_CUPY_UNVERIFIED" not in reason and "not yet verified" not in reason


@pytest.mark.parametrize("fp8,sparse", [(True, False), (False, True)])
def test_auto_picks_cupy_on_device_without_gate(monkeypatch, fake_h100, fp8, sparse):
    """backend="auto" for device arrays chooses the CuPy backend for FP8 / sparse problems, env var unset."""
    import dataclasses

    from mla import backends

    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    monkeypatch.setattr(cupy_backend, "available", lambda: (True, ""))
    monkeypatch.setattr(cupy_backend, "_layout_reason", lambda problem: None)  # host arrays stand in for device ones
    problem = dataclasses.replace(_problem(fp8, sparse), on_device=True)
    assert backends.select("auto", problem) is cupy_backend
    assert backends.select("cupy", problem) is cupy_backend


def test_host_inputs_auto_uses_numpy(monkeypatch):
    """Host inputs with backend="auto" still run the NumPy reference (CuPy is for device arrays)."""
    import mla

    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    rng = np.random.default_rng(1)
    case = testing.make_decode_case(rng, b=2, s_q=1, h_q=16, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[10, 70], dtype=BF16, fp8=True)
    out, lse = mla.flash_mla_with_kvcache(*case.args(), is_fp8_kvcache=True, backend="auto")
    out_ref, lse_ref = reference.flash_mla_reference(*case.args(), is_fp8_kvcache=True)
    testing.assert_close(out, lse, out_ref, lse_ref)


def test_without_gpu_declines_cleanly(monkeypatch):
    """supports() answers (False, reason) rather than raising when no GPU is there."""
    if _arrays.gpu_available():
        pytest.skip("a GPU is present")
    monkeypatch.delenv("MLA_CUPY_UNVERIFIED", raising=False)
    ok, reason = cupy_backend.supports(_problem(True, True))
    assert not ok and reason


def test_cupy_backend_routes_only_fp8_and_sparse():
    src = (cupy_backend.__file__)
    text = open(src).read()
    assert text.count("from . import cupy_sparse_fp8") == 2  # supports() and decode(), nothing else


# ---------------------------------------------------------------------------------------------
# fast_reference == mla.reference


@pytest.mark.parametrize("causal,s_q", [(False, 1), (True, 2), (True, 4)])
@pytest.mark.parametrize("fp8", [False, True])
def test_fast_reference_dense(causal, s_q, fp8):
    rng = np.random.default_rng(s_q + 10 * fp8)
    case = testing.make_decode_case(rng, b=3, s_q=s_q, h_q=8, h_kv=2 if not fp8 else 1, d=576, head_dim_v=512,
                                    page_block_size=16, seqlens=[0, 3, 70], dtype=BF16, causal=causal, fp8=fp8)
    got = fast_reference(*case.args(), causal=causal, is_fp8_kvcache=fp8)
    ref = reference.flash_mla_reference(*case.args(), causal=causal, is_fp8_kvcache=fp8)
    testing.assert_close(*got, *ref)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("extras", [False, True])
def test_fast_reference_sparse(fp8, extras):
    rng = np.random.default_rng(3 + fp8)
    h_kv = 1 if fp8 else 2
    case = testing.make_decode_case(rng, b=3, s_q=2, h_q=8, h_kv=h_kv, d=576, head_dim_v=512, page_block_size=16,
                                    seqlens=[0, 5, 90], dtype=BF16, fp8=fp8)
    indices = testing.make_sparse_indices(rng, case, 40, invalid_ratio=0.3)
    topk_length = np.array([40, 7, 25], np.int32) if extras else None
    sink = np.array([0.5, -1, np.inf, -np.inf, 2, 0, 1, -3], np.float32) if extras else None
    got = fast_reference(*case.args(), is_fp8_kvcache=fp8, indices=indices, topk_length=topk_length,
                         attn_sink=sink)
    ref = reference.flash_mla_reference(*case.args(), is_fp8_kvcache=fp8, indices=indices,
                                        topk_length=topk_length, attn_sink=sink)
    testing.assert_close(*got, *ref)
