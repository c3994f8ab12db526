"""Where a tile's time goes in the narrow kernel, and when its CTAs start and end (diagnostics, GPU only).

    python3 benchmarks/narrow_trace.py [--b 8 --h-q 16 --s-k 8192] [--clean-flush] [--fused]

Builds kernels/mla_decode_hopper_narrow.cu with -DMLA_NARROW_TRACE=1: thread 0 of CTAs 0..3 stores clock64() at 7
points of each of its first 128 tiles (top; tile landed (cp.async wait + barrier); S^T done; S^T swapped; P^T
stored; O^T done; end barrier), and every CTA its globaltimer (ns) at entry and exit. Runs one decode after the L2
is flushed (as the kernels-only benchmarks) and prints, for CTA 0..3, each tile's cycles from its top to each point
and to the next tile's top, then the CTAs' start and end times (µs from the first start). --fused: the build that
merges its own split sequences (-DMLA_FUSED=1, launched cooperatively), whose CTAs end after the merge; every CTA's
last-piece-done time (before any merge) is printed too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla import _arrays, api  # noqa: E402
from mla.backends import _nvrtc, cupy_backend, cupy_hopper  # noqa: E402

POINTS = ["top", "landed", "S", "swap", "P", "O", "end"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=8)
    ap.add_argument("--h-q", type=int, default=16)
    ap.add_argument("--s-k", type=int, default=8192)
    ap.add_argument("--clean-flush", action="store_true",
                    help="flush the L2 by reading 256 MB instead of rewriting it (no dirty lines to write back)")
    ap.add_argument("--fused", action="store_true",
                    help="the fused build (merges its split sequences)")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    page, d, dv = 64, cupy_hopper.D, cupy_hopper.DV
    nblk = args.s_k // page
    q = cp.asarray(rng.standard_normal((args.b, 1, args.h_q, d), np.float32)).astype(_arrays.BFLOAT16)
    cache = cp.asarray(rng.standard_normal((args.b * nblk, page, 1, d), np.float32)).astype(_arrays.BFLOAT16)
    table = cp.asarray(rng.permutation(args.b * nblk).astype(np.int32).reshape(args.b, nblk))
    lens = cp.full((args.b,), args.s_k, cp.int32)
    defines = {"MLA_FP16": 0, "MLA_NARROW_TRACE": 1, **({"MLA_FUSED": 1} if args.fused else {})}
    module = cp.RawModule(code=_nvrtc.read_source(cupy_hopper.NARROW_SOURCE),
                          options=_nvrtc.options(cupy_hopper.ARCH, defines), backend="nvrtc",
                          enable_cooperative_groups=args.fused)
    fn = module.get_function(cupy_hopper.NARROW_FUNCTION)
    smem = cupy_hopper.narrow_smem_bytes(cupy_hopper.p_split(defines))
    fn.max_dynamic_shared_size_bytes = smem
    problem = api._validate(q, cache, table, lens, dv, None, False, False, None, None, None, True)
    sched, splits = mla.get_mla_metadata(lens.get(), args.h_q, 1)
    comb = cupy_backend.combine_function(dv, False, False, args.b * args.h_q)
    launches, out, lse = cupy_hopper.assemble(cp, fn, comb, problem, q, cache, table, lens, cp.asarray(sched),
                                              cp.asarray(splits), host_splits=splits, narrow=True, smem=smem,
                                              fused_fn=fn if args.fused else None)
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    for _ in range(3):  # warm-up, then the traced run after an L2 flush
        if args.clean_flush:
            flush.view(cp.uint64).sum()
        else:
            flush.fill(1)
        for f, grid, block, a, sm in launches[:1]:
            f(grid, block, a, shared_mem=sm)
    cp.cuda.Device().synchronize()
    trace = cp.ndarray((4, 128, 8), cp.int64, module.get_global("narrow_trace")).get()
    span = cp.ndarray((1024, 3), cp.uint64, module.get_global("narrow_span")).get().astype(np.int64)
    workers = int(sched.shape[0])
    print(f"shape b={args.b} h_q={args.h_q} s_k={args.s_k}; {workers} workers; cycles from each tile's top "
          f"(columns: {', '.join(POINTS[1:])}; next = to the next tile's top)")
    for c in range(4):
        n = int((trace[c, :, 0] != 0).sum())
        print(f"CTA {c}: {n} tiles traced")
        for t in range(n):
            rel = trace[c, t, 1:7] - trace[c, t, 0]
            nxt = trace[c, t + 1, 0] - trace[c, t, 0] if t + 1 < n else 0
            print(f"  tile {t:3d} {' '.join(f'{x:6d}' for x in rel)}  next {nxt}")
    start, end = span[:workers, 0], span[:workers, 1]
    t0 = start.min()
    print(f"CTA start (µs after the first): median {np.median(start - t0) / 1e3:.2f}, "
          f"max {(start - t0).max() / 1e3:.2f}")
    busy = np.asarray(sched)[:workers, 0] <= np.asarray(sched)[:workers, 2]  # workers with a piece
    done = span[:workers, 2]
    print("CTA last piece done (µs, workers with a piece): min {:.2f}, p10 {:.2f}, median {:.2f}, p90 {:.2f}, "
          "max {:.2f}".format(*(np.percentile(done[busy] - t0, [0, 10, 50, 90, 100]) / 1e3)))
    pct = np.percentile(end - t0, [0, 10, 50, 90, 100]) / 1e3
    print("CTA end   (µs after the first start): min {:.2f}, p10 {:.2f}, median {:.2f}, p90 {:.2f}, max {:.2f}"
          .format(*pct))
    begin_b = np.asarray(sched)[:, 0]
    by_seq = [(i, (end[begin_b == i] - t0) / 1e3) for i in range(args.b) if (begin_b == i).any()]
    print("end by first sequence (µs, median / max, CTAs):",
          "; ".join(f"{i}: {np.median(e):.2f} / {e.max():.2f} ({len(e)})" for i, e in by_seq))
    print("CTA 0..3 start / end (µs):", [(round((start[c] - t0) / 1e3, 2), round((end[c] - t0) / 1e3, 2))
                                        for c in range(4)])


if __name__ == "__main__":
    main()
