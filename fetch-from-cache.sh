#!/usr/bin/env bash
# Imports the hashes a binary cache signed into a report. The logic lives in
# post_build_hook.py (fetch-from-cache); this wrapper only finds and runs it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/python.sh
. "$here/scripts/python.sh"
run_client "$here" fetch-from-cache "$@"
