#!/usr/bin/env bash
# The GPU runs of a session, one device call per part (a part's steps are clamped to BUDGET s).
#
#   bash benchmarks/gpu_checks.sh multi     # nvidia-h100-x2 (or h200-x2): NCCL tests + multi-GPU checks/benchmarks (#8)
#   bash benchmarks/gpu_checks.sh h100a     # H100: `pytest -m gpu` first half (one process per file), decode tables
#   bash benchmarks/gpu_checks.sh h100b     # H100: `pytest -m gpu` second half, FP8/sparse/prefill tables, roofline
#
# A GPU fault poisons a process's CUDA context, so every test file runs in its own pytest process.
# The device tool brings back at most 8 files from $OUT: logs, tables and plots are written to a
# scratch folder and packed into one $OUT/<part>.tgz at the end (tails are printed as they finish).
# Earlier parts (p1-p5 of 2026-11-25: the checks of work written without a GPU) are in git history.
set -o pipefail
FINAL_OUT=${OUT:-gpu-logs}; mkdir -p "$FINAL_OUT"
OUT=$(mktemp -d)
trap 'tar -czf "$FINAL_OUT/${part:-h100a}.tgz" -C "$OUT" . && echo "logs: $FINAL_OUT/${part:-h100a}.tgz"' EXIT
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD NCCL_NVLS_ENABLE=0
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

part=${1:-h100a}
case "$part" in
multi)  # #8: equality with one GPU (and the NumPy reference) on varlen batches, then time against G
  t 150 t_distributed tests/test_distributed.py
  t 90 t_out_float32 tests/test_cupy_gpu.py -k out_float32
  for how in range round_robin; do
    r 70 "dist_check_$how" python3 -m mla.distributed --mode context --how $how --gpus 2 --b 16 --s-k 8192 --varlen \
      --causal --s-q 2 --reps 3
  done
  r 70 dist_check_head python3 -m mla.distributed --mode head --gpus 2 --b 16 --s-k 8192 --varlen --causal --s-q 2 --reps 3
  r 90 dist_1m python3 -m mla.distributed --mode context --gpus 2 --b 1 --s-k 1048576 --h-q 128 --reps 20 \
    --json "$OUT/dist_1m.json"
  r 90 dist_b128 python3 -m mla.distributed --mode context --gpus 2 --b 128 --s-k 32768 --h-q 128 --reps 20 \
    --json "$OUT/dist_b128.json"
  r 90 dist_head python3 -m mla.distributed --mode head --gpus 2 --b 128 --s-k 32768 --h-q 128 --reps 20 \
    --json "$OUT/dist_head.json"
  ;;
h100a)  # `pytest -m gpu`, first half (one process per file), then the decode tables (#3, #4)
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 200 t_numba tests/test_numba_gpu.py  # (178 s in 2026-11-27 run 13)
  t 200 t_cupy tests/test_cupy_gpu.py
  r 110 bench_decode python3 benchmarks/bench_decode.py --versions 1,5,6 --reps 20 --out "$OUT/bench_decode.md"
  r 30 cupy_portable env MLA_CUPY_KERNEL=portable python3 -m mla.backends.cupy_backend bench
  r 30 cupy_hopper env MLA_CUPY_KERNEL=hopper python3 -m mla.backends.cupy_backend bench
  ;;
h100b)  # `pytest -m gpu`, second half, then the FP8/sparse/prefill tables (#5, #6), roofline plot, host profile
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 90 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  t 130 t_prefill tests/test_prefill_gpu.py
  t 70 t_sparse_prefill tests/test_sparse_prefill_gpu.py
  r 50 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 40 bench_sparse_prefill python3 benchmarks/bench_sparse_prefill.py --check --out "$OUT/bench_sparse_prefill.md"
  r 60 bench_prefill python3 benchmarks/bench_prefill.py --no-checkpoint --no-simt
  r 40 mla_bench python3 -m mla bench --plot "$OUT/roofline.png"
  ;;
h100c)  # the rest of a session's H100 run: the two longest test files alone, the remaining decode shapes
  t 260 t_numba tests/test_numba_gpu.py
  t 170 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  r 80 bench_decode_rest python3 benchmarks/bench_decode.py --versions 5,6 --shapes 2,3,4 --reps 20 \
    --out "$OUT/bench_decode_rest.md"
  r 30 cupy_hopper env MLA_CUPY_KERNEL=hopper python3 -m mla.backends.cupy_backend bench
  ;;
h100d)  # re-checks after h100c's two failures (Numba v5/v6 at d_v = 64; memcheck and numba-cuda's start-up probes)
  t 240 t_numba tests/test_numba_gpu.py
  t 120 s_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py -k sanitizer
  t 60 t_out_float32 tests/test_cupy_gpu.py -k "out_float32 or sanitizer"
  t 60 s_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  ;;
fp8sweep)  # issue #5: the dense FP8 kernel under other tilings (2 CTAs an SM fit at block_n 32, 2 stages)
  r 150 fp8_sweep python3 benchmarks/bench_fp8_sparse.py --reps 20 --sweep 8,64,3 8,64,2 8,32,2 4,32,2 8,32,3 8,32,4 4,64,3 4,64,2
  r 120 bench_fp8_numba python3 benchmarks/bench_fp8_sparse.py --backend numba --check --reps 10
  ;;
ncu)  # Nsight Compute on the memory-bound shape: portable (the reference point), hopper, fp8 (#4, #5)
  NCU="ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis"
  for k in portable hopper fp8; do r 100 "ncu_$k" $NCU python3 benchmarks/profile_kernel.py --kernel $k; done
  r 100 ncu_hopper_compute $NCU python3 benchmarks/profile_kernel.py --kernel hopper --s-q 2 --h-q 128
  ;;
recheck)  # after the review refactor (shared output allocation of the CuPy paths): their GPU tests again
  t 150 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  MLA_TEST_NUMBA_VERSIONS=6 t 120 t_numba_v6 tests/test_numba_gpu.py -k "case_matrix or host_arrays"
  ;;
narrow)  # issue #4: the narrow Hopper kernel (<= 16 query rows a KV head): its GPU tests, sanitizers, timings
  for swap in 0 1; do  # which reading of the MN-major SW128 descriptor the hardware has (mla_wgmma.cuh)
    r 60 "selfcheck_swapmn$swap" env MLA_WG_DIAG_SW_SWAP_MN=$swap MLA_CUPY_KERNEL=hopper \
      MLA_HOPPER_VARIANT=narrow python3 -m mla.backends.cupy_backend check
  done
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 200 t_cupy_hopper tests/test_cupy_gpu.py -k "hopper"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=narrow t 120 s_cupy_narrow \
    tests/test_cupy_gpu.py -k sanitizer
  r 120 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,0,5,4,6 --reps 20 \
    --cupy-kernels portable,hopper-wide,hopper-narrow --out "$OUT/bench_decode.md"
  for v in wide narrow; do
    r 40 "kernel_$v" env MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=$v \
      python3 -m mla.backends.cupy_backend bench
  done
  r 30 kernel_portable env MLA_CUPY_KERNEL=portable python3 -m mla.backends.cupy_backend bench
  r 120 ncu_narrow env MLA_NVRTC_LINEINFO=1 ncu --clock-control none -k regex:mla_decode --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
    --section MemoryWorkloadAnalysis --section SourceCounters python3 benchmarks/profile_kernel.py --kernel hopper
  ;;
auto)  # issue #4: "auto" picks the Hopper kernels now; the whole CuPy GPU file, the row counts where "auto"
  # switches kernels, the decode / combine split of the few-sequences shape (b = 8)
  t 200 t_cupy tests/test_cupy_gpu.py
  r 150 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,0,5,4,6,7,8,9 --reps 20 \
    --cupy-kernels auto,portable,hopper-wide,hopper-narrow --out "$OUT/bench_decode.md"
  r 40 kernel_auto python3 -m mla.backends.cupy_backend bench
  r 60 ncu_b8 ncu --clock-control none -k regex:mla_ --launch-skip 4 --launch-count 2 --section SpeedOfLight \
    python3 benchmarks/profile_kernel.py --kernel hopper --b 8
  ;;
combine)  # the combine kernel with 4 warps a row: every GPU test file whose kernels use it, then the tables
  t 120 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 150 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,0,5,4,6 --reps 20 \
    --cupy-kernels auto,portable --out "$OUT/bench_decode.md"
  r 40 kernel_auto python3 -m mla.backends.cupy_backend bench
  r 30 kernel_portable env MLA_CUPY_KERNEL=portable python3 -m mla.backends.cupy_backend bench
  r 60 ncu_b8 ncu --clock-control none -k regex:mla_ --launch-skip 4 --launch-count 2 --section SpeedOfLight \
    python3 benchmarks/profile_kernel.py --kernel hopper --b 8
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
fp8narrow)  # issue #5: the narrow kernel's FP8 build (auto for dense FP8 with <= 16 rows a KV head on an H100)
  t 120 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  MLA_CUPY_FP8_KERNEL=narrow t 120 t_cupy_fp8_forced tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_FP8_KERNEL=narrow t 120 s_cupy_fp8_narrow tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  r 90 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 120 ncu_fp8_narrow env MLA_NVRTC_LINEINFO=1 ncu --clock-control none -k regex:mla_decode --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section SourceCounters python3 benchmarks/profile_kernel.py --kernel fp8
  ;;
wide)  # issue #4: the 64-row Hopper kernel on 128-byte swizzled K tiles (whole-line copies, as the narrow one)
  t 200 t_cupy_hopper tests/test_cupy_gpu.py -k "hopper"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=wide t 120 s_cupy_wide tests/test_cupy_gpu.py \
    -k sanitizer
  r 40 kernel_auto python3 -m mla.backends.cupy_backend bench
  r 40 kernel_wide env MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=wide python3 -m mla.backends.cupy_backend bench
  r 150 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,0,5,4,6,7,8,9 --reps 20 \
    --cupy-kernels auto,portable,hopper-wide --out "$OUT/bench_decode.md"
  r 100 ncu_wide_compute ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    python3 benchmarks/profile_kernel.py --kernel hopper --s-q 2 --h-q 128
  ;;
final)  # the session's last re-check: every CuPy GPU test file (auto = narrow <= 16 rows, wide above), the
  # wgmma probes, the decode / FP8 tables, the split-count sweep of the few-long shapes
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 150 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 150 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,0,5,4,6,7,8,9 --reps 20 \
    --cupy-kernels auto,portable --out "$OUT/bench_decode.md"
  r 30 kernel_auto python3 -m mla.backends.cupy_backend bench
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_splits python3 benchmarks/bench_splits.py
  ;;
narrow32)  # the narrow kernel with 32 query rows a CTA (MLA_NQ=32): forced on every shape, then timed at 32 rows
  t 200 t_cupy_hopper tests/test_cupy_gpu.py -k "hopper"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=narrow t 120 s_cupy_narrow tests/test_cupy_gpu.py \
    -k sanitizer
  MLA_CUPY_FP8_KERNEL=narrow t 120 t_cupy_fp8_forced tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  r 120 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 7,9,8,1 --reps 20 \
    --cupy-kernels auto,hopper-wide,hopper-narrow --out "$OUT/bench_decode.md"
  r 60 bench_fp8_32 env MLA_CUPY_FP8_KERNEL=narrow python3 benchmarks/bench_fp8_sparse.py --reps 20 --dense-only \
    --h-q 32 --out "$OUT/bench_fp8_32.md"
  ;;
fp8wide)  # the wide kernel's FP8 build (dense FP8 above 32 rows a KV head): tests forced and auto, sanitizer, timings
  t 120 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  MLA_CUPY_FP8_KERNEL=wide t 120 t_cupy_fp8_forced tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_FP8_KERNEL=wide t 120 s_cupy_fp8_wide tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  for k in portable narrow wide; do
    r 40 "bench_fp8_32_$k" env MLA_CUPY_FP8_KERNEL=$k python3 benchmarks/bench_fp8_sparse.py --reps 20 --dense-only --h-q 32
  done
  ;;
sparsewide)  # the wide kernel's sparse build (h_q / h_kv % 64 == 0 on an H100): tests, sanitizer, timings
  t 150 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 150 t_cupy tests/test_cupy_gpu.py -k "hopper or auto or sanitizer"
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_sparse_portable env MLA_CUPY_SPARSE_KERNEL=portable python3 benchmarks/bench_fp8_sparse.py --reps 20
  ;;
review)  # after the review refactor (shared plan-row helper in the decode kernels): their GPU tests again
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 150 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 90 t_sparse_prefill tests/test_sparse_prefill_gpu.py
  r 30 kernel_auto python3 -m mla.backends.cupy_backend bench
  r 60 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1 --reps 20 \
    --cupy-kernels auto,portable,hopper-wide,hopper-narrow --out "$OUT/bench_decode.md"
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
fp8exp)  # A/B timings: O *= alpha skipped or not (MLA_ALPHA_SKIP, the wide kernel), the kernels with L2-resident
  # keys (their time without DRAM), and where the FP8 narrow build stalls (ncu)
  r 40 bench_default python3 benchmarks/bench_fp8_sparse.py --reps 20
  r 40 bench_skip1 env MLA_NVRTC_DEFINES="MLA_ALPHA_SKIP=1" python3 benchmarks/bench_fp8_sparse.py --reps 20
  r 40 bench_skip0 env MLA_NVRTC_DEFINES="MLA_ALPHA_SKIP=0" python3 benchmarks/bench_fp8_sparse.py --reps 20
  r 40 bench_resident python3 benchmarks/bench_fp8_sparse.py --reps 20 --resident 64
  r 150 ncu_fp8_narrow env MLA_NVRTC_LINEINFO=1 ncu --clock-control none -k regex:mla_decode --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --section SourceCounters python3 benchmarks/profile_kernel.py --kernel fp8
  ;;
fp8final)  # the FP8 v2 check (2026-11-26, third session; its one-off steps, runs 1-6 and 8, are in git history):
  # every CuPy decode test file, FP8 builds and the wide kernel forced and under compute-sanitizer, the FP8 /
  # sparse table, dense FP8 at 32 rows on each kernel, the bf16 decode rows (the Numba v6 row too)
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 150 t_cupy tests/test_cupy_gpu.py
  t 120 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  MLA_CUPY_FP8_KERNEL=narrow t 60 t_fp8_narrow tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  MLA_CUPY_FP8_KERNEL=wide t 60 t_fp8_wide tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_FP8_KERNEL=narrow t 60 s_fp8_narrow tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_FP8_KERNEL=wide t 60 s_fp8_wide tests/test_cupy_fp8_sparse_gpu.py -k sanitizer
  MLA_NVRTC_LINEINFO=1 MLA_CUPY_KERNEL=hopper MLA_HOPPER_VARIANT=wide t 120 s_cupy_wide tests/test_cupy_gpu.py \
    -k sanitizer
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  for k in narrow wide; do
    r 40 "bench_fp8_32_$k" env MLA_CUPY_FP8_KERNEL=$k python3 benchmarks/bench_fp8_sparse.py --reps 20 --dense-only --h-q 32
  done
  r 90 bench_decode python3 benchmarks/bench_decode.py --versions 6 --shapes 1,6,7,5 --reps 20 \
    --cupy-kernels auto --out "$OUT/bench_decode.md"
  ;;
dequant)  # the FP8 builds after a dequantisation change (2026-11-26, fourth session: prmt): FP8 / sparse tests
  # (every code exact), each FP8 kernel forced, the FP8 / sparse table, dense FP8 at 32 rows on the narrow kernel
  t 150 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  MLA_CUPY_FP8_KERNEL=narrow t 60 t_fp8_narrow tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  MLA_CUPY_FP8_KERNEL=wide t 60 t_fp8_wide tests/test_cupy_fp8_sparse_gpu.py -k "fp8_dense or auto_picks"
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_fp8_sparse2 python3 benchmarks/bench_fp8_sparse.py --reps 20
  r 40 bench_fp8_32_narrow python3 benchmarks/bench_fp8_sparse.py --reps 20 --dense-only --h-q 32
  ;;
final5)  # the fifth session's last check (the tight plan is the default now): every CuPy and Numba decode test
  # file (they all run on scheduler plans), then the decode + combine split of the few-long shapes
  t 170 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 200 t_numba tests/test_numba_gpu.py
  t 120 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  r 40 splits_parts python3 benchmarks/bench_splits.py --reps 30 --parts
  ;;
combine32)  # (fifth session) the combine with 32 channels a warp and 16 splits in flight: every CuPy decode test file
  # (their combines, sanitizers included), the Numba sparse / FP8 file (cut short in final5), the few-long shapes'
  # decode / combine split, the FP8 / sparse table and the bf16 decode rows
  t 170 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 170 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  r 40 splits_parts python3 benchmarks/bench_splits.py --reps 30 --parts
  r 40 splits python3 benchmarks/bench_splits.py --reps 30
  r 40 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,6,4,5 --reps 20 --cupy-kernels auto \
    --out "$OUT/bench_decode.md"
  ;;
combine32b)  # combine32 again after its fix (4 warps a row from 512 query rows up, 32 channels a warp below): the
  # CuPy decode test files, the few-long shapes, the FP8 / sparse table, the bf16 decode rows
  t 170 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 40 splits_parts python3 benchmarks/bench_splits.py --reps 30 --parts
  r 40 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 bench_decode python3 benchmarks/bench_decode.py --versions "" --shapes 1,6,4,5 --reps 20 --cupy-kernels auto \
    --out "$OUT/bench_decode.md"
  ;;
tensorpipe)  # how busy the wide kernel keeps the tensor cores (#4): Nsight Compute on 128,2,128,8192 (bf16), with
  # the wgmma pipe metric where this ncu knows it
  P="python3 benchmarks/profile_kernel.py --kernel hopper --b 128 --s-q 2 --h-q 128 --s-k 8192"
  r 80 ncu_wide_sections ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section ComputeWorkloadAnalysis --print-details all $P
  r 60 ncu_wide_gmma ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 --metrics \
    sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum $P
  ;;
seesawtrace)  # the seesaw kernel's timeline: clock64() at the barriers of one CTA (benchmarks/seesaw_trace.py)
  r 60 trace_8192 python3 benchmarks/seesaw_trace.py
  r 60 trace_noreload python3 benchmarks/seesaw_trace.py --defines "MLA_DIAG_NO_RELOAD=1"
  cp "$OUT"/trace_*.txt "$FINAL_OUT"/ 2>/dev/null
  ;;
final7)  # (the sixth session's one-off seesaw parts, runs 1-11 and 13, are in git history, up to 2f9a196)
  # the sixth session's last check, on the final seesaw kernel (v1 schedule, switches removed): the CuPy decode
  # GPU test files, every decode shape timed auto / portable / wide / seesaw, the few-long split, the timeline
  t 200 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 150 bench_decode python3 benchmarks/bench_decode.py --versions= --reps 20 \
    --cupy-kernels auto,portable,hopper-wide,hopper-seesaw --out "$OUT/bench_decode.md"
  r 30 splits_parts python3 benchmarks/bench_splits.py --reps 30 --parts
  r 40 trace_8192 python3 benchmarks/seesaw_trace.py
  r 40 trace_noreload python3 benchmarks/seesaw_trace.py --defines "MLA_DIAG_NO_RELOAD=1"
  cp "$OUT"/trace_*.txt "$OUT"/bench_decode.md "$FINAL_OUT"/ 2>/dev/null
  ;;
final8)  # after the review refactor (wg_store_rows: one epilogue for the wide and seesaw kernels, every build): the
  # CuPy decode GPU test files again, and the compute-bound shape wide / seesaw / auto
  t 200 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 60 bench_decode python3 benchmarks/bench_decode.py --versions= --shapes 6,2 --reps 30 \
    --cupy-kernels auto,hopper-wide,hopper-seesaw --out "$OUT/bench_decode.md"
  r 40 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  cp "$OUT"/bench_*.md "$FINAL_OUT"/ 2>/dev/null
  ;;
fp8bench)  # bench_fp8_sparse.py after its fix (the dense bf16 "auto" row at 128,2,128 is the seesaw kernel now)
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  cp "$OUT"/bench_*.md "$FINAL_OUT"/ 2>/dev/null
  ;;
review6)  # the sixth session's review: the sanitizer script now runs the seesaw kernel forced on a second problem
  # (odd block count, an empty sequence); the CuPy decode GPU file again
  MLA_NVRTC_LINEINFO=1 t 120 s_sanitizer tests/test_cupy_gpu.py -k sanitizer
  t 200 t_cupy tests/test_cupy_gpu.py -k "not sanitizer"
  ;;
tma1)  # issue #4 (2026-11-26, seventh session): the seesaw kernel's TMA build (bulk tensor copies of 64 x 64 pieces on
  # mbarriers): its GPU tests first, then both load paths timed (SM clock and power sampled), then the whole file
  t 150 t_seesaw tests/test_cupy_gpu.py -k seesaw
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv -lms 100 \
    > "$OUT/smi.txt" 2>&1 &
  smi=$!
  r 150 seesaw_loads python3 benchmarks/bench_seesaw_loads.py --reps 30 --out "$OUT/seesaw_loads.md"
  kill $smi 2>/dev/null
  t 240 t_cupy tests/test_cupy_gpu.py -k "not seesaw"
  cp "$OUT"/seesaw_loads.md "$FINAL_OUT"/ 2>/dev/null
  ;;
# (tma2-tma5, runs 2-5 of the seventh session: racecheck / synccheck diagnostics of the TMA build, in git history
# before dfca518, the commit that made the TMA build opt-in)
tmafinal)  # the seventh session's last check: the CuPy decode GPU files (the seesaw TMA build forced in the matrix;
  # memcheck on it, racecheck as the recorded expected failure), then both load paths timed in interleaved rounds
  t 260 t_cupy tests/test_cupy_gpu.py
  t 80 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv -lms 100 \
    > "$OUT/smi.txt" 2>&1 &
  smi=$!
  r 170 seesaw_loads python3 benchmarks/bench_seesaw_loads.py --reps 20 --rounds 3 --out "$OUT/seesaw_loads.md"
  kill $smi 2>/dev/null
  cp "$OUT"/seesaw_loads.md "$FINAL_OUT"/ 2>/dev/null
  ;;
raceprobe)  # issue #4 (2026-11-26, eighth session): racecheck on bar.sync-ordered accesses with real bulk copies
  # completing on mbarriers in between (the seesaw TMA build's report, isolated?)
  for v in plain mbar bulk bulk_read bulk_fence bulk_read_nox wg_bar_before wg_bar_after; do
    r 40 "probe_$v" compute-sanitizer --tool racecheck python3 benchmarks/racecheck_mbarrier_probe.py $v
  done
  ;;
tmarace)  # issue #4 (2026-11-26, eighth session): the seesaw TMA build's racecheck report, hazard by hazard (shared
  # addresses), and its NVRTC cubin disassembled on the device (the report's PCs)
  r 200 tma_race env MLA_NVRTC_LINEINFO=1 bash -c "compute-sanitizer --tool racecheck --racecheck-report hazard \
    python3 benchmarks/seesaw_tma_racecheck.py 2>&1 | head -n 4000"
  r 60 tma_cubin env MLA_NVRTC_LINEINFO=1 python3 benchmarks/seesaw_tma_racecheck.py --cubin "$OUT/seesaw_tma.cubin"
  r 60 tma_sass bash -c "(nvdisasm -c -g '$OUT/seesaw_tma.cubin' || cuobjdump -sass '$OUT/seesaw_tma.cubin') \
    > '$OUT/seesaw_tma.sass' 2>&1; wc -l '$OUT/seesaw_tma.sass'; which nvdisasm cuobjdump"
  ;;
tmafix)  # issue #4 (2026-11-26, eighth session): the seesaw TMA build with zero_tail meeting on an mbarrier instead of a
  # 128-thread named barrier: racecheck on it (script, then the test file's sanitizer tests), the probe's two
  # named-barrier variants, its GPU tests, then both load paths timed in interleaved rounds (power sampled)
  r 120 tma_race env MLA_NVRTC_LINEINFO=1 bash -c \
    "compute-sanitizer --tool racecheck python3 benchmarks/seesaw_tma_racecheck.py 2>&1 | tail -n 40"
  for v in wg_bar_before wg_bar_after; do
    r 40 "probe_$v" compute-sanitizer --tool racecheck python3 benchmarks/racecheck_mbarrier_probe.py $v
  done
  MLA_NVRTC_LINEINFO=1 t 150 s_sanitizer tests/test_cupy_gpu.py -k sanitizer
  t 150 t_seesaw tests/test_cupy_gpu.py -k seesaw
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,clocks_event_reasons.active --format=csv -lms 100 \
    > "$OUT/smi.txt" 2>&1 &
  smi=$!
  r 170 seesaw_loads python3 benchmarks/bench_seesaw_loads.py --reps 20 --rounds 3 --out "$OUT/seesaw_loads.md"
  kill $smi 2>/dev/null
  ;;
final8s)  # the eighth session's last check (the seesaw TMA build the default): the CuPy decode GPU files (racecheck now
  # on the TMA build too; the FP8 sanitizer script with its 16-row launch), then the decode table as dispatched and the
  # FP8 / sparse table
  t 280 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 120 bench_decode python3 benchmarks/bench_decode.py --versions= --reps 30 --cupy-kernels auto \
    --out "$OUT/bench_decode.md"
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
tmatrace)  # issue #4 (eighth session): the seesaw timeline with the TMA build (the default now) against cp.async
  r 60 trace_cpasync python3 benchmarks/seesaw_trace.py
  r 60 trace_tma python3 benchmarks/seesaw_trace.py --defines "MLA_SEESAW_TMA=1"
  r 60 trace_tma_4096 python3 benchmarks/seesaw_trace.py --defines "MLA_SEESAW_TMA=1" --s-q 1 --s-k 4096
  ;;
fewlong)  # issue #4 (eighth session): the few-long shapes' time against their length (decode and combine apart) and an
  # empty kernel's time in the same harness: fixed cost against per-tile cost
  r 200 splits_scan python3 benchmarks/bench_splits.py --parts --null --reps 30 --shapes \
    "8,1,16,1024 8,1,16,2048 8,1,16,4096 8,1,16,8192 8,1,16,16384 8,1,16,32768 1,1,128,8192 1,1,128,32768 128,1,16,8192"
  ;;
floor)  # issue #4 (eighth session): the launch floor of the harness, with and without 182848 B of dynamic shared memory,
  # beside a 1-tile and an 8-tile b = 8 decode (the narrow kernel's L2 prefetch, part l2pf, is in git history: 5227d31)
  r 60 floor python3 benchmarks/bench_splits.py --parts --null --reps 30 --shapes "8,1,16,1024 8,1,16,8192"
  ;;
final8t)  # the eighth session's final check at the final kernel code: both CuPy decode GPU files (the new tests: the TMA
  # build on pages 128 / 256 and in a CUDA graph), then the shipped and no-split builds timed once more
  t 280 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 100 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 2
  ;;
review8)  # the eighth session's review (the 64-row kernels share wg_exp2_rowsum; the seesaw diagnostics removed): both
  # CuPy decode GPU files, then the P-split builds and the FP8 / sparse table timed
  t 280 t_cupy tests/test_cupy_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 90 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
tmagraph)  # the seesaw TMA build (the default above 32 rows) recorded in a CUDA graph, its map encoded in the capture
  t 120 t_graph tests/test_cupy_gpu.py -k "graph"
  ;;
narrowtrace)  # issue #4 (eighth session): the narrow kernel's tile timeline and its CTAs' start / end at the few-long
  # shape (8 tiles a worker) and at the memory-bound one (steady state). (Part stagger, run 24: the CTAs' first loads
  # staggered by __nanosleep in 4 groups, no gain; in git history at the commit before its revert.)
  r 60 ntrace_b8 python3 benchmarks/narrow_trace.py --b 8 --s-k 8192
  r 60 ntrace_b128 python3 benchmarks/narrow_trace.py --b 128 --s-k 8192
  ;;
others9)  # the ninth session's last GPU call: the GPU test files its changes touch only through mla/testing.py and
  # tests/_sparse_fp8_gpu.py (Numba, prefill, sparse prefill, the wgmma probe), one process each
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  t 200 t_numba tests/test_numba_gpu.py  # (178 s in 2026-11-27 run 13)
  t 100 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  t 130 t_prefill tests/test_prefill_gpu.py
  t 70 t_sparse_prefill tests/test_sparse_prefill_gpu.py
  ;;
others9b)  # others9's two Numba files again with longer limits (run 11 stopped them at 170 / 100 s, no failure so far)
  t 300 t_numba tests/test_numba_gpu.py
  t 240 t_numba_sparse_fp8 tests/test_numba_sparse_fp8_gpu.py
  ;;
ncufew)  # issue #4 (ninth session): what Nsight Compute names as the limiter of the few-long shapes' decode kernels (the
  # narrow kernel at b=8, h_q=16, s_k=8192; the seesaw kernel at b=1, h_q=128, s_k=32768), for the targets they miss
  NCU="ncu --clock-control none -k regex:mla_decode --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
    --section LaunchStats"
  r 120 ncu_few_b8 $NCU python3 benchmarks/profile_kernel.py --kernel hopper --b 8 --h-q 16 --s-k 8192
  r 120 ncu_few_b1 $NCU python3 benchmarks/profile_kernel.py --kernel hopper --b 1 --h-q 128 --s-k 32768
  r 120 ncu_long_b128 $NCU python3 benchmarks/profile_kernel.py --kernel hopper --b 128 --h-q 16 --s-k 8192
  ;;
review12)  # the twelfth session's review: one helper for a split's merge weight (mla_split_weight) in the combine
  # kernels and the fused merge (combine and sparse sink-combine cubins byte-identical; the fused builds' code moved):
  # the fused tests (bit for bit against the combine kernel), graphs, sanitizer; the few-long shapes
  t 150 t_fused tests/test_cupy_gpu.py -k "fused or cuda_graph or sanitizer or splits"
  for f in 0 1; do
    r 40 "splits_f$f" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --parts --reps 30 \
      --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384 8,2,16,8192"
  done
  r 40 bench_default env MLA_CUPY_KERNEL=hopper python3 -m mla.backends.cupy_backend bench
  ;;
final12)  # the twelfth session's final check, after h100a (run 12: test_cupy_gpu.py 846 passed, the issue's table; its
  # Numba file needed more than 170 s): the Numba file with a longer limit, the FP8 / sparse file, the few-long shapes
  # (both flushes), the FP8 / sparse table
  t 330 t_numba tests/test_numba_gpu.py
  t 90 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  for f in 0 1; do
    r 40 "splits_f$f" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --parts --reps 30 \
      --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384 8,2,16,8192"
    r 40 "splits_clean_f$f" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --parts --reps 30 \
      --clean-flush --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384 8,2,16,8192"
  done
  r 60 bench_fp8 python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
skip12a)  # issue #4 (twelfth session): a CTA that merges its first split sequence leaves its last one to that sequence's
  # other CTAs (MLA_FUSED_SKIP0=1; run 10's trace: the kernel ends ~3.7 us after the last piece, the CTAs with two
  # merges doing them one after the other) against 0, both flushes, two interleaved rounds; traces; the fused tests
  t 150 t_fused tests/test_cupy_gpu.py -k "fused or cuda_graph or sanitizer"
  SH="8,1,16,8192 4,1,16,16384 2,1,16,32768 8,2,16,8192 1,1,128,32768"
  for round in 1 2; do
    for v in 0 1; do
      e="MLA_NVRTC_DEFINES=MLA_FUSED_SKIP0=$v"
      r 40 "splits_sk${v}_r$round" env $e python3 benchmarks/bench_splits.py --parts --reps 30 --shapes "$SH"
      r 40 "splits_clean_sk${v}_r$round" env $e python3 benchmarks/bench_splits.py --parts --reps 30 --clean-flush \
        --shapes "$SH"
    done
  done
  for v in 0 1; do
    r 40 "trace_clean_sk$v" env MLA_NVRTC_DEFINES=MLA_FUSED_SKIP0=$v python3 benchmarks/narrow_trace.py --fused \
      --clean-flush
  done
  ;;
# (the twelfth session's parts share12a-share12h and l2pf12a -- runs 1-10 of benchmarks/runs/2026-11-27l-h100: tile
# sharing's seven versions, its traces, the L2 prefetch's A/B -- tested code that was removed again; they are in git
# history, up to commit 347fce4)
review11)  # the eleventh session's review: the lse of a row's splits is one helper (mla_splits_lse) for the combine
  # kernels and the fused merge (the dense combine and fused cubins byte-identical; the sparse sink combine's changes),
  # the merge reads partials without __restrict__ (cubins identical), device attributes read once; coop_probe's check
  t 130 t_fused tests/test_cupy_gpu.py -k "fused or cuda_graph or sanitizer or splits or out_float32"
  t 120 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 30 coop_probe python3 benchmarks/coop_probe.py --reps 50
  r 60 bench_fp8 python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  for f in 0 1; do
    r 30 "splits_f$f" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --reps 30 \
      --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384"
  done
  r 40 bench_default env MLA_CUPY_KERNEL=hopper python3 -m mla.backends.cupy_backend bench
  ;;
# (the eleventh session's parts fused11, fused11b and fused11c -- runs 2-4 of benchmarks/runs/2026-11-27k-h100, the
# fused merge's versions and its A/B of 64- and 128-channel units -- are in git history, up to commit 35ed372)
final11)  # issue #4 (eleventh session), the final code: the fused merge (units of 64 or 128 channels chosen by the
  # kernel), its tests and test_cupy_gpu.py's sanitizer / graph tests, the few-long shapes against the combine kernel
  # (both L2 flushes, interleaved), the issue's table
  t 120 t_fused tests/test_cupy_gpu.py -k "fused or cuda_graph or sanitizer or splits or out_float32"
  for round in 1 2; do
    for f in 0 1; do
      r 30 "splits_f${f}_r$round" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --parts --reps 30 \
        --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384"
      r 30 "splits_clean_f${f}_r$round" env MLA_CUPY_FUSED_COMBINE=$f python3 benchmarks/bench_splits.py --parts \
        --reps 30 --clean-flush --shapes "8,1,16,8192 1,1,128,32768 4,1,16,16384"
    done
  done
  r 40 bench_default env MLA_CUPY_KERNEL=hopper python3 -m mla.backends.cupy_backend bench
  r 60 bench_fp8 python3 benchmarks/bench_fp8_sparse.py --check --reps 20 --out "$OUT/bench_fp8_sparse.md"
  ;;
few11a)  # issue #4 (eleventh session): where the few-long shapes' time goes with a clean L2 (read-flushed), the tight plan
  # under that flush, and whether a cooperative launch + grid barrier (a combine fused into the decode) is cheap
  r 60 coop_probe python3 benchmarks/coop_probe.py --reps 50
  r 60 splits_rewrite python3 benchmarks/bench_splits.py --parts --shapes "8,1,16,8192 1,1,128,32768" --reps 30
  r 60 splits_clean python3 benchmarks/bench_splits.py --parts --shapes "8,1,16,8192 1,1,128,32768" --reps 30 \
    --clean-flush --null
  r 60 splits_clean_tight env MLA_PLAN_TIGHT=1 python3 benchmarks/bench_splits.py --parts --shapes "8,1,16,8192" \
    --reps 30 --clean-flush
  r 60 trace_clean python3 benchmarks/narrow_trace.py --b 8 --clean-flush
  r 60 trace_rewrite python3 benchmarks/narrow_trace.py --b 8
  ;;
trace9)  # issue #4 (ninth session): the seesaw timeline with bf16 P rounded once (the default now; run 4 also traced two
  # A/B orders through diagnostics since removed: git 7cfd4d7, and the handover of runs 6-7: part "handover" at
  # eac1cb9); and where a small decode call's host time goes (the API loop of the few-long shapes took 0.21-0.24 ms in
  # run 2 against 0.11-0.12 in the eighth session's run 11)
  r 60 trace_tma python3 benchmarks/seesaw_trace.py --defines "MLA_SEESAW_TMA=1"
  r 120 profile_host python3 benchmarks/profile_host.py --backends cupy
  r 90 decode_small python3 benchmarks/bench_decode.py --versions= --reps 30 --cupy-kernels auto --shapes 4,5,1
  ;;
# (the tenth session's one-off parts regs, regsncu, regsruns, regsv3, regsv4 and regsab -- runs 1-6 of
# benchmarks/runs/2026-11-27j-h100 -- are in git history, up to commit dffcbb2)
regsv5)  # issue #5 (tenth session): v5 of the FP8 register kernel (S^T codes unscaled, block partials folded with the
  # scales in fp32, Q rows normalised by a power of two; no S^T slow path): smoke, dense rows twice, the FP8 / sparse
  # GPU file, stall samples
  r 40 smoke python3 benchmarks/fp8_regs_smoke.py
  r 60 bench_fp8_dense python3 benchmarks/bench_fp8_sparse.py --dense-only --reps 50 --out "$OUT/bench_fp8_dense.md"
  r 60 bench_fp8_dense2 python3 benchmarks/bench_fp8_sparse.py --dense-only --reps 50
  t 150 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 150 ncu_regs env MLA_CUPY_FP8_KERNEL=regs ncu --clock-control none -k regex:mla_decode --launch-skip 2 \
    --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section SourceCounters \
    --page source --csv --print-source sass python3 benchmarks/profile_kernel.py --kernel fp8 --b 128 --h-q 16 --s-k 8192
  python3 benchmarks/ncu_stalls.py "$OUT/ncu_regs.txt" > "$OUT/ncu_regs_summary.txt" && rm "$OUT/ncu_regs.txt"
  ;;
final10)  # the tenth session's final check (issue #5: "auto" takes the FP8 register kernel for <= 16 rows a KV head):
  # the FP8 / sparse GPU file (every dense test through auto, regs and narrow; sanitizers), the other GPU tests that
  # run FP8 caches through the CuPy backend, the FP8 / sparse table with its check, few-long FP8 shapes
  t 200 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  t 90 t_cupy_fp8_other tests/test_cupy_gpu.py -k "out_float32"
  t 60 t_cache_api tests/test_cache.py tests/test_api.py
  r 80 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --check --out "$OUT/bench_fp8_sparse.md"
  r 40 bench_fp8_b8 python3 benchmarks/bench_fp8_sparse.py --dense-only --reps 50 --h-q 16 --b 8
  ;;
final10b)  # the tenth session's last GPU call (the final code: every shipped cubin byte-identical to run 8's; the
  # sanitizer script now also runs the register kernel with h_kv = 2 on pages of 32): the FP8 / sparse GPU file, and the
  # dense FP8 row once more
  t 200 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 40 bench_fp8_dense python3 benchmarks/bench_fp8_sparse.py --dense-only --reps 50 --out "$OUT/bench_fp8_dense.md"
  ;;
pages10)  # issue #4 (tenth session): do the few-long shapes lose to page scatter? The same shapes with the block tables
  # in order and permuted (kernels only, decode and combine apart), interleaved, with the long shape as control
  for round in 1 2; do
    r 50 "splits_perm_r$round" python3 benchmarks/bench_splits.py --parts --reps 30 \
      --shapes "8,1,16,8192 1,1,128,32768 128,1,16,8192"
    r 50 "splits_contig_r$round" python3 benchmarks/bench_splits.py --parts --reps 30 --contiguous \
      --shapes "8,1,16,8192 1,1,128,32768 128,1,16,8192"
  done
  ;;
flush10)  # issue #4 (tenth session): the harness rewrites a 256 MB buffer to flush the L2, which leaves it full of dirty
  # lines the timed kernels' first reads must write back. The few-long and long shapes with that flush and with a
  # read-only one (clean lines), interleaved, plus the empty kernel's floor under each
  for round in 1 2; do
    r 50 "splits_dirty_r$round" python3 benchmarks/bench_splits.py --parts --reps 30 --null \
      --shapes "8,1,16,8192 1,1,128,32768 128,1,16,8192"
    r 50 "splits_clean_r$round" python3 benchmarks/bench_splits.py --parts --reps 30 --null --clean-flush \
      --shapes "8,1,16,8192 1,1,128,32768 128,1,16,8192"
  done
  ;;
final10c)  # the tenth session's changes to mla/backends/cupy_hopper.py (dispatch) and cupy_backend.py (time_launches) reach
  # the bf16 / fp16 paths too: the whole CuPy decode GPU file, and the wgmma probes
  t 420 t_cupy tests/test_cupy_gpu.py
  t 60 t_wgmma_probe tests/test_wgmma_probe_gpu.py
  ;;
review10)  # the tenth session's review (the bench forces a Hopper FP8 kernel through prepare's which=; cubins unchanged):
  # smoke, the dense FP8 rows, the FP8 / sparse table with its check
  r 40 smoke python3 benchmarks/fp8_regs_smoke.py
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --check --out "$OUT/bench_fp8_sparse.md"
  ;;
final9b)  # the ninth session's final check (run 3 at ff670a4; the final commit's shipped cubins are byte-identical):
  # both CuPy decode GPU files (the CUDA-graph TMA test fixed), the P split / fp16 rows (run 3 also timed two A/B
  # diagnostics since removed), the FP8 / sparse table, the few-long shapes (decode and combine apart)
  t 300 t_cupy tests/test_cupy_gpu.py
  t 100 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 70 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --out "$OUT/bench_fp8_sparse.md"
  r 60 splits_fewlong python3 benchmarks/bench_splits.py --parts --reps 30 --shapes "8,1,16,8192 1,1,128,32768"
  ;;
final9)  # issues #4/#5 (2026-11-26, ninth session): the Hopper kernels round bf16 P once (FlashMLA's numerics; the split
  # is MLA_CUPY_PSPLIT=1), the seesaw kernel stores P_A' before its own P V is done: both CuPy decode GPU files (new:
  # FlashMLA's inputs at 8e-4 on every kernel, the split builds at 8e-4 on unit values), the split / reorder A/B, the
  # FP8 / sparse table with its check, every decode shape
  t 300 t_cupy tests/test_cupy_gpu.py
  t 100 t_cupy_fp8_sparse tests/test_cupy_fp8_sparse_gpu.py
  r 70 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3
  r 60 bench_fp8_sparse python3 benchmarks/bench_fp8_sparse.py --reps 20 --check --out "$OUT/bench_fp8_sparse.md"
  r 120 bench_decode python3 benchmarks/bench_decode.py --versions= --reps 30 --cupy-kernels auto \
    --out "$OUT/bench_decode.md"
  ;;
psplit0)  # issues #4/#5 (2026-11-26, ninth session): bf16 P rounded once (FlashMLA's numerics, MLA_CUPY_PSPLIT=0)
  # against the P split in every Hopper build: the seesaw kernel, then the FP8 / sparse table (narrow and wide builds)
  r 90 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3
  for i in 1 2; do
    MLA_CUPY_PSPLIT=1 r 75 "fp8_split$i" python3 benchmarks/bench_fp8_sparse.py --reps 20
    MLA_CUPY_PSPLIT=0 r 75 "fp8_nosplit$i" python3 benchmarks/bench_fp8_sparse.py --reps 20
  done
  ;;
psplit)  # issue #4 (eighth session): what the bf16 P split costs the seesaw kernel at the power-capped compute-bound shape
  r 150 psplit python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3
  r 100 psplit_4096 python3 benchmarks/bench_psplit_cost.py --reps 20 --rounds 3 --shape 128,1,128,4096
  ;;
fenceprobe)  # issue #5 (2026-11-26, eighth session): does fence.proxy.async wait for the thread's copies in flight? (No:
  # benchmarks/NOTES_cupy.md.) The raw-stage builds it was written for (part fp8stage) are in git history (7c8e469).
  r 120 fence_probe python3 benchmarks/fence_drain_probe.py --launches 30
  ;;
plans)  # issue #4 (2026-11-26, fifth session): the tight scheduler payload (MLA_PLAN_TIGHT): the device plan against
  # the host one, loose and tight, then the few-long shapes and the memory-bound one timed with each
  t 60 t_plans tests/test_cupy_gpu.py -k "device_plan or get_mla_metadata or plans_and_array"
  for tight in 0 1; do
    r 60 "splits_$tight" env MLA_PLAN_TIGHT=$tight python3 benchmarks/bench_splits.py --reps 30
    r 60 "decode_$tight" env MLA_PLAN_TIGHT=$tight python3 benchmarks/bench_decode.py --versions "" --shapes 5,1,4 \
      --reps 30 --cupy-kernels auto
  done
  ;;
sparsencu)  # where the sparse FP8 build loses to the bf16 one: per-SASS-instruction stall samples of both (csv)
  for k in hopper fp8; do
    r 150 "ncu_sparse_$k" env MLA_NVRTC_LINEINFO=1 ncu --clock-control none -k regex:mla_decode --launch-skip 2 \
      --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SourceCounters --page source --csv \
      --print-source sass python3 benchmarks/profile_kernel.py --kernel $k --b 128 --s-q 2 --h-q 128 --topk 2048
  done
  ;;
*)
  echo "usage: $0 multi|h100a|h100b|h100c|h100d|fp8sweep|ncu|recheck|narrow|auto|combine|fp8narrow|wide|final|narrow32|fp8wide|sparsewide|review|fp8exp|fp8final|dequant|plans|final5|combine32|combine32b|tensorpipe|sparsencu" >&2
  exit 2 ;;
esac
