// mla_common.cuh -- small device helpers shared by the CuPy RawKernel sources (header-free: NVRTC
// needs no CUDA toolkit headers, so CI compiles these with the nvidia-cuda-nvrtc wheel alone).
//
// Element type: 16-bit storage (bf16 or fp16) chosen at compile time with -DMLA_FP16=1 (default bf16).
// Everything touching the tensor cores or the async copy engine is inline PTX (sm_80+).
#pragma once

typedef unsigned short mla_elem_t;  // raw bf16 / fp16 bits
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef MLA_FP16
#define MLA_FP16 0
#endif

#define MLA_NEG_INF (__int_as_float(0xff800000))
#define MLA_POS_INF (__int_as_float(0x7f800000))
#define MLA_LN2 0.69314718055994530942f

// generic pointer -> 32-bit shared-window address (what ldmatrix / cp.async take)
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 a;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// two floats -> packed pair (lo in the low half), round to nearest even
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
#if MLA_FP16
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

// the low / high element of a packed pair, as float (exact: both 16-bit types embed in fp32)
__device__ __forceinline__ float lo_f(u32 x) {
#if MLA_FP16
  float f;
  asm("{ .reg .f16 h; mov.b32 {h, _}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(x));
  return f;
#else
  return __uint_as_float(x << 16);
#endif
}
__device__ __forceinline__ float hi_f(u32 x) {
#if MLA_FP16
  float f;
  asm("{ .reg .f16 h; mov.b32 {_, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(x));
  return f;
#else
  return __uint_as_float(x & 0xffff0000u);
#endif
}

__device__ __forceinline__ mla_elem_t to_elem(float x) {
  unsigned short r;
#if MLA_FP16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
  return r;
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 zero-fills (nothing is read)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 addr, u32& r0, u32& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulate
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if MLA_FP16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
