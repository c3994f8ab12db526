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
// Compile-time parameters (-D): MLA_FP16 (0 = bf16), MLA_P_SPLIT (default 0: bf16 P rounded once, as FlashMLA;
//   1: P_hi + P_lo), MLA_FP8 (0).
#include "mla_common.cuh"
#include "mla_fused_combine.cuh"
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
#if MLA_FP8 && MLA_FUSED
#error "FP8 caches keep the combine kernel (cupy_hopper.fused_reason)"
#endif

// diagnostics (A/B timing only, wrong results): the bf16 build loads no key tile after the first, which times its
// chain without memory (H100, 128,1,16,8192: 0.204 ms against 0.420 with the loads; benchmarks/NOTES_cupy.md)
#ifndef MLA_DIAG_NO_KLOAD
#define MLA_DIAG_NO_KLOAD 0
#endif

#ifndef MLA_P_SPLIT  // bf16 P rounded once, FlashMLA's numerics (2026-11-26, ninth session: docs/decisions.md)
#define MLA_P_SPLIT 0
#endif

// Diagnostics only (benchmarks/narrow_trace.py): thread 0 of CTAs (x, 0, 0), x < 4, stores clock64() at 7 points of
// each of its first 128 tiles (of its first piece), and every CTA (x, 0, 0) its globaltimer at entry, exit and after its
// last piece
#ifndef MLA_NARROW_TRACE
#define MLA_NARROW_TRACE 0
#endif
#if MLA_NARROW_TRACE
__device__ long long narrow_trace[4][128][8];
__device__ unsigned long long narrow_span[1024][3];  // entry, exit, last piece done (before the merge)
__device__ __forceinline__ unsigned long long narrow_globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %globaltimer;" : "=l"(t));
  return t;
}
#define NARROW_MARK(e) \
  if (trace_on && tt < 128) narrow_trace[blockIdx.x][tt][e] = clock64()
#else
#define NARROW_MARK(e)
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
constexpr int SMEM_BYTES = 2 * (Q_EL + 2 * TILE_EL + 2 * P_EL) + 4 * (X_FLOATS + RED_FLOATS + NQ);
static_assert(SMEM_BYTES == (NQ == 16 ? (P_SPLIT ? 182848 : 178752) : (P_SPLIT ? 218240 : 210048)),
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
#if MLA_NARROW_TRACE
  if (tid == 0 && blockIdx.y + blockIdx.z == 0 && blockIdx.x < 1024) narrow_span[blockIdx.x][0] = narrow_globaltimer();
#endif
  const MlaWork work = mla_work(sched, blockIdx.x);
  const bool force = MLA_FUSED ? (force_partials & MLA_MODE_PARTIALS) != 0 : force_partials != 0;
  const bool fused = MLA_FUSED && (force_partials & MLA_MODE_FUSED);

  for (int i = work.begin_b; i <= work.end_b; ++i) {
    const bool trace_on =
        MLA_NARROW_TRACE && tid == 0 && i == work.begin_b && blockIdx.x < 4 && blockIdx.y + blockIdx.z == 0;
    (void)trace_on;
    const int L = seqlens[i];
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    int stop_eff;  // causal: no column of this CTA sees keys past L - s_q + r_max
    const int n_tiles = mla_piece_tiles<BLOCK_N>(start, stop, L, s_q, causal, qt * NQ + NQ - 1, group, stop_eff);
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
      if constexpr (FP8) {
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
        NARROW_MARK(0);
        if constexpr (FP8) {
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
        NARROW_MARK(1);
        const u32 kt = sK_addr + (tt & 1) * TILE_EL * 2;

        // ---- S^T = K Q^T: this warpgroup's half of the channels, then the halves swap through smem
        float s[SREG];
        st_issue(s, kt, sQ_addr, wg);
        if constexpr (FP8) {
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
        NARROW_MARK(2);
        wg_fence_operands(s);
#pragma unroll
        for (int k = 0; k < SREG; ++k) sX[(wg * SREG + k) * 128 + t] = s[k];
        __syncthreads();
        NARROW_MARK(3);
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
        cols_online_max<NCOL, NQ>(sRed, wg, c2, m_run, l_part, mu, alpha);
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
        NARROW_MARK(4);

        // ---- O^T += V^T P^T, this warpgroup's channels
        ot_issue(o, kt, myP_addr, wg);
        if constexpr (FP8) {  // while it runs: half b of tile tt + 1 -> the other buffer, then half b (two
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
        NARROW_MARK(5);
#pragma unroll
        for (int mb = 0; mb < MBLOCKS_WG; ++mb) wg_fence_operands(o[mb]);
        if constexpr (FP8) {
          if constexpr (!FP8_TWO_STAGES) cp_async_wait<0>();  // the RoPE copies of tile tt + 1
          fence_proxy_async();  // this thread's part of tile tt + 1 -> visible to the tensor cores
        }
        __syncthreads();  // both warpgroups are done with this K buffer, the S^T swap area and P^T (FP8: and
                          // tile tt + 1 is complete)
        NARROW_MARK(6);
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
    const bool direct = nsplit == 1 && !force;
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
    __syncthreads();  // sRed is free for the next piece (and this piece's partial rows are all written)
    if (fused && !direct) {  // (fused launches never force partials: not direct means split)
      if (tid == 0) mla_fused_arrive(mla_fused_counters(sched, gridDim.x, blockIdx.x, split, i));
    }
  }
#if MLA_NARROW_TRACE
  if (tid == 0 && blockIdx.y + blockIdx.z == 0 && blockIdx.x < 1024) narrow_span[blockIdx.x][2] = narrow_globaltimer();
#endif
  if (fused)  // (after every arrival of this CTA: see mla_fused_combine.cuh)
    mla_fused_merge_all<DV, NTHREADS>(work, sched, o_part, lse_part, num_splits, out, lse_out, s_q, h_q);
#if MLA_NARROW_TRACE
  if (tid == 0 && blockIdx.y + blockIdx.z == 0 && blockIdx.x < 1024) narrow_span[blockIdx.x][1] = narrow_globaltimer();
#endif
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
