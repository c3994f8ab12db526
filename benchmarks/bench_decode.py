"""Time every MLA decode backend and Numba kernel version on FlashMLA's shapes (an H100 here).

    python benchmarks/bench_decode.py [--out benchmarks/numba_decode.md] [--versions 1,2,3] [--reps 20]

Per shape: CUDA events around each call (warm-up first, median of >= 20 calls), printed as ms,
GB/s (DESIGN.md §5 bytes: q + cache + out), TFLOP/s (2 b h_q s_q L (d + d_v)) and % of the
device-to-device copy bandwidth measured by this script (bytes read + written). Two timings:
"one call" has the call's host work before its first launch inside the events (the GPU waits for
it: ~0.1 ms for the CuPy backend, ~0.15 ms for Numba's dispatcher); "in a loop" is the time per call
of 20 calls between two events (median of 20 such loops), where the host runs ahead as in a decode loop,
so it is the kernels' own time. Numba versions go
through ``mla.flash_mla_with_kvcache(backend="numba")`` (MLA_NUMBA_VERSION picks the kernel) with
the plan made once, like a decode loop; the naive CuPy baseline is ``naive_cupy.naive_decode``
(fp16: CuPy's bf16 matmul is not dependable).
"""

# ruff: noqa: B023, F821, E501  (timed lambdas close over the loop's arrays on purpose)
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = [  # (b, s_q, h_q, s_k)
    (128, 1, 16, 4096),
    (128, 1, 16, 8192),
    (128, 1, 128, 4096),
    (128, 2, 128, 4096),
    (1, 1, 128, 32768),
    (8, 1, 16, 8192),      # issue #4: few sequences, long context
    (128, 2, 128, 8192),   # issue #4: compute-bound
    (128, 1, 32, 8192),    # 32 / 64 query rows a KV head: where "auto" switches between the CuPy kernels
    (128, 1, 64, 8192),
    (128, 2, 16, 8192),
]
D, DV, PAGE, H_KV = 576, 512, 64, 1


def time_call(fn, reps, warmup=2):
    import cupy as cp

    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    fn()
    cp.cuda.Device().synchronize()
    once = time.perf_counter() - t0
    if once > 0.5:  # very slow kernels (v1 on big shapes): fewer repetitions, said in the table
        reps = 3
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return float(np.median(times)), reps


def time_loop(fn, calls=20, loops=20):
    """ms per call of ``calls`` back-to-back calls between two CUDA events (median of ``loops``)."""
    import cupy as cp

    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    per_call = []
    for _ in range(loops):
        start.record()
        for _ in range(calls):
            fn()
        stop.record()
        stop.synchronize()
        per_call.append(cp.cuda.get_elapsed_time(start, stop) / calls)
    return float(np.median(per_call))


def timed(fn, reps):
    """(one-call ms, reps, in-a-loop ms or None for kernels too slow to loop)."""
    ms, used = time_call(fn, reps)
    return ms, used, (time_loop(fn) if used == reps else None)


def copy_bandwidth(nbytes=1 << 30):
    import cupy as cp

    src = cp.ones(nbytes // 4, dtype=cp.float32)
    dst = cp.empty_like(src)
    ms, _ = time_call(lambda: cp.copyto(dst, src), 20)
    del src, dst
    return 2 * nbytes / ms / 1e6  # GB/s, read + written


def random_bits16(cp, shape, dtype):
    """Random normal data of a 16-bit float dtype, generated on the device."""
    x = cp.random.standard_normal(shape, dtype=cp.float32)
    if np.dtype(dtype) == np.float16:
        return x.astype(cp.float16)
    bits = (x.view(cp.uint32) >> 16).astype(cp.uint16)
    return bits.view(dtype)


def make_inputs(cp, b, s_q, h_q, s_k, dtype):
    blocks_per_seq = -(-s_k // PAGE)
    num_blocks = b * blocks_per_seq
    q = random_bits16(cp, (b, s_q, h_q, D), dtype)
    k = random_bits16(cp, (num_blocks, PAGE, H_KV, D), dtype)
    table = cp.random.permutation(num_blocks).astype(cp.int32).reshape(b, blocks_per_seq)
    seqlens = cp.full((b,), s_k, dtype=cp.int32)
    return q, k, table, seqlens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="also write the markdown table here")
    parser.add_argument("--versions", default="1,2,3,4")
    parser.add_argument("--block-n", default="16,32", help="key tiles to try for versions >= 2")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--shapes", default=None, help="indices into SHAPES, e.g. 0,1")
    parser.add_argument("--cupy-kernels", default="auto",
                        help="CuPy kernels to time, comma-separated: auto (what backend='cupy' picks), portable, "
                             "hopper (as dispatched), hopper-wide, hopper-narrow, hopper-seesaw (MLA_HOPPER_VARIANT forced)")
    args = parser.parse_args(argv)

    import cupy as cp
    from bench_prefill import environment
    from naive_cupy import naive_decode

    import mla
    from mla import _arrays

    dev = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()
    copy_gbs = copy_bandwidth()
    lines = [f"device: {dev}; measured device-to-device copy: {copy_gbs:.0f} GB/s (read + written); "
             f"d={D}, d_v={DV}, page {PAGE}, h_kv={H_KV}, bf16 (naive CuPy: fp16); median of "
             f"{args.reps} CUDA-event-timed calls after warm-up (3 where marked *)", "",
             "| shape (b, s_q, h_q, s_k) | impl | one call ms | GB/s | TFLOP/s | % of copy | x naive | in a loop ms | % of copy in a loop |",
             "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    shapes = SHAPES if args.shapes is None else [SHAPES[int(i)] for i in args.shapes.split(",")]
    versions = [int(v) for v in args.versions.split(",") if v]
    block_ns = [int(v) for v in args.block_n.split(",") if v]
    try:
        from mla.backends import cupy_backend  # noqa: F401

        have_cupy_backend = mla.backends.status().get("cupy") == "available"
    except Exception:
        have_cupy_backend = False

    for b, s_q, h_q, s_k in shapes:
        try:
            q, k, table, seqlens = make_inputs(cp, b, s_q, h_q, s_k, _arrays.BFLOAT16)
        except Exception as exc:  # a CuPy without ml_dtypes' bfloat16: time fp16 instead
            print(f"bf16 inputs failed ({exc!r}); using fp16", flush=True)
            q, k, table, seqlens = make_inputs(cp, b, s_q, h_q, s_k, np.float16)
        nbytes = b * (s_q * h_q * D * 2 + s_k * H_KV * D * 2 + s_q * h_q * DV * 2)
        flops = 2 * b * h_q * s_q * s_k * (D + DV)
        sched, splits = mla.get_mla_metadata(seqlens, s_q * h_q // H_KV, H_KV)
        rows = []

        q16, k16 = q.view(cp.uint16), k.view(cp.uint16)  # same bits read as fp16 for the baseline
        q16 = (q16 & 0x7BFF).view(cp.float16)  # keep it finite
        k16 = (k16 & 0x7BFF).view(cp.float16)
        try:
            rows.append(("naive CuPy (fp16)", *timed(lambda: naive_decode(q16, k16, table, seqlens, DV, max_seqlen=s_k),
                                                     args.reps)))
        except Exception as exc:  # e.g. out of memory for the gather
            print(f"naive CuPy failed on {(b, s_q, h_q, s_k)}: {exc!r}", flush=True)
        del q16, k16
        cp.get_default_memory_pool().free_all_blocks()
        naive_ms = rows[0][1] if rows else None

        def add_row(name, backend):  # one backend's row: the whole API call, timed
            try:
                fn = lambda: mla.flash_mla_with_kvcache(q, k, table, seqlens, DV, sched, splits,  # noqa: E731
                                                        backend=backend, validate=False)
                rows.append((name, *timed(fn, args.reps)))
            except Exception as exc:
                print(f"{name} failed on {(b, s_q, h_q, s_k)}: {exc!r}", flush=True)

        for version in versions:
            for bn in (block_ns if version in (2, 3) else [None]):
                with environment(MLA_NUMBA_VERSION=version, MLA_NUMBA_BLOCK_N=bn):
                    add_row(f"numba v{version}" + (f" (BLOCK_N={bn})" if bn else ""), "numba")
        for ck in (args.cupy_kernels.split(",") if have_cupy_backend else []):
            kernel, variant = {"auto": (None, None), "portable": ("portable", None), "hopper": ("hopper", None),
                               "hopper-wide": ("hopper", "wide"), "hopper-narrow": ("hopper", "narrow"),
                               "hopper-seesaw": ("hopper", "seesaw")}[ck]
            with environment(MLA_CUPY_KERNEL=kernel, MLA_HOPPER_VARIANT=variant):
                add_row("cupy backend" if ck == "auto" else f"cupy {ck}", "cupy")
        for name, ms, reps, loop_ms in rows:
            gbs = nbytes / ms / 1e6
            loop = f"{loop_ms:.3f} | {100 * nbytes / loop_ms / 1e6 / copy_gbs:.0f}%" if loop_ms else "- | -"
            line = (f"| {b}, {s_q}, {h_q}, {s_k} | {name}{'*' if reps < args.reps else ''} | {ms:.3f} | "
                    f"{gbs:.0f} | {flops / ms / 1e9:.1f} | {100 * gbs / copy_gbs:.0f}% | "
                    f"{(naive_ms / ms if naive_ms else float('nan')):.1f} | {loop} |")
            lines.append(line)
            print(line, flush=True)
        del q, k, table, seqlens
        cp.get_default_memory_pool().free_all_blocks()

    # launch overhead: a tiny decode step end to end (host time per call, plan made once)
    q, k, table, seqlens = make_inputs(cp, 1, 1, 16, 64, _arrays.BFLOAT16)
    sched, splits = mla.get_mla_metadata(seqlens, 16, 1)
    for version in versions:
        os.environ["MLA_NUMBA_VERSION"] = str(version)
        fn = lambda: mla.flash_mla_with_kvcache(q, k, table, seqlens, DV, sched, splits, backend="numba",  # noqa: E731
                                                validate=False)
        for _ in range(5):
            fn()
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        cp.cuda.Device().synchronize()
        line = f"tiny step (b=1, h_q=16, s_k=64) numba v{version}: {(time.perf_counter() - t0) / 50 * 1e6:.0f} us per call"
        lines.append("")
        lines.append(line)
        print(line, flush=True)
    os.environ.pop("MLA_NUMBA_VERSION", None)

    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
