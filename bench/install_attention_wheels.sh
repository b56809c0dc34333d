# Install carried attention wheels on the GPU machine (no network there). SOURCE it, from the repo root:
#
#     source bench/install_attention_wheels.sh [WHEEL_DIR ...]       # default: .whl
#
# * Every *.whl in the folders is installed by ONE `pip install --no-index --no-deps` into $ATTN_SITE
#   (default /tmp/attn-site; one pip call, so wheels that share a top-level folder, like the cutlass DSL's
#   nvidia_cutlass_dsl/ split over three wheels, merge instead of replacing each other).
# * A wheel too big for one call travels as parts: NAME.whl.part-aa, NAME.whl.part-ab, ... in any of the folders
#   or in $ATTN_PARTS (default /tmp/attn-parts, where an earlier call on the same warm machine left a part). The
#   parts are joined in name order and the result is checked against SHA256SUMS (a `sha256sum` listing, in any of
#   the folders) before it is installed; a missing part or a wrong sum stops the install with a message.
# * $ATTN_SITE, and the cutlass DSL's package folder (which its .pth file would add in a real site-packages;
#   .pth files are not read from PYTHONPATH), are put in front of PYTHONPATH; then it prints which of the
#   optional attention packages import.
#
# Returns non-zero (without exiting your shell) when something fails.

_attn_install() {
    local site="${ATTN_SITE:-/tmp/attn-site}" parts_dir="${ATTN_PARTS:-/tmp/attn-parts}" work
    local dirs=("$@")
    [ ${#dirs[@]} -eq 0 ] && dirs=(.whl)
    work="$(mktemp -d /tmp/attn-wheels.XXXXXX)" || return 1
    local d f base
    for d in "${dirs[@]}"; do
        [ -d "$d" ] || { echo "install_attention_wheels: no folder $d" >&2; return 1; }
        for f in "$d"/*.whl; do [ -e "$f" ] && ln -sf "$(readlink -f "$f")" "$work/"; done
        [ -f "$d/SHA256SUMS" ] && cat "$d/SHA256SUMS" >> "$work/SHA256SUMS"
    done
    # join split wheels
    local names
    names="$(for d in "${dirs[@]}" "$parts_dir"; do ls "$d" 2>/dev/null; done | sed -n 's/\.part-[a-z]*$//p' | sort -u)"
    for base in $names; do
        local list
        list="$(for d in "${dirs[@]}" "$parts_dir"; do ls "$d"/"$base".part-* 2>/dev/null; done \
                | awk -F/ '{print $NF "\t" $0}' | sort -u -k1,1 | cut -f2)"
        cat $list > "$work/$base" || return 1
        echo "install_attention_wheels: joined $base from $(echo "$list" | wc -l) parts: $(echo $list)"
        if [ -f "$work/SHA256SUMS" ] && grep -q " \*\?$base\$" "$work/SHA256SUMS"; then
            (cd "$work" && grep " \*\?$base\$" SHA256SUMS | sha256sum -c --quiet -) || {
                echo "install_attention_wheels: $base: checksum mismatch (a part missing or stale?)" >&2
                rm -f "$work/$base"; return 1; }
        else
            echo "install_attention_wheels: $base: no checksum in SHA256SUMS, not verified" >&2
        fi
    done
    ls "$work"/*.whl >/dev/null 2>&1 || { echo "install_attention_wheels: no wheels in ${dirs[*]}" >&2; return 1; }
    echo "install_attention_wheels: installing into $site:"
    for f in "$work"/*.whl; do echo "  $(basename "$f") ($(stat -L -c %s "$f") bytes)"; done
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$work"/*.whl || { echo "install_attention_wheels: pip failed" >&2; return 1; }
    local extra="$site"
    [ -d "$site/nvidia_cutlass_dsl/dsl_packages" ] && extra="$extra:$site/nvidia_cutlass_dsl/dsl_packages"
    export PYTHONPATH="$extra${PYTHONPATH:+:$PYTHONPATH}"
    rm -rf "$work"
    python3 - <<'EOF'
import importlib
for mod in ("fa3_fwd_interface", "flash_attn_interface", "flash_attn.cute", "cutlass", "cudnn"):
    try:
        m = importlib.import_module(mod)
        extra = ""
        if mod == "cudnn":
            extra = f" (frontend {m.__version__}, cuDNN {m.backend_version_string()})"
        print(f"  import {mod}: ok{extra}")
    except Exception as e:  # noqa: BLE001
        print(f"  import {mod}: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}")
EOF
    return 0
}
_attn_install "$@"
