// mla_wgmma.cuh -- the Hopper (sm_90a) building blocks of kernels/mla_decode_hopper.cu: the shared-memory
// tile layout, wgmma descriptors, the two wgmma shapes the decode uses, the accumulator <-> (row, col)
// map, and the per-tile steps (tile copy, S = Q K^T with the warpgroup exchange, P fragments, O += P V).
// kernels/wgmma_probe.cu calls exactly these functions on small exact-integer matrices
// (tests/test_wgmma_probe_gpu.py), so a wrong descriptor or fragment map shows up there in seconds.
//
// STATUS: verified on an H100 (tests/test_wgmma_probe_gpu.py, and the decode kernels built from these functions
// in tests/test_cupy_gpu.py). The CPU emulator's wgmma model (tests/test_hopper_compile.py) encodes the reading
// of the PTX ISA written below, which those GPU runs confirmed (the SW128 MN-major reading: run 4 of
// benchmarks/runs/2026-11-26b-h100, MLA_WG_DIAG_SW_SWAP_MN).
//
// ---- Shared-memory tile layout (no swizzle, "interleaved" core matrices) ------------------------------
// A tile is 64 rows (query rows, or keys) x D = 576 channels of 16-bit elements. wgmma without swizzle
// reads "core matrices": 8 rows x 16 bytes (8 elements), 128 contiguous bytes, row r of the core matrix
// at byte 16 r. The tile is a grid of 8 row groups x 72 channel groups of core matrices, stored
// channel-group-major:
//
//     offset(row, col) = (col / 8) * 512 + (row / 8) * 64 + (row % 8) * 8 + (col % 8)      [elements]
//
// i.e. a channel group (8 channels of all 64 rows) is 512 elements = 1024 bytes, a row group inside it
// 64 elements = 128 bytes. Q and every K buffer use this layout; a tile is 73728 bytes.
// Worked example: K[key 9][channel 130]: row group 1, row 1 in it; channel group 16, channel 2 in it:
//     16 * 512 + 1 * 64 + 1 * 8 + 2 = 8266 elements = byte 16532 of the tile.
//
// ---- Descriptors (PTX ISA "Matrix Descriptor Format", "Canonical Layouts", no-swizzle rows) ---------------
//   bits 0-13: (start address & 0x3FFFF) >> 4; bits 16-29: LBO >> 4; bits 32-45: SBO >> 4; 62-63: 0
//   (no swizzle; base offset unused). For no swizzle, in both majornesses, LBO is the byte distance
//   between core matrices adjacent in the K (reduction) direction and SBO between core matrices adjacent
//   in the M/N direction:
//     K-major:  ((8,m),(T,2k)):((1T,SBO),(1,LBO))    element (mn, k) at (mn%8)*8 + (mn/8)*SBO + k%8 + (k/8)*LBO
//     MN-major: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO)) element (mn, k) at mn%8 + (mn/8)*SBO + (k%8)*8 + (k/8)*LBO
//   (T = 8 elements; strides in elements; PTX's bf16 MN-major example: LBO 128 el, SBO 64 el for
//   ((8,1,2),(8,2)):((1,8,64),(8,128)).) The verified m64n8k16 example (../shared/examples) is K-major
//   with LBO 128 B (K) and SBO 256 B (M/N).
//
//   S = Q K^T (m64n32k16, A = Q K-major, B = K K-major, K = channels): the tile layout above with
//     mn = row (query row / key), k = channel  =>  SBO = 64 el = 128 B, LBO = 512 el = 1024 B.
//     k-step s (channels 16 s .. 16 s + 15) starts 2 s channel groups in: + 2048 s bytes (+128 s encoded);
//     warpgroup w scores keys 32 w .. 32 w + 31: B starts 4 w row groups in, + 512 w bytes.
//     Example: K[9][130] for warpgroup 0 is k-step 8 (k = 2), n = 9: start + 16384 B; then
//     (9%8)*16 + (9/8)*128 + 2*2 = 148 B further: byte 16532.  ✓
//   O += P V (m64n256k16, A = P from registers, B = V = the same K tile, K = keys, N = channels; the
//     channels are contiguous inside a core matrix, so B is N-major: imm-trans-b = 1):
//     mn = channel, k = key  =>  SBO = 512 el = 1024 B (next 8 channels), LBO = 64 el = 128 B (next 8 keys).
//     k-step kk (keys 16 kk .. 16 kk + 15) starts 2 kk row groups in: + 256 kk bytes (+16 kk encoded);
//     warpgroup w owns channels 256 w .. 256 w + 255: B starts 32 w channel groups in, + 32768 w bytes.
//     Example: V[9][130] for warpgroup 0 is k-step 0 (k = 9), n = 130: 130%8 + (130/8)*512 + (9%8)*8 +
//     (9/8)*64 = 8266 elements = byte 16532, the same byte as above.  ✓
//
// ---- Register fragments (PTX "Matrix Fragments for wgmma.mma_async.m64nNk16") -------------------------------
//   Thread t of a warpgroup (t = 0..127): warp w = t / 32, lane l. Accumulator register i of an m64nN
//   tile holds D[row][col] with
//     row = 16 w + l / 4 + 8 ((i >> 1) & 1),   col = 8 (i >> 2) + 2 (l % 4) + (i & 1)      (wg_acc_row/col)
//   The A fragment of m64nNk16 from registers (4 x .b32 = a0..a7, low half first) has the same map with
//   N = 16: a0,a1 (row r, k c2, c2+1), a2,a3 (row r+8), a4,a5 (row r, k c2+8, +9), a6,a7 (row r+8, k c2+8).
//   So the S accumulator of keys 16 kk .. 16 kk + 15 (registers 8 kk .. 8 kk + 7) packs pairwise into the A
//   fragment of P V's k-step kk with no shuffle: A reg j of k-step kk = pack(s[8 kk + 2 j], s[8 kk + 2 j + 1]).
//
// ---- Proxies and ordering ------------------------------------------------------------------------------
//   wgmma reads shared memory through the async proxy; cp.async writes through the generic proxy, so each
//   copying thread runs fence.proxy.async.shared::cta after cp.async.wait_group and before the barrier
//   that precedes the wgmma. wgmma.fence precedes the first wgmma of a batch (the accumulator / A registers
//   were written by ordinary instructions); wg_fence_operands keeps the compiler from moving accumulator
//   accesses across the asynchronous region.
#pragma once
#include "mla_common.cuh"
#include "mla_fp8.cuh"

// wgmma exists only in the sm_90a feature set; other targets (the CI compiles every source for sm_80 too)
// get stubs that trap, and cupy_hopper.py launches these kernels on compute capability 9.0 only. (The CPU
// emulator of tests/test_hopper_compile.py defines MLA_HAS_WGMMA=1 and models the asm functions.)
#ifndef MLA_HAS_WGMMA
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MLA_HAS_WGMMA 1
#else
#define MLA_HAS_WGMMA 0
#endif
#endif

#if MLA_FP16
#define MLA_WG_AB ".f16.f16"
#else
#define MLA_WG_AB ".bf16.bf16"
#endif

// Diagnostics only (tests/test_wgmma_probe_gpu.py recompiles the probes with these when a check fails, to
// name the wrong field): swap LBO and SBO of the K-major / MN-major descriptors. Never set for the decode.
#ifndef MLA_WG_DIAG_SWAP_K
#define MLA_WG_DIAG_SWAP_K 0
#endif
#ifndef MLA_WG_DIAG_SWAP_MN
#define MLA_WG_DIAG_SWAP_MN 0
#endif

constexpr int WG_TILE_ROWS = 64;                 // rows of a Q tile / keys of a K tile
constexpr int WG_RG_EL = 64;                     // elements from one 8-row group to the next (one core matrix)
constexpr int WG_CG_EL = WG_TILE_ROWS / 8 * 64;  // elements from one 8-channel group to the next (512)
constexpr u32 WG_RG_BYTES = 2 * WG_RG_EL;        // 128
constexpr u32 WG_CG_BYTES = 2 * WG_CG_EL;        // 1024

// K-major (S = Q K^T): LBO = next 8 channels (K), SBO = next 8 rows (M / N)
constexpr u32 WG_K_LBO = MLA_WG_DIAG_SWAP_K ? WG_RG_BYTES : WG_CG_BYTES;
constexpr u32 WG_K_SBO = MLA_WG_DIAG_SWAP_K ? WG_CG_BYTES : WG_RG_BYTES;
// MN-major (O += P V, B = V): LBO = next 8 keys (K), SBO = next 8 channels (N)
constexpr u32 WG_MN_LBO = MLA_WG_DIAG_SWAP_MN ? WG_CG_BYTES : WG_RG_BYTES;
constexpr u32 WG_MN_SBO = MLA_WG_DIAG_SWAP_MN ? WG_RG_BYTES : WG_CG_BYTES;

constexpr u64 WG_QK_KSTEP = (2 * WG_CG_BYTES) >> 4;  // descriptor increment per 16 channels (128)
constexpr u64 WG_PV_KSTEP = (2 * WG_RG_BYTES) >> 4;  // descriptor increment per 16 keys (16)

// element offset of (row, col) in a tile (see the header)
__device__ __forceinline__ int wg_tile_offset(int row, int col) {
  return (col >> 3) * WG_CG_EL + (row >> 3) * WG_RG_EL + (row & 7) * 8 + (col & 7);
}

// shared-memory matrix descriptor, no swizzle
__device__ __forceinline__ u64 wg_desc(u32 smem_addr, u32 lbo_bytes, u32 sbo_bytes) {
  return (u64)((smem_addr & 0x3FFFFu) >> 4) | ((u64)(lbo_bytes >> 4) << 16) | ((u64)(sbo_bytes >> 4) << 32);
}

// accumulator register i of thread t (0..127) of a warpgroup holds D[wg_acc_row(t, i)][wg_acc_col(t, i)]
__device__ __forceinline__ int wg_acc_row(int t, int i) { return 16 * (t >> 5) + ((t & 31) >> 2) + 8 * ((i >> 1) & 1); }
__device__ __forceinline__ int wg_acc_col(int t, int i) { return 8 * (i >> 2) + 2 * (t & 3) + (i & 1); }

__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void named_bar_sync(int id, int nthreads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(nthreads) : "memory");
}

#if MLA_HAS_WGMMA
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void wg_fence_operands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#define WG_D8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                 "+f"(d[i + 6]), "+f"(d[i + 7])

// D[64 x 32] = A[64 x 16] B[32 x 16]^T (+ D when accumulate): A, B K-major in shared memory
__device__ __forceinline__ void wg_mma_m64n32k16_ss(float (&d)[16], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : WG_D8(0), WG_D8(8)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate)
      : "memory");
}

// D[64 x 256] += A[64 x 16] B[16 x 256]: A from registers (a0..a3, the m64nNk16 A fragment), B N-major
// (imm-trans-b = 1) in shared memory
__device__ __forceinline__ void wg_mma_m64n256k16_rs_nmajor(float (&d)[128], u32 a0, u32 a1, u32 a2, u32 a3,
                                                             u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 1;\n}\n"
      : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56), WG_D8(64),
        WG_D8(72), WG_D8(80), WG_D8(88), WG_D8(96), WG_D8(104), WG_D8(112), WG_D8(120)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1)
      : "memory");
}

// ---- the seesaw kernel's shapes (kernels/mla_decode_seesaw.cu): both operands from shared memory.
// D[64 x 64] = A[64 x 16] B[64 x 16]^T (+ D when accumulate): A, B K-major (S = Q K^T of a whole 64-key block)
__device__ __forceinline__ void wg_mma_m64n64k16_ss(float (&d)[32], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate)
      : "memory");
}
// D[64 x 256] += A[64 x 16] B[16 x 256]: A K-major in shared memory (P of the other warpgroup's block), B N-major
// (imm-trans-b = 1)
__device__ __forceinline__ void wg_mma_m64n256k16_ss_nmajor(float (&d)[128], u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
      "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
      "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
      "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
      "%128, %129, p, 1, 1, 0, 1;\n}\n"
      : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24), WG_D8(32), WG_D8(40), WG_D8(48), WG_D8(56), WG_D8(64),
        WG_D8(72), WG_D8(80), WG_D8(88), WG_D8(96), WG_D8(104), WG_D8(112), WG_D8(120)
      : "l"(desc_a), "l"(desc_b), "r"(1)
      : "memory");
}

// ---- the narrow kernel's shapes (kernels/mla_decode_hopper_narrow.cu): both operands from shared memory.
// D[64 x 16] = A[64 x 16] B[16 x 16]^T (+ D when accumulate): A, B K-major (S^T = K Q^T)
__device__ __forceinline__ void wg_mma_m64n16k16_ss(float (&d)[8], u64 desc_a, u64 desc_b, int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : WG_D8(0)
      : "l"(desc_a), "l"(desc_b), "r"(accumulate)
      : "memory");
}
// D[64 x 16] += A[64 x 16] B[16 x 16]: A and B MN-major (imm-trans-a = imm-trans-b = 1; O^T += V^T P^T, fp16)
__device__ __forceinline__ void wg_mma_m64n16k16_ss_tt(float (&d)[8], u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 1, 1;\n}\n"
      : WG_D8(0)
      : "l"(desc_a), "l"(desc_b), "r"(1)
      : "memory");
}
// D[64 x 32] += A[64 x 16] B[16 x 32]: A and B MN-major (O^T += V^T [P_hi | P_lo]^T, bf16)
__device__ __forceinline__ void wg_mma_m64n32k16_ss_tt(float (&d)[16], u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 1, 1;\n}\n"
      : WG_D8(0), WG_D8(8)
      : "l"(desc_a), "l"(desc_b), "r"(1)
      : "memory");
}
// D[64 x 64] += A[64 x 16] B[16 x 64]: A and B MN-major (O^T += V^T [P_hi | P_lo]^T with 32 query rows, bf16)
__device__ __forceinline__ void wg_mma_m64n64k16_ss_tt(float (&d)[32], u64 desc_a, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 1, 1;\n}\n"
      : WG_D8(0), WG_D8(8), WG_D8(16), WG_D8(24)
      : "l"(desc_a), "l"(desc_b), "r"(1)
      : "memory");
}
// ---- the register-A shapes of kernels/mla_decode_fp8_regs.cu (FP8 codes dequantised straight into A fragments)
// D[64 x 16] = A[64 x 16] B[16 x 16]^T (+ D when accumulate): A from registers (the m64nNk16 A fragment), B K-major
// in shared memory (S^T = K Q^T)
__device__ __forceinline__ void wg_mma_m64n16k16_rs(float (&d)[8], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b,
                                                    int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : WG_D8(0)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(accumulate)
      : "memory");
}
// D[64 x 16] += A[64 x 16] B[16 x 16]: A from registers, B MN-major (imm-trans-b = 1; O^T += V^T P^T)
__device__ __forceinline__ void wg_mma_m64n16k16_rs_t(float (&d)[8], u32 a0, u32 a1, u32 a2, u32 a3, u64 desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32" MLA_WG_AB " "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 1;\n}\n"
      : WG_D8(0)
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "l"(desc_b), "r"(1)
      : "memory");
}
#undef WG_D8
#endif  // MLA_HAS_WGMMA

// ---- Bulk tensor copies (TMA) completing on an mbarrier (PTX ISA: "cp.async.bulk.tensor", "mbarrier") -----------
// The seesaw kernel's TMA build copies each 64-key x 64-channel piece of a K buffer with one tensor copy: a 3-D
// tensor map over the cache (channels, KV heads, token rows; mla/backends/_tma.py kv_map_device) with a
// (64, 1, 64) box and the 128-byte swizzle, so a piece lands as one SW128 channel block (sw128_offset). The map is in
// global memory (written by a kernel, kernels/mla_tensor_map.cu), hence the tensormap acquire fence before its first use. An
// mbarrier counts one arrival (mbar_arrive_expect_tx by the issuing thread, with the piece's bytes) and completes
// when the bytes have landed; waiters poll its phase parity. The copies write through the async proxy, as wgmma
// reads, so no proxy fence is needed between them; a generic-proxy store into a buffer a copy refills later is
// ordered by the fence.proxy.async its writer runs before the barrier that precedes the copy's issue.
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbar_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// a named barrier of nthreads that also ORs a predicate over them (barrier.red.or.pred): true when any thread's is
__device__ __forceinline__ bool named_bar_red_or(int id, int nthreads, bool pred) {
  u32 r;
  asm volatile(
      "{\n.reg .pred p, q;\nsetp.ne.u32 p, %3, 0;\nbarrier.red.or.pred q, %1, %2, p;\nselp.u32 %0, 1, 0, q;\n}\n"
      : "=r"(r)
      : "r"(id), "r"(nthreads), "r"((u32)pred)
      : "memory");
  return r != 0;
}
// one arrival, no transaction bytes (a consumer's "done with this buffer")
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// a 1-D bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned) from global memory to shared memory
// at dst, completing its bytes on bar (PTX "cp.async.bulk")
__device__ __forceinline__ void bulk_load(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
               ::"r"(dst), "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
// true once the phase of parity `parity` has completed
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
  u32 done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  while (!mbar_try_wait(bar, parity)) {
  }
}
__device__ __forceinline__ void tensormap_acquire(const void* map) {
  asm volatile("fence.proxy.tensormap::generic.acquire.gpu [%0], 128;\n" ::"l"(map) : "memory");
}
// box (64, 1, 64) of the map at coordinates (c0, c1, c2) -> shared memory at dst (1024-byte aligned), on bar
__device__ __forceinline__ void tma_load_3d(u32 dst, const void* map, int c0, int c1, int c2, u32 bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
      ::"r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
}

// The narrow kernels' column softmax step (mla_decode_hopper_narrow.cu, mla_decode_fp8_regs.cu: a query row is a
// column of S^T): a thread's NCOL columns c2 + (j & 1) + 8 (j >> 1) take their tile maximum from red[wg][w][col]
// (the maxima of warpgroup wg's 4 warps, NQ columns), then m_run moves to it, mu is the exponent offset (0 for a
// column with no key yet: 2^(-inf - 0) = 0) and l_part is rescaled by alpha = 2^(m_run_old - mu).
template <int NCOL, int NQ_>
__device__ __forceinline__ void cols_online_max(const float* red, int wg, int c2, float (&m_run)[NCOL],
                                                float (&l_part)[NCOL], float (&mu)[NCOL], float (&alpha)[NCOL]) {
#pragma unroll
  for (int j = 0; j < NCOL; ++j) {
    const int col = c2 + (j & 1) + 8 * (j >> 1);
    float tmax = red[(wg * 4) * NQ_ + col];
#pragma unroll
    for (int w = 1; w < 4; ++w) tmax = fmaxf(tmax, red[(wg * 4 + w) * NQ_ + col]);
    const float mn = fmaxf(m_run[j], tmax);
    mu[j] = mn == MLA_NEG_INF ? 0.f : mn;
    alpha[j] = fast_exp2(m_run[j] - mu[j]);
    m_run[j] = mn;
    l_part[j] *= alpha[j];
  }
}

// a compile-time bool as a value (generic lambdas taking it choose a code path with if constexpr)
template <bool B>
struct MlaBool {
  static constexpr bool value = B;
};

// The end of a piece in the 64-row kernels (mla_decode_hopper.cu, mla_decode_seesaw.cu): this thread's rows
// m0 and m0 + 8 of the tile (query rows of the problem; rows >= M are padding) of warpgroup wg's 256 output
// columns o (the m64n256 accumulator), scaled by inv0 / inv1 = 1 / l, to out (direct: q's type) or o_part, and
// their lse (warpgroup 0, one lane a quad) to lse_out / lse_part (mla_common.cuh's row layout).
__device__ __forceinline__ void wg_store_rows(const float (&o)[128], float inv0, float inv1, float lse0, float lse1,
                                              int m0, int M, int group, int g, int i, int p, int s_q, int h_q,
                                              bool direct, int wg, int lane, mla_elem_t* __restrict__ out,
                                              float* __restrict__ o_part, float* __restrict__ lse_out,
                                              float* __restrict__ lse_part) {
  const int c2 = 2 * (lane & 3);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int m = m0 + 8 * half;
    if (m >= M) continue;
    int r, h;
    const long long orow = mla_row_offset(m, group, g, i, p, s_q, h_q, 512, direct, r, h);
    const float inv = half ? inv1 : inv0, lse_v = half ? lse1 : lse0;
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const int col = 256 * wg + 8 * j + c2;  // wg_acc_col(t, 4 j) of this warpgroup's O columns
      const float v0 = o[4 * j + 2 * half] * inv, v1 = o[4 * j + 2 * half + 1] * inv;
      if (direct) *reinterpret_cast<u32*>(out + orow + col) = pack2(v0, v1);
      else *reinterpret_cast<float2*>(o_part + orow + col) = make_float2(v0, v1);
    }
    if (wg == 0 && (lane & 3) == 0) mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, lse_v);
  }
}

// ---- per-tile steps (256 threads = 2 warpgroups a CTA) ---------------------------------------------------

// Copying a 64-row tile of D_ channels with 256 threads (16-byte cp.async, zero-filled when !valid, in
// which case nothing is read): thread tid copies row wg_copy_row(tid) = 16 (warp % 4) + lane / 2, chunks
// 2 (warp / 4 + 2 j) + lane % 2 (j = 0 .. D_ / 32 - 1), so a warp instruction covers 16 rows x 32 bytes and
// each quarter-warp (8 lanes, one phase of a 16-byte access) 4 rows x one whole 32-byte sector. (The first
// mapping, 8 rows x 16 bytes a phase, made every sector two requests: Nsight Compute showed 50% excess L2
// sectors and L2 at 82% of its throughput with DRAM at 49%, H100, 2026-11-26.) The price: without a
// swizzle, the two chunks of a row land in the same banks, a 2-way conflict on the shared-memory side.
__device__ __forceinline__ int wg_copy_row(int tid) { return 16 * ((tid >> 5) & 3) + ((tid & 31) >> 1); }
template <int D_>
__device__ __forceinline__ void wg_tile_load_row(mla_elem_t* tile, int tid, const mla_elem_t* src, bool valid) {
  static_assert(D_ % 32 == 0, "a tile row is copied as D / 16 chunk pairs, split over 2 warps");
  const int row = wg_copy_row(tid), c0 = 2 * ((tid >> 7) & 1) + (tid & 1);
#pragma unroll
  for (int j = 0; j < D_ / 32; ++j) {
    const int c = c0 + 4 * j;
    cp_async16(tile + wg_tile_offset(row, 8 * c), src + c * 8, valid);
  }
}

// ---- 128-byte swizzled tiles (the narrow kernel's K tile) -------------------------------------------------
// A tile of 64 rows (keys) x D_ channels stored as D_ / 64 channel blocks of 64 rows x 128 bytes; inside a
// block, row r is 128 bytes at 128 r and its 16-byte chunk c (channels 8 c .. 8 c + 7 of the block) sits at
// chunk position c ^ (r % 8): PTX's 128B swizzle (Swizzle<3,4,3>: byte-address bits 4-6 ^= bits 7-9), which
// the tensor cores undo on the absolute shared-memory address, so every block must start 1024-byte aligned.
//     byte offset(row, ch) = (ch / 64) * 8192 + row * 128 + (((ch % 64) / 8) ^ (row % 8)) * 16 + (ch % 8) * 2
// Read K-major (S^T = K Q^T: M = keys, K = channels; one 8-row x 128-byte atom a 1024 bytes, SBO 1024, a
// 16-channel k-step moves the start 32 bytes inside the row, k-step 4 j is block j) or MN-major (O^T = V^T P^T:
// M = channels of one block, K = keys; SBO 1024 = next 8 keys, LBO = next channel block, 8192).
// Why: a quarter-warp (8 lanes of a 16-byte cp.async) then copies one row's 128 bytes of a block -- one whole
// aligned line of the cache (rows are 1152 bytes) -- into 8 different bank groups. Unswizzled core matrices
// force a choice between 16- or 32-byte pieces of many rows a request (L2 at 82-84% of its throughput with
// DRAM at 49-55% in Nsight Compute, H100) and 8-way bank conflicts.
constexpr u32 SW128_BLOCK_BYTES = 64 * 128;  // one channel block of a 64-row tile
#ifndef MLA_WG_DIAG_SW_SWAP_MN
#define MLA_WG_DIAG_SW_SWAP_MN 0  // diagnostics: read the MN-major SW128 LBO / SBO the other way round
#endif
constexpr u32 WG_SW_K_SBO = 1024, WG_SW_K_LBO = 16;  // K-major: LBO unused with swizzling (encoded 1)
constexpr u32 WG_SW_MN_SBO = MLA_WG_DIAG_SW_SWAP_MN ? SW128_BLOCK_BYTES : 1024;
constexpr u32 WG_SW_MN_LBO = MLA_WG_DIAG_SW_SWAP_MN ? 1024 : SW128_BLOCK_BYTES;

__device__ __forceinline__ u32 sw128_offset(int row, int ch) {  // bytes
  return (u32)(ch >> 6) * SW128_BLOCK_BYTES + row * 128 + ((((ch & 63) >> 3) ^ (row & 7)) << 4) + (ch & 7) * 2;
}
// shared-memory matrix descriptor, 128B swizzle (layout type 1 in bits 62-63)
__device__ __forceinline__ u64 wg_desc_sw128(u32 smem_addr, u32 lbo_bytes, u32 sbo_bytes) {
  return wg_desc(smem_addr, lbo_bytes, sbo_bytes) | (1ull << 62);
}
// Copying a 64-row SW128 tile of D_ channels with 256 threads: thread tid copies rows sw128_copy_row(tid) and
// that + 32, chunk tid % 8 of every channel block (a quarter-warp: one row's 128 bytes of one block).
__device__ __forceinline__ int sw128_copy_row(int tid) { return ((tid & 31) >> 3) + 4 * (tid >> 5); }
template <int D_>
__device__ __forceinline__ void sw128_tile_load_row(unsigned char* tile, int row, int tid, const mla_elem_t* src,
                                                    bool valid) {
  static_assert(D_ % 64 == 0, "a row is D / 64 blocks of 128 bytes");
  const int c = tid & 7;
#pragma unroll
  for (int cb = 0; cb < D_ / 64; ++cb)
    cp_async16(tile + cb * SW128_BLOCK_BYTES + row * 128 + ((c ^ (row & 7)) << 4), src + cb * 64 + c * 8, valid);
}

// ---- FP8 caches (kernels/mla_fp8.cuh) in the Hopper kernels: register stages ---------------------------------
// Warp w of the 256 threads handles the raw 656-byte rows 8 w .. 8 w + 7 of a 64-row key tile, in two halves
// (rows 8 w + 4 HALF + k, k < 4). fp8_half_load brings a half from global memory into registers (Fp8Half,
// 21 registers a thread; nothing waits for the loads there), fp8_half_store later dequantises it into a
// 128-byte swizzled bf16 tile. The kernels load a tile ahead and dequantise while their wgmma batches run, so
// neither the loads' latency nor the dequantisation sits between two barriers with the tensor cores idle
// (v1 went through raw shared-memory tiles and dequantised at the top of each tile: 0.68 ms at
// 128,1,16,8192 on the H100, issue-bound; benchmarks/NOTES_cupy.md).
// Global loads: ld.global.nc (the cache is read-only during a call), zero-filled (scale 1) when !valid, in
// which case nothing is read; a warp instruction reads 256 contiguous bytes of a row (codes), 4 x 128 (RoPE)
// or 4 x 16 (scales). Shared stores: 16 bytes a lane, 8 lanes a 128-byte line (conflict-free).
__device__ __forceinline__ uint2 ldg_nc_v2(const void* p, bool valid) {
  uint2 r;
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %3, 0; mov.b32 %0, 0; mov.b32 %1, 0;\n"
      "  @q ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2]; }"
      : "=&r"(r.x), "=&r"(r.y)
      : "l"(p), "r"((int)valid));
  return r;
}
__device__ __forceinline__ uint4 ldg_nc_v4(const void* p, bool valid) {
  uint4 r;
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %5, 0; mov.b32 %0, 0; mov.b32 %1, 0; mov.b32 %2, 0; mov.b32 %3, 0;\n"
      "  @q ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4]; }"
      : "=&r"(r.x), "=&r"(r.y), "=&r"(r.z), "=&r"(r.w)
      : "l"(p), "r"((int)valid));
  return r;
}
__device__ __forceinline__ float ldg_nc_f32_or1(const void* p, bool valid) {  // 1.0 when !valid
  float r;
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %2, 0; mov.b32 %0, 0f3F800000;\n"
      "  @q ld.global.nc.L1::no_allocate.f32 %0, [%1]; }"
      : "=&f"(r)
      : "l"(p), "r"((int)valid));
  return r;
}
// an int (block-table entry, index) or dflt when !valid; nothing waits for it here (the consumer does). (A
// plain load timed the same, H100 2026-11-26; the asm keeps the load where it is written.)
__device__ __forceinline__ int ldg_nc_i32_or(const int* p, bool valid, int dflt) {
  int r;
  asm volatile(
      "{ .reg .pred q; setp.ne.b32 q, %2, 0; mov.b32 %0, %3;\n"
      "  @q ld.global.nc.b32 %0, [%1]; }"
      : "=&r"(r)
      : "l"(p), "r"((int)valid), "r"(dflt));
  return r;
}
// (A mapping with both of a lane's chunks under one scale -- chunks 16 (lane / 8) + 8 j + lane % 8, one shuffle a
// row instead of two -- measured slower on the H100, 2026-11-26: its warp loads are 4 x 64 bytes, each line read
// by two instructions; sparse FP8 0.595 -> 0.634 ms, wide dense FP8 2.11 -> 2.22 ms. benchmarks/NOTES_cupy.md)
struct Fp8Half {
  uint2 codes[4][2];  // row k: the 8 e4m3 codes of chunk c = lane + 32 j (channels 8 c .. 8 c + 7)
  uint4 rope;         // ROPE: row 4 HALF + lane / 8, RoPE chunk lane % 8 (bf16 channels 512 + 8 (lane % 8) ..)
  float scale;        // row 4 HALF + lane % 4: scale (lane / 4) % 4 (of channels 128 ((lane / 4) % 4) ..)
};
// tok: lane l holds the token row of tile row 8 w + l % 8 (-1: invalid); that row's token is at
// kc8 + (tok * h_kv + g) * 656.
__device__ __forceinline__ const unsigned char* fp8_row(const unsigned char* kc8, int tok, int h_kv, int g) {
  return kc8 + ((long long)(tok < 0 ? 0 : tok) * h_kv + g) * FP8_BYTES;
}
// ROPE: the RoPE channels travel in the stage too (4 more registers); without, fp8_rope_copy copies them
// (cp.async, all 8 rows of the warp) straight into the bf16 tile.
template <int HALF, bool ROPE>
__device__ __forceinline__ void fp8_half_load(Fp8Half& st, const unsigned char* kc8, int tok, int h_kv, int g,
                                              int lane) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int tk = __shfl_sync(0xffffffff, tok, 4 * HALF + k);
    const unsigned char* src = fp8_row(kc8, tk, h_kv, g) + lane * 8;
    st.codes[k][0] = ldg_nc_v2(src, tk >= 0);
    st.codes[k][1] = ldg_nc_v2(src + 256, tk >= 0);
  }
  if constexpr (ROPE) {
    const int tr = __shfl_sync(0xffffffff, tok, 4 * HALF + (lane >> 3));
    st.rope = ldg_nc_v4(fp8_row(kc8, tr, h_kv, g) + FP8_ROPE_AT + (lane & 7) * 16, tr >= 0);
  }
  const int ts = __shfl_sync(0xffffffff, tok, 4 * HALF + (lane & 3));
  st.scale = ldg_nc_f32_or1(fp8_row(kc8, ts, h_kv, g) + FP8_SCALES_AT + ((lane >> 2) & 3) * 4, ts >= 0);
}
// the half -> its rows of the SW128 bf16 tile kb (exactly dequant8's values: dequant8_pow2 when every scale
// of the half is a moderate power of two, a warp-uniform choice, else dequant8)
template <int HALF, bool ROPE>
__device__ __forceinline__ void fp8_half_store(const Fp8Half& st, unsigned char* kb, int warp, int lane) {
  if (__all_sync(0xffffffff, fp8_pow2_ok(st.scale))) {
    const u32 mult = fp8_pow2_mult(st.scale);
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const u32 m = __shfl_sync(0xffffffff, mult, 4 * ((lane >> 4) + 2 * j) + k);
        *reinterpret_cast<uint4*>(kb + sw128_offset(8 * warp + 4 * HALF + k, 8 * (lane + 32 * j))) =
            dequant8_pow2(st.codes[k][j], m);
      }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float scale = __shfl_sync(0xffffffff, st.scale, 4 * ((lane >> 4) + 2 * j) + k);
        *reinterpret_cast<uint4*>(kb + sw128_offset(8 * warp + 4 * HALF + k, 8 * (lane + 32 * j))) =
            dequant8(st.codes[k][j], scale);
      }
  }
  if constexpr (ROPE)
    *reinterpret_cast<uint4*>(kb + sw128_offset(8 * warp + 4 * HALF + (lane >> 3), FP8_NOPE + 8 * (lane & 7))) =
        st.rope;
}
// the RoPE channels of the warp's 8 rows (tok as for fp8_half_load) -> the bf16 tile kb, cp.async (the
// caller commits and waits); lane l: row l / 4, chunks 2 (l % 4), + 1
__device__ __forceinline__ void fp8_rope_copy(unsigned char* kb, const unsigned char* kc8, int tok, int h_kv, int g,
                                              int warp, int lane) {
  const int tr = __shfl_sync(0xffffffff, tok, lane >> 2);
  const unsigned char* src = fp8_row(kc8, tr, h_kv, g) + FP8_ROPE_AT;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int c = 2 * (lane & 3) + h;
    cp_async16(kb + sw128_offset(8 * warp + (lane >> 2), FP8_NOPE + 8 * c), src + 16 * c, tr >= 0);
  }
}

// The warpgroup exchange buffer: 16 floats for each of a warpgroup's 128 threads (8 KB), float4-interleaved
// so that a warp's 16-byte accesses are 512 contiguous bytes.
constexpr int WG_XCHG_FLOATS = 128 * 16;
__device__ __forceinline__ void wg_xchg_store(float* sx, int t, const float (&v)[16]) {
#pragma unroll
  for (int k = 0; k < 4; ++k)
    *reinterpret_cast<float4*>(sx + (k * 128 + t) * 4) = make_float4(v[4 * k], v[4 * k + 1], v[4 * k + 2], v[4 * k + 3]);
}
__device__ __forceinline__ void wg_xchg_load(const float* sx, int t, float (&v)[16]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float4 x = *reinterpret_cast<const float4*>(sx + (k * 128 + t) * 4);
    v[4 * k] = x.x;
    v[4 * k + 1] = x.y;
    v[4 * k + 2] = x.z;
    v[4 * k + 3] = x.w;
  }
}

#if MLA_HAS_WGMMA
// acc[16] = Q[64 rows, channels 0 .. 16 KSTEPS) . K[keys key0 .. key0 + 31, same channels]^T, fp32.
// q_tile / k_keys: shared-window addresses of the Q tile and of the K tile's row group key0 / 8 (key0 % 8 == 0).
// Issues the wgmma batch and commits it; the caller waits (wg_wait<0>) before reading acc.
// SW: the K tile is 128-byte swizzled (k_keys inside it; k-step s: channel block s / 4, 32 (s % 4) bytes in).
template <int KSTEPS, bool SW = false>
__device__ __forceinline__ void wg_qk_n32_issue(float (&acc)[16], u32 q_tile, u32 k_keys) {
  const u64 dq = wg_desc(q_tile, WG_K_LBO, WG_K_SBO);
  const u64 dk = SW ? wg_desc_sw128(k_keys, WG_SW_K_LBO, WG_SW_K_SBO) : wg_desc(k_keys, WG_K_LBO, WG_K_SBO);
  wg_fence_operands(acc);
  wg_fence();
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    const u64 kstep = SW ? (((s >> 2) * SW128_BLOCK_BYTES + (s & 3) * 32) >> 4) : s * WG_QK_KSTEP;
    wg_mma_m64n32k16_ss(acc, dq + s * WG_QK_KSTEP, dk + kstep, s > 0);
  }
  wg_commit();
}

// S[64 x 64] = Q K^T of one key tile, both warpgroups: warpgroup w scores keys 32 w .. 32 w + 31 (so QK^T
// is not repeated), then the two swap halves through sx (8 KB): warpgroup 1 stores and arrives at named
// barrier 1; warpgroup 0 waits there, takes warpgroup 1's values, stores its own in the same slots (each
// slot is read and rewritten by the same thread) and arrives at barrier 2, where warpgroup 1 waits.
// Thread t of warpgroup 0 needs exactly the keys 32..63 values that thread t of warpgroup 1 holds (same rows,
// same column pattern), so the exchange is a pure thread-pair swap. Both warpgroups end with the same s[32],
// bit for bit: s[i] = S[wg_acc_row(t, i)][wg_acc_col(t, i)], i = 0..31 over the 64 keys (wg_acc_col < 64).
// during(): work of the caller's that runs while the wgmma batch does (between issue and wait).
template <int KSTEPS, bool SW = false, class During>
__device__ __forceinline__ void wg_scores(float (&s)[32], u32 q_tile, u32 k_tile, float* sx, int wg, int t,
                                          During&& during) {
  float acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
  wg_qk_n32_issue<KSTEPS, SW>(acc, q_tile, k_tile + wg * (SW ? 32 * 128 : 4 * WG_RG_BYTES));
  during();
  wg_wait<0>();
  wg_fence_operands(acc);
  float other[16];
  // Both warpgroups sync (no bar.arrive) on both barriers: the same order as a producer/consumer
  // arrive/sync pair, which compute-sanitizer's racecheck reported as 4 x 10240 hazards on the H100
  // (2026-11-25; the outputs were right). Full syncs give racecheck the happens-before it models.
  if (wg == 1) {
    wg_xchg_store(sx, t, acc);
    named_bar_sync(1, 256);
    named_bar_sync(2, 256);
    wg_xchg_load(sx, t, other);
  } else {
    named_bar_sync(1, 256);
    wg_xchg_load(sx, t, other);
    wg_xchg_store(sx, t, acc);
    named_bar_sync(2, 256);
  }
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    s[i] = wg ? other[i] : acc[i];
    s[16 + i] = wg ? acc[i] : other[i];
  }
}

template <int KSTEPS, bool SW = false>
__device__ __forceinline__ void wg_scores(float (&s)[32], u32 q_tile, u32 k_tile, float* sx, int wg, int t) {
  wg_scores<KSTEPS, SW>(s, q_tile, k_tile, sx, wg, t, [] {});
}

// P = 2^(s - mu) in place over the S accumulator layout (mu0 / mu1: the thread's rows r0 / r1), each row's P added
// to l0 / l1 (the 64-row kernels' softmax step)
__device__ __forceinline__ void wg_exp2_rowsum(float (&s)[32], float mu0, float mu1, float& l0, float& l1) {
#pragma unroll
  for (int k = 0; k < 32; ++k) {
    const bool second = (k >> 1) & 1;
    s[k] = fast_exp2(s[k] - (second ? mu1 : mu0));
    if (second) l1 += s[k];
    else l0 += s[k];
  }
}

// P (fp32, the S accumulator layout over 64 keys) -> the A fragments of the 4 k-steps of P V:
// hi[4 kk + j] = pack(p[8 kk + 2 j], p[8 kk + 2 j + 1]) rounded to the 16-bit type; lo = the rounding error,
// rounded again (P = hi + lo to ~16 mantissa bits; used when SPLIT).
template <bool SPLIT>
__device__ __forceinline__ void wg_p_frags(const float (&p)[32], u32 (&hi)[16], u32 (&lo)[16]) {
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    hi[j] = pack2(p[2 * j], p[2 * j + 1]);
    if constexpr (SPLIT) lo[j] = pack2(p[2 * j] - lo_f(hi[j]), p[2 * j + 1] - hi_f(hi[j]));
    else lo[j] = 0u;
  }
}

// o[64 x 256] += P[64 x 64] V[64 keys x 256 channels] (+ P_lo V when SPLIT). v_cols: shared-window address of
// the K tile's channel group 32 w (this warpgroup's channels 256 w ..). Issues and commits; the caller waits.
// SW: the K tile is 128-byte swizzled, v_cols its channel block 4 w (MN-major SW128: LBO = next 64 channels,
// SBO = next 8 keys, a 16-key k-step 2048 bytes).
template <bool SPLIT, bool SW = false>
__device__ __forceinline__ void wg_pv_issue(float (&o)[128], const u32 (&hi)[16], const u32 (&lo)[16], u32 v_cols) {
  const u64 dv = SW ? wg_desc_sw128(v_cols, WG_SW_MN_LBO, WG_SW_MN_SBO) : wg_desc(v_cols, WG_MN_LBO, WG_MN_SBO);
  constexpr u64 KSTEP = SW ? (2048 >> 4) : WG_PV_KSTEP;
  wg_fence_operands(o);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wg_mma_m64n256k16_rs_nmajor(o, hi[4 * kk], hi[4 * kk + 1], hi[4 * kk + 2], hi[4 * kk + 3], dv + kk * KSTEP);
    if constexpr (SPLIT)
      wg_mma_m64n256k16_rs_nmajor(o, lo[4 * kk], lo[4 * kk + 1], lo[4 * kk + 2], lo[4 * kk + 3], dv + kk * KSTEP);
  }
  wg_commit();
}
#endif  // MLA_HAS_WGMMA
