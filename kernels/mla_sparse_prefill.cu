// mla_sparse_prefill.cu -- token-level sparse MLA prefill (DeepSeek-V3.2 DSA), FlashMLA's
// flash_mla_sparse_fwd, bf16 or fp16 (sm_80+). Issue #5; launched by mla/backends/cupy_sparse_prefill.py.
// STATUS: verified on an H100 2026-11-25: tests/test_sparse_prefill_gpu.py 74 passed, compute-sanitizer
// memcheck + racecheck passed. Also run on the CPU emulator of these sources (tests/_cuda_emu.py;
// tests/test_sparse_prefill_cupy_cpu.py): every tiling the backend picks matches the reference there.
//
// What it computes (mla/sparse.py `sparse_prefill_reference` is the spec). For query row r, KV head
// g and query head h = g * group + m of g's group (group = h_q / h_kv):
//   keys   J = { j = indices[r, g, p] : p < n_r, 0 <= j < s_kv }   (n_r = topk_length[r], else topk)
//   s_j  = sm_scale * q[r, h] . kv[j, g]  (all D channels);  V = kv[j, g, :DV]
//   max_logits[r, h] = max_j s_j;   lse[r, h] = log2 sum_j 2^(s_j log2 e)   (base 2, as FlashMLA)
//   out[r, h] = sum_j e^(s_j - max) v_j / sum_j e^(s_j - max)  *  1 / (1 + e^(sink_h - lse_e))
//   J empty: out 0, max_logits -inf, lse +inf. Entries of J past n_r, -1 and anything outside
//   [0, s_kv) are never read (cp.async zero-fills them: src-size 0) and score -inf.
//
// Shapes (C-contiguous): q [s_q, h_q, D]; kv [s_kv, h_kv, D]; indices int32 [s_q, h_kv, topk];
//   topk_length int32 [s_q] or null; attn_sink fp32 [h_q] or null; out [s_q, h_q, DV] (q's type);
//   max_logits, lse fp32 [s_q, h_q]. D % 8 == 0, DV <= D; s_q, h_q, h_kv, s_kv, topk at run time.
//
// Grid: one CTA per (query row r, KV head g, block qt of BLOCK_M heads of g's group), flattened as
//   blockIdx.x = (r * h_kv + g) * head_tiles + qt, so the CTAs that share an index list run side by
//   side (the second gathers its rows from L2). No split-KV, unlike decode: a prefill launches
//   s_q * h_kv * head_tiles CTAs (DeepSeek h_q = 128: 2 s_q, i.e. 8192 for s_q = 4096, ~60 waves on
//   132 SMs), and a CTA's list is at most topk keys, so each CTA walks its whole list and writes
//   out, max_logits and lse itself: no partials, no combine, the sink applied in the epilogue.
//
// Tiling (the verified mla_decode_portable.cu scheme; NWARPS warps): warp (rg, cg), rg = warp % RG
//   owns head rows [16 rg, 16 rg + 16) of the CTA's BLOCK_M, cg = warp / RG owns the O columns
//   [cg DV_PAD / CG, ...) and the keys [cg BLOCK_N / CG, ...) of the S tile (the BLOCK_M x DV fp32
//   accumulator is split over the CG warps of a row group so that it fits in registers). Per tile of
//   BLOCK_N list positions:
//     load   each half-warp gathers one key row kv[j, g, :] (16-byte cp.async, L1 bypassed) into one
//            of STAGES buffers, STAGES - 1 tiles ahead of the math; the row's validity goes to a smem
//            flag next to the tile (all BLOCK_M rows of a CTA share one index list, so one flag a key);
//     S      mla_warp_qk (mla_common.cuh): 16 rows x BLOCK_N / CG keys of Q K^T, mma.sync m16n8k16
//            with fp32 accumulation, times sm_scale log2(e), invalid keys -inf, into an fp32 smem
//            tile (the CG warps of a row group need all BLOCK_N scores of their rows);
//     P, O   mla_softmax_pv: online softmax in base 2 over the tile's BLOCK_N keys, O += P V with
//            V = the first DV columns of the same K tile (ldmatrix.trans); bf16 P as P_hi + P_lo.
//   Barriers per tile: A (tile t and Q landed; every warp is done with tile t - 1, so the buffer
//   being refilled and the S tile are free), C (S tile written), and one after P V (the buffer of
//   tile t and the S tile may be overwritten). The pad columns (D .. KSTRIDE) of Q and K are zeroed
//   once and never written again, so any D % 8 == 0 works.
//   Epilogue: l summed over the lane quad; with m the row's running max (base 2 units)
//     out = o / (l + 2^(sink log2 e - m))   (= o / l / (1 + e^(sink - lse_e)): the sink folded into
//     the normaliser, sink = -inf adds 0, +inf gives 0), lse = m + log2 l, max_logits = m ln 2.
//
// Compile-time parameters (-D): MLA_D, MLA_DV, MLA_BLOCK_M (16 / 32 / 64), MLA_BLOCK_N, MLA_NWARPS,
//   MLA_STAGES, MLA_FP16 (0 = bf16), MLA_P_SPLIT (default 1 for bf16), MLA_S_UNROLL.
//   Dynamic shared memory (bytes): the bf16 sparse decode's layout, cupy_sparse_fp8.smem_bytes(...,
//   fp8=False, sparse=True):  2 KSTRIDE (BLOCK_M + STAGES BLOCK_N) + 4 BLOCK_M (BLOCK_N + 8) + 4 STAGES BLOCK_N
//
//   ptxas (NVRTC, sm_90a): 254 registers for the 64-row bf16 tiling (240 fp16), 174 for 32 rows, 126 for
//   16; no spills, no stack, on sm_90a and sm_80 (tests/test_cupy_compile.py).
//
// Versions: v1 (this file), not yet measured. Expected on an H100 (benchmarks/NOTES_cupy.md: the same
//   mma.sync scheme is smem-bandwidth-bound, 142 TFLOP/s on compute-bound decode): ~130-170 TFLOP/s
//   for s_q 4096, h_q 128, topk 2048 (FlashMLA's wgmma kernel: ~640 on an H800).
#include "mla_common.cuh"

#ifndef MLA_D  // DeepSeek's dims and the H100 tiling for h_q = 128 (the backend always passes all of them)
#define MLA_D 576
#define MLA_DV 512
#define MLA_BLOCK_M 64
#define MLA_BLOCK_N 32
#define MLA_NWARPS 8
#define MLA_STAGES 2
#endif
#ifndef MLA_P_SPLIT
#define MLA_P_SPLIT (!MLA_FP16)
#endif
#ifndef MLA_S_UNROLL
#define MLA_S_UNROLL 4
#endif

constexpr int D = MLA_D, DV = MLA_DV, BLOCK_M = MLA_BLOCK_M, BLOCK_N = MLA_BLOCK_N, NWARPS = MLA_NWARPS;
constexpr int STAGES = MLA_STAGES, NTHREADS = NWARPS * 32, KROWS_PER_WARP = BLOCK_N / NWARPS;
using Tiling = MlaWarpTiling<D, DV, BLOCK_M, BLOCK_N, NWARPS>;  // static checks of the warp layout
constexpr int RG = Tiling::RG, CG = Tiling::CG, D_PAD = Tiling::D_PAD, NT = Tiling::NT, SN = Tiling::SN;
constexpr int SNT = Tiling::SNT, KSTRIDE = Tiling::KSTRIDE, SSTRIDE = Tiling::SSTRIDE;
static_assert(BLOCK_N % (2 * NWARPS) == 0, "each warp gathers BLOCK_N / NWARPS key rows, two at a time");
static_assert(STAGES >= 2, "at least double buffering");

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
mla_sparse_prefill(const mla_elem_t* __restrict__ q, const mla_elem_t* __restrict__ kv,
                   const int* __restrict__ indices, const int* __restrict__ topk_length,
                   const float* __restrict__ attn_sink, mla_elem_t* __restrict__ out,
                   float* __restrict__ max_logits, float* __restrict__ lse, int h_q, int h_kv, int s_kv, int topk,
                   float scale_log2) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);               // [BLOCK_M][KSTRIDE]
  mla_elem_t* sK = sQ + BLOCK_M * KSTRIDE;                                // [STAGES][BLOCK_N][KSTRIDE]
  float* sS = reinterpret_cast<float*>(sK + STAGES * BLOCK_N * KSTRIDE);  // [BLOCK_M][SSTRIDE]
  int* sFlag = reinterpret_cast<int*>(sS + BLOCK_M * SSTRIDE);            // [STAGES][BLOCK_N]: key valid

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp % RG, cg = warp / RG;
  const int r0 = lane >> 2, c2 = (lane & 3) * 2;
  const int group = h_q / h_kv, head_tiles = (group + BLOCK_M - 1) / BLOCK_M;
  const int qt = blockIdx.x % head_tiles;
  const int rowg = blockIdx.x / head_tiles;  // r * h_kv + g
  const int r = rowg / h_kv, g = rowg % h_kv;
  const int* list = indices + (long long)rowg * topk;  // indices[r, g, :]
  const int n_list = topk_length != nullptr ? min(topk_length[r], topk) : topk;
  const int n_tiles = n_list > 0 ? (n_list + BLOCK_N - 1) / BLOCK_N : 0;

  // zero Q and the K buffers once: the pad columns (D .. KSTRIDE) are never written again
  mla_zero_smem(sQ, (BLOCK_M + STAGES * BLOCK_N) * KSTRIDE / 8, tid, NTHREADS);
  __syncthreads();

  float o_acc[NT][4];  // O of rows r0 / r0 + 8 of this warp, its NT n8 column tiles
  mla_zero_frags(o_acc);
  float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_run0 = 0.f, l_run1 = 0.f;

  if (n_tiles > 0) {
    // Q tile: row mr = head g * group + qt * BLOCK_M + mr of query row r; rows past the group stay zero
    for (int mr = warp; mr < BLOCK_M; mr += NWARPS) {
      const int m = qt * BLOCK_M + mr;
      const bool valid = m < group;
      const mla_elem_t* src = q;
      if (valid) src = q + ((long long)r * h_q + g * group + m) * D;
      for (int c = lane; c < D / 8; c += 32) cp_async16(sQ + mr * KSTRIDE + c * 8, src + c * 8, valid);
    }
    // key rows of tile `tile` into buffer `buf`: each half-warp gathers one row (16-byte chunks)
    auto load_k = [&](int tile, int buf) {
      const int half = lane >> 4, hl = lane & 15;
#pragma unroll
      for (int k = 0; k < KROWS_PER_WARP; k += 2) {
        const int n = warp + (k + half) * NWARPS, p = tile * BLOCK_N + n;
        const int j = p < n_list ? list[p] : -1;  // read-only, __restrict__: the non-coherent path
        const bool valid = j >= 0 && j < s_kv;  // -1 and anything out of range is never read
        if (hl == 0) sFlag[buf * BLOCK_N + n] = valid;
        const mla_elem_t* src = kv;
        if (valid) src = kv + ((long long)j * h_kv + g) * D;
        mla_elem_t* dst = sK + (buf * BLOCK_N + n) * KSTRIDE;
        for (int c = hl; c < D / 8; c += 16) cp_async16(dst + c * 8, src + c * 8, valid);
      }
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < n_tiles) load_k(s, s);
      cp_async_commit();
    }

    const u32 a_base = smem_u32(sQ + (rg * 16 + (lane & 15)) * KSTRIDE + (lane >> 4) * 8);
    float* s_row0 = sS + (rg * 16 + r0) * SSTRIDE;
    float* s_row1 = s_row0 + 8 * SSTRIDE;
    for (int t = 0; t < n_tiles; ++t) {
      {
        const int tn = t + STAGES - 1;
        if (tn < n_tiles) load_k(tn, tn % STAGES);
        cp_async_commit();
      }
      cp_async_wait<STAGES - 1>();
      __syncthreads();  // A: tile t (and Q) landed in every thread's view
      const int buf = t % STAGES;
      const mla_elem_t* kt = sK + buf * BLOCK_N * KSTRIDE;

      // ---- S = Q K^T (scaled to base 2, masked) for 16 rows x SN keys of this warp
      {
        float s_acc[SNT][4];
        const u32 b_base = smem_u32(kt + (cg * SN + (lane & 7)) * KSTRIDE + ((lane >> 3) & 1) * 8);
        mla_warp_qk<D_PAD, KSTRIDE, SNT, MLA_S_UNROLL>(s_acc, a_base, b_base);
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
          const int n = cg * SN + j * 8 + c2;
          const bool ok0 = sFlag[buf * BLOCK_N + n] != 0, ok1 = sFlag[buf * BLOCK_N + n + 1] != 0;
          float2 x0, x1;
          x0.x = ok0 ? s_acc[j][0] * scale_log2 : MLA_NEG_INF;
          x0.y = ok1 ? s_acc[j][1] * scale_log2 : MLA_NEG_INF;
          x1.x = ok0 ? s_acc[j][2] * scale_log2 : MLA_NEG_INF;
          x1.y = ok1 ? s_acc[j][3] * scale_log2 : MLA_NEG_INF;
          *reinterpret_cast<float2*>(s_row0 + n) = x0;
          *reinterpret_cast<float2*>(s_row1 + n) = x1;
        }
      }
      __syncthreads();  // C: the full S tile is in smem

      // ---- online softmax (base 2) over the tile's BLOCK_N keys, then O += P V
      const u32 v_base = smem_u32(kt + ((lane & 7) + ((lane >> 3) & 1) * 8) * KSTRIDE + cg * (NT * 8) +
                                  (lane >> 4) * 8);
      mla_softmax_pv<BLOCK_N, SSTRIDE, KSTRIDE, NT, MLA_P_SPLIT != 0>(o_acc, m_run0, m_run1, l_run0, l_run1,
                                                                      s_row0, v_base, c2);
      __syncthreads();  // this K buffer, its flags and the S tile may now be overwritten
    }
  }

  // ---- epilogue: the 4 lanes of a quad share a row
  l_run0 = mla_quad_sum(l_run0);
  l_run1 = mla_quad_sum(l_run1);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int m = qt * BLOCK_M + rg * 16 + r0 + half * 8;
    if (m >= group) continue;
    const int h = g * group + m;
    const float l = half ? l_run1 : l_run0, mx = half ? m_run1 : m_run0;
    float inv = 0.f;  // empty row: out 0
    if (l > 0.f) inv = 1.f / (l + (attn_sink != nullptr ? exp2f(attn_sink[h] * MLA_LOG2E - mx) : 0.f));
    const long long orow = ((long long)r * h_q + h) * DV;
#pragma unroll
    for (int t = 0; t < NT; ++t) {
      const int col = cg * (NT * 8) + t * 8 + c2;
      const float v0 = o_acc[t][half * 2] * inv, v1 = o_acc[t][half * 2 + 1] * inv;
      if (DV % 2 == 0) {
        if (col < DV) *reinterpret_cast<u32*>(out + orow + col) = pack2(v0, v1);
      } else {
        if (col < DV) out[orow + col] = to_elem(v0);
        if (col + 1 < DV) out[orow + col + 1] = to_elem(v1);
      }
    }
    if (cg == 0 && (lane & 3) == 0) {
      const long long o = (long long)r * h_q + h;
      lse[o] = l > 0.f ? mx + log2f(l) : MLA_POS_INF;
      max_logits[o] = l > 0.f ? mx * MLA_LN2 : MLA_NEG_INF;
    }
  }
}
