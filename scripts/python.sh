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

# Runs `post_build_hook.py SUBCOMMAND ARGS...`, whose --help prints the usage with the defaults it
# uses; no arguments at all is a usage error.
run_client() {
    local here="$1" subcommand="$2"
    shift 2
    # So that usage and errors name the command the user typed, not the Python subcommand.
    HASH_COLLECTION_PROGRAM=$(basename "$0")
    export HASH_COLLECTION_PROGRAM
    local python
    python=$(project_python "$here")
    if [ "$#" -eq 0 ]; then
        "$python" "$here/post_build_hook.py" "$subcommand" --help >&2
        exit 2
    fi
    exec "$python" "$here/post_build_hook.py" "$subcommand" "$@"
}
