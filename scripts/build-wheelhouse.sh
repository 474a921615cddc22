#!/usr/bin/env bash
# Build ./wheelhouse/: the handyproxy wheel from this checkout plus the uvloop and
# prometheus-client wheels for the hosts' Python (CPython 3.11, x86_64, manylinux), so the Ansible role can install offline.
#
# Idempotent: the handyproxy wheel is built from a clean copy of the sources with a fixed
# timestamp (SOURCE_DATE_EPOCH), so unchanged sources give a byte-identical wheel and the file in
# wheelhouse/ is left untouched; the role then sees no change either. The dependencies' wheels
# are downloaded only when missing. Wheels of other versions are removed.
#
# Environment: WHEELHOUSE_DIR (default: <repo>/wheelhouse), PYTHON (a Python with pip; default
# <repo>/.venv/bin/python, else python3), TARGET_PYTHON_VERSION (3.11), TARGET_PLATFORMS
# (space-separated pip platform tags), UVLOOP_SPEC (default: the pin in requirements-dev.txt).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$REPO
OUT=${WHEELHOUSE_DIR:-$ROOT/wheelhouse}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
TARGET_PYTHON_VERSION=${TARGET_PYTHON_VERSION:-3.11}
TARGET_PLATFORMS=${TARGET_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}
# A fixed date: zip entries carry timestamps, and wheel honours SOURCE_DATE_EPOCH.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}

# pinned_spec NAME: NAME==VERSION as requirements-dev.txt pins it (UVLOOP_SPEC overrides uvloop's).
pinned_spec() {
    local name=$1 pin
    if [[ $name == uvloop && -n ${UVLOOP_SPEC:-} ]]; then
        printf '%s\n' "$UVLOOP_SPEC"
        return
    fi
    pin=$(grep -Eo "^$name==[^[:space:];#]+" "$ROOT/requirements-dev.txt" 2>/dev/null || true)
    printf '%s\n' "${pin:-$name}"
}

build_handyproxy() {
    local work=$1 src=$1/src f
    mkdir -p "$src" "$work/dist"
    # A clean copy: no build/ or egg-info left from earlier builds can leak stale modules in.
    for f in pyproject.toml setup.cfg setup.py README.md LICENSE LICENSE.txt MANIFEST.in; do
        [[ -e $ROOT/$f ]] && cp "$ROOT/$f" "$src/"
    done
    tar -C "$ROOT" --exclude='__pycache__' --exclude='*.pyc' -cf - handyproxy | tar -C "$src" -xf -
    if [[ ! -e $src/README.md ]]; then
        # pyproject.toml names README.md as the long description; keep the build working
        # before the checkout has one.
        printf '# HandyProxy\n' >"$src/README.md"
    fi
    "$PYTHON" -m pip wheel --disable-pip-version-check --no-input --no-deps \
        --wheel-dir "$work/dist" "$src" >"$work/pip-wheel.log" 2>&1 || {
        cat "$work/pip-wheel.log" >&2
        return 1
    }
    local built
    built=$(find "$work/dist" -name 'handyproxy-*.whl' -print -quit)
    [[ -n $built ]] || { log "pip wheel produced no handyproxy wheel"; return 1; }
    local name
    name=$(basename "$built")
    if [[ -f $OUT/$name ]] && cmp -s "$built" "$OUT/$name"; then
        log "$name is up to date"
    else
        cp "$built" "$OUT/$name.tmp"
        mv "$OUT/$name.tmp" "$OUT/$name"
        log "built $name"
    fi
    find "$OUT" -maxdepth 1 -name 'handyproxy-*.whl' ! -name "$name" -print -delete \
        | sed 's/^/build-wheelhouse: removed old /' >&2
}

# fetch_wheel WORK NAME: the pinned wheel of a runtime dependency for the hosts' Python,
# unless it is there already.
fetch_wheel() {
    local work=$1 name=$2 spec version existing file
    spec=$(pinned_spec "$name")
    version=${spec#"$name"==}
    file=${name//-/_}  # wheel file names spell prometheus-client as prometheus_client
    local pyver=${TARGET_PYTHON_VERSION//./}
    if [[ $spec == "$name"==* ]]; then
        existing=$(find "$OUT" -maxdepth 1 \( -name "$file-$version-cp$pyver-cp$pyver-*x86_64.whl" \
            -o -name "$file-$version-py3-none-any.whl" \) -print -quit)
        if [[ -n $existing ]]; then
            log "$(basename "$existing") is present"
            return 0
        fi
    fi
    local args=() platform
    for platform in $TARGET_PLATFORMS; do
        args+=(--platform "$platform")
    done
    mkdir -p "$work/$name"
    "$PYTHON" -m pip download --disable-pip-version-check --no-input --no-deps \
        --only-binary=:all: --implementation cp --python-version "$TARGET_PYTHON_VERSION" \
        --abi "cp$pyver" "${args[@]}" --dest "$work/$name" "$spec" >"$work/pip-download.log" 2>&1 || {
        cat "$work/pip-download.log" >&2
        return 1
    }
    local got
    got=$(find "$work/$name" -name "$file-*.whl" -print -quit)
    [[ -n $got ]] || { log "pip download produced no $name wheel"; return 1; }
    find "$OUT" -maxdepth 1 -name "$file-*.whl" ! -name "$(basename "$got")" -print -delete \
        | sed 's/^/build-wheelhouse: removed old /' >&2
    mv "$got" "$OUT/"
    log "downloaded $(basename "$got")"
}

main() {
    mkdir -p "$OUT"
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/handyproxy-wheelhouse.XXXXXX")
    # shellcheck disable=SC2064  # expand $work now: the trap must remove this very directory
    trap "rm -rf '$work'" EXIT
    build_handyproxy "$work"
    fetch_wheel "$work" uvloop
    fetch_wheel "$work" prometheus-client
    log "wheelhouse: $OUT"
    ls -1 "$OUT" >&2
}

main "$@"
