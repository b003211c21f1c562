"""./run-tests.sh as a newcomer first runs it: it says what it installs before the slow apt step."""
import os
import shutil
import subprocess
import sys

from support import REPO


def test_run_tests_says_what_it_installs_before_running_apt(tmp_path):
    # A PATH with nothing the tests need, and an apt-get that records its calls and then fails,
    # so the script stops right after the apt step; the machine's packages are never touched.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "id", "dirname", "cat"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "python3").symlink_to(sys.executable)
    calls = tmp_path / "apt-calls"
    apt_get = bin_dir / "apt-get"
    apt_get.write_text(f'#!/bin/sh\necho "apt-get $*" >> {calls}\necho "apt-get $*" >&2\nexit 1\n')
    apt_get.chmod(0o755)
    ran = subprocess.run([str(REPO / "run-tests.sh")], env={**os.environ, "PATH": str(bin_dir)},
                         capture_output=True, text=True, timeout=60)
    assert ran.returncode != 0
    first_line = ran.stderr.splitlines()[0]
    assert first_line.startswith("run-tests.sh: installing ") and "nix-bin" in first_line and "chromium" in first_line
    assert calls.read_text().startswith("apt-get update")
