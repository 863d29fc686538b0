#!/usr/bin/env bash
# The GPU jobs in one device call, from the repo root of the GPU machine:
#   bash bench/gpu_run.sh                       # suite without the fuzz modules (seed 0), in parallel
#   SEEDS="11 22 33" bash bench/gpu_run.sh      # suite without the fuzz modules, three seeds
#   TESTS=tests SEEDS=5 bash bench/gpu_run.sh   # whole suite with the fuzz modules (an H200:
#                                               # 446 s cold, 246 s for the next seed: a call each)
#   STAGES="tests fuzz soak memcheck bench" BENCHES="paged generate" bash bench/gpu_run.sh
# Stages (default "tests"):
#   tests     python -m pytest over $TESTS (default tests/ without the fuzz modules, which the
#             fuzz stage runs: together the whole suite) once per seed in $SEEDS, spread over
#             $WORKERS pytest-xdist processes sharing the GPU (JAX without preallocation)
#   fuzz      tests/test_fuzz_*.py with TQ4JAX_FUZZ_EXAMPLES=$FUZZ_EXAMPLES (default 8: every
#             example compiles new shapes; at 20 only 2 of the 10 tests finished in 230 s on
#             an H200), within $FUZZ_TIMEOUT (default 540 s: a device call of its own)
#   soak      bench/soak.py for each layout in $SOAK_LAYOUTS
#   memcheck  bench/memcheck.py under compute-sanitizer (one allocation per array)
#   ncu       Nsight Compute on each Mosaic decode op of $NCU_OPS (comma-separated bench/decode.py
#             names; default
#             "paged_decode"), B=8 32K: throughput, occupancy, stall reasons, opcode mix; then
#             bench/mosaic_report.py (registers, shared memory, SASS opcodes per kernel)
#   bench     python3 bench/<name>.py for each name in $BENCHES
# Logs go to $OUT (the device tool's folder that comes back) or /tmp/out.
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d .vectors ] && export TQ4JAX_VECTORS=$PWD/.vectors  # carried copy of ../shared/vectors
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/triton_cache}  # jax-triton/torch Triton kernels
# compiled executables shared by the seeds and workers: later seeds skip compilation (an H200:
# 364 s cold, 101-105 s per further seed); a worker may read an entry another is still writing
# ("Error reading persistent compilation cache entry": a warning, and it recompiles)
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
STAGES=${STAGES:-tests}; SEEDS=${SEEDS:-0}; WORKERS=${WORKERS:-16}
status=0
note() { echo "== $* ($(date +%T))"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
for stage in $STAGES; do
  case $stage in
    tests)
      for seed in $SEEDS; do
        note "tests seed $seed"
        XLA_PYTHON_CLIENT_PREALLOCATE=false TQ4JAX_TEST_SEED=$seed timeout ${TEST_TIMEOUT:-540} \
          python3 -m pytest -v -rfs -n "$WORKERS" --maxschedchunk 1 --durations=10 ${TESTS:-tests --ignore-glob=tests/test_fuzz_*.py} \
          > "$OUT/tests_seed$seed.log" 2>&1 || status=1
        grep -E "FAILED|ERROR|passed|failed" "$OUT/tests_seed$seed.log" | tail -15  # -v: per test
      done ;;
    fuzz)
      note "fuzz"
      XLA_PYTHON_CLIENT_PREALLOCATE=false TQ4JAX_FUZZ_EXAMPLES=${FUZZ_EXAMPLES:-8} \
        timeout ${FUZZ_TIMEOUT:-540} python3 -m pytest -v -rfs -n "$WORKERS" --maxschedchunk 1 \
        tests/test_fuzz_*.py > "$OUT/fuzz.log" 2>&1 || status=1
      grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/fuzz.log" | tail -15 ;;
    soak)
      for layout in ${SOAK_LAYOUTS:-tq4 vllm:turboquant_4bit_nc contiguous}; do
        note "soak $layout"
        timeout ${SOAK_TIMEOUT:-200} python3 bench/soak.py --layout "$layout" ${SOAK_ARGS:-} \
          > "$OUT/soak_${layout//:/_}.log" 2>&1 || status=1
        tail -8 "$OUT/soak_${layout//:/_}.log"
      done ;;
    memcheck)
      note "memcheck: a planted out-of-bounds read must be caught"
      san="compute-sanitizer --tool memcheck --kernel-name kns=_kernel --error-exitcode 3"
      for off in 4096 268435456; do  # 16 KB and 1 GiB past a 64-byte array
        XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${PLANT_TIMEOUT:-60} $san python3 \
          bench/memcheck.py --plant $off > "$OUT/memcheck_plant_$off.log" 2>&1
        echo "planted read at +$off floats: exit $? (3 = caught)"
        grep -m3 -E "Invalid|ERROR SUMMARY" "$OUT/memcheck_plant_$off.log"
      done
      note "memcheck: the ops' edge cases"
      XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout ${MEMCHECK_TIMEOUT:-400} \
        $san python3 bench/memcheck.py > "$OUT/memcheck.log" 2>&1 || status=1
      tail -40 "$OUT/memcheck.log" ;;
    ncu)
      IFS=',' read -ra ops <<< "${NCU_OPS:-paged_decode}"
      for op in "${ops[@]}"; do
        note "ncu $op"
        timeout ${NCU_TIMEOUT:-150} ncu --clock-control none --kernel-name regex:mosaic_gpu \
          --section SpeedOfLight --section InstructionStats \
          --section SchedulerStats --section Occupancy --section LaunchStats \
          --section WarpStateStats --print-details all \
          python3 bench/decode.py --once --batch 8 --ctx 32768 --impl mosaic --ops "$op" \
          > "$OUT/ncu_${op// /_}.txt" 2>&1 || status=1
        grep -E "Duration|Registers Per|Achieved Occ|Issue Slots|No Eligible|Executed Inst" \
          "$OUT/ncu_${op// /_}.txt" | head -12
      done
      timeout ${REPORT_TIMEOUT:-200} python3 bench/mosaic_report.py > "$OUT/mosaic_report.txt" 2>&1 \
        || status=1
      grep -E "^## |resources|^top" "$OUT/mosaic_report.txt" ;;
    bench)
      for b in ${BENCHES:-codec}; do
        note "bench $b"
        timeout ${BENCH_TIMEOUT:-200} python3 bench/$b.py 2>&1 | tee "$OUT/bench_$b.log" \
          || status=1
      done ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
note "done, status $status"
exit $status
