"""Prefill attention forward / backward on the GPU: our CuPy kernels vs a naive CuPy version.

Shapes (issue #6): b = 4, s = 4096, h in {16, 128}, d_qk = 192, d_v = 128, causal, bf16 inputs
(the naive baseline runs in fp16: CuPy's batched bf16 matmul fails, DESIGN.md §5).

FLOPs (causal counts half the square):
    forward  = 2 * b * h * s^2 * (d_qk + d_v) / 2
    backward = 2 * b * h * s^2 * (3 * d_qk + 2 * d_v) / 2     (S recompute, dP, dV, dK, dQ)

Also: the peak CuPy memory-pool use of a 4-layer MLA stack's forward + backward with and without
gradient checkpointing (DeepSeek-V2-Lite attention dims, 2 x 1024 tokens, float32).

Run: ``python benchmarks/bench_prefill.py [--quick]``. Prints a table; needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
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


def bench_attention(b, s, h, d, d_v, reps):
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
    rows = []
    out, lse = flash_attn_varlen_forward(q, k, v, cu, cu, s, s, softmax_scale=scale, causal=True, backend="cupy")
    t_f = _timeit(lambda: flash_attn_varlen_forward(q, k, v, cu, cu, s, s, softmax_scale=scale, causal=True,
                                                    backend="cupy"), reps=reps)
    t_b = _timeit(lambda: flash_attn_varlen_backward(dout, q, k, v, out, lse, cu, cu, s, s, softmax_scale=scale,
                                                     causal=True, backend="cupy"), reps=reps)
    rows.append(("ours (CuPy RawKernel v1, bf16)", t_f, t_b))
    try:
        f16 = [x.astype(cp.float16).reshape(b, s, h, -1) for x in (q, k, v, dout)]
        nf, nb = naive_forward_backward(*f16, scale)
        tn_f = _timeit(nf, reps=reps)
        tn_b = _timeit(nb, reps=reps)
        rows.append(("naive CuPy (fp16 matmul + softmax)", tn_f, tn_b))
    except Exception as exc:  # e.g. out of memory
        print(f"  naive baseline failed: {type(exc).__name__}: {exc}")
    print(f"\nb={b} s={s} h={h} d_qk={d} d_v={d_v} causal  (fwd {fwd_flops / 1e12:.2f} TFLOP, "
          f"bwd {bwd_flops / 1e12:.2f} TFLOP)")
    print(f"  {'version':38s} {'fwd ms':>9s} {'fwd TF/s':>9s} {'bwd ms':>9s} {'bwd TF/s':>9s}")
    for name, tf, tb in rows:
        print(f"  {name:38s} {tf * 1e3:9.2f} {fwd_flops / tf / 1e12:9.1f} {tb * 1e3:9.2f} "
              f"{bwd_flops / tb / 1e12:9.1f}")
    if len(rows) == 2:
        print(f"  speed-up vs naive: fwd {rows[1][1] / rows[0][1]:.2f}x, bwd {rows[1][2] / rows[0][2]:.2f}x")
    return rows, fwd_flops, bwd_flops


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
    for h in (16, 128):
        try:
            rows, ff, bf = bench_attention(b, s, h, 192, 128, reps=3)
            tf, tb = rows[0][1], rows[0][2]
            print(f"  ours as % of 780 TFLOP/s bf16 matmul: fwd {ff / tf / 1e12 / 780 * 100:.1f}%, "
                  f"bwd {bf / tb / 1e12 / 780 * 100:.1f}%")
        except Exception as exc:
            print(f"h={h} failed: {type(exc).__name__}: {exc}")
        sys.stdout.flush()
    try:
        bench_checkpoint()
    except Exception as exc:
        print(f"checkpoint benchmark failed: {type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
