// mla_decode_hopper_narrow.cu -- MLA decode on Hopper (sm_90a) for at most 16 query rows a KV head
// (s_q * h_q / h_kv <= 16: DeepSeek's h_q = 16 decode, the memory-bound case), wgmma with the operands
// swapped so that no tensor work is padding.
//
// What it computes: exactly what kernels/mla_decode_hopper.cu and mla_decode_portable.cu compute
// (mla/reference.py is the spec), same signature, same plan / partial layout / combine, for d = 576,
// d_v = 512; grid (num_workers, h_kv, ceil(M / 16)), 256 threads (more than 16 rows: several row tiles,
// each reading the keys again -- correct, but the 64-row kernel is the one for that).
//
// Why a second Hopper kernel: wgmma's M is 64. The 64-row kernel puts query rows on M, so 16 heads
// are padded to 64 (4x the tensor work and 4x the shared-memory reads of Q). Here the keys and the
// value channels are on M and the 16 query rows on N ("swap AB"):
//   S^T [64 keys x 16 rows]  = K_tile [64 x 576] . Q^T          36 k-steps of wgmma m64n16k16 (A = K,
//                                                               B = Q, both from smem)
//   O^T [512 ch x 16 rows]  += V^T [512 x 64 keys] . P^T        8 channel blocks x 4 k-steps of
//                                                               m64n32k16 (bf16: B = [P_hi | P_lo], 32 columns)
//                                                               or m64n16k16 (fp16: B = P)
// V^T is the K tile read channel-major (imm-trans-a = 1, the same descriptor as the 64-row kernel's
// N-major V); P goes through shared memory (B must), 4 KB a tile.
//
// Schedule (v2): both warpgroups work on the same key tile; the next tile's cp.async copies are in
// flight while this one is computed (2 K buffers: 2 x 72 KB is all that fits beside Q). Per tile:
//   1. copies of tile t + 1 issued (block-table entries fetched one tile earlier), wait for tile t, CTA barrier;
//   2. S^T: warpgroup w takes k-steps 18 w .. 18 w + 17 (channels 288 w ..), the two partial sums swap
//      through smem (CTA barrier) and each warpgroup adds them in the same order: both hold the same
//      S^T bit for bit;
//   3. column max (a query row is a column of S^T, its 64 keys spread over lane / 4 and the 4 warps of
//      a warpgroup: shuffles, then the warps through smem, a 128-thread barrier), P = 2^(s - m), P^T ->
//      smem (128-thread barrier); both warpgroups do this on the same values (their m, l agree);
//   4. O^T: warpgroup w owns channels 256 w .. 256 w + 255 (4 blocks, 64 fp32 registers a thread with the
//      P split); CTA barrier (the K buffer and the S^T swap area are free).
// The running sum l needs no per-tile reduction: each thread keeps the sum of its own keys, rescaled by
// the (uniform) alpha, and the sums are reduced once, at the end of a piece.
// v1 (commit d6fd662) let each warpgroup walk every other tile alone in its own buffer: no swap, but a
// warpgroup could only issue its next copy after computing, so every load's latency was exposed
// (0.702 ms at 128,1,16,8192 on the H100, 59% of copy; benchmarks/NOTES_cupy.md).
//
// Shared memory (dynamic, mirrored in mla/backends/cupy_hopper.py narrow_smem_bytes): Q 18432 B
//   + 2 K tiles 147456 B + 2 P^T tiles 2 * NPV * 128 B + S^T swap 8192 B + reductions 512 B + last keys 64 B
//   (182848 B bf16 and FP8).
//   Layouts: the K tiles are 128-byte swizzled (mla_wgmma.cuh, "128-byte swizzled tiles": a quarter-warp
//   copies a whole 128-byte line, conflict-free); Q and P^T are small, unswizzled 8 x 16 B core matrices:
//   K tile  byte(key, ch)    = (ch / 64) * 8192 + key * 128 + (((ch % 64) / 8) ^ (key % 8)) * 16 + (ch % 8) * 2
//   Q       offset(row, ch)  = (ch / 8) * 128 + (row / 8) * 64 + (row % 8) * 8 + ch % 8    (elements, 16 rows)
//   P^T     offset(col, key) = ((key / 8) * NPV / 8 + col / 8) * 64 + (key % 8) * 8 + col % 8
// Descriptors: S^T A = K tile K-major SW128 (SBO 1024 B = next 8 keys; k-step k starts in channel block k / 4,
// 32 (k % 4) bytes into the row), B = Q K-major (LBO 256 B = next 8 channels, SBO 128 B = next 8 rows);
// O^T A = V^T MN-major SW128 (SBO 1024 B = next 8 keys, LBO 8192 B = next channel block), B = P^T MN-major
// (LBO NPV * 16 B = next 8 keys, SBO 128 B = next 8 columns).
//
// FP8 cache (-DMLA_FP8=1; issue #5): k_cache holds FlashMLA's 656-byte tokens (kernels/mla_fp8.cuh). v2
// (2026-11-26): the raw rows never touch shared memory. Each warp keeps the raw rows it will dequantise in
// registers (mla_wgmma.cuh, "register stages": fp8_half_load, 21 registers a half), a tile ahead, and
// dequantises them into the *other* of the two SW128 bf16 tiles (the bf16 build's) while this tile's wgmma
// batches run: half a under S^T, half b under O^T (fp8_half_store: hardware e4m3 -> f16, a bit shift into
// bf16, one bf16x2 multiply by the scale; exact, dequant8 for unusual scales). The barrier that ends a tile
// also publishes the next one, so a tile has the bf16 build's barriers. At 32 rows (registers are short)
// one half waits in registers at a time (loaded half a tile ahead) and the RoPE channels are copied
// (cp.async) straight into the bf16 tile. Shared memory: as bf16. q must be bf16.
// v1 (commit d243ffb: two raw shared-memory tiles, dequantised at the top of each tile, tensor cores idle):
// 0.684 ms at 128,1,16,8192 on the H100; v2 0.399-0.407 ms; with the prmt dequantisation (mla_fp8.cuh)
// 0.374-0.377 ms (benchmarks/NOTES_cupy.md). Dequantising warpgroups of their own were tried and were slower
// (0.445 ms: commit d8ebd65, NOTES_cupy.md).
// The columns' last keys (causal) live in shared memory (sLim): at 32 rows the registers are short.
//
// Compile-time parameters (-D): MLA_FP16 (0 = bf16), MLA_P_SPLIT (default !MLA_FP16), MLA_FP8 (0).
#include "mla_common.cuh"
#include "mla_wgmma.cuh"

#ifndef MLA_FP8
#define MLA_FP8 0
#endif
#ifndef MLA_NQ
#define MLA_NQ 16
#endif
#if MLA_FP8 && MLA_FP16
#error "the FP8 cache's RoPE part is bf16: MLA_FP8 needs bf16 (MLA_FP16=0)"
#endif

// diagnostics (A/B timing only, wrong results): the bf16 build loads no key tile after the first, which times its
// chain without memory (H100, 128,1,16,8192: 0.204 ms against 0.420 with the loads; benchmarks/NOTES_cupy.md)
#ifndef MLA_DIAG_NO_KLOAD
#define MLA_DIAG_NO_KLOAD 0
#endif

#ifndef MLA_P_SPLIT
#define MLA_P_SPLIT (!MLA_FP16)
#endif
// FP8 v3 (16 rows): the raw rows reach shared memory through a raw stage, not through registers: 1 = by cp.async,
// 2 = by bulk copies (one 656-byte row a copy) completing on mbarriers
#ifndef MLA_FP8_STAGE
#define MLA_FP8_STAGE 0
#endif

namespace narrow {
constexpr int D = 576, DV = 512;
constexpr int NQ = MLA_NQ;                 // query rows a CTA (wgmma N of S^T): 16 or 32
static_assert(NQ == 16 || NQ == 32, "the narrow kernel takes 16 or 32 query rows a CTA");
constexpr int SREG = NQ / 2;               // S^T accumulator registers a thread (m64nNQ)
constexpr int NCOL = NQ / 4;               // query columns a thread holds
constexpr int BLOCK_N = 64;                // keys a tile (wgmma M of S^T)
constexpr int NTHREADS = 256;
constexpr int KSTEPS = D / 16;             // k-steps of S^T
constexpr int KSTEPS_WG = KSTEPS / 2;      // ... of one warpgroup
constexpr int MBLOCKS_WG = DV / 64 / 2;    // channel blocks of O^T a warpgroup
constexpr bool P_SPLIT = MLA_P_SPLIT;
constexpr int NPV = P_SPLIT ? 2 * NQ : NQ;  // columns of the P^T operand: [P_hi | P_lo] or P
constexpr int OREG = NPV / 2;              // accumulator registers of one m64nNPV block
constexpr int TILE_EL = BLOCK_N * D, Q_EL = NQ * D, P_EL = NPV * BLOCK_N;
constexpr int X_FLOATS = 2 * SREG * 128;   // [wg][SREG registers][128 threads]: the S^T partial sums
constexpr int RED_FLOATS = 2 * 4 * NQ;     // [wg][warp][col]: per-warp column max / sum
constexpr bool FP8 = MLA_FP8;
// FP8: both halves of the next tile in registers (loaded a whole tile ahead), or, at 32 rows where that
// would spill, one half at a time (loaded half a tile ahead)
constexpr bool FP8_TWO_STAGES = NQ == 16;
constexpr int STAGE_KIND = MLA_FP8_STAGE;
constexpr bool FP8_STAGE = STAGE_KIND == 1, FP8_BULK = STAGE_KIND == 2;
static_assert(STAGE_KIND == 0 || (FP8 && NQ == 16), "the raw stage is the 16-row FP8 build's (32 rows: no room)");
static_assert(STAGE_KIND >= 0 && STAGE_KIND <= 2, "MLA_FP8_STAGE: 0, 1 (cp.async) or 2 (bulk copies)");
// the raw stage. cp.async: the e4m3 codes of a key tile (64 rows x 512 B) + each thread's copy of its rows' scales
// (2 halves x 256 threads x 16 B). Bulk: two mbarriers (halves a, b) + the tile's whole 656-byte rows.
constexpr int STAGE_CODE_BYTES = BLOCK_N * FP8_NOPE;
constexpr int STAGE_BYTES = FP8_STAGE ? STAGE_CODE_BYTES + 2 * NTHREADS * 16 : FP8_BULK ? 16 + BLOCK_N * FP8_BYTES : 0;
constexpr int SMEM_BYTES = 2 * (Q_EL + 2 * TILE_EL + 2 * P_EL) + 4 * (X_FLOATS + RED_FLOATS + NQ) + STAGE_BYTES;
static_assert(SMEM_BYTES == (NQ == 16 ? (P_SPLIT ? 182848 : 178752) : (P_SPLIT ? 218240 : 210048)) + STAGE_BYTES,
              "mirrored in mla/backends/cupy_hopper.py narrow_smem_bytes");

constexpr u32 Q_LBO = NQ * 16, Q_SBO = 128;                 // Q, K-major
constexpr u32 P_LBO = NPV * 16, P_SBO = 128;                // P^T, MN-major
constexpr u64 Q_KSTEP = (2 * Q_LBO) >> 4;                   // descriptor step of 16 channels in Q
constexpr u64 P_KSTEP = (2 * P_LBO) >> 4;                   // ... of 16 keys in P^T

__device__ __forceinline__ int q_offset(int row, int ch) { return (ch >> 3) * (NQ * 8) + (row >> 3) * 64 + (row & 7) * 8 + (ch & 7); }
__device__ __forceinline__ int p_offset(int col, int key) {
  return ((key >> 3) * (NPV / 8) + (col >> 3)) * 64 + (key & 7) * 8 + (col & 7);
}
// this thread's NCOL query columns: j -> column c2 + (j & 1) + 8 (j >> 1); accumulator register i of an
// m64nNQ (S^T) or of the P_hi half of an m64nNPV block (i < SREG; i + SREG is P_lo's) holds column jof(i)
__device__ __forceinline__ int jof(int i) { return (i & 1) | (((i & (SREG - 1)) >> 2) << 1); }
__device__ __forceinline__ int colof(int c2, int j) { return c2 + (j & 1) + 8 * (j >> 1); }

// warpgroup wg's 128-thread named barrier (ids 1, 2); wg is warp-uniform, the branch is too
__device__ __forceinline__ void wg_bar(int wg) {
  if (wg) named_bar_sync(2, 128);
  else named_bar_sync(1, 128);
}

// ---- FP8 v3's raw stage (MLA_FP8_STAGE). Half h of a key tile is rows 32 h .. 32 h + 31; thread tid copies and
// later converts row 32 h + tid / 8, code chunks j = tid % 8 + 8 k (k < 4; 16 codes = 16 bytes each, channels
// 16 j ..), and its own copy of that row's 4 scales. No thread reads what another copied, so a thread's
// cp.async.wait_group is all the synchronisation the stage needs (no barrier), and the chunk is refilled as
// soon as the thread has converted it. A quarter-warp copies 128 contiguous bytes of a row.
__device__ __forceinline__ void fp8_stage_copy(unsigned char* s_codes, unsigned char* s_scales,
                                               const unsigned char* kc8, int tok, int h_kv, int g, int half,
                                               int tid) {
  const int row = 32 * half + (tid >> 3), l = tid & 7;
  const unsigned char* src = fp8_row(kc8, tok, h_kv, g);
#pragma unroll
  for (int k = 0; k < 4; ++k) cp_async16(s_codes + row * FP8_NOPE + 16 * (l + 8 * k), src + 16 * (l + 8 * k), tok >= 0);
  cp_async16(s_scales + (half * NTHREADS + tid) * 16, src + FP8_SCALES_AT, tok >= 0);  // zero-filled: scale 0
}
// the thread's chunks of half `half` -> the SW128 bf16 tile kb (exactly dequant8's values; the fast path when
// every scale the warp holds is a moderate power of two, a warp-uniform choice). A chunk is two 16-byte bf16
// chunks of one 64-channel block; lanes with tid % 8 >= 4 store their second one first, so that a quarter-warp's
// stores hit 8 different 16-byte bank groups.
// codes: the row's 512 code bytes in shared memory; l = tid % 8
__device__ __forceinline__ void fp8_convert_row_chunks(unsigned char* kb, int row, int l, const unsigned char* codes,
                                                       float4 sc4) {
  const int sw = l >> 2;
  const float sc[4] = {sc4.x, sc4.y, sc4.z, sc4.w};
  const bool fast = __all_sync(0xffffffff, fp8_pow2_ok(sc[0]) && fp8_pow2_ok(sc[1]) && fp8_pow2_ok(sc[2]) &&
                                               fp8_pow2_ok(sc[3]));
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int j = l + 8 * k;
    const uint4 w = *reinterpret_cast<const uint4*>(codes + 16 * j);
    const uint2 first = sw ? uint2{w.z, w.w} : uint2{w.x, w.y};   // channels 16 j + 8 sw ..
    const uint2 second = sw ? uint2{w.x, w.y} : uint2{w.z, w.w};  // channels 16 j + 8 (1 - sw) ..
    uint4 a, b;
    if (fast) {
      const u32 mult = fp8_pow2_mult(sc[k]);
      a = dequant8_pow2(first, mult);
      b = dequant8_pow2(second, mult);
    } else {
      a = dequant8(first, sc[k]);
      b = dequant8(second, sc[k]);
    }
    const int ch = 16 * j + 8 * sw;
    *reinterpret_cast<uint4*>(kb + sw128_offset(row, ch)) = a;
    *reinterpret_cast<uint4*>(kb + sw128_offset(row, ch ^ 8)) = b;
  }
}
__device__ __forceinline__ void fp8_stage_convert(unsigned char* kb, const unsigned char* s_codes,
                                                  const unsigned char* s_scales, int half, int tid) {
  const int row = 32 * half + (tid >> 3);
  fp8_convert_row_chunks(kb, row, tid & 7, s_codes + row * FP8_NOPE,
                         *reinterpret_cast<const float4*>(s_scales + (half * NTHREADS + tid) * 16));
}

// ---- FP8 v3b's bulk stage (MLA_FP8_STAGE=2): whole 656-byte rows, each brought by one bulk copy (async proxy, like
// TMA: the issuing thread's later fences do not wait for it, as they wait for its cp.async copies -- the measured
// reason v3 by cp.async was slower than the register stages). Warp 0 fills half h of a tile: lane l copies row
// 32 h + l and arrives on the half's mbarrier (32 arrivals a phase) with the row's bytes; a row past the piece is
// zeroed by the lane instead (0 x NaN would be NaN) and arrives with none. Every thread converts its chunks as in
// v3 (any thread may read any row now), and the RoPE chunk tid % 8 of its row. A half is refilled after a barrier
// that follows everyone's conversion of it.
__device__ __forceinline__ void fp8_bulk_fill(unsigned char* s_rows, u32 bar, const unsigned char* kc8, int tok,
                                              int h_kv, int g, int half, int lane) {
  unsigned char* dst = s_rows + (32 * half + lane) * FP8_BYTES;
  if (tok >= 0) {
    mbar_arrive_expect_tx(bar, FP8_BYTES);
    bulk_load_1d(smem_u32(dst), fp8_row(kc8, tok, h_kv, g), FP8_BYTES, bar);
  } else {
#pragma unroll 1
    for (int c = 0; c < FP8_BYTES / 16; ++c) reinterpret_cast<uint4*>(dst)[c] = make_uint4(0u, 0u, 0u, 0u);
    mbar_arrive_expect_tx(bar, 0);
  }
}
__device__ __forceinline__ void fp8_bulk_convert(unsigned char* kb, const unsigned char* s_rows, int half, int tid) {
  const int row = 32 * half + (tid >> 3), l = tid & 7;
  const unsigned char* src = s_rows + row * FP8_BYTES;
  fp8_convert_row_chunks(kb, row, l, src, *reinterpret_cast<const float4*>(src + FP8_SCALES_AT));
  *reinterpret_cast<uint4*>(kb + sw128_offset(row, FP8_NOPE + 8 * l)) =
      *reinterpret_cast<const uint4*>(src + FP8_ROPE_AT + 16 * l);
}

#if MLA_HAS_WGMMA
// s[8] = the part of S^T from this warpgroup's k-steps (SW128 K tile at k_tile, Q at q_tile); commits.
// k-step k (channels 16 k ..) of the K tile: channel block k / 4, 32 bytes further a step inside it.
__device__ __forceinline__ void qk_mma(float (&d)[8], u64 da, u64 db, int acc) { wg_mma_m64n16k16_ss(d, da, db, acc); }
__device__ __forceinline__ void qk_mma(float (&d)[16], u64 da, u64 db, int acc) { wg_mma_m64n32k16_ss(d, da, db, acc); }
__device__ __forceinline__ void st_issue(float (&s)[SREG], u32 k_tile, u32 q_tile, int wg) {
  const u64 dk = wg_desc_sw128(k_tile, WG_SW_K_LBO, WG_SW_K_SBO);
  const u64 dq = wg_desc(q_tile, Q_LBO, Q_SBO) + wg * KSTEPS_WG * Q_KSTEP;
  wg_fence_operands(s);
  wg_fence();
#pragma unroll
  for (int k = 0; k < KSTEPS_WG; ++k) {
    const int ks = wg * KSTEPS_WG + k;
    qk_mma(s, dk + (((ks >> 2) * SW128_BLOCK_BYTES + (ks & 3) * 32) >> 4), dq + k * Q_KSTEP, k > 0);
  }
  wg_commit();
}

__device__ __forceinline__ void pv_mma(float (&d)[16], u64 da, u64 db) { wg_mma_m64n32k16_ss_tt(d, da, db); }
__device__ __forceinline__ void pv_mma(float (&d)[8], u64 da, u64 db) { wg_mma_m64n16k16_ss_tt(d, da, db); }
__device__ __forceinline__ void pv_mma(float (&d)[32], u64 da, u64 db) { wg_mma_m64n64k16_ss_tt(d, da, db); }

// O^T[this warpgroup's 256 channels x NPV] += V^T P^T (V = the SW128 K tile at v_tile, read MN-major: channel
// block mb is M-block mb, 16 keys = 2 atoms of 8 rows = 2048 bytes a k-step; P^T at p_tile); commits
__device__ __forceinline__ void ot_issue(float (&o)[MBLOCKS_WG][OREG], u32 v_tile, u32 p_tile, int wg) {
  const u64 dv = wg_desc_sw128(v_tile + wg * MBLOCKS_WG * SW128_BLOCK_BYTES, WG_SW_MN_LBO, WG_SW_MN_SBO);
  const u64 dp = wg_desc(p_tile, P_LBO, P_SBO);
#pragma unroll
  for (int mb = 0; mb < MBLOCKS_WG; ++mb) wg_fence_operands(o[mb]);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk)
#pragma unroll
    for (int mb = 0; mb < MBLOCKS_WG; ++mb)
      pv_mma(o[mb], dv + ((mb * SW128_BLOCK_BYTES + kk * 2048) >> 4), dp + kk * P_KSTEP);
  wg_commit();
}
#endif
}  // namespace narrow

extern "C" __global__ void __launch_bounds__(narrow::NTHREADS, 1)
mla_decode_hopper_narrow(const mla_elem_t* __restrict__ q, const void* __restrict__ k_cache_v,
                         const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                         const int* __restrict__ sched, const int* __restrict__ num_splits,
                         float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                         float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2,
                         int causal, int force_partials) {
#if MLA_HAS_WGMMA
  using namespace narrow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);  // [Q_EL]
  mla_elem_t* sK = sQ + Q_EL;                                 // [2][TILE_EL]: tile t in buffer t % 2
  mla_elem_t* sP = sK + 2 * TILE_EL;                          // [2][P_EL]: warpgroup w's P^T
  float* sX = reinterpret_cast<float*>(sP + 2 * P_EL);        // [2][SREG][128]: warpgroup w's S^T partial
  float* sRed = sX + X_FLOATS;                                // [2][4][NQ]: warpgroup w's per-warp column max / sum
  int* sLim = reinterpret_cast<int*>(sRed + RED_FLOATS);      // [NQ]: the last key column c sees (in smem: registers
                                                              // are short at 32 rows)
  // FP8 v3: the raw stage's codes [64][512 B] and scale copies [2][256][16 B] (after everything else)
  unsigned char* sStage = smem_raw + (SMEM_BYTES - STAGE_BYTES);
  unsigned char* sStageScales = sStage + STAGE_CODE_BYTES;
  // FP8 v3b: the bulk stage's mbarriers (halves a, b) and rows [64][656 B]
  const u32 bar_a = smem_u32(sStage), bar_b = bar_a + 8;
  unsigned char* sRows = sStage + 16;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // warpgroup (read from lane 0, so that ptxas sees a warp-uniform value: control flow that depends on it
  // is then not "divergent", which would make ptxas serialise the wgmma), thread and warp in it
  const int wg = __shfl_sync(0xffffffff, tid >> 7, 0), t = tid & 127, wq = warp & 3;
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int c2 = 2 * (lane & 3);
  const int key0 = 16 * wq + (lane >> 2);  // accumulator rows key0, key0 + 8 (keys of S^T; channels of O^T)
  const int ld_row = sw128_copy_row(tid);  // the K tile rows this thread copies: ld_row, ld_row + 32
  const u32 sQ_addr = smem_u32(sQ), sK_addr = smem_u32(sK), myP_addr = smem_u32(sP) + wg * P_EL * 2;
  mla_elem_t* myP = sP + wg * P_EL;

  if (sK_addr & 1023) __trap();  // the SW128 blocks must be 1024-byte aligned (see mla_wgmma.cuh)
  const MlaWork work = mla_work(sched, blockIdx.x);
  u32 bulk_parity = 0;  // FP8 v3b: the parity of the next phase of bar_a and bar_b (each completes once a tile)
  if constexpr (FP8_BULK) {
    if (tid == 0) {
      mbar_init(bar_a, 32);
      mbar_init(bar_b, 32);
      fence_mbar_init();
    }
    __syncthreads();
  }

  for (int i = work.begin_b; i <= work.end_b; ++i) {
    const int L = seqlens[i];
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    int stop_eff = stop;  // causal: no column of this CTA sees keys past L - s_q + r_max
    if (causal) stop_eff = min(stop, L - s_q + min(s_q - 1, (qt * NQ + NQ - 1) / group) + 1);
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;
    if (tid < NQ) {  // read after the first barrier of the piece's tile loop; free again after the piece's last
      const int m = qt * NQ + tid;
      sLim[tid] = causal ? min(stop - 1, L - s_q + m / group) : stop - 1;
    }

    float o[MBLOCKS_WG][OREG];
#pragma unroll
    for (int mb = 0; mb < MBLOCKS_WG; ++mb)
#pragma unroll
      for (int k = 0; k < OREG; ++k) o[mb][k] = 0.f;
    float m_run[NCOL], l_part[NCOL];
#pragma unroll
    for (int j = 0; j < NCOL; ++j) m_run[j] = MLA_NEG_INF, l_part[j] = 0.f;

    if (n_tiles > 0) {
      // bf16: the block-table entries of this thread's rows of key tile `tile` (0 past the piece: never used)
      auto fetch_blk = [&](int tile, int (&blk)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int pos = start + tile * BLOCK_N + ld_row + 32 * h;
          blk[h] = pos < stop_eff ? block_table[(long long)i * bt_stride + pos / page] : 0;
        }
      };
      // bf16: copies of key tile `tile` into K buffer tile % 2 (SW128)
      auto load_k = [&](int tile, const int (&blk)[2]) {
        const mla_elem_t* k_cache = static_cast<const mla_elem_t*>(k_cache_v);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int pos = start + tile * BLOCK_N + ld_row + 32 * h;
          const bool valid = pos < stop_eff;
          const mla_elem_t* src = k_cache;
          if (valid) src = k_cache + (((long long)blk[h] * page + pos % page) * h_kv + g) * (long long)D;
          sw128_tile_load_row<D>(reinterpret_cast<unsigned char*>(sK + (tile & 1) * TILE_EL), ld_row + 32 * h, tid,
                                 src, valid);
        }
      };
      // FP8: the token row of row 8 warp + lane % 8 of key tile `tile` (-1 past the piece), for fp8_half_load.
      // (Fetching the entries a tile earlier and turning them into token rows only where used, as the wide
      // kernel does, measured 15% slower here: 0.405 -> 0.467 ms at 128,1,16,8192, H100, not understood.)
      auto fetch_tok = [&](int tile) {
        const int pos = start + tile * BLOCK_N + 8 * warp + (lane & 7);
        return pos < stop_eff ? block_table[(long long)i * bt_stride + pos / page] * page + pos % page : -1;
      };
      const unsigned char* kc8 = static_cast<const unsigned char*>(k_cache_v);
      auto kbuf = [&](int tile) { return reinterpret_cast<unsigned char*>(sK + (tile & 1) * TILE_EL); };
      // FP8 v3: the token row of this thread's stage row in half `half` of key tile `tile` (-1 past the piece)
      auto fetch_stage_tok = [&](int tile, int half) {  // (v3b: warp 0's lane l fills row 32 half + l: tid >> 3 -> lane)
        const int pos = start + tile * BLOCK_N + 32 * half + (FP8_BULK ? lane : tid >> 3);
        return pos < stop_eff ? block_table[(long long)i * bt_stride + pos / page] * page + pos % page : -1;
      };
      // Q rows m -> (r, h) = (m / group, g group + m % group), rows >= M zero
      for (int c = tid; c < NQ * D / 8; c += NTHREADS) {
        const int r = c % NQ, ch = 8 * (c / NQ), m = qt * NQ + r;
        const bool valid = m < M;
        const mla_elem_t* src = q;
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D + ch;
        cp_async16(sQ + q_offset(r, ch), src, valid);
      }
      int blk_next[2];
      // FP8 register stages. Two: st_a / st_b hold halves a / b of tile tt + 1 at the top of tile tt, tok the
      // token rows of tile tt + 2. One: st_a holds half a of tile tt + 1, tok the token rows of tile tt + 1.
      Fp8Half st_a, st_b;
      int tok = 0;
      // FP8 v3: tok_a / tok_b: this thread's stage rows of tile tt + 2 at the top of tile tt (tok: the warp's rows of
      // tile tt + 1, for the RoPE copy). cp.async groups, committed in this order: tile tt's top: RoPE of tt + 1;
      // under S^T: half a of tt + 2; under O^T: half b of tt + 2 (empty groups where there is nothing to copy), so
      // each wait is wait_group 2.
      int tok_a = -1, tok_b = -1;
      if constexpr (FP8_BULK) {
        // v3b: tok_a (warp 0) holds its lane's row of half a of tile tt + 2 at the top of tile tt, tok_b of half b
        // of tile tt + 1. Tile 0 straight through (its latency is exposed once a piece).
        cp_async_commit();  // group: Q
        if (warp == 0) {
          fp8_bulk_fill(sRows, bar_a, kc8, fetch_stage_tok(0, 0), h_kv, g, 0, lane);
          fp8_bulk_fill(sRows, bar_b, kc8, fetch_stage_tok(0, 1), h_kv, g, 1, lane);
          if (n_tiles > 1) {
            tok_a = fetch_stage_tok(1, 0);
            tok_b = fetch_stage_tok(1, 1);
          }
        }
        cp_async_wait<0>();  // Q
        mbar_wait(bar_a, bulk_parity);
        fp8_bulk_convert(kbuf(0), sRows, 0, tid);
        mbar_wait(bar_b, bulk_parity);
        fp8_bulk_convert(kbuf(0), sRows, 1, tid);
        bulk_parity ^= 1;
        __syncthreads();  // everyone has read the stage
        if (warp == 0 && n_tiles > 1) {
          fence_proxy_async();  // (the generic reads above before the copies' async-proxy writes)
          fp8_bulk_fill(sRows, bar_a, kc8, tok_a, h_kv, g, 0, lane);
          if (n_tiles > 2) tok_a = fetch_stage_tok(2, 0);
        }
      } else if constexpr (FP8_STAGE) {
        cp_async_commit();  // group: Q
        // tile 0 straight through (its latency is exposed once a piece)
        tok = fetch_tok(0);
        tok_a = fetch_stage_tok(0, 0);
        tok_b = fetch_stage_tok(0, 1);
        fp8_rope_copy(kbuf(0), kc8, tok, h_kv, g, warp, lane);
        fp8_stage_copy(sStage, sStageScales, kc8, tok_a, h_kv, g, 0, tid);
        fp8_stage_copy(sStage, sStageScales, kc8, tok_b, h_kv, g, 1, tid);
        cp_async_commit();
        if (n_tiles > 1) {
          tok = fetch_tok(1);
          tok_a = fetch_stage_tok(1, 0);
          tok_b = fetch_stage_tok(1, 1);
        }
        cp_async_wait<0>();
        fp8_stage_convert(kbuf(0), sStage, sStageScales, 0, tid);
        fp8_stage_convert(kbuf(0), sStage, sStageScales, 1, tid);
        // half a, half b of tile 1 (each thread refills only what it has converted)
        if (n_tiles > 1) fp8_stage_copy(sStage, sStageScales, kc8, tok_a, h_kv, g, 0, tid);
        cp_async_commit();
        if (n_tiles > 1) fp8_stage_copy(sStage, sStageScales, kc8, tok_b, h_kv, g, 1, tid);
        cp_async_commit();
        if (n_tiles > 2) {
          tok_a = fetch_stage_tok(2, 0);
          tok_b = fetch_stage_tok(2, 1);
        }
      } else if constexpr (FP8) {
        cp_async_commit();  // group: Q
        // tile 0 straight through (its latency is exposed once a piece)
        tok = fetch_tok(0);
        if constexpr (!FP8_TWO_STAGES) fp8_rope_copy(kbuf(0), kc8, tok, h_kv, g, warp, lane);
        cp_async_commit();
        fp8_half_load<0, FP8_TWO_STAGES>(st_a, kc8, tok, h_kv, g, lane);  // (one stage: st_b is free here)
        fp8_half_load<1, FP8_TWO_STAGES>(st_b, kc8, tok, h_kv, g, lane);
        fp8_half_store<0, FP8_TWO_STAGES>(st_a, kbuf(0), warp, lane);
        fp8_half_store<1, FP8_TWO_STAGES>(st_b, kbuf(0), warp, lane);
        if (n_tiles > 1) {
          tok = fetch_tok(1);
          fp8_half_load<0, FP8_TWO_STAGES>(st_a, kc8, tok, h_kv, g, lane);
          if constexpr (FP8_TWO_STAGES) {
            fp8_half_load<1, FP8_TWO_STAGES>(st_b, kc8, tok, h_kv, g, lane);
            if (n_tiles > 2) tok = fetch_tok(2);
          }
        }
      } else {
        fetch_blk(0, blk_next);
        load_k(0, blk_next);
        cp_async_commit();  // group: Q + tile 0
        if (n_tiles > 1) fetch_blk(1, blk_next);
      }

      for (int tt = 0; tt < n_tiles; ++tt) {
        if constexpr (FP8_BULK) {
          // tile tt was converted into buffer tt % 2 during tile tt - 1 (fenced and complete at the barrier that
          // ends it), or before the loop
          if (tt == 0) {
            fence_proxy_async();  // tile 0 and Q visible to the tensor cores ...
            __syncthreads();      // ... everyone's
          }
          // half b of the stage was converted by everyone during tile tt - 1 (or before the loop): refill it
          if (warp == 0 && tt + 1 < n_tiles) {
            fence_proxy_async();
            fp8_bulk_fill(sRows, bar_b, kc8, tok_b, h_kv, g, 1, lane);
            if (tt + 2 < n_tiles) tok_b = fetch_stage_tok(tt + 2, 1);
          }
        } else if constexpr (FP8_STAGE) {
          // tile tt was converted into buffer tt % 2 during tile tt - 1 (fenced and complete at the barrier that
          // ends it), or before the loop
          if (tt == 0) {
            fence_proxy_async();  // tile 0 (Q and the RoPE channels waited for before its conversion) visible ...
            __syncthreads();      // ... everyone's
          }
          // the RoPE channels of tile tt + 1 -> the other buffer (last read by tile tt - 1: free since the barrier
          // that ended it); waited for at the end of this tile
          if (tt + 1 < n_tiles) fp8_rope_copy(kbuf(tt + 1), kc8, tok, h_kv, g, warp, lane);
          cp_async_commit();
          if (tt + 2 < n_tiles) tok = fetch_tok(tt + 2);
        } else if constexpr (FP8) {
          // tile tt was dequantised into buffer tt % 2 during tile tt - 1 (fenced and complete at the barrier
          // that ends it), or before the loop:
          if (tt == 0) {
            cp_async_wait<0>();   // Q
            fence_proxy_async();  // tile 0 and Q visible to the tensor cores' (async proxy) reads ...
            __syncthreads();      // ... everyone's
          }
        } else {
          // the other buffer was last read by tile tt - 1, finished by everyone (barrier at its end)
          if (!MLA_DIAG_NO_KLOAD && tt + 1 < n_tiles) load_k(tt + 1, blk_next);
          cp_async_commit();
          if (tt + 2 < n_tiles) fetch_blk(tt + 2, blk_next);  // in flight while this tile computes
          cp_async_wait<1>();   // this thread's copies of tile tt (and Q) have landed ...
          fence_proxy_async();  // ... and are visible to the tensor cores' (async proxy) reads
          __syncthreads();      // everyone's copies of tile tt are in
        }
        const u32 kt = sK_addr + (tt & 1) * TILE_EL * 2;

        // ---- S^T = K Q^T: this warpgroup's half of the channels, then the halves swap through smem
        float s[SREG];
        st_issue(s, kt, sQ_addr, wg);
        if constexpr (FP8_BULK) {  // while it runs: half a of tile tt + 1, stage -> the other buffer
          if (tt + 1 < n_tiles) {
            mbar_wait(bar_a, bulk_parity);
            fp8_bulk_convert(kbuf(tt + 1), sRows, 0, tid);
          }
        } else if constexpr (FP8_STAGE) {  // while it runs: half a of tile tt + 1, stage -> the other buffer; refill it
          if (tt + 1 < n_tiles) {
            cp_async_wait<2>();  // this thread's half a of tile tt + 1 (newer: its half b, the RoPE of tt + 1)
            fp8_stage_convert(kbuf(tt + 1), sStage, sStageScales, 0, tid);
            if (tt + 2 < n_tiles) fp8_stage_copy(sStage, sStageScales, kc8, tok_a, h_kv, g, 0, tid);
          }
          cp_async_commit();
          if (tt + 3 < n_tiles) tok_a = fetch_stage_tok(tt + 3, 0);
        } else if constexpr (FP8) {
          // while it runs: half a of tile tt + 1 -> the other buffer (last read by tile tt - 1, finished by
          // everyone: barrier at its end), then into the registers: half a of tile tt + 2 (two stages) or
          // half b of tile tt + 1 (one)
          if (tt + 1 < n_tiles) {
            fp8_half_store<0, FP8_TWO_STAGES>(st_a, kbuf(tt + 1), warp, lane);
            if constexpr (!FP8_TWO_STAGES) {  // the RoPE channels of tile tt + 1, waited for at the end of tile tt
              fp8_rope_copy(kbuf(tt + 1), kc8, tok, h_kv, g, warp, lane);
              cp_async_commit();
            }
            if constexpr (FP8_TWO_STAGES) {
              if (tt + 2 < n_tiles) fp8_half_load<0, FP8_TWO_STAGES>(st_a, kc8, tok, h_kv, g, lane);
            } else {
              fp8_half_load<1, FP8_TWO_STAGES>(st_a, kc8, tok, h_kv, g, lane);
              if (tt + 2 < n_tiles) tok = fetch_tok(tt + 2);
            }
          }
        }
        wg_wait<0>();
        wg_fence_operands(s);
#pragma unroll
        for (int k = 0; k < SREG; ++k) sX[(wg * SREG + k) * 128 + t] = s[k];
        __syncthreads();
        if constexpr (FP8_BULK) {  // everyone has converted half a of tile tt + 1: refill it with tile tt + 2's
          if (warp == 0 && tt + 2 < n_tiles) {
            fence_proxy_async();
            fp8_bulk_fill(sRows, bar_a, kc8, tok_a, h_kv, g, 0, lane);
            if (tt + 3 < n_tiles) tok_a = fetch_stage_tok(tt + 3, 0);
          }
        }
#pragma unroll
        for (int k = 0; k < SREG; ++k) s[k] += sX[((1 - wg) * SREG + k) * 128 + t];  // a + b == b + a: same bits in both

        // ---- scale to base 2, mask, column max over the tile's 64 keys
        const int pos0 = start + tt * BLOCK_N + key0;
        float mx[NCOL];
        int lim[NCOL];  // last key each of this thread's columns sees
#pragma unroll
        for (int j = 0; j < NCOL; ++j) mx[j] = MLA_NEG_INF, lim[j] = sLim[colof(c2, j)];
#pragma unroll
        for (int k = 0; k < SREG; ++k) {
          const int j = jof(k);
          const float v = pos0 + 8 * ((k >> 1) & 1) <= lim[j] ? s[k] * scale_log2 : MLA_NEG_INF;
          s[k] = v;
          mx[j] = fmaxf(mx[j], v);
        }
#pragma unroll
        for (int j = 0; j < NCOL; ++j) {  // the 8 lanes with the same lane % 4 hold the same columns
          mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 4));
          mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 8));
          mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 16));
        }
        if (lane < 4) {
#pragma unroll
          for (int j = 0; j < NCOL; ++j) sRed[(wg * 4 + wq) * NQ + colof(c2, j)] = mx[j];
        }
        wg_bar(wg);
        float mu[NCOL], alpha[NCOL];
#pragma unroll
        for (int j = 0; j < NCOL; ++j) {
          const int col = colof(c2, j);
          float tmax = sRed[(wg * 4) * NQ + col];
#pragma unroll
          for (int w = 1; w < 4; ++w) tmax = fmaxf(tmax, sRed[(wg * 4 + w) * NQ + col]);
          const float mn = fmaxf(m_run[j], tmax);
          mu[j] = mn == MLA_NEG_INF ? 0.f : mn;  // a column with no key yet: 2^(-inf - 0) = 0
          alpha[j] = fast_exp2(m_run[j] - mu[j]);
          m_run[j] = mn;
          l_part[j] *= alpha[j];
        }
        // ---- P = 2^(s - m), this thread's part of l, O *= alpha
#pragma unroll
        for (int k = 0; k < SREG; ++k) {
          s[k] = fast_exp2(s[k] - mu[jof(k)]);
          l_part[jof(k)] += s[k];
        }
#pragma unroll
        for (int mb = 0; mb < MBLOCKS_WG; ++mb)
#pragma unroll
          for (int k = 0; k < OREG; ++k) o[mb][k] *= alpha[jof(k)];
        // ---- P^T -> this warpgroup's P^T buffer: columns c2, c2 + 1 are adjacent, one 32-bit store
#pragma unroll
        for (int k = 0; k < SREG; k += 2) {
          const int key = key0 + 8 * ((k >> 1) & 1), col = c2 + 8 * (k >> 2);
          const u32 hi = pack2(s[k], s[k + 1]);
          *reinterpret_cast<u32*>(myP + p_offset(col, key)) = hi;
          if constexpr (P_SPLIT)
            *reinterpret_cast<u32*>(myP + p_offset(col + NQ, key)) = pack2(s[k] - lo_f(hi), s[k + 1] - hi_f(hi));
        }
        fence_proxy_async();
        wg_bar(wg);  // P^T complete (and everyone has read the column maxima)

        // ---- O^T += V^T P^T, this warpgroup's channels
        ot_issue(o, kt, myP_addr, wg);
        if constexpr (FP8_BULK) {  // while it runs: half b of tile tt + 1, stage -> the other buffer
          if (tt + 1 < n_tiles) {
            mbar_wait(bar_b, bulk_parity);
            fp8_bulk_convert(kbuf(tt + 1), sRows, 1, tid);
            bulk_parity ^= 1;
          }
        } else if constexpr (FP8_STAGE) {  // while it runs: half b of tile tt + 1, stage -> the other buffer; refill it
          if (tt + 1 < n_tiles) {
            cp_async_wait<2>();  // this thread's half b of tile tt + 1 (newer: the RoPE of tt + 1, half a of tt + 2)
            fp8_stage_convert(kbuf(tt + 1), sStage, sStageScales, 1, tid);
            if (tt + 2 < n_tiles) fp8_stage_copy(sStage, sStageScales, kc8, tok_b, h_kv, g, 1, tid);
          }
          cp_async_commit();
          if (tt + 3 < n_tiles) tok_b = fetch_stage_tok(tt + 3, 1);
        } else if constexpr (FP8) {  // while it runs: half b of tile tt + 1 -> the other buffer, then half b (two
          // stages) or half a (one) of tile tt + 2 into the registers
          if (tt + 1 < n_tiles) {
            fp8_half_store<1, FP8_TWO_STAGES>(FP8_TWO_STAGES ? st_b : st_a, kbuf(tt + 1), warp, lane);
            if (tt + 2 < n_tiles) {
              if constexpr (FP8_TWO_STAGES) fp8_half_load<1, FP8_TWO_STAGES>(st_b, kc8, tok, h_kv, g, lane);
              else fp8_half_load<0, FP8_TWO_STAGES>(st_a, kc8, tok, h_kv, g, lane);
            }
          }
          if (FP8_TWO_STAGES && tt + 3 < n_tiles) tok = fetch_tok(tt + 3);
        }
        wg_wait<0>();
#pragma unroll
        for (int mb = 0; mb < MBLOCKS_WG; ++mb) wg_fence_operands(o[mb]);
        if constexpr (FP8_BULK) {
          fence_proxy_async();  // this thread's part of tile tt + 1 -> visible to the tensor cores
        } else if constexpr (FP8_STAGE) {
          cp_async_wait<2>();   // the RoPE copies of tile tt + 1 (newer: halves a, b of tile tt + 2)
          fence_proxy_async();  // this thread's part of tile tt + 1 -> visible to the tensor cores
        } else if constexpr (FP8) {
          if constexpr (!FP8_TWO_STAGES) cp_async_wait<0>();  // the RoPE copies of tile tt + 1
          fence_proxy_async();  // this thread's part of tile tt + 1 -> visible to the tensor cores
        }
        __syncthreads();  // both warpgroups are done with this K buffer, the S^T swap area and P^T (FP8: and
                          // tile tt + 1 is complete)
      }
    }

    // ---- finish the piece: l = the sum over this warpgroup's threads (the same in both warpgroups),
    // out = O / l (this warpgroup's channels), lse = (m + log2 l) ln 2
#pragma unroll
    for (int j = 0; j < NCOL; ++j) {
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 4);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 8);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 16);
    }
    if (lane < 4) {
#pragma unroll
      for (int j = 0; j < NCOL; ++j) sRed[(wg * 4 + wq) * NQ + colof(c2, j)] = l_part[j];
    }
    wg_bar(wg);
    const bool direct = nsplit == 1 && !force_partials;
    const int p = lo + split;
    long long orow[NCOL];
    float inv[NCOL];
#pragma unroll
    for (int j = 0; j < NCOL; ++j) {
      const int col = colof(c2, j), m = qt * NQ + col;
      const float l = sRed[(wg * 4) * NQ + col] + sRed[(wg * 4 + 1) * NQ + col] + sRed[(wg * 4 + 2) * NQ + col] +
                      sRed[(wg * 4 + 3) * NQ + col];
      int r = 0, h = 0;
      orow[j] = m < M ? mla_row_offset(m, group, g, i, p, s_q, h_q, DV, direct, r, h) : -1;
      inv[j] = l > 0.f ? 1.f / l : 0.f;
      if (wg == 0 && wq == 0 && lane < 4 && m < M)
        mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, mla_row_lse(m_run[j], l));
    }
#pragma unroll
    for (int mb = 0; mb < MBLOCKS_WG; ++mb)
#pragma unroll
      for (int k = 0; k < SREG; ++k) {
        const int j = jof(k);
        if (orow[j] < 0) continue;
        const int ch = 256 * wg + 64 * mb + key0 + 8 * ((k >> 1) & 1);
        float v = o[mb][k];
        if constexpr (P_SPLIT) v += o[mb][k + SREG];
        v *= inv[j];
        if (direct) out[orow[j] + ch] = to_elem(v);
        else o_part[orow[j] + ch] = v;
      }
    __syncthreads();  // sRed is free for the next piece
  }
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
