"""Time the seesaw kernel's two load paths on the 64-row decode shapes (issue #4; H100).

    python benchmarks/bench_seesaw_loads.py [--reps 30] [--out table.md] [--shapes 0,1,2]

For each shape and each path (MLA_SEESAW_LOADS=cpasync: every thread copies 16-byte chunks, the whole buffer
waited for; tma: bulk tensor copies of 64 x 64 pieces on mbarriers, each piece waited for before its wgmma) and the
wide kernel for reference, two timings:

* "kernels": prepared launches (decode + combine), the L2 flushed (256 MB rewritten) before each rep, CUDA events,
  median of ``reps`` (``cupy_backend.time_launches``, as ``bench_fp8_sparse.py``);
* "API loop": ``mla.flash_mla_with_kvcache(validate=False)`` called 20 times between two CUDA events, per call,
  median of 5 such loops (``bench_decode.py``'s "in a loop": back to back, no flush).

The configurations are timed in interleaved rounds (``--rounds``, medians of the rounds in the table): at the
compute-bound shape the H100 runs at its power cap and its SM clock moves between ~1300 and 1980 MHz (run 2 of
2026-11-26g: 600-700 W, clock event "SW power cap"), so back-to-back blocks of one configuration are not
comparable.

TFLOP/s = 2 b s_q h_q s_k (576 + 512) / time. Every configuration is first compared with the NumPy reference on a
small case (b = 2, lengths 300 and 451: a tail tile past the sequence, NaN in the unused cache slots).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla import _arrays, api, reference, testing  # noqa: E402
from mla.backends import cupy_backend  # noqa: E402

SHAPES = [(128, 2, 128, 8192), (128, 1, 128, 4096), (128, 1, 64, 8192), (128, 2, 128, 4096)]
CONFIGS = [("wide", "wide", "cpasync"), ("seesaw cp.async", "seesaw", "cpasync"), ("seesaw TMA", "seesaw", "tma")]


def _env(variant, loads):
    os.environ["MLA_CUPY_KERNEL"] = "hopper"
    os.environ["MLA_HOPPER_VARIANT"] = variant
    os.environ["MLA_SEESAW_LOADS"] = loads


def _check(variant, loads):
    _env(variant, loads)
    rng = np.random.default_rng(7)
    case = testing.make_decode_case(rng, b=2, s_q=2, h_q=64, d=576, head_dim_v=512, page_block_size=64,
                                    seqlens=[300, 451], dtype=_arrays.BFLOAT16, causal=True)
    sched, splits = mla.get_mla_metadata(case.cache_seqlens, 128, 1)
    out, lse = mla.flash_mla_with_kvcache(case.q, case.k_cache, case.block_table, case.cache_seqlens, 512, sched,
                                          splits, causal=True, backend="cupy")
    ref_out, ref_lse = reference.flash_mla_reference(case.q, case.k_cache, case.block_table, case.cache_seqlens, 512,
                                                     causal=True)
    testing.assert_close(out, lse, ref_out, ref_lse, out_atol=testing.out_atol(case))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the configurations (medians)")
    ap.add_argument("--shapes", default=None, help="indices into SHAPES, comma separated")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    from bench_decode import make_inputs, time_loop

    shapes = SHAPES if not args.shapes else [SHAPES[int(i)] for i in args.shapes.split(",")]
    dev = cp.cuda.Device().id
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    props = cp.cuda.runtime.getDeviceProperties(dev)
    lines = [f"# seesaw loads ({props['name'].decode()}, {args.reps} reps)", "",
             "| b, s_q, h_q, s_k | kernel | kernels ms | TFLOP/s | API loop ms | TFLOP/s |",
             "|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for name, variant, loads in CONFIGS:
        _check(variant, loads)
        print(f"check {name}: matches the NumPy reference", flush=True)
    for b, s_q, h_q, s_k in shapes:
        q, k, table, seqlens = make_inputs(cp, b, s_q, h_q, s_k, _arrays.BFLOAT16)
        sched, splits = mla.get_mla_metadata(seqlens, s_q * h_q, 1)  # the device plan, as a decode loop uses
        flops = 2 * b * s_q * h_q * s_k * (576 + 512)
        problem = api._validate(q, k, table, seqlens, 512, None, False, False, None, None, None, False)
        launches = {}
        for name, variant, loads in CONFIGS:
            _env(variant, loads)
            launches[name] = cupy_backend._prepare(cp, problem, sched, splits, dev, "hopper")[0]
        times = {name: ([], []) for name, _, _ in CONFIGS}
        for rnd in range(args.rounds):  # the configurations interleaved: the GPU's clock follows its power draw
            for name, variant, loads in CONFIGS:
                _env(variant, loads)
                t_k = cupy_backend.time_launches(cp, launches[name], flush, args.reps)
                fn = functools.partial(mla.flash_mla_with_kvcache, q, k, table, seqlens, 512, sched, splits,
                                       backend="cupy", validate=False)
                t_l = time_loop(fn, calls=20, loops=5) * 1e-3
                times[name][0].append(t_k)
                times[name][1].append(t_l)
                print(f"round {rnd} {b},{s_q},{h_q},{s_k} {name}: kernels {t_k * 1e3:.3f} ms, API loop "
                      f"{t_l * 1e3:.3f} ms", flush=True)
        for name, _, _ in CONFIGS:
            t_k, t_l = (float(np.median(x)) for x in times[name])
            line = (f"| {b}, {s_q}, {h_q}, {s_k} | {name} | {t_k * 1e3:.3f} | {flops / t_k / 1e12:.1f} | "
                    f"{t_l * 1e3:.3f} | {flops / t_l / 1e12:.1f} |")
            lines.append(line)
            print(line, flush=True)
        del q, k, table, seqlens, launches
        cp.get_default_memory_pool().free_all_blocks()
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
