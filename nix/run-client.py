"""Runs the client, post_build_hook.py (the path is the first argument, the client's arguments follow), as Python
runs a script, but from its compiled bytecode in __pycache__ beside it: a script is compiled at every start, 40-60 ms
of each hook run for the client's 3,000 lines, and Nix's build loop waits. install-hook.sh and nix/package.nix
compile it when they install it; hook-wrapper.sh runs this.

The hook runs as root. So the bytecode is used only when no one but root or the client's owner could have written
it, this never writes bytecode, and the working directory is never searched for modules: as a script, this file
puts its own directory first on sys.path, and the client's directory takes its place, as if the client were the
script. Otherwise the source is compiled, as for a script."""
import importlib.machinery
import importlib.util
import os
import stat
import sys
import types


def run_as_main(path, args):
    sys.dont_write_bytecode = True
    source = os.path.realpath(path)
    loader = importlib.machinery.SourceFileLoader("__main__", source)
    if trusted_bytecode(source):
        code = loader.get_code("__main__")  # the bytecode if it is that of the source as it is now
    else:
        code = compile(loader.get_data(source), source, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__file__, module.__loader__ = os.path.abspath(path), loader
    sys.modules["__main__"] = module
    sys.argv = [path, *args]
    if not getattr(sys.flags, "safe_path", False):  # PYTHONSAFEPATH, from Python 3.11; the client runs on 3.8 too
        sys.path[0] = os.path.dirname(source)
    exec(code, module.__dict__)  # noqa: S102 - the client, as `python path` would run it


def trusted_bytecode(source):
    """Whether the bytecode of source, and its __pycache__, are real ones that only root or the source's owner
    could have written."""
    if sys.pycache_prefix is not None:  # elsewhere, below directories this does not look at
        return False
    owners = {0, os.stat(source).st_uid}
    bytecode = importlib.util.cache_from_source(source)
    try:
        return all(written_only_by(os.lstat(entry), owners) for entry in (os.path.dirname(bytecode), bytecode))
    except OSError:  # none yet, or not for this Python
        return False


def written_only_by(status, owners):
    return (not stat.S_ISLNK(status.st_mode) and status.st_uid in owners
            and not status.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


if __name__ == "__main__":
    run_as_main(sys.argv[1], sys.argv[2:])
