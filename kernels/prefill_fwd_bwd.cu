// prefill_fwd_bwd.cu -- MLA prefill attention (MHA mode), forward and backward, varlen + causal + dropout.
//
// Computes, per sequence i (rows cu_q[i]..cu_q[i+1] of q, cu_k[i]..cu_k[i+1] of k/v) and head h
// (KV head h / (H / H_K)), exactly what mla/prefill.py's NumPy reference defines:
//     S = scale * Q K^T (masked: key < L_k, and key <= row + L_k - L_q when causal)
//     lse = log sum exp S,  P = exp(S - lse),  O = (P * Z / (1 - p)) V        Z = dropout keep bits
// Backward (FlashAttention-2, recompute P from lse; Dr = rowsum(dO * O) precomputed by the adapter):
//     dP = dO V^T * Z / (1 - p),  dS = P (dP - Dr),  dV = (P Z/(1-p))^T dO,  dK = scale dS^T Q,
//     dQ = scale dS K
//
// Layouts (row-major, contiguous): q [total_q, H, QK_DIM], k [total_k, H_K, QK_DIM],
// v [total_k, H_K, V_DIM], out/dout [total_q, H, V_DIM], lse/Dr float [H, total_q].
// Element type: float (ELEM_KIND 0), fp16 (1) or bf16 (2), chosen with -DELEM_KIND; QK_DIM and V_DIM
// are compile-time (-DQK_DIM=192 -DV_DIM=128); everything accumulates in fp32.
//
// Tiling (version 1, SIMT, correctness first): a CTA of 256 threads owns a 64 x 64 tile of S; thread
// (ty, tx) = (t / 16, t % 16) owns rows ty + 16 i and columns tx + 16 j (i, j < 4), so shared-memory
// reads are conflict-free along tx. Operands stream through shared memory 32 columns at a time
// (a [64][33] float tile each, padded against bank conflicts); P / dS go through a [64][65] tile
// (33.5 KB of static shared memory per CTA).
//   prefill_fwd        grid (ceil(max_L_q / 64), H, b): online softmax over key tiles.
//   prefill_bwd_dkdv   grid (ceil(max_L_k / 64), H, b): a key tile accumulates dK, dV over query tiles
//                      (per query head; the adapter sums a KV group's heads for GQA).
//   prefill_bwd_dq     grid (ceil(max_L_q / 64), H, b): a query tile accumulates dQ over key tiles.
// No [s, s] matrix exists anywhere: memory is O(s d).
//
// Versions:
//   v1 (this file) SIMT fp32 FMA tiles. H100 (2026-11, benchmarks/bench_prefill.py, bf16, b=4, s=4096,
//      d_qk 192, d_v 128, causal): h=16 fwd 23.3 ms = 14.8 TFLOP/s, bwd 87.0 ms = 10.3 TFLOP/s;
//      h=128 fwd 13.2, bwd 8.5 TFLOP/s. 2.8-2.9x (fwd) and 1.7-1.9x (bwd) the naive CuPy fp16
//      matmul + softmax version, but only ~1-2% of the bf16 matmul rate: the issue's 5x target needs
//      the tensor-core version (mma.sync m16n8k16 / wgmma, ldmatrix, cp.async), the next step.
//
// Dropout RNG: dropout_keep() below is bit-identical to mla.prefill.dropout_keep_mask (lowbias32 chain
// over seed, head, global query row, global key row); keep iff hash >> 8 >= threshold (= p * 2^24).

#ifndef ELEM_KIND
#define ELEM_KIND 2
#endif
#ifndef QK_DIM
#define QK_DIM 192
#endif
#ifndef V_DIM
#define V_DIM 128
#endif

#define BM 64
#define BN 64
#define NT 256
#define DC 32  // operand columns staged per step
#define QK_PAD (((QK_DIM) + DC - 1) / DC * DC)
#define V_PAD (((V_DIM) + DC - 1) / DC * DC)

typedef unsigned int u32;

#if ELEM_KIND == 0
typedef float elem_t;
__device__ __forceinline__ float to_f(elem_t x) { return x; }
__device__ __forceinline__ elem_t from_f(float x) { return x; }
#else
typedef unsigned short elem_t;  // raw 16-bit pattern
__device__ __forceinline__ float to_f(elem_t x) {
#if ELEM_KIND == 1
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x));
  return f;
#else
  return __uint_as_float(((u32)x) << 16);
#endif
}
__device__ __forceinline__ elem_t from_f(float x) {
  unsigned short r;
#if ELEM_KIND == 1
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(x));
#else
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(x));
#endif
  return r;
}
#endif

#define NEG_INF (__int_as_float(0xff800000))
#define POS_INF (__int_as_float(0x7f800000))

// ------------------------------------------------------------------------------------------ dropout RNG

#include "mla_dropout.cuh"

// ------------------------------------------------------------------------------------------ tile helpers

// dst[r][c] = src[(row0 + r) * stride + col0 + c] for r < 64, c < 32 (zero outside rows / cols)
__device__ __forceinline__ void load_tile(float (*dst)[DC + 1], const elem_t* __restrict__ src, int row0,
                                          int rows, long stride, int col0, int cols) {
  for (int e = threadIdx.x; e < 64 * DC; e += NT) {
    int r = e / DC, c = e % DC;
    float x = 0.f;
    if (r < rows - row0 && col0 + c < cols && r + row0 >= 0) x = to_f(src[(long)(row0 + r) * stride + col0 + c]);
    dst[r][c] = x;
  }
}

// acc[i][j] = sum_c A[ra_i][c] B[rb_j][c]  (A rows ty + 16 i, B rows tx + 16 j; c < DIM): S = Q K^T
template <int DIM_PAD>
__device__ __forceinline__ void abt_tile(float acc[4][4], const elem_t* __restrict__ A, int a_row0, int a_rows,
                                         long a_stride, const elem_t* __restrict__ B, int b_row0, int b_rows,
                                         long b_stride, int dim, float (*As)[DC + 1], float (*Bs)[DC + 1]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int c0 = 0; c0 < DIM_PAD; c0 += DC) {
    load_tile(As, A, a_row0, a_rows, a_stride, c0, dim);
    load_tile(Bs, B, b_row0, b_rows, b_stride, c0, dim);
    __syncthreads();  // tiles complete before anyone reads them
#pragma unroll 8
    for (int c = 0; c < DC; ++c) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = As[ty + 16 * i][c];
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = Bs[tx + 16 * j][c];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();  // done reading before the next load overwrites
  }
}

// acc[i][jc] += sum_k M[r_i][k] Y[k][col]  (M = Ms [64][65], row r_i = ty + 16 i; Y rows y_row0.., global)
// TRANS: use M^T (Ms[k][r_i]) instead, i.e. acc += M^T Y.  Columns: col = c0 + tx + 16 jj, jc = c0 / 16 + jj.
template <int DIM_PAD, bool TRANS>
__device__ __forceinline__ void mm_tile(float acc[4][DIM_PAD / 16], float (*Ms)[BN + 1],
                                        const elem_t* __restrict__ Y, int y_row0, int y_rows, long y_stride,
                                        int dim, float (*Ys)[DC + 1]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int c0 = 0; c0 < DIM_PAD; c0 += DC) {
    load_tile(Ys, Y, y_row0, y_rows, y_stride, c0, dim);
    __syncthreads();  // Y chunk staged (and Ms written by the caller before this call)
#pragma unroll 8
    for (int k = 0; k < 64; ++k) {
      float y0 = Ys[k][tx], y1 = Ys[k][tx + 16];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        float m = TRANS ? Ms[k][ty + 16 * i] : Ms[ty + 16 * i][k];
        acc[i][c0 / 16] += m * y0;
        acc[i][c0 / 16 + 1] += m * y1;
      }
    }
    __syncthreads();  // done with Ys before the next chunk
  }
}

__device__ __forceinline__ bool visible(int row, int col, int Lq, int Lk, int causal) {
  return row < Lq && col < Lk && (!causal || col <= row + Lk - Lq);
}

// ------------------------------------------------------------------------------------------ forward

extern "C" __global__ void __launch_bounds__(NT)
prefill_fwd(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
            const int* __restrict__ cu_q, const int* __restrict__ cu_k, elem_t* __restrict__ out,
            float* __restrict__ lse, int H, int H_K, int total_q, float scale, int causal, u32 seed,
            u32 drop_threshold, float inv_keep) {
  __shared__ float As[64][DC + 1], Bs[64][DC + 1];
  __shared__ float Ps[BM][BN + 1];
  __shared__ float m_s[BM], l_s[BM], alpha_s[BM];
  const int b = blockIdx.z, head = blockIdx.y, kvh = head / (H / H_K);
  const int qs = cu_q[b], Lq = cu_q[b + 1] - qs, ks = cu_k[b], Lk = cu_k[b + 1] - ks;
  const int q0 = blockIdx.x * BM;
  if (q0 >= Lq) return;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const long q_stride = (long)H * QK_DIM, k_stride = (long)H_K * QK_DIM, v_stride = (long)H_K * V_DIM;
  const elem_t* qh = q + (long)qs * q_stride + (long)head * QK_DIM;
  const elem_t* kh = k + (long)ks * k_stride + (long)kvh * QK_DIM;
  const elem_t* vh = v + (long)ks * v_stride + (long)kvh * V_DIM;
  if (threadIdx.x < BM) { m_s[threadIdx.x] = NEG_INF; l_s[threadIdx.x] = 0.f; }
  float o[4][V_PAD / 16];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < V_PAD / 16; ++j) o[i][j] = 0.f;
  // causal: the last key any row of this tile sees is (q0 + 63) + Lk - Lq
  int k_end = Lk;
  if (causal) k_end = min(Lk, max(0, min(q0 + BM, Lq) - 1 + Lk - Lq + 1));
  __syncthreads();
  for (int k0 = 0; k0 < k_end; k0 += BN) {
    float s[4][4];
    abt_tile<QK_PAD>(s, qh, q0, Lq, q_stride, kh, k0, Lk, k_stride, QK_DIM, As, Bs);
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        int r = q0 + ty + 16 * i, c = k0 + tx + 16 * j;
        Ps[ty + 16 * i][tx + 16 * j] = visible(r, c, Lq, Lk, causal) ? s[i][j] * scale : NEG_INF;
      }
    __syncthreads();  // S tile complete
    {  // online softmax: 4 consecutive threads per row, 16 columns each
      const int r = threadIdx.x / 4, sub = threadIdx.x % 4;
      float mx = NEG_INF;
      for (int c = sub; c < BN; c += 4) mx = fmaxf(mx, Ps[r][c]);
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_old = m_s[r];
      const float m_new = fmaxf(m_old, mx);
      const float m_safe = m_new == NEG_INF ? 0.f : m_new;  // all masked so far: keep exp() at 0, not NaN
      float sum = 0.f;
      for (int c = sub; c < BN; c += 4) {
        float p = __expf(Ps[r][c] - m_safe);
        sum += p;
        if (drop_threshold) {
          bool keep = dropout_keep(seed, head, qs + q0 + r, ks + k0 + c, drop_threshold);
          p = keep ? p * inv_keep : 0.f;
        }
        Ps[r][c] = p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      __syncwarp();
      if (sub == 0) {
        const float alpha = __expf(m_old - m_safe);  // m_old = -inf -> 0
        alpha_s[r] = alpha;
        l_s[r] = l_s[r] * alpha + sum;
        m_s[r] = m_new;
      }
    }
    __syncthreads();  // P, alpha ready
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float a = alpha_s[ty + 16 * i];
#pragma unroll
      for (int j = 0; j < V_PAD / 16; ++j) o[i][j] *= a;
    }
    mm_tile<V_PAD, false>(o, Ps, vh, k0, Lk, v_stride, V_DIM, As);
  }
  __syncthreads();
  elem_t* oh = out + (long)qs * H * V_DIM + (long)head * V_DIM;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (q0 + r >= Lq) continue;
    const float l = l_s[r];
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int j = 0; j < V_PAD / 16; ++j) {
      const int c = (j / 2) * DC + (j % 2) * 16 + tx;
      if (c < V_DIM) oh[(long)(q0 + r) * H * V_DIM + c] = from_f(o[i][j] * inv);
    }
    if (tx == 0) lse[(long)head * total_q + qs + q0 + r] = l > 0.f ? m_s[r] + __logf(l) : POS_INF;
  }
}

// ------------------------------------------------------------------------------------------ backward

// P (recomputed, dropout applied: Pd) and dS for the tile (q0.., k0..), into registers (thread's 4 x 4).
__device__ __forceinline__ void bwd_tile(const elem_t* qh, const elem_t* kh, const elem_t* vh, const elem_t* doh,
                                         const float* lse_h, const float* dr_h, int qs, int ks, int q0, int k0,
                                         int Lq, int Lk, long q_stride, long k_stride, long v_stride,
                                         long o_stride, float scale, int causal, int head, u32 seed,
                                         u32 drop_threshold, float inv_keep, float (*As)[DC + 1],
                                         float (*Bs)[DC + 1], float pd_out[4][4], float ds_out[4][4]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  float s[4][4], dp[4][4];
  abt_tile<QK_PAD>(s, qh, q0, Lq, q_stride, kh, k0, Lk, k_stride, QK_DIM, As, Bs);
  abt_tile<V_PAD>(dp, doh, q0, Lq, o_stride, vh, k0, Lk, v_stride, V_DIM, As, Bs);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int rl = ty + 16 * i, r = q0 + rl;
    const float l = r < Lq ? lse_h[qs + r] : POS_INF;
    const float dr = r < Lq ? dr_h[qs + r] : 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int cl = tx + 16 * j, c = k0 + cl;
      float p = 0.f, pd = 0.f, ds = 0.f;
      if (visible(r, c, Lq, Lk, causal) && l != POS_INF) {
        p = __expf(s[i][j] * scale - l);
        float z = 1.f;
        if (drop_threshold) z = dropout_keep(seed, head, qs + r, ks + c, drop_threshold) ? inv_keep : 0.f;
        pd = p * z;
        ds = p * (dp[i][j] * z - dr);
      }
      pd_out[i][j] = pd;
      ds_out[i][j] = ds;
    }
  }
}

// Ms[ty + 16 i][tx + 16 j] = x[i][j]. Callers write only after an mm_tile / abt_tile (which end with a
// barrier), and the next mm_tile's first barrier makes the writes visible.
__device__ __forceinline__ void store_tile(float (*Ms)[BN + 1], const float x[4][4]) {
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) Ms[ty + 16 * i][tx + 16 * j] = x[i][j];
}

extern "C" __global__ void __launch_bounds__(NT)
prefill_bwd_dkdv(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
                 const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dr,
                 const int* __restrict__ cu_q, const int* __restrict__ cu_k, float* __restrict__ dk_h,
                 float* __restrict__ dv_h, int H, int H_K, int total_q, float scale, int causal, u32 seed,
                 u32 drop_threshold, float inv_keep) {
  // dk_h [total_k, H, QK_DIM], dv_h [total_k, H, V_DIM]: per query head (GQA sums happen outside)
  __shared__ float As[64][DC + 1], Bs[64][DC + 1];
  __shared__ float Ms[BM][BN + 1];  // Pd, then dS
  const int b = blockIdx.z, head = blockIdx.y, kvh = head / (H / H_K);
  const int qs = cu_q[b], Lq = cu_q[b + 1] - qs, ks = cu_k[b], Lk = cu_k[b + 1] - ks;
  const int k0 = blockIdx.x * BN;
  if (k0 >= Lk) return;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const long q_stride = (long)H * QK_DIM, k_stride = (long)H_K * QK_DIM, v_stride = (long)H_K * V_DIM,
             o_stride = (long)H * V_DIM;
  const elem_t* qh = q + (long)qs * q_stride + (long)head * QK_DIM;
  const elem_t* kh = k + (long)ks * k_stride + (long)kvh * QK_DIM;
  const elem_t* vh = v + (long)ks * v_stride + (long)kvh * V_DIM;
  const elem_t* doh = dout + (long)qs * o_stride + (long)head * V_DIM;
  const float* lse_h = lse + (long)head * total_q;
  const float* dr_h = dr + (long)head * total_q;
  float dk[4][QK_PAD / 16], dv[4][V_PAD / 16];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < QK_PAD / 16; ++j) dk[i][j] = 0.f;
#pragma unroll
    for (int j = 0; j < V_PAD / 16; ++j) dv[i][j] = 0.f;
  }
  // causal: query row r sees key c iff c <= r + Lk - Lq, so rows below k0 - (Lk - Lq) see nothing here
  int q_begin = 0;
  if (causal) q_begin = max(0, (k0 - (Lk - Lq)) / BM * BM);
  for (int q0 = q_begin; q0 < Lq; q0 += BM) {
    float pd[4][4], ds[4][4];
    bwd_tile(qh, kh, vh, doh, lse_h, dr_h, qs, ks, q0, k0, Lq, Lk, q_stride, k_stride, v_stride, o_stride,
             scale, causal, head, seed, drop_threshold, inv_keep, As, Bs, pd, ds);
    store_tile(Ms, pd);
    mm_tile<V_PAD, true>(dv, Ms, doh, q0, Lq, o_stride, V_DIM, As);    // dV += Pd^T dO
    store_tile(Ms, ds);                                                // (mm_tile ended with a barrier)
    mm_tile<QK_PAD, true>(dk, Ms, qh, q0, Lq, q_stride, QK_DIM, As);   // dK += dS^T Q (scale below)
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = k0 + ty + 16 * i;
    if (r >= Lk) continue;
    float* dkr = dk_h + ((long)(ks + r) * H + head) * QK_DIM;
    float* dvr = dv_h + ((long)(ks + r) * H + head) * V_DIM;
#pragma unroll
    for (int j = 0; j < QK_PAD / 16; ++j) {
      const int c = (j / 2) * DC + (j % 2) * 16 + tx;
      if (c < QK_DIM) dkr[c] = dk[i][j] * scale;
    }
#pragma unroll
    for (int j = 0; j < V_PAD / 16; ++j) {
      const int c = (j / 2) * DC + (j % 2) * 16 + tx;
      if (c < V_DIM) dvr[c] = dv[i][j];
    }
  }
}

extern "C" __global__ void __launch_bounds__(NT)
prefill_bwd_dq(const elem_t* __restrict__ q, const elem_t* __restrict__ k, const elem_t* __restrict__ v,
               const elem_t* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ dr,
               const int* __restrict__ cu_q, const int* __restrict__ cu_k, elem_t* __restrict__ dq, int H,
               int H_K, int total_q, float scale, int causal, u32 seed, u32 drop_threshold, float inv_keep) {
  __shared__ float As[64][DC + 1], Bs[64][DC + 1];
  __shared__ float Ms[BM][BN + 1];  // Pd, then dS
  const int b = blockIdx.z, head = blockIdx.y, kvh = head / (H / H_K);
  const int qs = cu_q[b], Lq = cu_q[b + 1] - qs, ks = cu_k[b], Lk = cu_k[b + 1] - ks;
  const int q0 = blockIdx.x * BM;
  if (q0 >= Lq) return;
  const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
  const long q_stride = (long)H * QK_DIM, k_stride = (long)H_K * QK_DIM, v_stride = (long)H_K * V_DIM,
             o_stride = (long)H * V_DIM;
  const elem_t* qh = q + (long)qs * q_stride + (long)head * QK_DIM;
  const elem_t* kh = k + (long)ks * k_stride + (long)kvh * QK_DIM;
  const elem_t* vh = v + (long)ks * v_stride + (long)kvh * V_DIM;
  const elem_t* doh = dout + (long)qs * o_stride + (long)head * V_DIM;
  const float* lse_h = lse + (long)head * total_q;
  const float* dr_h = dr + (long)head * total_q;
  float acc[4][QK_PAD / 16];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < QK_PAD / 16; ++j) acc[i][j] = 0.f;
  int k_end = Lk;
  if (causal) k_end = min(Lk, max(0, min(q0 + BM, Lq) - 1 + Lk - Lq + 1));
  for (int k0 = 0; k0 < k_end; k0 += BN) {
    float pd[4][4], ds[4][4];
    bwd_tile(qh, kh, vh, doh, lse_h, dr_h, qs, ks, q0, k0, Lq, Lk, q_stride, k_stride, v_stride, o_stride,
             scale, causal, head, seed, drop_threshold, inv_keep, As, Bs, pd, ds);
    store_tile(Ms, ds);
    mm_tile<QK_PAD, false>(acc, Ms, kh, k0, Lk, k_stride, QK_DIM, As);  // dQ += dS K (scale below)
  }
  elem_t* dqh = dq + (long)qs * q_stride + (long)head * QK_DIM;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = q0 + ty + 16 * i;
    if (r >= Lq) continue;
#pragma unroll
    for (int j = 0; j < QK_PAD / 16; ++j) {
      const int c = (j / 2) * DC + (j % 2) * 16 + tx;
      if (c < QK_DIM) dqh[(long)r * q_stride + c] = from_f(acc[i][j] * scale);
    }
  }
}
