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
pytest -q tests ansible/roles/handyproxy/tests

say "benchmark smoke run: python -m bench --quick --check (about 2 minutes)"
python -m bench --quick --check

if [ "$molecule" = 1 ]; then
    say "molecule"
    scripts/molecule.sh
fi
say "all tests passed in $((SECONDS - started))s"
