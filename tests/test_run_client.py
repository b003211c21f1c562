"""nix/run-client.py, through which hook-wrapper.sh runs the client: from the bytecode compiled beside it, with its
arguments and exit status, and never with a module from the working directory (the hook runs as root)."""
import os
import py_compile
import shutil
import subprocess
import sys

from support import REPO

RUN_CLIENT = REPO / "nix" / "run-client.py"
HOOK_WRAPPER = REPO / "nix" / "hook-wrapper.sh"


def installed_client(directory):
    """post_build_hook.py and run-client.py copied into directory, as install-hook.sh installs them."""
    for source in (REPO / "post_build_hook.py", RUN_CLIENT):
        shutil.copy2(source, directory / source.name)
    return directory / "post_build_hook.py"


def run_client(client, *args, cwd=None, env=None):
    return subprocess.run([sys.executable, str(client.parent / "run-client.py"), str(client), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_client_runs_from_the_bytecode_compiled_beside_it(tmp_path):
    client = installed_client(tmp_path)
    py_compile.compile(str(client), doraise=True)
    # The same size and time but no longer Python: only the bytecode can give the usage.
    status = client.stat()
    client.write_bytes(b"!" * status.st_size)
    os.utime(client, ns=(status.st_atime_ns, status.st_mtime_ns))
    completed = run_client(client, "--help")
    assert (completed.returncode, completed.stderr) == (0, "")
    assert completed.stdout.startswith("usage: post_build_hook.py")


def test_without_bytecode_the_client_is_compiled_and_runs(tmp_path):
    client = installed_client(tmp_path)
    completed = run_client(client, "--help", env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert completed.returncode == 0 and completed.stdout.startswith("usage: post_build_hook.py")
    assert not (tmp_path / "__pycache__").exists()


def test_arguments_and_exit_status_are_the_clients(tmp_path):
    completed = run_client(installed_client(tmp_path), "no-such-command")
    assert completed.returncode == 2
    assert completed.stderr.startswith("usage: post_build_hook.py")


def test_hook_wrapper_never_imports_a_module_from_the_working_directory(tmp_path):
    (tmp_path / "installed").mkdir()
    client = installed_client(tmp_path / "installed")
    shutil.copy2(HOOK_WRAPPER, client.parent / "hook-wrapper.sh")
    token_file = tmp_path / "token"
    token_file.write_text("token\n")
    token_file.chmod(0o600)
    hostile = tmp_path / "hostile"
    hostile.mkdir()
    marker = tmp_path / "imported"
    for module in ("json", "hashlib"):  # which the client imports
        (hostile / f"{module}.py").write_text(f"open({str(marker)!r}, 'a').write({module!r})\n")
    env = {**os.environ, "HASH_COLLECTION_TOKEN_FILE": str(token_file), "HASH_COLLECTION_PYTHON": sys.executable,
           "HASH_COLLECTION_CLIENT": str(client)}
    completed = subprocess.run([str(client.parent / "hook-wrapper.sh"), "no-such-command"], cwd=hostile, env=env,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr
    assert not marker.exists()


def test_a_hook_wrapper_copied_without_run_client_still_runs_the_client(tmp_path):
    client = tmp_path / "post_build_hook.py"
    shutil.copy2(REPO / "post_build_hook.py", client)
    shutil.copy2(HOOK_WRAPPER, tmp_path / "hook-wrapper.sh")
    token_file = tmp_path / "token"
    token_file.write_text("token\n")
    env = {**os.environ, "HASH_COLLECTION_TOKEN_FILE": str(token_file), "HASH_COLLECTION_PYTHON": sys.executable,
           "HASH_COLLECTION_CLIENT": str(client)}
    completed = subprocess.run([str(tmp_path / "hook-wrapper.sh"), "no-such-command"], env=env, capture_output=True,
                               text=True, timeout=60)
    assert completed.returncode == 2 and completed.stderr.startswith("usage: post_build_hook.py"), completed.stderr
