#!/usr/bin/env bash
# Build a Debian + systemd base image the Molecule scenarios run on, offline from a registry.
#
# One image per supported Debian suite (the role supports Debian 12 "bookworm" and Debian 13
# "trixie"): `scripts/build-image.sh [SUITE]` builds handyproxy-molecule:SUITE-RECIPE (default: bookworm).
#
# No image registry is reachable, so the image comes from debootstrap (Debian's archive is) and
# `docker import`. Building takes a minute or two, so it is cached: the image carries a label with
# a hash of the package list and of the recipe below, and the build is skipped when an image with
# the same hash exists. Set HANDYPROXY_IMAGE_REBUILD=1 to force a build.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SUITE=${1:-bookworm}
case $SUITE in
    bookworm | trixie) ;;
    *) printf 'build-image: unsupported suite %s (bookworm or trixie)\n' "$SUITE" >&2; exit 2 ;;
esac
# The tag carries the recipe hash too (handyproxy-molecule:SUITE-HASH), so checkouts with
# different package lists on one machine each keep their own image instead of rebuilding each
# other's; the name is printed on stdout for scripts/molecule.sh.
IMAGE_REPO=handyproxy-molecule
LABEL_KEY=org.handyproxy.molecule.recipe

# What the scenarios need inside the containers: systemd as PID 1, Python for Ansible and the
# forwarder's venv, netfilter tools for the role, curl/openssl for the traffic checks, tinyproxy
# and squid (NTLM via its ntlm_fake_auth helper) as the upstream proxies, procps/iputils for
# debugging a failed run; python3-packaging because the role installs with ansible.builtin.pip,
# which needs it.
PACKAGES=(
    systemd systemd-sysv dbus
    python3 python3-venv python3-apt python3-packaging
    iproute2 nftables iptables
    curl ca-certificates openssl
    tinyproxy squid procps sudo iputils-ping
)
# Bump when the customisation in customise_rootfs changes.
RECIPE_VERSION=3

recipe_hash() {
    printf '%s\n' "$SUITE" "$RECIPE_VERSION" "${PACKAGES[@]}" | sha256sum | cut -c1-16
}

# The mirror this machine's apt already uses (deb822 .sources or one-line .list), so the build
# goes where apt goes; deb.debian.org otherwise.
debian_mirror() {
    local uri
    uri=$(
        {
            grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
                | awk '{print $2}'
            grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list \
                /etc/apt/sources.list.d/*.list 2>/dev/null \
                | sed -E 's/\[[^]]*\]//' | awk '{print $2}'
        } | grep -E '/debian/?$' | head -n1
    ) || true
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

customise_rootfs() {
    local root=$1
    # systemd in a container: no consoles, no udev-driven units, no timers that wake apt.
    local unit
    for unit in getty@tty1.service console-getty.service serial-getty@.service \
        systemd-udevd.service systemd-udev-trigger.service systemd-firstboot.service \
        apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer \
        systemd-timesyncd.service systemd-networkd-wait-online.service; do
        ln -sf /dev/null "$root/etc/systemd/system/$unit"
    done
    # tinyproxy and squid are only wanted in the proxy container; the scenarios' prepare enables them.
    rm -f "$root/etc/systemd/system/multi-user.target.wants/tinyproxy.service"
    rm -f "$root/etc/systemd/system/multi-user.target.wants/squid.service"
    # An empty machine-id makes systemd generate one per container at boot.
    : >"$root/etc/machine-id"
    rm -f "$root/var/lib/dbus/machine-id"
    # Keep journald in memory and small: the containers are short-lived.
    mkdir -p "$root/etc/systemd/journald.conf.d"
    printf '[Journal]\nStorage=volatile\nRuntimeMaxUse=16M\n' \
        >"$root/etc/systemd/journald.conf.d/handyproxy-molecule.conf"
    # Smaller image: package caches are not needed at run time.
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

main() {
    local want
    want=$(recipe_hash)
    IMAGE=$IMAGE_REPO:$SUITE-$want
    if [[ ${HANDYPROXY_IMAGE_REBUILD:-0} != 1 ]]; then
        local have
        have=$(docker image inspect -f "{{ index .Config.Labels \"$LABEL_KEY\" }}" "$IMAGE" \
            2>/dev/null || true)
        if [[ $have == "$want" ]]; then
            log "$IMAGE is current (recipe $want)"
            echo "$IMAGE"
            return 0
        fi
    fi

    command -v debootstrap >/dev/null || {
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    }

    local work root mirror include
    work=$(mktemp -d /var/tmp/handyproxy-rootfs.XXXXXX)
    # shellcheck disable=SC2064  # expand $work now: the trap must remove this very directory
    trap "rm -rf '$work'" EXIT
    root=$work/rootfs
    mirror=$(debian_mirror)
    include=$(IFS=,; echo "${PACKAGES[*]}")
    log "debootstrap $SUITE from $mirror into $root (recipe $want)"
    local t0=$SECONDS
    if ! debootstrap --variant=minbase --include="$include" "$SUITE" "$root" "$mirror" \
        >"$work/debootstrap.log" 2>&1; then
        tail -n 40 "$work/debootstrap.log" >&2
        [[ -f $root/debootstrap/debootstrap.log ]] && tail -n 40 "$root/debootstrap/debootstrap.log" >&2
        log "debootstrap failed"
        return 1
    fi
    customise_rootfs "$root"
    log "importing as $IMAGE"
    tar -C "$root" --numeric-owner -c . | docker import \
        -c 'CMD ["/lib/systemd/systemd"]' \
        -c 'ENV container=docker' \
        -c "LABEL $LABEL_KEY=$want" \
        - "$IMAGE" >/dev/null
    log "built $IMAGE in $((SECONDS - t0))s"
    echo "$IMAGE"
}

main "$@"
