// mla_decode_fp8_regs.cu -- dense MLA decode from FlashMLA's FP8 cache (656-byte tokens, kernels/mla_fp8.cuh) on
// Hopper (sm_90a), at most 16 query rows a KV head (DeepSeek's h_q = 16 decode, the memory-bound case where FP8
// can be up to 1152 / 656 = 1.76x faster than bf16). Issue #5; "auto" takes it for <= 16 rows a KV head on an H100.
//
// What it computes: what the narrow kernel's FP8 build computes (mla_decode_hopper_narrow.cu, MLA_FP8=1;
// mla/reference.py on the dequantised cache is the spec), same signature, plan, partial layout and combine, for
// d = 576, d_v = 512, bf16 q; grid (num_workers, h_kv, ceil(M / 16)), 256 threads. P is rounded to bf16 once, as
// FlashMLA does; the scales are applied in fp32 (S^T) or to P (O^T), see below.
// H100, 128,1,16,8192 (2026-11-27, tenth session): 0.263-0.266 ms = 1.58x the bf16 narrow kernel (0.419), against
// the narrow FP8 build's 0.362-0.365 (benchmarks/BENCHMARKS.md, NOTES_cupy.md for the versions v1-v5).
//
// Why a second FP8 kernel: the narrow kernel's FP8 build dequantises every tile into a bf16 shared-memory tile
// (73.7 KB written, then read twice by wgmma) and its two warpgroups work on one tile in lock-step; with the keys
// L2-resident it takes as long as from DRAM (0.37 ms): the work inside the SM is the limit. Here the codes never
// become a bf16 tile:
//   1. raw 656-byte token rows land in shared memory by 1-D bulk copies (cp.async.bulk) on mbarriers, one copy per run
//      of rows contiguous in the cache (a page's rows when h_kv = 1, else a row; any page size), 4 stages of 64 rows
//      (167936 B) -- up to 4 tiles in flight a CTA;
//   2. each thread reads the codes it needs with shared loads and turns them straight into wgmma's A fragments in
//      registers (bf16 code * 2^-120: one prmt with sign replication, a shift, a mask, 3 instructions a register),
//      so wgmma takes A from registers ("rs") and only the small B operands (Q, P^T) from shared memory. No scale is
//      multiplied into A: S^T applies each 128-channel block's scale to that block's fp32 partial, O^T takes it
//      through P^T (4 copies, one a block);
//   3. the warpgroups take alternate tiles (tile G of the CTA: stage G % 4, warpgroup G % 2), each with its own
//      online softmax (m, l, O^T over all 512 channels), merged through shared memory at the end of a piece. One
//      warpgroup's softmax runs under the other's wgmma and conversion; no CTA barrier inside the tile loop.
//
// Per tile of one warpgroup (thread t: warp wq = t / 32, lane group lg = lane / 4, lc = lane % 4, c2 = 2 lc):
//   S^T [64 keys x 16 rows] = K Q^T: 4 code blocks of 8 k-steps + 4 RoPE k-steps of m64n16k16, A = the keys'
//     channels (rows kA0 = 16 wq + lg and kA0 + 8), B = Q (K-major, shared memory). The order of the reduction (k)
//     is free as long as A and B agree, so each thread reads *contiguous* codes -- 32 bytes of a 128-channel block a
//     key, 2 loads -- and Q is stored with the matching permutation (q_logical): k-step i of block B holds, for lane
//     quad lc, the channels 128 B + 32 lc + 4 i .. + 3 (logical k 2 lc, 2 lc + 1 <- codes 0, 1; 2 lc + 8, + 9 <-
//     codes 2, 3). Block B accumulates alone (acc[B % 2]) and is folded into S^T in fp32 as partial * 2^120 *
//     scale[key][B] once its batch is done (exact scaling, one rounding, any scale). The RoPE channels (bf16 in
//     the token) take 4 k-steps the same way, no conversion. Q's row r is stored times 2^qshift[r] (largest |q| into
//     [2^14, 2^15)), so that q * code * 2^-120 stays clear of fp32's subnormal range; the softmax scale undoes it.
//   O^T [512 channels x 16 rows] += V^T P^T: 8 m-blocks (64 channels; m-block mb lies in channel block mb / 2) x
//     4 k-steps of m64n16k16, A = V^T from registers, B = P^T copy mb / 2 (MN-major, shared memory). O^T's rows
//     only decide where a result is stored: thread (wq, lg) owns channels 128 B + 32 wq + 4 lg .. + 3 of each block
//     (row lg of m-block mb = channel j0 = 2 (mb % 2) of those 4, row lg + 8 = j0 + 1), and in k-step kk lane quad
//     lc the keys of its natural k, 16 kk + c2, + 1, + 8, + 9. It reads 4 bytes a key and block (16 loads a k-step,
//     conflict-free: rows are 656 = 5 x 128 + 16 bytes apart, so keys c2 + .. of the 4 quads sit 32 bytes apart),
//     and one prmt builds a register from two keys' words. P^T copy B = bf16(P * scale[key][B] * 2^112), so O^T
//     accumulates O * 2^-8 (undone at the end); a tile with a scale outside [2^-100, 2^15) (0 allowed) takes the
//     exact slow path instead: A = codes * scale * 2^-8 (fp32 products, rounded once), P^T = bf16(P) -- chosen for
//     the whole warpgroup by the OR of a named barrier (barrier.red.or).
//   The A registers of a batch (8 wgmma) are written, fenced (wgmma.fence) and issued; the next batch is converted
//   while it runs (wgmma.wait_group 1 before a register set is rewritten); codes are loaded a block / k-step ahead.
//   Softmax as the narrow kernel (a query row is a column of S^T): masked column max over the 64 keys (shuffles,
//   then the 4 warps through shared memory, the named barrier), P = 2^(s - m), P^T copies to shared memory (named
//   barrier), O^T *= alpha (skipped by a warp whose maxima did not move).
//   Stage release: each thread arrives on the stage's "empty" mbarrier once it has converted its last codes of the
//   tile; under the warpgroup's next tile's first S^T batch, warp 0 waits for it and issues the bulk copies of tile
//   G + 4 into the stage (their block-table entries were read at the top of tile G). The "full" mbarrier of a stage
//   counts the copies' bytes.
// Invalid keys (past the piece in its last tile) are never copied: stale codes decode to finite values (the bit
// trick has no NaN), S^T masks them (-inf), their P^T entries are 0 and their stale scales are never multiplied in.
//
// Shared memory (dynamic, mirrored in mla/backends/cupy_hopper.py FP8_REGS_SMEM_BYTES): 4 stages 167936 B (the
//   piece-end merge hands O over in each warpgroup's first stage) + Q 18432 B + 2 x 4 P^T copies 16384 B +
//   reductions 512 B + m and Q's row factors 256 B + last keys 64 B + 10 mbarriers 80 B = 203664 B.
//   Q       offset(row, logical ch) = (ch / 8) * 128 + (row / 8) * 64 + (row % 8) * 8 + ch % 8   (elements)
//   P^T     offset(col, key) = ((key / 8) * 2 + col / 8) * 64 + (key % 8) * 8 + col % 8
//   Descriptors: S^T B = Q K-major (LBO 256 B = next 8 channels, SBO 128 B = next 8 rows); O^T B = P^T MN-major
//   (LBO 256 B = next 8 keys, SBO 128 B = next 8 columns), copy B 2048 B further.
// Versions (H100, 128,1,16,8192, benchmarks/NOTES_cupy.md): v1 one bulk copy a row, 0.416 ms (warp 0's 64 serialised
// copies held its warpgroup at the first wgmma); v2 one copy a run, 0.311; v3 unscaled V^T codes + P^T copies, Q by
// cp.async, 0.283; v4 refill under the next tile's first batch, codes loaded ahead, 0.285; v5 S^T scales on the
// fp32 block partials, Q rows normalised, 0.263-0.266.
//
// Compile-time parameters (-D): none of its own (bf16 q only); MLA_HAS_WGMMA as mla_wgmma.cuh. (Where warp 0 issues
// the refill -- after S^T batch 0, 1 or 2 -- measured the same, run 6: batch 0.)
#include "mla_common.cuh"
#include "mla_wgmma.cuh"

namespace f8r {
constexpr int D = 576, DV = 512, NQ = 16, BLOCK_N = 64, NTHREADS = 256, STAGES = 4;
constexpr int ROW = FP8_BYTES;              // one token: 656 bytes
constexpr int STAGE_BYTES = BLOCK_N * ROW;  // 41984
constexpr int Q_EL = NQ * D, P_EL = NQ * BLOCK_N;
constexpr int XO_FLOATS = 4 * 8 * 128;      // the merge: [m-block 4][register 8][thread], in the warpgroup's stage
constexpr int RED_FLOATS = 2 * 4 * NQ;      // [warpgroup][warp][col]
constexpr int ML_FLOATS = 2 * 2 * NQ;       // [warpgroup][col]: m; then [col]: Q's row factor (and spare)
constexpr int NPT = 4;                      // P^T copies a warpgroup: times each 128-channel block's scales
constexpr float P_BIAS = 0x1p112f, O_UNBIAS = 0x1p8f;  // V^T codes * 2^-120, P^T * scale * 2^112: O * 2^-8
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 2 * (Q_EL + 2 * NPT * P_EL) + 4 * (RED_FLOATS + ML_FLOATS + NQ) +
                           8 * (2 * STAGES + 2);
static_assert(SMEM_BYTES == 203664, "mirrored in mla/backends/cupy_hopper.py FP8_REGS_SMEM_BYTES");
static_assert((STAGES * STAGE_BYTES + 2 * (Q_EL + 2 * NPT * P_EL) + 4 * (RED_FLOATS + ML_FLOATS + NQ)) % 8 == 0,
              "mbarriers are 8-byte aligned");
static_assert(4 * XO_FLOATS <= STAGE_BYTES, "the merge's exchange fits a stage");

constexpr u32 Q_LBO = NQ * 16, Q_SBO = 128;  // Q, K-major
constexpr u32 P_LBO = NQ * 16, P_SBO = 128;  // P^T, MN-major
constexpr u64 Q_KSTEP = (2 * Q_LBO) >> 4;    // descriptor step of 16 channels in Q
constexpr u64 P_KSTEP = (2 * P_LBO) >> 4;    // ... of 16 keys in P^T

__device__ __forceinline__ int q_offset(int row, int ch) { return (ch >> 3) * (NQ * 8) + (row >> 3) * 64 + (row & 7) * 8 + (ch & 7); }
__device__ __forceinline__ int p_offset(int col, int key) { return ((key >> 3) * (NQ / 8) + (col >> 3)) * 64 + (key & 7) * 8 + (col & 7); }
// the logical k (position in Q^T's reduction order) of channel p (see the header): NoPE block B = p / 128, lane quad
// lc = p % 128 / 32, k-step i = p % 32 / 4 of the block; RoPE: quad (p - 512) / 16, k-step (p - 512) % 16 / 4
__device__ __forceinline__ int q_logical(int p) {
  int step, quad;
  if (p < 512) step = 8 * (p >> 7) + ((p >> 2) & 7), quad = (p >> 5) & 3;
  else step = 32 + (((p - 512) >> 2) & 3), quad = (p - 512) >> 4;
  const int e = p & 3;
  return 16 * step + 2 * quad + (e & 1) + 8 * (e >> 1);
}
// this thread's NCOL = 4 query columns: j -> column c2 + (j & 1) + 8 (j >> 1); S^T / O^T register i holds column jof(i)
__device__ __forceinline__ int jof(int i) { return (i & 1) | ((i >> 2) << 1); }
__device__ __forceinline__ int colof(int c2, int j) { return c2 + (j & 1) + 8 * (j >> 1); }
__device__ __forceinline__ void wg_bar(int wg) {
  if (wg) named_bar_sync(2, 128);
  else named_bar_sync(1, 128);
}
// wg_bar that also ORs pred over the warpgroup
__device__ __forceinline__ bool wg_bar_or(int wg, bool pred) { return named_bar_red_or(wg ? 2 : 1, 128, pred); }
// V^T's fast path takes scale s where P * s * 2^112 stays a finite bf16 and the products stay clear of fp32's
// subnormal range: s = 0 or 2^-100 <= |s| < 2^15
__device__ __forceinline__ bool vt_scale_ok(float s) {
  const float a = fabsf(s);
  return a == 0.f || (a >= 0x1p-100f && a < 0x1p15f);
}

// code byte j of w as fp32 = its value * 2^-120 (e4m3_times_2m120 with a run-time byte)
__device__ __forceinline__ float e4m3_byte_2m120(u32 w, int j) {
  const int x = static_cast<int>(w << (24 - 8 * j));
  return __uint_as_float(static_cast<u32>(x >> 4) & 0x87F00000u);
}
__device__ __forceinline__ u32 word(const uint4& v, int k) { return k == 0 ? v.x : k == 1 ? v.y : k == 2 ? v.z : v.w; }

// V^T A fragments of one k-step: w[r][B] = this thread's 4 codes (channels 128 B + 32 wq + 4 lg .. + 3) of key
// 16 kk + 2 lc + r % 2 + 8 (r / 2) (r = 0..3: logical k 2 lc, 2 lc + 1, 2 lc + 8, 2 lc + 9). m-block mb covers block
// B = mb / 2; its rows lg, lg + 8 are channels j0 = 2 (mb % 2) and j0 + 1 of the 4. FAST: codes * 2^-120 (no scale:
// P^T carries it); else codes * scale * 2^-8 (sv[r][B]; exact products, rounded once), the same scale of O.
template <bool FAST>
__device__ __forceinline__ void vt_frags(const u32 (&w)[4][4], const float (&sv)[4][4], u32 (&f)[8][4]) {
#pragma unroll
  for (int mb = 0; mb < 8; ++mb) {
    const int B = mb >> 1, j0 = 2 * (mb & 1);
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      const int j = j0 + (reg & 1), r0 = 2 * (reg >> 1);
      if constexpr (FAST) {
        f[mb][reg] = e4m3_pair_to_bf16x2_2m120(w[r0][B], w[r0 + 1][B], fp8_pair_sel(j));
      } else {
        const float c0 = mul_rn(e4m3_byte_2m120(w[r0][B], j), P_BIAS), c1 = mul_rn(e4m3_byte_2m120(w[r0 + 1][B], j), P_BIAS);
        f[mb][reg] = pack2(mul_rn(c0, sv[r0][B]), mul_rn(c1, sv[r0 + 1][B]));
      }
    }
  }
}
__device__ __forceinline__ uint4 lds128(const unsigned char* p) { return *reinterpret_cast<const uint4*>(p); }
}  // namespace f8r

extern "C" __global__ void __launch_bounds__(f8r::NTHREADS, 1)
mla_decode_fp8_regs(const mla_elem_t* __restrict__ q, const void* __restrict__ k_cache_v,
                    const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                    const int* __restrict__ sched, const int* __restrict__ num_splits, float* __restrict__ o_part,
                    float* __restrict__ lse_part, mla_elem_t* __restrict__ out, float* __restrict__ lse_out, int s_q,
                    int h_q, int h_kv, int page, float scale_log2, int causal, int force_partials) {
#if MLA_HAS_WGMMA
  using namespace f8r;
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* sStage = smem_raw;                                                    // [STAGES][64 rows][656 B]
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw + STAGES * STAGE_BYTES);    // [Q_EL]
  mla_elem_t* sP = sQ + Q_EL;                                                          // [2][NPT][P_EL]: warpgroup w's
  float* sRed = reinterpret_cast<float*>(sP + 2 * NPT * P_EL);                         // [2][4][NQ]
  float* sML = sRed + RED_FLOATS;                                                      // [2][NQ] (m)
  float* sQfac = sML + 2 * NQ;                                                         // [NQ]: 2^-qshift of Q's row
  int* sLim = reinterpret_cast<int*>(sML + ML_FLOATS);                                 // [NQ]: a column's last key
  // mbarriers: full[s] at bars + 8 s, empty[s] at bars + 8 (STAGES + s), done[wg] at bars + 8 (2 STAGES + wg)
  const u32 bars = smem_u32(sLim + NQ);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // warpgroup (from lane 0: ptxas then sees a warp-uniform value and keeps the wgmma unserialised), warp in it
  const int wg = __shfl_sync(0xffffffff, tid >> 7, 0), t = tid & 127, wq = warp & 3;
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int lg = lane >> 2, lc = lane & 3, c2 = 2 * lc;
  const int kA0 = 16 * wq + lg;                         // S^T rows (keys) kA0, kA0 + 8
  const int vch = 32 * wq + 4 * lg;                     // V^T: channels 128 B + vch .. + 3 of each block B
  const unsigned char* kc8 = static_cast<const unsigned char*>(k_cache_v);
  const u32 stage_addr = smem_u32(sStage), sQ_addr = smem_u32(sQ), myP_addr = smem_u32(sP) + wg * NPT * P_EL * 2;
  mla_elem_t* myP = sP + wg * NPT * P_EL;

  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(bars + 8 * s, 1);                  // full: the issuing lane's arrive.expect_tx + the bytes
      mbar_init(bars + 8 * (STAGES + s), 128);     // empty: every thread of the owning warpgroup
    }
    mbar_init(bars + 8 * (2 * STAGES), 128);  // done[wg]: the warpgroup's threads at the end of a piece
    mbar_init(bars + 8 * (2 * STAGES + 1), 128);
    fence_mbar_init();
  }
  __syncthreads();

  const MlaWork work = mla_work(sched, blockIdx.x);
  int npiece = 0;  // pieces of this CTA before this one (the phase of the merge's mbarriers)
  int base = 0;  // tiles of this CTA before the piece: tile tt of the piece is the CTA's tile G = base + tt
  for (int i = work.begin_b; i <= work.end_b; ++i) {
    const int L = seqlens[i];
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    int stop_eff;  // causal: no column of this CTA sees keys past L - s_q + r_max
    const int n_tiles = mla_piece_tiles<BLOCK_N>(start, stop, L, s_q, causal, qt * NQ + NQ - 1, group, stop_eff);
    if (tid < NQ) {  // read after the barrier below; free again after the piece's last
      const int m = qt * NQ + tid;
      sLim[tid] = causal ? min(stop - 1, L - s_q + m / group) : stop - 1;
    }
    auto n_valid = [&](int tt) { return min(BLOCK_N, stop_eff - start - tt * BLOCK_N); };
    // Copies of piece tile tt: runs of rows contiguous in the cache. With h_kv = 1 a page's rows are contiguous, so
    // run r is the part of the tile in its r-th page (one run for a 64-key tile inside a page of 64 or more); with
    // h_kv > 1 run r is row r. run(): the run's first token row (tok), its first row in the tile (row) and its
    // length in rows (0: no such run). Bulk-copy operands live in uniform registers, so a warp issues its lanes'
    // copies one lane at a time (the first version copied row by row: 64 serialised copies a tile on warp 0, which
    // the other warps waited for at the tile's first wgmma -- 27% of the stall samples, H100, 2026-11-27).
    struct Run {
      int tok, row, len;
    };
    auto run = [&](int tt, int r) {
      const int p0 = start + tt * BLOCK_N, p1 = p0 + n_valid(tt);
      Run x{0, 0, 0};
      if (h_kv == 1) {
        const int pg = p0 / page + r, a = max(p0, pg * page), e = min(p1, (pg + 1) * page);
        if (a < e) x = Run{block_table[(long long)i * bt_stride + pg] * page + (a - pg * page), a - p0, e - a};
      } else if (p0 + r < p1) {
        const int a = p0 + r;
        x = Run{block_table[(long long)i * bt_stride + a / page] * page + a % page, r, 1};
      }
      return x;
    };
    // (warp 0 of a warpgroup) tile tt -> stage (base + tt) % 4; lane l issues runs l (ra) and l + 32 (rb)
    auto issue = [&](int tt, const Run& ra, const Run& rb) {
      const int s = (base + tt) & (STAGES - 1);
      const u32 full = bars + 8 * s, dst = stage_addr + s * STAGE_BYTES;
      if (lane == 0) mbar_arrive_expect_tx(full, n_valid(tt) * ROW);
      __syncwarp();
      if (ra.len > 0) bulk_load(dst + ra.row * ROW, kc8 + ((long long)ra.tok * h_kv + g) * ROW, ra.len * ROW, full);
      if (rb.len > 0) bulk_load(dst + rb.row * ROW, kc8 + ((long long)rb.tok * h_kv + g) * ROW, rb.len * ROW, full);
    };

    float o[8][8];
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)
#pragma unroll
      for (int k = 0; k < 8; ++k) o[mb][k] = 0.f;
    float m_run[4], l_part[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) m_run[j] = MLA_NEG_INF, l_part[j] = 0.f;

    if (n_tiles > 0) {
      // the piece's first tiles (their stages' last use ended before the previous piece's last barrier)
      if (wq == 0) {
        for (int tt = 0; tt < min(STAGES, n_tiles); ++tt)
          if (((base + tt) & 1) == wg) issue(tt, run(tt, lane), run(tt, lane + 32));
      }
      // Q rows m -> (r, h) = (m / group, g group + m % group), rows >= M zero; channels in q_logical order. Row r
      // is stored times 2^qshift (a power of two bringing its largest |q| into [2^14, 2^15), clamped to 2^+-100;
      // exact): S^T's codes are code * 2^-120, and the products must stay clear of fp32's subnormal range in the
      // tensor cores' sums. sQfac[r] = 2^-qshift undoes it. Thread tid loads row tid / 16, pairs tid % 16 + 16 j.
      {
        const int r = tid >> 4, l16 = tid & 15, m = qt * NQ + r;
        const mla_elem_t* qrow = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D;
        u32 qv[D / 32];
        u32 mag = 0;  // the largest |q| of the row as bf16 magnitude bits (monotone; NaN above Inf)
#pragma unroll
        for (int k = 0; k < D / 32; ++k)
          qv[k] = m < M ? *reinterpret_cast<const u32*>(qrow + 2 * (l16 + 16 * k)) : 0u;
#pragma unroll
        for (int k = 0; k < D / 32; ++k) mag = max(mag, max(qv[k] & 0x7FFFu, (qv[k] >> 16) & 0x7FFFu));
#pragma unroll
        for (int d = 1; d < 16; d <<= 1) mag = max(mag, __float_as_uint(__shfl_xor_sync(0xffffffff, __uint_as_float(mag), d)));
        const int qshift = min(100, max(-100, 141 - (int)(mag >> 7)));  // 14 - (E - 127)
        const float up = __uint_as_float((u32)(127 + qshift) << 23);
#pragma unroll
        for (int k = 0; k < D / 32; ++k) {
          const int p = 2 * (l16 + 16 * k);
          *reinterpret_cast<u32*>(sQ + q_offset(r, q_logical(p))) = pack2(lo_f(qv[k]) * up, hi_f(qv[k]) * up);
        }
        if (l16 == 0) sQfac[r] = __uint_as_float((u32)(127 - qshift) << 23);
      }
      fence_proxy_async();  // Q -> the tensor cores' (async proxy) reads
    }
    __syncthreads();  // Q and sLim in place

    const u64 dq = wg_desc(sQ_addr, Q_LBO, Q_SBO), dp = wg_desc(myP_addr, P_LBO, P_SBO);
    int pend_tt = -1;  // a refill (of piece tile pend_tt, runs pend_a / pend_b) left for this warpgroup's next tile
    Run pend_a{0, 0, 0}, pend_b{0, 0, 0};
    for (int tt = (wg ^ base) & 1; tt < n_tiles; tt += 2) {
      const int G = base + tt, s = G & (STAGES - 1);
      const u32 par = (G >> 2) & 1, full = bars + 8 * s, empty = bars + 8 * (STAGES + s);
      const bool refill = tt + STAGES < n_tiles;
      Run ra{0, 0, 0}, rb{0, 0, 0};  // the runs of tile tt + 4 (warp 0)
      if (wq == 0 && refill) ra = run(tt + STAGES, lane), rb = run(tt + STAGES, lane + 32);
      const int nv = n_valid(tt);
      const unsigned char* st = sStage + s * STAGE_BYTES;
      mbar_wait(full, par);

      // ---- S^T = K Q^T: 4 code blocks of 8 k-steps, then the RoPE channels' 4. The codes go to the A registers as
      // code * 2^-120 (no scale); block B's partial (its own accumulator, acc[B % 2]) is folded into sacc in fp32 as
      // partial * (2^120 * scale[key][B]) once its batch is done -- exact scaling, one rounding, any scale.
      float sacc[8];
      // the 4 scales of this thread's S^T keys kA0 (sca) and kA0 + 8 (scb): S^T's blocks, P^T's copies
      const float4 sca = *reinterpret_cast<const float4*>(st + kA0 * ROW + FP8_SCALES_AT);
      const float4 scb = *reinterpret_cast<const float4*>(st + (kA0 + 8) * ROW + FP8_SCALES_AT);
      {
        const unsigned char* ra = st + kA0 * ROW + 32 * lc;
        const unsigned char* rb = ra + 8 * ROW;
        // 2^120 * scale as one factor where that is finite (scale < 2^8; else two exact steps), warp-uniform
        const bool one_step = __all_sync(0xffffffff, fmaxf(fmaxf(fmaxf(fabsf(sca.x), fabsf(sca.y)), fmaxf(fabsf(sca.z),
                                                           fabsf(sca.w))), fmaxf(fmaxf(fabsf(scb.x), fabsf(scb.y)),
                                                           fmaxf(fabsf(scb.z), fabsf(scb.w)))) < 256.f);
        u32 f[2][8][4];
        float acc[2][8];
        uint4 ka[2], kb[2];
        auto fold = [&](int B) {  // sacc (+)= block B's partial times 2^120 scale (B = 4: the RoPE channels, as is)
          wg_fence_operands(acc[B & 1]);
#pragma unroll
          for (int k = 0; k < 8; ++k) {
            const float4 sc = (k >> 1) & 1 ? scb : sca;
            const float sk = B == 0 ? sc.x : B == 1 ? sc.y : B == 2 ? sc.z : sc.w;
            float v = acc[B & 1][k];
            if (B < 4) v = one_step ? v * (sk * 0x1p120f) : (v * 0x1p120f) * sk;
            sacc[k] = B == 0 ? v : sacc[k] + v;
          }
        };
#pragma unroll
        for (int B = 0; B < 5; ++B) {
          const int at = B < 4 ? 128 * B : FP8_ROPE_AT;  // this quad's 32 bytes of block B / of the RoPE channels
          ka[0] = lds128(ra + at), ka[1] = lds128(ra + at + 16), kb[0] = lds128(rb + at), kb[1] = lds128(rb + at + 16);
          if (B >= 2) {  // batch B - 2 done: its partial folded, f[B % 2] and acc[B % 2] free
            wg_wait<1>();
            fold(B - 2);
          }
          u32 (&fb)[8][4] = f[B & 1];
          if (B < 4) {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
              e4m3x4_to_bf16x4_2m120(word(ka[k >> 2], k & 3), fb[k][0], fb[k][2]);
              e4m3x4_to_bf16x4_2m120(word(kb[k >> 2], k & 3), fb[k][1], fb[k][3]);
            }
          } else {  // RoPE (bf16): k-step i' takes words 2 i' (k 2 lc, + 1) and 2 i' + 1 (k 2 lc + 8, + 9)
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              fb[k][0] = word(ka[k >> 1], 2 * (k & 1));
              fb[k][2] = word(ka[k >> 1], 2 * (k & 1) + 1);
              fb[k][1] = word(kb[k >> 1], 2 * (k & 1));
              fb[k][3] = word(kb[k >> 1], 2 * (k & 1) + 1);
            }
          }
          wg_fence();
#pragma unroll
          for (int k = 0; k < (B < 4 ? 8 : 4); ++k)
            wg_mma_m64n16k16_rs(acc[B & 1], fb[k][0], fb[k][1], fb[k][2], fb[k][3], dq + (8 * B + k) * Q_KSTEP, k > 0);
          wg_commit();
          if (B == 0 && wq == 0 && pend_tt >= 0) {  // warp 0: the refill left by the previous tile,
            // under the first batch (at the end of that tile warp 0 waited for the others; here they wait for it)
            const int Gp = base + pend_tt - STAGES;  // the released use of the stage
            mbar_wait(bars + 8 * (STAGES + (Gp & (STAGES - 1))), (Gp >> 2) & 1);
            issue(pend_tt, pend_a, pend_b);
          }
        }
        pend_tt = -1;
        wg_wait<1>();
        fold(3);
        wg_wait<0>();
        fold(4);
      }
      // this thread's V^T codes of k-step 0 (w[0]; the loop below loads k-step kk + 1 while converting kk)
      const unsigned char* vb = st + vch;
      u32 w[2][4][4];
      auto ld_vt = [&](int kk, u32 (&x)[4][4]) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
          const int key = 16 * kk + c2 + (r & 1) + 8 * (r >> 1);
#pragma unroll
          for (int B = 0; B < 4; ++B) x[r][B] = *reinterpret_cast<const u32*>(vb + key * ROW + 128 * B);
        }
      };
      ld_vt(0, w[0]);

      // ---- scale to base 2, mask, column max over the tile's 64 keys (a query row is a column of S^T)
      const int pos0 = start + tt * BLOCK_N + kA0;
      float mx[4];
      int lim[4];
      float cfac[4];  // the softmax scale (base 2) times 2^-qshift of the column's Q row
#pragma unroll
      for (int j = 0; j < 4; ++j)
        mx[j] = MLA_NEG_INF, lim[j] = sLim[colof(c2, j)], cfac[j] = scale_log2 * sQfac[colof(c2, j)];
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        const int j = jof(k);
        const float v = pos0 + 8 * ((k >> 1) & 1) <= lim[j] ? sacc[k] * cfac[j] : MLA_NEG_INF;
        sacc[k] = v;
        mx[j] = fmaxf(mx[j], v);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // the 8 lanes with the same lane % 4 hold the same columns
        mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 4));
        mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 8));
        mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffff, mx[j], 16));
      }
      if (lane < 4) {
#pragma unroll
        for (int j = 0; j < 4; ++j) sRed[(wg * 4 + wq) * NQ + colof(c2, j)] = mx[j];
      }
      // V^T's path for this tile, the same in the whole warpgroup (the barrier ORs it): the fast one unless a valid
      // key has a scale outside vt_scale_ok (each thread checks its two S^T keys: all 64 keys between them)
      const bool ok_a = kA0 >= nv || (vt_scale_ok(sca.x) && vt_scale_ok(sca.y) && vt_scale_ok(sca.z) && vt_scale_ok(sca.w));
      const bool ok_b = kA0 + 8 >= nv ||
                        (vt_scale_ok(scb.x) && vt_scale_ok(scb.y) && vt_scale_ok(scb.z) && vt_scale_ok(scb.w));
      const bool vt_slow = wg_bar_or(wg, !(ok_a && ok_b));
      float mu[4], alpha[4];
      cols_online_max<4, NQ>(sRed, wg, c2, m_run, l_part, mu, alpha);
#pragma unroll
      for (int k = 0; k < 8; ++k) {
        sacc[k] = fast_exp2(sacc[k] - mu[jof(k)]);
        l_part[jof(k)] += sacc[k];
      }
      // O^T *= alpha, skipped by a warp whose alphas are all 1 (the running maxima rarely move after the first tiles)
      if (__any_sync(0xffffffff, alpha[0] != 1.f || alpha[1] != 1.f || alpha[2] != 1.f || alpha[3] != 1.f)) {
#pragma unroll
        for (int mb = 0; mb < 8; ++mb)
#pragma unroll
          for (int k = 0; k < 8; ++k) o[mb][k] *= alpha[jof(k)];
      }
      // P^T copy B = bf16(P * scale[key][B] * 2^112) (rounded once; exact scaling for power-of-two scales) for the
      // m-blocks of channel block B, or bf16(P) on V^T's slow path; 0 for keys never copied (their scales are stale)
      float pm[2][4];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const float4 sc = half ? scb : sca;
        const bool valid = kA0 + 8 * half < nv;
        pm[half][0] = !valid ? 0.f : vt_slow ? 1.f : sc.x * P_BIAS;
        pm[half][1] = !valid ? 0.f : vt_slow ? 1.f : sc.y * P_BIAS;
        pm[half][2] = !valid ? 0.f : vt_slow ? 1.f : sc.z * P_BIAS;
        pm[half][3] = !valid ? 0.f : vt_slow ? 1.f : sc.w * P_BIAS;
      }
#pragma unroll
      for (int k = 0; k < 8; k += 2) {  // columns c2, c2 + 1 adjacent: one 32-bit store a copy
        const int half = (k >> 1) & 1, key = kA0 + 8 * half, col = c2 + 8 * (k >> 2);
#pragma unroll
        for (int B = 0; B < NPT; ++B)
          *reinterpret_cast<u32*>(myP + B * P_EL + p_offset(col, key)) = pack2(sacc[k] * pm[half][B], sacc[k + 1] * pm[half][B]);
      }
      fence_proxy_async();
      wg_bar(wg);  // P^T complete (and everyone has read the column maxima)

      // ---- O^T += V^T P^T: 4 k-steps of 8 m-blocks (m-block mb reads P^T copy mb / 2)
      {
        u32 f[2][8][4];
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (kk < 3) ld_vt(kk + 1, w[(kk + 1) & 1]);
          const u32 (&wk)[4][4] = w[kk & 1];
          float sv[4][4];
          if (kk >= 2) wg_wait<1>();  // the batch that read f[kk % 2] is done
          u32 (&fb)[8][4] = f[kk & 1];
          if (!vt_slow) {
            vt_frags<true>(wk, sv, fb);
          } else {  // codes * scale * 2^-8; keys never copied: scale 0 (their codes decode to finite values)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
              const int key = 16 * kk + c2 + (r & 1) + 8 * (r >> 1);
#pragma unroll
              for (int B = 0; B < 4; ++B)
                sv[r][B] = key < nv ? *reinterpret_cast<const float*>(st + key * ROW + FP8_SCALES_AT + 4 * B) : 0.f;
            }
            vt_frags<false>(wk, sv, fb);
          }
          if (kk == 3) mbar_arrive(empty);  // this thread's last read of the stage
          if (kk == 0) {
#pragma unroll
            for (int mb = 0; mb < 8; ++mb) wg_fence_operands(o[mb]);
          }
          wg_fence();
#pragma unroll
          for (int mb = 0; mb < 8; ++mb)
            wg_mma_m64n16k16_rs_t(o[mb], fb[mb][0], fb[mb][1], fb[mb][2], fb[mb][3],
                                  dp + (((mb >> 1) * P_EL * 2) >> 4) + kk * P_KSTEP);
          wg_commit();
        }
      }
      if (refill) pend_tt = tt + STAGES, pend_a = ra, pend_b = rb;  // (warp 0 issues it under the next tile's S^T)
      wg_wait<0>();
#pragma unroll
      for (int mb = 0; mb < 8; ++mb) wg_fence_operands(o[mb]);
    }

    // ---- finish the piece: the two warpgroups' (m, l, O) merged through shared memory. Each writes its per-warp l
    // sums, its m and the other warpgroup's m-blocks of its O^T, then its named barrier, then the CTA's: every write
    // precedes a named barrier, so racecheck sees the CTA barrier order them (a write right after a one-warpgroup
    // named barrier and read after a CTA barrier is reported as a race: benchmarks/racecheck_mbarrier_probe.py).
    // Warpgroup w finishes m-blocks 4 w .. 4 w + 3 (channel blocks 2 w, 2 w + 1) and hands the others over in its own
    // stage (stage w: its last tile there is done; the next piece's copies come after the CTA barrier below, and
    // fence.proxy.async orders these generic writes before them).
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 4);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 8);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 16);
    }
    if (lane < 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sRed[(wg * 4 + wq) * NQ + colof(c2, j)] = l_part[j];
        if (wq == 0) sML[wg * NQ + colof(c2, j)] = m_run[j];
      }
    }
    // the warpgroup meets on its mbarrier first: its warps' last reads of the stage are done (racecheck reads an
    // mbarrier's order; the wgmma that all 4 warps issued after their reads orders them too, but implicitly)
    mbar_arrive(bars + 8 * (2 * STAGES + wg));
    mbar_wait(bars + 8 * (2 * STAGES + wg), npiece & 1);
    float* myXO = reinterpret_cast<float*>(sStage + wg * STAGE_BYTES);  // [m-block 4][register 8][thread]
    const float* otherXO = reinterpret_cast<const float*>(sStage + (1 - wg) * STAGE_BYTES);
#pragma unroll
    for (int mb = 0; mb < 8; ++mb)  // the other warpgroup's m-blocks of this thread's O^T
      if ((mb >> 2) != wg) {
#pragma unroll
        for (int k = 0; k < 8; ++k) myXO[((mb & 3) * 8 + k) * 128 + t] = o[mb][k];
      }
    fence_proxy_async();
    wg_bar(wg);
    __syncthreads();
    const bool direct = nsplit == 1 && !force_partials;
    const int p = lo + split;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = colof(c2, j), m = qt * NQ + col;
      const float m0 = sML[col], m1 = sML[NQ + col];
      const float l0 = sRed[col] + sRed[NQ + col] + sRed[2 * NQ + col] + sRed[3 * NQ + col];
      const float l1 = sRed[4 * NQ + col] + sRed[5 * NQ + col] + sRed[6 * NQ + col] + sRed[7 * NQ + col];
      const float mxx = fmaxf(m0, m1), mu = mxx == MLA_NEG_INF ? 0.f : mxx;
      const float e0 = fast_exp2(m0 - mu), e1 = fast_exp2(m1 - mu);
      const float l = l0 * e0 + l1 * e1;
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const float e_self = (wg ? e1 : e0) * inv * O_UNBIAS, e_other = (wg ? e0 : e1) * inv * O_UNBIAS;
      if (m >= M) continue;
      int r = 0, h = 0;
      const long long orow = mla_row_offset(m, group, g, i, p, s_q, h_q, DV, direct, r, h);
      if (wg == 0 && wq == 0 && lane < 4)
        mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, mla_row_lse(mxx, l));
      float v[8];  // [block 2 wg + (mb % 4) / 2][channel vch + 2 (mb % 2) + half]
      const int k0 = (j & 1) + 4 * (j >> 1);  // the register of column j, row lg (k0 + 2: row lg + 8)
#pragma unroll
      for (int mb = 0; mb < 8; ++mb)
        if ((mb >> 2) == wg) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int k = k0 + 2 * half;
            v[2 * (mb & 3) + half] = o[mb][k] * e_self + otherXO[((mb & 3) * 8 + k) * 128 + t] * e_other;
          }
        }
#pragma unroll
      for (int bb = 0; bb < 2; ++bb) {
        const long long at = orow + 128 * (2 * wg + bb) + vch;
        if (direct) *reinterpret_cast<uint2*>(out + at) = make_uint2(pack2(v[4 * bb], v[4 * bb + 1]),
                                                                      pack2(v[4 * bb + 2], v[4 * bb + 3]));
        else *reinterpret_cast<float4*>(o_part + at) = make_float4(v[4 * bb], v[4 * bb + 1], v[4 * bb + 2], v[4 * bb + 3]);
      }
    }
    __syncthreads();  // the exchange, sML, sRed, sQ and the stages are free for the next piece
    base += n_tiles;
    ++npiece;
  }
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
