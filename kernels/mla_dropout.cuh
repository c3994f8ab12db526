// mla_dropout.cuh -- the prefill kernels' dropout RNG, bit-identical to mla.prefill.dropout_keep_mask:
// a lowbias32 hash chain over (seed, head, global query row, global key column); an element is kept
// when the top 24 bits of the last hash are >= threshold (threshold = round(p * 2^24)).
// Included by prefill_fwd_bwd.cu and prefill_mma.cu, so forward and backward (and both kernels)
// draw the same mask.
#pragma once

__device__ __forceinline__ unsigned int mix32(unsigned int x) {  // lowbias32 (Chris Wellons)
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

// the (seed, head, row) prefix of the chain; the keep bit of column col is keep_col(prefix, col, thr)
__device__ __forceinline__ unsigned int keep_prefix(unsigned int seed, unsigned int head, unsigned int row) {
  return mix32(mix32(mix32(seed ^ 0x9E3779B9u) ^ head) ^ row);
}

__device__ __forceinline__ bool keep_col(unsigned int prefix, unsigned int col, unsigned int threshold) {
  return (mix32(prefix ^ col) >> 8) >= threshold;
}

__device__ __forceinline__ bool dropout_keep(unsigned int seed, unsigned int head, unsigned int row,
                                             unsigned int col, unsigned int threshold) {
  return keep_col(keep_prefix(seed, head, row), col, threshold);
}
