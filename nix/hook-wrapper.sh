#!/usr/bin/env bash
# Runs post_build_hook.py with the token and signing key passed as file paths,
# so neither secret enters the Nix store or the process environment.
# module.nix installs this as the post-build hook, the diff hook and the flush job.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: hook-wrapper.sh [post_build_hook.py arguments: none for the post-build hook,
                        diff-hook OUT CHECK DRV [BUILD_DIR], flush, ...]
environment:
  HASH_COLLECTION_TOKEN_FILE       file holding the builder's token (required)
  HASH_COLLECTION_SECRET_KEY_FILE  file holding the Nix signing key (optional; unsigned without it)
  HASH_COLLECTION_PYTHON           interpreter (default: python3)
  HASH_COLLECTION_CLIENT           post_build_hook.py (default: ../post_build_hook.py from this script)
  HASH_COLLECTION_SERVER, HASH_COLLECTION_SPOOL, HASH_COLLECTION_TIMEOUT, HASH_COLLECTION_BUILD_USER_SPOOL
  and HASH_COLLECTION_BUILD_USERS_GROUP are passed through.
EOF
}

# Nix stops building when the post-build hook exits non-zero, and it ignores the
# diff hook's status, so a misconfigured hook reports the problem and exits 0.
# Run by hand or by the flush timer, it fails like any other command.
runs_inside_nix() {
    [ "$#" -eq 0 ] || [ "$1" = diff-hook ]
}

fail() {
    local message=$1
    shift
    echo "hook-wrapper.sh: $message" >&2
    usage >&2
    if runs_inside_nix "$@"; then
        exit 0
    fi
    exit 2
}

if [ "$#" -gt 0 ] && { [ "$1" = --help ] || [ "$1" = -h ]; }; then
    usage
    exit 0
fi

if [ -z "${HASH_COLLECTION_TOKEN_FILE:-}" ]; then
    fail "HASH_COLLECTION_TOKEN_FILE is not set" "$@"
fi

# The files are the only source of secrets: a stray value in the environment
# would take precedence and be readable in /proc/<pid>/environ.
unset HASH_COLLECTION_TOKEN HASH_COLLECTION_SECRET_KEY
export HASH_COLLECTION_TOKEN_FILE
if [ -n "${HASH_COLLECTION_SECRET_KEY_FILE:-}" ]; then
    export HASH_COLLECTION_SECRET_KEY_FILE
else
    unset HASH_COLLECTION_SECRET_KEY_FILE
fi

here=$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")
python=${HASH_COLLECTION_PYTHON:-python3}
client=${HASH_COLLECTION_CLIENT:-$here/../post_build_hook.py}

if [ ! -r "$client" ]; then
    fail "cannot read the client $client (set HASH_COLLECTION_CLIENT)" "$@"
fi

# run-client.py runs the client from its compiled bytecode: as a script, it would be compiled at every run.
# A wrapper copied without it (by hand, from an older version) still runs the client.
if [ -r "$here/run-client.py" ]; then
    exec "$python" "$here/run-client.py" "$client" "$@"
fi
exec "$python" "$client" "$@"
