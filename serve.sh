#!/usr/bin/env bash
# Installs the runtime dependencies and serves the collection on 127.0.0.1:8000 with ./hashes.db.
# usage: ./serve.sh [--host HOST] [--port PORT] [--db PATH] [--require-signatures]
set -euo pipefail
cd "$(dirname "$0")"
# shellcheck source=scripts/venv.sh
. scripts/venv.sh
ensure_venv requirements.txt
exec .venv/bin/python web.py "$@"
