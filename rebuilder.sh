#!/usr/bin/env bash
# Rebuilds the open paths of a report with `--check`, so that the post-build
# and diff hooks report the results. The logic lives in post_build_hook.py
# (rebuild); this wrapper only finds and runs it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/python.sh
. "$here/scripts/python.sh"
run_client "$here" rebuild "$@"
