"""nix/run-client.py, through which hook-wrapper.sh runs the client: as Python runs a script, but from the bytecode
compiled beside it; never bytecode that someone other than root or the client's owner could have written, never a
module from the working directory, and it writes no bytecode itself (the hook runs as root)."""
import importlib.util
import itertools
import marshal
import os
import py_compile
import shutil
import subprocess
import sys

from support import REPO

RUN_CLIENT = REPO / "nix" / "run-client.py"
HOOK_WRAPPER = REPO / "nix" / "hook-wrapper.sh"
NOBODY = 65534
# What a client shows of how it was run; the same whether run as a script or by run-client.py.
PROBE = """import os, sys
print(__name__, __file__, sys.path[0], sys.argv, sep="\\n")
if sys.argv[-1] == "raise":
    raise RuntimeError("from the probe")
sys.exit(int(sys.argv[-1]) if sys.argv[-1].isdigit() else 0)
"""


def installed(directory, client=REPO / "post_build_hook.py"):
    """The client, run-client.py and hook-wrapper.sh copied into directory, as install-hook.sh installs them."""
    directory.mkdir(exist_ok=True)
    for source in (client, RUN_CLIENT, HOOK_WRAPPER):
        shutil.copy2(source, directory / source.name)
    return directory / client.name


def through_wrapper(client, *args, cwd=None, wrapper=None, **env):
    """The client run as the hooks run it: hook-wrapper.sh (by default the one beside it), with a token file."""
    wrapper = wrapper or client.parent / "hook-wrapper.sh"
    token_file = wrapper.parent / "token"
    token_file.write_text("token\n")
    env = {**os.environ, "HASH_COLLECTION_TOKEN_FILE": str(token_file), "HASH_COLLECTION_PYTHON": sys.executable,
           "HASH_COLLECTION_CLIENT": str(client), **env}
    return subprocess.run([str(wrapper), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def as_script(client, *args, **env):
    return subprocess.run([sys.executable, str(client), *args], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def replace_source_keeping_size_and_time(client):
    """Only the bytecode can still run the client: its source is no longer Python, but looks unchanged to a .pyc."""
    status = client.stat()
    client.write_bytes(b"!" * status.st_size)
    os.utime(client, ns=(status.st_atime_ns, status.st_mtime_ns))


def plant_bytecode(client, program, bytecode=None):
    """Bytecode of another program, with the header of the client's own: as its .pyc (by default in __pycache__),
    it passes for the client's."""
    status = client.stat()
    header = (importlib.util.MAGIC_NUMBER + (0).to_bytes(4, "little") + int(status.st_mtime).to_bytes(4, "little")
              + (status.st_size & 0xFFFFFFFF).to_bytes(4, "little"))
    bytecode = bytecode or importlib.util.cache_from_source(str(client))
    os.makedirs(os.path.dirname(bytecode), exist_ok=True)
    with open(bytecode, "wb") as planted:
        planted.write(header + marshal.dumps(compile(program, str(client), "exec")))
    return bytecode


def test_hook_wrapper_runs_the_client_from_the_bytecode_compiled_beside_it(tmp_path):
    client = installed(tmp_path)
    py_compile.compile(str(client), doraise=True)
    replace_source_keeping_size_and_time(client)
    completed = through_wrapper(client, "no-such-command")
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr


def test_the_client_sees_what_a_script_sees_through_a_symbolic_link_too(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    client = installed(tmp_path / "installed", probe)
    # As nix/package.nix lays them out: the wrapper and run-client.py in nix/, below the client's directory.
    wrappers = client.parent / "nix"
    wrappers.mkdir()
    for name in ("hook-wrapper.sh", "run-client.py"):
        (client.parent / name).rename(wrappers / name)
    link = tmp_path / "link.py"
    link.symlink_to(client)
    for path, args, env in itertools.product((client, link), ((), ("3",), ("raise",)),
                                             ({}, {"PYTHONSAFEPATH": "1"})):
        wrapped = through_wrapper(path, "flush", *args, wrapper=wrappers / "hook-wrapper.sh", **env)
        script = as_script(path, "flush", *args, **env)
        assert (wrapped.returncode, wrapped.stdout) == (script.returncode, script.stdout)
        assert wrapped.stderr.splitlines()[-1:] == script.stderr.splitlines()[-1:]


def test_bytecode_others_could_have_written_is_never_run(tmp_path):
    for case in ("group-writable directory", "directory others may write", "file of another user", "symbolic link"):
        client = installed(tmp_path / case.replace(" ", "-"))
        bytecode = plant_bytecode(client, "print('planted')")
        if case == "group-writable directory":
            os.chmod(os.path.dirname(bytecode), 0o775)
        elif case == "directory others may write":
            os.chmod(os.path.dirname(bytecode), 0o757)
        elif case == "file of another user":
            os.chown(bytecode, NOBODY, NOBODY)
        else:  # refused by its mode too (0777 on Linux); the link check is there all the same
            elsewhere = tmp_path / f"elsewhere-{client.parent.name}"
            os.rename(os.path.dirname(bytecode), elsewhere)
            os.symlink(elsewhere, os.path.dirname(bytecode))
        completed = through_wrapper(client, "no-such-command")
        assert "planted" not in completed.stdout, case
        assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), case


def test_bytecode_under_a_pycache_prefix_is_never_run(tmp_path):
    """PYTHONPYCACHEPREFIX moves bytecode below directories run-client.py does not look at."""
    client = installed(tmp_path / "installed")
    prefix = tmp_path / "prefix"
    plant_bytecode(client, "print('planted')",
                   prefix / str(client.parent).lstrip("/") / f"{client.stem}.{sys.implementation.cache_tag}.pyc")
    completed = through_wrapper(client, "no-such-command", PYTHONPYCACHEPREFIX=str(prefix))
    assert "planted" not in completed.stdout
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr


def test_bytecode_root_wrote_is_run(tmp_path):
    """The other side of the test above: the same planted file is run when only root could have written it."""
    client = installed(tmp_path)
    plant_bytecode(client, "print('planted')")
    assert through_wrapper(client, "no-such-command").stdout == "planted\n"


def test_no_bytecode_is_written_when_running(tmp_path):
    """Not where there is none, nor over bytecode that the client's source has changed since."""
    fresh, changed = installed(tmp_path / "fresh"), installed(tmp_path / "changed")
    bytecode = py_compile.compile(str(changed), doraise=True)
    compiled = open(bytecode, "rb").read()
    with open(changed, "a") as source:
        source.write("# changed since it was compiled\n")
    for client in (fresh, changed):
        completed = through_wrapper(client, "no-such-command", PYTHONDONTWRITEBYTECODE="")  # empty: Python may write
        assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr
    assert not (fresh.parent / "__pycache__").exists()
    assert open(bytecode, "rb").read() == compiled


def test_hook_wrapper_never_imports_a_module_from_the_working_directory(tmp_path):
    client = installed(tmp_path / "installed")
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "imported"
    for module in ("json", "hashlib"):  # which the client imports
        (hostile / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    completed = through_wrapper(client, "no-such-command", cwd=hostile)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr
    assert not marker.exists()


def test_a_hook_wrapper_copied_without_run_client_still_runs_the_client(tmp_path):
    client = installed(tmp_path)
    (tmp_path / "run-client.py").unlink()
    completed = through_wrapper(client, "no-such-command")
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr


def test_runs_on_pythons_before_3_11_which_have_no_safe_path_flag(tmp_path):
    """The client runs on Python 3.8 and later; sys.flags.safe_path (PYTHONSAFEPATH) came in 3.11. This Python's
    flags without it stand in for an older one's: a hook that failed there would stop every build."""
    client = installed(tmp_path)
    older = ("import runpy, sys, types\n"
             "flags = {name: getattr(sys.flags, name) for name in dir(sys.flags) if not name.startswith('_')}\n"
             "flags.pop('safe_path', None)\n"
             "sys.flags = types.SimpleNamespace(**{k: v for k, v in flags.items() if not callable(v)})\n"
             "sys.argv = sys.argv[1:]\n"
             "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    completed = subprocess.run([sys.executable, "-c", older, str(tmp_path / "run-client.py"), str(client),
                                "no-such-command"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr
