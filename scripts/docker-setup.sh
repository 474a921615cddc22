#!/usr/bin/env bash
# Make sure a Docker engine answers on /var/run/docker.sock, for the Molecule scenarios.
#
# Idempotent: installs Debian's docker.io when dockerd is missing, writes the daemon settings the
# project needs, starts dockerd in the background when nothing answers, and waits for it. When an
# engine already answers it is left alone (other users may have containers on it); the script only
# warns if its default bridge is not on the test ranges.
#
# Why the settings: traffic may only reach containers we create, and only on documented test
# ranges. Docker's defaults (172.17.0.0/16 and friends, masquerading out of the uplink) are neither,
# so the bridge and the address pools move to 198.19.0.0/16 (part of 198.18.0.0/15), IPv6 to
# 2001:db8::/32, and masquerading is off. The scenarios create `internal` networks on top.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DAEMON_JSON=${HANDYPROXY_DOCKER_DAEMON_JSON:-/etc/docker/daemon.json}
DOCKERD_LOG=${HANDYPROXY_DOCKERD_LOG:-/var/log/handyproxy-dockerd.log}
WAIT_SECONDS=${HANDYPROXY_DOCKER_WAIT:-60}

# The CLI in /usr/local/bin may be newer than Debian's engine (API 1.41); let it negotiate down.
docker_cli() { docker "$@"; }

engine_answers() {
    # The python SDK and `docker version` both talk to the socket; `docker info` is the cheapest
    # call that fails when the daemon is not up yet.
    docker_cli info --format '{{.ServerVersion}}' >/dev/null 2>&1
}

install_engine() {
    if command -v dockerd >/dev/null 2>&1; then
        return 0
    fi
    log "dockerd missing: installing Debian's docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
}

write_daemon_json() {
    local want
    want=$(cat <<'EOF'
{
  "bip": "198.19.0.1/24",
  "default-address-pools": [{"base": "198.19.16.0/20", "size": 24}],
  "ip-masq": false,
  "ipv6": true,
  "fixed-cidr-v6": "2001:db8:19::/64",
  "experimental": true,
  "ip6tables": true,
  "log-driver": "json-file",
  "storage-driver": "overlay2"
}
EOF
)
    mkdir -p "$(dirname "$DAEMON_JSON")"
    if [[ -f $DAEMON_JSON ]] && [[ "$(cat "$DAEMON_JSON")" == "$want" ]]; then
        return 0
    fi
    if [[ -f $DAEMON_JSON ]]; then
        cp "$DAEMON_JSON" "$DAEMON_JSON.handyproxy-bak"
        log "replacing $DAEMON_JSON (old copy in $DAEMON_JSON.handyproxy-bak)"
    fi
    printf '%s\n' "$want" >"$DAEMON_JSON"
}

start_engine() {
    # containerd is started by dockerd itself when not running (it spawns its own managed copy).
    log "starting dockerd in the background (log: $DOCKERD_LOG)"
    # setsid: the daemon must outlive this script and must not get the caller's signals.
    setsid dockerd --config-file "$DAEMON_JSON" >>"$DOCKERD_LOG" 2>&1 </dev/null &
    local i
    for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
        if engine_answers; then
            log "dockerd is up ($(docker_cli info --format '{{.ServerVersion}}'))"
            return 0
        fi
        sleep 0.5
    done
    log "dockerd did not answer within ${WAIT_SECONDS}s; last log lines:"
    tail -n 30 "$DOCKERD_LOG" >&2 || true
    return 1
}

check_bridge() {
    local bip
    bip=$(ip -4 -o addr show dev docker0 2>/dev/null | awk '{print $4}' || true)
    if [[ -n $bip && $bip != 198.19.* ]]; then
        log "WARNING: docker0 is on $bip, not on the test range 198.19.0.0/16;" \
            "the scenarios use their own internal networks, but restart dockerd with $DAEMON_JSON"
    fi
}

main() {
    if engine_answers; then
        # A systemd-managed engine started by the docker.io package with the default addresses:
        # apply our settings while it has no containers to lose.
        if ! ip -4 -o addr show dev docker0 2>/dev/null | grep -q ' 198\.19\.' \
            && [[ -z $(docker_cli ps -q 2>/dev/null) ]] \
            && systemctl is-active --quiet docker.service 2>/dev/null; then
            write_daemon_json
            log "restarting docker.service with $DAEMON_JSON"
            systemctl restart docker.service
            local i
            for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
                engine_answers && break
                sleep 0.5
            done
        fi
        check_bridge
        return 0
    fi
    install_engine
    write_daemon_json
    if pgrep -x dockerd >/dev/null 2>&1; then
        # Started by someone else and still coming up: wait for it rather than start a second one.
        log "dockerd is running but not answering yet; waiting"
        local i
        for ((i = 0; i < WAIT_SECONDS * 2; i++)); do
            engine_answers && { check_bridge; return 0; }
            # It was on its way out (stopped or crashed): start our own below.
            pgrep -x dockerd >/dev/null 2>&1 || break
            sleep 0.5
        done
        if pgrep -x dockerd >/dev/null 2>&1; then
            log "dockerd (pid $(pgrep -x dockerd | tr '\n' ' ')) does not answer"
            return 1
        fi
        log "that dockerd has exited"
    fi
    start_engine
    check_bridge
}

main "$@"
