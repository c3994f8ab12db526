"""``python -m mla``: info, demo, bench.

    python -m mla info                      backends, GPU, versions
    python -m mla demo [--b 4 --h-q 16 ...] one decode step, checked against the float64 reference
    python -m mla bench [--backends ...] [--json] [--plot roofline.png]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import numpy as np

from . import _arrays, perf, reference
from .api import flash_mla_with_kvcache, get_mla_metadata
from .testing import make_decode_case, to_device


def _gpu_description() -> str:
    if not _arrays.gpu_available():
        return "none visible" if _arrays.cupy_module() is not None else "none (CuPy not installed)"
    cp = _arrays.cupy_module()
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return f"{name}, compute capability {props['major']}.{props['minor']}, {props['multiProcessorCount']} SMs"


def cmd_info(args) -> int:
    """Print versions, the GPU and which backends can run."""
    from . import __version__, backends

    print(f"mla {__version__} on Python {platform.python_version()} ({platform.machine()})")
    print(f"GPU: {_gpu_description()}")
    for mod in ("numpy", "ml_dtypes", "numba", "numba_cuda", "cupy", "hypothesis"):
        try:
            m = __import__(mod)
            print(f"  {mod:11s} {getattr(m, '__version__', '?')}")
        except Exception:
            print(f"  {mod:11s} not installed")
    print("backends:")
    for name, state in backends.status().items():
        print(f"  {name:6s} {state}")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonneg(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def cmd_demo(args) -> int:
    """One decode step (GPU if available, else NumPy) checked against the float64 reference."""
    on_gpu = _arrays.gpu_available() and args.backend != "numpy"
    backend = args.backend
    rng = np.random.default_rng(args.seed)
    dtype = _arrays.resolve_dtype(args.dtype)
    case = make_decode_case(rng, b=args.b, s_q=args.s_q, h_q=args.h_q, h_kv=1, d=args.d, head_dim_v=args.d_v,
                            page_block_size=args.page, max_seqlen=args.seqlen, dtype=dtype, causal=args.causal)
    run_case = to_device(case) if on_gpu else case
    print(f"MLA decode: b={args.b} s_q={args.s_q} h_q={args.h_q} h_kv=1 d={args.d} d_v={args.d_v} "
          f"page={args.page} dtype={_arrays.dtype_name(dtype)} causal={args.causal}")
    print(f"  cache_seqlens = {case.cache_seqlens.tolist()}")
    print(f"  q {case.q.shape}, k_cache {case.k_cache.shape}, block_table {case.block_table.shape}")
    sched, num_splits = get_mla_metadata(run_case.cache_seqlens, args.s_q * args.h_q, 1)
    t0 = time.perf_counter()
    out, lse = flash_mla_with_kvcache(*run_case.args(), sched, num_splits, causal=args.causal, backend=backend)
    if on_gpu:
        _arrays.cupy_module().cuda.runtime.deviceSynchronize()
    elapsed = time.perf_counter() - t0
    kind = type(out).__module__.split(".")[0]
    print(f"  ran on {'the GPU' if on_gpu else 'the CPU'} (backend={backend!r}, arrays: {kind}) in "
          f"{elapsed * 1e3:.1f} ms" + (" (first call: includes kernel compilation)" if on_gpu else ""))
    print(f"  out {tuple(out.shape)} {_arrays.dtype_name(out.dtype)}, lse {tuple(lse.shape)} float32, "
          f"{int(_arrays.asnumpy(num_splits)[-1])} splits over {sched.shape[0]} workers")
    ref_out, ref_lse = reference.flash_mla_reference(*case.args(), causal=args.causal, compute_dtype=np.float64)
    out_h = _arrays.asnumpy(out).astype(np.float64)
    lse_h = _arrays.asnumpy(lse).astype(np.float64)
    err = float(np.max(np.abs(out_h - ref_out.astype(np.float64)), initial=0.0))
    fin = np.isfinite(ref_lse)
    lse_err = float(np.max(np.abs(lse_h[fin] - ref_lse[fin]), initial=0.0))
    same_inf = bool(np.array_equal(np.isinf(lse_h), np.isinf(ref_lse)))
    tol = 1e-4 if dtype == np.float32 else 2e-2
    ok = err <= tol and lse_err <= 1e-3 and same_inf and not np.isnan(out_h).any()
    print(f"  check vs float64 reference: max |out err| = {err:.2e}, max |lse err| = {lse_err:.2e}, "
          f"empty rows match: {same_inf} -> {'OK' if ok else 'MISMATCH'}")
    shape = perf.DecodeShape(b=args.b, s_q=args.s_q, h_q=args.h_q, seqlen=float(case.cache_seqlens.mean()),
                             d=args.d, d_v=args.d_v, dtype_bytes=dtype.itemsize)
    r = perf.roofline(shape, "h100")
    print(f"  roofline on an H100: {r.bytes / 1e6:.2f} MB, {r.flops / 1e9:.3f} GFLOP, {r.intensity:.1f} FLOP/B "
          f"-> {r.bound}-bound, >= {r.time_s * 1e6:.2f} us")
    return 0 if ok else 1


BENCH_SHAPES = [  # (b, s_q, h_q, s_k): FlashMLA's table (DESIGN.md §5)
    (128, 1, 16, 4096), (128, 1, 16, 8192), (128, 1, 128, 4096), (128, 2, 128, 4096),
    (128, 2, 128, 8192), (1, 1, 128, 32768), (8, 1, 16, 8192),
]
CPU_SHAPES = [(2, 1, 16, 256), (4, 1, 16, 512), (2, 2, 128, 256)]


def _time_call(fn, on_gpu: bool, warmup: int, reps: int) -> float:
    """Median seconds per call: CUDA events on the GPU, perf_counter on the CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if on_gpu:
        cp = _arrays.cupy_module()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        for _ in range(reps):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def cmd_bench(args) -> int:
    """Time backends on FlashMLA's shapes (or --shape ones) and print a table, JSON or a roofline plot."""
    from . import backends as _backends

    on_gpu = _arrays.gpu_available()
    names = args.backends or (["cupy", "numba"] if on_gpu else ["numpy"])
    for name in names:
        if name not in ("numpy", "numba", "cupy"):
            print(f"error: unknown backend {name!r} (numpy, numba, cupy)", file=sys.stderr)
            return 2
    shapes = [tuple(s) for s in args.shape] if args.shape else (BENCH_SHAPES if on_gpu else CPU_SHAPES)
    try:
        from tqdm import tqdm
    except ImportError:  # progress bar is optional
        def tqdm(x, **_):
            return x
    rows = []
    jobs = [(n, s) for n in names for s in shapes]
    for name, (b, s_q, h_q, s_k) in tqdm(jobs, desc="bench", disable=args.json):
        try:
            _backends.load(name)
        except _backends.BackendUnavailable as exc:
            rows.append(dict(backend=name, b=b, s_q=s_q, h_q=h_q, s_k=s_k, error=str(exc)))
            continue
        rng = np.random.default_rng(0)
        case = make_decode_case(rng, b=b, s_q=s_q, h_q=h_q, d=576, head_dim_v=512, page_block_size=64,
                                seqlens=np.full(b, s_k), dtype="bfloat16", causal=True, scale=0.5)
        gpu_case = to_device(case) if (on_gpu and name != "numpy") else case
        sched, splits = get_mla_metadata(gpu_case.cache_seqlens, s_q * h_q, 1)
        def fn(case=gpu_case, sched=sched, splits=splits, name=name):
            return flash_mla_with_kvcache(*case.args(), sched, splits, causal=True, backend=name, validate=False)
        sec = _time_call(fn, on_gpu and name != "numpy", args.warmup, args.reps)
        r = perf.roofline(perf.DecodeShape(b=b, s_q=s_q, h_q=h_q, seqlen=s_k), "h100")
        a = r.achieved(sec)
        rows.append(dict(backend=name, b=b, s_q=s_q, h_q=h_q, s_k=s_k, ms=sec * 1e3, gbs=a["gbs"],
                         tflops=a["tflops"], roofline_pct=100 * a["roofline_fraction"], bound=r.bound))
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print("| backend | b | s_q | h_q | s_k | ms | GB/s | TFLOP/s | % of H100 roofline | bound |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            if "error" in row:
                print(f"| {row['backend']} | {row['b']} | {row['s_q']} | {row['h_q']} | {row['s_k']} | "
                      f"unavailable: {row['error']} |||||")
            else:
                print(f"| {row['backend']} | {row['b']} | {row['s_q']} | {row['h_q']} | {row['s_k']} | "
                      f"{row['ms']:.3f} | {row['gbs']:.4g} | {row['tflops']:.4g} | {row['roofline_pct']:.1f} | "
                      f"{row['bound']} |")
    if args.plot:
        _plot_roofline([r for r in rows if "error" not in r], args.plot)
        print(f"roofline plot written to {args.plot}")
    return 0


def _plot_roofline(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = perf.PLATFORMS["h100"]
    x = np.logspace(-1, 4, 200)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(x, np.minimum(p.bandwidth_gbs * 1e9 * x, p.bf16_tflops * 1e12) / 1e12, "k-", label=p.name)
    for row in rows:
        shape = perf.DecodeShape(b=row["b"], s_q=row["s_q"], h_q=row["h_q"], seqlen=row["s_k"])
        r = perf.roofline(shape, p)
        ax.loglog([r.intensity], [row["tflops"]], "o", label=f"{row['backend']} b={row['b']} s_q={row['s_q']} "
                                                            f"h_q={row['h_q']} s_k={row['s_k']}")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title("MLA decode on the roofline")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of `python -m mla`."""
    parser = argparse.ArgumentParser(prog="python -m mla", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="backends, GPU and versions")
    demo = sub.add_parser("demo", help="one decode step checked against the reference")
    demo.add_argument("--b", type=_positive, default=4)
    demo.add_argument("--s-q", type=_positive, default=2)
    demo.add_argument("--h-q", type=_positive, default=16)
    demo.add_argument("--seqlen", type=_nonneg, default=300, help="maximum cached length (lengths are random)")
    demo.add_argument("--d", type=_positive, default=576)
    demo.add_argument("--d-v", type=_positive, default=512)
    demo.add_argument("--page", type=_positive, default=64)
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    demo.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    demo.add_argument("--backend", default="auto", choices=["auto", "numpy", "numba", "cupy"])
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="time backends on FlashMLA's shapes")
    bench.add_argument("--backends", nargs="+")
    bench.add_argument("--shape", nargs=4, type=_positive, action="append", metavar=("B", "S_Q", "H_Q", "S_K"))
    bench.add_argument("--warmup", type=_nonneg, default=3)
    bench.add_argument("--reps", type=_positive, default=20)
    bench.add_argument("--json", action="store_true")
    bench.add_argument("--plot", metavar="FILE.png")
    return parser


def main(argv=None) -> int:
    """Entry point of `python -m mla`; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.d_v > args.d:
        print(f"error: --d-v ({args.d_v}) must be <= --d ({args.d})", file=sys.stderr)
        return 2
    return {"info": cmd_info, "demo": cmd_demo, "bench": cmd_bench}[args.command](args)
