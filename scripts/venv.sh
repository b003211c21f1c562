# shellcheck shell=bash
# Sourced by serve.sh, create_user and run-tests.sh: one place that makes the project's venv.
# Under a lock: the README starts ./serve.sh in the background and runs ./create_user at once, and on a fresh
# checkout each would otherwise use the other's half-made venv (python there, pip or flask not yet).
# .venv/.complete is written once a venv has its packages: one cut off before that is made again.
# usage: ensure_venv REQUIREMENTS [--if-missing]   (--if-missing: nothing to do for a complete venv)
ensure_venv() {
    local requirements="$1" if_missing="${2:-}"
    exec 9>>.venv.lock
    flock 9
    if [ -z "$if_missing" ] || [ ! -e .venv/.complete ]; then
        # A venv that exists is never made again over itself: that would give it python3's settings, not its own.
        if [ ! -x .venv/bin/python ]; then
            python3 -m venv .venv || { echo "could not create .venv: install python3-venv" >&2; exit 1; }
        elif ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
            .venv/bin/python -m ensurepip >/dev/null || { echo "could not put pip into .venv" >&2; exit 1; }
        fi
        .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
        touch .venv/.complete
    fi
    exec 9>&-
}
