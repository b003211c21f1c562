#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine, then runs them.
# usage: ./run-tests.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/venv.sh
. scripts/venv.sh

install_system_packages() {
    local missing=()
    command -v nix-build >/dev/null || missing+=(nix-bin)
    command -v chromium >/dev/null || missing+=(chromium)
    command -v shellcheck >/dev/null || missing+=(shellcheck)
    # The diff hook runs as the build user, who cannot reach root's Python: it uses Debian's.
    /usr/bin/python3 -c 'import nacl.signing, requests' 2>/dev/null || missing+=(python3-nacl python3-requests)
    # The NixOS module's system-call filter is played by libseccomp (tests/seccomp_exec.py).
    /usr/bin/python3 -c 'import seccomp' 2>/dev/null || missing+=(python3-seccomp)
    python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
    # The transparency log is checked against Go's reference code, built offline from Debian's packages.
    command -v go >/dev/null || missing+=(golang-go)
    [ -d /usr/share/gocode/src/golang.org/x/mod/sumdb/tlog ] || missing+=(golang-golang-x-mod-dev)
    # The diff hook runs diffoscope when it is there; its recommends are hundreds of packages it does without.
    local without_recommends=()
    command -v diffoscope >/dev/null || without_recommends+=(diffoscope-minimal)
    [ "${#missing[@]}" -eq 0 ] && [ "${#without_recommends[@]}" -eq 0 ] && return
    if [ "$(id -u)" != 0 ]; then
        echo "run-tests.sh: please install as root: apt-get install ${missing[*]} ${without_recommends[*]}" >&2
        exit 1
    fi
    echo "run-tests.sh: installing ${missing[*]} with apt-get (about half a minute, once)" >&2
    apt-get update -qq
    if [ "${#missing[@]}" -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
    if [ "${#without_recommends[@]}" -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${without_recommends[@]}" >/dev/null
    fi
}

install_system_packages
ensure_venv requirements-test.txt
exec .venv/bin/python -m pytest "$@"
