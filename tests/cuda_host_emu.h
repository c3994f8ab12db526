// cuda_host_emu.h -- run the CuPy RawKernel sources on the CPU, one CUDA thread per fiber (tests only).
//
// What it is for: the mma.sync kernels (kernels/prefill_mma.cu, and mla_decode_portable.cu as the
// emulator's own check against GPU-verified code) can be executed on a machine without a GPU, so the
// index math, masks, fragment layouts and barriers are tested against the NumPy reference in CI.
// tests/_cuda_emu.py builds a shared library from a kernel source with this header in place of
// mla_common.cuh: every function of the source whose body holds inline PTX is dropped, and the
// same-named emulation below is used instead.
//
// Model: a CTA runs at a time; each of its threads is a ucontext fiber on one OS thread, switched
// only inside barriers, so runs are deterministic. Schedules (emu_config): "lockstep" resumes every
// thread each round; "skewed" resumes warp w only every (w + 1)-th round and "reverse" warp w every
// (nwarps - w)-th, so between two CTA barriers some warps run far ahead of others (what exposes a
// missing barrier or a buffer refilled too early). __syncthreads is a CTA barrier; every warp-wide
// operation (shfl, ldmatrix, mma) is a 32-lane rendezvous that checks all lanes run the same
// operation (divergence is reported, not hidden). PTX semantics follow the PTX ISA:
//   ldmatrix .m8n8.x4 [.trans]: lanes 8 i .. 8 i + 7 give the 8 row addresses of matrix i; lane L gets
//     register i = (row L/4, columns 2 (L%4), +1) of matrix i, or with .trans (rows 2 (L%4), +1; column L/4)
//   mma.m16n8k16.row.col: lane L = 4 g + t holds A (g | g+8, k 2t.. | 2t+8..) in a0..a3 (a0: row g,
//     k 2t..2t+1; a1: row g+8; a2: row g, k 2t+8..; a3: row g+8, k 2t+8..), B (k 2t.. | 2t+8.., n g)
//     in b0, b1, C/D (row g | g+8, n 2t, 2t+1) in c0..c3; the low 16 bits hold the lower index.
//   cp.async: copies are queued per thread and carried out at cp.async.wait_group (the latest moment
//     the PTX rules allow), so a read before the wait sees stale bytes; in "eager" mode at the issue
//     instead (the earliest), so refilling a buffer that another warp still reads shows.
//     Shared memory starts as 0xFF bytes (NaN in every float format): reading what nobody wrote shows.
// Checked: every ldmatrix / cp.async address is inside the shared window and aligned; a barrier that
// can never complete (deadlock) aborts with a message.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

typedef unsigned short mla_elem_t;
typedef unsigned int u32;
typedef unsigned long long u64;

#ifndef MLA_FP16
#define MLA_FP16 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static  // a static __shared__ array: one per CTA (the CTAs run one at a time), shared by its threads
#define __align__(n) alignas(n)

struct emu_dim3 {
  unsigned x, y, z;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(8) int2 {
  int x, y;
};
template <typename T>
inline T __ldg(const T* p) { return *p; }
struct float2 {
  float x, y;
};
struct float4 {
  float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
// CUDA's __byte_perm (PTX prmt, default mode): byte n of the result is byte (s >> 4 n) & 7 of [y:x] (x = bytes 0-3)
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  unsigned r = 0;
  for (int n = 0; n < 4; ++n) r |= (unsigned)((v >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
  return r;
}

using std::max;
using std::min;

inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline float __uint_as_float(unsigned x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned x;
  std::memcpy(&x, &f, 4);
  return x;
}

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_host_emu: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int size, src_size;
};

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                 // the group being filled
};

struct Barrier {
  int count = 0;
  long gen = 0;
  int op = -1;
};

enum Op { OP_SYNC = 1, OP_SHFL, OP_LDSM4, OP_LDSM2, OP_LDSM4T, OP_MMA, OP_SYNCWARP };

struct Lane {
  int op;
  u32 u[8];
  float f[4];
};

inline emu_dim3 tid, bid, gdim, bdim;
inline ucontext_t main_ctx;
inline std::vector<Fiber> fibers;
inline int cur = -1;
inline long progress = 0;
inline std::vector<unsigned char> smem_arena;
inline unsigned char* smem_base = nullptr;
inline size_t smem_size = 0;
inline Barrier cta_bar;
inline std::vector<Barrier> warp_bar;
inline std::vector<Lane> lanes;
inline std::function<void()> body;
inline bool eager_copies = false;
inline int schedule = 0;  // 0 lockstep, 1 skewed (warp 0 fastest), 2 reverse (last warp fastest)

inline void yield() { swapcontext(&fibers[cur].ctx, &main_ctx); }

inline void barrier_wait(Barrier& b, int n, int op) {
  if (b.count == 0) b.op = op;
  else if (b.op != op) fail("divergent barrier: lanes reached different operations");
  ++progress;  // an arrival is progress too; a full round without any means deadlock
  const long g = b.gen;
  if (++b.count == n) {
    b.count = 0;
    ++b.gen;
    ++progress;
    return;
  }
  while (b.gen == g) yield();
}

inline int lane_id() { return (int)(tid.x & 31); }
inline int warp_id() { return (int)(tid.x >> 5); }
inline void warp_sync(int op) { barrier_wait(warp_bar[warp_id()], 32, op); }
inline Lane& my_lane() { return lanes[tid.x]; }
inline Lane& lane_of(int l) { return lanes[(tid.x & ~31u) + l]; }

inline void entry() {
  body();
  fibers[cur].done = true;
  ++progress;
  if (!fibers[cur].open.empty() || !fibers[cur].groups.empty()) {
    // outstanding cp.async at exit: carry them out (the hardware would) but it is worth knowing
    for (auto& grp : fibers[cur].groups)
      for (auto& c : grp) {
        std::memset(c.dst, 0, c.size);
        std::memcpy(c.dst, c.src, c.src_size);
      }
  }
  swapcontext(&fibers[cur].ctx, &main_ctx);
}

// run `fn` as every thread of one CTA
inline void run_cta(emu_dim3 block_idx, int nthreads, size_t smem_bytes, std::function<void()> fn) {
  bid = block_idx;
  bdim = emu_dim3{(unsigned)nthreads, 1, 1};
  smem_arena.assign(smem_bytes + 256, 0xFF);
  smem_base = smem_arena.data() + (128 - (reinterpret_cast<uintptr_t>(smem_arena.data()) & 127));
  smem_size = smem_bytes;
  cta_bar = Barrier();
  warp_bar.assign((nthreads + 31) / 32, Barrier());
  lanes.assign(nthreads, Lane());
  body = std::move(fn);
  fibers.clear();
  fibers.resize(nthreads);
  for (int i = 0; i < nthreads; ++i) {
    Fiber& f = fibers[i];
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &main_ctx;
    makecontext(&f.ctx, entry, 0);
  }
  const int nwarps = (nthreads + 31) / 32;
  long idle_rounds = 0;
  for (long round = 0;; ++round) {
    bool all_done = true;
    const long before = progress;
    for (int i = 0; i < nthreads; ++i) {
      if (fibers[i].done) continue;
      all_done = false;
      const int w = i / 32;
      const int period = schedule == 1 ? w + 1 : schedule == 2 ? nwarps - w : 1;
      if (round % period) continue;
      cur = i;
      tid = emu_dim3{(unsigned)i, 0, 0};
      swapcontext(&main_ctx, &fibers[i].ctx);
    }
    if (all_done) break;
    idle_rounds = progress == before ? idle_rounds + 1 : 0;
    if (idle_rounds > 2 * nwarps + 2) fail("deadlock: every live thread waits at a barrier that cannot complete");
  }
  cur = -1;
}

inline void launch(emu_dim3 grid, int nthreads, size_t smem_bytes, const std::function<void()>& kernel) {
  gdim = grid;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_cta(emu_dim3{x, y, z}, nthreads, smem_bytes, kernel);
}

inline unsigned char* smem_at(u32 addr, int bytes, int align) {
  if (addr % align) fail("misaligned shared-memory address");
  if ((size_t)addr + bytes > smem_size) fail("shared-memory access past the dynamic allocation");
  return smem_base + addr;
}

// ---- 16-bit formats
inline unsigned short f2bf(float x) {  // round to nearest even
  u32 u = __float_as_uint(x);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (unsigned short)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1);
  return (unsigned short)(u >> 16);
}
inline float bf2f(unsigned short h) { return __uint_as_float((u32)h << 16); }
inline unsigned short f2h(float x) {
  _Float16 h = (_Float16)x;
  unsigned short r;
  std::memcpy(&r, &h, 2);
  return r;
}
inline float h2f(unsigned short x) {
  _Float16 h;
  std::memcpy(&h, &x, 2);
  return (float)h;
}
inline float e2f(unsigned short x) { return MLA_FP16 ? h2f(x) : bf2f(x); }
inline unsigned short f2e(float x) { return MLA_FP16 ? f2h(x) : f2bf(x); }

}  // namespace emu

#define threadIdx emu::tid
#define blockIdx emu::bid
#define gridDim emu::gdim
#define blockDim emu::bdim

#define MLA_NEG_INF (-INFINITY)
#define MLA_POS_INF (INFINITY)
#define MLA_LN2 0.69314718055994530942f
#define MLA_LOG2E 1.44269504088896340736f

inline void __syncthreads() { emu::barrier_wait(emu::cta_bar, (int)emu::bdim.x, emu::OP_SYNC); }
inline void __trap() { emu::fail("__trap() reached"); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask");
  emu::warp_sync(emu::OP_SYNCWARP);
}

inline float __shfl_xor_sync(unsigned mask, float v, int m) {
  if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask");
  emu::my_lane().f[0] = v;
  emu::warp_sync(emu::OP_SHFL);
  const float r = emu::lane_of(emu::lane_id() ^ m).f[0];
  emu::warp_sync(emu::OP_SHFL);
  return r;
}

inline int __shfl_sync(unsigned mask, int v, int src) {
  if (mask != 0xffffffffu) emu::fail("__shfl_sync with a partial mask");
  float f;
  std::memcpy(&f, &v, 4);
  emu::my_lane().f[0] = f;
  emu::warp_sync(emu::OP_SHFL);
  const float r = emu::lane_of(src & 31).f[0];
  emu::warp_sync(emu::OP_SHFL);
  int out;
  std::memcpy(&out, &r, 4);
  return out;
}

inline float __shfl_sync(unsigned mask, float v, int src) {
  if (mask != 0xffffffffu) emu::fail("__shfl_sync with a partial mask");
  emu::my_lane().f[0] = v;
  emu::warp_sync(emu::OP_SHFL);
  const float r = emu::lane_of(src & 31).f[0];
  emu::warp_sync(emu::OP_SHFL);
  return r;
}

inline unsigned __shfl_sync(unsigned mask, unsigned v, int src) { return (unsigned)__shfl_sync(mask, (int)v, src); }

inline bool emu_vote(bool pred, bool all) {  // __all_sync / __any_sync over the 32 lanes
  emu::my_lane().f[0] = pred ? 1.f : 0.f;
  emu::warp_sync(emu::OP_SHFL);
  bool r = all;
  for (int l = 0; l < 32; ++l) {
    const bool p = emu::lane_of(l).f[0] != 0.f;
    r = all ? (r && p) : (r || p);
  }
  emu::warp_sync(emu::OP_SHFL);
  return r;
}
inline int __all_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) emu::fail("__all_sync with a partial mask");
  return emu_vote(pred != 0, true);
}
inline int __any_sync(unsigned mask, int pred) {
  if (mask != 0xffffffffu) emu::fail("__any_sync with a partial mask");
  return emu_vote(pred != 0, false);
}

// ---- replacements of the inline-PTX helpers (mla_common.cuh and kernel files)

inline u32 smem_u32(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < emu::smem_base || c > emu::smem_base + emu::smem_size) emu::fail("smem_u32 of a non-shared pointer");
  return (u32)(c - emu::smem_base);
}

inline u32 pack2(float lo, float hi) { return (u32)emu::f2e(lo) | ((u32)emu::f2e(hi) << 16); }
inline float lo_f(u32 x) { return emu::e2f((unsigned short)(x & 0xffff)); }
inline float hi_f(u32 x) { return emu::e2f((unsigned short)(x >> 16)); }
inline mla_elem_t to_elem(float x) { return emu::f2e(x); }
inline float fast_exp2(float x) { return std::exp2(x); }
// prmt.b32 (default mode: selector nibble bits 0-2 pick a byte of [y:x], bit 3 replicates its sign), << 4, & mask
inline u32 e4m3_pair_to_bf16x2_2m120(u32 x, u32 y, u32 sel) {
  const unsigned long long v = ((unsigned long long)y << 32) | x;
  u32 a = 0;
  for (int n = 0; n < 4; ++n) {
    const u32 nib = (sel >> (4 * n)) & 15u, byte = (u32)(v >> (8 * (nib & 7u))) & 0xffu;
    a |= ((nib & 8u) ? ((byte & 0x80u) ? 0xffu : 0u) : byte) << (8 * n);
  }
  return (a << 4) & 0x87F087F0u;
}
inline void e4m3x4_to_bf16x4_2m120(u32 w, u32& lo, u32& hi) {  // prmt (sign fill), << 4, & 0x87F087F0, twice
  auto bf = [](u32 c) { return ((c & 0x7Fu) << 4) | ((c & 0x80u) << 8); };  // value * 2^-120 as bf16 bits
  lo = bf(w & 0xFF) | (bf((w >> 8) & 0xFF) << 16);
  hi = bf((w >> 16) & 0xFF) | (bf(w >> 24) << 16);
}
inline float emu_bf16_to_f(unsigned short b) {
  const u32 u = (u32)b << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned short emu_f_to_bf16(float f) {  // round to nearest even
  u32 u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fff;
  return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline u32 bf16x2_mul(u32 a, u32 b) {  // mul.rn.bf16x2: the product of two bf16 is exact in fp32, then rounded
  const float lo = emu_bf16_to_f(a & 0xffff) * emu_bf16_to_f(b & 0xffff);
  const float hi = emu_bf16_to_f(a >> 16) * emu_bf16_to_f(b >> 16);
  return emu_f_to_bf16(lo) | ((u32)emu_f_to_bf16(hi) << 16);
}
inline uint2 ldg_nc_v2(const void* p, bool valid) {
  uint2 r{0u, 0u};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(p) % 8) emu::fail("misaligned ld.global.v2");
    std::memcpy(&r, p, 8);
  }
  return r;
}
inline uint4 ldg_nc_v4(const void* p, bool valid) {
  uint4 r{0u, 0u, 0u, 0u};
  if (valid) {
    if (reinterpret_cast<uintptr_t>(p) % 16) emu::fail("misaligned ld.global.v4");
    std::memcpy(&r, p, 16);
  }
  return r;
}
inline int ldg_nc_i32_or(const int* p, bool valid, int dflt) { return valid ? *p : dflt; }
inline float ldg_nc_f32_or1(const void* p, bool valid) {
  float r = 1.f;
  if (valid) std::memcpy(&r, p, 4);
  return r;
}
inline float mul_rn(float a, float b) {  // one IEEE rounding, subnormals kept (no FTZ on the host)
  volatile float r = a * b;
  return r;
}

inline void emu_cp_async(void* smem, const void* gmem, int size, bool pred) {
  unsigned char* d = static_cast<unsigned char*>(smem);
  emu::smem_at(smem_u32(d), size, size);
  if (pred && reinterpret_cast<uintptr_t>(gmem) % size) emu::fail("misaligned cp.async global address");
  if (emu::eager_copies) {  // the earliest moment instead: a buffer refilled while others still read it shows
    std::memset(d, 0, size);
    if (pred) std::memcpy(d, gmem, size);
  } else {
    emu::fibers[emu::cur].open.push_back(emu::Copy{d, static_cast<const unsigned char*>(gmem), size, pred ? size : 0});
  }
}
inline void cp_async16(void* smem, const void* gmem, bool pred) { emu_cp_async(smem, gmem, 16, pred); }
inline void cp_async4(void* smem, const void* gmem, bool pred) { emu_cp_async(smem, gmem, 4, pred); }
inline void cp_async_commit() {
  auto& f = emu::fibers[emu::cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
template <int N>
inline void cp_async_wait() {
  auto& f = emu::fibers[emu::cur];
  while ((int)f.groups.size() > N) {
    for (auto& c : f.groups.front()) {
      std::memset(c.dst, 0, c.size);
      if (c.src_size) std::memcpy(c.dst, c.src, c.src_size);
    }
    f.groups.erase(f.groups.begin());
  }
}

inline void red_add2(float* p, float a, float b) {
  p[0] += a;
  p[1] += b;
}
inline float atomicAdd(float* p, float a) {
  const float old = *p;
  *p = old + a;
  return old;
}

// ldmatrix: matrix i's row r address comes from lane 8 i + r
inline u32 emu_ldsm_elem_pair(int mat, int row, int col) {  // two 16-bit elements (row, col), (row, col+1)
  const u32 a = emu::lane_of(8 * mat + row).u[0];
  emu::smem_at(a, 16, 16);
  u32 v;
  std::memcpy(&v, emu::smem_base + a + 2 * col, 4);
  return v;
}
inline u32 emu_ldsm_trans(int mat, int L) {  // (row 2 (L%4), col L/4) low, (row 2 (L%4) + 1, col L/4) high
  const int r = 2 * (L & 3), c = L >> 2;
  const u32 a0 = emu::lane_of(8 * mat + r).u[0], a1 = emu::lane_of(8 * mat + r + 1).u[0];
  emu::smem_at(a0, 16, 16);
  emu::smem_at(a1, 16, 16);
  unsigned short lo, hi;
  std::memcpy(&lo, emu::smem_base + a0 + 2 * c, 2);
  std::memcpy(&hi, emu::smem_base + a1 + 2 * c, 2);
  return (u32)lo | ((u32)hi << 16);
}
inline void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  emu::my_lane().u[0] = addr;
  emu::warp_sync(emu::OP_LDSM4);
  const int L = emu::lane_id();
  r0 = emu_ldsm_elem_pair(0, L >> 2, 2 * (L & 3));
  r1 = emu_ldsm_elem_pair(1, L >> 2, 2 * (L & 3));
  r2 = emu_ldsm_elem_pair(2, L >> 2, 2 * (L & 3));
  r3 = emu_ldsm_elem_pair(3, L >> 2, 2 * (L & 3));
  emu::warp_sync(emu::OP_LDSM4);
}
inline void ldsm_x2(u32 addr, u32& r0, u32& r1) {
  emu::my_lane().u[0] = addr;
  emu::warp_sync(emu::OP_LDSM2);
  const int L = emu::lane_id();
  r0 = emu_ldsm_elem_pair(0, L >> 2, 2 * (L & 3));
  r1 = emu_ldsm_elem_pair(1, L >> 2, 2 * (L & 3));
  emu::warp_sync(emu::OP_LDSM2);
}
inline void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  emu::my_lane().u[0] = addr;
  emu::warp_sync(emu::OP_LDSM4T);
  const int L = emu::lane_id();
  r0 = emu_ldsm_trans(0, L);
  r1 = emu_ldsm_trans(1, L);
  r2 = emu_ldsm_trans(2, L);
  r3 = emu_ldsm_trans(3, L);
  emu::warp_sync(emu::OP_LDSM4T);
}

// D[16x8] += A[16x16] B[16x8], fp32 accumulate (products of 16-bit values are exact in fp32)
inline void mma16816(float* d, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
  emu::Lane& me = emu::my_lane();
  me.u[0] = a0, me.u[1] = a1, me.u[2] = a2, me.u[3] = a3, me.u[4] = b0, me.u[5] = b1;
  emu::warp_sync(emu::OP_MMA);
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const emu::Lane& x = emu::lane_of(L);
    const int g = L >> 2, t = L & 3;
    const int rows[4] = {g, g + 8, g, g + 8}, cols[4] = {2 * t, 2 * t, 2 * t + 8, 2 * t + 8};
    for (int i = 0; i < 4; ++i) {
      A[rows[i]][cols[i]] = lo_f(x.u[i]);
      A[rows[i]][cols[i] + 1] = hi_f(x.u[i]);
    }
    B[2 * t][g] = lo_f(x.u[4]);
    B[2 * t + 1][g] = hi_f(x.u[4]);
    B[2 * t + 8][g] = lo_f(x.u[5]);
    B[2 * t + 9][g] = hi_f(x.u[5]);
  }
  const int L = emu::lane_id(), g = L >> 2, t = L & 3;
  const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  float out[4];
  for (int i = 0; i < 4; ++i) {
    float acc = d[i];
    for (int kk = 0; kk < 16; ++kk) acc += A[rr[i]][kk] * B[kk][cc[i]];
    out[i] = acc;
  }
  emu::warp_sync(emu::OP_MMA);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// tests/_cuda_emu.py: cp.async timing (0 lazy, 1 eager) and schedule (0 lockstep, 1 skewed, 2 reverse)
extern "C" void emu_config(int eager, int sched) {
  emu::eager_copies = eager != 0;
  emu::schedule = sched;
}
