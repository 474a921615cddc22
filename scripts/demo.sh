#!/usr/bin/env bash
# Run the forwarder in a throwaway lab of network namespaces and show a request flowing through it.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
apt_install iproute2 nftables conntrack curl
[ -x "$VENV/bin/handyproxy" ] || make_venv "$REPO/requirements.txt"
exec "$VENV/bin/handyproxy" demo "$@"
