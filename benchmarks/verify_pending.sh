#!/usr/bin/env bash
# The GPU checks of work written without a GPU (2026-11-25: that session had no device time left).
# Each part fits one device call (timeouts sum to < 600 s); logs and tables go to $OUT (./gpu-logs).
# Run the parts in this order, back to back (a machine stays warm ~30 s between calls):
#
#   bash benchmarks/verify_pending.sh p1        # by issue: Numba v6 + bench (#3), notebooks + roofline (#7), Hopper (#4)
#   bash benchmarks/verify_pending.sh p2        # FP8/sparse (#5), tensor-core prefill (#6), their benchmarks
#   bash benchmarks/verify_pending.sh p3        # re-checks after p1/p2's fixes, mla bench --plot, GPU notebooks
#   bash benchmarks/verify_pending.sh p4        # Numba launch per stream (graph), host-time profile
#   bash benchmarks/verify_pending.sh p5        # nvidia-h100-x2: NCCL (#8), then re-checks with the gates removed
#   bash benchmarks/verify_pending.sh new1      # wgmma probes, device plan + CUDA graph, Numba v6, CuPy FP8/sparse
#   bash benchmarks/verify_pending.sh new2      # Numba FP8/sparse, sparse prefill, tensor-core prefill, Hopper matrix
#   bash benchmarks/verify_pending.sh bench     # their benchmarks + the decode table (Numba v5/v6, CuPy kernels)
#   bash benchmarks/verify_pending.sh sanitize  # compute-sanitizer memcheck/racecheck of the new kernels
#   bash benchmarks/verify_pending.sh regress   # the whole `pytest -m gpu` suite (gates closed), roofline, notebooks
#   bash benchmarks/verify_pending.sh multi     # on nvidia-h100-x2: NCCL tests + the multi-GPU benchmarks
#
# A GPU fault poisons a process's CUDA context, so every test file runs in its own pytest process.
# Nothing here removes a gate (MLA_CUPY_UNVERIFIED): that is a code change after a pass.
# The device tool brings back at most 8 files from $OUT: logs, tables and plots are written to a
# scratch folder and packed into one $OUT/<part>.tgz at the end (tails are printed as they finish).
set -o pipefail
FINAL_OUT=${OUT:-gpu-logs}; mkdir -p "$FINAL_OUT"
OUT=$(mktemp -d)
trap 'tar -czf "$FINAL_OUT/${part:-new1}.tgz" -C "$OUT" . && echo "logs: $FINAL_OUT/${part:-new1}.tgz"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0 MLA_GPU_EXAMPLES=${MLA_GPU_EXAMPLES:-60}
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.txt" 2>&1 || true
{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv; git rev-parse --short HEAD; date -u; } \
  > "$OUT/gpu.txt" 2>&1
PYTEST="python3 -m pytest -m gpu -q -p no:cacheprovider -ra --maxfail=20"

# Every step's limit is clamped to what is left of the part's budget (BUDGET seconds, default 570),
# so a part never outlives its device call: a step with under 15 s left is skipped and says so.
BUDGET=${BUDGET:-570}
left() { echo $(( BUDGET - SECONDS )); }
clamp() { local l; l=$(left); (( $1 < l )) && echo "$1" || echo "$l"; }
t() {  # t SECONDS LOGNAME pytest-args...: one pytest process, log to $OUT/LOGNAME.txt, print its tail
  local secs name=$2; secs=$(clamp "$1"); shift 2
  if (( secs < 15 )); then echo "== $name skipped: out of time"; return; fi
  local t0=$SECONDS
  timeout "$secs" $PYTEST "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name (rc $?, $((SECONDS - t0)) s)"; tail -4 "$OUT/$name.txt"
}
r() {  # r SECONDS LOGNAME command...: one command, log to $OUT/LOGNAME.txt, print its tail
  local secs name=$2; secs=$(clamp "$1"); shift 2
  if (( secs < 15 )); then echo "== $name skipped: out of time"; return; fi
  local t0=$SECONDS
  timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  echo "== $name (rc $?, $((SECONDS - t0)) s)"; tail -14 "$OUT/$name.txt"
}

part=${1:-new1}
case "$part" in
p1)  # the Numba v6 verdict (#3), the GPU notebooks and roofline plot (#7), then the Hopper kernel (#4)
  export MLA_CUPY_UNVERIFIED=1
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  MLA_TEST_NUMBA_VERSIONS=6 t 150 t_numba_v6 tests/test_numba_gpu.py -k "case_matrix or host_arrays or other_dims"
  r 110 bench_decode python3 benchmarks/bench_decode.py --versions 5,6 --block-n 32 --reps 20 --out "$OUT/bench_decode.md"
  r 60 mla_bench python3 -m mla bench --plot "$OUT/roofline.png"
  r 110 notebooks python3 benchmarks/run_notebooks.py --gpu --out "$OUT/notebooks"
  t 120 t_device_plan_graph tests/test_cupy_gpu.py -k "device_plan or get_mla_metadata or cuda_graph"
  t 200 t_hopper tests/test_cupy_gpu.py -k "hopper and not sanitizer"
  ;;
p2)  # FP8 / sparse (#5), tensor-core prefill (#6), and their benchmarks
  export MLA_CUPY_UNVERIFIED=1
  t 150 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py -k "not sanitizer"
  t 100 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py -k "not sanitizer"
  t 100 t_prefill tests/test_prefill_gpu.py -k "not sanitizer"
  t 80 t_sparse_prefill tests/test_sparse_prefill_gpu.py -k "not sanitizer"
  r 90 bench_prefill python3 benchmarks/bench_prefill.py --no-checkpoint --no-simt
  r 80 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_sparse_prefill python3 benchmarks/bench_sparse_prefill.py --check --out "$OUT/bench_sparse_prefill.md"
  for k in portable hopper; do r 40 "cupy_$k" env MLA_CUPY_KERNEL=$k python3 -m mla.backends.cupy_backend bench; done
  ;;
p3)  # after p1/p2: Numba views without stream syncs (graph capture, speed), Hopper exchange barriers, #7 runs
  export MLA_CUPY_UNVERIFIED=1
  t 60 t_graph tests/test_cupy_gpu.py -k "cuda_graph or forcing_hopper"
  r 60 bench_decode python3 benchmarks/bench_decode.py --versions 5,6 --reps 30 --out "$OUT/bench_decode.md"
  MLA_CUPY_KERNEL=hopper t 60 s_hopper tests/test_cupy_gpu.py -k sanitizer
  t 60 t_hopper tests/test_cupy_gpu.py -k "hopper and not sanitizer"
  for k in portable hopper; do r 30 "cupy_$k" env MLA_CUPY_KERNEL=$k python3 -m mla.backends.cupy_backend bench; done
  r 150 mla_bench python3 -m mla bench --plot "$OUT/roofline.png"
  r 250 notebooks python3 benchmarks/run_notebooks.py --gpu --out "$OUT/notebooks"
  ;;
p4)  # Numba launchers per stream (graph capture), and where the Numba call's host time goes
  t 60 t_graph tests/test_cupy_gpu.py -k "cuda_graph"
  MLA_NUMBA_VERSION=6 r 90 profile_host python3 benchmarks/profile_host.py
  ;;
p5)  # on nvidia-h100-x2: the multi-GPU run (#8), then the Numba view cache (#3) and the un-gated kernels
  t 120 t_distributed tests/test_distributed.py
  r 60 dist_check python3 -m mla.distributed --mode context --how range --gpus 2 --b 16 --s-k 8192 --varlen --causal \
    --s-q 2 --reps 3
  r 90 dist_1m python3 -m mla.distributed --mode context --gpus 1 2 --b 1 --s-k 1048576 --h-q 128 --reps 10 \
    --json "$OUT/dist_1m.json"
  r 90 dist_b128 python3 -m mla.distributed --mode context --gpus 1 2 --b 128 --s-k 32768 --h-q 128 --reps 10 \
    --json "$OUT/dist_b128.json"
  t 30 t_graph tests/test_cupy_gpu.py -k "cuda_graph"
  r 50 bench_decode python3 benchmarks/bench_decode.py --versions 5,6 --reps 20 --out "$OUT/bench_decode.md"
  r 60 nb06 python3 benchmarks/run_notebooks.py --gpu --out "$OUT/notebooks" notebooks/06_fp8_and_sparse.ipynb
  MLA_TEST_NUMBA_VERSIONS=6 t 60 t_numba_v6 tests/test_numba_gpu.py -k "case_matrix or host_arrays"
  t 40 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 50 t_prefill tests/test_prefill_gpu.py
  t 30 t_sparse_prefill tests/test_sparse_prefill_gpu.py
  r 80 dist_head python3 -m mla.distributed --mode head --gpus 1 2 --b 128 --s-k 32768 --h-q 128 --reps 10 \
    --json "$OUT/dist_head.json"
  ;;
new1)
  export MLA_CUPY_UNVERIFIED=1
  t 100 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 90 t_device_plan_graph tests/test_cupy_gpu.py -k "device_plan or get_mla_metadata or cuda_graph"
  MLA_TEST_NUMBA_VERSIONS=6 t 170 t_numba_v6 tests/test_numba_gpu.py -k "case_matrix or host_arrays or other_dims"
  t 220 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py -k "not sanitizer"
  ;;
new2)
  export MLA_CUPY_UNVERIFIED=1
  t 120 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py -k "not sanitizer"
  t 130 t_sparse_prefill tests/test_sparse_prefill_gpu.py -k "not sanitizer"
  t 190 t_prefill tests/test_prefill_gpu.py -k "not sanitizer"
  t 140 t_hopper tests/test_cupy_gpu.py -k "hopper and not sanitizer"
  ;;
bench)
  export MLA_CUPY_UNVERIFIED=1
  timeout 130 python3 benchmarks/bench_decode.py --versions 5,6 --block-n 32 --reps 20 --out "$OUT/bench_decode.md" \
    > "$OUT/bench_decode.txt" 2>&1; tail -14 "$OUT/bench_decode.txt"
  for k in portable hopper; do
    MLA_CUPY_KERNEL=$k timeout 60 python3 -m mla.backends.cupy_backend bench > "$OUT/cupy_$k.txt" 2>&1
    tail -6 "$OUT/cupy_$k.txt"
  done
  timeout 110 python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md" \
    > "$OUT/bench_fp8_sparse.txt" 2>&1; tail -8 "$OUT/bench_fp8_sparse.txt"
  timeout 90 python3 benchmarks/bench_sparse_prefill.py --check --out "$OUT/bench_sparse_prefill.md" \
    > "$OUT/bench_sparse_prefill.txt" 2>&1; tail -6 "$OUT/bench_sparse_prefill.txt"
  timeout 130 python3 benchmarks/bench_prefill.py --no-checkpoint --no-simt > "$OUT/bench_prefill.txt" 2>&1
  tail -14 "$OUT/bench_prefill.txt"
  ;;
sanitize)
  export MLA_CUPY_UNVERIFIED=1
  t 140 s_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  t 140 s_sparse_prefill tests/test_sparse_prefill_gpu.py -k sanitizer
  t 160 s_prefill tests/test_prefill_gpu.py -k sanitizer
  MLA_CUPY_KERNEL=hopper t 140 s_hopper tests/test_cupy_gpu.py -k sanitizer
  ;;
regress)
  t 420 t_all_gpu tests
  timeout 60 python3 -m mla bench --plot "$OUT/roofline.png" > "$OUT/mla_bench.txt" 2>&1; tail -12 "$OUT/mla_bench.txt"
  timeout 90 python3 benchmarks/run_notebooks.py --gpu --out "$OUT/notebooks" 2>&1 | tail -9
  ;;
multi)
  t 200 t_distributed tests/test_distributed.py
  timeout 100 python3 -m mla.distributed --mode context --how range --gpus 2 --b 16 --s-k 8192 --varlen --causal \
    --s-q 2 --reps 3 > "$OUT/dist_check.txt" 2>&1; tail -6 "$OUT/dist_check.txt"
  timeout 140 python3 -m mla.distributed --mode context --gpus 1 2 --b 1 --s-k 1048576 --h-q 128 --reps 10 \
    --json "$OUT/dist_1m.json" > "$OUT/dist_1m.txt" 2>&1; tail -6 "$OUT/dist_1m.txt"
  timeout 140 python3 -m mla.distributed --mode context --gpus 1 2 --b 128 --s-k 32768 --h-q 128 --reps 10 \
    --json "$OUT/dist_b128.json" > "$OUT/dist_b128.txt" 2>&1; tail -6 "$OUT/dist_b128.txt"
  ;;
*)
  echo "usage: $0 new1|new2|bench|sanitize|regress|multi" >&2; exit 2 ;;
esac
