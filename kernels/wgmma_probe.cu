// wgmma_probe.cu -- the building blocks of kernels/mla_decode_hopper.cu, one kernel each, on small
// exact-integer inputs (tests/test_wgmma_probe_gpu.py compares them with NumPy). Every kernel calls the
// same mla_wgmma.cuh functions the decode kernel calls, with the decode's tile layout, so a wrong
// descriptor, fragment map or exchange shows up here first, in isolation:
//
//   wgmma_probe_tile_layout   cp.async tile copy (wg_tile_load_row) -> raw shared memory dumped: checks the
//                             loader and wg_tile_offset without any tensor-core instruction
//   wgmma_probe_acc_map       wg_acc_row / wg_acc_col for every (thread, register): the software map
//   wgmma_probe_scores[_k1]   S[64 x 64] = Q K^T via wg_scores (36 k-steps, or 1 = channels 0..15 only):
//                             K-major A and B descriptors, the m64n32k16 accumulator map, the warpgroup
//                             exchange; output [2][64][64], one copy per warpgroup (they must agree)
//   wgmma_probe_pv[_split]    O[64 x 512] = P[64 x 64] V[64 x 512]: fp32 P in the accumulator layout ->
//                             wg_p_frags (register A fragments, P_hi [+ P_lo]) -> wg_pv_issue (N-major B
//                             descriptor, imm-trans-b) -> the m64n256k16 accumulator map
//
// Launch: grid (1), block (256), dynamic shared memory PROBE_SMEM_BYTES (two tiles + the exchange buffer).
// Inputs are row-major: Q, K, V [64][576] (16-bit), P fp32 [64][64]. -DMLA_FP16=1 for fp16. The test
// recompiles with -DMLA_WG_DIAG_SWAP_K=1 / -DMLA_WG_DIAG_SWAP_MN=1 to name a wrong descriptor field.
//
// STATUS: verified on an H100 (tests/test_wgmma_probe_gpu.py: 19 passed, 2026-11-25/26); sm_80 builds get
// trapping stubs.
#include "mla_common.cuh"
#include "mla_wgmma.cuh"

constexpr int PD = 576;                       // channels of a probe tile (the decode's d)
constexpr int PTILE_EL = WG_TILE_ROWS * PD;   // 36864 elements, 73728 bytes
constexpr int PROBE_SMEM_BYTES = 2 * 2 * PTILE_EL + 4 * WG_XCHG_FLOATS;  // mirrored in the test
static_assert(PROBE_SMEM_BYTES == 155648, "tests/test_wgmma_probe_gpu.py launches with 155648 bytes");

extern __shared__ __align__(128) unsigned char probe_smem[];

// both tiles: thread -> row wg_copy_row(tid) of each, as in the decode kernels; then fence + barrier
__device__ __forceinline__ void probe_load_tiles(mla_elem_t* s0, const mla_elem_t* g0, mla_elem_t* s1,
                                                 const mla_elem_t* g1) {
  const int tid = threadIdx.x, row = wg_copy_row(tid);
  if (g0) wg_tile_load_row<PD>(s0, tid, g0 + row * PD, true);
  if (g1) wg_tile_load_row<PD>(s1, tid, g1 + row * PD, true);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
}

extern "C" __global__ void __launch_bounds__(256, 1)
wgmma_probe_tile_layout(const mla_elem_t* __restrict__ src, mla_elem_t* __restrict__ dump) {
  mla_elem_t* tile = reinterpret_cast<mla_elem_t*>(probe_smem);
  probe_load_tiles(tile, src, nullptr, nullptr);
  for (int k = threadIdx.x; k < PTILE_EL; k += 256) dump[k] = tile[k];
}

extern "C" __global__ void __launch_bounds__(256, 1) wgmma_probe_acc_map(int* __restrict__ rows, int* __restrict__ cols) {
  const int t = threadIdx.x & 127;
  if (threadIdx.x >= 128) return;
  for (int i = 0; i < 128; ++i) {
    rows[t * 128 + i] = wg_acc_row(t, i);
    cols[t * 128 + i] = wg_acc_col(t, i);
  }
}

template <int KSTEPS>
__device__ __forceinline__ void probe_scores(const mla_elem_t* qg, const mla_elem_t* kg, float* s_out) {
#if MLA_HAS_WGMMA
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(probe_smem);
  mla_elem_t* sK = sQ + PTILE_EL;
  float* sX = reinterpret_cast<float*>(sK + PTILE_EL);
  probe_load_tiles(sQ, qg, sK, kg);
  const int wg = threadIdx.x >> 7, t = threadIdx.x & 127;
  float s[32];
  wg_scores<KSTEPS>(s, smem_u32(sQ), smem_u32(sK), sX, wg, t);
#pragma unroll
  for (int i = 0; i < 32; ++i) s_out[(wg * 64 + wg_acc_row(t, i)) * 64 + wg_acc_col(t, i)] = s[i];
#else
  __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1)
wgmma_probe_scores(const mla_elem_t* __restrict__ qg, const mla_elem_t* __restrict__ kg, float* __restrict__ s_out) {
  probe_scores<PD / 16>(qg, kg, s_out);
}
extern "C" __global__ void __launch_bounds__(256, 1)
wgmma_probe_scores_k1(const mla_elem_t* __restrict__ qg, const mla_elem_t* __restrict__ kg, float* __restrict__ s_out) {
  probe_scores<1>(qg, kg, s_out);
}

template <bool SPLIT>
__device__ __forceinline__ void probe_pv(const float* pg, const mla_elem_t* vg, float* o_out) {
#if MLA_HAS_WGMMA
  mla_elem_t* sV = reinterpret_cast<mla_elem_t*>(probe_smem);
  probe_load_tiles(sV, vg, nullptr, nullptr);
  const int wg = threadIdx.x >> 7, t = threadIdx.x & 127;
  float p[32];
#pragma unroll
  for (int i = 0; i < 32; ++i) p[i] = pg[wg_acc_row(t, i) * 64 + wg_acc_col(t, i)];
  u32 hi[16], lo[16];
  wg_p_frags<SPLIT>(p, hi, lo);
  float o[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) o[i] = 0.f;
  wg_pv_issue<SPLIT>(o, hi, lo, smem_u32(sV) + wg * 32 * WG_CG_BYTES);
  wg_wait<0>();
  wg_fence_operands(o);
#pragma unroll
  for (int i = 0; i < 128; ++i) o_out[wg_acc_row(t, i) * 512 + 256 * wg + wg_acc_col(t, i)] = o[i];
#else
  __trap();
#endif
}

extern "C" __global__ void __launch_bounds__(256, 1)
wgmma_probe_pv(const float* __restrict__ pg, const mla_elem_t* __restrict__ vg, float* __restrict__ o_out) {
  probe_pv<false>(pg, vg, o_out);
}
extern "C" __global__ void __launch_bounds__(256, 1)
wgmma_probe_pv_split(const float* __restrict__ pg, const mla_elem_t* __restrict__ vg, float* __restrict__ o_out) {
  probe_pv<true>(pg, vg, o_out);
}
