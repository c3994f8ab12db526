// mla_fp8.cuh -- FlashMLA's 656-byte FP8 token (mla/fp8.py, DESIGN.md 4.5) and its exact dequantisation,
// shared by kernels/mla_decode_fp8.cu (mma.sync, sm_80+) and mla_decode_hopper_narrow.cu (wgmma, MLA_FP8=1).
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

// two e4m3 codes (the low 16 bits of pair, code 0 in the low byte) -> their exact fp32 values, with the
// sm_89+ conversion cvt.rn.f16x2.e4m3x2 (exact: every e4m3 value, subnormals included, is an f16 normal
// or zero) and cvt.f32.f16 (exact). The narrow Hopper kernel only (sm_90a).
__device__ __forceinline__ void e4m3x2_to_f32x2(u32 pair, float& lo, float& hi) {
  u32 h2;
  asm("{ .reg .b16 c; cvt.u16.u32 c, %1; cvt.rn.f16x2.e4m3x2 %0, c; }" : "=r"(h2) : "r"(pair));
  asm("{ .reg .f16 a, b; mov.b32 {a, b}, %2; cvt.f32.f16 %0, a; cvt.f32.f16 %1, b; }" : "=f"(lo), "=f"(hi) : "r"(h2));
}

// dequant8 with fewer instructions where that is exact: a scale that is a power of two in [2^-100, 2^100]
// (mla.fp8's scales are) multiplies the exact code values with no rounding, underflow or overflow, so
// code * scale packed to bf16 equals dequant8's result bit for bit; any other scale takes dequant8.
__device__ __forceinline__ uint4 dequant8_fast(uint2 codes, float scale) {
  const u32 sb = __float_as_uint(scale), e = (sb >> 23) & 0xFF;
  if ((sb & 0x807FFFFFu) != 0 || e < 27 || e > 227) return dequant8(codes, scale);
  float f[8];
  e4m3x2_to_f32x2(codes.x & 0xFFFF, f[0], f[1]);
  e4m3x2_to_f32x2(codes.x >> 16, f[2], f[3]);
  e4m3x2_to_f32x2(codes.y & 0xFFFF, f[4], f[5]);
  e4m3x2_to_f32x2(codes.y >> 16, f[6], f[7]);
  uint4 r;
  r.x = pack2(f[0] * scale, f[1] * scale);
  r.y = pack2(f[2] * scale, f[3] * scale);
  r.z = pack2(f[4] * scale, f[5] * scale);
  r.w = pack2(f[6] * scale, f[7] * scale);
  return r;
}
