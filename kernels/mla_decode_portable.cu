// mla_decode_portable.cu -- MLA decode over a paged KV cache, split-KV partials (sm_80+).
//
// What it computes (mla/reference.py is the spec; this is `split_partials`, fused with the final
// normalisation when a sequence has a single split):
//   for each piece (sequence i, keys [start, stop), partial p) of the scheduler plan and each query
//   row m = (r, h) of one KV head g (rows are [s_q][h_q / h_kv], FlashMLA's layout):
//     s_j = softmax_scale * q[i, r, h] . k[i, j, g]        j visible: j < stop, causal: j <= L - s_q + r
//     o_p = sum_j exp(s_j - m) v_j / l,   lse_p = m + log l       (V = first d_v channels of K)
//   A sequence with one split writes out (q's dtype) and lse directly (empty row: out 0, lse +inf),
//   unless force_partials (out_dtype=float32: every piece goes through mla_combine);
//   otherwise o_p (fp32) and lse_p (-inf when empty) go to the partial buffers and mla_combine.cu
//   merges them.
//
// Shapes: q [b, s_q, h_q, D]; k_cache [num_blocks, page, h_kv, D] (C-contiguous, D % 8 == 0);
//   block_table int32 [b, bt_stride]; o_part fp32 [*, s_q, h_q, DV]; lse_part fp32 [*, s_q, h_q];
//   out [b, s_q, h_q, DV]; lse fp32 [b, h_q, s_q].  Page size, h_kv, s_q, h_q are run-time values.
//
// Tiling: grid (num_workers, h_kv, ceil(M / BLOCK_M)), M = s_q * h_q / h_kv; NWARPS warps a CTA.
//   Warp (rg, cg): rg = warp % RG owns query rows [16 rg, 16 rg + 16) of the CTA's BLOCK_M rows,
//   cg = warp / RG owns the output columns [cg * DV_PAD / CG, ...) -- the BLOCK_M x DV fp32
//   accumulator is split over CG warps so that it fits in registers (a 64 x 512 tile needs 128
//   registers a thread over 8 warps). Per key tile of BLOCK_N tokens:
//     load   cp.async of K rows (gathered through the block table; rows past `stop` zero-filled,
//            nothing past a sequence's used pages is ever read), STAGES buffers deep, issued one
//            tile ahead of the math;
//     S      warp (rg, cg) computes S[16 rows, BLOCK_N / CG keys] = Q K^T (mma.sync m16n8k16,
//            ldmatrix from padded smem rows), scaled by softmax_scale * log2(e), masked to -inf,
//            into an fp32 smem tile (so QK^T is not repeated by the CG warps that share rows);
//     P, O   every warp reads its 16 full S rows, updates the running max m and sum l (fp32,
//            base 2), rescales its O columns and adds P V (P rounded to the 16-bit type, V read
//            with ldmatrix.trans from the same K tile).
//   The pad columns of Q/K in smem (D .. D_PAD) are zeroed once, so any D % 8 == 0 works.
//
// Compile-time parameters (-D): MLA_D, MLA_DV, MLA_BLOCK_M (16/32/64), MLA_BLOCK_N, MLA_NWARPS,
//   MLA_STAGES, MLA_FP16 (0 = bf16), MLA_P_SPLIT (default: 1 for bf16).
//   Dynamic shared memory (bytes), mirrored in cupy_backend.py:
//   2 * KSTRIDE * (BLOCK_M + STAGES * BLOCK_N) + 4 * BLOCK_M * (BLOCK_N + 8)
//
// Versions (H100 80GB HBM3, bf16, DeepSeek dims, L2 flushed, median of 30; benchmarks/NOTES_cupy.md):
//   v1  mma.sync + cp.async double buffer, S exchanged through smem, P V in one bf16 product:
//       b128 s_q1 h16 s_k8192 0.591 ms (2051 GB/s, 68% of copy); b128 s_q2 h128 3.70 ms (158 TFLOP/s)
//   v2  (this file) bf16 P V as P_hi + P_lo (two products) so that DESIGN §6 tolerances hold near
//       small outputs: 0.588-0.597 ms (2029-2063 GB/s); b128 s_q2 h128 4.10 ms (142 TFLOP/s)
//   v3  (tried, reverted) 4 independent S accumulators + S tiles interleaved over warps: slower
//       (0.617 ms, 4.69 ms), as were 4 warps, 16 warps and 3-4 stages of 32-key tiles.
#include "mla_common.cuh"

#ifndef MLA_D
#define MLA_D 576
#endif
#ifndef MLA_DV
#define MLA_DV 512
#endif
#ifndef MLA_BLOCK_M
#define MLA_BLOCK_M 16
#endif
#ifndef MLA_BLOCK_N
#define MLA_BLOCK_N 64
#endif
#ifndef MLA_NWARPS
#define MLA_NWARPS 8
#endif
#ifndef MLA_STAGES
#define MLA_STAGES 2
#endif
#ifndef MLA_P_SPLIT
#define MLA_P_SPLIT (!MLA_FP16)  // bf16: P V as two products (P_hi + P_lo); fp16 P is precise enough
#endif

constexpr int D = MLA_D, DV = MLA_DV;
constexpr int BLOCK_M = MLA_BLOCK_M, BLOCK_N = MLA_BLOCK_N, NWARPS = MLA_NWARPS, STAGES = MLA_STAGES;
constexpr int NTHREADS = NWARPS * 32;
// warp (rg, cg) layout, padded sizes and smem strides: MlaWarpTiling (mla_common.cuh, with its checks)
using Tiling = MlaWarpTiling<D, DV, BLOCK_M, BLOCK_N, NWARPS>;
constexpr int RG = Tiling::RG, CG = Tiling::CG, D_PAD = Tiling::D_PAD, DV_PAD = Tiling::DV_PAD, NT = Tiling::NT;
constexpr int SN = Tiling::SN, SNT = Tiling::SNT, KSTRIDE = Tiling::KSTRIDE, SSTRIDE = Tiling::SSTRIDE;
constexpr int CHUNKS = D / 8;                 // 16-byte chunks in a K / Q row
constexpr int KROWS_PER_WARP = BLOCK_N / NWARPS;

static_assert(BLOCK_N % NWARPS == 0, "each warp loads BLOCK_N / NWARPS key rows");

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
mla_decode_portable(const mla_elem_t* __restrict__ q, const mla_elem_t* __restrict__ k_cache,
                    const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                    const int* __restrict__ sched, const int* __restrict__ num_splits,
                    float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                    float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2,
                    int causal, int force_partials) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);                 // [BLOCK_M][KSTRIDE]
  mla_elem_t* sK = sQ + BLOCK_M * KSTRIDE;                                  // [STAGES][BLOCK_N][KSTRIDE]
  float* sS = reinterpret_cast<float*>(sK + STAGES * BLOCK_N * KSTRIDE);    // [BLOCK_M][SSTRIDE]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp % RG, cg = warp / RG;
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int r0 = lane >> 2, c2 = (lane & 3) * 2;

  // zero all of smem once: the pad columns (D..KSTRIDE) are never written again
  for (int idx = tid; idx < (BLOCK_M + STAGES * BLOCK_N) * KSTRIDE / 8; idx += NTHREADS)
    reinterpret_cast<uint4*>(sQ)[idx] = make_uint4(0, 0, 0, 0);
  __syncthreads();

  const MlaWork work = mla_work(sched, blockIdx.x);

  for (int i = work.begin_b; i <= work.end_b; ++i) {
    const int L = seqlens[i];
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    // causal: no row of this CTA sees keys past L - s_q + r_max, so later tiles are skipped
    int stop_eff = stop;
    if (causal) {
      int r_max = min(s_q - 1, (qt * BLOCK_M + BLOCK_M - 1) / group);
      stop_eff = min(stop, L - s_q + r_max + 1);
    }
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;

    // this thread's two query rows (r0 and r0 + 8 of its warp's 16) and the last key each sees
    const int m0 = qt * BLOCK_M + rg * 16 + r0, m1 = m0 + 8;
    int lim0 = stop - 1, lim1 = stop - 1;
    if (causal) {
      lim0 = min(lim0, L - s_q + m0 / group);
      lim1 = min(lim1, L - s_q + m1 / group);
    }

    float o_acc[NT][4];
    mla_zero_frags(o_acc);
    float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_run0 = 0.f, l_run1 = 0.f;

    if (n_tiles > 0) {
      // Q tile: rows m -> (r, h) = (m / group, g * group + m % group); rows >= M zero-filled
      for (int mr = warp; mr < BLOCK_M; mr += NWARPS) {
        const int m = qt * BLOCK_M + mr;
        const bool valid = m < M;
        const mla_elem_t* src = q;
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D;
        for (int c = lane; c < CHUNKS; c += 32) cp_async16(sQ + mr * KSTRIDE + c * 8, src + c * 8, valid);
      }
      auto load_k = [&](int tile, int buf) {
        const int pos0 = start + tile * BLOCK_N;
#pragma unroll
        for (int k = 0; k < KROWS_PER_WARP; ++k) {
          const int n = warp + k * NWARPS, pos = pos0 + n;
          const bool valid = pos < stop_eff;
          const mla_elem_t* src = k_cache;
          if (valid) {
            const long long blk = block_table[(long long)i * bt_stride + pos / page];
            src = k_cache + ((blk * page + pos % page) * h_kv + g) * (long long)D;
          }
          mla_elem_t* dst = sK + (buf * BLOCK_N + n) * KSTRIDE;
          for (int c = lane; c < CHUNKS; c += 32) cp_async16(dst + c * 8, src + c * 8, valid);
        }
      };
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) load_k(s, s);
        cp_async_commit();
      }

      for (int t = 0; t < n_tiles; ++t) {
        {
          const int tn = t + STAGES - 1;
          if (tn < n_tiles) load_k(tn, tn % STAGES);
          cp_async_commit();
        }
        cp_async_wait<STAGES - 1>();
        __syncthreads();  // tile t (and Q) visible to every warp
        const mla_elem_t* kt = sK + (t % STAGES) * BLOCK_N * KSTRIDE;
        const int pos0 = start + t * BLOCK_N;

        // ---- S = Q K^T for 16 rows x SN keys of this warp
        {
          float s_acc[SNT][4];
          const u32 a_base = smem_u32(sQ + (rg * 16 + (lane & 15)) * KSTRIDE + (lane >> 4) * 8);
          const u32 b_base = smem_u32(kt + (cg * SN + (lane & 7)) * KSTRIDE + ((lane >> 3) & 1) * 8);
          mla_warp_qk<D_PAD, KSTRIDE, SNT, 4>(s_acc, a_base, b_base);
          float* s_row0 = sS + (rg * 16 + r0) * SSTRIDE;
          float* s_row1 = s_row0 + 8 * SSTRIDE;
#pragma unroll
          for (int j = 0; j < SNT; ++j) {
            const int n = cg * SN + j * 8 + c2, pos = pos0 + n;
            float2 v0, v1;
            v0.x = pos <= lim0 ? s_acc[j][0] * scale_log2 : MLA_NEG_INF;
            v0.y = pos + 1 <= lim0 ? s_acc[j][1] * scale_log2 : MLA_NEG_INF;
            v1.x = pos <= lim1 ? s_acc[j][2] * scale_log2 : MLA_NEG_INF;
            v1.y = pos + 1 <= lim1 ? s_acc[j][3] * scale_log2 : MLA_NEG_INF;
            *reinterpret_cast<float2*>(s_row0 + n) = v0;
            *reinterpret_cast<float2*>(s_row1 + n) = v1;
          }
        }
        __syncthreads();  // the full S tile is in smem

        // ---- online softmax (base 2) over the tile's BLOCK_N keys, then O += P V
        {
          const float* s_row0 = sS + (rg * 16 + r0) * SSTRIDE;
          const u32 v_base = smem_u32(kt + ((lane & 7) + ((lane >> 3) & 1) * 8) * KSTRIDE + cg * (NT * 8) +
                                      (lane >> 4) * 8);
          mla_softmax_pv<BLOCK_N, SSTRIDE, KSTRIDE, NT, MLA_P_SPLIT>(o_acc, m_run0, m_run1, l_run0, l_run1, s_row0,
                                                                    v_base, c2);
        }
        __syncthreads();  // sS and this K buffer may now be overwritten
      }
    }

    // ---- finish the piece: o / l, lse = (m + log2 l) ln 2; the 4 lanes of a quad share a row
    l_run0 = mla_quad_sum(l_run0);
    l_run1 = mla_quad_sum(l_run1);
    const float inv0 = l_run0 > 0.f ? 1.f / l_run0 : 0.f, inv1 = l_run1 > 0.f ? 1.f / l_run1 : 0.f;
    const float lse0 = mla_row_lse(m_run0, l_run0), lse1 = mla_row_lse(m_run1, l_run1);
    const bool direct = nsplit == 1 && !force_partials;
    const int p = lo + split;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = half ? m1 : m0;
      if (m >= M) continue;
      int r, h;
      const long long orow = mla_row_offset(m, group, g, i, p, s_q, h_q, DV, direct, r, h);
      const float inv = half ? inv1 : inv0, lse_v = half ? lse1 : lse0;
      if (half == 0) mla_store_o_row<0, NT, DV>(o_acc, inv, direct, out, o_part, orow, cg * (NT * 8), c2);
      else mla_store_o_row<1, NT, DV>(o_acc, inv, direct, out, o_part, orow, cg * (NT * 8), c2);
      if (cg == 0 && (lane & 3) == 0) {
        mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, lse_v);
      }
    }
  }
}
