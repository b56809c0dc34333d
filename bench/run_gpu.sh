#!/usr/bin/env bash
# One GPU session: install the carried wheels, run the GPU tests and the whole suite, then the DiT benchmark.
# Usage (on the GPU machine, from the repo root): bash bench/run_gpu.sh [bench args...]
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 LIGHTX2V_CACHE_DIR=/tmp/lightx2v-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q -x tests 2>&1 | tail -n 25 | tee "$OUT/pytest.log"
python3 bench/bench_dit.py "$@" 2>&1 | tee "$OUT/bench_dit.log"
