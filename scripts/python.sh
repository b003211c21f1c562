# Sourced by the command wrappers: the Python to run the project with.
# $PYTHON wins, then the project's .venv, then python3 on PATH.
project_python() {
    local here="$1"
    if [ -n "${PYTHON:-}" ]; then
        echo "$PYTHON"
    elif [ -x "$here/.venv/bin/python" ]; then
        echo "$here/.venv/bin/python"
    else
        echo python3
    fi
}
