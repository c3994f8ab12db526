"""Does a proxy fence wait for the issuing thread's copies in flight? (issue #5, 2026-11-26, eighth session)

The Hopper kernels run ``fence.proxy.async.shared::cta`` (SASS: MEMBAR.ALL.CTA + FENCE.VIEW.ASYNC.S) after writing
shared memory that wgmma reads next. If that fence waits until the thread's earlier copies have landed, a copy is
only in flight between two fences, and a kernel with two fences a tile exposes its loads' latency every tile. This
probe times the fence, on one CTA of 128 threads, right after each thread issued ``n`` 16-byte loads of a kind:

  cpasync   cp.async.cg (global -> shared, LDGSTS)          ldg   ld.global into registers (used after the fence)
  bulk      thread 0: one cp.async.bulk of 128 n * 16 bytes on an mbarrier
  none      nothing in flight (the fence's own cost)

against the loads' latency (the time a wait for them takes when nothing else is timed), with the keys in DRAM
(a fresh 256 MB region each launch) or in L2 (the same 1 MB region again). Also ``__threadfence_block`` (MEMBAR
alone) for cp.async. clock64 of thread 0, median over launches.

  python3 benchmarks/fence_drain_probe.py [--launches 50]
"""

from __future__ import annotations

import argparse
import statistics

import cupy as cp

SRC = r"""
typedef unsigned long long u64;
typedef unsigned int u32;
__device__ __forceinline__ u32 smem_u32(const void* p) { return (u32)__cvta_generic_to_shared(p); }

// mode: 0 cp.async + proxy fence, 1 cp.async + wait_all (latency), 2 ldg + proxy fence, 3 ldg + use (latency),
// 4 bulk + proxy fence (thread 0), 5 bulk + mbarrier wait (latency), 6 nothing + proxy fence,
// 7 cp.async + __threadfence_block
extern "C" __global__ void __launch_bounds__(128) probe(const uint4* __restrict__ src, u64* out, int mode, int n,
                                                          unsigned* sink) {
  __shared__ __align__(128) uint4 buf[128 * 16];
  __shared__ __align__(8) u64 bar;
  const int tid = threadIdx.x;
  if (tid == 0) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(smem_u32(&bar)));
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  uint4 r[16];
  u64 t0 = 0, t1 = 0, t2 = 0;
  if (mode == 0 || mode == 1 || mode == 7) {
    for (int k = 0; k < n; ++k)
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(&buf[k * 128 + tid])),
                   "l"(src + k * 128 + tid) : "memory");
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    t0 = clock64();
    if (mode == 0) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    if (mode == 1) asm volatile("cp.async.wait_all;\n" ::: "memory");
    if (mode == 7) __threadfence_block();
    t1 = clock64();
    asm volatile("cp.async.wait_all;\n" ::: "memory");
    t2 = clock64();
  } else if (mode == 2 || mode == 3) {
#pragma unroll
    for (int k = 0; k < 16; ++k)
      if (k < n) asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n"
                              : "=r"(r[k].x), "=r"(r[k].y), "=r"(r[k].z), "=r"(r[k].w) : "l"(src + k * 128 + tid));
    t0 = clock64();
    if (mode == 2) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    t1 = clock64();
    unsigned acc = 0;
#pragma unroll
    for (int k = 0; k < 16; ++k)
      if (k < n) acc += r[k].x ^ r[k].w;
    if (acc == 0x12345678u) sink[0] = acc;
    t2 = clock64();
  } else if (mode == 4 || mode == 5) {
    if (tid == 0) {
      const u32 bytes = 128u * 16u * n;
      asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(&bar)), "r"(bytes)
                   : "memory");
      asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                   ::"r"(smem_u32(buf)), "l"(src), "r"(bytes), "r"(smem_u32(&bar)) : "memory");
      t0 = clock64();
      if (mode == 4) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      t1 = clock64();
      u32 done = 0;
      while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n"
                     "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(smem_u32(&bar)) : "memory");
      t2 = clock64();
    }
  } else {
    t0 = clock64();
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    t1 = clock64();
    t2 = t1;
  }
  if (tid == 0) {
    out[0] = t1 - t0;  // the timed step
    out[1] = t2 - t0;  // until everything has landed
  }
  if (mode == 4 || mode == 5) __syncthreads();
}
"""

MODES = {"cpasync+fence": 0, "cpasync+wait": 1, "ldg+fence": 2, "ldg+use": 3, "bulk+fence": 4, "bulk+wait": 5,
         "fence alone": 6, "cpasync+threadfence_block": 7}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--launches", type=int, default=50)
    args = ap.parse_args()
    fn = cp.RawModule(code=SRC, options=("-arch=sm_90a", "-std=c++17")).get_function("probe")
    big = cp.zeros((256 << 20) // 16 * 8, dtype=cp.uint32).reshape(-1, 4)  # 512 MB of uint4
    small = big[: (1 << 20) // 16]
    out = cp.zeros(2, dtype=cp.uint64)
    sink = cp.zeros(1, dtype=cp.uint32)
    flush = cp.empty(128 << 20, dtype=cp.uint8)  # written before every DRAM launch: the keys leave the 50 MB L2
    print(f"device: {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print("| in flight | where | n x 16 B a thread | timed step (cycles) | until landed (cycles) |")
    print("|---|---|---|---|---|")
    for where in ("dram", "l2"):
        for n in (1, 4, 16):
            for name, mode in MODES.items():
                steps, totals = [], []
                for i in range(args.launches):
                    src = small
                    if where == "dram":
                        flush.fill(i & 0xFF)
                        src = big[(i * (8 << 20)) // 16:]
                    fn((1,), (128,), (src, out, cp.int32(mode), cp.int32(n), sink))
                    o = out.get()
                    steps.append(int(o[0]))
                    totals.append(int(o[1]))
                print(f"| {name} | {where} | {n} | {statistics.median(steps):.0f} | {statistics.median(totals):.0f} |",
                      flush=True)


if __name__ == "__main__":
    main()
