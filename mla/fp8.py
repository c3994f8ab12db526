"""FlashMLA's "FP8 with scale" KV-cache layout: quantize and dequantize latent-cache tokens.

One token of one KV head, ``d = 576`` channels (512 latent "NoPE" + 64 RoPE), is stored as
``FP8_TOKEN_BYTES = 656`` bytes (little-endian)::

    bytes [  0, 512)   512 x float8_e4m3fn   q_c = e4m3(kv[c] / s_t),  c in [0, 512), t = c // 128
    bytes [512, 528)     4 x float32         s_t, one scale per tile of 128 latent channels
    bytes [528, 656)    64 x bfloat16        kv[512 + j], the RoPE part, not quantized

and dequantizes as ``kv[c] ~= float(q_c) * s_t`` and ``kv[512 + j] = float(bf16_j)``.

Scale. For a tile with ``amax = max |x|`` the scale is the smallest power of two with
``amax / s <= 448`` (448 is the largest finite e4m3fn value), so ``x / s`` never saturates and
multiplying or dividing by ``s`` is exact (but for float32 underflow of quotients far below e4m3's
smallest subnormal, which round to 0 either way). Two edge cases, both by decision:

* an all-zero tile gets ``s = 1`` (any power of two would do; 1 keeps the bytes predictable);
* ``s`` is clamped below at ``2**-126`` (the smallest normal float32), so a tile whose
  ``amax < 448 * 2**-126 ~= 5.3e-36`` gets ``s = 2**-126``. This keeps ``q * s`` exact in float32
  on dequantization (a subnormal scale would round it); the bound below still holds.

Values are ``e4m3(x / s)``, rounded to nearest, ties to even (exactly what ``ml_dtypes``'s cast does).

Round-trip error bound (``y = dequantize_kv_fp8(quantize_kv_fp8(x))``, float32 output, per tile
with scale ``s``; e4m3 has 3 mantissa bits and its smallest normal is ``2**-6``):

* ``|x / s| >= 2**-6`` (e4m3 normal range): ``|y - x| <= 2**-4 * |x|`` (half an ulp, relative);
* ``|x / s| <  2**-6`` (e4m3 subnormal):    ``|y - x| <= 2**-10 * s`` (half the spacing ``2**-9``);
* together: ``|y - x| <= max(2**-4 * |x|, 2**-10 * s)``. As ``s`` is the *smallest* such power of
  two, ``s < amax / 224`` for a nonzero tile above the clamp, so the subnormal-range error is below
  ``amax / 229376`` (``224 * 2**10``): small values lose precision only next to large ones;
* values that are already ``e4m3 * s`` exactly (``s`` the tile's own scale) round-trip exactly;
* the RoPE channels round-trip exactly as ``x.astype(bfloat16)`` does.

Overflow: near float32's maximum the scale is ``2**120`` and ``x / s`` lies in ``(224, 256)``;
inputs with ``|x| >= 248 * 2**120 = 1.9375 * 2**127`` (about 3.2965e38, the top 3% of float32's
range) round to ``256 * 2**120 = 2**128`` and dequantize to ``+-inf`` in float32 (NumPy warns
about the overflow). Smaller finite inputs always come back finite. As for any cast, values above
65504 overflow in float16 output.

Inputs. ``kv`` may be float32, float16, bfloat16 (``ml_dtypes.bfloat16``) or float64 (float64 is
first rounded to float32). Non-finite values (NaN, +-inf) raise ``ValueError``: FP8 has no
infinity and a NaN would poison a whole 128-channel tile's scale, so refusing is safer than guessing.

Array kinds. Both functions accept NumPy arrays and, when CuPy is importable, CuPy arrays, and
return the same kind. The math is written against an array namespace ``xp`` with integer bit
operations only (no float8 dtype needed on the device); on NumPy the e4m3 cast is ``ml_dtypes``'s,
and the tests check the bit-level encoder against it.

Shapes: ``kv [..., 576] -> kv_fp8 uint8 [..., 656] -> [..., 576]``; any leading dimensions, e.g. a
whole paged cache ``[num_blocks, page_block_size, h_kv, 576]``.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "FP8_TOKEN_BYTES",
    "FP8_NOPE_DIM",
    "FP8_ROPE_DIM",
    "FP8_TILE",
    "FP8_NUM_SCALES",
    "FP8_HEAD_DIM",
    "FP8_E4M3_MAX",
    "quantize_kv_fp8",
    "dequantize_kv_fp8",
]

FP8_NOPE_DIM = 512
"""Latent (NoPE) channels per token, stored as float8_e4m3fn."""
FP8_ROPE_DIM = 64
"""RoPE channels per token, stored as bfloat16 (not quantized)."""
FP8_TILE = 128
"""Latent channels sharing one scale."""
FP8_NUM_SCALES = FP8_NOPE_DIM // FP8_TILE
"""float32 scales per token (4)."""
FP8_HEAD_DIM = FP8_NOPE_DIM + FP8_ROPE_DIM
"""Logical channels per token (576)."""
FP8_TOKEN_BYTES = FP8_NOPE_DIM + 4 * FP8_NUM_SCALES + 2 * FP8_ROPE_DIM
"""Bytes per token and KV head (656)."""
FP8_E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""

_SCALES_BEGIN = FP8_NOPE_DIM  # 512
_ROPE_BEGIN = _SCALES_BEGIN + 4 * FP8_NUM_SCALES  # 528
_MIN_SCALE_EXPONENT = -126  # smallest normal float32 exponent; see "Scale" above

_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
_FLOAT8_E4M3FN = np.dtype(ml_dtypes.float8_e4m3fn)
_INPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BFLOAT16, np.dtype(np.float64))
_OUTPUT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), _BFLOAT16)

# float8_e4m3fn code -> float32 value, for all 256 codes (0x7F and 0xFF are NaN).
_E4M3_DECODE_TABLE = np.arange(256, dtype=np.uint8).view(_FLOAT8_E4M3FN).astype(np.float32)

assert FP8_TOKEN_BYTES == 656 and FP8_HEAD_DIM == 576


# --------------------------------------------------------------------------- array namespace


def _array_module(array: Any):
    """NumPy or CuPy, whichever owns ``array`` (CuPy is imported only for CuPy arrays)."""
    if type(array).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def _decode_table(xp) -> Any:
    if xp is np:
        return _E4M3_DECODE_TABLE
    return xp.asarray(_E4M3_DECODE_TABLE)


# --------------------------------------------------------------------------- bit-level helpers
# These work on any array namespace with NumPy's integer/bitwise semantics (NumPy, CuPy).


def _bfloat16_bits_to_float32(xp, bits_u16):
    """bfloat16 bit patterns (uint16) -> float32 values (exact: bf16 is the top half of f32)."""
    return (bits_u16.astype(xp.uint32) << 16).view(xp.float32)


def _float32_to_bfloat16_bits(xp, x_f32):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest, ties to even (as ml_dtypes)."""
    u = xp.ascontiguousarray(x_f32, dtype=xp.float32).view(xp.uint32)
    rounded = (u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) >> 16
    quiet_nan = xp.uint32(0x7FC0) | ((u >> 16) & xp.uint32(0x8000))
    return xp.where(xp.isnan(x_f32), quiet_nan, rounded).astype(xp.uint16)


def _float32_to_e4m3_codes(xp, y_f32):
    """float32 with ``|y| <= 448`` -> float8_e4m3fn codes (uint8), round to nearest, ties to even.

    Normal range (``|y| >= 2**-6``): round the 23-bit float32 mantissa to 3 bits on the bit pattern
    (a carry moves into the exponent, as it should), then rebias the exponent from 127 to 7.
    Subnormal range: the value is ``m * 2**-9`` with ``m = rint(|y| * 2**9)`` in ``0..8``
    (``m = 8`` is the smallest normal, code 8), and ``rint`` rounds ties to even.
    """
    y = xp.ascontiguousarray(y_f32, dtype=xp.float32)
    magnitude_bits = y.view(xp.uint32) & xp.uint32(0x7FFFFFFF)
    sign = ((y.view(xp.uint32) >> 24) & xp.uint32(0x80)).astype(xp.uint8)
    lsb = (magnitude_bits >> 20) & xp.uint32(1)
    rounded = (magnitude_bits + xp.uint32(0x7FFFF) + lsb) >> 20  # exponent(8) | mantissa(3)
    normal_code = rounded.astype(xp.int32) - ((127 - 7) << 3)
    subnormal_code = xp.rint(xp.abs(y) * xp.float32(512.0)).astype(xp.int32)
    is_normal = magnitude_bits >= xp.uint32(0x3C800000)  # 2**-6 as float32 bits
    code = xp.where(is_normal, normal_code, subnormal_code).astype(xp.uint8)
    return code | sign


def _power_of_two_scales(xp, amax_f32):
    """Smallest power of two ``s`` with ``amax / s <= 448``; 1 where ``amax == 0``; ``s >= 2**-126``.

    With ``amax = 1.m * 2**e`` (float32 fields) and ``448 = 1.75 * 2**8``:
    ``amax <= 1.75 * 2**(8 + k)`` holds for ``k = e - 8`` if ``1.m <= 1.75`` else ``k = e - 7``.
    """
    bits = xp.ascontiguousarray(amax_f32, dtype=xp.float32).view(xp.uint32).astype(xp.int32)
    unbiased_exponent = (bits >> 23) - 127
    mantissa = bits & 0x7FFFFF
    k = unbiased_exponent - 8 + (mantissa > 0x600000).astype(xp.int32)
    k = xp.maximum(k, _MIN_SCALE_EXPONENT)
    k = xp.where(amax_f32 == 0, 0, k)
    return ((k + 127).astype(xp.uint32) << 23).view(xp.float32)


# --------------------------------------------------------------------------- validation


def _check_last_dim(name: str, array, expected: int) -> None:
    if array.ndim < 1 or array.shape[-1] != expected:
        raise ValueError(
            f"{name}: expected shape [..., {expected}], got {tuple(array.shape)} "
            f"(last dimension {array.shape[-1] if array.ndim else 'missing'})"
        )


def _to_float32(xp, kv):
    """kv (float32/float16/bfloat16/float64) -> float32, bf16 through its bits (no bf16 math needed)."""
    if kv.dtype == _BFLOAT16 and xp is not np:
        return _bfloat16_bits_to_float32(xp, xp.ascontiguousarray(kv).view(xp.uint16))
    return kv.astype(xp.float32, copy=False)


# --------------------------------------------------------------------------- public API


def quantize_kv_fp8(kv):
    """Pack tokens into FlashMLA's 656-byte "FP8 with scale" layout.

    Args:
        kv: ``[..., 576]`` float32, float16, bfloat16 or float64 (rounded to float32 first), all
            finite. NumPy or CuPy.

    Returns:
        ``uint8 [..., 656]`` of the same array kind: 512 e4m3 codes, 4 float32 scales (powers of
        two, one per 128 latent channels), 64 bfloat16 RoPE values; see the module docstring.

    Raises:
        TypeError: ``kv`` has another dtype.
        ValueError: ``kv``'s last dimension is not 576, or ``kv`` holds NaN or infinity.
    """
    xp = _array_module(kv)
    if xp is np:
        kv = np.asarray(kv)
    if kv.dtype not in _INPUT_DTYPES:
        raise TypeError(
            f"kv: expected dtype float32, float16, bfloat16 or float64, got {kv.dtype}"
        )
    _check_last_dim("kv", kv, FP8_HEAD_DIM)
    kv32 = _to_float32(xp, kv)
    if not bool(xp.isfinite(kv32).all()):
        raise ValueError("kv: expected finite values (FP8 has no inf; NaN would poison a tile's scale), "
                         "got NaN or infinity")

    lead_shape = kv.shape[:-1]
    latent_tiles = kv32[..., :FP8_NOPE_DIM].reshape(lead_shape + (FP8_NUM_SCALES, FP8_TILE))
    amax = xp.abs(latent_tiles).max(axis=-1)  # [..., 4]
    scales = _power_of_two_scales(xp, amax)  # [..., 4] float32
    scaled = latent_tiles / scales[..., None]  # exact: division by a normal power of two
    if xp is np:
        codes = scaled.astype(_FLOAT8_E4M3FN).view(np.uint8)
        rope_bits = kv32[..., FP8_NOPE_DIM:].astype(_BFLOAT16).view(np.uint16)
    else:
        codes = _float32_to_e4m3_codes(xp, scaled)
        rope_bits = _float32_to_bfloat16_bits(xp, kv32[..., FP8_NOPE_DIM:])

    out = xp.empty(lead_shape + (FP8_TOKEN_BYTES,), dtype=xp.uint8)
    out[..., :FP8_NOPE_DIM] = codes.reshape(lead_shape + (FP8_NOPE_DIM,))
    out[..., _SCALES_BEGIN:_ROPE_BEGIN] = xp.ascontiguousarray(scales.astype("<f4")).view(xp.uint8)
    out[..., _ROPE_BEGIN:] = xp.ascontiguousarray(rope_bits.astype("<u2")).view(xp.uint8)
    return out


def dequantize_kv_fp8(kv_fp8, dtype=np.float32):
    """Unpack FlashMLA's 656-byte "FP8 with scale" tokens back to 576 channels.

    Args:
        kv_fp8: ``uint8 [..., 656]`` (NumPy or CuPy), e.g. from :func:`quantize_kv_fp8` or a whole
            fp8 paged cache. Poisoned bytes (0xFF) decode to NaN.
        dtype: output dtype: float32 (default), float16 or bfloat16. The float32 result is exact
            (``e4m3 * 2**k``); bfloat16 output is exact too (same exponent range, 8-bit mantissa);
            float16 output is the float32 result cast to float16.

    Returns:
        ``[..., 576]`` in ``dtype``, the same array kind as ``kv_fp8``.

    Raises:
        TypeError: ``kv_fp8`` is not uint8, or ``dtype`` is not one of the three.
        ValueError: ``kv_fp8``'s last dimension is not 656.
    """
    xp = _array_module(kv_fp8)
    if xp is np:
        kv_fp8 = np.asarray(kv_fp8)
    if kv_fp8.dtype != np.uint8:
        raise TypeError(f"kv_fp8: expected dtype uint8 (656-byte fp8 tokens), got {kv_fp8.dtype}")
    _check_last_dim("kv_fp8", kv_fp8, FP8_TOKEN_BYTES)
    out_dtype = np.dtype(dtype)
    if out_dtype not in _OUTPUT_DTYPES:
        raise TypeError(f"dtype: expected float32, float16 or bfloat16, got {out_dtype}")

    lead_shape = kv_fp8.shape[:-1]
    latent = _decode_table(xp)[kv_fp8[..., :FP8_NOPE_DIM].astype(xp.intp)]
    scales = xp.ascontiguousarray(kv_fp8[..., _SCALES_BEGIN:_ROPE_BEGIN]).view("<f4")  # [..., 4]
    latent = latent.reshape(lead_shape + (FP8_NUM_SCALES, FP8_TILE)) * scales[..., None]
    rope_bits = xp.ascontiguousarray(kv_fp8[..., _ROPE_BEGIN:]).view("<u2")  # [..., 64]

    out = xp.empty(lead_shape + (FP8_HEAD_DIM,), dtype=xp.float32)
    out[..., :FP8_NOPE_DIM] = latent.reshape(lead_shape + (FP8_NOPE_DIM,))
    out[..., FP8_NOPE_DIM:] = _bfloat16_bits_to_float32(xp, rope_bits)
    if out_dtype == np.float32:
        return out
    if out_dtype == _BFLOAT16 and xp is not np:
        return _float32_to_bfloat16_bits(xp, out).view(out_dtype)
    return out.astype(out_dtype)
