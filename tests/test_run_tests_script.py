"""./run-tests.sh as a newcomer first runs it: it says what it installs before the slow apt step."""
import os
import shutil
import subprocess
import sys

from support import REPO, wait_until


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


def test_a_server_and_create_user_started_together_on_a_fresh_checkout_share_one_venv(tmp_path):
    """The README starts ./serve.sh in the background and runs ./create_user at once: on a fresh checkout
    create_user found serve.sh's half-made venv (python there, pip not yet) and failed. Both make the venv through
    scripts/venv.sh, here with no requirements (nothing to download)."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "venv.sh", tmp_path / "scripts" / "venv.sh")
    (tmp_path / "requirements.txt").write_text("")
    serve = subprocess.Popen(["bash", "-euc", ". scripts/venv.sh && ensure_venv requirements.txt"], cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(lambda: (tmp_path / ".venv" / "bin" / "python").exists(), timeout=30, what="serve.sh's venv to begin")
    create_user = subprocess.run(["bash", "-euc", ". scripts/venv.sh && ensure_venv requirements.txt --if-missing"
                                  " && .venv/bin/python -m pip --version"], cwd=tmp_path, capture_output=True,
                                 text=True, timeout=120)
    assert serve.wait(timeout=120) == 0, serve.stdout.read()
    assert create_user.returncode == 0, create_user.stderr
    assert create_user.stdout.startswith("pip ")


def test_a_venv_that_exists_is_completed_not_made_again_over_itself(tmp_path):
    """Reviewed: a developer's venv from before the completion mark was made again with python3's settings (here,
    it lost --system-site-packages) rather than its own."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "venv.sh", tmp_path / "scripts" / "venv.sh")
    (tmp_path / "requirements.txt").write_text("")
    # Without pip of its own, which takes seconds to put in: python3's own pip serves it through the system packages.
    subprocess.run(["python3", "-m", "venv", "--system-site-packages", "--without-pip", ".venv"], cwd=tmp_path, check=True)
    settings = (tmp_path / ".venv" / "pyvenv.cfg").read_text()
    ran = subprocess.run(["bash", "-euc", ". scripts/venv.sh && ensure_venv requirements.txt"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / ".venv" / "pyvenv.cfg").read_text() == settings
    assert (tmp_path / ".venv" / ".complete").exists()
