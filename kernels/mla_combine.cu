// mla_combine.cu -- merge the split-KV partials of each sequence (mla.reference.combine_splits).
//
//   lse = log sum_s exp(lse_s),   out = sum_s exp(lse_s - lse) o_s          (empty: out 0, lse +inf)
//
// o_part fp32 [*, s_q, h_q, DV], lse_part fp32 [*, s_q, h_q] (-inf = empty split), num_splits int32
// [b + 1]; out [b, s_q, h_q, DV] (bf16/fp16; float with -DMLA_OUT_F32=1), lse fp32 [b, h_q, s_q].
// PARTS warps per query row (r, h), each DV / PARTS channels: grid (ceil(s_q h_q / WARPS), b, PARTS).
// Sequences with a single split
// were written directly by the decode kernel and are skipped here, so the two kernels never touch
// the same row -- unless all_rows (the decode kernel ran with force_partials and wrote every piece
// as a partial: out_dtype=float32, where no row may be rounded to 16 bits on the way). The row's
// work is mla_combine_row (mla_combine.cuh), shared with the sparse decode's sink-aware combine.
#include "mla_combine.cuh"

#ifndef MLA_DV
#define MLA_DV 512
#endif
#ifndef MLA_OUT_F32
#define MLA_OUT_F32 0
#endif
#ifndef MLA_COMBINE_PARTS
#define MLA_COMBINE_PARTS 1
#endif
constexpr int DV = MLA_DV;
constexpr int WARPS = 4;
constexpr int PARTS = MLA_COMBINE_PARTS;  // warps a row, each DV / PARTS channels (grid z)
#if MLA_OUT_F32
typedef float mla_out_t;
#else
typedef mla_elem_t mla_out_t;
#endif

extern "C" __global__ void __launch_bounds__(WARPS * 32)
mla_combine(const float* __restrict__ o_part, const float* __restrict__ lse_part,
            const int* __restrict__ num_splits, mla_out_t* __restrict__ out, float* __restrict__ lse_out,
            int s_q, int h_q, int all_rows) {
  if (gridDim.z != PARTS) __trap();  // the launcher's grid z and this build's slices must agree
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);  // r * h_q + h
  if (row >= s_q * h_q) return;
  mla_combine_row<DV, false, mla_out_t, PARTS>(o_part, lse_part, num_splits, nullptr, out, lse_out, s_q, h_q,
                                               blockIdx.y, row, threadIdx.x & 31, all_rows, blockIdx.z);
}
