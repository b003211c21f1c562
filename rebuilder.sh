#!/usr/bin/env bash
# Rebuilds the open paths of a report with `--check`, so that the post-build
# and diff hooks report the results. The logic lives in post_build_hook.py
# (rebuild); this wrapper only finds and runs it.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: rebuilder.sh REPORT [-j N]

For every open path of REPORT: needs its .drv in the local store (nix-instantiate
the closure first), builds it if the output is missing, then runs
`nix-store --realise --check`. Refuses to start unless post-build-hook,
diff-hook and run-diff-hook = true are configured (see `nix show-config`).

  -j N   rebuild N derivations at a time (default: MAX_CORES, else the number of CPUs)

Environment:
  HASH_COLLECTION_TOKEN_FILE or HASH_COLLECTION_TOKEN   your builder's token (leaves out what you attested)
  HASH_COLLECTION_SERVER      default http://localhost:8000
  MAX_CORES                   default for -j
USAGE
}

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/python.sh
. "$here/scripts/python.sh"
run_client "$here" rebuild "$@"
