#!/usr/bin/env bash
# Build ./wheelhouse/ for the fleet: the handyproxy wheel from this checkout plus, for every
# runtime dependency pinned in requirements.txt (uvloop, ...), the wheels for every CPython the
# supported hosts may run (3.11-3.14) on x86_64 and aarch64 (manylinux), and a SHA256SUMS manifest
# the role checks every wheel against. One directory then serves Debian 12 (3.11) and Debian 13
# (3.13) hosts, PCs and arm64 routers alike.
#
# Idempotent and additive: the handyproxy wheel is built from a clean copy of the sources with a
# fixed timestamp (SOURCE_DATE_EPOCH), so unchanged sources give a byte-identical wheel and the
# file is left untouched; a dependency wheel is downloaded only when no wheel of that pin fits the
# Python and architecture yet. Building for another Python or architecture adds wheels and never
# removes those of others; only wheels of other versions than the pins (and older handyproxy
# wheels) are removed.
#
# Environment: WHEELHOUSE_DIR (default: <repo>/wheelhouse), PYTHON (a Python with pip; default
# <repo>/.venv/bin/python, else python3), TARGET_PYTHON_VERSIONS (default "3.11 3.12 3.13 3.14"),
# TARGET_ARCHES (default "x86_64 aarch64"), REQUIREMENTS (default <repo>/requirements.txt: the
# runtime pins).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$REPO
OUT=${WHEELHOUSE_DIR:-$ROOT/wheelhouse}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
TARGET_PYTHON_VERSIONS=${TARGET_PYTHON_VERSIONS:-3.11 3.12 3.13 3.14}
TARGET_ARCHES=${TARGET_ARCHES:-x86_64 aarch64}
REQUIREMENTS=${REQUIREMENTS:-$ROOT/requirements.txt}
# A fixed date: zip entries carry timestamps, and wheel honours SOURCE_DATE_EPOCH.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-315532800}

# The runtime pins (name==version), one a line, from the requirements file.
runtime_pins() {
    grep -Eo '^[A-Za-z0-9][A-Za-z0-9._-]*==[^[:space:];#]+' "$REQUIREMENTS" || {
        log "no name==version pins in $REQUIREMENTS"
        return 1
    }
}

# A wheel file name's distribution part: lower case, runs of - _ . as one _ (PEP 427/503).
wheel_name() {
    printf '%s\n' "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'
}

# Whether the wheelhouse already holds a wheel of NAME==VERSION that fits cpXY on ARCH: a pure
# wheel (py3-none-any) or one tagged for that CPython (or abi3) and that architecture.
have_wheel() {
    local name=$1 version=$2 pyver=$3 arch=$4 f base
    for f in "$OUT/$name-$version-"*.whl; do
        [[ -e $f ]] || continue
        base=$(basename "$f" .whl)
        case $base in
            *-none-any) return 0 ;;
        esac
        [[ $base == *"_$arch" ]] || continue
        [[ $base == *"-cp$pyver-cp$pyver-"* || $base == *"-abi3-"* ]] && return 0
    done
    return 1
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

fetch_dependency() {
    local work=$1 pin=$2 pyversion=$3 arch=$4
    local name version pyver
    name=$(wheel_name "${pin%%==*}")
    version=${pin#*==}
    pyver=${pyversion//./}
    if have_wheel "$name" "$version" "$pyver" "$arch"; then
        return 0
    fi
    local dest=$work/$name-$pyver-$arch
    mkdir -p "$dest"
    # manylinux_2_17 (glibc 2.17) and later: Debian 12 has glibc 2.36, Debian 13 2.41.
    "$PYTHON" -m pip download --disable-pip-version-check --no-input --no-deps \
        --only-binary=:all: --implementation cp --python-version "$pyversion" \
        --abi "cp$pyver" --abi abi3 --abi none \
        --platform "manylinux_2_28_$arch" --platform "manylinux_2_17_$arch" \
        --platform "manylinux2014_$arch" --platform any \
        --dest "$dest" "$pin" >"$dest.log" 2>&1 || {
        cat "$dest.log" >&2
        log "no wheel of $pin for CPython $pyversion on $arch"
        return 1
    }
    local got
    for got in "$dest"/*.whl; do
        [[ -e $got ]] || { log "pip download produced no wheel of $pin"; return 1; }
        mv "$got" "$OUT/"
        log "downloaded $(basename "$got") (CPython $pyversion, $arch)"
    done
}

# Wheels of a pinned distribution in another version than the pin: left by an earlier pin.
remove_unpinned() {
    local pin name version
    for pin in "$@"; do
        name=$(wheel_name "${pin%%==*}")
        version=${pin#*==}
        find "$OUT" -maxdepth 1 -name "$name-*.whl" ! -name "$name-$version-*.whl" -print -delete \
            | sed 's/^/build-wheelhouse: removed old /' >&2
    done
}

write_manifest() {
    # Sorted by name, so an unchanged wheelhouse gives a byte-identical manifest.
    (cd "$OUT" && LC_ALL=C find . -maxdepth 1 -name '*.whl' -printf '%f\n' | LC_ALL=C sort \
        | xargs -r sha256sum) >"$OUT/SHA256SUMS.tmp"
    if cmp -s "$OUT/SHA256SUMS.tmp" "$OUT/SHA256SUMS"; then
        rm -f "$OUT/SHA256SUMS.tmp"
    else
        mv "$OUT/SHA256SUMS.tmp" "$OUT/SHA256SUMS"
        log "wrote SHA256SUMS"
    fi
}

main() {
    mkdir -p "$OUT"
    local work
    work=$(mktemp -d "${TMPDIR:-/tmp}/handyproxy-wheelhouse.XXXXXX")
    # shellcheck disable=SC2064  # expand $work now: the trap must remove this very directory
    trap "rm -rf '$work'" EXIT
    build_handyproxy "$work"
    local pins pin pyversion arch
    mapfile -t pins < <(runtime_pins)
    remove_unpinned "${pins[@]}"
    for pin in "${pins[@]}"; do
        for pyversion in $TARGET_PYTHON_VERSIONS; do
            for arch in $TARGET_ARCHES; do
                fetch_dependency "$work" "$pin" "$pyversion" "$arch"
            done
        done
    done
    write_manifest
    log "wheelhouse: $OUT"
    ls -1 "$OUT" >&2
}

main "$@"
