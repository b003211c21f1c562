"""Runs the client, post_build_hook.py (the path is the first argument, the client's arguments follow), as Python
runs a script, but from its compiled bytecode in __pycache__ beside it when that is up to date: a script is
compiled at every start, 40-60 ms of each hook run for the client's 3,000 lines, and Nix's build loop waits.
install-hook.sh and nix/package.nix compile it when they install it; hook-wrapper.sh runs this.
As a script itself, this file puts its own directory first on sys.path, never the working directory; the
client's directory takes its place, as if the client were the script."""
import importlib.machinery
import os
import sys
import types


def run_as_main(path, args):
    loader = importlib.machinery.SourceFileLoader("__main__", path)
    code = loader.get_code("__main__")  # the bytecode when it is up to date, else the source compiled
    module = types.ModuleType("__main__")
    module.__file__, module.__loader__ = path, loader
    sys.modules["__main__"] = module
    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.abspath(path))
    exec(code, module.__dict__)  # noqa: S102 - the client, as `python path` would run it


if __name__ == "__main__":
    run_as_main(sys.argv[1], sys.argv[2:])
