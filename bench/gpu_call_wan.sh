#!/usr/bin/env bash
# One GPU call (issue 23, part 1): the Wan figures of BENCHMARKS.md re-measured on this tree, and the DiT step of
# the commit before the engine redesign (84caafa, carried in .old/) in the same job. Carry .whl_small (diffusers,
# ftfy, wcwidth), .whl_attn (FlashAttention 3) and .old.
set -uo pipefail
export PYTHONUNBUFFERED=1 LIGHTX2V_CACHE_DIR=/tmp/lightx2v-cache
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl_small/*.whl
{ source bench/install_attention_wheels.sh .whl_attn; } > "$OUT/install.log" 2>&1
export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
left() { echo $(( ${1} - ($(date +%s) - t0) )); }
part() {  # name, seconds it may take at most, tree, command...
    local name=$1 secs=$2 tree=$3; shift 3
    echo "=== $name (t=$(( $(date +%s) - t0 )) s)"
    (cd "$tree/bench" && PYTHONPATH="$PYTHONPATH:$PWD/..:$PWD" timeout "$secs" "$@" > "$OUT/$name.log" 2>&1)
    echo "rc $?"; grep -E "^\|" "$OUT/$name.log" | tail -n 12
}
part dit_new 150 . python3 bench_dit.py --steps 2 --models 1.3b 14b-i2v
part dit_old 110 .old python3 bench_dit.py --steps 2 --models 14b-i2v
part offload_new 130 . python3 bench_offload.py --parts dit
part vae_new "$(left 585)" . python3 bench_vae.py --models wan2.1 --budget 80 --repeats 1
echo "done in $(( $(date +%s) - t0 )) s"
