"""Run 16 (sixth session): the seesaw kernel's time from prepared launches, on bench_decode's and bench_fp8_sparse's
inputs, with the host and the device plan (run from the repository root; output.txt beside it)."""

import sys

import cupy as cp

sys.path.insert(0, "benchmarks")  # run from the repository root

import bench_fp8_sparse as bf  # noqa: E402
from bench_decode import make_inputs  # noqa: E402

import mla  # noqa: E402
from mla import _arrays, api  # noqa: E402
from mla.backends import cupy_backend  # noqa: E402

b, s_q, h_q, s_k = 128, 2, 128, 8192
dev = cp.cuda.Device().id
flush = cp.empty(256 << 20, dtype=cp.uint8)


def t_launch(q, k, table, seqlens, plan):
    if plan == "host":
        sched, splits = api.get_mla_metadata(seqlens.get(), s_q * h_q, 1)
    else:
        sched, splits = mla.get_mla_metadata(seqlens, s_q * h_q, 1)
    problem = api._validate(q, k, table, seqlens, 512, None, False, False, None, None, None, False)
    launches, _, _ = cupy_backend._prepare(cp, problem, sched, splits, dev, "auto")
    return cupy_backend.time_launches(cp, launches, flush, 20), launches[0][0].name


for name in ("bench_decode inputs", "bench_fp8_sparse inputs"):
    if name.startswith("bench_decode"):
        q, k, table, seqlens = make_inputs(cp, b, s_q, h_q, s_k, _arrays.BFLOAT16)
    else:
        k, _, table = bf._cache(b, s_k)
        q = bf._random_bf16((b, s_q, h_q, 576))
        seqlens = cp.full((b,), s_k, dtype=cp.int32)
    for plan in ("host", "device"):
        t, fn = t_launch(q, k, table, seqlens, plan)
        print(f"{name:26s} plan={plan:6s} {fn} {t * 1e3:.3f} ms", flush=True)
