// mla_decode_hopper_narrow.cu -- MLA decode on Hopper (sm_90a) for at most 16 query rows a KV head
// (s_q * h_q / h_kv <= 16: DeepSeek's h_q = 16 decode, the memory-bound case), wgmma with the operands
// swapped so that no tensor work is padding.
//
// What it computes: exactly what kernels/mla_decode_hopper.cu and mla_decode_portable.cu compute
// (mla/reference.py is the spec), same signature, same plan / partial layout / combine, for d = 576,
// d_v = 512; grid (num_workers, h_kv, ceil(M / 16)), 256 threads.
//
// Why a second Hopper kernel: wgmma's M is 64. The 64-row kernel puts query rows on M, so 16 heads
// are padded to 64 (4x the tensor work and 4x the shared-memory reads of Q), and its two warpgroups
// share every key tile in lock step (score exchange, 3 barriers a tile). Here the keys and the value
// channels are on M and the 16 query rows on N ("swap AB"):
//   S^T [64 keys x 16 rows]  = K_tile [64 x 576] . Q^T          36 x wgmma m64n16k16 (A = K, B = Q, smem)
//   O^T [512 ch x 16 rows]  += V^T [512 x 64 keys] . P^T        8 channel blocks x 4 k-steps of
//                                                               m64n32k16 (bf16: B = [P_hi | P_lo], 32 columns)
//                                                               or m64n16k16 (fp16: B = P)
// V^T is the K tile read channel-major (imm-trans-a = 1, the same descriptor as the 64-row kernel's
// N-major V); P goes through shared memory (B must), 4 KB a tile.
//
// Schedule: the two warpgroups are independent. Warpgroup w walks key tiles w, w + 2, w + 4, ... of
// the piece in its own K buffer, with its own online softmax (running max m, sum l per query row)
// and its own 512 x 16 O^T accumulator (128 fp32 registers a thread, bf16; 64 for fp16); while one
// computes, the other's tile is in flight. Per tile, per warpgroup: wait for the tile (cp.async, then
// a 128-thread named barrier), S^T, column max (shuffles + 4 warps through smem, one barrier), P and
// P -> smem (one barrier), O^T, a barrier (the whole warpgroup is done with the buffer), then the copy
// of its next tile (block-table entries fetched at the top of the iteration, so that lookup is off the
// critical path). At the end of a piece the two warpgroups' (m, l, O) merge through shared memory
// (warpgroup 1's scaled O over its K buffer) and warpgroup 0 writes the rows.
//
// Row max across keys: a query row is a column of S^T, its 64 keys spread over the warpgroup (lane / 4
// and the warp). The running sum l needs no per-tile reduction: each thread keeps the sum of its own
// keys, rescaled by the (warpgroup-uniform) alpha, and the sums are reduced once, at the end.
//
// Shared memory (dynamic, mirrored in mla/backends/cupy_hopper.py NARROW_SMEM_BYTES): Q 18432 B
//   + 2 K tiles 147456 B + 2 P tiles 2 * NPV * 128 B + reductions 640 B (174720 B bf16). Layouts (no swizzle, 8 x 16 B
//   core matrices):
//   K tile  offset(key, ch)  = (ch / 8) * 512 + (key / 8) * 64 + (key % 8) * 8 + ch % 8    (mla_wgmma.cuh)
//   Q       offset(row, ch)  = (ch / 8) * 128 + (row / 8) * 64 + (row % 8) * 8 + ch % 8    (16 rows)
//   P^T     offset(col, key) = ((key / 8) * NPV / 8 + col / 8) * 64 + (key % 8) * 8 + col % 8
// Descriptors: S^T A = K tile K-major (LBO 1024 B = next 8 channels, SBO 128 B = next 8 keys), B = Q
// K-major (LBO 256 B, SBO 128 B); O^T A = V^T MN-major (LBO 128 B = next 8 keys, SBO 1024 B = next 8
// channels), B = P^T MN-major (LBO NPV * 16 B = next 8 keys, SBO 128 B = next 8 columns).
//
// Compile-time parameters (-D): MLA_FP16 (0 = bf16), MLA_P_SPLIT (default !MLA_FP16).
#include "mla_common.cuh"
#include "mla_wgmma.cuh"

#ifndef MLA_P_SPLIT
#define MLA_P_SPLIT (!MLA_FP16)
#endif

namespace narrow {
constexpr int D = 576, DV = 512;
constexpr int NQ = 16;                     // query rows a CTA (wgmma N of S^T)
constexpr int BLOCK_N = 64;                // keys a tile (wgmma M of S^T)
constexpr int NTHREADS = 256;
constexpr int KSTEPS = D / 16;             // k-steps of S^T
constexpr int MBLOCKS = DV / 64;           // channel blocks of O^T
constexpr bool P_SPLIT = MLA_P_SPLIT;
constexpr int NPV = P_SPLIT ? 2 * NQ : NQ;  // columns of the P^T operand: [P_hi | P_lo] or P
constexpr int OREG = NPV / 2;              // accumulator registers of one m64nNPV block
constexpr int TILE_EL = BLOCK_N * D, Q_EL = NQ * D, P_EL = NPV * BLOCK_N;
constexpr int RED_FLOATS = 2 * 4 * NQ + 2 * NQ;  // [wg][warp][col] partial max / sum + [wg][col] running max
constexpr int SMEM_BYTES = 2 * (Q_EL + 2 * TILE_EL + 2 * P_EL) + 4 * RED_FLOATS;
static_assert(SMEM_BYTES == (P_SPLIT ? 174720 : 170624), "mirrored in mla/backends/cupy_hopper.py");
static_assert(DV * NQ * 4 <= 2 * TILE_EL, "warpgroup 1's O^T fits over its K buffer");

constexpr u32 Q_LBO = NQ * 16, Q_SBO = 128;                 // Q, K-major
constexpr u32 P_LBO = NPV * 16, P_SBO = 128;                // P^T, MN-major
constexpr u64 Q_KSTEP = (2 * Q_LBO) >> 4;                   // descriptor step of 16 channels in Q
constexpr u64 P_KSTEP = (2 * P_LBO) >> 4;                   // ... of 16 keys in P^T
constexpr u64 V_MBLOCK = (8 * WG_CG_BYTES) >> 4;            // ... of 64 channels in a K tile (V^T)

__device__ __forceinline__ int q_offset(int row, int ch) { return (ch >> 3) * (NQ * 8) + (row >> 3) * 64 + (row & 7) * 8 + (ch & 7); }
__device__ __forceinline__ int p_offset(int col, int key) {
  return ((key >> 3) * (NPV / 8) + (col >> 3)) * 64 + (key & 7) * 8 + (col & 7);
}
// this thread's 4 query columns: j = 0..3 -> column c2 + (j & 1) + 8 (j >> 1); accumulator register i of
// an m64n16 (S^T) or of the P_hi half of an m64nNPV block (i < 8) holds column jcol(i)
__device__ __forceinline__ int jof(int i) { return (i & 1) | (((i >> 2) & 1) << 1); }

#if MLA_HAS_WGMMA
// s[8] = S^T of the K tile at k_tile (this thread: keys key0, key0 + 8 of its warp, its 4 columns); commits
__device__ __forceinline__ void st_issue(float (&s)[8], u32 k_tile, u32 q_tile) {
  const u64 dk = wg_desc(k_tile, WG_K_LBO, WG_K_SBO);
  const u64 dq = wg_desc(q_tile, Q_LBO, Q_SBO);
  wg_fence_operands(s);
  wg_fence();
#pragma unroll
  for (int k = 0; k < KSTEPS; ++k) wg_mma_m64n16k16_ss(s, dk + k * WG_QK_KSTEP, dq + k * Q_KSTEP, k > 0);
  wg_commit();
}

__device__ __forceinline__ void pv_mma(float (&d)[16], u64 da, u64 db) { wg_mma_m64n32k16_ss_tt(d, da, db); }
__device__ __forceinline__ void pv_mma(float (&d)[8], u64 da, u64 db) { wg_mma_m64n16k16_ss_tt(d, da, db); }

// O^T[512 x NPV] += V^T P^T (V = the K tile at v_tile, P^T at p_tile); commits
__device__ __forceinline__ void ot_issue(float (&o)[MBLOCKS][OREG], u32 v_tile, u32 p_tile) {
  const u64 dv = wg_desc(v_tile, WG_MN_LBO, WG_MN_SBO);
  const u64 dp = wg_desc(p_tile, P_LBO, P_SBO);
#pragma unroll
  for (int mb = 0; mb < MBLOCKS; ++mb) wg_fence_operands(o[mb]);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < BLOCK_N / 16; ++kk)
#pragma unroll
    for (int mb = 0; mb < MBLOCKS; ++mb) pv_mma(o[mb], dv + mb * V_MBLOCK + kk * WG_PV_KSTEP, dp + kk * P_KSTEP);
  wg_commit();
}
#endif
}  // namespace narrow

extern "C" __global__ void __launch_bounds__(narrow::NTHREADS, 1)
mla_decode_hopper_narrow(const mla_elem_t* __restrict__ q, const mla_elem_t* __restrict__ k_cache,
                         const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                         const int* __restrict__ sched, const int* __restrict__ num_splits,
                         float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                         float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2,
                         int causal, int force_partials) {
#if MLA_HAS_WGMMA
  using namespace narrow;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);  // [Q_EL]
  mla_elem_t* sK = sQ + Q_EL;                                 // [2][TILE_EL]: warpgroup w's K buffer
  mla_elem_t* sP = sK + 2 * TILE_EL;                          // [2][P_EL]: warpgroup w's P^T
  float* sRed = reinterpret_cast<float*>(sP + 2 * P_EL);      // [2][4][NQ]: per-warp column max / sum
  float* sM = sRed + 2 * 4 * NQ;                              // [2][NQ]: each warpgroup's running max
  float* sO = reinterpret_cast<float*>(sK + TILE_EL);         // [DV][NQ]: warpgroup 1's O (end of a piece)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // warpgroup (read from lane 0, so that ptxas sees a warp-uniform value: control flow that depends on it
  // is then not "divergent", which would make ptxas serialise the wgmma), warp in it
  const int wg = __shfl_sync(0xffffffff, tid >> 7, 0), wq = warp & 3;
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int c2 = 2 * (lane & 3);
  const int key0 = 16 * wq + (lane >> 2);  // accumulator rows key0, key0 + 8 (keys of S^T; channels of O^T)
  const int ld_row = 8 * wq + (lane & 7);  // this thread copies K tile rows ld_row and ld_row + 32
  const u32 sQ_addr = smem_u32(sQ);
  const u32 myK_addr = smem_u32(sK) + wg * TILE_EL * 2, myP_addr = smem_u32(sP) + wg * P_EL * 2;
  mla_elem_t* myK = sK + wg * TILE_EL;
  mla_elem_t* myP = sP + wg * P_EL;
  const int bar = 1 + wg;  // this warpgroup's named barrier (128 threads)

  const int* row = sched + blockIdx.x * 8;
  const int begin_b = row[0], begin_tok = row[1], end_b = row[2], end_tok = row[3], begin_split = row[4];

  for (int i = begin_b; i <= end_b; ++i) {
    const int L = seqlens[i];
    const int start = (i == begin_b) ? begin_tok : 0;
    const int stop = (i == end_b) ? end_tok : L;
    const int split = (i == begin_b) ? begin_split : 0;
    const int lo = num_splits[i], nsplit = num_splits[i + 1] - lo;
    int stop_eff = stop;  // causal: no column of this CTA sees keys past L - s_q + r_max
    if (causal) stop_eff = min(stop, L - s_q + min(s_q - 1, (qt * NQ + NQ - 1) / group) + 1);
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;
    int lim[4];  // last key each of this thread's columns sees
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int m = qt * NQ + c2 + (j & 1) + 8 * (j >> 1);
      lim[j] = causal ? min(stop - 1, L - s_q + m / group) : stop - 1;
    }

    float o[MBLOCKS][OREG];
#pragma unroll
    for (int mb = 0; mb < MBLOCKS; ++mb)
#pragma unroll
      for (int k = 0; k < OREG; ++k) o[mb][k] = 0.f;
    float m_run[4], l_part[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) m_run[j] = MLA_NEG_INF, l_part[j] = 0.f;

    if (n_tiles > 0) {
      // key tile `tile` of the piece: this thread's two rows, their block-table entries first
      auto fetch_blk = [&](int tile, int (&blk)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int pos = start + tile * BLOCK_N + ld_row + 32 * h;
          blk[h] = pos < stop_eff ? block_table[(long long)i * bt_stride + pos / page] : 0;
        }
      };
      auto load_k = [&](int tile, const int (&blk)[2]) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int pos = start + tile * BLOCK_N + ld_row + 32 * h;
          const bool valid = pos < stop_eff;
          const mla_elem_t* src = k_cache;
          if (valid) src = k_cache + (((long long)blk[h] * page + pos % page) * h_kv + g) * (long long)D;
          wg_tile_load_row<D>(myK, ld_row + 32 * h, lane, src, valid);
        }
      };
      // Q rows m -> (r, h) = (m / group, g group + m % group), rows >= M zero; all 256 threads
      for (int c = tid; c < NQ * D / 8; c += NTHREADS) {
        const int r = c % NQ, ch = 8 * (c / NQ), m = qt * NQ + r;
        const bool valid = m < M;
        const mla_elem_t* src = q;
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D + ch;
        cp_async16(sQ + q_offset(r, ch), src, valid);
      }
      cp_async_commit();
      if (wg < n_tiles) {
        int blk[2];
        fetch_blk(wg, blk);
        load_k(wg, blk);
      }
      cp_async_commit();
      cp_async_wait<1>();   // this thread's Q copies have landed ...
      fence_proxy_async();  // ... visible to the tensor cores ...
      __syncthreads();      // ... and everyone's

      for (int tt = wg; tt < n_tiles; tt += 2) {
        const bool more = tt + 2 < n_tiles;
        int blk[2];
        if (more) fetch_blk(tt + 2, blk);  // used at the end of this iteration
        cp_async_wait<0>();
        fence_proxy_async();
        named_bar_sync(bar, 128);  // the warpgroup's copies of tile tt are in its buffer

        // ---- S^T = K Q^T
        float s[8];
        st_issue(s, myK_addr, sQ_addr);
        wg_wait<0>();
        wg_fence_operands(s);

        // ---- scale to base 2, mask, column max over the tile's 64 keys
        const int pos0 = start + tt * BLOCK_N + key0;
        float mx[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) mx[j] = MLA_NEG_INF;
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int j = jof(k);
          const float v = pos0 + 8 * ((k >> 1) & 1) <= lim[j] ? s[k] * scale_log2 : MLA_NEG_INF;
          s[k] = v;
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
          for (int j = 0; j < 4; ++j) sRed[(wg * 4 + wq) * NQ + c2 + (j & 1) + 8 * (j >> 1)] = mx[j];
        }
        named_bar_sync(bar, 128);
        float mu[4], alpha[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int col = c2 + (j & 1) + 8 * (j >> 1);
          float t = sRed[(wg * 4) * NQ + col];
#pragma unroll
          for (int w = 1; w < 4; ++w) t = fmaxf(t, sRed[(wg * 4 + w) * NQ + col]);
          const float mn = fmaxf(m_run[j], t);
          mu[j] = mn == MLA_NEG_INF ? 0.f : mn;  // a column with no key yet: 2^(-inf - 0) = 0
          alpha[j] = fast_exp2(m_run[j] - mu[j]);
          m_run[j] = mn;
          l_part[j] *= alpha[j];
        }
        // ---- P = 2^(s - m), this thread's part of l, O *= alpha
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          s[k] = fast_exp2(s[k] - mu[jof(k)]);
          l_part[jof(k)] += s[k];
        }
#pragma unroll
        for (int mb = 0; mb < MBLOCKS; ++mb)
#pragma unroll
          for (int k = 0; k < OREG; ++k) o[mb][k] *= alpha[jof(k)];
        // ---- P^T -> shared memory (the B operand of O^T): columns c2, c2 + 1 are adjacent, one 32-bit store
#pragma unroll
        for (int k = 0; k < 8; k += 2) {
          const int key = key0 + 8 * ((k >> 1) & 1), col = c2 + 8 * (k >> 2);
          const u32 hi = pack2(s[k], s[k + 1]);
          *reinterpret_cast<u32*>(myP + p_offset(col, key)) = hi;
          if constexpr (P_SPLIT)
            *reinterpret_cast<u32*>(myP + p_offset(col + NQ, key)) = pack2(s[k] - lo_f(hi), s[k + 1] - hi_f(hi));
        }
        fence_proxy_async();
        named_bar_sync(bar, 128);  // P^T complete

        // ---- O^T += V^T P^T
        ot_issue(o, myK_addr, myP_addr);
        wg_wait<0>();
#pragma unroll
        for (int mb = 0; mb < MBLOCKS; ++mb) wg_fence_operands(o[mb]);
        named_bar_sync(bar, 128);  // the whole warpgroup is done with the K buffer and P^T
        if (more) load_k(tt + 2, blk);
        cp_async_commit();
      }
    }

    // ---- merge the two warpgroups: per column, m = max(m_0, m_1), l = sum_w 2^(m_w - m) l_w,
    // O = sum_w 2^(m_w - m) O_w; l_w first: this thread's keys -> the warp -> the warpgroup
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 4);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 8);
      l_part[j] += __shfl_xor_sync(0xffffffff, l_part[j], 16);
    }
    if (lane < 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = c2 + (j & 1) + 8 * (j >> 1);
        sRed[(wg * 4 + wq) * NQ + col] = l_part[j];
        if (wq == 0) sM[wg * NQ + col] = m_run[j];
      }
    }
    __syncthreads();
    float scale_own[4], l_tot[4], m_tot[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int col = c2 + (j & 1) + 8 * (j >> 1);
      float l_w[2];
#pragma unroll
      for (int w2 = 0; w2 < 2; ++w2)
        l_w[w2] = sRed[(w2 * 4) * NQ + col] + sRed[(w2 * 4 + 1) * NQ + col] + sRed[(w2 * 4 + 2) * NQ + col] +
                  sRed[(w2 * 4 + 3) * NQ + col];
      const float m0 = sM[col], m1 = sM[NQ + col];
      const float mn = fmaxf(m0, m1), mu = mn == MLA_NEG_INF ? 0.f : mn;
      const float s0 = fast_exp2(m0 - mu), s1 = fast_exp2(m1 - mu);
      scale_own[j] = wg ? s1 : s0;
      l_tot[j] = l_w[0] * s0 + l_w[1] * s1;
      m_tot[j] = mn;
    }
    if (wg == 1) {  // warpgroup 1's scaled O (hi + lo) over its K buffer: sO[ch][col]
#pragma unroll
      for (int mb = 0; mb < MBLOCKS; ++mb)
#pragma unroll
        for (int k = 0; k < 8; k += 2) {
          const int ch = 64 * mb + key0 + 8 * ((k >> 1) & 1), col = c2 + 8 * (k >> 2);
          float v0 = o[mb][k], v1 = o[mb][k + 1];
          if constexpr (P_SPLIT) v0 += o[mb][k + 8], v1 += o[mb][k + 9];
          *reinterpret_cast<float2*>(sO + ch * NQ + col) = make_float2(v0 * scale_own[jof(k)], v1 * scale_own[jof(k + 1)]);
        }
    }
    __syncthreads();
    if (wg == 0) {
      const bool direct = nsplit == 1 && !force_partials;
      const int p = lo + split;
      long long orow[4];
      float inv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int m = qt * NQ + c2 + (j & 1) + 8 * (j >> 1);
        int r, h;
        orow[j] = m < M ? mla_row_offset(m, group, g, i, p, s_q, h_q, DV, direct, r, h) : -1;
        inv[j] = l_tot[j] > 0.f ? 1.f / l_tot[j] : 0.f;
        if (wq == 0 && lane < 4 && m < M)
          mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, mla_row_lse(m_tot[j], l_tot[j]));
      }
#pragma unroll
      for (int mb = 0; mb < MBLOCKS; ++mb)
#pragma unroll
        for (int k = 0; k < 8; ++k) {
          const int j = jof(k);
          if (orow[j] < 0) continue;
          const int ch = 64 * mb + key0 + 8 * ((k >> 1) & 1), col = c2 + (k & 1) + 8 * (k >> 2);
          float v = o[mb][k];
          if constexpr (P_SPLIT) v += o[mb][k + 8];
          v = (v * scale_own[j] + sO[ch * NQ + col]) * inv[j];
          if (direct) out[orow[j] + ch] = to_elem(v);
          else o_part[orow[j] + ch] = v;
        }
    }
    __syncthreads();  // sO, sRed, sM and the buffers are free for the next piece
  }
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
