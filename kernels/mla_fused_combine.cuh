// mla_fused_combine.cuh -- the split-KV merge done by the decode kernel's own CTAs, with no combine launch
// (kernels/mla_decode_hopper_narrow.cu, mla_decode_seesaw.cu; the host asks for it with bit 1 of their
// force_partials argument, MLA_MODE_FUSED, and launches them cooperatively: cupy_hopper.fused_reason).
//
// Why: with few long sequences every CTA holds one split of a sequence, and the combine kernel that merges the
// splits afterwards cost 5.4 us of the 44 us of b = 8, h_q = 16, s_k = 8192 (H100, L2 flushed by reading) and 9 of
// the 44 of b = 1, h_q = 128, s_k = 32768 -- its launch, its ramp and its own pass over the partials
// (benchmarks/NOTES_cupy.md, 2026-11-27 eleventh session). Here the CTAs of a sequence wait for each other and
// merge it together: the partials are still in L2, and the merge of sequence i starts when its last split is done.
//
// Protocol, per sequence i with n > 1 splits (N = n * gridDim.y * gridDim.z CTAs write its partials):
//   1. every such CTA, once its partial rows of i are written (its own barrier after them), adds 1 to the
//      sequence's arrival counter (release, GPU scope);
//   2. after its last piece, it waits until the counter reads N (acquire), then merges its share of i's rows:
//      the s_q h_q x MLA_FUSED_PARTS units of mla_combine_row (one row, DV / MLA_FUSED_PARTS channels, one warp
//      each) dealt round-robin over the N CTAs' warps (rank = (split * gridDim.z + z) * gridDim.y + y);
//   3. it adds 1 to the departure counter; the CTA that brings it to N (everyone has passed step 2) sets both
//      counters back to 0, so the next launch finds them as the plan left them.
// The counters are words 5 and 6 (documented as 0, mla/scheduler.py) of the plan row of the sequence's "home"
// worker, the one holding its split 0: split s of a sequence is worker home + s (the plan deals consecutive
// workers), and a worker is home to at most one split sequence (the last one it starts). So the state lives with
// the plan: two decodes sharing one plan must not run at the same time (one stream, as a model's layers do).
// Waiting is safe only when every CTA of the grid is resident at once: a cooperative launch guarantees that (the
// driver refuses a grid that cannot be), and the host launches so only grids of at most one CTA an SM.
// A CTA's arrivals all come before its waits, so no CTA waits for one that waits. A plan whose num_splits does not
// match its rows would wait forever: the wait gives up after ~0.1-1 s and traps (a launch error, not a hang).
#pragma once
#include "mla_combine.cuh"

#define MLA_MODE_PARTIALS 1  // force_partials bit 0: every piece written as a partial (out_dtype=float32)
#define MLA_MODE_FUSED 2     // bit 1: this launch merges its own split sequences (cooperative launch)

constexpr int MLA_FUSED_PARTS = 16;  // a unit: one row's DV / 16 channels (32 at DV = 512), one warp

// the counters of sequence i in the plan row of its home worker (worker - split of a piece of i); traps on a plan
// whose home row does not hold split 0 of i as its last piece (not what mla.get_mla_metadata makes)
__device__ __forceinline__ int* mla_fused_counters(const int* sched, int num_workers, int worker, int split, int i) {
  const int home = worker - split;
  if (home < 0 || home >= num_workers) __trap();
  const int* r = sched + home * 8;
  if (r[2] != i || (r[0] == i && r[4] != 0)) __trap();
  return const_cast<int*>(r) + 5;
}

// step 1, by one thread, after the CTA's partial rows of the sequence are written and a CTA barrier
__device__ __forceinline__ void mla_fused_arrive(int* counters) {
  asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(counters) : "memory");
}

// step 2's wait, by one thread (the CTA meets after it)
__device__ __forceinline__ void mla_fused_wait(const int* counters, int n_ctas) {
  for (long long spin = 0;; ++spin) {
    int v;
    asm volatile("ld.acquire.gpu.global.s32 %0, [%1];" : "=r"(v) : "l"(counters) : "memory");
    if (v >= n_ctas) return;
    if (spin > (1ll << 22)) __trap();  // the plan's splits never all arrived
    __nanosleep(spin < 64 ? 32 : 256);
  }
}

// step 3, by one thread after its wait
__device__ __forceinline__ void mla_fused_depart(int* counters, int n_ctas) {
  int old;
  asm volatile("atom.relaxed.gpu.global.add.s32 %0, [%1], 1;" : "=r"(old) : "l"(counters + 1) : "memory");
  if (old == n_ctas - 1) {
    asm volatile("st.relaxed.gpu.global.s32 [%0], 0;" ::"l"(counters) : "memory");
    asm volatile("st.relaxed.gpu.global.s32 [%0], 0;" ::"l"(counters + 1) : "memory");
  }
}

// Steps 2-3 for one sequence i (split `split` of nsplit is this CTA's), by the whole CTA (NTHREADS threads).
template <int DV, int NTHREADS>
__device__ __forceinline__ void mla_fused_merge(int* counters, int i, int split, int nsplit,
                                                const float* __restrict__ o_part, const float* __restrict__ lse_part,
                                                const int* __restrict__ num_splits, mla_elem_t* __restrict__ out,
                                                float* __restrict__ lse_out, int s_q, int h_q) {
  constexpr int NWARPS = NTHREADS / 32;
  const int n_ctas = nsplit * gridDim.y * gridDim.z;
  if (threadIdx.x == 0) mla_fused_wait(counters, n_ctas);
  __syncthreads();  // every split's partials are visible to the whole CTA (thread 0's acquire, then the barrier)
  const int rank = (split * gridDim.z + blockIdx.z) * gridDim.y + blockIdx.y;
  const int units = s_q * h_q * MLA_FUSED_PARTS;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int u = rank * NWARPS + warp; u < units; u += n_ctas * NWARPS)
    mla_combine_row<DV, false, mla_elem_t, MLA_FUSED_PARTS>(o_part, lse_part, num_splits, nullptr, out, lse_out,
                                                            s_q, h_q, i, u / MLA_FUSED_PARTS, lane, 0,
                                                            u % MLA_FUSED_PARTS);
  if (threadIdx.x == 0) mla_fused_depart(counters, n_ctas);
}

// After a CTA's last piece: steps 2-3 for each split sequence it wrote a partial of. Only its first piece
// (begin_b, begin_split) and its last (end_b, split 0) can be split (a piece between them is a whole sequence).
template <int DV, int NTHREADS>
__device__ __forceinline__ void mla_fused_merge_all(const MlaWork& work, const int* sched,
                                                    const float* __restrict__ o_part,
                                                    const float* __restrict__ lse_part,
                                                    const int* __restrict__ num_splits, mla_elem_t* __restrict__ out,
                                                    float* __restrict__ lse_out, int s_q, int h_q) {
  for (int k = 0; k < 2; ++k) {
    const int i = k ? work.end_b : work.begin_b, split = k ? 0 : work.begin_split;
    if (work.begin_b > work.end_b || (k && work.end_b == work.begin_b)) break;
    const int nsplit = num_splits[i + 1] - num_splits[i];
    if (nsplit > 1)
      mla_fused_merge<DV, NTHREADS>(mla_fused_counters(sched, gridDim.x, blockIdx.x, split, i), i, split, nsplit,
                                    o_part, lse_part, num_splits, out, lse_out, s_q, h_q);
  }
}
