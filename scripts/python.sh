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

# Runs `post_build_hook.py SUBCOMMAND ARGS...` after the wrappers' shared checks:
# --help anywhere prints the caller's usage(), no arguments at all is a usage error.
run_client() {
    local here="$1" subcommand="$2"
    shift 2
    local argument
    for argument in "$@"; do
        case "$argument" in
            -h | --help) usage; exit 0 ;;
        esac
    done
    if [ "$#" -eq 0 ]; then
        usage >&2
        exit 2
    fi
    # So that usage errors name the command the user typed, not the Python subcommand.
    HASH_COLLECTION_PROGRAM=$(basename "$0")
    export HASH_COLLECTION_PROGRAM
    exec "$(project_python "$here")" "$here/post_build_hook.py" "$subcommand" "$@"
}
