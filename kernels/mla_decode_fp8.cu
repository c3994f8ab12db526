// mla_decode_fp8.cu -- MLA decode over an FP8 paged KV cache (FlashMLA's 656-byte "FP8 with scale"
// tokens), split-KV partials (sm_80+). Also the body of the sparse (DSA) decode: mla_decode_sparse.cu
// sets MLA_SPARSE=1 and includes this file. Issue #5; launched by mla/backends/cupy_sparse_fp8.py.
// STATUS: verified on an H100 2026-11-25: tests/test_cupy_fp8_sparse_gpu.py 95 passed,
// compute-sanitizer memcheck + racecheck passed.
//
// What it computes: mla_decode_portable.cu's partials (mla/reference.py `split_partials`, fused with
// the final normalisation when a sequence has a single split), with the keys
//   dense  (MLA_SPARSE=0): logical positions [start, stop) of sequence i through the block table
//                          (FP8 cache only: the bf16 dense case is mla_decode_portable.cu);
//   sparse (MLA_SPARSE=1): the token rows indices[i, r, p] for list positions p in [start, stop) of
//                          query row r (physical position = block * page + offset, -1 = invalid);
//                          positions >= topk_length[i] are invalid too. The plan splits the list
//                          positions 0..topk (L_i = topk for every sequence); no causal mask.
//   Invalid / past-the-end keys are zero-filled by cp.async (never read) and masked to -inf.
//   A sequence with one split writes out / lse directly, unless force_partials (the backend sets it
//   with attn_sink: the sink is applied by mla_combine_sink in mla_decode_sparse.cu, for every
//   sequence; computing it here pushed the 64-row tiling into register spills).
//
// FP8 token (mla/fp8.py): bytes [0, 512) e4m3 codes, [512, 528) 4 fp32 scales (one per 128 channels,
//   powers of two), [528, 656) 64 bf16 RoPE values. Pipeline per key tile of BLOCK_N tokens:
//     load     cp.async of the raw 656-byte rows (41 x 16 B) into one of STAGES raw buffers,
//              STAGES - 1 tiles ahead of the math (raw rows are 57% of a bf16 row: 3 stages fit);
//     dequant  all threads: raw tile -> one bf16 K tile in smem, 8 codes a work item:
//              code byte b -> fp32 bits (b & 0x80) << 24 | (b & 0x7f) << 20, i.e. the code's
//              value * 2^-120 (exact; E = 0 codes become fp32 subnormals), times (scale * 2^120)
//              with a non-flushing mul.rn.f32 (= the reference's float(code) * scale, one rounding
//              of the same real number), packed to bf16 (exact: 4 significant bits); the RoPE
//              part is copied as is;
//     S, P, O  exactly as mla_decode_portable.cu (mma.sync m16n8k16, S through smem, online
//              softmax in base 2, P V as P_hi + P_lo for bf16).
//   Barriers per tile: A (raw tile t landed; every warp done with the previous tile's P V, so the
//   bf16 tile and S may be overwritten), B (bf16 tile written), C (S tile written). The raw buffer
//   refilled at the top of tile t is the one dequantised in tile t - 1, before its barrier B.
//   bf16 caches (sparse only, MLA_FP8=0): K rows go straight to STAGES bf16 buffers as in the
//   portable kernel (barriers: tile landed, S written, P V done).
//
// Grid: dense  (num_workers, h_kv, ceil(s_q * group / BLOCK_M)), rows m = (r, h) as in the portable
//       kernel; sparse (num_workers, h_kv, s_q * ceil(group / BLOCK_M)): a CTA owns one query row r
//       (its own index list) and BLOCK_M heads of KV head g. group = h_q / h_kv.
//
// Compile-time parameters (-D): MLA_SPARSE (0), MLA_FP8 (1), MLA_D / MLA_DV (576 / 512, fixed for
//   FP8), MLA_BLOCK_M, MLA_BLOCK_N, MLA_NWARPS, MLA_STAGES, MLA_FP16 (bf16 cache only), MLA_P_SPLIT.
//   Dynamic shared memory (bytes), mirrored in mla/backends/cupy_sparse_fp8.py `smem_bytes`:
//     FP8:  2 * KSTRIDE * (BLOCK_M + BLOCK_N) + STAGES * BLOCK_N * 656 + 4 * BLOCK_M * (BLOCK_N + 8)
//     bf16: 2 * KSTRIDE * (BLOCK_M + STAGES * BLOCK_N) + 4 * BLOCK_M * (BLOCK_N + 8)
//     sparse: + 4 * STAGES * BLOCK_N (valid flags of the key rows)
#include "mla_common.cuh"
#include "mla_fp8.cuh"

#ifndef MLA_SPARSE
#define MLA_SPARSE 0
#endif
#ifndef MLA_FP8
#define MLA_FP8 1
#endif
#ifndef MLA_D
#define MLA_D 576
#endif
#ifndef MLA_DV
#define MLA_DV 512
#endif
#ifndef MLA_BLOCK_M
#define MLA_BLOCK_M 16
#endif
#ifndef MLA_BLOCK_N
#define MLA_BLOCK_N 64
#endif
#ifndef MLA_NWARPS
#define MLA_NWARPS 8
#endif
#ifndef MLA_STAGES
#define MLA_STAGES (MLA_FP8 ? 3 : 2)
#endif
#ifndef MLA_P_SPLIT
#define MLA_P_SPLIT (!MLA_FP16)
#endif
#ifndef MLA_S_UNROLL
#define MLA_S_UNROLL 4  // k16 steps of Q K^T unrolled (fewer: fewer live fragments in the 64-row tiling)
#endif

#if !MLA_SPARSE && !MLA_FP8
#error "dense decode of a bf16/fp16 cache is mla_decode_portable.cu; this file needs MLA_FP8 or MLA_SPARSE"
#endif
#if MLA_FP8 && MLA_FP16
#error "the FP8 cache's RoPE part is bf16: FP8 decode computes in bf16 (MLA_FP16=0)"
#endif

#if MLA_SPARSE
#define MLA_KERNEL_NAME mla_decode_sparse
#else
#define MLA_KERNEL_NAME mla_decode_fp8
#endif

constexpr int D = MLA_D, DV = MLA_DV;
constexpr int BLOCK_M = MLA_BLOCK_M, BLOCK_N = MLA_BLOCK_N, NWARPS = MLA_NWARPS, STAGES = MLA_STAGES;
constexpr int NTHREADS = NWARPS * 32;
// warp (rg, cg) layout, padded sizes and smem strides: MlaWarpTiling (mla_common.cuh, with its checks)
using Tiling = MlaWarpTiling<D, DV, BLOCK_M, BLOCK_N, NWARPS>;
constexpr int RG = Tiling::RG, CG = Tiling::CG, D_PAD = Tiling::D_PAD, DV_PAD = Tiling::DV_PAD, NT = Tiling::NT;
constexpr int SN = Tiling::SN, SNT = Tiling::SNT, KSTRIDE = Tiling::KSTRIDE, SSTRIDE = Tiling::SSTRIDE;
constexpr int KROWS_PER_WARP = BLOCK_N / NWARPS;

constexpr int ROW_BYTES = MLA_FP8 ? FP8_BYTES : D * 2;  // one token of one KV head in global memory
constexpr int ROW_CHUNKS = ROW_BYTES / 16;             // 41 (FP8) or D / 8
constexpr int DQ_ITEMS = FP8_NOPE / 8 + (D - FP8_NOPE) / 8;  // dequant work items a token: 64 + 8

static_assert(BLOCK_N % (2 * NWARPS) == 0, "each warp loads BLOCK_N / NWARPS key rows, two at a time");
static_assert(STAGES >= 2, "at least double buffering");
#if MLA_FP8
static_assert(D == 576 && DV == 512, "the FP8 layout is DeepSeek's: d = 576, d_v = 512");
static_assert(ROW_BYTES % 16 == 0 && (2 * KSTRIDE) % 16 == 0, "16-byte aligned smem rows");
#endif

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
MLA_KERNEL_NAME(const mla_elem_t* __restrict__ q, const unsigned char* __restrict__ k_cache,
                const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                const int* __restrict__ indices, int topk, const int* __restrict__ topk_length,
                int num_tokens, int force_partials,
                const int* __restrict__ sched, const int* __restrict__ num_splits,
                float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2,
                int causal) {
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);  // [BLOCK_M][KSTRIDE]
  mla_elem_t* sK = sQ + BLOCK_M * KSTRIDE;                   // FP8: [BLOCK_N][KSTRIDE]; bf16: [STAGES][..]
#if MLA_FP8
  unsigned char* sRaw = reinterpret_cast<unsigned char*>(sK + BLOCK_N * KSTRIDE);  // [STAGES][BLOCK_N][656]
  float* sS = reinterpret_cast<float*>(sRaw + STAGES * BLOCK_N * ROW_BYTES);      // [BLOCK_M][SSTRIDE]
#else
  float* sS = reinterpret_cast<float*>(sK + STAGES * BLOCK_N * KSTRIDE);
#endif
#if MLA_SPARSE
  int* sFlag = reinterpret_cast<int*>(sS + BLOCK_M * SSTRIDE);  // [STAGES][BLOCK_N]: key row valid
#endif

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rg = warp % RG, cg = warp / RG;
  const int g = blockIdx.y;
  const int group = h_q / h_kv;
  const int r0 = lane >> 2, c2 = (lane & 3) * 2;
#if MLA_SPARSE
  const int head_tiles = (group + BLOCK_M - 1) / BLOCK_M;
  const int rq = blockIdx.z / head_tiles, qt = blockIdx.z % head_tiles;
  const int M = group;  // rows of this CTA's query row rq: heads g * group + m
#else
  const int qt = blockIdx.z;
  const int M = s_q * group;  // rows m = (r, h) = (m / group, g * group + m % group)
#endif

  // zero the bf16 tiles once: pad columns (D .. KSTRIDE) are never written again
  for (int idx = tid; idx < (BLOCK_M + (MLA_FP8 ? 1 : STAGES) * BLOCK_N) * KSTRIDE / 8; idx += NTHREADS)
    reinterpret_cast<uint4*>(sQ)[idx] = make_uint4(0, 0, 0, 0);
  __syncthreads();

  const MlaWork work = mla_work(sched, blockIdx.x);

  for (int i = work.begin_b; i <= work.end_b; ++i) {
#if MLA_SPARSE
    const int L = topk;  // the plan splits the index list
#else
    const int L = seqlens[i];
#endif
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    int stop_eff = stop;
#if MLA_SPARSE
    if (topk_length != nullptr) stop_eff = min(stop, topk_length[i]);  // later entries never count
#else
    if (causal) {
      int r_max = min(s_q - 1, (qt * BLOCK_M + BLOCK_M - 1) / group);
      stop_eff = min(stop, L - s_q + r_max + 1);
    }
#endif
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;

    const int m0 = qt * BLOCK_M + rg * 16 + r0, m1 = m0 + 8;
#if !MLA_SPARSE
    int lim0 = stop - 1, lim1 = stop - 1;
    if (causal) {
      lim0 = min(lim0, L - s_q + m0 / group);
      lim1 = min(lim1, L - s_q + m1 / group);
    }
#endif

    float o_acc[NT][4];
    mla_zero_frags(o_acc);
    float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_run0 = 0.f, l_run1 = 0.f;

    if (n_tiles > 0) {
      // Q tile; rows >= M zero-filled
      for (int mr = warp; mr < BLOCK_M; mr += NWARPS) {
        const int m = qt * BLOCK_M + mr;
        const bool valid = m < M;
        const mla_elem_t* src = q;
#if MLA_SPARSE
        if (valid) src = q + ((long long)(i * s_q + rq) * h_q + g * group + m) * D;
#else
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D;
#endif
        for (int c = lane; c < D / 8; c += 32) cp_async16(sQ + mr * KSTRIDE + c * 8, src + c * 8, valid);
      }
      // key rows of tile `tile` into buffer `buf`: each half-warp copies one row (16-byte chunks)
      auto load_k = [&](int tile, int buf) {
        const int pos0 = start + tile * BLOCK_N;
        const int half = lane >> 4, hl = lane & 15;
#pragma unroll
        for (int k = 0; k < KROWS_PER_WARP; k += 2) {
          const int n = warp + (k + half) * NWARPS, pos = pos0 + n;
          bool valid = pos < stop_eff;
          long long tok = 0;  // token row (block * page + offset)
#if MLA_SPARSE
          if (valid) {
            tok = __ldg(indices + ((long long)i * s_q + rq) * topk + pos);
            valid = tok >= 0 && tok < num_tokens;  // -1 (and anything out of range) is never read
          }
          if (hl == 0) sFlag[buf * BLOCK_N + n] = valid;
#else
          if (valid) tok = (long long)block_table[(long long)i * bt_stride + pos / page] * page + pos % page;
#endif
          const unsigned char* src = k_cache;
          if (valid) src = k_cache + (tok * h_kv + g) * (long long)ROW_BYTES;
#if MLA_FP8
          unsigned char* dst = sRaw + (buf * BLOCK_N + n) * ROW_BYTES;
          for (int c = hl; c < ROW_CHUNKS; c += 16) cp_async16(dst + c * 16, src + c * 16, valid);
#else
          mla_elem_t* dst = sK + (buf * BLOCK_N + n) * KSTRIDE;
          for (int c = hl; c < ROW_CHUNKS; c += 16) cp_async16(dst + c * 8, src + c * 16, valid);
#endif
        }
      };
#pragma unroll
      for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_tiles) load_k(s, s);
        cp_async_commit();
      }

      for (int t = 0; t < n_tiles; ++t) {
        {
          const int tn = t + STAGES - 1;
          if (tn < n_tiles) load_k(tn, tn % STAGES);
          cp_async_commit();
        }
        cp_async_wait<STAGES - 1>();
        __syncthreads();  // A: tile t (and Q) landed; every warp is done with tile t - 1
        const int buf = t % STAGES;
#if MLA_FP8
        {
          // ---- dequantise raw tile -> sK (bf16)
          const unsigned char* raw = sRaw + buf * BLOCK_N * ROW_BYTES;
          for (int idx = tid; idx < BLOCK_N * DQ_ITEMS; idx += NTHREADS) {
            const int n = idx / DQ_ITEMS, c = idx - n * DQ_ITEMS;
            const unsigned char* rrow = raw + n * ROW_BYTES;
            uint4 v;
            if (c < FP8_NOPE / 8) {
              const uint2 codes = *reinterpret_cast<const uint2*>(rrow + c * 8);
              const float scale = *reinterpret_cast<const float*>(rrow + FP8_SCALES_AT + (c >> 4) * 4);
              v = dequant8(codes, scale);
            } else {
              v = *reinterpret_cast<const uint4*>(rrow + FP8_ROPE_AT + (c - FP8_NOPE / 8) * 16);
            }
            *reinterpret_cast<uint4*>(sK + n * KSTRIDE + c * 8) = v;
          }
        }
        __syncthreads();  // B: the bf16 tile is complete
        const mla_elem_t* kt = sK;
#else
        const mla_elem_t* kt = sK + buf * BLOCK_N * KSTRIDE;
#endif
        const int pos0 = start + t * BLOCK_N;

        // ---- S = Q K^T for 16 rows x SN keys of this warp
        {
          float s_acc[SNT][4];
          const u32 a_base = smem_u32(sQ + (rg * 16 + (lane & 15)) * KSTRIDE + (lane >> 4) * 8);
          const u32 b_base = smem_u32(kt + (cg * SN + (lane & 7)) * KSTRIDE + ((lane >> 3) & 1) * 8);
          mla_warp_qk<D_PAD, KSTRIDE, SNT, MLA_S_UNROLL>(s_acc, a_base, b_base);
          float* s_row0 = sS + (rg * 16 + r0) * SSTRIDE;
          float* s_row1 = s_row0 + 8 * SSTRIDE;
#pragma unroll
          for (int j = 0; j < SNT; ++j) {
            const int n = cg * SN + j * 8 + c2;
#if MLA_SPARSE
            const int2 ok = *reinterpret_cast<const int2*>(sFlag + buf * BLOCK_N + n);  // n even
            const bool v00 = ok.x != 0, v01 = ok.y != 0, v10 = v00, v11 = v01;
#else
            const int pos = pos0 + n;
            const bool v00 = pos <= lim0, v01 = pos + 1 <= lim0, v10 = pos <= lim1, v11 = pos + 1 <= lim1;
#endif
            float2 x0, x1;
            x0.x = v00 ? s_acc[j][0] * scale_log2 : MLA_NEG_INF;
            x0.y = v01 ? s_acc[j][1] * scale_log2 : MLA_NEG_INF;
            x1.x = v10 ? s_acc[j][2] * scale_log2 : MLA_NEG_INF;
            x1.y = v11 ? s_acc[j][3] * scale_log2 : MLA_NEG_INF;
            *reinterpret_cast<float2*>(s_row0 + n) = x0;
            *reinterpret_cast<float2*>(s_row1 + n) = x1;
          }
          (void)pos0;
        }
        __syncthreads();  // C: the full S tile is in smem

        // ---- online softmax (base 2) over the tile's BLOCK_N keys, then O += P V
        {
          const float* s_row0 = sS + (rg * 16 + r0) * SSTRIDE;
          const u32 v_base = smem_u32(kt + ((lane & 7) + ((lane >> 3) & 1) * 8) * KSTRIDE + cg * (NT * 8) +
                                      (lane >> 4) * 8);
          mla_softmax_pv<BLOCK_N, SSTRIDE, KSTRIDE, NT, MLA_P_SPLIT>(o_acc, m_run0, m_run1, l_run0, l_run1, s_row0,
                                                                    v_base, c2);
        }
#if !MLA_FP8
        __syncthreads();  // sS and this K buffer may now be overwritten (FP8: barrier A of the next tile)
#endif
      }
    }

    // ---- finish the piece: o / l, lse = (m + log2 l) ln 2; the 4 lanes of a quad share a row
    l_run0 = mla_quad_sum(l_run0);
    l_run1 = mla_quad_sum(l_run1);
    const float inv0 = l_run0 > 0.f ? 1.f / l_run0 : 0.f, inv1 = l_run1 > 0.f ? 1.f / l_run1 : 0.f;
    const float lse0 = mla_row_lse(m_run0, l_run0), lse1 = mla_row_lse(m_run1, l_run1);
    const bool direct = nsplit == 1 && !force_partials;
    const int p = lo + split;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = half ? m1 : m0;
      if (m >= M) continue;
#if MLA_SPARSE
      const int r = rq, h = g * group + m;
#else
      const int r = m / group, h = g * group + m % group;
#endif
      const float inv = half ? inv1 : inv0, lse_v = half ? lse1 : lse0;
      const long long orow = direct ? ((long long)(i * s_q + r) * h_q + h) * DV
                                    : ((long long)(p * s_q + r) * h_q + h) * DV;
      if (half == 0) mla_store_o_row<0, NT, DV>(o_acc, inv, direct, out, o_part, orow, cg * (NT * 8), c2);
      else mla_store_o_row<1, NT, DV>(o_acc, inv, direct, out, o_part, orow, cg * (NT * 8), c2);
      if (cg == 0 && (lane & 3) == 0) {
        mla_store_lse(lse_out, lse_part, direct, i, p, r, h, s_q, h_q, lse_v);
      }
    }
  }
}
