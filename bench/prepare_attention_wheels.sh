#!/usr/bin/env bash
# Here (the machine with pip and network), build the wheel folders that the GPU calls carry (each call takes at
# most 64 MiB with the repo, so FlashAttention 4's cutlass DSL, 92 MB in one wheel, travels in two halves):
#
#     bash bench/prepare_attention_wheels.sh [SRC] [DEST]      # SRC: /work/wheels, DEST: the repo root (.)
#
#   DEST/.whl_attn  fa3-fwd, nvidia-cudnn-frontend, apache-tvm-ffi                        (~42.5 MB)
#   DEST/.whl_fa4a  nvidia_cutlass_dsl_libs_cu13-4.8.1-...whl.part-aa                      (~46 MB)
#   DEST/.whl_fa4b  ...part-ab, flash-attn-4, nvidia-cutlass-dsl (+ libs-base, libs-core), quack-kernels,
#                   apache-tvm-ffi, torch-c-dlpack-ext, SHA256SUMS                         (~56 MB)
#
# Wheels missing from SRC are fetched with `pip download --no-deps` (cp312, manylinux x86_64). Add the three
# folders to .git/info/exclude (printf '/.whl_attn/\n/.whl_fa4a/\n/.whl_fa4b/\n' >> .git/info/exclude) and name
# them in the calls' carry (see bench/run_attention_backends_gpu.sh).
set -euo pipefail
SRC="${1:-/work/wheels}"
DEST="${2:-.}"
PY_TAGS=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
         --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
         --platform manylinux2014_x86_64)
MAIN=(fa3_fwd==0.0.3 nvidia-cudnn-frontend==1.32.0 apache-tvm-ffi==0.1.15.post2)
FA4=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
     nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2
     torch-c-dlpack-ext==0.1.5)
BIG=nvidia-cutlass-dsl-libs-cu13==4.8.1

wheel_of() {  # requirement -> path of its wheel in SRC (downloaded if missing)
    local name="${1%%==*}" ver="${1##*==}" glob
    glob="$(echo "$name" | tr '-' '_')-${ver}-*.whl"
    local found
    found="$(ls "$SRC"/$glob 2>/dev/null | head -n1 || true)"
    if [ -z "$found" ]; then
        python3 -m pip download -q --no-deps "${PY_TAGS[@]}" -d "$SRC" "$1" >&2
        found="$(ls "$SRC"/$glob | head -n1)"
    fi
    echo "$found"
}

rm -rf "$DEST/.whl_attn" "$DEST/.whl_fa4a" "$DEST/.whl_fa4b"  # ours only (a .whl folder of other wheels stays)
mkdir -p "$DEST/.whl_attn" "$DEST/.whl_fa4a" "$DEST/.whl_fa4b"
for r in "${MAIN[@]}"; do cp "$(wheel_of "$r")" "$DEST/.whl_attn/"; done
for r in "${FA4[@]}"; do cp "$(wheel_of "$r")" "$DEST/.whl_fa4b/"; done
big="$(wheel_of "$BIG")"
base="$(basename "$big")"
size=$(stat -c %s "$big")
half=$(( (size + 1) / 2 ))
split -b "$half" -a 2 "$big" "$DEST/.whl_fa4b/$base.part-"
mv "$DEST/.whl_fa4b/$base.part-aa" "$DEST/.whl_fa4a/"
(cd "$(dirname "$big")" && sha256sum "$base") > "$DEST/.whl_fa4b/SHA256SUMS"
for d in .whl_attn .whl_fa4a .whl_fa4b; do
    echo "$d: $(du -cb "$DEST/$d"/* | tail -n1 | cut -f1) bytes"
    for f in "$DEST/$d"/*; do printf '  %10d  %s\n' "$(stat -c %s "$f")" "$(basename "$f")"; done
done
