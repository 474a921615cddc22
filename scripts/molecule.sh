#!/usr/bin/env bash
# Run every Molecule scenario (molecule/*/molecule.yml) against real systemd containers. Each
# scenario is a fleet: its role hosts run the supported Debian suites side by side, each host
# naming its suite's image (HANDYPROXY_MOLECULE_IMAGE_<SUITE>, exported here).
#
# The one entry point the test command calls. It makes sure Docker runs (scripts/docker-setup.sh),
# the base image of each suite exists (scripts/build-image.sh SUITE, cached), the wheelhouse the
# role installs from is built from this checkout (scripts/build-wheelhouse.sh), and so is the
# collection handyproxy.fleet, installed offline into .cache/collections where
# molecule/shared/converge.yml finds handyproxy.fleet.site (scripts/build-collection.sh); then
# it runs `molecule test` for each scenario in turn with the venv's tools and prints how long
# each took. Exit status: non-zero when any step or scenario failed.
#
# Usage: scripts/molecule.sh [SCENARIO...]      (default: every scenario under molecule/)
# Environment: VENV (default <repo>/.venv), HPM_ID (suffix of container and network names;
# default random), MOLECULE_ARGS (extra arguments for `molecule test`, e.g. --destroy=never),
# HANDYPROXY_SUITES (the Debian suites to build images of; default "bookworm trixie", the
# supported ones; a host of a suite left out runs on the first suite's image).
set -euo pipefail

. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$REPO
LOCK=/run/lock/handyproxy-molecule.lock

[[ -x $VENV/bin/molecule ]] || { log "no molecule in $VENV (run the test command's setup)"; exit 1; }
export PATH=$VENV/bin:$PATH
export VIRTUAL_ENV=$VENV
# Names of containers and networks carry this suffix so that they cannot clash with anyone else's.
HPM_ID=${HPM_ID:-$(head -c2 /dev/urandom | od -An -tx1 | tr -d ' \n')}
export HPM_ID
# Debian's engine speaks API 1.41; the CLI in /usr/local/bin is newer and negotiates, the Python
# SDK too, but pin it so that neither asks for more than the engine has.
export DOCKER_API_VERSION=${DOCKER_API_VERSION:-1.41}
export PY_COLORS=0 ANSIBLE_FORCE_COLOR=0 NO_COLOR=1
# molecule keeps its per-scenario state under this directory; inside the checkout it is ignored
# by git (.cache/) and cannot collide with another checkout's.
export XDG_CACHE_HOME=${XDG_CACHE_HOME:-$ROOT/.cache}

cd "$ROOT"

# The scenarios use fixed test subnets, so two runs on one machine would fight over them: take
# turns. The lock is released when this script exits, however it exits.
mkdir -p "$(dirname "$LOCK")"
exec 9>"$LOCK"
if ! flock -n 9; then
    log "another scenario run holds $LOCK; waiting for it"
    flock 9
fi

t_setup=$SECONDS
# 9>&-: a dockerd started from here must not inherit the lock, or it would hold it forever.
bash "$ROOT/scripts/docker-setup.sh" 9>&-
SUITES=${HANDYPROXY_SUITES:-$SUPPORTED_SUITES}
declare -A image
for suite in $SUITES; do
    image[$suite]=$(bash "$ROOT/scripts/build-image.sh" "$suite")
done
# The scenarios' hosts name their suites' images: HANDYPROXY_MOLECULE_IMAGE_BOOKWORM and so on;
# a suite left out of this run takes the first image built, so a one-suite run still has every
# host. Hosts that are not the role's (proxy, origin, client) take HANDYPROXY_MOLECULE_IMAGE.
first=${SUITES%% *}
for suite in $SUPPORTED_SUITES; do
    export "HANDYPROXY_MOLECULE_IMAGE_${suite^^}=${image[$suite]:-${image[$first]}}"
done
export HANDYPROXY_MOLECULE_IMAGE=${image[$first]}

# Containers or networks that a killed run left behind (we hold the lock, so none is in use).
stale=$(docker ps -aq --filter label=org.handyproxy.molecule)
if [[ -n $stale ]]; then
    log "removing containers left by an earlier run: $(echo $stale)"
    docker rm -f $stale >/dev/null
fi
stale=$(docker network ls -q --filter label=org.handyproxy.molecule)
if [[ -n $stale ]]; then
    log "removing networks left by an earlier run"
    docker network rm $stale >/dev/null
fi

if [[ -f $ROOT/scripts/build-wheelhouse.sh ]]; then
    bash "$ROOT/scripts/build-wheelhouse.sh"
else
    log "scripts/build-wheelhouse.sh missing; building the wheelhouse with pip wheel"
    mkdir -p "$ROOT/wheelhouse"
    "$VENV/bin/python" -m pip wheel --disable-pip-version-check -q \
        --wheel-dir "$ROOT/wheelhouse" "$ROOT"
fi
# .config/molecule/config.yml points ANSIBLE_COLLECTIONS_PATH here: the scenarios run the artifact.
HANDYPROXY_COLLECTIONS_PATH=$ROOT/.cache/collections bash "$ROOT/scripts/build-collection.sh"
log "setup took $((SECONDS - t_setup))s"

if (($# > 0)); then
    scenarios=("$@")
else
    scenarios=()
    for f in "$ROOT"/molecule/*/molecule.yml; do
        scenarios+=("$(basename "$(dirname "$f")")")
    done
fi

declare -A took result
runs=()
failed=0
for run in "${scenarios[@]}"; do
    runs+=("$run")
    log "scenario $run: molecule test (HPM_ID=$HPM_ID)"
    t0=$SECONDS
    # shellcheck disable=SC2086  # MOLECULE_ARGS is a list of words on purpose
    if molecule test -s "$run" ${MOLECULE_ARGS:-}; then
        result[$run]=passed
    else
        result[$run]=FAILED
        failed=1
    fi
    took[$run]=$((SECONDS - t0))
    log "scenario $run: ${result[$run]} in ${took[$run]}s"
done

log "summary:"
passed=0
for run in "${runs[@]}"; do
    printf 'molecule.sh:   %-20s %-7s %4ss\n' "$run" "${result[$run]}" "${took[$run]}" >&2
    [[ ${result[$run]} == passed ]] && passed=$((passed + 1))
done
# The plain closing line CI reads: N passed, N failed.
echo "molecule: ${passed} passed, $((${#runs[@]} - passed)) failed"
exit "$failed"
