"""Prefill attention forward / backward on the GPU: our CuPy kernels vs a naive CuPy version.

Shapes (issue #6): b = 4, s = 4096, h in {16, 128}, d_qk = 192, d_v = 128, causal, bf16 inputs
(the naive baseline runs in fp16: CuPy's batched bf16 matmul fails, DESIGN.md §5).

Rows: "simt" = kernels/prefill_fwd_bwd.cu (fp32 CUDA-core math); "mma" = kernels/prefill_mma.cu
(tensor cores, FlashAttention-2; the default for bf16 / fp16 since its H100 run of 2026-11-25; its
results are checked against the simt kernel at the benchmark shape), with 128-row forward CTAs
(8 warps) and with 64-row ones (4 warps);
"naive" = fp16 matmul + softmax over the full [s, s] matrix per (sequence, head chunk).
Columns: ms, TFLOP/s, speed-up over naive, % of the fp16 matmul rate measured here (cuBLAS 8192^3).

FLOPs (causal counts half the square):
    forward  = 2 * b * h * s^2 * (d_qk + d_v) / 2
    backward = 2 * b * h * s^2 * (3 * d_qk + 2 * d_v) / 2     (S recompute, dP, dV, dK, dQ)

Also: the peak CuPy memory-pool use of a 4-layer MLA stack's forward + backward with and without
gradient checkpointing (DeepSeek-V2-Lite attention dims, 2 x 1024 tokens, float32).

Run: ``python benchmarks/bench_prefill.py [--quick] [--heads 16 128] [--no-simt] [--no-checkpoint]``.
Prints tables; needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np


def _timeit(fn, reps=3, warmup=1):
    import cupy as cp
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) * 1e-3)
    return float(np.median(times))


def naive_forward_backward(q, k, v, dout, scale, head_chunk=16):
    """Naive fp16 attention: full [s, s] scores per (sequence, head chunk), matmul + softmax.

    q, k [b, s, h, d] fp16 ... Returns (fwd_fn, bwd_fn) closures computing out / (dq, dk, dv)."""
    import cupy as cp
    b, s, h, d = q.shape
    mask = cp.tril(cp.ones((s, s), dtype=cp.bool_))
    qt, kt, vt, dot = (x.transpose(0, 2, 1, 3) for x in (q, k, v, dout))   # [b, h, s, *]

    def probs(i, h0):
        sc = cp.matmul(qt[i, h0:h0 + head_chunk], kt[i, h0:h0 + head_chunk].transpose(0, 2, 1))
        sc = cp.where(mask, sc.astype(cp.float32) * scale, -cp.inf)
        sc -= sc.max(axis=-1, keepdims=True)
        p = cp.exp(sc)
        p /= p.sum(axis=-1, keepdims=True)
        return p.astype(cp.float16)

    def fwd():
        out = cp.empty((b, h, s, v.shape[-1]), dtype=cp.float16)
        for i in range(b):
            for h0 in range(0, h, head_chunk):
                out[i, h0:h0 + head_chunk] = cp.matmul(probs(i, h0), vt[i, h0:h0 + head_chunk])
        return out

    def bwd():
        dq, dk, dv = cp.empty_like(qt), cp.empty_like(kt), cp.empty_like(vt)
        for i in range(b):
            for h0 in range(0, h, head_chunk):
                sl = slice(h0, h0 + head_chunk)
                p = probs(i, h0)
                dv[i, sl] = cp.matmul(p.transpose(0, 2, 1), dot[i, sl])
                dp = cp.matmul(dot[i, sl], vt[i, sl].transpose(0, 2, 1)).astype(cp.float32)
                pf = p.astype(cp.float32)
                ds = (pf * (dp - (pf * dp).sum(-1, keepdims=True))).astype(cp.float16)
                dq[i, sl] = cp.matmul(ds, kt[i, sl]) * scale
                dk[i, sl] = cp.matmul(ds.transpose(0, 2, 1), qt[i, sl]) * scale
        return dq, dk, dv

    return fwd, bwd


def matmul_rate(dtype_name="float16", n=8192):
    import cupy as cp
    a = cp.random.standard_normal((n, n)).astype(dtype_name)
    b = cp.random.standard_normal((n, n)).astype(dtype_name)
    t = _timeit(lambda: cp.matmul(a, b), reps=5)
    return 2 * n ** 3 / t / 1e12


@contextlib.contextmanager
def environment(**values):
    """Set environment variables for the block (None removes one), then restore them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = str(v)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# (row name, environment): which prefill kernel flash_attn_varlen_* runs (mla/backends/prefill_cupy.py)
VERSIONS = [
    ("simt (prefill_fwd_bwd.cu, fp32 FMA)", {"MLA_PREFILL_KERNEL": "simt"}),
    ("mma (prefill_mma.cu, 128-row fwd)", {"MLA_PREFILL_KERNEL": "mma", "MLA_PREFILL_MMA_FWD_WARPS": "8"}),
    ("mma (prefill_mma.cu, 64-row fwd)", {"MLA_PREFILL_KERNEL": "mma", "MLA_PREFILL_MMA_FWD_WARPS": "4"}),
]


def _rel_err(got, want):
    import cupy as cp
    got, want = got.astype(cp.float32), want.astype(cp.float32)
    return float(cp.abs(got - want).max() / cp.maximum(cp.abs(want).max(), 1e-6))


def bench_attention(b, s, h, d, d_v, reps, matmul_tflops=None, simt=True):
    """Times every version (and the naive baseline) at one shape; prints a table; returns
    (rows [(name, fwd seconds, bwd seconds)], fwd FLOPs, bwd FLOPs)."""
    import cupy as cp

    import mla
    from mla.prefill import flash_attn_varlen_backward, flash_attn_varlen_forward
    rng = cp.random.default_rng(0)
    bf16 = mla.bfloat16
    q = rng.standard_normal((b * s, h, d), dtype=cp.float32).astype(bf16)
    k = rng.standard_normal((b * s, h, d), dtype=cp.float32).astype(bf16)
    v = rng.standard_normal((b * s, h, d_v), dtype=cp.float32).astype(bf16)
    dout = rng.standard_normal((b * s, h, d_v), dtype=cp.float32).astype(bf16)
    cu = cp.arange(b + 1, dtype=cp.int32) * s
    scale = d ** -0.5
    fwd_flops = 2 * b * h * s * s * (d + d_v) / 2
    bwd_flops = 2 * b * h * s * s * (3 * d + 2 * d_v) / 2
    kw = dict(softmax_scale=scale, causal=True, backend="cupy")
    rows, results = [], {}
    for name, env in VERSIONS:
        if not simt and env["MLA_PREFILL_KERNEL"] == "simt":
            continue
        try:
            with environment(**env):
                out, lse = flash_attn_varlen_forward(q, k, v, cu, cu, s, s, **kw)
                grads = flash_attn_varlen_backward(dout, q, k, v, out, lse, cu, cu, s, s, **kw)
                results[name] = (out, lse) + tuple(grads)
                n = reps if env["MLA_PREFILL_KERNEL"] == "simt" else 3 * reps
                t_f = _timeit(lambda: flash_attn_varlen_forward(q, k, v, cu, cu, s, s, **kw), reps=n)
                t_b = _timeit(lambda o=out, m=lse: flash_attn_varlen_backward(dout, q, k, v, o, m, cu, cu, s, s, **kw),
                              reps=n)
            rows.append((name, t_f, t_b))
        except Exception as exc:  # a kernel failing, out of memory, ...
            print(f"  {name} failed: {type(exc).__name__}: {exc}")
    # the tensor-core results against the SIMT kernel at this shape
    ref = results.get(VERSIONS[0][0])
    for name, res in results.items():
        if ref is None or res is ref:
            continue
        errs = [_rel_err(x, y) for x, y in zip(res, ref)]
        print(f"  check {name} vs simt (max |diff| / max |simt|): out {errs[0]:.2e}, lse {errs[1]:.2e}, "
              f"dq {errs[2]:.2e}, dk {errs[3]:.2e}, dv {errs[4]:.2e}")
    del results
    naive = None
    try:
        f16 = [x.astype(cp.float16).reshape(b, s, h, -1) for x in (q, k, v, dout)]
        nf, nb = naive_forward_backward(*f16, scale)
        naive = ("naive CuPy (fp16 matmul + softmax)", _timeit(nf, reps=reps), _timeit(nb, reps=reps))
        del f16
    except Exception as exc:  # e.g. out of memory
        print(f"  naive baseline failed: {type(exc).__name__}: {exc}")
    print(f"\nb={b} s={s} h={h} d_qk={d} d_v={d_v} causal, bf16  (fwd {fwd_flops / 1e12:.2f} TFLOP, "
          f"bwd {bwd_flops / 1e12:.2f} TFLOP)")
    mm = f"% of {matmul_tflops:.0f}" if matmul_tflops else "% mm"
    print(f"  {'version':38s} {'fwd ms':>8s} {'TF/s':>6s} {'x naive':>7s} {mm:>7s}   "
          f"{'bwd ms':>8s} {'TF/s':>6s} {'x naive':>7s} {mm:>7s}")
    for name, tf, tb in rows + ([naive] if naive else []):
        cols = []
        for t, flops, i in ((tf, fwd_flops, 1), (tb, bwd_flops, 2)):
            rate = flops / t / 1e12
            speed = f"{naive[i] / t:7.2f}" if naive else f"{'-':>7s}"
            pct = f"{rate / matmul_tflops * 100:6.1f}%" if matmul_tflops else f"{'-':>7s}"
            cols.append(f"{t * 1e3:8.2f} {rate:6.1f} {speed} {pct}")
        print(f"  {name:38s} {cols[0]}   {cols[1]}")
    if naive:
        for name, tf, tb in rows:
            print(f"  speed-up vs naive, {name}: fwd {naive[1] / tf:.2f}x, bwd {naive[2] / tb:.2f}x")
    return rows + ([naive] if naive else []), fwd_flops, bwd_flops


class _PeakHook:
    """Tracks the peak bytes handed out by CuPy's memory pool (malloc/free hooks)."""

    def __init__(self):
        from cupy.cuda import memory_hook

        outer = self

        class Hook(memory_hook.MemoryHook):
            name = "PeakHook"

            def malloc_postprocess(self, **kw):
                outer.current += kw["mem_size"]
                outer.peak = max(outer.peak, outer.current)

            def free_postprocess(self, **kw):
                outer.current -= kw["mem_size"]

        self.hook = Hook()
        self.current = self.peak = 0


def bench_checkpoint(n_layers=4, tokens=1024, batch=2):
    import cupy as cp

    from mla.config import MLAConfig
    from mla.layer import MultiHeadLatentAttention
    cfg = MLAConfig.deepseek_v2_lite(dtype="float32")
    layers = [MultiHeadLatentAttention.random(cfg, seed=i, xp=cp) for i in range(n_layers)]
    x0 = cp.random.standard_normal((batch, tokens, cfg.hidden_size), dtype=cp.float32) * 0.1
    print(f"\ngradient checkpointing: {n_layers} MLA layers (V2-Lite dims: hidden {cfg.hidden_size}, h "
          f"{cfg.num_heads}, latent {cfg.kv_lora_rank}), {batch} x {tokens} tokens, float32")
    print(f"  {'mode':14s} {'peak MiB':>10s} {'held after fwd MiB':>20s} {'ctx MiB':>9s} {'fwd+bwd ms':>11s}")
    results = {}
    for checkpoint in (False, True):
        pool = cp.get_default_memory_pool()
        cp.cuda.Device().synchronize()
        pool.free_all_blocks()
        base = pool.used_bytes()
        peak = _PeakHook()
        t0 = time.perf_counter()
        with peak.hook:
            h, ctxs = x0, []
            for layer in layers:
                out, ctx = layer.forward(h, checkpoint=checkpoint)
                h = h + out
                ctxs.append(ctx)
            held = pool.used_bytes() - base
            g = cp.ones_like(h)
            for layer, ctx in zip(reversed(layers), reversed(ctxs)):
                dx, _ = layer.backward(g, ctx)
                g = g + dx
            cp.cuda.Device().synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        saved = sum(c.saved_bytes for c in ctxs)
        results[checkpoint] = peak.peak
        print(f"  {'checkpoint' if checkpoint else 'store all':14s} {peak.peak / 2**20:10.1f} "
              f"{held / 2**20:20.1f} {saved / 2**20:9.1f} {ms:11.1f}")
        del ctxs, h, g
    if results[True]:
        print(f"  peak saving: {(1 - results[True] / results[False]) * 100:.0f}%")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="b=1, s=1024")
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions (x3 for the mma rows)")
    parser.add_argument("--no-simt", action="store_true", help="skip the (slow) fp32 SIMT rows")
    parser.add_argument("--no-checkpoint", action="store_true", help="skip the checkpointing benchmark")
    args = parser.parse_args(argv)
    try:
        import cupy as cp
        cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        print(f"needs a CUDA GPU with CuPy: {exc}")
        return 1
    props = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {props['name'].decode() if isinstance(props['name'], bytes) else props['name']}")
    try:
        rate = matmul_rate()
        print(f"cuBLAS fp16 matmul 8192^3 (CuPy): {rate:.0f} TFLOP/s; DESIGN.md's bf16 matmul rate: 756-793 TFLOP/s")
    except Exception as exc:
        rate = None
        print(f"matmul rate failed: {exc}")
    b, s = (1, 1024) if args.quick else (4, 4096)
    for h in args.heads:
        try:
            rows, ff, bf = bench_attention(b, s, h, 192, 128, reps=args.reps, matmul_tflops=rate,
                                           simt=not args.no_simt)
            for name, tf, tb in rows:
                if not name.startswith("naive"):
                    print(f"  {name} as % of 780 TFLOP/s bf16 matmul: fwd {ff / tf / 1e12 / 780 * 100:.1f}%, "
                          f"bwd {bf / tb / 1e12 / 780 * 100:.1f}%")
        except Exception as exc:
            print(f"h={h} failed: {type(exc).__name__}: {exc}")
        sys.stdout.flush()
    if not args.no_checkpoint:
        try:
            bench_checkpoint()
        except Exception as exc:
            print(f"checkpoint benchmark failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
