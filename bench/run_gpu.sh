#!/usr/bin/env bash
# GPU session helper: install the carried wheels, then run what is asked.
# Usage (on the GPU machine, from the repo root): bash bench/run_gpu.sh PART...
#   tests   the GPU-marked tests          dit     bench_dit (ours vs diffusers)
#   kernels bench_kernels                 attn    bench_attention
#   e2e     bench_e2e --part e2e          caching bench_e2e --part caching
#   speed   bench_speed                   offload bench_offload
#   wan22   bench_dit: Wan2.2 A14B expert and TI2V-5B   profile  bench_speed 14B eager modes + profile
#   vae     bench_vae: VAE decode, ours vs diffusers (Wan2.1 480x832x81, Wan2.2 704x1280x121)
#   lightvae bench_light_vae: TAE / LightVAE decode vs our full VAE, RIFE throughput (Wan2.1, then Wan2.2)
#   qwen    bench_qwen_image: Qwen-Image DiT step and VAE decode/encode, ours vs diffusers (+ qwen-trt: TensorRT VAE)
#   all-tests  the whole suite on the GPU machine
set -uo pipefail
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 LIGHTX2V_CACHE_DIR=/tmp/lightx2v-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
cd bench
for part in "$@"; do
  echo "=== $part"
  case $part in
    tests) (cd .. && python3 -m pytest -q -m gpu -rs tests 2>&1 | tail -n 30) ;;
    all-tests) (cd .. && python3 -m pytest -q -x tests 2>&1 | tail -n 30) ;;
    dit) python3 bench_dit.py --steps 2 ;;
    wan22) python3 bench_dit.py --models a14b-i2v 5b-ti2v --steps 2 ;;
    vae) python3 bench_vae.py --profile ;;
    lightvae) python3 bench_light_vae.py --json "$OUT/light_vae.json" && python3 bench_light_vae.py --wan22 --parts vae,tae --json "$OUT/light_vae22.json" ;;
    qwen) python3 bench_qwen_image.py ;;
    qwen-trt) python3 bench_qwen_image.py --parts trt ;;
    kernels) python3 bench_kernels.py ;;
    attn) python3 bench_attention.py ;;
    e2e) python3 bench_e2e.py --part e2e ;;
    caching) python3 bench_e2e.py --part caching ;;
    speed) python3 bench_speed.py --steps 2 ;;
    profile) python3 bench_speed.py --models 14b-i2v --no_compile --profile --steps 2 ;;
    offload) python3 bench_offload.py ;;
  esac 2>&1 | tee "$OUT/$part.log"
done
