#!/usr/bin/env bash
# One GPU call (issue 24): the attention kernels that install without compiling, against cuDNN SDPA, then the
# Wan2.1-I2V-14B CFG step with each fp8/int8 + attention combination against diffusers' eager step.
# Carry .whl_attn (fa3-fwd, cudnn-frontend, tvm-ffi) and .whl_small (diffusers, ftfy, wcwidth).
set -uo pipefail
export PYTHONUNBUFFERED=1 LIGHTX2V_CACHE_DIR=/tmp/lightx2v-cache
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_small/*.whl
{ source bench/install_attention_wheels.sh .whl_attn; } > "$OUT/install.log" 2>&1; tail -n 3 "$OUT/install.log"
export PYTHONPATH="/tmp/site:${PYTHONPATH:-}:$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, diffusers; print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)"
echo "=== attention backends ($(( $(date +%s) - t0 )) s)"
timeout 230 python3 bench/bench_attention_backends.py --only sdpa,sage,fa3,cudnn \
    --json "$OUT/attention_backends.json" > "$OUT/attention.log" 2>&1; echo "rc $?"; tail -n 30 "$OUT/attention.log"
echo "=== 14B step modes ($(( $(date +%s) - t0 )) s)"
(cd bench && timeout 300 python3 bench_speed.py --models 14b-i2v --no_compile --steps 2 --cross_attn flash_attn3 \
    --modes bf16:torch_sdpa bf16:flash_attn3 fp8:sage_attn fp8:flash_attn3_fp8 fp8:cudnn_sdpa_fp8 int8:sage_attn \
            int8:flash_attn3_fp8 > "$OUT/speed.log" 2>&1); echo "rc $?"; tail -n 14 "$OUT/speed.log"
echo "=== GPU tests of the backends ($(( $(date +%s) - t0 )) s)"
timeout $(( 575 - ($(date +%s) - t0) )) python3 -m pytest -q -m gpu -rs tests/test_attention_backends.py \
    tests/test_radial_attention.py -k "not flash_attn4" > "$OUT/tests.log" 2>&1; echo "rc $?"; tail -n 8 "$OUT/tests.log"
echo "done in $(( $(date +%s) - t0 )) s"
