"""What the bf16 P split costs the seesaw kernel at the compute-bound shape (issues #4 / #5; H100).

    python benchmarks/bench_psplit_cost.py [--reps 20] [--rounds 3]

Since 2026-11-26 (ninth session) the Hopper kernels round bf16 P once before P V, as FlashMLA does (DESIGN §6 on
FlashMLA's inputs: docs/decisions.md); ``MLA_CUPY_PSPLIT=1`` builds the precise variant, P = P_hi + P_lo multiplied
by V in two products (47% more tensor-core work a tile). Four builds of the seesaw kernel, kernels only (prepared
launches, L2 flushed before each rep, CUDA events, medians), in interleaved rounds (the GPU is power-capped here):

* bf16, P rounded once (the default, TMA loads as dispatched);
* bf16 with the split (``MLA_CUPY_PSPLIT=1``);
* fp16 inputs (P in fp16, no split), with TMA loads and with cp.async.

(Runs 2-3 and 6-7 of 2026-11-26i timed other orders of the unsplit schedule through diagnostic builds, all slower or
within noise, and runs 20 and 22 of 2026-11-26h two diagnostics that converted bf16 tiles to fp16 inside the kernel,
slower than the split or barely faster; all were removed: benchmarks/NOTES_cupy.md, eighth and ninth sessions.)

TFLOP/s = 2 b s_q h_q s_k (576 + 512) / time, the same count for all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla import _arrays, api  # noqa: E402
from mla.backends import cupy_backend  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", default="128,2,128,8192")
    args = ap.parse_args(argv)
    from bench_decode import make_inputs

    b, s_q, h_q, s_k = (int(x) for x in args.shape.split(","))
    os.environ["MLA_CUPY_KERNEL"] = "hopper"
    os.environ["MLA_HOPPER_VARIANT"] = "seesaw"
    dev = cp.cuda.Device().id
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    flops = 2 * b * s_q * h_q * s_k * (576 + 512)
    launches = {}
    builds = (("bf16, P rounded once (shipped)", _arrays.BFLOAT16, "auto", None),
              ("bf16, P split (MLA_CUPY_PSPLIT=1)", _arrays.BFLOAT16, "auto", "1"),
              ("fp16", np.float16, "auto", None),
              ("fp16, cp.async loads", np.float16, "cpasync", None))
    for name, dtype, loads, psplit in builds:
        q, k, table, seqlens = make_inputs(cp, b, s_q, h_q, s_k, dtype)
        sched, splits = mla.get_mla_metadata(seqlens, s_q * h_q, 1)
        problem = api._validate(q, k, table, seqlens, 512, None, False, False, None, None, None, False)
        os.environ["MLA_SEESAW_LOADS"] = loads
        if psplit is not None:
            os.environ["MLA_CUPY_PSPLIT"] = psplit
        try:
            launches[name] = (cupy_backend._prepare(cp, problem, sched, splits, dev, "hopper")[0], (q, k, table))
        finally:
            os.environ.pop("MLA_SEESAW_LOADS", None)
            os.environ.pop("MLA_CUPY_PSPLIT", None)
    times = {name: [] for name in launches}
    for rnd in range(args.rounds):
        for name, (ls, _) in launches.items():
            t = cupy_backend.time_launches(cp, ls, flush, args.reps)
            times[name].append(t)
            print(f"round {rnd} {name}: {t * 1e3:.3f} ms", flush=True)
    print(f"\n| {b}, {s_q}, {h_q}, {s_k} | kernels ms (median of rounds) | TFLOP/s |\n|---|---|---|")
    for name, ts in times.items():
        t = float(np.median(ts))
        print(f"| {name} | {t * 1e3:.3f} | {flops / t / 1e12:.1f} |")


if __name__ == "__main__":
    main()
