// mla_decode_sparse.cu -- token-level sparse MLA decode (DeepSeek-V3.2 DSA), bf16/fp16 or FP8 cache,
// split-KV partials, plus the combine that applies attn_sink (sm_80+). NOT YET RUN ON A GPU (issue #5):
// reachable from Python only with MLA_CUPY_UNVERIFIED=1 (mla/backends/cupy_sparse_fp8.py).
//
//   mla_decode_sparse  the decode body of mla_decode_fp8.cu compiled with MLA_SPARSE=1 (see its
//                      header): a CTA owns (plan worker, KV head g, query row r, BLOCK_M heads) and
//                      gathers the key rows indices[i, r, p] of its piece [start, stop) of the list
//                      with cp.async (invalid entries zero-filled, never read, masked to -inf);
//                      MLA_FP8 = 1 (default) for the 656-byte FP8 cache, 0 for a bf16/fp16 cache
//                      (any D % 8 == 0, d_v <= D, h_kv).
//   mla_combine_sink   mla_combine.cu plus attn_sink: lse = log sum_s exp(lse_s),
//                      out = sum_s exp(lse_s - lse) o_s / (1 + exp(sink_h - lse)); lse unchanged by
//                      the sink; empty rows: out 0, lse +inf. attn_sink may be null. With
//                      all_rows = 1 it also merges single-split sequences (the decode kernel then
//                      ran with force_partials = 1 and wrote every piece as a partial).
//
// One source, one set of -D values for both kernels (the decode's static checks run whenever the
// module compiles), so the backend loads both from the same defines.
#ifndef MLA_SPARSE
#define MLA_SPARSE 1
#endif
#include "mla_decode_fp8.cu"

constexpr int CWARPS = 4;
constexpr int CPER_LANE = (DV + 31) / 32;

extern "C" __global__ void __launch_bounds__(CWARPS * 32)
mla_combine_sink(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                 const int* __restrict__ num_splits, const float* __restrict__ attn_sink,
                 mla_elem_t* __restrict__ out, float* __restrict__ lse_out, int s_q, int h_q, int all_rows) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * CWARPS + (threadIdx.x >> 5);  // r * h_q + h
  const int i = blockIdx.y;
  const int rows = s_q * h_q;
  if (row >= rows) return;
  const int lo = num_splits[i], n = num_splits[i + 1] - lo;
  if (n < 1 || (n == 1 && !all_rows)) return;  // single split: written by the decode kernel
  const int r = row / h_q, h = row % h_q;

  float m = MLA_NEG_INF;
  for (int s = lane; s < n; s += 32) m = fmaxf(m, lse_part[(long long)(lo + s) * rows + row]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
  const float mu = m == MLA_NEG_INF ? 0.f : m;
  float total = 0.f;
  for (int s = lane; s < n; s += 32) total += expf(lse_part[(long long)(lo + s) * rows + row] - mu);
  for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffff, total, o);
  const bool empty = !(total > 0.f);
  const float lse = empty ? MLA_NEG_INF : mu + logf(total);
  const float sink = (attn_sink != nullptr && !empty) ? 1.f / (1.f + expf(attn_sink[h] - lse)) : 1.f;

  float acc[CPER_LANE];
#pragma unroll
  for (int k = 0; k < CPER_LANE; ++k) acc[k] = 0.f;
  if (!empty) {
    for (int s = 0; s < n; ++s) {
      const float ls = lse_part[(long long)(lo + s) * rows + row];
      if (ls == MLA_NEG_INF) continue;
      const float w = expf(ls - lse) * sink;
      const float* src = o_part + ((long long)(lo + s) * rows + row) * DV;
#pragma unroll
      for (int k = 0; k < CPER_LANE; ++k) {
        const int col = lane + 32 * k;
        if (col < DV) acc[k] += w * src[col];
      }
    }
  }
  mla_elem_t* dst = out + ((long long)i * rows + row) * DV;
#pragma unroll
  for (int k = 0; k < CPER_LANE; ++k) {
    const int col = lane + 32 * k;
    if (col < DV) dst[col] = to_elem(acc[k]);
  }
  if (lane == 0) lse_out[((long long)i * h_q + h) * s_q + r] = empty ? MLA_POS_INF : lse;
}
