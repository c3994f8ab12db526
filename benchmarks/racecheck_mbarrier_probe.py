"""Does compute-sanitizer's racecheck order shared-memory accesses across bar.sync when mbarrier waits happen in
between? (2026-11-26, seventh session: racecheck flagged the seesaw kernel's TMA build on sMa / sL accesses that
full named barriers order, and not its cp.async build.)

    compute-sanitizer --tool racecheck python benchmarks/racecheck_mbarrier_probe.py VARIANT

A 256-thread CTA, 8 rounds. Each round warpgroup 0 writes x[64] (its quad leads, as the kernel's sMa), all 256
threads bar.sync 1, warpgroup 1 reads x; then bar.sync 2 before the next round's writes. Variant "plain": nothing
else. "mbar": before its write / read each warpgroup waits (mbarrier.try_wait.parity, every thread) on its own
mbarrier, which its thread 0 armed with arrive.expect_tx(0) (a phase completing at the arrival) right after the
previous round's bar.sync 2 -- the kernel's pattern without the copies. "mbar_lane0": the same, lane 0 of each warp
polls and __syncwarp() releases the others. The accesses to x are ordered by the bar.syncs in every variant.

2026-11-26 (eighth session), with real copies: "bulk": thread 0 of each warpgroup arms its mbarrier with
arrive.expect_tx(4096) and issues a 4 KB cp.async.bulk from global memory into its own buffer buf[wg] (never read);
"bulk_read": the same, and after the wait every thread of the warpgroup reads one word of buf[wg] (generic reads
of what the async proxy wrote, ordered by the mbarrier's phase); "bulk_fence": "bulk_read" plus a
fence.proxy.async by every thread after the wait; "bulk_read_nox": "bulk_read" without the accesses to x (are the
reported hazards on x or on buf?). Every thread waits on the mbarrier in the bulk variants. "wg_bar_before" /
"wg_bar_after": no mbarriers; warpgroup 0 alone syncs on a 128-thread named barrier (id 6) before / after writing
x, while warpgroup 1 waits at bar.sync 1 (the seesaw TMA build's zero_tail barrier before m_A is written). Built
with -lineinfo: racecheck names the source lines (of SRC). The seesaw kernel's TMA build has tensor copies, not
1-D ones; both are bulk copies of the async proxy completing on an mbarrier.
"""

import sys

import cupy as cp

SRC = r"""
extern "C" __global__ void probe(float* out, int variant, const float* src) {
  __shared__ float x[64];
  __shared__ __align__(128) float buf[2][1024];
  __shared__ __align__(8) unsigned long long bar[2];
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
  const unsigned b = (unsigned)__cvta_generic_to_shared(&bar[wg]);
  if (tid == 0) {
    for (int k = 0; k < 2; ++k)
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"((unsigned)__cvta_generic_to_shared(&bar[k])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  float acc = 0.f;
  for (int round = 0; round < 8; ++round) {
    if (variant > 0 && variant < 7) {
      if (t == 0 && variant < 3)
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 0;" ::"r"(b) : "memory");
      if (t == 0 && variant >= 3) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 4096;" ::"r"(b) : "memory");
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, [%2];"
                     ::"r"((unsigned)__cvta_generic_to_shared(buf[wg])), "l"(src + 1024 * (2 * round + wg)), "r"(b)
                     : "memory");
      }
      const unsigned parity = round & 1;
      if (variant != 2 || (tid & 31) == 0) {  // every thread waits (mbar_lane0: lane 0, then __syncwarp)
        unsigned done = 0;
        while (!done)
          asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                       "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(b), "r"(parity) : "memory");
      }
      if (variant == 2) __syncwarp();
      if (variant >= 4) acc += buf[wg][t];
      if (variant == 5) asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    if (variant == 7 && wg == 0) asm volatile("bar.sync 6, 128;" ::: "memory");  // warpgroup 0 alone, first
    if (wg == 0 && (t & 3) == 0 && variant != 6) x[t >> 1] = (float)(round + t);
    if (variant == 8 && wg == 0) asm volatile("bar.sync 6, 128;" ::: "memory");  // warpgroup 0 alone, after
    asm volatile("bar.sync 1, 256;" ::: "memory");
    if (wg == 1 && variant != 6) acc += x[t >> 1];
    asm volatile("bar.sync 2, 256;" ::: "memory");
  }
  out[tid] = acc;
}
"""


def main():
    variant = {"plain": 0, "mbar": 1, "mbar_lane0": 2, "bulk": 3, "bulk_read": 4, "bulk_fence": 5,
               "bulk_read_nox": 6, "wg_bar_before": 7, "wg_bar_after": 8}[sys.argv[1]]
    fn = cp.RawKernel(SRC, "probe", options=("-arch=sm_90a", "-lineinfo"))
    out = cp.zeros(256, dtype=cp.float32)
    src = cp.arange(16 * 1024, dtype=cp.float32)
    fn((1,), (256,), (out, cp.int32(variant), src))
    cp.cuda.Device().synchronize()
    print("PROBE-DONE", sys.argv[1], float(out[128:].sum()))


if __name__ == "__main__":
    main()
