#!/usr/bin/env bash
# One device call: whole test suite on the compiled kernels, then the benchmarks.
# Usage on the GPU machine, from the repo root: bash bench/gpu_run.sh [bench args...]
set -uo pipefail
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
[ -d .vectors ] && export TQ4JAX_VECTORS=$PWD/.vectors  # carried copy of ../shared/vectors
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -x --durations=15 ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -32
for b in ${BENCHES:-codec}; do
  timeout ${BENCH_TIMEOUT:-200} python3 bench/$b.py "$@" 2>&1 | tee "$OUT/bench_$b.log"
done
