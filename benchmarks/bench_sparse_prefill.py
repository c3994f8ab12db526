"""Time the CuPy sparse prefill kernel, ``mla.flash_mla_sparse_fwd`` (issue #5; verified on an H100 2026-11-25).

    python benchmarks/bench_sparse_prefill.py [--reps 20] [--check] [--out results.md]
        [--shapes 4096,128,1,2048,65536] [--configs 8,32,2:8,32,3] [--psplit both]

Default shape: DeepSeek-V3.2 DSA prefill, s_q = 4096, h_q = 128, h_kv = 1, topk = 2048, d = 576,
d_v = 512, s_kv = 65536, bf16; random q / kv, indices uniform in [0, s_kv) (``--invalid`` sets a
fraction to -1). Each rep: 256 MB memset to flush the L2, CUDA events around the kernel launch only,
median of ``--reps`` after 3 warm-ups (``cupy_backend.time_launches``). The "API" column is the
median wall time of a whole ``mla.flash_mla_sparse_fwd`` call on device arrays (validation included:
it reduces indices / topk_length on the device, two small syncs), L2 not flushed.

Counted (valid = indices that are not -1, averaged over rows: L̄):
  FLOPs = 2 s_q h_q L̄ (d + d_v)    (Q K^T over d, P V over d_v)
  bytes = DESIGN §5 with each query row a sequence of L̄ gathered keys:
          s_q (h_q d 2 + L̄ h_kv d 2 + h_q d_v 2)
FlashMLA reports ~640 TFLOP/s for its sparse prefill on an H800 (wgmma + TMA); this kernel is the
portable mma.sync one (expected ~130-170 TFLOP/s on an H100, see the kernel header).

``--check`` first compares the kernel with the NumPy reference (float64) on a few rows of a small
and of the benchmark's shape (DESIGN §6 tolerances). ``--configs`` sweeps tilings
(``MLA_CUPY_SPARSE_CONFIG`` = "warps,block_n,stages"), ``--psplit`` the bf16 P V split
(``MLA_CUPY_PSPLIT``: 1 = P_hi + P_lo, the default; 0 = one bf16 product, FlashMLA's precision).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SHAPES = "4096,128,1,2048,65536"
D, DV = 576, 512


def _parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions (median), after 3 warm-ups")
    ap.add_argument("--shapes", default=DEFAULT_SHAPES,
                    help="';'-separated s_q,h_q,h_kv,topk,s_kv (default %(default)s)")
    ap.add_argument("--invalid", type=float, default=0.0, help="fraction of indices set to -1")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--configs", default="", help="':'-separated warps,block_n,stages tilings to sweep "
                    "(default: the backend's choice)")
    ap.add_argument("--psplit", default="default", choices=("default", "0", "1", "both"),
                    help="bf16 P V split (MLA_CUPY_PSPLIT)")
    ap.add_argument("--check", action="store_true", help="compare with the NumPy reference first")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here")
    return ap.parse_args(argv)


def _inputs(cp, mla_dtype, s_q, h_q, h_kv, topk, s_kv, invalid, seed=0):
    """Random device operands (bf16 by truncation of fp32 normals, as cupy_backend's benchmark)."""
    from mla.backends.cupy_backend import _random_device

    cp.random.seed(seed)
    q = _random_device(cp, (s_q, h_q, D), mla_dtype)
    kv = _random_device(cp, (s_kv, h_kv, D), mla_dtype)
    indices = cp.random.randint(0, s_kv, size=(s_q, h_kv, topk)).astype(cp.int32)
    if invalid > 0:
        indices[cp.random.random_sample(indices.shape) < invalid] = -1
    return q, kv, indices


def check(cp, mla_dtype) -> bool:
    """Kernel vs float64 reference on sampled rows; prints one line a case."""
    import mla
    from mla import _arrays, testing
    from mla.backends import cupy_backend
    from mla.sparse import sparse_prefill_reference

    ok = True
    cupy_backend.POISON_OUTPUTS = True
    cases = [(64, 16, 1, 300, 1000, 0.3, True), (32, 128, 1, 2048, 65536, 0.0, False),
             (16, 64, 2, 512, 4096, 0.5, True)]
    for s_q, h_q, h_kv, topk, s_kv, invalid, extras in cases:
        q, kv, idx = _inputs(cp, mla_dtype, s_q, h_q, h_kv, topk, s_kv, invalid, seed=s_q)
        rng = np.random.default_rng(s_q)
        sink = cp.asarray(rng.standard_normal(h_q).astype(np.float32)) if extras else None
        tl = cp.asarray(rng.integers(0, topk + 1, size=s_q).astype(np.int32)) if extras else None
        try:
            out, ml, lse = mla.flash_mla_sparse_fwd(q, kv, idx, D ** -0.5, DV, attn_sink=sink, topk_length=tl,
                                                    backend="cupy")
            rows = np.unique(np.r_[0, s_q - 1, rng.integers(0, s_q, 4)])
            h = _arrays.asnumpy
            ref = sparse_prefill_reference(h(q)[rows], h(kv), h(idx)[rows], D ** -0.5, DV,
                                           None if sink is None else h(sink), None if tl is None else h(tl)[rows],
                                           compute_dtype=np.float64)
            testing.assert_close(h(out)[rows], h(lse)[rows], ref[0], ref[2], lse_atol=4e-6)
            ml_h, ml_ref = h(ml)[rows].astype(np.float64), ref[1].astype(np.float64)
            np.testing.assert_array_equal(np.isneginf(ml_h), np.isneginf(ml_ref))
            fin = np.isfinite(ml_ref)
            np.testing.assert_allclose(ml_h[fin], ml_ref[fin], atol=4e-6, rtol=testing.LSE_RTOL)
            msg = "OK"
        except AssertionError as exc:
            ok, msg = False, f"BAD {str(exc)[:400]}"
        print(f"check s_q={s_q} h_q={h_q} h_kv={h_kv} topk={topk} s_kv={s_kv} invalid={invalid} "
              f"sink/topk_length={extras}: {msg}", flush=True)
    cupy_backend.POISON_OUTPUTS = False
    return ok


def bench_shape(cp, mla_dtype, shape, invalid, reps, flush, config, psplit):
    """One table row: kernel time (L2 flushed), API wall time, TFLOP/s, GB/s."""
    import mla
    from mla.backends import cupy_backend, cupy_sparse_prefill

    s_q, h_q, h_kv, topk, s_kv = shape
    for name, value in (("MLA_CUPY_SPARSE_CONFIG", config), ("MLA_CUPY_PSPLIT", psplit)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    q, kv, idx = _inputs(cp, mla_dtype, s_q, h_q, h_kv, topk, s_kv, invalid)
    dev = cp.cuda.Device().id
    cfg = cupy_sparse_prefill.config(D, DV, h_q // h_kv, cupy_backend._max_smem(dev))
    launches, _, _, _ = cupy_sparse_prefill.prepare(q, kv, idx, D ** -0.5, DV, dev=dev)
    t = cupy_backend.time_launches(cp, launches, flush, reps)

    walls = []
    for rep in range(reps + 3):
        cp.cuda.Device().synchronize()
        t0 = time.perf_counter()
        mla.flash_mla_sparse_fwd(q, kv, idx, D ** -0.5, DV, backend="cupy")
        cp.cuda.Device().synchronize()
        if rep >= 3:
            walls.append(time.perf_counter() - t0)
    t_api = float(np.median(walls))

    valid = float((idx >= 0).sum()) / (s_q * h_kv)  # L̄: valid keys a (row, KV head)
    flops = 2.0 * s_q * h_q * valid * (D + DV)
    nbytes = s_q * (h_q * D * 2 + valid * h_kv * D * 2 + h_q * DV * 2)
    split = psplit if psplit is not None else ("1" if mla_dtype != np.float16 else "0")
    row = (f"| {s_q}, {h_q}, {h_kv}, {topk}, {s_kv} | {valid:.0f} | {cfg} | {split} | {t * 1e3:.3f} ms | "
           f"{t_api * 1e3:.3f} ms | {flops / t / 1e12:.1f} | {nbytes / t / 1e9:.0f} |")
    print(row, flush=True)
    del q, kv, idx, launches
    return row


def main(argv=None):
    args = _parse_args(argv)
    import cupy as cp

    from mla import _arrays

    if not _arrays.gpu_available():
        sys.exit("bench_sparse_prefill: no CUDA GPU is visible (this benchmark times the GPU kernel)")
    mla_dtype = _arrays.resolve_dtype(args.dtype)
    dev = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"device: {name}, CuPy {cp.__version__}, dtype {args.dtype}", flush=True)
    if args.check and not check(cp, mla_dtype):
        print("check FAILED: the timings below are of a wrong kernel", flush=True)
    flush = cp.empty(256 << 20, dtype=cp.uint8)
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes.split(";") if s]
    configs = [c for c in args.configs.split(":") if c] or [None]
    psplits = {"default": [None], "both": ["1", "0"]}.get(args.psplit, [args.psplit])
    rows = [f"Sparse prefill (`flash_mla_sparse_fwd`), {name}, {args.dtype}, d = {D}, d_v = {DV}, "
            f"invalid = {args.invalid}; L2 flushed, median of {args.reps}. FlashMLA (H800): ~640 TFLOP/s.", "",
            "| s_q, h_q, h_kv, topk, s_kv | valid keys / row | (block_m, warps, block_n, stages) | P split | "
            "kernel | API call | TFLOP/s | GB/s |", "|---|---|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for shape in shapes:
        for config in configs:
            for psplit in psplits:
                rows.append(bench_shape(cp, mla_dtype, shape, args.invalid, args.reps, flush, config, psplit))
    if args.out:
        args.out.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
