// mla_tensor_map.cu -- stores a tensor map (CUtensorMap: 128 opaque bytes, encoded on the host by the driver's
// cuTensorMapEncodeTiled, mla/backends/_tma.py) in device memory, where the seesaw kernel's TMA build reads it.
//
// Why a kernel and not a host-to-device copy: a kernel launch is recorded like any other step when a decode is
// captured into a CUDA graph; a copy from pageable host memory is not allowed during a capture. One thread writes
// the 16 words (passed as kernel arguments, so the launch carries the map) into a CuPy allocation (256-byte
// aligned; a tensor map in global memory must be 64-byte aligned).
#include "mla_common.cuh"

extern "C" __global__ void mla_tensor_map_store(u64* __restrict__ dst, u64 w0, u64 w1, u64 w2, u64 w3, u64 w4,
                                                u64 w5, u64 w6, u64 w7, u64 w8, u64 w9, u64 w10, u64 w11, u64 w12,
                                                u64 w13, u64 w14, u64 w15) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const u64 w[16] = {w0, w1, w2, w3, w4, w5, w6, w7, w8, w9, w10, w11, w12, w13, w14, w15};
#pragma unroll
  for (int k = 0; k < 16; ++k) dst[k] = w[k];
}
