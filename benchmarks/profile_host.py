"""Where the host time of one decode call goes (the Numba path especially), and how much of a timed
call it is.

    python3 benchmarks/profile_host.py [--backends numba cupy] [--top 25]

For each backend:
  * host us per call on a tiny problem (b=1, h_q=16, s_k=64), and a cProfile of 300 such calls
    (top functions by own time): what to remove to make small steps cheap;
  * on b=128, s_q=1, h_q=16, s_k=4096: the median CUDA-event time of one call (what bench_decode.py
    reports: host work before the first launch is inside it) beside the time per call of 20 calls
    back to back (the GPU's own time once the host runs ahead).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["numba", "cupy"])
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args(argv)

    import cupy as cp
    from bench_decode import DV, make_inputs, time_call

    import mla
    from mla import _arrays

    for backend in args.backends:
        q, k, table, seqlens = make_inputs(cp, 1, 1, 16, 64, _arrays.BFLOAT16)
        sched, splits = mla.get_mla_metadata(seqlens, 16, 1)

        def step():
            return mla.flash_mla_with_kvcache(q, k, table, seqlens, DV, sched, splits, backend=backend,  # noqa: B023
                                              validate=False)

        for _ in range(20):
            step()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(300):
            step()
        cp.cuda.Device().synchronize()
        print(f"\n== {backend}: tiny step {(time.perf_counter() - t0) / 300 * 1e6:.0f} us per call", flush=True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(300):
            step()
        prof.disable()
        cp.cuda.Device().synchronize()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:6000], flush=True)

        q, k, table, seqlens = make_inputs(cp, 128, 1, 16, 4096, _arrays.BFLOAT16)
        sched, splits = mla.get_mla_metadata(seqlens, 16, 1)
        one, _ = time_call(step, 30)
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        loops = []
        for _ in range(5):
            start.record()
            for _ in range(20):
                step()
            stop.record()
            stop.synchronize()
            loops.append(cp.cuda.get_elapsed_time(start, stop) / 20)
        print(f"== {backend}: b=128 s_q=1 h_q=16 s_k=4096: one call {one:.3f} ms (event-timed), "
              f"back to back {float(np.median(loops)):.3f} ms per call", flush=True)


if __name__ == "__main__":
    main()
