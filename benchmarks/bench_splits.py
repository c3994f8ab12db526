"""Kernel time of the CuPy decode (what backend="cupy" runs) against the number of workers of the plan, on the
few-long-sequence shapes of issue #4: does a plan with fewer, longer splits (less partial traffic, a
cheaper combine) beat one worker an SM?

    python3 benchmarks/bench_splits.py [--reps 30] [--parts] [--shapes "8,1,16,2048 8,1,16,8192"] [--null]
        [--contiguous] [--clean-flush]

Prints one markdown row a (shape, SM basis): num_sms passed to mla.get_mla_metadata (132 = the H100's count,
the default), the resulting workers and partials, kernel ms (decode + combine, L2 flushed, median).
"""

from __future__ import annotations

import argparse

import numpy as np

SHAPES = ((8, 1, 16, 8192), (1, 1, 128, 32768), (4, 1, 16, 16384))
D, DV, PAGE = 576, 512, 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--parts", action="store_true",
                    help="at the default SM basis only, also time the decode kernel and the combine alone")
    ap.add_argument("--shapes", default=None, help="b,s_q,h_q,s_k shapes, space-separated (default: SHAPES)")
    ap.add_argument("--contiguous", action="store_true",
                    help="block tables in order (sequence i's pages one after another) instead of a random permutation:"
                         " does page locality (TLB reach, DRAM rows) matter?")
    ap.add_argument("--clean-flush", action="store_true",
                    help="flush the L2 by reading 256 MB instead of rewriting it (no dirty lines for the launches to"
                         " write back: cupy_backend.time_launches)")
    ap.add_argument("--null", action="store_true",
                    help="first time an empty kernel (132 CTAs of 256 threads) with the same harness: its floor")
    args = ap.parse_args(argv)
    shapes = SHAPES if args.shapes is None else [tuple(int(x) for x in sh.split(",")) for sh in args.shapes.split()]
    import cupy as cp

    import mla
    from mla import _arrays, api
    from mla.backends import cupy_backend

    flush = cp.empty(256 << 20, dtype=cp.uint8)
    rng = np.random.default_rng(0)
    dev = cp.cuda.Device().id
    print("| b, s_q, h_q, s_k | SM basis | workers | partials | kernel ms | GB/s |")
    print("|---|---|---|---|---|---|")
    if args.null:  # without and with the narrow kernel's dynamic shared memory (182848 B: a carve-out change)
        empty = cp.RawKernel('extern "C" __global__ void empty() {}', "empty")
        empty.max_dynamic_shared_size_bytes = 182848
        for smem in (0, 182848):
            t = cupy_backend.time_launches(cp, [(empty, (132,), (256,), (), smem)], flush, args.reps,
                                                 args.clean_flush)
            print(f"| empty kernel, {smem} B dynamic smem | 132 CTAs | | | {t * 1e3:.4f} | |", flush=True)
    for b, s_q, h_q, s_k in shapes:
        blocks = b * s_k // PAGE
        q = cupy_backend._random_device(cp, (b, s_q, h_q, D), _arrays.BFLOAT16)
        k = cupy_backend._random_device(cp, (blocks, PAGE, 1, D), _arrays.BFLOAT16)
        order = np.arange(blocks) if args.contiguous else rng.permutation(blocks)
        table = cp.asarray(order.astype(np.int32).reshape(b, s_k // PAGE))
        seqlens = cp.full((b,), s_k, dtype=cp.int32)
        problem = api._validate(q, k, table, seqlens, DV, None, False, False, None, None, None, False)
        nbytes = b * (s_q * h_q * D * 2 + s_k * D * 2 + s_q * h_q * DV * 2)
        for sms in (132,) if args.parts else (132, 110, 88, 66, 44):
            sched, splits = mla.get_mla_metadata(seqlens.get(), s_q * h_q, 1, num_sms=sms)
            launches, _, _ = cupy_backend._prepare(cp, problem, sched, splits, dev, "auto")
            t = cupy_backend.time_launches(cp, launches, flush, args.reps, args.clean_flush)
            print(f"| {b}, {s_q}, {h_q}, {s_k} | {sms} | {sched.shape[0]} | {int(splits[-1])} | {t * 1e3:.4f} | "
                  f"{nbytes / t / 1e9:.0f} |", flush=True)
            if args.parts:  # the decode alone, the combine alone (on the decode's partials), each L2-flushed
                for name, part in (("decode alone", launches[:1]), ("combine alone", launches[1:])):
                    if part:
                        tp = cupy_backend.time_launches(cp, part, flush, args.reps, args.clean_flush)
                        print(f"| {b}, {s_q}, {h_q}, {s_k} | {name} | | | {tp * 1e3:.4f} | |", flush=True)


if __name__ == "__main__":
    main()
