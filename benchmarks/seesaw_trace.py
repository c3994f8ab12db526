"""Where a pair of key blocks goes in the seesaw kernel: a clock64() timeline of one CTA (diagnostics, GPU only).

    python3 benchmarks/seesaw_trace.py [--b 128 --s-q 2 --h-q 128 --s-k 8192] [--defines "NAME=VALUE ..."]

Builds kernels/mla_decode_seesaw.cu with -DMLA_SEESAW_TRACE=1 (thread 0 of each warpgroup of CTA (0, 0, 0) stores
clock64() at 8 points of each of its first 64 pairs), runs one decode and prints, per pair, the cycles from the pair's
top to each point for both warpgroups, then the median over pairs 4..60. Points: load = the warpgroup's refill has
landed, S = its S wgmma is done, MA / MB / P / AFREE / BFREE = past those barriers (kernels/mla_decode_seesaw.cu).
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

POINTS = ["top", "S", "MA", "MB", "P", "AFREE", "BFREE", "load"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--b", type=int, default=128)
    ap.add_argument("--s-q", type=int, default=2)
    ap.add_argument("--h-q", type=int, default=128)
    ap.add_argument("--s-k", type=int, default=8192)
    ap.add_argument("--defines", default="", help="extra -D NAME=VALUE pairs")
    args = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    page, d, dv = 64, cupy_hopper.D, cupy_hopper.DV
    nblk = args.s_k // page
    q = cp.asarray(rng.standard_normal((args.b, args.s_q, args.h_q, d), np.float32)).astype(_arrays.BFLOAT16)
    cache = cp.asarray(rng.standard_normal((args.b * nblk, page, 1, d), np.float32)).astype(_arrays.BFLOAT16)
    table = cp.arange(args.b * nblk, dtype=cp.int32).reshape(args.b, nblk)
    lens = cp.full((args.b,), args.s_k, cp.int32)
    defines = {"MLA_FP16": 0, "MLA_SEESAW_TRACE": 1}
    defines.update(dict(kv.split("=") for kv in args.defines.split()))
    module = cp.RawModule(code=_nvrtc.read_source(cupy_hopper.SEESAW_SOURCE),
                          options=_nvrtc.options(cupy_hopper.ARCH, defines), backend="nvrtc")
    fn = module.get_function(cupy_hopper.SEESAW_FUNCTION)
    smem = cupy_hopper.seesaw_smem_bytes()
    fn.max_dynamic_shared_size_bytes = smem
    problem = api._validate(q, cache, table, lens, dv, None, False, False, None, None, None, True)
    sched, splits = mla.get_mla_metadata(lens, args.s_q * args.h_q, 1)
    comb = cupy_backend.combine_function(dv, False, False, args.b * args.s_q * args.h_q)
    k_map = None  # --defines MLA_SEESAW_TMA=1: the TMA build (its tensor map)
    if defines.get("MLA_SEESAW_TMA") not in (None, 0, "0"):
        from mla.backends import _tma

        k_map = _tma.kv_map_device(cp, cache, cp.cuda.Device().id)
    launches, out, lse = cupy_hopper.assemble(cp, fn, comb, problem, q, cache, table, lens, cp.asarray(sched),
                                              cp.asarray(splits), host_splits=None, smem=smem, seesaw=True,
                                              k_map=k_map)
    for _ in range(2):
        for f, grid, block, a, sm in launches:
            f(grid, block, a, shared_mem=sm)
    cp.cuda.Device().synchronize()
    ptr = module.get_global("seesaw_trace")
    trace = cp.ndarray((2, 64, 8), cp.int64, ptr).get()
    rel = trace - trace[0, :, :1]  # both warpgroups from warpgroup 0's pair top
    print(f"shape b={args.b} s_q={args.s_q} h_q={args.h_q} s_k={args.s_k}; cycles from WG0's pair top "
          f"(columns: {', '.join(POINTS)}); next: cycles to the next pair's top")
    for p in range(63):
        if trace[0, p + 1, 0] == 0:
            break
        nxt = trace[0, p + 1, 0] - trace[0, p, 0]
        print(f"pair {p:2d}  WG0 {' '.join(f'{x:6d}' for x in rel[0, p])}  |  WG1 "
              f"{' '.join(f'{x:6d}' for x in rel[1, p])}  | next {nxt}")
    n = min(60, int((trace[0, :, 0] != 0).sum()) - 1)
    if n > 5:
        med = np.median(rel[:, 4:n], axis=1).astype(int)
        period = int(np.median(np.diff(trace[0, 4:n + 1, 0])))
        print("median pairs 4..", n - 1, ": WG0", med[0].tolist(), " WG1", med[1].tolist(), " period", period)


if __name__ == "__main__":
    main()
