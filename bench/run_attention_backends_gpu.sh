#!/usr/bin/env bash
# The GPU call(s) for the attention backends (issue 24 item 1; radial_attn of issue 12 item 6). From the repo
# root on the GPU machine; logs and JSON go to $OUT. Wheel folders: bash bench/prepare_attention_wheels.sh (here).
#
#   bash bench/run_attention_backends_gpu.sh main   # carry .whl_attn (fa3-fwd, cudnn-frontend; 42.5 MB): tests of
#                                                   # the backends and radial_attn, then the bench, all but FA4
#   bash bench/run_attention_backends_gpu.sh fa4a   # carry .whl_fa4a (46 MB): only stashes the first half of the
#                                                   # cutlass DSL wheel in /tmp/attn-parts on this machine
#   bash bench/run_attention_backends_gpu.sh fa4b   # carry .whl_fa4b (56 MB), on the SAME warm machine (within
#                                                   # 30 s of fa4a): joins, installs, FA4 tests + bench rows
#
# Each part ends well inside a call's 10 minutes (timeouts below); a row that fails prints its error and the
# rest goes on.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" LIGHTX2V_CACHE_DIR=/tmp/lightx2v-cache
OUT="${OUT:-/tmp/out}"
mkdir -p "$OUT"
part="${1:-main}"
echo "=== $part: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader)"
case "$part" in
  main)
    { source bench/install_attention_wheels.sh .whl_attn; } > "$OUT/install.log" 2>&1  # not in a pipe: keep PYTHONPATH
    rc=$?; cat "$OUT/install.log"
    [ $rc -eq 0 ] || echo "wheel install failed (rc $rc): the rows of the missing packages will say so"
    timeout 170 python3 -m pytest -q -m gpu -rs tests/test_attention_backends.py tests/test_radial_attention.py \
        -k "not flash_attn4" 2>&1 | tee "$OUT/tests.log" | tail -n 40
    timeout 370 python3 bench/bench_attention_backends.py --only sdpa,sage,fa3,cudnn,radial \
        --json "$OUT/attention_backends.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  fa4a)
    mkdir -p /tmp/attn-parts && cp .whl_fa4a/*.part-* /tmp/attn-parts/ && ls -l /tmp/attn-parts
    ;;
  fa4b)
    { source bench/install_attention_wheels.sh .whl_fa4b; } > "$OUT/install_fa4.log" 2>&1
    rc=$?; cat "$OUT/install_fa4.log"
    [ $rc -eq 0 ] || { echo "FA4 install failed (rc $rc): was fa4a run on this machine within its warm window?"; exit 1; }
    timeout 240 python3 -m pytest -q -m gpu -rs tests/test_attention_backends.py -k flash_attn4 2>&1 \
        | tee "$OUT/tests_fa4.log" | tail -n 20
    timeout 300 python3 bench/bench_attention_backends.py --only sdpa,fa4 --json "$OUT/attention_backends_fa4.json" \
        2>&1 | tee "$OUT/bench_fa4.log"
    ;;
  *) echo "unknown part $part (main, fa4a, fa4b)"; exit 2 ;;
esac
