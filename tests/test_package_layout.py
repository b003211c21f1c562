"""nix/package.nix as it installs: its own file set and install phase, run here
(tests/module_layout.py), and every command it puts in bin/ run with --help.

A file the package forgets (scripts/python.sh was one) fails here, not on a user's machine."""
import subprocess
import sys

import pytest

from module_layout import lay_out_package

# The commands the README, module.nix (create_user, hash-collection-hook) and
# flake.nix (apps, packages.utils) rely on.
PACKAGED_COMMANDS = {"hash-collection-server", "create_user", "hash-collection-client", "hash-collection-hook",
                     "fetch-from-cache.sh", "rebuilder.sh"}


@pytest.fixture(scope="module")
def package(nix, tmp_path_factory):
    return lay_out_package(tmp_path_factory.mktemp("package"), sys.executable)


def test_package_installs_the_commands_its_users_run(package):
    assert {command.name for command in (package / "bin").iterdir()} == PACKAGED_COMMANDS


def test_every_packaged_command_prints_its_help(package, tmp_path):
    failures = {}
    for command in sorted((package / "bin").iterdir()):
        # Nothing of the checkout may help: no venv, no working directory inside it.
        completed = subprocess.run([str(command), "--help"], cwd=tmp_path, capture_output=True, text=True,
                                   env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
        if completed.returncode != 0 or "usage" not in completed.stdout.lower():
            failures[command.name] = (completed.returncode, completed.stderr[-300:])
    assert failures == {}


def test_packaged_create_user_makes_a_user_with_the_package_alone(package, tmp_path):
    # tests/vm.nix's create_user step, minus systemd-run: the packaged command on a fresh database.
    completed = subprocess.run([str(package / "bin" / "create_user"), "vm-builder", "--db", str(tmp_path / "hashes.db")],
                               cwd=tmp_path, capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert len(completed.stdout.split()[-1]) >= 32


def test_the_package_ships_no_checkout_state(package):
    share = package / "share" / "nix-hash-collection"
    assert not (share / ".venv").exists()
    assert not (share / "tests").exists()


def test_the_hooks_client_is_compiled_and_checked_by_the_sources_hash(package):
    """nix/run-client.py runs the client from this bytecode. The store sets every file's time to 1, so a
    timestamp-checked .pyc would never match its source and the client would be compiled at every run."""
    (bytecode,) = (package / "share" / "nix-hash-collection" / "__pycache__").glob("post_build_hook.*.pyc")
    assert int.from_bytes(bytecode.read_bytes()[4:8], "little") == 0b11  # PEP 552: hash-based, checked
