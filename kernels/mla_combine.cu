// mla_combine.cu -- merge the split-KV partials of each sequence (mla.reference.combine_splits).
//
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s          (empty: out 0, lse +inf)
//
// o_part fp32 [*, s_q, h_q, DV], lse_part fp32 [*, s_q, h_q] (-inf = empty split), num_splits int32
// [b + 1]; out [b, s_q, h_q, DV] (bf16/fp16), lse fp32 [b, h_q, s_q]. One warp per query row
// (r, h), grid (ceil(s_q h_q / WARPS), b). Sequences with a single split were written directly by
// the decode kernel and are skipped here, so the two kernels never touch the same row.
#include "mla_common.cuh"

#ifndef MLA_DV
#define MLA_DV 512
#endif
constexpr int DV = MLA_DV;
constexpr int WARPS = 4;
constexpr int PER_LANE = (DV + 31) / 32;

extern "C" __global__ void __launch_bounds__(WARPS * 32)
mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
            const int* __restrict__ num_splits, mla_elem_t* __restrict__ out, float* __restrict__ lse_out,
            int s_q, int h_q) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);  // r * h_q + h
  const int i = blockIdx.y;
  const int rows = s_q * h_q;
  if (row >= rows) return;
  const int lo = num_splits[i], n = num_splits[i + 1] - lo;
  if (n <= 1) return;
  const int r = row / h_q, h = row % h_q;

  // m = max_s lse_s, total = sum_s exp(lse_s - m)
  float m = MLA_NEG_INF;
  for (int s = lane; s < n; s += 32) m = fmaxf(m, lse_part[(long long)(lo + s) * rows + row]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  const float mu = m == MLA_NEG_INF ? 0.f : m;
  float total = 0.f;
  for (int s = lane; s < n; s += 32) total += expf(lse_part[(long long)(lo + s) * rows + row] - mu);
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
  const bool empty = !(total > 0.f);
  const float lse = empty ? MLA_NEG_INF : mu + logf(total);

  float acc[PER_LANE];
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) acc[k] = 0.f;
  if (!empty) {
    for (int s = 0; s < n; ++s) {
      const float ls = lse_part[(long long)(lo + s) * rows + row];
      if (ls == MLA_NEG_INF) continue;  // weight 0; its o_s is 0 too, skip the reads
      const float w = expf(ls - lse);
      const float* src = o_part + ((long long)(lo + s) * rows + row) * DV;
#pragma unroll
      for (int k = 0; k < PER_LANE; ++k) {
        const int col = lane + 32 * k;
        if (col < DV) acc[k] += w * src[col];
      }
    }
  }
  mla_elem_t* dst = out + ((long long)i * rows + row) * DV;
#pragma unroll
  for (int k = 0; k < PER_LANE; ++k) {
    const int col = lane + 32 * k;
    if (col < DV) dst[col] = to_elem(acc[k]);
  }
  if (lane == 0) lse_out[((long long)i * h_q + h) * s_q + r] = empty ? MLA_POS_INF : lse;
}
