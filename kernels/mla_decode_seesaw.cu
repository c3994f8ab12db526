// mla_decode_seesaw.cu -- MLA decode over a paged KV cache on Hopper (sm_90a): FlashMLA's "seesaw" schedule.
//
// STATUS: verified on an H100 (2026-11-26, sixth session): tests/test_cupy_gpu.py (FlashMLA's matrix forced,
// "hopper-seesaw", and as "auto" picks it above 32 rows a KV head), compute-sanitizer memcheck + racecheck; the
// CPU emulator (tests/test_hopper_compile.py). backend="cupy" takes it above 32 query rows a KV head on
// compute capability 9.0 for dense bf16 / fp16 caches (mla/backends/cupy_hopper.py variant). Numbers:
// benchmarks/BENCHMARKS.md; versions and what did not work: benchmarks/NOTES_cupy.md (sixth session). Ninth session:
// bf16 P rounded once by default (FlashMLA's numerics, docs/decisions.md), P_A' stored before warpgroup 0's own P V:
// 128,2,128,8192 1.042 ms = 561 TFLOP/s kernels only (1.438 with the split, MLA_P_SPLIT=1).
//
// Two builds of the loads. cp.async (MLA_SEESAW_TMA=0), as described below: any page size. TMA build
// (MLA_SEESAW_TMA=1, the default where a tensor map can describe the cache: mla/backends/cupy_hopper.py
// seesaw_loads; seventh session, H100: the matrix forced "hopper-seesaw-tma", memcheck, the emulator with models
// of mbarriers and tensor copies; eighth session: racecheck clean): thread 0 of a warpgroup copies each
// 64-key x 64-channel piece of its buffer with one bulk tensor copy (tensor map: mla/backends/_tma.py) completing
// on the piece's mbarrier; the S wgmma wait piece by piece (in the order the refills go out), and a piece is
// refilled as soon as its last reader is done (buffer 0's blocks 1-3 after warpgroup 0's own P V, the rest after
// AFREE; buffer 1's blocks 4-7 after warpgroup 1's own P V, the rest after BFREE). Keys past the sequence in the
// last tile are zeroed in V after the copy (zero_tail: the copy brings the whole page). Against cp.async, H100:
// 128,2,128,8192 1.430 vs 1.475 ms kernels only (seventh session), 1.484 vs 1.507 (eighth); other 64-row shapes
// -1..+6% kernels only and faster in every API loop (benchmarks/BENCHMARKS.md); 17% fewer cycles a pair, mostly
// given back to the power cap. Page sizes that are not multiples of 64 take cp.async. zero_tail's warpgroup meets
// on an mbarrier, not on a 128-thread named barrier, after which racecheck reported false hazards
// (benchmarks/NOTES_cupy.md, eighth session).
//
// What it computes: exactly what kernels/mla_decode_hopper.cu (the "wide" kernel) computes, with the same
// signature, grid (num_workers, h_kv, ceil(M / 64)), plan, partial buffers and numerics (online softmax in fp32
// base 2, bf16 P rounded once as FlashMLA does; MLA_P_SPLIT=1: P = P_hi + P_lo, about ten times more precise);
// dense bf16 / fp16 caches, d = 576, d_v = 512, any page size, h_kv, s_q, h_q.
//
// Why another 64-row kernel: the wide kernel runs its two warpgroups in lock step. Both wait for the S halves to
// be swapped, both run the same softmax, and the tensor cores idle meanwhile (Nsight Compute, H100: tensor pipe
// active 45.7% of the cycles at 128,2,128,8192). Here the warpgroups take turns (FlashMLA's deep-dive note,
// docs/20250422-new-kernel-deep-dive.md there, "seesaw"): keys come in pairs of 64-key blocks A (buffer 0) and B
// (buffer 1); warpgroup 0 owns O[:, 0:256] and block A's scores, warpgroup 1 owns O[:, 256:512] and block B's:
//
//   WG0: S_A = Q K_A^T                            WG1: S_B = Q K_B^T        (36 wgmma m64n64k16 each)
//   WG0: m_A = max(m, rowmax S_A) -> smem; P_A = 2^(S_A - m_A), O_L = O_L 2^(m - m_A) + P_A V_AL (P from registers)
//   ==MA==>                                       WG1: m_B = max(m_A, rowmax S_B) -> smem
//   ==MB==>  WG0: P_A' = P_A 2^(m_A - m_B) -> smem  WG1: P_B = 2^(S_B - m_B) -> smem
//   ==P==>   WG0: O_L = O_L 2^(m_A - m_B) + P_B V_BL (smem)
//                                                 WG1: O_R = O_R 2^(m - m_B) + P_A' V_AR (smem) + P_B V_BR (regs)
//
// so one warpgroup's softmax runs while the other's wgmma do (each block's softmax is computed once, no S is
// swapped). l: each warpgroup sums its own blocks' P (in m_B's scale); the two sums are added at the end.
//
// Shared memory (dynamic, 230560 B; mirrored in mla/backends/cupy_hopper.py seesaw_smem_bytes; the last 160 B are
// the TMA build's 20 mbarriers, allocated in both builds):
//   Q tile 73728 B (no swizzle, mla_wgmma.cuh) | K buffer 0 | K buffer 1 (each 73728 B, 128-byte swizzled:
//   9 channel blocks of 64 keys x 128 B) | P_B lo 8192 B | m_A, m_B [64] | l [2][64] floats | mbarriers [2][9]
//   (pieces) + [2] (zero_tail).
// A P block (64 rows x 64 keys, 16-bit) is one SW128 channel block, read K-major as wgmma's A operand. There is
// no room for two more 16 KB P blocks (hi + lo), so they go where the K buffers are done with:
//   P_A' hi -> buffer 0's RoPE block (block 8: only S_A read it), P_A' lo -> buffer 0's block 0 (V_AL: WG0's
//   own P V is finished first); P_B hi -> buffer 1's RoPE block, P_B lo -> the 8 KB of its own. Without the split
//   (the default) P_A' is one block, in the RoPE block, so warpgroup 0 stores it and signals P before its own
//   P_A V_AL is done (ninth session; three other orders were timed and were slower or within noise: P_A' after
//   P_A V_AL; warpgroup 1's own P V first; P_A handed over in m_A's scale with warpgroup 1 rescaling O_R itself, in
//   git at d8bc7eb / eac1cb9; benchmarks/NOTES_cupy.md, ninth session).
//
// Loads (cp.async, zero-filled past the piece): each warpgroup refills the buffer whose scores it computes,
// with its own 128 threads (a quarter-warp copies one 128-byte line), and waits for its own copies before
// its S wgmma (a 128-thread named barrier). Buffer 0 is refilled as soon as warpgroup 1's P_A' V_AR is done
// (signal AFREE; WG1 issues that product before its own P_B V_BR so that the copy runs under it); buffer 1 once
// warpgroup 0's P_B V_BL is done (BFREE) and WG1's own products are. The block-table entries of the next tile's
// rows are loaded a wgmma batch before the copies that need them.
// What the loads cost (H100, 128,2,128,8192; clock64 timeline: benchmarks/seesaw_trace.py, MLA_SEESAW_TRACE):
// 1.65-1.89 ms, a pair every ~10400 cycles against ~8400 with the buffers never refilled (MLA_DIAG_NO_RELOAD,
// wrong results, 1.32 ms) and ~6400 of wgmma work: with two K buffers a pair's refills start only once the other
// warpgroup's P V is done with them. Measured and not kept (benchmarks/NOTES_cupy.md, sixth session, commits
// d3bbbbb..2f9a196): an L2 prefetch of the next pair's rows (2.04 ms); buffer 0's blocks 1-3 refilled early
// (within noise); one cp.async group a channel block with S issued block by block (3.0-3.9 ms, and as slow with
// that restructuring's switches off: cause not isolated, see NOTES); warpgroup
// 0's P_B V_BL after AFREE (1.76 against 1.65-1.68); P_A handed over before m_B with warpgroup 1 rescaling O_R
// (1.71-1.72); S_B issued at warpgroup 1's pair top (1.87); the buffers swapping roles every pair (2f9a196:
// 1.74 in a loop, 1.69 one call; mixed).
//
// Signals: named barriers of 256 threads (MA: m_A published, MB: m_B published, P: both P blocks stored, AFREE /
// BFREE: buffer 0 / 1 read for the last time this pair), every one a full bar.sync of both warpgroups, placed
// where the side that does not need the signal is waiting anyway or arrives early (warpgroup 0 syncs MA after it
// has issued its P V, while warpgroup 1 is still in its S wgmma). The first version had one side only arrive
// (bar.arrive); compute-sanitizer's racecheck reported hazards for those orderings (as for the wide kernel's S
// exchange, 2026-11-25), and the full syncs were not slower (1.61-1.89 against 1.82-2.05 ms).
#include "mla_common.cuh"
#include "mla_fused_combine.cuh"
#include "mla_wgmma.cuh"

#ifndef MLA_P_SPLIT  // bf16 P rounded once, FlashMLA's numerics (2026-11-26, ninth session: docs/decisions.md)
#define MLA_P_SPLIT 0
#endif
#ifndef MLA_DIAG_NO_RELOAD  // diagnostics only (timing, wrong results): the K buffers are never refilled
#define MLA_DIAG_NO_RELOAD 0
#endif
#ifndef MLA_SEESAW_TMA  // 1: K pieces by bulk tensor copies (page sizes that are multiples of 64); 0: cp.async
#define MLA_SEESAW_TMA 0
#endif
static_assert(!(MLA_SEESAW_TMA && MLA_DIAG_NO_RELOAD), "MLA_DIAG_NO_RELOAD is a diagnostic of the cp.async build");
// (Two timing-only diagnostics that ran bf16 inputs through the fp16 math, converting tiles in shared memory,
// measured slower than the P split or barely faster: benchmarks/NOTES_cupy.md, eighth session; code in git history
// at 1b53759.)

constexpr int D = 576, DV = 512;
constexpr int BLOCK_M = 64, BLOCK_N = 64, NTHREADS = 256;
constexpr int KSTEPS = D / 16;
constexpr int TILE_BYTES = BLOCK_N * D * 2;               // a Q tile or a K buffer
constexpr u32 ROPE_AT = (D / 64 - 1) * SW128_BLOCK_BYTES;  // byte offset of a K buffer's RoPE block (channels 512..)
constexpr u32 VR_AT = 4 * SW128_BLOCK_BYTES;              // ... of its channels 256.. (V_R)
constexpr bool P_SPLIT = MLA_P_SPLIT;
constexpr int NPIECES = D / 64;                           // 64-channel pieces of a K buffer (SW128 blocks)
// (+ 2 x 9 + 2 mbarriers at the end: the TMA build's, allocated in both builds so the size is one)
constexpr int SMEM_BYTES = 3 * TILE_BYTES + SW128_BLOCK_BYTES + 4 * 64 * 4 + (2 * NPIECES + 2) * 8;
static_assert(SMEM_BYTES == 230560, "mirrored in cupy_hopper.py (seesaw_smem_bytes)");
static_assert(D == 576 && DV == 512 && BLOCK_M == WG_TILE_ROWS, "specialised for d = 576, d_v = 512, 64-row tiles");

// Diagnostics only (benchmarks/seesaw_trace.py): clock64() at 8 points of each of the first 64 pairs of CTA (0, 0, 0)'s
// first piece, thread 0 of each warpgroup (0: pair top, 7: its refill landed, 1: S done, 2-6: past MA, MB, P, AFREE,
// BFREE)
#ifndef MLA_SEESAW_TRACE
#define MLA_SEESAW_TRACE 0
#endif
#if MLA_SEESAW_TRACE
__device__ long long seesaw_trace[2][64][8];
#define SEESAW_MARK(e) \
  if (trace_on && pair < 64) seesaw_trace[wg][pair][e] = clock64()
#else
#define SEESAW_MARK(e)
#endif

// named barriers (0 is __syncthreads)
enum : int { BAR_MA = 1, BAR_MB, BAR_P, BAR_AFREE, BAR_BFREE, BAR_LOAD0, BAR_LOAD1 };

#if MLA_HAS_WGMMA
// acc = Q . K_block^T over all 576 channels (64 rows x 64 keys), issued and committed; the caller waits
__device__ __forceinline__ void seesaw_scores_issue(float (&acc)[32], u32 q_tile, u32 k_buf) {
  const u64 dq = wg_desc(q_tile, WG_K_LBO, WG_K_SBO);
  const u64 dk = wg_desc_sw128(k_buf, WG_SW_K_LBO, WG_SW_K_SBO);
  wg_fence_operands(acc);
  wg_fence();
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s)
    wg_mma_m64n64k16_ss(acc, dq + s * WG_QK_KSTEP, dk + ((((s >> 2) * SW128_BLOCK_BYTES) + (s & 3) * 32) >> 4),
                        s > 0);
  wg_commit();
}

// TMA build: the same product, each 64-channel piece of the K buffer waited for on its mbarrier (bars: piece 0's,
// 8 bytes apart) just before its 4 wgmma, in the order its refills are issued (warpgroup W's buffer: see the kernel),
// so the scores start on the first piece to land
template <int W>
__device__ __forceinline__ void seesaw_scores_issue_tma(float (&acc)[32], u32 q_tile, u32 k_buf, u32 bars, u32 parity) {
  constexpr int order[2][9] = {{1, 2, 3, 4, 5, 6, 7, 0, 8}, {4, 5, 6, 7, 0, 1, 2, 3, 8}};
  const u64 dq = wg_desc(q_tile, WG_K_LBO, WG_K_SBO);
  const u64 dk = wg_desc_sw128(k_buf, WG_SW_K_LBO, WG_SW_K_SBO);
  wg_fence_operands(acc);
#pragma unroll
  for (int j = 0; j < 9; ++j) {
    const int c = order[W][j];
    mbar_wait(bars + 8 * c, parity);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      wg_mma_m64n64k16_ss(acc, dq + (4 * c + kk) * WG_QK_KSTEP, dk + ((c * SW128_BLOCK_BYTES + kk * 32) >> 4),
                          j > 0 || kk > 0);
  }
  wg_commit();
}

// o[64 x 256] += P V with P (hi, and lo when SPLIT) in shared memory (SW128 P blocks, K-major) and V the 256
// channels of a K buffer at v_cols (MN-major SW128, as wg_pv_issue). Issued and committed; the caller waits.
template <bool SPLIT>
__device__ __forceinline__ void seesaw_pv_smem_issue(float (&o)[128], u32 p_hi, u32 p_lo, u32 v_cols) {
  const u64 dv = wg_desc_sw128(v_cols, WG_SW_MN_LBO, WG_SW_MN_SBO);
  const u64 dh = wg_desc_sw128(p_hi, WG_SW_K_LBO, WG_SW_K_SBO), dl = wg_desc_sw128(p_lo, WG_SW_K_LBO, WG_SW_K_SBO);
  wg_fence_operands(o);
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    wg_mma_m64n256k16_ss_nmajor(o, dh + ((32 * kk) >> 4), dv + kk * (2048 >> 4));
    if constexpr (SPLIT) wg_mma_m64n256k16_ss_nmajor(o, dl + ((32 * kk) >> 4), dv + kk * (2048 >> 4));
  }
  wg_commit();
}
#endif

// P fragments (wg_p_frags: u32 j = P[row r0 + 8 (j % 2)][keys 8 (j / 2) + 2 (lane % 4), + 1]) -> a SW128 P block
__device__ __forceinline__ void seesaw_store_p(unsigned char* blk, const u32 (&p)[16], int r0, int c2) {
#pragma unroll
  for (int j = 0; j < 16; ++j)
    *reinterpret_cast<u32*>(blk + sw128_offset(r0 + 8 * (j & 1), 8 * (j >> 1) + c2)) = p[j];
}

extern "C" __global__ void __launch_bounds__(NTHREADS, 1)
mla_decode_seesaw(const mla_elem_t* __restrict__ q, const void* __restrict__ k_cache_v,
                  const int* __restrict__ block_table, int bt_stride, const int* __restrict__ seqlens,
                  const int* __restrict__ indices, int topk, const int* __restrict__ topk_length, int num_tokens,
                  int force_partials, const int* __restrict__ sched, const int* __restrict__ num_splits,
                  float* __restrict__ o_part, float* __restrict__ lse_part, mla_elem_t* __restrict__ out,
                  float* __restrict__ lse_out, int s_q, int h_q, int h_kv, int page, float scale_log2, int causal,
                  const void* __restrict__ k_map) {
#if MLA_HAS_WGMMA
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  mla_elem_t* sQ = reinterpret_cast<mla_elem_t*>(smem_raw);
  unsigned char* sK = smem_raw + TILE_BYTES;                      // [2][TILE_BYTES]
  unsigned char* sPlo = sK + 2 * TILE_BYTES;                      // P_B lo
  float* sMa = reinterpret_cast<float*>(sPlo + SW128_BLOCK_BYTES);  // [64]
  float* sMb = sMa + 64;                                          // [64]
  float* sL = sMb + 64;                                           // [2][64]
  const u32 bars = smem_u32(sL + 2 * 64);  // TMA build: mbarriers [2 buffers][NPIECES], 8 bytes each
  const u32 sQ_addr = smem_u32(sQ), k0 = smem_u32(sK), k1 = k0 + TILE_BYTES, plo_addr = smem_u32(sPlo);
  [[maybe_unused]] const mla_elem_t* k_cache = static_cast<const mla_elem_t*>(k_cache_v);  // (cp.async build)

  const int tid = threadIdx.x, lane = tid & 31;
  const int wg = tid >> 7, t = tid & 127;
  const int g = blockIdx.y, qt = blockIdx.z;
  const int group = h_q / h_kv, M = s_q * group;
  const int c2 = 2 * (lane & 3);
  const int r0 = wg_acc_row(t, 0), r1 = r0 + 8;  // this thread's two rows of the tile (both warpgroups alike)
  const int m0 = qt * BLOCK_M + r0, m1 = m0 + 8;  // ... as query rows of the problem
  const bool quad_lead = (lane & 3) == 0;

  if (k0 & 1023) __trap();  // the SW128 K buffers must be 1024-byte aligned (see mla_wgmma.cuh)
  const MlaWork work = mla_work(sched, blockIdx.x);
  const bool force = MLA_FUSED ? (force_partials & MLA_MODE_PARTIALS) != 0 : force_partials != 0;
  const bool fused = MLA_FUSED && (force_partials & MLA_MODE_FUSED);
#if MLA_SEESAW_TMA
  if (tid == 0) {
    for (int b = 0; b < 2 * NPIECES; ++b) mbar_init(bars + 8 * b, 1);
    for (int w = 0; w < 2; ++w) mbar_init(bars + 8 * (2 * NPIECES + w), 128);  // zero_tail's, a warpgroup's
    fence_mbar_init();
  }
  if (t == 0) tensormap_acquire(k_map);
  __syncthreads();
  u32 kpar = 0;  // parity of the next fill of this warpgroup's K buffer (each fill completes each piece's phase once)
  u32 zpar = 0;  // parity of the next phase of this warpgroup's zero_tail mbarrier
#endif

  for (int i = work.begin_b; i <= work.end_b; ++i) {
    const int L = seqlens[i];
    const MlaPiece pc = mla_piece(work, num_splits, i, L);
    const int start = pc.start, stop = pc.stop;
    int stop_eff = stop;  // causal: no row of this CTA sees keys past L - s_q + r_max
    if (causal) {
      const int r_max = min(s_q - 1, (qt * BLOCK_M + BLOCK_M - 1) / group);
      stop_eff = min(stop, L - s_q + r_max + 1);
    }
    const int n_tiles = stop_eff > start ? (stop_eff - start + BLOCK_N - 1) / BLOCK_N : 0;
    int lim0 = stop - 1, lim1 = stop - 1;  // last keys rows m0 / m1 see
    if (causal) {
      lim0 = min(lim0, L - s_q + m0 / group);
      lim1 = min(lim1, L - s_q + m1 / group);
    }

    [[maybe_unused]] const bool trace_on =
        MLA_SEESAW_TRACE && t == 0 && i == work.begin_b && blockIdx.x + blockIdx.y + blockIdx.z == 0;
    float o[128];
#pragma unroll
    for (int k = 0; k < 128; ++k) o[k] = 0.f;
    // running max (base 2, the same in both warpgroups) and this warpgroup's blocks' share of the sum
    float m_run0 = MLA_NEG_INF, m_run1 = MLA_NEG_INF, l_own0 = 0.f, l_own1 = 0.f;

#if !MLA_SEESAW_TMA
    // cp.async build. This warpgroup's thread t moves rows t / 8 + 16 h (h < 4) of the key tiles it loads. fetch_blocks: the
    // block-table entries of those rows of tile `tile` (-1 past the piece), loaded without waiting for them (they
    // are used a wgmma batch later); row_src: a row's cache address (nullptr when invalid).
    auto fetch_blocks = [&](int tile, int (&blk)[4]) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int pos = start + tile * BLOCK_N + (t >> 3) + 16 * h;
        blk[h] = ldg_nc_i32_or(block_table + (long long)i * bt_stride + pos / page, pos < stop_eff, -1);
      }
    };
    auto row_src = [&](int tile, int h, int blk) -> const mla_elem_t* {
      if (blk < 0) return nullptr;
      const int pos = start + tile * BLOCK_N + (t >> 3) + 16 * h;
      return k_cache + ((long long)(blk * page + pos % page) * h_kv + g) * (long long)D;
    };
    // key tile `tile` of the piece -> the K buffer at kb, copied by this warpgroup's 128 threads: thread t copies
    // chunk t % 8 of its 4 rows in every channel block (a quarter-warp: one 128-byte line); rows past the piece
    // are zero-filled
    auto load_tile = [&](int tile, unsigned char* kb, const int (&blk)[4]) {
      const int c = t & 7;
#pragma unroll
      for (int h = 0; h < 4; ++h) {
        const int row = (t >> 3) + 16 * h;
        const mla_elem_t* src = row_src(tile, h, blk[h]);
        const bool valid = src != nullptr;
        if (!valid) src = k_cache;
#pragma unroll
        for (int cb = 0; cb < D / 64; ++cb)
          cp_async16(kb + cb * SW128_BLOCK_BYTES + row * 128 + ((c ^ (row & 7)) << 4), src + cb * 64 + c * 8, valid);
      }
    };
#else
    // TMA build. tile_block: the cache block of key tile `tile` (read by thread 0 of a warpgroup, the one that issues
    // its buffer's copies, a wgmma batch before they are issued; -1 past the piece). copy_pieces: the pieces of `mask`
    // (bit c: channels 64 c ..) of tile `tile` into buffer `buf` (nothing past the piece). A block-table entry out of
    // range gives a row outside the map: the copy fills zeros, never reads outside the cache.
    auto tile_block = [&](int tile) -> int {
      const int pos0 = start + tile * BLOCK_N;
      return ldg_nc_i32_or(block_table + (long long)i * bt_stride + pos0 / page, t == 0 && tile < n_tiles, -1);
    };
    auto copy_pieces = [&](int tile, int buf, u32 mask, int blk) {
      if (t == 0 && tile < n_tiles) {
        const long long row = (long long)blk * page + (start + tile * BLOCK_N) % page;
        const int row0 = blk < 0 || row > 0x7FFFFFFFLL - BLOCK_N ? -BLOCK_N : (int)row;
#pragma unroll
        for (int c = 0; c < NPIECES; ++c)
          if ((mask >> c) & 1) {
            const u32 bar = bars + 8 * (NPIECES * buf + c);
            mbar_arrive_expect_tx(bar, SW128_BLOCK_BYTES);
            tma_load_3d(k0 + buf * TILE_BYTES + c * SW128_BLOCK_BYTES, k_map, 64 * c, g, row0, bar);
          }
      }
    };
    // keys of tile `tile` past the sequence (L) hold whatever the cache holds there (NaN in the tests): P is 0 for
    // them, but 0 x NaN is not, so their V rows (channel blocks 0-7) are zeroed by the buffer's warpgroup once its
    // S is done, before any P V reads them (its own after the warpgroup's mbarrier, the other's after BAR_P). The
    // warpgroup meets on an mbarrier (128 arrivals), not on a 128-thread named barrier: racecheck loses the order
    // of later barrier-ordered accesses after a named barrier that only one warpgroup runs (false hazards on m_A
    // and l; reproduced by benchmarks/racecheck_mbarrier_probe.py wg_bar_before; benchmarks/NOTES_cupy.md).
    auto zero_tail = [&](int tile, unsigned char* kb) {
      const int valid = L - (start + tile * BLOCK_N);
      if (valid >= BLOCK_N) return;
      for (int x = t; x < (BLOCK_N - valid) * 64; x += 128)  // (row, channel block, 16-byte chunk)
        *reinterpret_cast<uint4*>(kb + ((x >> 3) & 7) * SW128_BLOCK_BYTES + (valid + (x >> 6)) * 128 + (x & 7) * 16) =
            make_uint4(0u, 0u, 0u, 0u);
      fence_proxy_async();
      const u32 zbar = bars + 8 * (2 * NPIECES + wg);
      mbar_arrive_expect_tx(zbar, 0);  // (a plain arrival: release of this thread's zeros)
      mbar_wait(zbar, zpar);
      zpar ^= 1u;
    };
#endif
    // scores of key tile `tile` in s (S accumulator layout): scaled to base 2, keys a row must not see -> -inf;
    // mx0 / mx1: this lane's maxima of rows r0 / r1
    auto scale_mask = [&](float (&s)[32], int tile, float& mx0, float& mx1) {
      const int pos0 = start + tile * BLOCK_N;
      const bool full = __all_sync(0xffffffff, pos0 + BLOCK_N - 1 <= min(lim0, lim1));
#pragma unroll
      for (int k = 0; k < 32; ++k) {
        const int pos = pos0 + 8 * (k >> 2) + c2 + (k & 1);
        const bool second = (k >> 1) & 1;
        const float v = (full || pos <= (second ? lim1 : lim0)) ? s[k] * scale_log2 : MLA_NEG_INF;
        s[k] = v;
        if (second) mx1 = fmaxf(mx1, v);
        else mx0 = fmaxf(mx0, v);
      }
    };

    if (n_tiles > 0) {
      {  // Q tile (rows m -> (r, h) = (m / group, g group + m % group); rows >= M zero-filled) and the first pair
        const int m = qt * BLOCK_M + wg_copy_row(tid);
        const bool valid = m < M;
        const mla_elem_t* src = q;
        if (valid) src = q + ((long long)(i * s_q + m / group) * h_q + g * group + m % group) * D;
        wg_tile_load_row<D>(sQ, tid, src, valid);
#if MLA_SEESAW_TMA
        copy_pieces(wg, wg, (1u << NPIECES) - 1, tile_block(wg));  // tile wg -> buffer wg (none when wg >= n_tiles)
#else
        int blk0[4];
        fetch_blocks(wg, blk0);  // tile wg: past the piece when wg >= n_tiles
        load_tile(wg, sK + wg * TILE_BYTES, blk0);
#endif
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
      }
      const int n_pairs = (n_tiles + 1) / 2;
      for (int pair = 0; pair < n_pairs; ++pair) {
        const int ta = 2 * pair, tb = ta + 1;
        const bool has_b = tb < n_tiles;
        SEESAW_MARK(0);
#if MLA_SEESAW_TMA
        int nxt = -1;  // (thread 0) the cache block of this warpgroup's next tile (ta + 2 / tb + 2)
#else
        if (pair > 0) {  // this warpgroup's refill of its buffer (issued in the previous pair) has landed
          cp_async_wait<0>();
          fence_proxy_async();
          named_bar_sync(wg ? BAR_LOAD1 : BAR_LOAD0, 128);
          SEESAW_MARK(7);
        }
        int nxt[4];  // block-table entries of the rows of this warpgroup's next tile (ta + 2 / tb + 2)
#endif
        float s[32];
        u32 p_hi[16], p_lo[16];
#pragma unroll
        for (int k = 0; k < 32; ++k) s[k] = 0.f;
        if (wg == 0) {
          // ---- S_A, m_A (-> warpgroup 1), P_A, O_L = alpha O_L + P_A V_AL
#if MLA_SEESAW_TMA
          seesaw_scores_issue_tma<0>(s, sQ_addr, k0, bars, kpar);
          kpar ^= 1u;
          nxt = tile_block(ta + 2);
          wg_wait<0>();
          SEESAW_MARK(1);
          wg_fence_operands(s);
          zero_tail(ta, sK);
#else
          seesaw_scores_issue(s, sQ_addr, k0);
          fetch_blocks(ta + 2, nxt);  // (past the piece when there is none)
          wg_wait<0>();
          SEESAW_MARK(1);
          wg_fence_operands(s);
#endif
          float mx0 = MLA_NEG_INF, mx1 = MLA_NEG_INF;
          scale_mask(s, ta, mx0, mx1);
          const float ma0 = fmaxf(m_run0, mla_quad_max(mx0)), ma1 = fmaxf(m_run1, mla_quad_max(mx1));
          if (quad_lead) {
            sMa[r0] = ma0;
            sMa[r1] = ma1;
          }
          const float mu0 = ma0 == MLA_NEG_INF ? 0.f : ma0, mu1 = ma1 == MLA_NEG_INF ? 0.f : ma1;
          const float alpha0 = fast_exp2(m_run0 - mu0), alpha1 = fast_exp2(m_run1 - mu1);
          l_own0 *= alpha0;
          l_own1 *= alpha1;
          wg_exp2_rowsum(s, mu0, mu1, l_own0, l_own1);
#pragma unroll
          for (int k = 0; k < 128; ++k) o[k] *= ((k >> 1) & 1) ? alpha1 : alpha0;
          wg_p_frags<P_SPLIT>(s, p_hi, p_lo);
          wg_pv_issue<P_SPLIT, true>(o, p_hi, p_lo, k0);
          named_bar_sync(BAR_MA, 256);  // m_A is in sMa (after the P V issue: warpgroup 1 is still in its S)
          SEESAW_MARK(2);
          // ---- m_B from warpgroup 1: P_A' = P_A 2^(m_A - m_B) -> smem for it; O_L, l rescaled alike
          named_bar_sync(BAR_MB, 256);
          SEESAW_MARK(3);
          const float mb0 = sMb[r0], mb1 = sMb[r1];
          const float sb0 = ma0 == MLA_NEG_INF ? 0.f : fast_exp2(ma0 - mb0);
          const float sb1 = ma1 == MLA_NEG_INF ? 0.f : fast_exp2(ma1 - mb1);
#pragma unroll
          for (int k = 0; k < 32; ++k) s[k] *= ((k >> 1) & 1) ? sb1 : sb0;
          if constexpr (!P_SPLIT) {
            // P_A' -> buffer 0's RoPE block (only S_A read it) while P_A V_AL still runs, from registers of its own
            // (p_hi is that wgmma's operand): warpgroup 1's P V start without waiting for it
            u32 p_a[16];
            wg_p_frags<false>(s, p_a, p_lo);
            seesaw_store_p(sK + ROPE_AT, p_a, r0, c2);
            fence_proxy_async();
            named_bar_sync(BAR_P, 256);  // P_A' and P_B are in shared memory
            SEESAW_MARK(4);
          }
          wg_wait<0>();  // P_A V_AL done: block 0 of buffer 0 is free (for P_A' lo), p_hi / p_lo too
          wg_fence_operands(o);
#if MLA_SEESAW_TMA
          copy_pieces(ta + 2, 0, 0x00Eu, nxt);  // blocks 1-3 of buffer 0 (V_AL) are read by nobody else
#endif
          if constexpr (P_SPLIT) {
            wg_p_frags<true>(s, p_hi, p_lo);
            seesaw_store_p(sK + ROPE_AT, p_hi, r0, c2);
            seesaw_store_p(sK, p_lo, r0, c2);
            fence_proxy_async();
            named_bar_sync(BAR_P, 256);  // P_A' and P_B are in shared memory
            SEESAW_MARK(4);
          }
          l_own0 *= sb0;
          l_own1 *= sb1;
#pragma unroll
          for (int k = 0; k < 128; ++k) o[k] *= ((k >> 1) & 1) ? sb1 : sb0;
          m_run0 = mb0;
          m_run1 = mb1;
          // ---- O_L += P_B V_BL (P_B from warpgroup 1, in smem)
          if (has_b) seesaw_pv_smem_issue<P_SPLIT>(o, k1 + ROPE_AT, plo_addr, k1);
          // ---- refill buffer 0 once warpgroup 1 is done with it
          named_bar_sync(BAR_AFREE, 256);
          SEESAW_MARK(5);
#if MLA_SEESAW_TMA
          copy_pieces(ta + 2, 0, 0x1F1u, nxt);  // blocks 0, 4-8 (P_A' lo, V_AR, P_A' hi)
#else
          if (!MLA_DIAG_NO_RELOAD && ta + 2 < n_tiles) load_tile(ta + 2, sK, nxt);
          cp_async_commit();
#endif
          wg_wait<0>();
          wg_fence_operands(o);
          named_bar_sync(BAR_BFREE, 256);
          SEESAW_MARK(6);
        } else {
          // ---- S_B; m_B = max(m_A, rowmax S_B) (-> warpgroup 0); P_B -> smem
          float mx0 = MLA_NEG_INF, mx1 = MLA_NEG_INF;
#if MLA_SEESAW_TMA
          nxt = tile_block(tb + 2);
          if (has_b) {
            seesaw_scores_issue_tma<1>(s, sQ_addr, k1, bars + 8 * NPIECES, kpar);
            kpar ^= 1u;
            wg_wait<0>();
            SEESAW_MARK(1);
            wg_fence_operands(s);
            zero_tail(tb, sK + TILE_BYTES);
            scale_mask(s, tb, mx0, mx1);
          }
#else
          fetch_blocks(tb + 2, nxt);
          if (has_b) {
            seesaw_scores_issue(s, sQ_addr, k1);
            wg_wait<0>();
            SEESAW_MARK(1);
            wg_fence_operands(s);
            scale_mask(s, tb, mx0, mx1);
          }
#endif
          named_bar_sync(BAR_MA, 256);
          SEESAW_MARK(2);
          const float mb0 = fmaxf(sMa[r0], mla_quad_max(mx0)), mb1 = fmaxf(sMa[r1], mla_quad_max(mx1));
          if (quad_lead) {
            sMb[r0] = mb0;
            sMb[r1] = mb1;
          }
          named_bar_sync(BAR_MB, 256);
          SEESAW_MARK(3);
          const float mu0 = mb0 == MLA_NEG_INF ? 0.f : mb0, mu1 = mb1 == MLA_NEG_INF ? 0.f : mb1;
          const float f0 = fast_exp2(m_run0 - mu0), f1 = fast_exp2(m_run1 - mu1);
          l_own0 *= f0;
          l_own1 *= f1;
          if (has_b) {
            wg_exp2_rowsum(s, mu0, mu1, l_own0, l_own1);
            wg_p_frags<P_SPLIT>(s, p_hi, p_lo);
            seesaw_store_p(sK + TILE_BYTES + ROPE_AT, p_hi, r0, c2);  // S_B is done with buffer 1's RoPE block
            if constexpr (P_SPLIT) seesaw_store_p(sPlo, p_lo, r0, c2);
            fence_proxy_async();
          }
#pragma unroll
          for (int k = 0; k < 128; ++k) o[k] *= ((k >> 1) & 1) ? f1 : f0;
          m_run0 = mb0;
          m_run1 = mb1;
          // ---- O_R += P_A' V_AR (smem), then + P_B V_BR (registers); buffer 0 is free after the first
          named_bar_sync(BAR_P, 256);
          SEESAW_MARK(4);
          seesaw_pv_smem_issue<P_SPLIT>(o, k0 + ROPE_AT, k0, k0 + VR_AT);
          if (has_b) {
            wg_pv_issue<P_SPLIT, true>(o, p_hi, p_lo, k1 + VR_AT);
            wg_wait<1>();
          } else {
            wg_wait<0>();
          }
          named_bar_sync(BAR_AFREE, 256);
          SEESAW_MARK(5);
          wg_wait<0>();
          wg_fence_operands(o);
#if MLA_SEESAW_TMA
          copy_pieces(tb + 2, 1, 0x0F0u, nxt);  // blocks 4-7 of buffer 1 (V_BR) were this warpgroup's alone
#endif
          // ---- refill buffer 1 once warpgroup 0 is done with it (and this warpgroup's products are)
          named_bar_sync(BAR_BFREE, 256);
          SEESAW_MARK(6);
#if MLA_SEESAW_TMA
          copy_pieces(tb + 2, 1, 0x10Fu, nxt);  // blocks 0-3, 8 (V_BL, P_B hi)
#else
          if (!MLA_DIAG_NO_RELOAD && tb + 2 < n_tiles) load_tile(tb + 2, sK + TILE_BYTES, nxt);
          cp_async_commit();
#endif
        }
      }
    }

    // ---- finish the piece: l = both warpgroups' sums, o / l, lse = (m + log2 l) ln 2
    l_own0 = mla_quad_sum(l_own0);
    l_own1 = mla_quad_sum(l_own1);
    if (quad_lead) {
      sL[wg * 64 + r0] = l_own0;
      sL[wg * 64 + r1] = l_own1;
    }
    __syncthreads();  // also: both warpgroups are done with every buffer before the next piece's loads
    const float l_run0 = sL[r0] + sL[64 + r0], l_run1 = sL[r1] + sL[64 + r1];
    __syncthreads();  // sL is read before anyone's next piece writes it
    const float inv0 = l_run0 > 0.f ? 1.f / l_run0 : 0.f, inv1 = l_run1 > 0.f ? 1.f / l_run1 : 0.f;
    const float lse0 = mla_row_lse(m_run0, l_run0), lse1 = mla_row_lse(m_run1, l_run1);
    const bool direct = pc.nsplit == 1 && !force;
    wg_store_rows(o, inv0, inv1, lse0, lse1, m0, M, group, g, i, pc.lo + pc.split, s_q, h_q, direct, wg, lane, out,
                  o_part, lse_out, lse_part);
    if (fused && !direct) {  // (fused launches never force partials: not direct means split)
      __syncthreads();       // this piece's partial rows are all written
      if (tid == 0) mla_fused_arrive(mla_fused_counters(sched, gridDim.x, blockIdx.x, pc.split, i));
    }
  }
  if (fused)  // (after every arrival of this CTA: see mla_fused_combine.cuh)
    mla_fused_merge_all<DV, NTHREADS>(work, sched, o_part, lse_part, num_splits, out, lse_out, s_q, h_q);
#else
  __trap();  // built for a target without wgmma (sm_90a only): never launched there
#endif
}
