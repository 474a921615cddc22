# Shared helpers for the scripts in this folder; sourced, not run.
# shellcheck shell=bash

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="${VENV:-$REPO/.venv}"
# The Debian suites the role supports, one Molecule image each (scripts/build-image.sh SUITE).
SUPPORTED_SUITES="bookworm trixie"

say() { printf '\n==> %s (at %ss)\n' "$*" "$SECONDS" >&2; }
# log MESSAGE: one line on stderr, prefixed with the name of the script that sourced this file.
log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$(basename "$0"): run it as root (or with sudo): it builds network namespaces${1:+ and $1}" >&2
        exit 1
    fi
}

# apt_install PKG... installs the Debian packages that are missing, and only those.
apt_install() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

# make_venv REQUIREMENTS... builds .venv once and again only when a requirements file changes.
make_venv() {
    local stamp="$VENV/.requirements.sha256" want
    want=$(cat "$REPO/pyproject.toml" "$@" | sha256sum | cut -d' ' -f1)
    if [ -x "$VENV/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
        return 0
    fi
    say "creating $VENV"
    apt_install python3-venv  # Debian's python3 lacks ensurepip without it
    python3 -m venv "$VENV"
    # --no-compile: byte-compiling every file at install time is most of the install (the
    # `ansible` package alone has tens of thousands of modules, few of them ever imported);
    # Python compiles and caches what is imported, on first use.
    "$VENV/bin/pip" install -q --no-compile --upgrade pip
    local req
    for req in "$@"; do "$VENV/bin/pip" install -q --no-compile -r "$req"; done
    "$VENV/bin/pip" install -q --no-compile -e "$REPO"
    echo "$want" > "$stamp"
}
