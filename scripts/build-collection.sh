#!/usr/bin/env bash
# Build the Ansible collection handyproxy.fleet (ansible/ is its root) and install the artifact
# offline, where the Molecule scenarios and `ansible-playbook handyproxy.fleet.site` find it.
#
#   scripts/build-collection.sh            build dist/handyproxy-fleet-VERSION.tar.gz, install it
#                                          into .cache/collections/ansible_collections/handyproxy/fleet
#   scripts/build-collection.sh --sanity   the same, then `ansible-test sanity` in the installed copy
#
# The install is `--offline`: Galaxy is unreachable here and the collection has no dependencies
# (everything it uses is in ansible.builtin). The sanity tests left out (SANITY_NEED_VENV) create
# their own virtualenv, which ansible-test bootstraps with a get-pip script downloaded from
# ci-files.testing.ansible.com: unreachable, so they cannot run here (ansible/README.md).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
export PATH="$VENV/bin:$PATH"

DIST=$REPO/dist
COLLECTIONS=${HANDYPROXY_COLLECTIONS_PATH:-$REPO/.cache/collections}
INSTALLED=$COLLECTIONS/ansible_collections/handyproxy/fleet
SANITY_NEED_VENV=(ansible-doc import pep8 pylint runtime-metadata validate-modules yamllint)

version=$(sed -n 's/^version: *//p' "$REPO/ansible/galaxy.yml")
artifact=$DIST/handyproxy-fleet-$version.tar.gz

mkdir -p "$DIST" "$COLLECTIONS"
ansible-galaxy collection build "$REPO/ansible" --output-path "$DIST" --force >/dev/null
# A reinstall of the same version must replace the files, not keep the old copy.
rm -rf "$INSTALLED"
ansible-galaxy collection install --offline --force -p "$COLLECTIONS" "$artifact" >/dev/null 2>&1
log "built $(basename "$artifact"), installed into $INSTALLED"

if [ "${1:-}" = --sanity ]; then
    # Inside a git work tree ansible-test lists files with git, and .cache/ is ignored: it would
    # find nothing. A copy of the artifact installed outside the checkout has every file.
    scratch=$(mktemp -d /tmp/handyproxy-sanity.XXXXXX)
    # shellcheck disable=SC2064  # expand now: remove this very directory
    trap "rm -rf '$scratch'" EXIT
    ansible-galaxy collection install --offline -p "$scratch" "$artifact" >/dev/null 2>&1
    INSTALLED=$scratch/ansible_collections/handyproxy/fleet
    python=$(python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    skips=()
    for test in "${SANITY_NEED_VENV[@]}"; do
        skips+=(--skip-test "$test")
    done
    log "ansible-test sanity (Python $python), all tests but: ${SANITY_NEED_VENV[*]}"
    # ansible-test only runs inside ansible_collections/NS/NAME.
    (cd "$INSTALLED" && ansible-test sanity --python "$python" --color no "${skips[@]}")
fi
