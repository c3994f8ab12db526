// prefill_mma.cu -- MLA prefill attention (MHA mode) on the tensor cores: forward and backward,
// varlen + causal + GQA + dropout, bf16 / fp16 inputs (sm_80+, mma.sync m16n8k16, fp32 accumulate).
//
// Computes exactly what mla/prefill.py's NumPy reference defines (and kernels/prefill_fwd_bwd.cu, the
// fp32 SIMT version, computes), for sequence i (q rows cu_q[i]..cu_q[i+1], k/v rows cu_k[i]..cu_k[i+1])
// and query head h (KV head h / (H / H_K)):
//     S = scale Q K^T, masked to keys j < L_k and, causal (bottom-right), j <= r + L_k - L_q
//     lse = log sum_j exp S_rj (natural log; +inf for a row that sees nothing, whose out is 0)
//     O = (P o Z / (1 - p)) V,   P = exp(S - lse),   Z = dropout keep bits (counter-based hash below)
// Backward (FlashAttention-2: P recomputed from lse, never stored):
//     Dr = rowsum(dO o O)                                        prefill_mma_bwd_prep
//     dV += (P o Z/(1-p))^T dO,  dP = (dO V^T) o Z/(1-p),  dS = P o (dP - Dr)
//     dK += scale dS^T Q,        dQ += scale dS K             prefill_mma_bwd (one CTA per key tile)
//
// Layouts (row-major, contiguous, 16-byte aligned bases): q [total_q, H, D], k [total_k, H_K, D],
// v [total_k, H_K, DV], out / dout [total_q, H, DV], lse / Dr float [H, total_q].
// Compile-time (-D): PF_D, PF_DV (multiples of 32; the adapter takes D <= 256, DV <= 128: a wider
// forward accumulator spills), PF_FWD_WARPS (4 or 8: 64 or 128 query rows a forward CTA), MLA_FP16
// (0 = bf16). ptxas (CUDA 13 NVRTC, sm_90a, 192 / 128): forward 239 registers, backward 255, no spills. Everything below about "thread (g, t)" means lane = 4 g + t of a
// warp: the mma C fragment gives it rows g and g + 8 and columns 2t, 2t + 1 of each 8-column tile.
//
// Forward, prefill_mma_fwd: grid (ceil(max L_q / FBM), H, b), FWD_WARPS * 32 threads; FBM = 16 * warps.
//   Warp w owns query rows [16 w, 16 w + 16) of the CTA's FBM rows and all DV output columns
//   (o_acc: DV / 8 tiles x 4 fp32 = 64 registers for DV = 128). Per key tile of BN = 64 keys:
//     S [16 x 64]  = Q K^T: A = Q from smem (ldmatrix x4), B = K rows (ldmatrix x4 = two 8-key tiles)
//     online softmax in registers, base 2 (S scaled by scale * log2 e; lse converted back with ln 2)
//     O += P V:     A = P straight from the S accumulators (C layout of two n8 tiles = A layout of a
//                   k16 step), rounded to bf16/fp16; B = V via ldmatrix.trans
//   K/V tiles are double-buffered with cp.async (tile t + 1 loads while tile t is used; one barrier
//   a tile). Causal: key tiles past the CTA's last visible key are skipped, and the per-element mask
//   is applied only on tiles that cross a boundary. Query tiles are scheduled heaviest first.
//   Shared memory: Q [FBM][D + 8] + 2 x (K [64][D + 8] + V [64][DV + 8]) 16-bit elements
//   (+8: ldmatrix rows land on distinct banks) = 137,216 B for D 192, DV 128, FBM 128.
//
// Backward, prefill_mma_bwd: grid (ceil(max L_k / 64), H, b), 256 threads (8 warps); K and V of the
//   CTA's 64 keys stay in smem; query tiles of BBM = 64 rows stream through a cp.async double buffer
//   (Q, dO, lse, Dr). Warp w = (wr, wc) = (w % 4, w / 4). Per query tile:
//     S, dP [64 q x 64 k]:  warp owns queries [16 wr, +16) x keys [32 wc, +32)  (4 n8 tiles each)
//     P, dS -> smem (16-bit, [64][72]) so that the other products can read them transposed
//     dV [64 k x DV] += Pz^T dO and dK [64 k x D] += dS^T Q: warp owns keys [16 wr, +16) x columns
//                      [wc DV/2, +DV/2) and [wc D/2, +D/2): register accumulators for the whole CTA
//                      life (D/4 + DV/4 = 80 fp32 a thread for 192 / 128)
//     dQ [64 q x D] = dS K: warp owns queries [16 wr, +16) x columns [wc D/2, +D/2), added to a float32
//                      dq_acc [total_q, H, D] with red.global.add (.v2 on sm_90)
//   dK, dV are written directly in the element type when H == H_K, else added (fp32) into
//   dk_acc / dv_acc [total_k, H_K, *] shared by the group's heads; prefill_mma_f32_to_elem converts.
//   Shared memory: K [64][D+8] + V [64][DV+8] + 2 x (Q [64][D+8] + dO [64][DV+8]) + P, dS [64][72]
//   + 2 x (lse, Dr) [64] floats = 148,480 B for 192 / 128.
//   Why atomics for dQ and not a separate dQ kernel: the dQ pass would recompute S and dP (7 instead
//   of 5 matrix products, 40% more tensor work) and re-stream K and V; the price is a run-to-run
//   nondeterministic summation order of dQ in fp32 (as in FlashAttention-2).
//
// Versions:
//   v1 prefill_fwd_bwd.cu: SIMT fp32 FMA tiles (H100, bf16, b=4 s=4096 h=16: fwd 14.8, bwd 10.3 TFLOP/s)
//   v2 (this file) mma.sync m16n8k16 + ldmatrix + cp.async, FlashAttention-2 forward / backward.
//      STATUS: verified on an H100 2026-11-25: tests/test_prefill_gpu.py 63 passed (8 skipped by
//      design), compute-sanitizer memcheck + racecheck passed; 36-45x faster than naive CuPy there.
//      mla/backends/prefill_cupy.py picks it ("auto") wherever it supports the problem.
//      Also checked on the CPU: tests/test_prefill_compile.py runs every kernel here on the CPU emulator
//      (tests/cuda_host_emu.h: PTX semantics of ldmatrix / mma / cp.async, several warp schedules)
//      against the NumPy reference; benchmarks/bench_prefill.py times it beside v1 and naive CuPy.
//
// Dropout RNG: keep_prefix / keep_col below are bit-identical to mla.prefill.dropout_keep_mask and to
// prefill_fwd_bwd.cu's dropout_keep (lowbias32 chain over seed, head, global query row, global key
// row; keep iff hash >> 8 >= threshold = round(p 2^24), 0 = no dropout). The (seed, head, row) part of
// the chain is hoisted out of the key loop. The 1/(1 - p) factor is applied once, to O and to dV at
// the end (and to dP before dS), so P itself enters the products as P o keep.
#include "mla_common.cuh"

#ifndef PF_D
#define PF_D 192
#endif
#ifndef PF_DV
#define PF_DV 128
#endif
#ifndef PF_FWD_WARPS
#define PF_FWD_WARPS 8
#endif

typedef mla_elem_t elem_t;

constexpr int D = PF_D, DV = PF_DV;
constexpr int QS = D + 8;    // smem row stride (elements) of Q / K / dQ-side tiles
constexpr int VS = DV + 8;   // smem row stride of V / dO tiles
constexpr int BN = 64;       // keys a tile (forward) / a CTA (backward)
constexpr int FWD_WARPS = PF_FWD_WARPS, FWD_THREADS = 32 * FWD_WARPS, FBM = 16 * FWD_WARPS;
constexpr int BBM = 64;      // query rows a backward step
constexpr int BWD_THREADS = 256;
constexpr int PS = BN + 8;   // smem row stride of the P / dS tiles
constexpr float LOG2E = 1.4426950408889634f;

static_assert(D % 32 == 0 && DV % 32 == 0, "PF_D and PF_DV must be multiples of 32");
static_assert(FWD_WARPS == 4 || FWD_WARPS == 8, "PF_FWD_WARPS must be 4 or 8");

// ------------------------------------------------------------------------------------------ dropout RNG

#include "mla_dropout.cuh"

// ------------------------------------------------------------------------------------------ small helpers

// p[0] += a, p[1] += b in global memory (fp32; p 8-byte aligned), result unused
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// rows [row0, row0 + ROWS) of a row-major matrix (W elements a row, rows `row_stride` apart) into
// smem dst [ROWS][S]; rows at or past `nvalid` are zero-filled. W % 8 == 0 (16-byte chunks).
template <int ROWS, int W, int S, int NTHREADS>
__device__ __forceinline__ void load_rows(elem_t* dst, const elem_t* __restrict__ src, long long row_stride,
                                          int row0, int nvalid) {
  constexpr int CH = W / 8, N = ROWS * CH;
#pragma unroll
  for (int i = 0; i < (N + NTHREADS - 1) / NTHREADS; ++i) {
    const int idx = threadIdx.x + i * NTHREADS;
    if (N % NTHREADS != 0 && idx >= N) break;
    const int r = idx / CH, c = idx % CH;
    const bool ok = row0 + r < nvalid;
    const elem_t* s = ok ? src + (long long)(row0 + r) * row_stride + c * 8 : src;
    cp_async16(dst + r * S + c * 8, s, ok);
  }
}

// ldmatrix addresses (bytes, shared window) for the lane, in the four roles used below. `base` is
// the tile's first element, `stride` its row stride in elements. With r = lane & 7:
//  a_rows:  A fragment of rows [0, 16) x k [0, 16) of a row-major [m][k] tile      (ldsm_x4)
//           lane -> row lane & 15, column 8 (lane >> 4)
//  b_rows:  B fragments of two 8-wide n tiles from a [n][k] tile (K rows for S = Q K^T) (ldsm_x4)
//           lane -> row r + 8 (lane >> 4), column 8 ((lane >> 3) & 1):
//           regs 0, 1 = (b0, b1) of n tile 0; regs 2, 3 = (b0, b1) of n tile 1
//  b_trans: B fragments of two n tiles from a [k][n] tile (V for P V)          (ldsm_x4_t)
//           lane -> row r + 8 ((lane >> 3) & 1), column 8 (lane >> 4)
//  a_trans: A fragment (m x k) from a [k][m] tile (P^T, dS^T from [q][key])    (ldsm_x4_t)
//           lane -> row r + 8 (lane >> 4), column 8 ((lane >> 3) & 1):
//           matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15) = a0..a3
__device__ __forceinline__ u32 addr_a_rows(const elem_t* base, int stride, int lane) {
  return smem_u32(base + (lane & 15) * stride + (lane >> 4) * 8);
}
__device__ __forceinline__ u32 addr_b_rows(const elem_t* base, int stride, int lane) {
  return smem_u32(base + ((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8);
}
__device__ __forceinline__ u32 addr_b_trans(const elem_t* base, int stride, int lane) {
  return smem_u32(base + ((lane & 7) + (((lane >> 3) & 1) << 3)) * stride + (lane >> 4) * 8);
}
__device__ __forceinline__ u32 addr_a_trans(const elem_t* base, int stride, int lane) {
  return smem_u32(base + ((lane & 7) + ((lane >> 4) << 3)) * stride + ((lane >> 3) & 1) * 8);
}

// ------------------------------------------------------------------------------------------ forward

extern "C" __global__ void __launch_bounds__(FWD_THREADS, 1)
prefill_mma_fwd(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                const int* __restrict__ cu_q, const int* __restrict__ cu_k, elem_t* __restrict__ out,
                float* __restrict__ lse, int H, int H_K, int total_q, float scale_log2, int causal, u32 seed,
                u32 drop_threshold, float inv_keep) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sQ = reinterpret_cast<elem_t*>(smem_raw);   // [FBM][QS]
  elem_t* sK = sQ + FBM * QS;                          // [2][BN][QS]
  elem_t* sV = sK + 2 * BN * QS;                       // [2][BN][VS]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int b = blockIdx.z, head = blockIdx.y, kvh = head / (H / H_K);
  const int qs = cu_q[b], Lq = cu_q[b + 1] - qs, ks = cu_k[b], Lk = cu_k[b + 1] - ks;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * FBM;  // causal: the late (heaviest) tiles start first
  if (m0 >= Lq) return;
  const int shift = Lk - Lq;  // causal: row r sees keys j <= r + shift
  // keys [0, n_end) are visible to some row of this CTA
  int n_end = Lk;
  if (causal) n_end = max(0, min(Lk, min(m0 + FBM, Lq) - 1 + shift + 1));
  const int n_tiles = (n_end + BN - 1) / BN;
  // the smallest last-visible key over the CTA's rows: tiles ending at or before it need no mask
  const int lim_min = causal ? min(Lk - 1, m0 + shift) : Lk - 1;

  const long long q_rs = (long long)H * D, k_rs = (long long)H_K * D, v_rs = (long long)H_K * DV;
  const elem_t* qh = q + (long long)qs * q_rs + (long long)head * D;
  const elem_t* kh = k + (long long)ks * k_rs + (long long)kvh * D;
  const elem_t* vh = v + (long long)ks * v_rs + (long long)kvh * DV;

  // this thread's two rows (sequence-local) and the last key each sees (rows >= Lq are never stored)
  const int r0 = m0 + warp * 16 + g, r1 = r0 + 8;
  const int lim0 = causal ? min(Lk - 1, r0 + shift) : Lk - 1;
  const int lim1 = causal ? min(Lk - 1, r1 + shift) : Lk - 1;
  const u32 pre0 = keep_prefix(seed, head, qs + r0), pre1 = keep_prefix(seed, head, qs + r1);

  float o_acc[DV / 8][4];
#pragma unroll
  for (int t = 0; t < DV / 8; ++t) o_acc[t][0] = o_acc[t][1] = o_acc[t][2] = o_acc[t][3] = 0.f;
  float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_run0 = 0.f, l_run1 = 0.f;  // base-2 max, sum

  if (n_tiles > 0) {
    // group 0: Q (rows >= Lq zero) and K/V tile 0 (keys >= n_end zero: P is 0 there, and 0 * V must
    // not meet garbage, so V's dead rows are zero too)
    load_rows<FBM, D, QS, FWD_THREADS>(sQ, qh, q_rs, m0, Lq);
    load_rows<BN, D, QS, FWD_THREADS>(sK, kh, k_rs, 0, n_end);
    load_rows<BN, DV, VS, FWD_THREADS>(sV, vh, v_rs, 0, n_end);
    cp_async_commit();

    const u32 a_base = addr_a_rows(sQ + warp * 16 * QS, QS, lane);
    for (int t = 0; t < n_tiles; ++t) {
      const int buf = t & 1, n0 = t * BN;
      cp_async_wait<0>();
      // tile t visible to all; and every warp has finished tile t - 1, so its buffer may be refilled
      __syncthreads();
      if (t + 1 < n_tiles) {
        load_rows<BN, D, QS, FWD_THREADS>(sK + (buf ^ 1) * BN * QS, kh, k_rs, n0 + BN, n_end);
        load_rows<BN, DV, VS, FWD_THREADS>(sV + (buf ^ 1) * BN * VS, vh, v_rs, n0 + BN, n_end);
      }
      cp_async_commit();
      const elem_t* kt = sK + buf * BN * QS;
      const elem_t* vt = sV + buf * BN * VS;

      // ---- S [16 rows x 64 keys] = Q K^T; s[j] is the 8-key tile j
      float s[BN / 8][4];
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      const u32 b_base = addr_b_rows(kt, QS, lane);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        u32 a0, a1, a2, a3;
        ldsm_x4(a_base + kk * 32, a0, a1, a2, a3);
#pragma unroll
        for (int jp = 0; jp < BN / 16; ++jp) {
          u32 b0, b1, b2, b3;
          ldsm_x4(b_base + (jp * 16 * QS + kk * 16) * 2, b0, b1, b2, b3);
          mma16816(s[2 * jp], a0, a1, a2, a3, b0, b1);
          mma16816(s[2 * jp + 1], a0, a1, a2, a3, b2, b3);
        }
      }

      // ---- scale to base 2; mask (-inf) keys past each row's last visible key
      if (n0 + BN - 1 > lim_min) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const int c = n0 + j * 8 + 2 * t4;
          s[j][0] = c <= lim0 ? s[j][0] * scale_log2 : MLA_NEG_INF;
          s[j][1] = c + 1 <= lim0 ? s[j][1] * scale_log2 : MLA_NEG_INF;
          s[j][2] = c <= lim1 ? s[j][2] * scale_log2 : MLA_NEG_INF;
          s[j][3] = c + 1 <= lim1 ? s[j][3] * scale_log2 : MLA_NEG_INF;
        }
      } else {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          s[j][0] *= scale_log2;
          s[j][1] *= scale_log2;
          s[j][2] *= scale_log2;
          s[j][3] *= scale_log2;
        }
      }

      // ---- online softmax: m_new = max(m, rowmax S); l = l exp2(m - m_new) + sum exp2(S - m_new)
      float mx0 = MLA_NEG_INF, mx1 = MLA_NEG_INF;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
      }
      // the 4 lanes of a quad (same g) hold one row's 64 keys between them
      float mu0, mu1, alpha0, alpha1;  // quad max, running max, rescale factors
      mla_online_max(mx0, mx1, m_run0, m_run1, mu0, mu1, alpha0, alpha1);
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        s[j][0] = fast_exp2(s[j][0] - mu0);
        s[j][1] = fast_exp2(s[j][1] - mu0);
        s[j][2] = fast_exp2(s[j][2] - mu1);
        s[j][3] = fast_exp2(s[j][3] - mu1);
        sum0 += s[j][0] + s[j][1];
        sum1 += s[j][2] + s[j][3];
      }
      l_run0 = l_run0 * alpha0 + sum0;  // per-thread partial sums; the quad adds them at the end
      l_run1 = l_run1 * alpha1 + sum1;
      if (drop_threshold) {  // l counts every P; O only the kept ones (scaled by 1/(1-p) at the end)
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
          const u32 c = (u32)(ks + n0 + j * 8 + 2 * t4);
          if (!keep_col(pre0, c, drop_threshold)) s[j][0] = 0.f;
          if (!keep_col(pre0, c + 1, drop_threshold)) s[j][1] = 0.f;
          if (!keep_col(pre1, c, drop_threshold)) s[j][2] = 0.f;
          if (!keep_col(pre1, c + 1, drop_threshold)) s[j][3] = 0.f;
        }
      }
#pragma unroll
      for (int t2 = 0; t2 < DV / 8; ++t2) {
        o_acc[t2][0] *= alpha0;
        o_acc[t2][1] *= alpha0;
        o_acc[t2][2] *= alpha1;
        o_acc[t2][3] *= alpha1;
      }

      // ---- O [16 x DV] += P [16 x 64] V [64 x DV]; k16 step kk covers key tiles 2 kk, 2 kk + 1:
      //      a0 = (row g, keys +2t), a1 = (row g+8, keys +2t), a2 / a3: the same 8 keys further
      const u32 v_base = addr_b_trans(vt, VS, lane);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const u32 a0 = pack2(s[2 * kk][0], s[2 * kk][1]), a1 = pack2(s[2 * kk][2], s[2 * kk][3]);
        const u32 a2 = pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]), a3 = pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int t2 = 0; t2 < DV / 8; t2 += 2) {
          u32 b0, b1, b2, b3;
          ldsm_x4_t(v_base + (kk * 16 * VS + t2 * 8) * 2, b0, b1, b2, b3);
          mma16816(o_acc[t2], a0, a1, a2, a3, b0, b1);
          mma16816(o_acc[t2 + 1], a0, a1, a2, a3, b2, b3);
        }
      }
    }
    cp_async_wait<0>();
  }

  // ---- out = O / l (times 1/(1-p)), lse = (m + log2 l) ln 2; rows that saw nothing: 0 and +inf
  l_run0 = mla_quad_sum(l_run0);
  l_run1 = mla_quad_sum(l_run1);
  const float inv0 = l_run0 > 0.f ? inv_keep / l_run0 : 0.f, inv1 = l_run1 > 0.f ? inv_keep / l_run1 : 0.f;
  const long long o_rs = (long long)H * DV;
  elem_t* oh = out + (long long)qs * o_rs + (long long)head * DV;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? r1 : r0;
    if (r >= Lq) continue;
    const float inv = half ? inv1 : inv0;
    u32* orow = reinterpret_cast<u32*>(oh + (long long)r * o_rs);
#pragma unroll
    for (int t2 = 0; t2 < DV / 8; ++t2)
      orow[t2 * 4 + t4] = pack2(o_acc[t2][2 * half] * inv, o_acc[t2][2 * half + 1] * inv);
    if (t4 == 0) {
      const float l = half ? l_run1 : l_run0, m = half ? m_run1 : m_run0;
      lse[(long long)head * total_q + qs + r] = l > 0.f ? (m + log2f(l)) * MLA_LN2 : MLA_POS_INF;
    }
  }
}

// ------------------------------------------------------------------------------------------ backward

// Dr[h, r] = sum_c dout[r, h, c] out[r, h, c] in fp32: one warp per (row, head)
extern "C" __global__ void __launch_bounds__(256)
prefill_mma_bwd_prep(const elem_t* __restrict__ out, const elem_t* __restrict__ dout, float* __restrict__ dr,
                     int total_q, int H) {
  const long long wid = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (wid >= (long long)total_q * H) return;
  const u32* o2 = reinterpret_cast<const u32*>(out + wid * DV);
  const u32* d2 = reinterpret_cast<const u32*>(dout + wid * DV);
  float acc = 0.f;
#pragma unroll
  for (int c = lane; c < DV / 2; c += 32) {
    const u32 x = o2[c], y = d2[c];
    acc += lo_f(x) * lo_f(y) + hi_f(x) * hi_f(y);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dr[(wid % H) * total_q + wid / H] = acc;
}

// dst[i] = src[i] rounded to the element type (dQ, and dK / dV under GQA)
extern "C" __global__ void __launch_bounds__(256)
prefill_mma_f32_to_elem(const float* __restrict__ src, elem_t* __restrict__ dst, long long n) {
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
    dst[i] = to_elem(src[i]);
}

extern "C" __global__ void __launch_bounds__(BWD_THREADS, 1)
prefill_mma_bwd(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dr,
                const int* __restrict__ cu_q, const int* __restrict__ cu_k, float* __restrict__ dq_acc,
                elem_t* __restrict__ dk, elem_t* __restrict__ dv, float* __restrict__ dk_acc,
                float* __restrict__ dv_acc, int H, int H_K, int total_q, float scale, float scale_log2,
                int causal, u32 seed, u32 drop_threshold, float inv_keep) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  elem_t* sK = reinterpret_cast<elem_t*>(smem_raw);   // [BN][QS]
  elem_t* sV = sK + BN * QS;                           // [BN][VS]
  elem_t* sQ = sV + BN * VS;                           // [2][BBM][QS]
  elem_t* sdO = sQ + 2 * BBM * QS;                     // [2][BBM][VS]
  elem_t* sP = sdO + 2 * BBM * VS;                     // [BBM][PS]  P o keep (query-major)
  elem_t* sdS = sP + BBM * PS;                         // [BBM][PS]  dS
  float* sL = reinterpret_cast<float*>(sdS + BBM * PS);  // [2][BBM]  lse
  float* sDr = sL + 2 * BBM;                           // [2][BBM]  Dr

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int wr = warp & 3, wc = warp >> 2;
  const int b = blockIdx.z, head = blockIdx.y, group = H / H_K, kvh = head / group;
  const int qs = cu_q[b], Lq = cu_q[b + 1] - qs, ks = cu_k[b], Lk = cu_k[b + 1] - ks;
  const int n0 = blockIdx.x * BN;  // low key tiles see the most query rows: they start first
  if (n0 >= Lk) return;
  const int shift = Lk - Lq;
  // causal: query row r sees key j iff j <= r + shift, so rows below n0 - shift see none of this tile
  const int m_begin = causal ? max(0, n0 - shift) / BBM * BBM : 0;
  const int n_qt = Lq > m_begin ? (Lq - m_begin + BBM - 1) / BBM : 0;

  const long long q_rs = (long long)H * D, k_rs = (long long)H_K * D, v_rs = (long long)H_K * DV,
                  o_rs = (long long)H * DV;
  const elem_t* qh = q + (long long)qs * q_rs + (long long)head * D;
  const elem_t* kh = k + (long long)ks * k_rs + (long long)kvh * D;
  const elem_t* vh = v + (long long)ks * v_rs + (long long)kvh * DV;
  const elem_t* doh = dout + (long long)qs * o_rs + (long long)head * DV;
  const float* lse_h = lse + (long long)head * total_q + qs;
  const float* dr_h = dr + (long long)head * total_q + qs;

  // dK / dV accumulators: keys 16 wr + {g, g + 8}, columns wc * D/2 + 8 t + 2 t4 (+1)
  constexpr int DKT = D / 16, DVT = DV / 16;  // n8 tiles a warp owns (half the columns)
  float dk_r[DKT][4], dv_r[DVT][4];
#pragma unroll
  for (int t = 0; t < DKT; ++t) dk_r[t][0] = dk_r[t][1] = dk_r[t][2] = dk_r[t][3] = 0.f;
#pragma unroll
  for (int t = 0; t < DVT; ++t) dv_r[t][0] = dv_r[t][1] = dv_r[t][2] = dv_r[t][3] = 0.f;

  auto load_q_tile = [&](int m0, int buf) {
    load_rows<BBM, D, QS, BWD_THREADS>(sQ + buf * BBM * QS, qh, q_rs, m0, Lq);
    load_rows<BBM, DV, VS, BWD_THREADS>(sdO + buf * BBM * VS, doh, o_rs, m0, Lq);
    const int i = threadIdx.x;
    if (i < BBM) {
      const bool ok = m0 + i < Lq;
      cp_async4(sL + buf * BBM + i, ok ? lse_h + m0 + i : lse_h, ok);
    } else if (i < 2 * BBM) {
      const bool ok = m0 + i - BBM < Lq;
      cp_async4(sDr + buf * BBM + i - BBM, ok ? dr_h + m0 + i - BBM : dr_h, ok);
    }
  };

  if (n_qt > 0) {
    load_rows<BN, D, QS, BWD_THREADS>(sK, kh, k_rs, n0, Lk);   // keys >= Lk zero
    load_rows<BN, DV, VS, BWD_THREADS>(sV, vh, v_rs, n0, Lk);
    load_q_tile(m_begin, 0);
    cp_async_commit();

    // last key (sequence-local) visible to local query row r: -1 for rows >= Lq
    auto last_key = [&](int r) { return r >= Lq ? -1 : (causal ? min(Lk - 1, r + shift) : Lk - 1); };

    for (int it = 0; it < n_qt; ++it) {
      const int buf = it & 1, m0 = m_begin + it * BBM;
      cp_async_wait<0>();
      // tile `it` visible to all; every warp is past step it - 1, so its buffers may be refilled
      __syncthreads();
      if (it + 1 < n_qt) load_q_tile(m0 + BBM, buf ^ 1);
      cp_async_commit();
      const elem_t* qt = sQ + buf * BBM * QS;
      const elem_t* dot = sdO + buf * BBM * VS;

      // ---- S = Q K^T and dP = dO V^T: queries [16 wr, +16) x keys [32 wc, +32) (4 n8 tiles)
      float s[4][4], dp[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
        dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
      }
      {
        const u32 a_q = addr_a_rows(qt + wr * 16 * QS, QS, lane);
        const u32 b_k = addr_b_rows(sK + wc * 32 * QS, QS, lane);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          u32 a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7;
          ldsm_x4(a_q + kk * 32, a0, a1, a2, a3);
          ldsm_x4(b_k + kk * 32, b0, b1, b2, b3);
          ldsm_x4(b_k + (16 * QS + kk * 16) * 2, b4, b5, b6, b7);
          mma16816(s[0], a0, a1, a2, a3, b0, b1);
          mma16816(s[1], a0, a1, a2, a3, b2, b3);
          mma16816(s[2], a0, a1, a2, a3, b4, b5);
          mma16816(s[3], a0, a1, a2, a3, b6, b7);
        }
        const u32 a_do = addr_a_rows(dot + wr * 16 * VS, VS, lane);
        const u32 b_v = addr_b_rows(sV + wc * 32 * VS, VS, lane);
#pragma unroll
        for (int kk = 0; kk < DV / 16; ++kk) {
          u32 a0, a1, a2, a3, b0, b1, b2, b3, b4, b5, b6, b7;
          ldsm_x4(a_do + kk * 32, a0, a1, a2, a3);
          ldsm_x4(b_v + kk * 32, b0, b1, b2, b3);
          ldsm_x4(b_v + (16 * VS + kk * 16) * 2, b4, b5, b6, b7);
          mma16816(dp[0], a0, a1, a2, a3, b0, b1);
          mma16816(dp[1], a0, a1, a2, a3, b2, b3);
          mma16816(dp[2], a0, a1, a2, a3, b4, b5);
          mma16816(dp[3], a0, a1, a2, a3, b6, b7);
        }
      }

      // ---- P = exp2(S scale log2e - lse log2e) on visible (row, key), else 0;
      //      dS = P (dP z - Dr), z = keep / (1 - p); sP gets P keep (1/(1-p) is applied to dV at the end)
      {
        const int lr0 = wr * 16 + g, lr1 = lr0 + 8;           // rows within the tile
        const int lim0 = last_key(m0 + lr0), lim1 = last_key(m0 + lr1);
        const float lse0 = sL[buf * BBM + lr0] * LOG2E, lse1 = sL[buf * BBM + lr1] * LOG2E;
        const float dr0 = sDr[buf * BBM + lr0], dr1 = sDr[buf * BBM + lr1];
        const u32 pre0 = keep_prefix(seed, head, qs + m0 + lr0), pre1 = keep_prefix(seed, head, qs + m0 + lr1);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int cl = wc * 32 + j * 8 + 2 * t4;  // key within the tile
          const int c = n0 + cl;                     // sequence-local key
          float p[4], z[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int lim = e < 2 ? lim0 : lim1;
            const float l2 = e < 2 ? lse0 : lse1;
            p[e] = c + (e & 1) <= lim ? fast_exp2(s[j][e] * scale_log2 - l2) : 0.f;
            z[e] = 1.f;
          }
          if (drop_threshold) {
            const u32 cg = (u32)(ks + c);
            z[0] = keep_col(pre0, cg, drop_threshold) ? 1.f : 0.f;
            z[1] = keep_col(pre0, cg + 1, drop_threshold) ? 1.f : 0.f;
            z[2] = keep_col(pre1, cg, drop_threshold) ? 1.f : 0.f;
            z[3] = keep_col(pre1, cg + 1, drop_threshold) ? 1.f : 0.f;
          }
          float ds[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) ds[e] = p[e] * (dp[j][e] * (z[e] * inv_keep) - (e < 2 ? dr0 : dr1));
          *reinterpret_cast<u32*>(sP + lr0 * PS + cl) = pack2(p[0] * z[0], p[1] * z[1]);
          *reinterpret_cast<u32*>(sP + lr1 * PS + cl) = pack2(p[2] * z[2], p[3] * z[3]);
          *reinterpret_cast<u32*>(sdS + lr0 * PS + cl) = pack2(ds[0], ds[1]);
          *reinterpret_cast<u32*>(sdS + lr1 * PS + cl) = pack2(ds[2], ds[3]);
        }
      }
      __syncthreads();  // the whole P and dS tiles are in smem

      // ---- dV [keys 16 wr.. x DV/2 cols] += Pz^T dO;  dK [keys 16 wr.. x D/2 cols] += dS^T Q
      //      contraction over the tile's 64 queries, k16 step kq; A = P^T / dS^T via ldmatrix.trans
      {
        const u32 a_p = addr_a_trans(sP + wr * 16, PS, lane);
        const u32 a_s = addr_a_trans(sdS + wr * 16, PS, lane);
        const u32 b_do = addr_b_trans(dot + wc * (DV / 2), VS, lane);
        const u32 b_q = addr_b_trans(qt + wc * (D / 2), QS, lane);
#pragma unroll
        for (int kq = 0; kq < BBM / 16; ++kq) {
          u32 a0, a1, a2, a3;
          ldsm_x4_t(a_p + kq * 16 * PS * 2, a0, a1, a2, a3);
#pragma unroll
          for (int t2 = 0; t2 < DVT; t2 += 2) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(b_do + (kq * 16 * VS + t2 * 8) * 2, b0, b1, b2, b3);
            mma16816(dv_r[t2], a0, a1, a2, a3, b0, b1);
            mma16816(dv_r[t2 + 1], a0, a1, a2, a3, b2, b3);
          }
          ldsm_x4_t(a_s + kq * 16 * PS * 2, a0, a1, a2, a3);
#pragma unroll
          for (int t2 = 0; t2 < DKT; t2 += 2) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(b_q + (kq * 16 * QS + t2 * 8) * 2, b0, b1, b2, b3);
            mma16816(dk_r[t2], a0, a1, a2, a3, b0, b1);
            mma16816(dk_r[t2 + 1], a0, a1, a2, a3, b2, b3);
          }
        }
      }

      // ---- dQ [queries 16 wr.. x D/2 cols] = dS K (contraction over the 64 keys), added to dq_acc
      {
        float dq_r[DKT][4];
#pragma unroll
        for (int t = 0; t < DKT; ++t) dq_r[t][0] = dq_r[t][1] = dq_r[t][2] = dq_r[t][3] = 0.f;
        const u32 a_s = addr_a_rows(sdS + wr * 16 * PS, PS, lane);
        const u32 b_k = addr_b_trans(sK + wc * (D / 2), QS, lane);
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          u32 a0, a1, a2, a3;
          ldsm_x4(a_s + kk * 32, a0, a1, a2, a3);
#pragma unroll
          for (int t2 = 0; t2 < DKT; t2 += 2) {
            u32 b0, b1, b2, b3;
            ldsm_x4_t(b_k + (kk * 16 * QS + t2 * 8) * 2, b0, b1, b2, b3);
            mma16816(dq_r[t2], a0, a1, a2, a3, b0, b1);
            mma16816(dq_r[t2 + 1], a0, a1, a2, a3, b2, b3);
          }
        }
        const int r0 = m0 + wr * 16 + g, r1 = r0 + 8;
        float* dq0 = dq_acc + ((long long)(qs + r0) * H + head) * D + wc * (D / 2) + 2 * t4;
        float* dq1 = dq0 + 8LL * H * D;
#pragma unroll
        for (int t = 0; t < DKT; ++t) {
          if (r0 < Lq) red_add2(dq0 + t * 8, dq_r[t][0] * scale, dq_r[t][1] * scale);
          if (r1 < Lq) red_add2(dq1 + t * 8, dq_r[t][2] * scale, dq_r[t][3] * scale);
        }
      }
    }
    cp_async_wait<0>();
  }

  // ---- dK = scale dS^T Q, dV = Pz^T dO / (1 - p): keys n0 + 16 wr + {g, g + 8}
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int key = n0 + wr * 16 + g + 8 * half;
    if (key >= Lk) continue;
    if (group == 1) {
      u32* dkr = reinterpret_cast<u32*>(dk + ((long long)(ks + key) * H_K + kvh) * D + wc * (D / 2));
      u32* dvr = reinterpret_cast<u32*>(dv + ((long long)(ks + key) * H_K + kvh) * DV + wc * (DV / 2));
#pragma unroll
      for (int t = 0; t < DKT; ++t)
        dkr[t * 4 + t4] = pack2(dk_r[t][2 * half] * scale, dk_r[t][2 * half + 1] * scale);
#pragma unroll
      for (int t = 0; t < DVT; ++t)
        dvr[t * 4 + t4] = pack2(dv_r[t][2 * half] * inv_keep, dv_r[t][2 * half + 1] * inv_keep);
    } else if (n_qt > 0) {  // GQA: the group's heads add into one fp32 row (zeroed by the caller)
      float* dkr = dk_acc + ((long long)(ks + key) * H_K + kvh) * D + wc * (D / 2) + 2 * t4;
      float* dvr = dv_acc + ((long long)(ks + key) * H_K + kvh) * DV + wc * (DV / 2) + 2 * t4;
#pragma unroll
      for (int t = 0; t < DKT; ++t) red_add2(dkr + t * 8, dk_r[t][2 * half] * scale, dk_r[t][2 * half + 1] * scale);
#pragma unroll
      for (int t = 0; t < DVT; ++t)
        red_add2(dvr + t * 8, dv_r[t][2 * half] * inv_keep, dv_r[t][2 * half + 1] * inv_keep);
    }
  }
}
