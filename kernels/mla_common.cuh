// mla_common.cuh -- small device helpers shared by the CuPy RawKernel sources (header-free: NVRTC
// needs no CUDA toolkit headers, so CI compiles these with the nvidia-cuda-nvrtc wheel alone).
//
// Element type: 16-bit storage (bf16 or fp16) chosen at compile time with -DMLA_FP16=1 (default bf16).
// Everything touching the tensor cores or the async copy engine is inline PTX (sm_80+).
#pragma once

typedef unsigned short mla_elem_t;  // raw bf16 / fp16 bits
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef MLA_FP16
#define MLA_FP16 0
#endif

#define MLA_NEG_INF (__int_as_float(0xff800000))
#define MLA_POS_INF (__int_as_float(0x7f800000))
#define MLA_LN2 0.69314718055994530942f
#define MLA_LOG2E 1.44269504088896340736f

// generic pointer -> 32-bit shared-window address (what ldmatrix / cp.async take)
__device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 a;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// two floats -> packed pair (lo in the low half), round to nearest even
__device__ __forceinline__ u32 pack2(float lo, float hi) {
  u32 r;
#if MLA_FP16
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

// the low / high element of a packed pair, as float (exact: both 16-bit types embed in fp32)
__device__ __forceinline__ float lo_f(u32 x) {
#if MLA_FP16
  float f;
  asm("{ .reg .f16 h; mov.b32 {h, _}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(x));
  return f;
#else
  return __uint_as_float(x << 16);
#endif
}
__device__ __forceinline__ float hi_f(u32 x) {
#if MLA_FP16
  float f;
  asm("{ .reg .f16 h; mov.b32 {_, h}, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "r"(x));
  return f;
#else
  return __uint_as_float(x & 0xffff0000u);
#endif
}

__device__ __forceinline__ mla_elem_t to_elem(float x) {
  unsigned short r;
#if MLA_FP16
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
  return r;
}

// 16-byte global -> shared copy that bypasses L1; src_bytes = 0 zero-fills (nothing is read)
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n)
               : "memory");
}
// 4-byte global -> shared async copy; pred false zero-fills (nothing is read)
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool pred) {
  int n = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(n)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x2(u32 addr, u32& r0, u32& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r0), "=r"(r1) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr));
}

// D[16x8] += A[16x16] (row) * B[16x8] (col), fp32 accumulate
__device__ __forceinline__ void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#if MLA_FP16
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
#else
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
#endif
               "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ---- rows of m16n8 fragments: the 4 lanes of a quad (lane / 4 equal) hold rows r0 = lane / 4 and
// r0 + 8 between them

__device__ __forceinline__ float mla_quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}

__device__ __forceinline__ float mla_quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 1);
  return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// The online softmax's running max (base 2) of rows r0 / r0 + 8 after a tile whose maxima over this
// lane's keys are mx0 / mx1: m_run = max(m_run, tile max); mu = m_run, or 0 while the row has seen no
// key (keeps 2^(s - mu) finite: 0); alpha = 2^(m_old - mu) rescales l and o.
__device__ __forceinline__ void mla_online_max(float mx0, float mx1, float& m_run0, float& m_run1, float& mu0,
                                               float& mu1, float& alpha0, float& alpha1) {
  const float mn0 = fmaxf(m_run0, mla_quad_max(mx0)), mn1 = fmaxf(m_run1, mla_quad_max(mx1));
  mu0 = mn0 == MLA_NEG_INF ? 0.f : mn0;
  mu1 = mn1 == MLA_NEG_INF ? 0.f : mn1;
  alpha0 = fast_exp2(m_run0 - mu0);
  alpha1 = fast_exp2(m_run1 - mu1);
  m_run0 = mn0;
  m_run1 = mn1;
}

// natural-log lse of a row from its base-2 running max m and sum l (-inf when the row saw no key)
__device__ __forceinline__ float mla_row_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * MLA_LN2 : MLA_NEG_INF;
}

// ---- a worker's row of the scheduler plan (mla/scheduler.py: begin_b, begin_tok, end_b, end_tok, begin_split,
// ...) and the piece of sequence i it owns: keys [start, stop) of a sequence of L keys (L = the index list's
// length in sparse mode), its split index, the sequence's first partial row lo and its split count nsplit
struct MlaWork {
  int begin_b, begin_tok, end_b, end_tok, begin_split;
};
struct MlaPiece {
  int start, stop, split, lo, nsplit;
};
__device__ __forceinline__ MlaWork mla_work(const int* __restrict__ sched, int worker) {
  const int* r = sched + worker * 8;
  return MlaWork{r[0], r[1], r[2], r[3], r[4]};
}
__device__ __forceinline__ MlaPiece mla_piece(const MlaWork& w, const int* __restrict__ num_splits, int i, int L) {
  const int lo = num_splits[i];
  return MlaPiece{i == w.begin_b ? w.begin_tok : 0, i == w.end_b ? w.end_tok : L, i == w.begin_b ? w.begin_split : 0,
                  lo, num_splits[i + 1] - lo};
}

// The key tiles [start, stop_eff) of a piece [start, stop) for a CTA whose last query row is m_last (rows m of a KV
// head: query row m / group of s_q): causal, no row sees keys past L - s_q + r_max, so stop_eff <= stop; returns
// ceil((stop_eff - start) / BLOCK_N_) (0: no key).
template <int BLOCK_N_>
__device__ __forceinline__ int mla_piece_tiles(int start, int stop, int L, int s_q, int causal, int m_last, int group,
                                               int& stop_eff) {
  stop_eff = stop;
  if (causal) stop_eff = min(stop, L - s_q + min(s_q - 1, m_last / group) + 1);
  return stop_eff > start ? (stop_eff - start + BLOCK_N_ - 1) / BLOCK_N_ : 0;
}

// ---- where a finished query row of a split-KV decode goes. Row m of KV head g is (r, h) =
// (m / group, g group + m % group); a sequence with one split writes out / lse directly (direct),
// otherwise partial p's o_part / lse_part row. Returns the element offset of the row's first channel
// (DV channels a row) and sets r, h.
__device__ __forceinline__ long long mla_row_offset(int m, int group, int g, int i, int p, int s_q, int h_q, int dv,
                                                    bool direct, int& r, int& h) {
  r = m / group;
  h = g * group + m % group;
  return ((long long)((direct ? i : p) * s_q + r) * h_q + h) * dv;
}

// the row's lse: lse_out [b, h_q, s_q] (an empty row, -inf, is stored as +inf) or lse_part [*, s_q, h_q]
__device__ __forceinline__ void mla_store_lse(float* __restrict__ lse_out, float* __restrict__ lse_part, bool direct,
                                              int i, int p, int r, int h, int s_q, int h_q, float lse_v) {
  if (direct) lse_out[((long long)i * h_q + h) * s_q + r] = lse_v == MLA_NEG_INF ? MLA_POS_INF : lse_v;
  else lse_part[(long long)(p * s_q + r) * h_q + h] = lse_v;
}

// o / l of one of this lane's two rows (HALF 0: r0, 1: r0 + 8) from a 16 x 8 NT m16n8 accumulator whose
// columns start at col0: as q's 16-bit type into out (direct) or fp32 into o_part, at element offset orow.
template <int HALF, int NT, int DV>
__device__ __forceinline__ void mla_store_o_row(const float (&o_acc)[NT][4], float inv, bool direct,
                                                mla_elem_t* __restrict__ out, float* __restrict__ o_part,
                                                long long orow, int col0, int c2) {
#pragma unroll
  for (int t2 = 0; t2 < NT; ++t2) {
    const int col = col0 + t2 * 8 + c2;
    const float v0 = o_acc[t2][HALF * 2] * inv, v1 = o_acc[t2][HALF * 2 + 1] * inv;
    if (direct) {
      if (DV % 2 == 0) {
        if (col < DV) *reinterpret_cast<u32*>(out + orow + col) = pack2(v0, v1);
      } else {
        if (col < DV) out[orow + col] = to_elem(v0);
        if (col + 1 < DV) out[orow + col + 1] = to_elem(v1);
      }
    } else {
      if (DV % 2 == 0) {
        if (col < DV) *reinterpret_cast<float2*>(o_part + orow + col) = make_float2(v0, v1);
      } else {
        if (col < DV) o_part[orow + col] = v0;
        if (col + 1 < DV) o_part[orow + col + 1] = v1;
      }
    }
  }
}

// ---- warp-level attention tile math (mma.sync m16n8k16), used by the portable, FP8/sparse decode and
// sparse prefill kernels. A warp owns 16 rows of a tile; lane holds rows r0 = lane / 4 and
// r0 + 8, columns c2 = 2 (lane % 4) and c2 + 1 of every n8 fragment (the m16n8 accumulator layout).

// The warp layout of the mma.sync attention kernels (mla_decode_portable.cu's scheme): a CTA of NWARPS
// warps holds BLOCK_M query rows; warp (rg, cg) = (warp % RG, warp / RG) owns rows [16 rg, 16 rg + 16),
// O columns [cg DV_PAD / CG, ...) (NT n8 tiles) and keys [cg SN, cg SN + SN) of a BLOCK_N-key S tile.
// Q / K rows in smem are KSTRIDE 16-bit elements (padded: ldmatrix rows hit distinct banks), S rows
// SSTRIDE floats.
template <int D, int DV, int BLOCK_M, int BLOCK_N, int NWARPS>
struct MlaWarpTiling {
  static constexpr int RG = BLOCK_M / 16;                                     // row groups of 16
  static constexpr int CG = NWARPS / RG;                                      // warps sharing a row group
  static constexpr int D_PAD = (D + 15) / 16 * 16;                            // Q K^T runs over k16 steps
  static constexpr int DV_PAD = (DV + 16 * CG - 1) / (16 * CG) * (16 * CG);
  static constexpr int NT = DV_PAD / (8 * CG);
  static constexpr int SN = BLOCK_N / CG, SNT = SN / 8;
  static constexpr int KSTRIDE = (D_PAD > DV_PAD ? D_PAD : DV_PAD) + 8;
  static constexpr int SSTRIDE = BLOCK_N + 8;
  static_assert(BLOCK_M % 16 == 0 && BLOCK_M <= 64, "BLOCK_M must be 16, 32 or 64");
  static_assert(NWARPS % RG == 0, "NWARPS must be a multiple of BLOCK_M / 16");
  static_assert(BLOCK_N % 16 == 0 && SN % 8 == 0, "BLOCK_N must be a multiple of 16 and of 8 * CG");
  static_assert(D % 8 == 0 && DV <= D, "D must be a multiple of 8 (16-byte rows) and DV <= D");
  static_assert(NT % 2 == 0 && NT <= 32, "the O accumulator must fit in registers");
};

// zero n16 16-byte words of shared memory from p, with all nthreads threads (the caller syncs)
__device__ __forceinline__ void mla_zero_smem(void* p, int n16, int tid, int nthreads) {
  for (int i = tid; i < n16; i += nthreads) reinterpret_cast<uint4*>(p)[i] = make_uint4(0, 0, 0, 0);
}

template <int NT>
__device__ __forceinline__ void mla_zero_frags(float (&acc)[NT][4]) {
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
}

// acc[j] = A[16 rows] . B[keys 8 j .. 8 j + 7]^T over K_PAD (multiple of 16) columns, fp32, from zero.
// a_base: this lane's ldmatrix.x4 address of A (row lane % 16, column 8 (lane / 16)); b_base: its
// ldmatrix.x2 address of B (row lane % 8, column 8 ((lane / 8) % 2)); 16-bit smem rows of STRIDE elements.
template <int K_PAD, int STRIDE, int SNT, int UNROLL>
__device__ __forceinline__ void mla_warp_qk(float (&acc)[SNT][4], u32 a_base, u32 b_base) {
  mla_zero_frags(acc);
#pragma unroll UNROLL
  for (int k0 = 0; k0 < K_PAD; k0 += 16) {
    u32 a0, a1, a2, a3;
    ldsm_x4(a_base + k0 * 2, a0, a1, a2, a3);
#pragma unroll
    for (int j = 0; j < SNT; ++j) {
      u32 b0, b1;
      ldsm_x2(b_base + (j * 8 * STRIDE + k0) * 2, b0, b1);
      mma16816(acc[j], a0, a1, a2, a3, b0, b1);
    }
  }
}

// One key tile of the online softmax (base 2) followed by O += P V, for this lane's rows r0 / r0 + 8:
//   m_new = max(m, max_k s_k);  alpha = 2^(m - m_new);  l = alpha l + sum_k 2^(s_k - m_new);
//   o = alpha o + sum_k 2^(s_k - m_new) v_k
// s_row0: row r0 of an fp32 tile of KEYS scores already scaled by log2(e) * softmax_scale and masked
// to -inf (row r0 + 8 is 8 SSTRIDE further); m / l: running max and sum of rows r0 / r0 + 8 (the 4
// lanes of a quad end with equal values); o: the 16 x 8 NT accumulator; v_base: this lane's
// ldmatrix.x4.trans address of V (row (lane % 8) + 8 ((lane / 8) % 2), column 8 (lane / 16) + this
// warp's first O column), 16-bit smem rows of STRIDE elements. P_SPLIT: P V as P_hi V + P_lo V with
// both parts 16-bit (bf16 P alone keeps 8 mantissa bits, too few for DESIGN §6 near small outputs).
template <int KEYS, int SSTRIDE, int STRIDE, int NT, bool P_SPLIT>
__device__ __forceinline__ void mla_softmax_pv(float (&o)[NT][4], float& m_run0, float& m_run1, float& l_run0,
                                               float& l_run1, const float* s_row0, u32 v_base, int c2) {
  constexpr int KK = KEYS / 16;
  float2 x00[KK], x01[KK], x10[KK], x11[KK];  // rows r0 / r0 + 8, key halves + 0 / + 8
  const float* s_row1 = s_row0 + 8 * SSTRIDE;
  float mx0 = MLA_NEG_INF, mx1 = MLA_NEG_INF;
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    x00[kk] = *reinterpret_cast<const float2*>(s_row0 + kk * 16 + c2);
    x01[kk] = *reinterpret_cast<const float2*>(s_row0 + kk * 16 + 8 + c2);
    x10[kk] = *reinterpret_cast<const float2*>(s_row1 + kk * 16 + c2);
    x11[kk] = *reinterpret_cast<const float2*>(s_row1 + kk * 16 + 8 + c2);
    mx0 = fmaxf(mx0, fmaxf(fmaxf(x00[kk].x, x00[kk].y), fmaxf(x01[kk].x, x01[kk].y)));
    mx1 = fmaxf(mx1, fmaxf(fmaxf(x10[kk].x, x10[kk].y), fmaxf(x11[kk].x, x11[kk].y)));
  }
  float mu0, mu1, alpha0, alpha1;
  mla_online_max(mx0, mx1, m_run0, m_run1, mu0, mu1, alpha0, alpha1);
  l_run0 *= alpha0;
  l_run1 *= alpha1;
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    o[t][0] *= alpha0;
    o[t][1] *= alpha0;
    o[t][2] *= alpha1;
    o[t][3] *= alpha1;
  }
#pragma unroll
  for (int kk = 0; kk < KK; ++kk) {
    const float p00x = fast_exp2(x00[kk].x - mu0), p00y = fast_exp2(x00[kk].y - mu0);
    const float p01x = fast_exp2(x01[kk].x - mu0), p01y = fast_exp2(x01[kk].y - mu0);
    const float p10x = fast_exp2(x10[kk].x - mu1), p10y = fast_exp2(x10[kk].y - mu1);
    const float p11x = fast_exp2(x11[kk].x - mu1), p11y = fast_exp2(x11[kk].y - mu1);
    l_run0 += (p00x + p00y) + (p01x + p01y);
    l_run1 += (p10x + p10y) + (p11x + p11y);
    // the A fragment of P (16 rows x 16 keys): a0 / a1 rows r0 / r0 + 8 keys c2.., a2 / a3 keys 8 + c2..
    const u32 a0 = pack2(p00x, p00y), a1 = pack2(p10x, p10y);
    const u32 a2 = pack2(p01x, p01y), a3 = pack2(p11x, p11y);
    u32 e0 = 0, e1 = 0, e2 = 0, e3 = 0;
    if constexpr (P_SPLIT) {  // P_lo = P - P_hi, rounded again
      e0 = pack2(p00x - lo_f(a0), p00y - hi_f(a0));
      e1 = pack2(p10x - lo_f(a1), p10y - hi_f(a1));
      e2 = pack2(p01x - lo_f(a2), p01y - hi_f(a2));
      e3 = pack2(p11x - lo_f(a3), p11y - hi_f(a3));
    }
#pragma unroll
    for (int t = 0; t < NT; t += 2) {
      u32 b0, b1, b2, b3;
      ldsm_x4_t(v_base + (kk * 16 * STRIDE + t * 8) * 2, b0, b1, b2, b3);
      mma16816(o[t], a0, a1, a2, a3, b0, b1);
      mma16816(o[t + 1], a0, a1, a2, a3, b2, b3);
      if constexpr (P_SPLIT) {
        mma16816(o[t], e0, e1, e2, e3, b0, b1);
        mma16816(o[t + 1], e0, e1, e2, e3, b2, b3);
      }
    }
  }
}
