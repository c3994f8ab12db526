"""Time the CuPy FP8-cache and sparse (DSA) decode kernels (issue #5; verified on an H100 2026-11-25).

    python benchmarks/bench_fp8_sparse.py [--reps 30] [--out results.md] [--check] [--backend cupy|numba]

Rows (DeepSeek dims d = 576, d_v = 512, page 64, h_kv = 1, bf16 q, random data, shuffled blocks;
each rep: 256 MB memset to flush L2, CUDA events around the decode + combine launches only, median):

* dense, b=128 s_q=1 h_q=16 s_k=8192: bf16 portable kernel vs the FP8 kernel; bytes as DESIGN §5 with
  656 instead of 1152 cache bytes a token for FP8. Issue target: FP8 >= 1.5x faster.
* dense, b=128 s_q=2 h_q=128 s_k=8192 (compute-bound): bf16 portable vs FP8.
* sparse, b=128 s_q=2 h_q=128 topk=2048 (FP8 and bf16 caches of 8192 tokens a sequence):
  TFLOP/s with FLOPs = 2 b s_q h_q topk (576 + 512).

``--backend numba`` times the same rows through ``mla.flash_mla_with_kvcache(backend="numba",
validate=False)`` instead (the whole call between the events: host-side dispatch included; dense bf16
is the Numba v5 kernel, FP8 and sparse the generic ``numba_sparse_fp8`` kernel).
``--check`` first compares each configuration with the NumPy reference on a small case.
``MLA_CUPY_FP8_CONFIG`` / ``MLA_CUPY_SPARSE_CONFIG`` =
"warps,block_n,stages" force a tiling (sweeps). ``--sweep 8,64,3 8,32,2 ...`` times the memory-bound
dense FP8 row under each FP8 tiling, each first checked on a small poisoned case.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402

import mla  # noqa: E402
from mla import _arrays, api, testing  # noqa: E402
from mla.backends import cupy_backend, cupy_hopper, cupy_sparse_fp8  # noqa: E402

D, DV, PAGE = 576, 512, 64
BF16 = _arrays.BFLOAT16


def _random_bf16(shape):
    x = cp.random.standard_normal(shape, dtype=cp.float32)
    return (x.view(cp.uint32) >> 16).astype(cp.uint16).view(BF16)


def _time(launches, flush, reps):
    from mla.backends.cupy_backend import time_launches

    return time_launches(cp, launches, flush, reps)


def _numba_launches(q, cache, table, seqlens, fp8, indices, sched, splits):
    """One pseudo-launch for ``_time``: the whole Numba-backend call (plan arrays moved to the device)."""
    sched, splits = cp.asarray(sched), cp.asarray(splits)

    def call(grid, block, args, shared_mem=0):
        mla.flash_mla_with_kvcache(q, cache, table, seqlens, DV, sched, splits, is_fp8_kvcache=fp8, indices=indices,
                                   backend="numba", validate=False)

    return [(call, None, None, None, 0)]


RESIDENT = None  # --resident N: every block-table entry points into the first N blocks (L2-resident keys)


def _cache(b, s_k):
    blocks = b * s_k // PAGE
    k = _random_bf16((blocks, PAGE, 1, D))
    k8 = mla.quantize_kv_fp8(k)  # on the device (CuPy path of mla.fp8)
    rng = np.random.default_rng(0)
    table = rng.permutation(blocks) if RESIDENT is None else rng.integers(0, RESIDENT, blocks)
    table = cp.asarray(table.astype(np.int32).reshape(b, s_k // PAGE))
    return k, k8, table


def bench_dense(b, s_q, h_q, s_k, reps, flush, rows, backend="cupy"):
    dev = cp.cuda.Device().id
    k, k8, table = _cache(b, s_k)
    q = _random_bf16((b, s_q, h_q, D))
    seqlens = cp.full((b,), s_k, dtype=cp.int32)
    sched, splits = api.get_mla_metadata(seqlens.get(), s_q * h_q, 1)
    flops = 2 * b * h_q * s_q * s_k * (D + DV)
    base = None
    # "bf16 auto": what backend="cupy" runs for the bf16 cache (the Hopper kernels on an H100), the base of
    # the ratio issue #5 asks for; "fp8": what it runs for the FP8 cache (the narrow kernel's FP8 build on an
    # H100 for <= 16 rows a KV head, else the mma.sync FP8 kernel; MLA_CUPY_FP8_KERNEL forces one)
    kinds = (("bf16 portable", k), ("fp8", k8)) if backend == "numba" else (
        ("bf16 auto", k), ("bf16 portable", k), ("fp8", k8))
    if backend == "cupy" and s_q * h_q <= 16 and cupy_hopper.device_reason(dev) is None:
        # the two Hopper FP8 kernels for <= 16 rows, each forced, beside what "auto" runs
        kinds += (("fp8 narrow", k8), ("fp8 regs", k8))
    for kind, cache in kinds:
        fp8 = kind.startswith("fp8")
        problem = api._validate(q, cache, table, seqlens, DV, None, False, fp8, None, None, None, False)
        if backend == "numba":
            launches, cfg = _numba_launches(q, cache, table, seqlens, fp8, None, sched, splits), "numba"
        elif fp8:
            if " " in kind:  # a Hopper FP8 kernel forced by name
                launches, _, _ = cupy_hopper.prepare(cp, problem, sched, splits, dev, kind.split()[1])
            else:
                launches, _, _ = cupy_sparse_fp8.prepare(problem, sched, splits, dev)
            cfg = cupy_sparse_fp8.config(D, DV, s_q * h_q, cupy_backend._max_smem(dev), True, False)
        elif kind == "bf16 auto":
            launches, _, _ = cupy_backend._prepare(cp, problem, sched, splits, dev, "auto")
        else:
            launches, _, _ = cupy_backend._prepare_portable(cp, problem, sched, splits, dev)
            cfg = cupy_backend.portable_config(D, DV, s_q * h_q, cupy_backend._max_smem(dev))
        if backend != "numba" and getattr(launches[0][0], "name", "").startswith(("mla_decode_hopper",
                                                                                   "mla_decode_seesaw",
                                                                                   "mla_decode_fp8_regs")):
            cfg = launches[0][0].name  # a Hopper kernel: no tiling tuple
        t = _time(launches, flush, reps)
        token_bytes = 656 if fp8 else 2 * D
        nbytes = b * (s_q * h_q * D * 2 + s_k * token_bytes + s_q * h_q * DV * 2)
        base = t if base is None else base
        if backend == "numba":
            kind = "bf16 numba v5" if not fp8 else "fp8 numba"
        row = (f"| dense {kind} | {b}, {s_q}, {h_q}, {s_k} | {cfg} | {t * 1e3:.3f} ms | {nbytes / t / 1e9:.0f} GB/s | "
               f"{flops / t / 1e12:.1f} | {base / t:.2f}x |")
        print(row, flush=True)
        rows.append(row)
    del k, k8, table


def bench_sparse(b, s_q, h_q, topk, s_k, reps, flush, rows, backend="cupy"):
    dev = cp.cuda.Device().id
    k, k8, table = _cache(b, s_k)
    q = _random_bf16((b, s_q, h_q, D))
    pos = cp.random.randint(0, s_k, size=(b, s_q, topk)).astype(cp.int32)  # logical positions
    indices = (table[cp.arange(b)[:, None, None], pos // PAGE] * PAGE + pos % PAGE).astype(cp.int32)
    sched, splits = api.get_mla_metadata(np.zeros(b, np.int32), s_q * h_q, 1, topk=topk)
    flops = 2 * b * s_q * h_q * topk * (D + DV)
    for kind, cache in (("bf16", k), ("fp8", k8)):
        fp8 = kind == "fp8"
        problem = api._validate(q, cache, None, None, DV, None, False, fp8, indices, None, None, False)
        if backend == "numba":
            launches, cfg = _numba_launches(q, cache, None, None, fp8, indices, sched, splits), "numba"
        else:
            launches, _, _ = cupy_sparse_fp8.prepare(problem, sched, splits, dev)
            cfg = cupy_sparse_fp8.config(D, DV, h_q, cupy_backend._max_smem(dev), fp8, True)
            if getattr(launches[0][0], "name", "").startswith("mla_decode_hopper"):
                cfg = launches[0][0].name  # the wide Hopper kernel's sparse build: no tiling tuple
        t = _time(launches, flush, reps)
        token_bytes = 656 if fp8 else 2 * D
        nbytes = b * (s_q * h_q * D * 2 + s_q * topk * token_bytes + s_q * h_q * DV * 2)
        kind = f"{kind} numba" if backend == "numba" else kind
        row = (f"| sparse {kind} | {b}, {s_q}, {h_q}, topk {topk} | {cfg} | {t * 1e3:.3f} ms | "
               f"{nbytes / t / 1e9:.0f} GB/s | {flops / t / 1e12:.1f} | |")
        print(row, flush=True)
        rows.append(row)
    del k, k8, table


def check(backend="cupy"):
    """Small poisoned cases against the NumPy reference (the GPU tests are the full check)."""
    from mla import reference

    rng = np.random.default_rng(0)
    ok = True
    cupy_backend.POISON_OUTPUTS = True
    if backend == "numba":
        from mla.backends import numba_backend

        numba_backend.POISON_OUTPUTS = True
    for fp8 in (True, False):
        for sparse in (False, True) if fp8 else (True,):
            for h_q, s_q in ((16, 1), (128, 2)):
                case = testing.make_decode_case(rng, b=3, s_q=s_q, h_q=h_q, d=D, head_dim_v=DV, page_block_size=PAGE,
                                                seqlens=[0, 300, 1500], dtype=BF16, fp8=fp8, causal=not sparse)
                if sparse:
                    case.causal = False
                    case.indices = testing.make_sparse_indices(rng, case, 777, invalid_ratio=0.3)
                    case.attn_sink = rng.standard_normal(h_q).astype(np.float32)
                c = testing.to_device(case)
                try:
                    out, lse = mla.flash_mla_with_kvcache(*c.args(), backend=backend, **c.kwargs())
                    out_ref, lse_ref = reference.flash_mla_reference(*case.args(), **case.kwargs())
                    testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))
                    msg = "OK "
                except AssertionError as exc:
                    ok, msg = False, f"BAD {str(exc)[:300]}"
                print(f"check fp8={fp8} sparse={sparse} h_q={h_q} s_q={s_q}: {msg}", flush=True)
    cupy_backend.POISON_OUTPUTS = False
    return ok


def sweep(configs, reps, flush):
    """The dense FP8 row (128, 1, 16, 8192) under each forced tiling "warps,block_n,stages"."""
    import os

    from mla import reference

    dev = cp.cuda.Device().id
    b, s_q, h_q, s_k = 128, 1, 16, 8192
    k, k8, table = _cache(b, s_k)
    q = _random_bf16((b, s_q, h_q, D))
    seqlens = cp.full((b,), s_k, dtype=cp.int32)
    sched, splits = api.get_mla_metadata(seqlens.get(), s_q * h_q, 1)
    nbytes = b * (s_q * h_q * D * 2 + s_k * 656 + s_q * h_q * DV * 2)
    case = testing.make_decode_case(np.random.default_rng(5), b=3, s_q=1, h_q=16, d=D, head_dim_v=DV,
                                    page_block_size=PAGE, seqlens=[0, 300, 1500], dtype=BF16, fp8=True)
    out_ref, lse_ref = reference.flash_mla_reference(*case.args(), **case.kwargs())
    print("| FP8 tiling (warps, block_n, stages) -> (block_m, warps, block_n, stages) | smem | check | time | GB/s |"
          "\n|---|---|---|---|---|", flush=True)
    for forced in configs:
        os.environ["MLA_CUPY_FP8_CONFIG"] = forced
        try:
            cfg = cupy_sparse_fp8.config(D, DV, s_q * h_q, cupy_backend._max_smem(dev), True, False)
            if cfg is None:
                print(f"| {forced} | | no valid tiling (divisibility or shared memory) | | |", flush=True)
                continue
            block_m, warps, block_n, stages = cfg
            smem = cupy_sparse_fp8.smem_bytes(D, DV, block_m, block_n, warps, stages, True, False)
            cupy_backend.POISON_OUTPUTS = True
            try:
                c = testing.to_device(case)
                out, lse = mla.flash_mla_with_kvcache(*c.args(), backend="cupy", **c.kwargs())
                testing.assert_close(out, lse, out_ref, lse_ref, lse_atol=4e-6, out_atol=testing.out_atol(case))
                ok = "OK"
            except AssertionError as exc:
                ok = "BAD " + str(exc).splitlines()[0][:80]
            finally:
                cupy_backend.POISON_OUTPUTS = False
            problem = api._validate(q, k8, table, seqlens, DV, None, False, True, None, None, None, False)
            launches, _, _ = cupy_sparse_fp8.prepare(problem, sched, splits, dev)
            t = _time(launches, flush, reps)
            print(f"| {forced} -> {cfg} | {smem} | {ok} | {t * 1e3:.3f} ms | {nbytes / t / 1e9:.0f} |", flush=True)
        finally:
            os.environ.pop("MLA_CUPY_FP8_CONFIG", None)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--backend", choices=("cupy", "numba"), default="cupy")
    ap.add_argument("--sweep", nargs="+", default=None, metavar="W,BN,ST",
                    help="only time the dense FP8 memory-bound row under these FP8 tilings")
    ap.add_argument("--dense-only", action="store_true", help="only the dense rows, at b=128, s_q=1, s_k=8192")
    ap.add_argument("--h-q", type=int, default=None, help="with --dense-only: this h_q (default 16)")
    ap.add_argument("--b", type=int, default=128, help="with --dense-only: this batch (default 128)")
    ap.add_argument("--resident", type=int, default=None, metavar="N",
                    help="diagnostics: keys from the first N blocks only, no L2 flush (the kernels' time without "
                         "DRAM: N = 64 is 4.7 MB of bf16 keys)")
    args = ap.parse_args()
    global RESIDENT
    RESIDENT = args.resident
    dev = cp.cuda.Device()
    print(f"device: {cp.cuda.runtime.getDeviceProperties(dev.id)['name'].decode()}, CuPy {cp.__version__}",
          flush=True)
    if args.check and not check(args.backend):
        print("check FAILED: timings below are of wrong kernels", flush=True)
    flush = cp.empty(256 << 20 if args.resident is None else 1, dtype=cp.uint8)
    if args.sweep:
        sweep(args.sweep, args.reps, flush)
        return
    rows = ["| kernel | b, s_q, h_q, s_k / topk | (block_m, warps, block_n, stages) | time | GB/s | TFLOP/s | "
            "vs bf16 |", "|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    if args.dense_only:
        bench_dense(args.b, 1, args.h_q or 16, 8192, args.reps, flush, rows, args.backend)
        if args.out:
            args.out.write_text("\n".join(rows) + "\n")
        return
    bench_dense(128, 1, 16, 8192, args.reps, flush, rows, args.backend)
    bench_dense(128, 2, 128, 8192, args.reps, flush, rows, args.backend)
    bench_sparse(128, 2, 128, 2048, 8192, args.reps, flush, rows, args.backend)
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
