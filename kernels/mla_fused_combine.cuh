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
//      the units (one row's 64 or 128 channels, one warp each) dealt round-robin over the warps of the M merging
//      CTAs (rank = ((split - skip0) * gridDim.z + z) * gridDim.y + y): M = N, or N less split 0's CTAs when these
//      come from an earlier split sequence, which they merge instead (skip0, mla_fused_merge_all);
//   3. it adds 1 to the departure counter; the CTA that brings it to M (every merging CTA has passed step 2, and
//      every CTA arrived before that) sets both counters back to 0, so the next launch finds them as the plan left
//      them.
// The counters are words 5 and 6 (documented as 0, mla/scheduler.py) of the plan row of the sequence's "home"
// worker, the one holding its split 0: split s of a sequence is worker home + s (the plan deals consecutive
// workers), and a worker is home to at most one split sequence (the last one it starts). So the state lives with
// the plan: two decodes sharing one plan must not run at the same time (one stream, as a model's layers do).
// Waiting is safe only when every CTA of the grid is resident at once: a cooperative launch guarantees that (the
// driver refuses a grid that cannot be), and the host launches only grids of at most one CTA an SM.
// The partials are read with plain loads after the acquire (no __restrict__ on them here: other CTAs of this launch
// wrote them, so the read-only, non-coherent cache path must not be used).
// A CTA's arrivals all come before its waits, so no CTA waits for one that waits. A plan whose num_splits does not
// match its rows would wait forever: the wait gives up after ~0.1-1 s and traps (a launch error, not a hang).
#pragma once
#include "mla_combine.cuh"

// -DMLA_FUSED=1: the build that may merge (cupy_hopper loads it for cooperative launches only); 0: the merge and the
// arrivals compile away (the plain launches' cubins are those of the kernels before the fused merge existed)
#ifndef MLA_FUSED
#define MLA_FUSED 0
#endif

// 1: a CTA that merges its first sequence takes no part in its last one's merge (mla_fused_merge_all); 0: it merges
// both, one after the other (the eleventh session's merge; A/B only)
#ifndef MLA_FUSED_SKIP0
#define MLA_FUSED_SKIP0 1
#endif

#define MLA_MODE_PARTIALS 1  // force_partials bit 0: every piece written as a partial (out_dtype=float32)
#define MLA_MODE_FUSED 2     // bit 1: this launch merges its own split sequences (cooperative launch)

constexpr int MLA_FUSED_BATCH = 16;  // splits' values a lane loads before it adds any

template <int N>
struct alignas(4 * N) MlaFloats {  // N consecutive floats, loaded as one vector
  float v[N];
};

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

// The merge of rows x DV outputs of sequence i by this CTA's warps, rank `rank` of n_ctas CTAs. A unit is one row's
// 32 VEC channels, one warp (VEC = 2 or 4 a lane, vector loads): the row's lse and split weights as mla_combine_row
// computes them (the same expressions in the same order: the combine kernel's bits), then the weighted sum over the
// splits in order, with the first MLA_FUSED_BATCH splits' values loaded before the lse (they do not depend on it),
// so that one L2 round trip, not three, stands between the last arrival and the output.
template <int DV, int NTHREADS, int VEC>
__device__ __forceinline__ void mla_fused_merge_units(int i, int rank, int n_ctas, int n,
                                                      const float* o_part, const float* lse_part,
                                                      const int* __restrict__ num_splits,
                                                      mla_elem_t* __restrict__ out, float* __restrict__ lse_out,
                                                      int s_q, int h_q) {
  constexpr int NWARPS = NTHREADS / 32, CHUNK = 32 * VEC, CHUNKS = DV / CHUNK, BATCH = MLA_FUSED_BATCH;
  static_assert(DV % CHUNK == 0 && (VEC == 2 || VEC == 4), "a unit's channels must tile DV");
  const int rows = s_q * h_q, lo = num_splits[i];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int u = rank * NWARPS + warp; u < rows * CHUNKS; u += n_ctas * NWARPS) {
    const int row = u / CHUNKS, col = (u % CHUNKS) * CHUNK + VEC * lane;
    auto value = [&](int s) {  // split s's VEC channels of this lane (s < n), or zeros
      MlaFloats<VEC> x;
#pragma unroll
      for (int c = 0; c < VEC; ++c) x.v[c] = 0.f;
      if (s < n) x = *reinterpret_cast<const MlaFloats<VEC>*>(o_part + ((long long)(lo + s) * rows + row) * DV + col);
      return x;
    };
    MlaFloats<VEC> v[BATCH];
#pragma unroll
    for (int k = 0; k < BATCH; ++k) v[k] = value(k);
    bool empty;
    const float lse = mla_splits_lse(lse_part, lo, n, rows, row, lane, empty);
    float acc[VEC];
#pragma unroll
    for (int c = 0; c < VEC; ++c) acc[c] = 0.f;
    if (!empty) {
      for (int s0 = 0; s0 < n; s0 += 32) {
        const float w = mla_split_weight(lse_part, lo, n, rows, row, s0 + lane, lse);  // lane j: split s0 + j
        const int cnt = min(32, n - s0);
        for (int j0 = 0; j0 < cnt; j0 += BATCH) {
          if (s0 + j0 > 0) {  // (the first batch was loaded above)
#pragma unroll
            for (int k = 0; k < BATCH; ++k) v[k] = value(j0 + k < cnt ? s0 + j0 + k : n);
          }
#pragma unroll
          for (int k = 0; k < BATCH; ++k) {
            const float wl = __shfl_sync(0xffffffff, w, (j0 + k) & 31);
            const float wj = j0 + k < cnt ? wl : 0.f;
#pragma unroll
            for (int c = 0; c < VEC; ++c) acc[c] += wj != 0.f ? wj * v[k].v[c] : 0.f;
          }
        }
      }
    }
    mla_elem_t* dst = out + ((long long)i * rows + row) * DV + col;
    if constexpr (VEC == 4)
      *reinterpret_cast<uint2*>(dst) = make_uint2(pack2(acc[0], acc[1]), pack2(acc[2], acc[3]));
    else
      *reinterpret_cast<u32*>(dst) = pack2(acc[0], acc[1]);
    if (lane == 0 && col == 0) lse_out[((long long)i * h_q + row % h_q) * s_q + row / h_q] = empty ? MLA_POS_INF : lse;
  }
}

// Steps 2-3 for one sequence i (split `split` of nsplit is this CTA's), by the whole CTA (NTHREADS threads). Units
// of 64 channels when there are warps enough for one each (more warps load at once), else of 128 (fewer rounds):
// H100, 2026-11-27, 64 against 128: b = 1, h_q = 128, 64 splits -1.9 us; b = 8, h_q = 16, 16 splits +2.2 us
// (128 units of 64 on 120 warps: two rounds for some; benchmarks/NOTES_cupy.md).
// skip0: split 0's CTAs merge an earlier sequence first and take no part in this one's merge (mla_fused_merge_all).
template <int DV, int NTHREADS>
__device__ __forceinline__ void mla_fused_merge(int* counters, int i, int split, int nsplit, int skip0,
                                                const float* o_part, const float* lse_part,
                                                const int* __restrict__ num_splits, mla_elem_t* __restrict__ out,
                                                float* __restrict__ lse_out, int s_q, int h_q) {
  const int n_arrivals = nsplit * gridDim.y * gridDim.z, n_ctas = (nsplit - skip0) * gridDim.y * gridDim.z;
  if (threadIdx.x == 0) mla_fused_wait(counters, n_arrivals);
  __syncthreads();  // every split's partials are visible to the whole CTA (thread 0's acquire, then the barrier)
  const int rank = ((split - skip0) * gridDim.z + blockIdx.z) * gridDim.y + blockIdx.y;
  if (s_q * h_q * (DV / 64) <= n_ctas * (NTHREADS / 32))
    mla_fused_merge_units<DV, NTHREADS, 2>(i, rank, n_ctas, nsplit, o_part, lse_part, num_splits, out, lse_out, s_q,
                                           h_q);
  else
    mla_fused_merge_units<DV, NTHREADS, 4>(i, rank, n_ctas, nsplit, o_part, lse_part, num_splits, out, lse_out, s_q,
                                           h_q);
  if (threadIdx.x == 0) mla_fused_depart(counters, n_ctas);
}

// After a CTA's last piece: steps 2-3 for each split sequence it wrote a partial of. Only its first piece
// (begin_b, begin_split) and its last (end_b, split 0) can be split (a piece between them is a whole sequence). A CTA
// that merges its first sequence leaves its last one to that sequence's other CTAs (skip0): merged second, its share
// of the last sequence waited for its first merge, ~1.5 us more for that sequence (benchmarks/NOTES_cupy.md, twelfth
// session).
template <int DV, int NTHREADS>
__device__ __forceinline__ void mla_fused_merge_all(const MlaWork& work, const int* sched,
                                                    const float* o_part, const float* lse_part,
                                                    const int* __restrict__ num_splits, mla_elem_t* __restrict__ out,
                                                    float* __restrict__ lse_out, int s_q, int h_q) {
  auto splits_of = [&](int i) { return num_splits[i + 1] - num_splits[i]; };
  for (int k = 0; k < 2; ++k) {
    const int i = k ? work.end_b : work.begin_b, split = k ? 0 : work.begin_split;
    if (work.begin_b > work.end_b || (k && work.end_b == work.begin_b)) break;
    const int nsplit = splits_of(i);
    if (nsplit == 1 || (MLA_FUSED_SKIP0 && k && splits_of(work.begin_b) > 1)) continue;  // (k: split 0 of i skips)
    int* counters = mla_fused_counters(sched, gridDim.x, blockIdx.x, split, i);
    const int home_first = counters[-5];  // the sequence split 0's worker begins with
    const int skip0 = MLA_FUSED_SKIP0 && home_first != i && splits_of(home_first) > 1;
    mla_fused_merge<DV, NTHREADS>(counters, i, split, nsplit, skip0, o_part, lse_part, num_splits, out, lse_out,
                                  s_q, h_q);
  }
}
