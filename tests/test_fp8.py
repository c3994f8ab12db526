"""FlashMLA's 656-byte "FP8 with scale" token layout (mla.fp8): layout, error bounds, validation."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import mla.fp8 as fp8
from mla.fp8 import (
    FP8_NOPE_DIM,
    FP8_NUM_SCALES,
    FP8_ROPE_DIM,
    FP8_TILE,
    FP8_TOKEN_BYTES,
    dequantize_kv_fp8,
    quantize_kv_fp8,
)

BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
F32_MAX = float(np.finfo(np.float32).max)
# Inputs at or above 1.9375 * 2**127 round up past float32's maximum (documented); below is safe.
OVERFLOW_THRESHOLD = np.float32(1.9375 * 2.0**127)
SAFE_MAX = float(np.nextafter(OVERFLOW_THRESHOLD, np.float32(0)))


def scales_of(kv_fp8: np.ndarray) -> np.ndarray:
    """[..., 656] bytes -> the 4 float32 scales [..., 4]."""
    return np.ascontiguousarray(kv_fp8[..., 512:528]).view("<f4")


def assert_within_fp8_bound(x: np.ndarray, kv_fp8: np.ndarray) -> None:
    """|y - x| <= max(2**-4 |x|, 2**-10 s) per latent channel; RoPE equal to the bf16 cast."""
    y = dequantize_kv_fp8(kv_fp8).astype(np.float64)
    x = x.astype(np.float32)
    lead = x.shape[:-1]
    s = np.repeat(scales_of(kv_fp8).astype(np.float64), FP8_TILE, axis=-1)  # [..., 512]
    x_latent = x[..., :FP8_NOPE_DIM].astype(np.float64)
    err = np.abs(y[..., :FP8_NOPE_DIM] - x_latent)
    bound = np.maximum(2.0**-4 * np.abs(x_latent), 2.0**-10 * s)
    assert (err <= bound).all(), f"max excess {(err - bound).max()}"
    # normal range: the relative bound alone
    normal = np.abs(x_latent) >= 2.0**-6 * s
    assert (err[normal] <= 2.0**-4 * np.abs(x_latent[normal])).all()
    rope_expected = x[..., FP8_NOPE_DIM:].astype(BF16).astype(np.float32)
    np.testing.assert_array_equal(y[..., FP8_NOPE_DIM:], rope_expected.astype(np.float64))
    assert y.shape == lead + (576,)


def assert_scales_are_minimal_powers_of_two(x: np.ndarray, kv_fp8: np.ndarray) -> None:
    s = scales_of(kv_fp8).astype(np.float64)
    amax = np.abs(x[..., :FP8_NOPE_DIM].astype(np.float64)).reshape(x.shape[:-1] + (4, 128)).max(-1)
    mantissa, _ = np.frexp(s)
    assert (mantissa == 0.5).all(), "scales must be powers of two"
    assert (amax / s <= 448.0).all()
    zero = amax == 0
    assert (s[zero] == 1.0).all(), "an all-zero tile has scale 1"
    clamped = s == 2.0**-126
    minimal = zero | clamped | (amax / (s / 2) > 448.0)
    assert minimal.all(), "the scale must be the smallest power of two with amax / s <= 448"


# ----------------------------------------------------------------------------- constants / layout


def test_constants():
    assert (FP8_TOKEN_BYTES, FP8_NOPE_DIM, FP8_ROPE_DIM, FP8_TILE, FP8_NUM_SCALES) == (656, 512, 64, 128, 4)
    assert FP8_NOPE_DIM + 4 * FP8_NUM_SCALES + 2 * FP8_ROPE_DIM == FP8_TOKEN_BYTES


def test_exact_layout():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((3, 2, 576)) * [[[1.0]], [[1e-3]], [[1e4]]]).astype(np.float32)
    x[0, 1, 128:256] = 0.0  # an all-zero tile
    q = quantize_kv_fp8(x)
    assert q.dtype == np.uint8 and q.shape == (3, 2, 656)
    # bytes [512, 528): four little-endian float32 powers of two
    s = np.frombuffer(q[..., 512:528].tobytes(), dtype="<f4").reshape(3, 2, 4)
    np.testing.assert_array_equal(s, scales_of(q))
    assert_scales_are_minimal_powers_of_two(x, q)
    assert s[0, 1, 1] == 1.0
    # bytes [528, 656): the bfloat16 of channels 512..575, little-endian
    rope_bits = np.frombuffer(q[..., 528:].tobytes(), dtype="<u2").reshape(3, 2, 64)
    np.testing.assert_array_equal(rope_bits, x[..., 512:].astype(BF16).view(np.uint16))
    # bytes [0, 512): e4m3(x / s) with the tile's scale
    codes = q[..., :512].view(E4M3).astype(np.float32).reshape(3, 2, 4, 128)
    expected = (x[..., :512].reshape(3, 2, 4, 128) / s[..., None]).astype(E4M3).astype(np.float32)
    np.testing.assert_array_equal(codes, expected)


def test_shapes_and_leading_dims():
    x = np.ones(576, np.float32)
    assert quantize_kv_fp8(x).shape == (656,)
    assert dequantize_kv_fp8(quantize_kv_fp8(x)).shape == (576,)
    empty = np.zeros((0, 3, 576), np.float32)
    assert quantize_kv_fp8(empty).shape == (0, 3, 656)
    assert dequantize_kv_fp8(quantize_kv_fp8(empty)).shape == (0, 3, 576)
    cache_shaped = np.full((2, 4, 1, 576), 0.5, np.float32)
    np.testing.assert_array_equal(dequantize_kv_fp8(quantize_kv_fp8(cache_shaped)), cache_shaped)


def test_poison_bytes_decode_to_nan():
    poisoned = np.full((2, 656), 0xFF, np.uint8)
    for dtype in (np.float32, np.float16, BF16):
        assert np.isnan(dequantize_kv_fp8(poisoned, dtype=dtype).astype(np.float32)).all()


# ----------------------------------------------------------------------------- round-trip bounds

finite_f32 = st.floats(min_value=-SAFE_MAX, max_value=SAFE_MAX, allow_nan=False, allow_infinity=False,
                       width=32)


@settings(deadline=None, max_examples=60)
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.just(576)), elements=finite_f32))
def test_round_trip_bound_arbitrary_values(x):
    q = quantize_kv_fp8(x)
    assert_scales_are_minimal_powers_of_two(x, q)
    assert_within_fp8_bound(x, q)


@settings(deadline=None, max_examples=80)
@given(
    seed=st.integers(0, 2**32 - 1),
    tile_exponents=st.lists(st.integers(-149, 127), min_size=4, max_size=4),
    zero_fraction=st.sampled_from([0.0, 0.3, 1.0]),
    dtype=st.sampled_from([np.float32, np.float16, BF16, np.float64]),
)
def test_round_trip_bound_per_tile_magnitudes(seed, tile_exponents, zero_fraction, dtype):
    """Each tile gets its own magnitude, from float32 subnormals (2**-149) to near its maximum."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, (4, 576))
    for tile, exponent in enumerate(tile_exponents):
        x[:, tile * 128:(tile + 1) * 128] *= 2.0**exponent * 1.8
    x[rng.random(x.shape) < zero_fraction] = 0.0
    x = np.clip(x, -SAFE_MAX, SAFE_MAX).astype(np.float32)
    if np.dtype(dtype) == np.float16:
        x = np.clip(x, -65504, 65504)
    x = x.astype(dtype)
    q = quantize_kv_fp8(x)
    x32 = x.astype(np.float32)
    assert_scales_are_minimal_powers_of_two(x32, q)
    assert_within_fp8_bound(x32, q)


@settings(deadline=None, max_examples=60)
@given(seed=st.integers(0, 2**32 - 1), exponents=st.lists(st.integers(-100, 100), min_size=4, max_size=4))
def test_representable_values_round_trip_exactly(seed, exponents):
    """x = e4m3 * s with s the tile's own scale (some |code| in (224, 448]) comes back bit-exact."""
    rng = np.random.default_rng(seed)
    finite_codes = np.array([c for c in range(256) if c & 0x7F != 0x7F], np.uint8)
    codes = rng.choice(finite_codes, size=(5, 512)).view(E4M3).astype(np.float32).reshape(5, 4, 128)
    codes[:, :, 0] = rng.choice([240.0, 256.0, 288.0, 320.0, 448.0, -448.0, -240.0], size=(5, 4))
    s = np.float32(2.0) ** np.array(exponents, np.float32)
    x = np.empty((5, 576), np.float32)
    x[:, :512] = (codes * s[:, None]).reshape(5, 512)
    x[:, 512:] = rng.standard_normal((5, 64)).astype(BF16).astype(np.float32)  # bf16-exact RoPE
    q = quantize_kv_fp8(x)
    np.testing.assert_array_equal(scales_of(q), np.broadcast_to(s, (5, 4)))
    np.testing.assert_array_equal(dequantize_kv_fp8(q), x)


def test_zero_and_extreme_tiles():
    x = np.zeros((4, 576), np.float32)
    x[1, :128] = 1e-45  # float32 subnormals: the scale is clamped at 2**-126
    x[2, :128] = -3.0e38  # near float32's maximum
    x[3, 128] = 448.0
    q = quantize_kv_fp8(x)
    s = scales_of(q)
    assert (s[0] == 1.0).all()
    assert s[1, 0] == np.float32(2.0**-126)
    assert s[2, 0] == np.float32(2.0**120) and s[3, 1] == 1.0
    y = dequantize_kv_fp8(q)
    np.testing.assert_array_equal(y[0], 0.0)
    assert np.isfinite(y).all()
    assert_within_fp8_bound(x, q)


def test_overflow_threshold_is_as_documented():
    x = np.zeros((3, 576), np.float32)
    x[0, :2] = [SAFE_MAX, -SAFE_MAX]
    x[1, :2] = [OVERFLOW_THRESHOLD, -OVERFLOW_THRESHOLD]
    x[2, :2] = [F32_MAX, -F32_MAX]
    with np.errstate(over="ignore"):
        y = dequantize_kv_fp8(quantize_kv_fp8(x))
    np.testing.assert_array_equal(y[0, :2], [240 * 2.0**120, -240 * 2.0**120])
    np.testing.assert_array_equal(y[1:, :2], [[np.inf, -np.inf], [np.inf, -np.inf]])
    np.testing.assert_array_equal(y[:, 2:], 0.0)


def test_dequantize_output_dtypes():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 576)) * 3).astype(np.float32)
    q = quantize_kv_fp8(x)
    y32 = dequantize_kv_fp8(q)
    assert y32.dtype == np.float32
    ybf = dequantize_kv_fp8(q, dtype=BF16)
    assert ybf.dtype == BF16
    np.testing.assert_array_equal(ybf.astype(np.float32), y32)  # e4m3 * 2**k fits bf16 exactly
    y16 = dequantize_kv_fp8(q, dtype="float16")
    np.testing.assert_array_equal(y16, y32.astype(np.float16))
    assert dequantize_kv_fp8(q, dtype="bfloat16").dtype == BF16


# ----------------------------------------------------------------------------- validation


def test_quantize_validation():
    with pytest.raises(ValueError, match=r"kv: expected shape \[\.\.\., 576\], got \(2, 512\)"):
        quantize_kv_fp8(np.zeros((2, 512), np.float32))
    with pytest.raises(TypeError, match="kv: expected dtype .* got int32"):
        quantize_kv_fp8(np.zeros((2, 576), np.int32))
    for bad in (np.nan, np.inf, -np.inf):
        x = np.zeros((2, 576), np.float32)
        x[1, 600 - 100] = bad
        with pytest.raises(ValueError, match="kv: expected finite"):
            quantize_kv_fp8(x)
    x = np.zeros((2, 576), np.float32)
    x[0, 570] = np.nan  # the RoPE part too
    with pytest.raises(ValueError, match="kv"):
        quantize_kv_fp8(x)


def test_dequantize_validation():
    with pytest.raises(TypeError, match="kv_fp8: expected dtype uint8 .* got float32"):
        dequantize_kv_fp8(np.zeros((2, 656), np.float32))
    with pytest.raises(ValueError, match=r"kv_fp8: expected shape \[\.\.\., 656\], got \(2, 576\)"):
        dequantize_kv_fp8(np.zeros((2, 576), np.uint8))
    with pytest.raises(TypeError, match="dtype: expected float32, float16 or bfloat16, got float64"):
        dequantize_kv_fp8(np.zeros((2, 656), np.uint8), dtype=np.float64)


# ----------------------------------------------------------------------------- device (bit-level) path


def test_bit_level_e4m3_encoder_matches_ml_dtypes():
    """The encoder used off NumPy (CuPy) equals ml_dtypes' cast, ties to even included."""
    step_patterns = np.arange(0, 0x43E00001, 997, dtype=np.uint32).view(np.float32)  # 0 .. 448
    grid = np.arange(256, dtype=np.uint8)
    grid = grid[(grid & 0x7F) < 0x7E].view(E4M3).astype(np.float64)
    grid = np.unique(np.abs(grid))
    ties = ((grid[1:] + grid[:-1]) / 2).astype(np.float32)  # exact midpoints
    nudged = np.concatenate([np.nextafter(ties, 0), np.nextafter(ties, np.inf)]).astype(np.float32)
    extremes = np.array([448.0, 2.0**-10, 2.0**-6], np.float32)
    y = np.concatenate([step_patterns, ties, nudged, grid.astype(np.float32), extremes])
    y = np.concatenate([y, -y])
    ours = fp8._float32_to_e4m3_codes(np, y)
    np.testing.assert_array_equal(ours, y.astype(E4M3).view(np.uint8))


def test_bit_level_bfloat16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    specials = np.array([F32_MAX, -F32_MAX, np.inf, -np.inf, 0.0, -0.0, 1e-45], np.float32)
    x = np.concatenate([x, specials])
    not_nan = ~np.isnan(x)
    ours = fp8._float32_to_bfloat16_bits(np, x)
    np.testing.assert_array_equal(ours[not_nan], x[not_nan].astype(BF16).view(np.uint16))
    assert np.isnan(ours[~not_nan].view(BF16).astype(np.float32)).all()
    back = fp8._bfloat16_bits_to_float32(np, ours[not_nan])
    np.testing.assert_array_equal(back, x[not_nan].astype(BF16).astype(np.float32))


class _NotNumpy:
    """NumPy under another name: makes mla.fp8 take its generic (CuPy) code path on the host."""

    def __getattr__(self, name):
        return getattr(np, name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16])
def test_generic_xp_path_matches_numpy_path(monkeypatch, dtype):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((7, 576)) * np.exp(rng.uniform(-20, 20, (7, 1)))).astype(np.float32)
    x[0, :256] = 0
    x = np.clip(x, -60000, 60000).astype(dtype)
    expected_q = quantize_kv_fp8(x)
    expected_y = {d: dequantize_kv_fp8(expected_q, dtype=d) for d in (np.float32, np.float16, BF16)}
    monkeypatch.setattr(fp8, "_array_module", lambda array: _NotNumpy())
    q = quantize_kv_fp8(x)
    np.testing.assert_array_equal(q, expected_q)
    for d, y in expected_y.items():
        got = dequantize_kv_fp8(q, dtype=d)
        assert got.dtype == np.dtype(d)
        np.testing.assert_array_equal(got.view(np.uint8), y.view(np.uint8))
    poisoned = dequantize_kv_fp8(np.full((1, 656), 0xFF, np.uint8), dtype=BF16)
    assert np.isnan(poisoned.astype(np.float32)).all()


@pytest.mark.gpu
def test_cupy_round_trip_matches_numpy():
    cp = pytest.importorskip("cupy")
    try:
        if cp.cuda.runtime.getDeviceCount() == 0:
            pytest.skip("no CUDA device")
    except Exception:
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((9, 576)) * 10).astype(np.float32)
    q = quantize_kv_fp8(cp.asarray(x))
    assert isinstance(q, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(q), quantize_kv_fp8(x))
    y = dequantize_kv_fp8(q)
    assert isinstance(y, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(y), dequantize_kv_fp8(quantize_kv_fp8(x)))
