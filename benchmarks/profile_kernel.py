"""One decode launch of a CuPy kernel on the memory-bound shape, for Nsight Compute.

    ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \\
        python3 benchmarks/profile_kernel.py --kernel hopper|portable|fp8 [--b 128 --s-q 1 --h-q 16 --s-k 8192]
        [--topk 2048]   # sparse decode (DSA indices into the same cache): --kernel hopper (bf16) or fp8

Runs the decode three times (two warm-up launches, then the profiled one); prints the time of one
more call with CUDA events so the run under ncu can be compared with an unprofiled one.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla import _arrays  # noqa: E402

D, DV, PAGE = 576, 512, 64


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kernel", choices=("portable", "hopper", "fp8"), default="portable")
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--s-q", type=int, default=1)
    ap.add_argument("--h-q", type=int, default=16)
    ap.add_argument("--s-k", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=None, help="sparse decode with this many random indices a row")
    args = ap.parse_args(argv)
    os.environ["MLA_CUPY_KERNEL"] = "portable" if args.kernel == "fp8" else args.kernel
    b, s_q, h_q, s_k = args.b, args.s_q, args.h_q, args.s_k
    blocks = b * s_k // PAGE
    bits = (cp.random.standard_normal((blocks, PAGE, 1, D), dtype=cp.float32).view(cp.uint32) >> 16)
    cache = bits.astype(cp.uint16).view(_arrays.BFLOAT16)
    if args.kernel == "fp8":
        cache = mla.quantize_kv_fp8(cache)
    q = (cp.random.standard_normal((b, s_q, h_q, D), dtype=cp.float32).view(cp.uint32) >> 16).astype(
        cp.uint16).view(_arrays.BFLOAT16)
    table = cp.asarray(np.random.default_rng(0).permutation(blocks).astype(np.int32).reshape(b, -1))
    seqlens = cp.full((b,), s_k, dtype=cp.int32)
    sched, splits = mla.get_mla_metadata(seqlens, s_q * h_q, 1)  # device lengths: a device plan
    indices = None
    if args.topk:  # logical positions -> token rows through the block table (as bench_fp8_sparse.py)
        pos = cp.random.randint(0, s_k, size=(b, s_q, args.topk)).astype(cp.int32)
        indices = (table[cp.arange(b)[:, None, None], pos // PAGE] * PAGE + pos % PAGE).astype(cp.int32)
        sched, splits = mla.get_mla_metadata(cp.zeros(b, cp.int32), s_q * h_q, 1, topk=args.topk)  # device plan

    def call():
        if indices is not None:
            return mla.flash_mla_with_kvcache(q, cache, None, None, DV, sched, splits, indices=indices,
                                              is_fp8_kvcache=args.kernel == "fp8", backend="cupy", validate=False)
        return mla.flash_mla_with_kvcache(q, cache, table, seqlens, DV, sched, splits, causal=s_q > 1,
                                          is_fp8_kvcache=args.kernel == "fp8", backend="cupy", validate=False)

    for _ in range(3):
        call()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    call()
    stop.record()
    stop.synchronize()
    print(f"{args.kernel} b={b} s_q={s_q} h_q={h_q} s_k={s_k}: {cp.cuda.get_elapsed_time(start, stop):.3f} ms "
          "(one call, after the profiled ones)")


if __name__ == "__main__":
    main()
