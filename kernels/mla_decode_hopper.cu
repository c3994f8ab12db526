// mla_decode_hopper.cu -- MLA decode over a paged KV cache on Hopper (sm_90a): wgmma + cp.async.
//
// STATUS: verified on an H100 (tests/test_cupy_gpu.py with every build forced, tests/test_cupy_fp8_sparse_gpu.py
// for the FP8 / sparse builds, compute-sanitizer memcheck + racecheck; benchmarks/BENCHMARKS.md, 2026-11-26).
// backend="cupy" takes it above 32 query rows a KV head on compute capability 9.0 (mla/backends/cupy_hopper.py),
// its sparse build for sparse problems with h_q / h_kv % 64 == 0 (cupy_sparse_fp8.py).
//
// What it computes: exactly what kernels/mla_decode_portable.cu computes (mla/reference.py is the spec),
// for d = 576, d_v = 512 (any page size, h_kv, s_q, h_q): for each piece (sequence i, keys [start, stop),
// partial p) of the scheduler plan and each query row m = (r, h) of KV head g (rows [s_q][h_q / h_kv]):
//     s_j = softmax_scale * q[i, r, h] . k[i, j, g]      j < stop; causal: j <= L - s_q + r
//     o_p = sum_j exp(s_j - m) v_j / l,   lse_p = m + log l                 (V = first 512 channels of K)
// Single-split sequences write out (q's dtype) and lse (empty: out 0, lse +inf) directly (unless
// force_partials: out_dtype=float32, every piece goes through mla_combine); otherwise o_p
// (fp32) / lse_p (-inf when empty) go to the partial buffers for kernels/mla_combine.cu. Same signature,
// grid (num_workers, h_kv, ceil(M / 64)) and partial layout as the portable kernel.
//
// Tiling (FlashMLA's split of the output, see docs/20250422-new-kernel-deep-dive.md there): a CTA of two
// warpgroups (256 threads) owns 64 query rows (padded: rows >= M are zero and never written) and walks
// the piece's keys in tiles of 64. The 64 x 512 fp32 O accumulator is split by columns: warpgroup w owns
// O[:, 256 w .. 256 w + 255] (128 registers a thread). Per key tile:
//   load   cp.async of the next tile's 64 rows (576 channels, through the block table, into the 128-byte
//          swizzled layout of mla_wgmma.cuh since 2026-11-26: whole-line copies; rows past the
//          piece zero-filled, never read) into the other of two K buffers, issued before waiting on this
//          tile; every copying thread fences the async proxy before the barrier (wgmma reads smem there);
//   S      warpgroup w: S[:, 32 w .. 32 w + 31] = Q K^T, 36 x wgmma m64n32k16 (A = Q, B = K tile, both
//          K-major in smem); the halves are swapped through an 8 KB buffer with two named barriers, so
//          both warpgroups hold the whole 64 x 64 S tile in registers, bit-identical (mla_wgmma.cuh);
//   P      scale by softmax_scale * log2(e), mask (-inf), online softmax in fp32 base 2 (running max m and
//          sum l per row, identical in both warpgroups), P = 2^(s - m) packed in registers straight
//          into the wgmma A fragments (the S accumulator layout is the A layout, no shuffles);
//   O      O = alpha O + P V: 4 x wgmma m64n256k16 with A = P from registers and B = the same K tile's
//          first 512 channels, read N-major (imm-trans-b = 1, channels contiguous in a core matrix).
//          bf16 P is rounded once, as FlashMLA does (meets DESIGN §6 on FlashMLA's inputs: docs/decisions.md,
//          ninth session); MLA_P_SPLIT=1 (MLA_CUPY_PSPLIT=1) multiplies P = P_hi + P_lo, 8 wgmma, 10x more precise.
//   Barriers a tile: one CTA barrier (tile landed), the two exchange barriers, one CTA barrier (both
//   warpgroups done with the K buffer before the load at the top of the next tile refills it).
//
// Shared memory (dynamic, mirrored in mla/backends/cupy_hopper.py): Q tile 73728 B + 2 K tiles 147456 B
//   + exchange 8192 B = 229376 B (H100 opt-in limit 232448), the FP8 build too; sparse: + valid flags (2 x 64
//   ints; FP8: 4 x 64). Layouts: mla_wgmma.cuh (Q: no swizzle, 8 x 16 B core matrices; K: 128-byte swizzle).
//
// Compile-time parameters (-D): MLA_FP16 (0 = bf16), MLA_P_SPLIT (default 0: bf16 P rounded once, as
//   FlashMLA; 1: P_hi + P_lo). MLA_D / MLA_DV are fixed at 576 / 512 (static_assert).
//
// Versions (benchmarks/NOTES_cupy.md):
//   v1 cp.async double buffer, S split over the warpgroups by keys + register exchange, P V from registers,
//      unswizzled tiles: 3.17 ms (184 TFLOP/s) at 128,2,128,8192 on the H100.
//   v2 (this file) 128-byte swizzled K tiles, whole-line copies: 1.92-1.98 ms (295-304 TFLOP/s). Limits left:
//      the warpgroups run in lock step (no softmax / wgmma overlap as in FlashMLA's seesaw schedule), the
//      bf16 P split doubles P V (caps it near 670 TFLOP/s).
//   FP8 v2 (2026-11-26): register stages, dequantisation under the wgmma batches (see FP8 below): dense FP8
//      128,2,128,8192 3.19 -> 2.12-2.16 ms, sparse FP8 128,2,128, topk 2048 0.880 -> 0.617-0.621 ms;
//      with the prmt dequantisation (mla_fp8.cuh, fourth session) 2.05-2.11 ms and 0.587-0.604 ms.
#include "mla_common.cuh"
#include "mla_wgmma.cuh"

#ifndef MLA_D
#define MLA_D 576
#endif
#ifndef MLA_DV
#define MLA_DV 512
#endif
#ifndef MLA_P_SPLIT  // bf16 P rounded once, FlashMLA's numerics (2026-11-26, ninth session: docs/decisions.md)
#define MLA_P_SPLIT 0
#endif
#ifndef MLA_FP8
#define MLA_FP8 0
#endif
#ifndef MLA_ALPHA_SKIP  // skip O *= alpha when a warp's alphas are all 1 (exact either way). Timed on the H100
#define MLA_ALPHA_SKIP MLA_FP8  // (2026-11-26): FP8 builds 4% faster, bf16 builds 3-4% slower
#endif
#ifndef MLA_SPARSE
#define MLA_SPARSE 0
#endif
#if MLA_FP8 && MLA_FP16
#error "the FP8 cache's RoPE part is bf16: MLA_FP8 needs bf16 (MLA_FP16=0)"
#endif

constexpr int D = MLA_D, DV = MLA_DV;
constexpr int BLOCK_M = 64, BLOCK_N = 64, NTHREADS = 256;
constexpr int KSTEPS = D / 16;           // k-steps of S = Q K^T
constexpr int TILE_EL = BLOCK_N * D;     // elements of a Q or K tile
constexpr bool P_SPLIT = MLA_P_SPLIT;
static_assert(D == 576 && DV == 512, "the Hopper kernel is specialised for d = 576, d_v = 512");
static_assert(BLOCK_M == WG_TILE_ROWS && BLOCK_N == WG_TILE_ROWS, "tiles are 64 rows");
// FP8 cache (-DMLA_FP8=1, FlashMLA's 656-byte tokens, kernels/mla_fp8.cuh): the two bf16 K tiles of the
// bf16 build, and the raw rows of the next tile wait in registers, half a tile at a time (mla_wgmma.cuh,
// "register stages"): while tile t's S wgmma runs, every warp dequantises half a of tile t + 1 into the other
// buffer and loads half b; while its P V wgmma runs, half b is dequantised and half a of tile t + 2 loaded.
// The RoPE channels are copied (cp.async) straight into the bf16 tile. (v1: one bf16 tile and a raw one,
// dequantised at the top of each tile with the tensor cores idle.)
constexpr bool FP8 = MLA_FP8;
// Sparse decode (-DMLA_SPARSE=1, DeepSeek-V3.2's DSA; kernel mla_decode_hopper_sparse with the signature of
// kernels/mla_decode_sparse.cu, which the launcher swaps it for): the keys of query row r are the token rows
// indices[i, r, p] for list positions p in [start, stop) of the plan (L = topk; p >= topk_length[i] and
// indices outside [0, num_tokens) are invalid: zero-filled, never read, masked by a per-key flag); no causal
// mask. Needs h_q / h_kv % 64 == 0, so that the 64 rows of a CTA are heads of one query token.
constexpr bool SPARSE = MLA_SPARSE;
// valid flags of the key rows, [FLAG_SLOTS][BLOCK_N]: tile t in slot t % FLAG_SLOTS (FP8: written two tiles
// ahead, while another warp may still read the flags of the tile before)
constexpr int FLAG_SLOTS = FP8 ? 4 : 2;
constexpr int FLAG_BYTES = SPARSE ? FLAG_SLOTS * BLOCK_N * 4 : 0;
constexpr int SMEM_BYTES = 2 * 3 * TILE_EL + 4 * WG_XCHG_FLOATS + FLAG_BYTES;
static_assert(SMEM_BYTES == 229376 + FLAG_BYTES, "mirrored in cupy_hopper.py (wide_smem_bytes)");

// One parameter list for both builds: kernels/mla_decode_sparse.cu's (the dense build ignores indices,
// topk, topk_length, num_tokens; mla/backends/cupy_hopper.py `assemble` orders the dense arguments so).
#if MLA_SPARSE
#define MLA_HOPPER_KERNEL mla_decode_hopper_sparse
#else
#define MLA_HOPPER_KERNEL mla_decode_hopper
#endif
extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
MLA_HOPPER_KERNEL(const mla_elem_t* __restrict__ q, const void* __restrict__ k_cache_v,
                  const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                  const int* __restrict__ indices, int topk, const int* __restrict__ topk_length, int num_tokens,
                  int force_partials, const int* __restrict__ sched, const int* __restrict__ num_splits,
                  float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                  float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2, int causal) {
#if MLA_HAS_WGMMA
  extern __shared__ __align__(128) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);   // [TILE_EL]
  mla_elem_t* sK = sQ + TILE_EL;                               // [2][TILE_EL]: tile t in buffer t % 2
  float* sX = reinterpret_cast<float*>(sK + 2 * TILE_EL);      // [WG_XCHG_FLOATS]
  int* sFlag = reinterpret_cast<int*>(sX + WG_XCHG_FLOATS);    // sparse: [FLAG_SLOTS][BLOCK_N]
  const u32 sQ_addr = smem_u32(sQ), sK_addr = smem_u32(sK);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = tid >> 7, t = tid & 127;                      // warpgroup, thread in it
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int ld_row = wg_copy_row(tid);                         // the Q tile row this thread copies
  const int k_row = sw128_copy_row(tid);                       // the K tile rows it copies: k_row, k_row + 32
  const int c2 = 2 * (lane & 3);
  // this thread's two accumulator rows (wg_acc_row(t, 0) and + 8), as query rows of the problem
  const int m0 = qt * BLOCK_M + wg_acc_row(t, 0), m1 = m0 + 8;

  if (sK_addr & 1023) __trap();  // the SW128 K buffers must be 1024-byte aligned (see mla_wgmma.cuh)
  const MlaWork work = mla_work(sched, blockIdx.x);

  for (int i = work.begin_b; i <= work.end_b; ++i) {
#if MLA_SPARSE
    const int L = topk;  // the plan splits the index list
    const int rq = (qt * BLOCK_M) / group;  // this CTA's query token (its 64 rows are heads of it)
#else
    const int L = seqlens[i];
#endif
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop, split = pc.split, lo = pc.lo, nsplit = pc.nsplit;
    // causal: no row of this CTA sees keys past L - s_q + r_max, so later tiles are skipped
    int stop_eff = stop;
#if MLA_SPARSE
    if (topk_length != nullptr) stop_eff = min(stop, topk_length[i]);  // later entries never count
    if (false) {
#else
    if (causal) {
#endif
      const int r_max = min(s_q - 1, (qt * BLOCK_M + BLOCK_M - 1) / group);
      stop_eff = min(stop, L - s_q + r_max + 1);
    }
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;
    int lim0 = stop - 1, lim1 = stop - 1;  // last key rows m0 / m1 see
    if (causal && !SPARSE) {
      lim0 = min(lim0, L - s_q + m0 / group);
      lim1 = min(lim1, L - s_q + m1 / group);
    }

    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.f;
    float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_run0 = 0.f, l_run1 = 0.f;

    if (n_tiles > 0) {
      // Q tile: rows m -> (r, h) = (m / group, g * group + m % group); rows >= M zero-filled
      {
        const int m = qt * BLOCK_M + ld_row;
        const bool valid = m < M;
        const mla_elem_t* src = q;
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D;
        wg_tile_load_row<D>(sQ, tid, src, valid);
      }
      // the token row (block * page + offset) of key position pos, or -1 when the key is invalid (past the
      // piece; sparse: a -1 / out-of-range index)
      auto token_of = [&](int pos) -> int {
        if (pos >= stop_eff) return -1;
#if MLA_SPARSE
        const int tok = indices[((long long)i * s_q + rq) * topk + pos];
        return tok >= 0 && tok < num_tokens ? tok : -1;
#else
        return block_table[(long long)i * bt_stride + pos / page] * page + pos % page;
#endif
      };
      // FP8: the block-table entry / index of row 8 warp + lane % 8 of key tile `tile` (-1 past the piece),
      // fetched without waiting for it; tok_of turns it into that row's token row (-1: invalid) where it is
      // used, and (sparse) records the row's valid flag
      auto fetch_raw = [&](int tile) {
        const int pos = start + tile * BLOCK_N + 8 * warp + (lane & 7);
#if MLA_SPARSE
        return ldg_nc_i32_or(indices + ((long long)i * s_q + rq) * topk + pos, pos < stop_eff, -1);
#else
        return ldg_nc_i32_or(block_table + (long long)i * bt_stride + pos / page, pos < stop_eff, -1);
#endif
      };
      auto tok_of = [&](int raw, int tile) {
#if MLA_SPARSE
        const int tok = raw >= 0 && raw < num_tokens ? raw : -1;
        if (lane < 8) sFlag[(tile % FLAG_SLOTS) * BLOCK_N + 8 * warp + lane] = tok >= 0;
        return tok;
#else
        return raw < 0 ? -1 : raw * page + (start + tile * BLOCK_N + 8 * warp + (lane & 7)) % page;
#endif
      };
      const unsigned char* kc8 = static_cast<const unsigned char*>(k_cache_v);
      auto kbuf = [&](int tile) { return reinterpret_cast<unsigned char*>(sK + (tile & 1) * TILE_EL); };
      // key tile `tile` of the piece -> K buffer `buf` (128-byte swizzled, mla_wgmma.cuh: a quarter-warp copies
      // one whole 128-byte line); this thread copies keys k_row and k_row + 32 of it
      auto load_k = [&](int tile, int buf) {
        const mla_elem_t* k_cache = static_cast<const mla_elem_t*>(k_cache_v);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int tok = token_of(start + tile * BLOCK_N + k_row + 32 * h);
          const bool valid = tok >= 0;
          const mla_elem_t* src = k_cache;
          if (valid) src = k_cache + ((long long)tok * h_kv + g) * (long long)D;
          sw128_tile_load_row<D>(reinterpret_cast<unsigned char*>(sK + buf * TILE_EL), k_row + 32 * h, tid, src,
                                 valid);
          if (SPARSE && (tid & 7) == 0) sFlag[(tile % FLAG_SLOTS) * BLOCK_N + k_row + 32 * h] = valid;
        }
      };
      // FP8: st holds half a of tile tt + 1 at the top of tile tt, tok the token rows of tile tt + 1, raw the
      // entries of tile tt + 2 (used a whole tile after they were fetched: their latency never shows)
      Fp8Half st;
      int tok = 0, raw = -1;
      if constexpr (FP8) {
        tok = tok_of(fetch_raw(0), 0);
        fp8_rope_copy(kbuf(0), kc8, tok, h_kv, g, warp, lane);
        cp_async_commit();  // group: Q + tile 0's RoPE channels
        // tile 0 straight through (its latency is exposed once a piece: both halves in flight together, the
        // second in a stage of its own), then half a of tile 1
        {
          Fp8Half st_b;
          fp8_half_load<0, false>(st, kc8, tok, h_kv, g, lane);
          fp8_half_load<1, false>(st_b, kc8, tok, h_kv, g, lane);
          fp8_half_store<0, false>(st, kbuf(0), warp, lane);
          fp8_half_store<1, false>(st_b, kbuf(0), warp, lane);
        }
        if (n_tiles > 1) {
          tok = tok_of(fetch_raw(1), 1);
          fp8_half_load<0, false>(st, kc8, tok, h_kv, g, lane);
        }
        if (n_tiles > 2) raw = fetch_raw(2);
      } else {
        load_k(0, 0);
        cp_async_commit();  // group: Q + tile 0
      }

      for (int tt = 0; tt < n_tiles; ++tt) {
        if constexpr (FP8) {
          // tile tt was dequantised into buffer tt % 2 during tile tt - 1 (complete and fenced at the barrier
          // that ends it), or before the loop:
          if (tt == 0) {
            cp_async_wait<0>();   // Q, tile 0's RoPE channels
            fence_proxy_async();  // visible to the tensor cores' (async proxy) reads ...
            __syncthreads();      // ... everyone's
          }
        } else {
          // the other buffer was last read by tile tt - 1, finished by both warpgroups (barrier at its end)
          if (tt + 1 < n_tiles) load_k(tt + 1, (tt + 1) & 1);
          cp_async_commit();
          cp_async_wait<1>();   // this thread's copies of tile tt (and Q) have landed ...
          fence_proxy_async();  // ... and are visible to the tensor cores' (async proxy) reads
          __syncthreads();      // everyone's copies of tile tt are in
        }
        const u32 kt = sK_addr + (tt & 1) * TILE_EL * 2;
        const int pos0 = start + tt * BLOCK_N;

        // ---- S = Q K^T (both warpgroups end with the whole tile, s[i] = S[acc_row][acc_col])
        float s[32];
        wg_scores<KSTEPS, true>(s, sQ_addr, kt, sX, wg, t, [&] {
          if constexpr (FP8) {
            // while the S wgmma runs: half a of tile tt + 1 -> the other buffer (last read by tile tt - 1,
            // finished by everyone: barrier at its end) with its RoPE channels, then half b into the registers
            if (tt + 1 < n_tiles) {
              fp8_half_store<0, false>(st, kbuf(tt + 1), warp, lane);
              fp8_rope_copy(kbuf(tt + 1), kc8, tok, h_kv, g, warp, lane);
              cp_async_commit();
              fp8_half_load<1, false>(st, kc8, tok, h_kv, g, lane);
            }
          }
        });

        // ---- scale to base 2, mask, running max:  m_new = max(m, max_k s_k),  alpha = 2^(m - m_new)
        // Most tiles need no mask (every key valid for every row of the warp: a warp-uniform test, 2 loads of
        // the flags instead of 32): the same values without the per-key tests.
        const int* flags = sFlag + (tt % FLAG_SLOTS) * BLOCK_N;
        const bool full = SPARSE ? __all_sync(0xffffffff, flags[lane] != 0 && flags[lane + 32] != 0)
                                 : __all_sync(0xffffffff, pos0 + BLOCK_N - 1 <= min(lim0, lim1));
        float mx0 = MLA_NEG_INF, mx1 = MLA_NEG_INF;
        auto scale_mask = [&](auto masked) {
#pragma unroll
          for (int k = 0; k < 32; ++k) {
            const int pos = pos0 + 8 * (k >> 2) + c2 + (k & 1);  // key of wg_acc_col(t, k)
            const bool second = (k >> 1) & 1;                    // row m1
            bool ok = true;
            if constexpr (decltype(masked)::value) ok = SPARSE ? flags[pos - pos0] != 0 : pos <= (second ? lim1 : lim0);
            const float v = ok ? s[k] * scale_log2 : MLA_NEG_INF;
            s[k] = v;
            if (second) mx1 = fmaxf(mx1, v);
            else mx0 = fmaxf(mx0, v);
          }
        };
        if (full) scale_mask(MlaBool<false>{});
        else scale_mask(MlaBool<true>{});
        // the 4 lanes of a quad hold the same two rows
        float mu0, mu1, alpha0, alpha1;  // quad max, running max, rescale factors
        mla_online_max(mx0, mx1, m_run0, m_run1, mu0, mu1, alpha0, alpha1);

        // ---- P = 2^(s - m_new),  l = alpha l + sum_k P_k,  o = alpha o (then + P V)
        l_run0 *= alpha0;
        l_run1 *= alpha1;
        wg_exp2_rowsum(s, mu0, mu1, l_run0, l_run1);
        // skipped when no row max of the warp moved (exact either way; MLA_ALPHA_SKIP)
        if (!MLA_ALPHA_SKIP || __any_sync(0xffffffff, alpha0 != 1.f || alpha1 != 1.f)) {
#pragma unroll
          for (int k = 0; k < 128; ++k) o[k] *= ((k >> 1) & 1) ? alpha1 : alpha0;
        }
        u32 p_hi[16], p_lo[16];
        wg_p_frags<P_SPLIT>(s, p_hi, p_lo);

        // ---- O[:, 256 wg ..] += P V (V = channels 256 wg .. 256 wg + 255 of this K tile)
        wg_pv_issue<P_SPLIT, true>(o, p_hi, p_lo, kt + wg * 4 * SW128_BLOCK_BYTES);
        if constexpr (FP8) {  // while it runs: half b of tile tt + 1 -> the other buffer, half a of tile tt + 2
          if (tt + 1 < n_tiles) {
            fp8_half_store<1, false>(st, kbuf(tt + 1), warp, lane);
            if (tt + 2 < n_tiles) {
              tok = tok_of(raw, tt + 2);
              fp8_half_load<0, false>(st, kc8, tok, h_kv, g, lane);
            }
            if (tt + 3 < n_tiles) raw = fetch_raw(tt + 3);
          }
        }
        wg_wait<0>();
        wg_fence_operands(o);
        if constexpr (FP8) {
          cp_async_wait<0>();   // the RoPE copies of tile tt + 1
          fence_proxy_async();  // this thread's part of tile tt + 1 -> visible to the tensor cores
        }
        __syncthreads();  // both warpgroups are done with this K buffer (and the exchange buffer); FP8: tile
                          // tt + 1 is complete
      }
    }

    // ---- finish the piece: o / l, lse = (m + log2 l) ln 2; the 4 lanes of a quad share a row
    l_run0 = mla_quad_sum(l_run0);
    l_run1 = mla_quad_sum(l_run1);
    const float inv0 = l_run0 > 0.f ? 1.f / l_run0 : 0.f, inv1 = l_run1 > 0.f ? 1.f / l_run1 : 0.f;
    const float lse0 = mla_row_lse(m_run0, l_run0), lse1 = mla_row_lse(m_run1, l_run1);
    wg_store_rows(o, inv0, inv1, lse0, lse1, m0, M, group, g, i, lo + split, s_q, h_q, nsplit == 1 && !force_partials,
                  wg, lane, out, o_part, lse_out, lse_part);
  }
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
