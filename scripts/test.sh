#!/usr/bin/env bash
# The one test command (CI runs exactly this): installs what the tests need, then runs the linters,
# pytest (unit, integration on network namespaces, reliability), a quick benchmark run (a smoke
# test: every row measured with zero errors, never a timing check) and, beside those two, every
# Molecule scenario. Every part runs even when an earlier one failed; the exit status says
# which failed.
#   scripts/test.sh            everything
#   scripts/test.sh --no-molecule   skip the container scenarios (quick local loop)
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root "containers"
cd "$REPO"
started=$SECONDS

molecule=1
[ "${1:-}" = "--no-molecule" ] && molecule=0

apt_install iproute2 nftables conntrack iptables squid tinyproxy curl openssl socat procps util-linux \
    ca-certificates docker.io debootstrap iperf3 wrk redsocks strace linux-perf
make_venv "$REPO/requirements-dev.txt"
export PATH="$VENV/bin:$PATH"

say "lint: ruff, yamllint, ansible-lint, argument specs"
ruff check .
ruff format --check .
yamllint -s ansible molecule .config
# ansible/ is the collection handyproxy.fleet; its playbook-adjacent link makes the FQCN resolve.
(cd ansible && ANSIBLE_COLLECTIONS_PATH="$REPO/ansible/collections" ansible-lint --profile production)
python scripts/check-argument-specs.py

say "collection: build, offline install, ansible-test sanity"
scripts/build-collection.sh --sanity

if [ "$molecule" = 1 ]; then
    # The Molecule scenarios keep about one of the two cores busy (most of their time is
    # Ansible and systemd in the containers taking turns), so they run beside pytest and the
    # benchmark smoke run rather than after them. scripts/molecule.sh makes Docker and the
    # images ready first (debootstrap on a fresh machine, mostly waiting on the archive). Its
    # output is kept and shown once it ends; its own session, so that leaving early (a failure
    # here, Ctrl-C) stops all of it.
    molecule_log=$(mktemp)
    setsid scripts/molecule.sh >"$molecule_log" 2>&1 </dev/null &
    molecule_job=$!
    trap 'kill -TERM -- "-$molecule_job" 2>/dev/null || true' EXIT
    say "molecule: started in the background (log: $molecule_log, shown when it ends)"
fi

failed=()
say "pytest"
pytest -q --durations=15 tests ansible/roles/handyproxy/tests || failed+=(pytest)

say "benchmark smoke run: python -m bench --quick --check (about 2 minutes)"
python -m bench --quick --check || failed+=(bench)

if [ "$molecule" = 1 ]; then
    say "molecule: waiting for the background run"
    molecule_rc=0
    wait "$molecule_job" || molecule_rc=$?
    trap - EXIT
    cat "$molecule_log"
    rm -f "$molecule_log"
    [ "$molecule_rc" = 0 ] || failed+=(molecule)
fi
if [ "${#failed[@]}" -gt 0 ]; then
    say "FAILED: ${failed[*]} (after $((SECONDS - started))s)"
    exit 1
fi
say "all tests passed in $((SECONDS - started))s"
