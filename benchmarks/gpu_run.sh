#!/usr/bin/env bash
# One GPU session (the device machine goes back after each call, so everything runs in one go):
# install, GPU tests, benchmarks; logs under $OUT (or ./gpu-logs).  Usage: bash benchmarks/gpu_run.sh [tests] [bench]
set -o pipefail
OUT=${OUT:-gpu-logs}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
git rev-parse --short HEAD >> "$OUT/gpu.txt" 2>/dev/null
what=${1:-all}
if [ "$what" = all ] || [ "$what" = tests ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -m gpu -q -p no:cacheprovider ${TEST_ARGS:-tests} 2>&1 | tee "$OUT/gpu_tests.txt" | tail -25
fi
if [ "$what" = all ] || [ "$what" = bench ]; then
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_decode.py --versions ${VERSIONS:-1,3,4} --block-n 32 --reps 20 \
    --out "$OUT/bench_decode.md" 2>&1 | tail -45
  python3 - <<'PY' 2>&1 | tee "$OUT/overhead.txt" | tail -22
import cProfile, pstats, cupy as cp, numpy as np, mla
from mla.testing import make_decode_case, to_device
c = to_device(make_decode_case(np.random.default_rng(0), b=1, s_q=1, h_q=16, d=576, head_dim_v=512,
                               page_block_size=64, seqlens=[64], dtype="bfloat16"))
sched, splits = mla.get_mla_metadata(c.cache_seqlens, 16, 1)
for be in ("numba", "cupy"):
    try:
        f = lambda: mla.flash_mla_with_kvcache(*c.args(), sched, splits, backend=be, validate=False)
        for _ in range(10): f()
        cp.cuda.Device().synchronize()
        pr = cProfile.Profile(); pr.enable()
        for _ in range(100): f()
        cp.cuda.Device().synchronize(); pr.disable()
        st = pstats.Stats(pr); print(be, "host us per call:", round(st.total_tt / 100 * 1e6))
        st.sort_stats("tottime").print_stats(8)
    except Exception as e:
        print(be, "failed:", e)
PY
fi
