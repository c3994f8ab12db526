// mla_fp8.cuh -- FlashMLA's 656-byte FP8 token (mla/fp8.py, DESIGN.md 4.5) and its exact dequantisation,
// shared by kernels/mla_decode_fp8.cu (mma.sync, sm_80+) and the Hopper kernels' FP8 builds (wgmma, MLA_FP8=1:
// mla_decode_hopper.cu, mla_decode_hopper_narrow.cu, through mla_wgmma.cuh's register stages).
//
// Token: bytes [0, 512) e4m3 codes of channels 0..511, [512, 528) 4 fp32 scales (one per 128 channels,
// powers of two), [528, 656) the 64 bf16 RoPE channels. dequant8: code byte b -> fp32 bits
// (b & 0x80) << 24 | (b & 0x7f) << 20, i.e. the code's value * 2^-120 (exact; E = 0 codes become fp32
// subnormals), times (scale * 2^120) with a non-flushing mul.rn.f32 (= the reference's float(code) * scale,
// one rounding of the same real number), packed to bf16 (exact: 4 significant bits).
#pragma once
#include "mla_common.cuh"

constexpr int FP8_BYTES = 656, FP8_NOPE = 512, FP8_SCALES_AT = 512, FP8_ROPE_AT = 528;

// fp32 product without flush-to-zero whatever the compile flags (e4m3 subnormals arrive as fp32
// subnormals, see the header)
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// code byte `byte` of w -> fp32 whose value is e4m3(code) * 2^-120 (exact, also for E = 0 codes)
template <int BYTE>
__device__ __forceinline__ float e4m3_times_2m120(u32 w) {
  const int x = static_cast<int>(w << (24 - 8 * BYTE));  // the code in the top byte
  return __uint_as_float(static_cast<u32>(x >> 4) & 0x87F00000u);  // sign stays at 31, E M at 26..20
}

// 8 e4m3 codes (two little-endian words) * scale -> 8 bf16 (16 bytes)
__device__ __forceinline__ uint4 dequant8(uint2 codes, float scale) {
  float f[8];
  f[0] = e4m3_times_2m120<0>(codes.x);
  f[1] = e4m3_times_2m120<1>(codes.x);
  f[2] = e4m3_times_2m120<2>(codes.x);
  f[3] = e4m3_times_2m120<3>(codes.x);
  f[4] = e4m3_times_2m120<0>(codes.y);
  f[5] = e4m3_times_2m120<1>(codes.y);
  f[6] = e4m3_times_2m120<2>(codes.y);
  f[7] = e4m3_times_2m120<3>(codes.y);
  if (scale < 256.f) {  // scale * 2^120 is a finite power of two (zero-filled rows: scale 0)
    const float s = mul_rn(scale, 0x1p120f);
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = mul_rn(f[k], s);
  } else {  // 2^8 <= scale <= 2^120: two exact steps
#pragma unroll
    for (int k = 0; k < 8; ++k) f[k] = mul_rn(mul_rn(f[k], 0x1p120f), scale);
  }
  uint4 r;
  r.x = pack2(f[0], f[1]);
  r.y = pack2(f[2], f[3]);
  r.z = pack2(f[4], f[5]);
  r.w = pack2(f[6], f[7]);
  return r;
}

// ---- the fast exact path (Hopper kernels, sm_90a): the code bits moved into bf16's fields, one bf16x2 multiply
// by the scale. Exact for a scale 2^k, -100 <= k <= 7 (mla.fp8 writes powers of two):
//   1. prmt puts each code in the low byte of a 16-bit lane and its sign bit in all of the high byte
//      ([sign(c1) c1 sign(c0) c0]); << 4 and & 0x87F087F0 leave the sign at bit 15 and E M (7 bits) at bits
//      10..4, i.e. bf16 bits whose value is the code's * 2^-120 (E = 0 codes: bf16 subnormals, exactly);
//   2. times bf16 (scale * 2^120) (finite for k <= 7): the product code * 2^k is a bf16 normal (>= 2^-109) and
//      mul.rn.bf16x2 (no flush-to-zero: subnormal inputs are supported) rounds it once, exactly: it equals
//      dequant8's result bit for bit.
// 3 instructions + the multiply per 2 codes (v2, until 2026-11-26: cvt.rn.f16x2.e4m3x2, then the f16 bits
// shifted into bf16's fields with the sign moved back, 4 + the multiply). Any other scale takes dequant8 (the
// caller's choice, warp-uniform: fp8_pow2_ok).

// four e4m3 codes (a little-endian word) -> bf16x2 of codes 0, 1 (lo) and 2, 3 (hi), each value * 2^-120, exactly
__device__ __forceinline__ void e4m3x4_to_bf16x4_2m120(u32 w, u32& lo, u32& hi) {
  u32 a, b;
  asm("prmt.b32 %0, %1, 0, 0x9180;" : "=r"(a) : "r"(w));  // [sign(c1) c1 sign(c0) c0]
  asm("prmt.b32 %0, %1, 0, 0xB3A2;" : "=r"(b) : "r"(w));  // [sign(c3) c3 sign(c2) c2]
  lo = (a << 4) & 0x87F087F0u;
  hi = (b << 4) & 0x87F087F0u;
}
// codes x.byte J and y.byte J of two words (two keys' codes of one channel) -> bf16x2 of each value * 2^-120, exactly
// (low half: x's). sel = fp8_pair_sel(J): one prmt with sign replication builds [sign(y_J) y_J sign(x_J) x_J], then
// << 4 and & 0x87F087F0 as above.
__device__ __forceinline__ constexpr u32 fp8_pair_sel(int j) {
  return (u32)j | (u32)(j | 8) << 4 | (u32)(4 + j) << 8 | (u32)((4 + j) | 8) << 12;
}
__device__ __forceinline__ u32 e4m3_pair_to_bf16x2_2m120(u32 x, u32 y, u32 sel) {
  u32 a;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(a) : "r"(x), "r"(y), "r"(sel));
  return (a << 4) & 0x87F087F0u;
}
// bf16x2 product, round to nearest even (sm_90)
__device__ __forceinline__ u32 bf16x2_mul(u32 a, u32 b) {
  u32 r;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}
// is scale a power of two 2^k with -100 <= k <= 7 (the fast path's domain)?
__device__ __forceinline__ bool fp8_pow2_ok(float scale) {
  const u32 sb = __float_as_uint(scale), e = sb >> 23;
  return (sb & 0x007FFFFFu) == 0 && e >= 27 && e <= 134;  // e < 256: the sign is 0
}
// bf16x2 (scale * 2^120, twice) of a scale with fp8_pow2_ok
__device__ __forceinline__ u32 fp8_pow2_mult(float scale) { return (((__float_as_uint(scale) >> 23) + 120u) << 7) * 0x10001u; }
// 8 e4m3 codes -> 8 bf16 = dequant8(codes, scale) when fp8_pow2_ok(scale); mult = fp8_pow2_mult(scale)
__device__ __forceinline__ uint4 dequant8_pow2(uint2 codes, u32 mult) {
  u32 h0, h1, h2, h3;
  e4m3x4_to_bf16x4_2m120(codes.x, h0, h1);
  e4m3x4_to_bf16x4_2m120(codes.y, h2, h3);
  uint4 r;
  r.x = bf16x2_mul(h0, mult);
  r.y = bf16x2_mul(h1, mult);
  r.z = bf16x2_mul(h2, mult);
  r.w = bf16x2_mul(h3, mult);
  return r;
}
