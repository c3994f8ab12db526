// mla_decode_sparse.cu -- token-level sparse MLA decode (DeepSeek-V3.2 DSA), bf16/fp16 or FP8 cache,
// split-KV partials, plus the combine that applies attn_sink (sm_80+). Issue #5; launched by
// mla/backends/cupy_sparse_fp8.py. STATUS: verified on an H100 2026-11-25 (with mla_decode_fp8.cu):
// tests/test_cupy_fp8_sparse_gpu.py 95 passed, compute-sanitizer memcheck + racecheck passed.
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

#include "mla_combine.cuh"

constexpr int CWARPS = 4;

extern "C" __global__ void __launch_bounds__(CWARPS * 32)
mla_combine_sink(const float* __restrict__ o_part, const float* __restrict__ lse_part,
                 const int* __restrict__ num_splits, const float* __restrict__ attn_sink,
                 mla_elem_t* __restrict__ out, float* __restrict__ lse_out, int s_q, int h_q, int all_rows) {
  const int row = blockIdx.x * CWARPS + (threadIdx.x >> 5);  // r * h_q + h
  if (row >= s_q * h_q) return;
  mla_combine_row<DV, true>(o_part, lse_part, num_splits, attn_sink, out, lse_out, s_q, h_q, blockIdx.y, row,
                            threadIdx.x & 31, all_rows);
}
