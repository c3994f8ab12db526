// mla_combine.cuh -- merge one query row's split-KV partials (mla.reference.combine_splits), for
// mla_combine.cu and mla_decode_sparse.cu's mla_combine_sink. One warp a row:
//
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s * f          (empty: out 0, lse +inf)
//
// with f = 1 / (1 + exp(sink_h - lse)) when SINK (FlashMLA's attn_sink; lse itself unchanged), else 1.
// o_part fp32 [*, s_q, h_q, DV], lse_part fp32 [*, s_q, h_q] (-inf = empty split), num_splits int32
// [b + 1]; out [b, s_q, h_q, DV] (OutT: bf16/fp16 bits, or float for out_dtype=float32), lse_out fp32
// [b, h_q, s_q]. Rows of a sequence with a single split were written by the decode kernel and are
// skipped, unless all_rows (the decode kernel then wrote every piece as a partial).
#pragma once
#include "mla_common.cuh"

// lse = log sum_s exp(lse_s) of query row `row` over its n splits lo .. lo + n - 1, by one warp (lane-strided sums,
// then butterflies: every lane gets the same bits); empty: no split has a key (lse -inf). Shared with the decode
// kernels' fused merge (mla_fused_combine.cuh), which must produce this combine's bits.
__device__ __forceinline__ float mla_splits_lse(const float* lse_part, int lo, int n, int rows, int row, int lane,
                                                bool& empty) {
  // m = max_s lse_s, total = sum_s exp(lse_s - m)
  float m = MLA_NEG_INF;
  for (int s = lane; s < n; s += 32) m = fmaxf(m, lse_part[(long long)(lo + s) * rows + row]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  const float mu = m == MLA_NEG_INF ? 0.f : m;
  float total = 0.f;
  for (int s = lane; s < n; s += 32) total += expf(lse_part[(long long)(lo + s) * rows + row] - mu);
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
  empty = !(total > 0.f);
  return empty ? MLA_NEG_INF : mu + logf(total);
}

// The weight exp(lse_s - lse) x scale of split s of query row `row` (a lane's split; 0 past the n splits and for an
// empty split, lse_s = -inf, whose partial is then never used). Shared with the fused merge, as mla_splits_lse.
__device__ __forceinline__ float mla_split_weight(const float* lse_part, int lo, int n, int rows, int row, int s,
                                                  float lse, float scale = 1.f) {
  float w = 0.f;
  if (s < n) {
    const float ls = lse_part[(long long)(lo + s) * rows + row];
    if (ls != MLA_NEG_INF) w = expf(ls - lse) * scale;
  }
  return w;
}

// the output element: q's 16-bit type (rounded) or float (kept)
__device__ __forceinline__ void mla_store_out(mla_elem_t* dst, float x) { *dst = to_elem(x); }
__device__ __forceinline__ void mla_store_out(float* dst, float x) { *dst = x; }

// PARTS > 1: the row's DV channels are split into PARTS slices of DV / PARTS, slice `part` done by this warp
// (mla_combine.cu launches PARTS warps a row: with one warp a row and ~17 splits, b = 8, h_q = 16 took 23 us,
// latency-bound). Lane s computes split s's weight exp(lse_s - lse) once; the split loop then reads it with a
// shuffle and has no branch, so its loads overlap (an empty split, lse_s = -inf, has weight 0 and its partial
// is not used: the select keeps a NaN there out). The sum runs over s in order, as before: same bits.
// The loop loads BATCH splits' values before it adds any (BATCH x PER_LANE loads in flight a lane): 16 splits at a
// time with 32 channels a warp (what mla_combine.cu gets below 512 query rows since 2026-11-26: one long
// sequence's combine, b = 1, h_q = 128, 64 splits, 17 MB, took 42 us with 4 warps of 128 channels a row and a
// 4-split unroll, 14 us so), 4 with 128 channels.
template <int DV, bool SINK, typename OutT, int PARTS = 1>
__device__ __forceinline__ void mla_combine_row(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                                const int* __restrict__ num_splits,
                                                const float* __restrict__ attn_sink, OutT* __restrict__ out,
                                                float* __restrict__ lse_out, int s_q, int h_q, int i, int row,
                                                int lane, int all_rows, int part = 0) {
  static_assert(DV % PARTS == 0, "the channel slices must tile DV");
  constexpr int SLICE = DV / PARTS;
  constexpr int PER_LANE = (SLICE + 31) / 32;
  constexpr int BATCH = PER_LANE >= 8 ? 4 : 16 / PER_LANE;  // splits loaded before they are added
  const int rows = s_q * h_q;
  const int lo = num_splits[i], n = num_splits[i + 1] - lo;
  if (n < 1 || (n == 1 && !all_rows)) return;  // single split: written by the decode kernel
  const int r = row / h_q, h = row % h_q;

  bool empty;
  const float lse = mla_splits_lse(lse_part, lo, n, rows, row, lane, empty);
  float sink = 1.f;
  if constexpr (SINK) {
    if (attn_sink != nullptr && !empty) sink = 1.f / (1.f + expf(attn_sink[h] - lse));
  }

  float acc[PER_LANE];
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) acc[k] = 0.f;
  if (!empty) {
    for (int s0 = 0; s0 < n; s0 += 32) {
      const float w = mla_split_weight(lse_part, lo, n, rows, row, s0 + lane, lse, sink);  // lane j: split s0 + j
      const int cnt = min(32, n - s0);
      for (int j0 = 0; j0 < cnt; j0 += BATCH) {
        float v[BATCH][PER_LANE];
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const float* src = o_part + ((long long)(lo + s0 + j0 + u) * rows + row) * DV + part * SLICE;
#pragma unroll
          for (int k = 0; k < PER_LANE; ++k) {
            const int col = lane + 32 * k;
            v[u][k] = j0 + u < cnt && col < SLICE ? src[col] : 0.f;  // past cnt: not read, weight 0
          }
        }
#pragma unroll
        for (int u = 0; u < BATCH; ++u) {
          const float wl = __shfl_sync(0xffffffff, w, (j0 + u) & 31);
          const float wj = j0 + u < cnt ? wl : 0.f;  // (a warp-uniform test)
#pragma unroll
          for (int k = 0; k < PER_LANE; ++k) acc[k] += wj != 0.f ? wj * v[u][k] : 0.f;
        }
      }
    }
  }
  OutT* dst = out + ((long long)i * rows + row) * DV + part * SLICE;
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int col = lane + 32 * k;
    if (col < SLICE) mla_store_out(dst + col, acc[k]);
  }
  if (lane == 0 && part == 0) lse_out[((long long)i * h_q + h) * s_q + r] = empty ? MLA_POS_INF : lse;
}
