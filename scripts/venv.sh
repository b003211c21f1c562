# Sourced by serve.sh and run-tests.sh: one place that makes the project's venv.
ensure_venv() {
    local requirements="$1"
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv || { echo "could not create .venv: install python3-venv" >&2; exit 1; }
    fi
    .venv/bin/python -m pip install -q --disable-pip-version-check -r "$requirements"
}
