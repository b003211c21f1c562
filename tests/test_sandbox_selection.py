"""The flake's checks.pytest selection, run as the Nix build sandbox would run it.

The command is read from flake.nix, not retyped, and runs on a copy of the
checkout's files with no Nix, no Chromium, no playwright and no network beyond
loopback (a private network and mount namespace; the machine's own are untouched).

By default only the collection runs (seconds): it catches a module that cannot be
imported there. The whole selection takes minutes; set HASH_COLLECTION_SANDBOX_SUITE=1
to run it, which catches a selected test that needs what the sandbox lacks.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from support import REPO, nix_env

FULL_RUN = os.environ.get("HASH_COLLECTION_SANDBOX_SUITE") == "1"

# flake.nix's checks, with just enough of nixpkgs to read the pytest check's script.
FLAKE_PYTEST_SCRIPT = """
let
  flake = import %(flake)s;
  pkgs = {
    runCommand = _name: _env: script: { inherit script; };
    python3.withPackages = _: "python";
  };
  nixpkgs = {
    lib.genAttrs = names: function: builtins.listToAttrs (map (name: { inherit name; value = function name; }) names);
    legacyPackages = builtins.listToAttrs (map (name: { inherit name; value = pkgs; }) [ "x86_64-linux" "aarch64-linux" ]);
  };
  outputs = flake.outputs { self = outputs // { outPath = "/source"; }; inherit nixpkgs; };
in outputs.checks.x86_64-linux.pytest.script
"""

# Run inside the namespaces: loopback up, Nix and Chromium replaced by /dev/null.
SANDBOX = """
set -e
ip link set lo up
for hidden in /usr/bin/nix /usr/bin/nix-* /usr/bin/chromium /usr/bin/chromium-browser; do
    if [ -e "$hidden" ]; then mount --bind /dev/null "$hidden"; fi
done
exec "$@"
"""


# Every test here takes the `nix` fixture: it needs Nix (and root), so the selection leaves it out.
def flake_pytest_command():
    completed = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr",
                                FLAKE_PYTEST_SCRIPT % {"flake": REPO / "flake.nix"}],
                               env=nix_env(), capture_output=True, text=True, check=True)
    lines = [line.strip() for line in json.loads(completed.stdout).splitlines()]
    [command] = [line for line in lines if line.startswith("python -m pytest")]
    return shlex.split(command)


def copy_of_the_checkout(target):
    """What `${self}` holds: the files git tracks or would track."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


def sandbox_environment(tmp_path):
    """PATH with the tests' Python as `python`, and a playwright that cannot be imported."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A script, not a symlink: through a symlink a venv's Python would not find its venv.
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    (bin_dir / "python").chmod(0o755)
    hidden = tmp_path / "hidden" / "playwright"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text('raise ImportError("playwright is not in the build sandbox")\n')
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path / "home"), "TMPDIR": str(tmp_path),
            "PYTHONPATH": str(tmp_path / "hidden"), "LANG": "C.UTF-8"}


def run_in_sandbox(tmp_path, command):
    source = copy_of_the_checkout(tmp_path / "source")
    (tmp_path / "home").mkdir()
    return subprocess.run(["unshare", "--net", "--mount", "--propagation", "private",
                           "bash", "-c", SANDBOX, "bash", *command],
                          cwd=source, env=sandbox_environment(tmp_path), capture_output=True, text=True,
                          timeout=1800)


def test_flake_deselects_the_tests_that_need_a_nix_store_or_headless_chrome(nix):
    command = flake_pytest_command()
    assert command[:3] == ["python", "-m", "pytest"]
    assert command[command.index("-m", 3) + 1] == "not nix and not browser"


def test_the_stand_in_sandbox_hides_nix_and_headless_chrome(nix, tmp_path):
    completed = run_in_sandbox(tmp_path, ["bash", "-c", "nix-build --version >/dev/null 2>&1 || echo no-nix;"
                                          "test -x /usr/bin/chromium || echo no-chromium;"
                                          "python -c 'import playwright' 2>/dev/null || echo no-playwright"])
    assert completed.stdout.split() == ["no-nix", "no-chromium", "no-playwright"], completed.stderr


def test_flake_selection_collects_in_the_stand_in_sandbox(nix, tmp_path):
    completed = run_in_sandbox(tmp_path, [*flake_pytest_command(), "--collect-only", "-q"])
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-2000:]
    selected = [line for line in completed.stdout.splitlines() if "::" in line]
    assert selected, completed.stdout[-2000:]
    assert not [test for test in selected if "chromium" in test.lower() or "browser" in test.lower()]


@pytest.mark.skipif(not FULL_RUN, reason="takes minutes: set HASH_COLLECTION_SANDBOX_SUITE=1")
def test_flake_selection_passes_in_the_stand_in_sandbox(nix, tmp_path):
    completed = run_in_sandbox(tmp_path, flake_pytest_command())
    assert completed.returncode == 0, completed.stdout[-5000:] + completed.stderr[-2000:]
