#!/usr/bin/env bash
# The one test command (CI runs exactly this): installs what the tests need, then runs the linters,
# pytest (unit, integration on network namespaces, reliability), a quick benchmark run (a smoke
# test: every row measured with zero errors, never a timing check) and every Molecule scenario.
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
    ca-certificates docker.io debootstrap iperf3 wrk redsocks
if [ "$molecule" = 1 ]; then
    # Docker and the scenarios' images need neither the venv nor the tests: on a fresh machine
    # (debootstrap, one image per suite, mostly waiting on the archive) they get ready in the
    # background while the venv is made and the linters and pytest run.
    prep_log=$(mktemp)
    (
        bash scripts/docker-setup.sh
        for suite in ${HANDYPROXY_SUITES:-$SUPPORTED_SUITES}; do
            bash scripts/build-image.sh "$suite" >/dev/null
        done
    ) >"$prep_log" 2>&1 &
    prep=$!
fi
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

say "pytest"
pytest -q --durations=15 tests ansible/roles/handyproxy/tests

say "benchmark smoke run: python -m bench --quick --check (about 2 minutes)"
python -m bench --quick --check

if [ "$molecule" = 1 ]; then
    say "molecule"
    prep_rc=0
    wait "$prep" || prep_rc=$?
    cat "$prep_log" >&2
    rm -f "$prep_log"
    [ "$prep_rc" = 0 ] || { echo "test.sh: Docker or an image failed to get ready" >&2; exit 1; }
    scripts/molecule.sh
fi
say "all tests passed in $((SECONDS - started))s"
