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
"""

import sys

import cupy as cp

SRC = r"""
extern "C" __global__ void probe(float* out, int variant) {
  __shared__ float x[64];
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
    if (variant > 0) {
      if (t == 0) asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], 0;" ::"r"(b) : "memory");
      const unsigned parity = round & 1;
      if (variant == 1 || (tid & 31) == 0) {
        unsigned done = 0;
        while (!done)
          asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                       "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(b), "r"(parity) : "memory");
      }
      if (variant == 2) __syncwarp();
    }
    if (wg == 0 && (t & 3) == 0) x[t >> 1] = (float)(round + t);
    asm volatile("bar.sync 1, 256;" ::: "memory");
    if (wg == 1) acc += x[t >> 1];
    asm volatile("bar.sync 2, 256;" ::: "memory");
  }
  out[tid] = acc;
}
"""


def main():
    variant = {"plain": 0, "mbar": 1, "mbar_lane0": 2}[sys.argv[1]]
    fn = cp.RawKernel(SRC, "probe", options=("-arch=sm_90a",))
    out = cp.zeros(256, dtype=cp.float32)
    fn((1,), (256,), (out, cp.int32(variant)))
    cp.cuda.Device().synchronize()
    print("PROBE-DONE", sys.argv[1], float(out[128:].sum()))


if __name__ == "__main__":
    main()
