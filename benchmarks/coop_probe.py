"""Can the decode kernels merge their own split partials? Costs of a cooperative launch and of a grid barrier
(diagnostics, GPU only).

    python3 benchmarks/coop_probe.py [--reps 50]

A combine fused into the decode kernel needs every CTA's partials written before any CTA merges them: a barrier
across the grid, safe only when every CTA is resident, which a cooperative launch guarantees (the driver refuses
a grid that cannot be). CuPy launches a RawModule's kernels cooperatively with ``enable_cooperative_groups=True``
(CuPy 14 adds no compile option for it). The barrier's word is the driver's per-launch grid workspace, whose
address the driver leaves in %envreg1 (high half) / %envreg2 (low half). Times (CUDA events, L2 flushed by
reading, medians) of 132 CTAs of 256 threads with the narrow kernel's 182,848 B of shared memory (one CTA an SM):
an empty kernel launched plainly and cooperatively, and kernels of 1 and 8 grid barriers; then a CUDA graph of a
cooperative launch is captured and replayed.
"""

from __future__ import annotations

import argparse

import numpy as np

SOURCE = r"""
__device__ __forceinline__ unsigned* grid_barrier_word() {
  unsigned long long p;
  asm volatile("mov.b64 %0, {%%envreg2, %%envreg1};" : "=l"(p));
  return reinterpret_cast<unsigned*>(p) + 1;
}
__device__ __forceinline__ void grid_barrier() {
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned* word = grid_barrier_word();
    const unsigned n = gridDim.x * gridDim.y * gridDim.z;
    const unsigned add = (blockIdx.x | blockIdx.y | blockIdx.z) == 0 ? 0x80000000u - (n - 1) : 1u;
    unsigned old, cur;
    __threadfence();
    asm volatile("atom.add.release.gpu.u32 %0, [%1], %2;" : "=r"(old) : "l"(word), "r"(add) : "memory");
    do {
      asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(cur) : "l"(word) : "memory");
    } while (((old ^ cur) & 0x80000000u) == 0);
  }
  __syncthreads();
}
extern "C" __global__ void empty_kernel() {}
extern "C" __global__ void barrier_kernel(int n, unsigned long long* workspace, int* seen) {
  for (int k = 0; k < n; ++k) {
    if (threadIdx.x == 0) atomicAdd(seen + k, 1);
    grid_barrier();
    // past barrier k every CTA of this launch has counted itself in seen[k] (launches run one after another, so the
    // count is a multiple of the grid over all launches so far); a CTA seeing anything else left the barrier early
    if (threadIdx.x == 0 && seen[k] % (int)(gridDim.x * gridDim.y * gridDim.z) != 0) atomicAdd(seen + 63, 1);
  }
  if (threadIdx.x == 0 && blockIdx.x == 0) {
    unsigned long long p;
    asm volatile("mov.b64 %0, {%%envreg2, %%envreg1};" : "=l"(p));
    *workspace = p;
  }
}
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    import cupy as cp

    from mla.backends import cupy_backend

    smem, grid, block = 182848, (132,), (256,)
    plain = cp.RawModule(code=SOURCE, options=("-arch=sm_90a",))
    coop = cp.RawModule(code=SOURCE, options=("-arch=sm_90a",), enable_cooperative_groups=True)
    fns = {}
    for name, mod in (("plain", plain), ("coop", coop)):
        for k in ("empty_kernel", "barrier_kernel"):
            f = mod.get_function(k)
            f.max_dynamic_shared_size_bytes = smem
            fns[name, k] = f
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    ws = cp.zeros(1, cp.uint64)
    seen = cp.zeros(64, cp.int32)

    def timed(label, launches):
        t = cupy_backend.time_launches(cp, launches, flush, args.reps, clean_flush=True)
        print(f"| {label} | {t * 1e6:.2f} |", flush=True)
        return t

    print("| launch (132 CTAs x 256 threads, 182848 B smem) | µs (median, L2 flushed by reading) |")
    print("|---|---|")
    timed("empty, plain launch", [(fns["plain", "empty_kernel"], grid, block, (), smem)])
    timed("empty, cooperative launch", [(fns["coop", "empty_kernel"], grid, block, (), smem)])
    seen.fill(0)
    for n in (1, 8):
        timed(f"{n} grid barrier(s), cooperative",
              [(fns["coop", "barrier_kernel"], grid, block, (np.int32(n), ws, seen), smem)])
    cp.cuda.Device().synchronize()
    print("workspace address (envreg2:envreg1):", hex(int(ws.get()[0])))
    s = seen.get()
    print("barrier check over every timed launch: arrivals a multiple of 132:", bool((s[:8] % 132 == 0).all()),
          "| CTAs that left a barrier early:", int(s[63]))
    # a CUDA graph with a cooperative launch
    seen.fill(0)
    stream = cp.cuda.Stream(non_blocking=True)
    try:
        with stream:
            stream.begin_capture()
            fns["coop", "barrier_kernel"](grid, block, (np.int32(2), ws, seen), shared_mem=smem)
            graph = stream.end_capture()
        for _ in range(3):
            graph.launch(stream)
        stream.synchronize()
        s = seen.get()
        print("graph of a cooperative launch: replayed 3x, arrivals", s[:2].tolist(), "(3 x 132 each), early leavers",
              int(s[63]))
    except Exception as exc:  # noqa: BLE001 (a probe: report what the driver says)
        print("graph of a cooperative launch failed:", type(exc).__name__, exc)
    # too many CTAs for one an SM: the driver must refuse
    try:
        fns["coop", "empty_kernel"]((264,), block, (), shared_mem=smem)
        cp.cuda.Device().synchronize()
        print("264 CTAs of 182848 B launched cooperatively: no error (unexpected)")
    except Exception as exc:  # noqa: BLE001
        print("264 CTAs of 182848 B, cooperative: refused:", type(exc).__name__, str(exc)[:120])


if __name__ == "__main__":
    main()
