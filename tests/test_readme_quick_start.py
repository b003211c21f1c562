"""The README's quick start, read from README.md itself and run as written.

Only where the server listens and keeps its database change: `./serve.sh &` gets a free port and a
temporary database, which the other commands reach through HASH_COLLECTION_DB and the port.
"""
import os
import re
import signal
import subprocess
import sys

import requests

from post_build_hook import basename_of
from support import REPO, free_port
from web import NO_BUILDS, ONE_BUILD

SERVER_START = "./serve.sh &"


def quick_start_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_quick_start_defines_the_example_report_with_alice_build(tmp_path):
    commands = quick_start_commands()
    assert SERVER_START in commands, "the quick start no longer starts the server as this test expects"
    db, port = tmp_path / "hashes.db", free_port()
    url = f"http://127.0.0.1:{port}"
    script = commands.replace(SERVER_START, f"./serve.sh --port {port} --db {db} &").replace("http://127.0.0.1:8000", url)
    # A session of its own: the server that serve.sh leaves running is stopped with the script's process group.
    # Output to a file, not a pipe, which would stay open as long as that server runs.
    output = tmp_path / "quick-start.log"
    with open(output, "wb") as log:
        quick_start = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, stdout=log, stderr=log,
                                       start_new_session=True,
                                       env={**os.environ, "HASH_COLLECTION_DB": str(db), "PYTHON": sys.executable})
    try:
        assert quick_start.wait(timeout=180) == 0, output.read_text()
        report = re.search(r"/reports/([A-Za-z0-9._-]+)", commands).group(1)
        summary = requests.get(f"{url}/reports/{report}", headers={"Accept": "application/json"}, timeout=10).json()
    finally:
        os.killpg(quick_start.pid, signal.SIGTERM)
    htop = "/nix/store/5mz92n6yrn38ypfv7irxbk609p8214rd-htop-3.3.0"
    assert summary["paths"][htop] == ONE_BUILD
    assert summary["counts"][NO_BUILDS] == len(summary["paths"]) - 1 >= 3


# ---------------------------------------------------------------- the second part: a builder

BUILDER_SECTION = "## Quick start: attest your own builds"
EXAMPLE = REPO / "examples" / "hello.nix"


def builder_commands():
    section = (REPO / "README.md").read_text().split(BUILDER_SECTION, 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def as_in_a_test(commands, server, layout, key, token):
    """Only what must change to run here: the server's address, where secrets go, and install-hook's directories."""
    assert "sudo ./install-hook.sh" in commands and "/etc/nix/hash-collection.key" in commands
    install_options = " ".join(layout.options())
    commands = commands.replace("/etc/nix/hash-collection.key", str(key)).replace("/root/hash-collection.token", str(token))
    commands = commands.replace("http://127.0.0.1:8000", server.url).replace("sudo ./install-hook.sh", "./install-hook.sh")
    return re.sub(r"(\./install-hook\.sh [^\n]*)", lambda line: f"{line.group(1)} {install_options}", commands)


def forget_example_build(env):
    """As on a fresh machine: the example is built, not already in the store, so the post-build hook runs."""
    drv_path = subprocess.run(["nix-instantiate", str(EXAMPLE)], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    out_path = subprocess.run(["nix-store", "-q", "--outputs", drv_path], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    (REPO / "result").unlink(missing_ok=True)
    subprocess.run(["nix-store", "--delete", "--ignore-liveness", out_path], env=env, capture_output=True)
    return out_path


def test_quick_start_for_a_builder_ends_in_a_verified_attestation_in_a_report(nix, server, tmp_path):
    from test_install_hook import ORIGINAL_NIX_CONF, Layout
    layout = Layout(tmp_path / "machine")
    layout.root.mkdir(mode=0o755)
    layout.conf_dir.mkdir(mode=0o755)
    layout.nix_conf.write_text(ORIGINAL_NIX_CONF)
    layout.nix_conf.chmod(0o644)
    env = {**layout.nix_env(), "HASH_COLLECTION_DB": str(server.db), "PYTHON": sys.executable}
    out_path = forget_example_build(env)
    script = as_in_a_test(builder_commands(), server, layout, tmp_path / "key", tmp_path / "token")
    try:
        completed = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env,
                                   capture_output=True, text=True, timeout=600)
    finally:
        (REPO / "result").unlink(missing_ok=True)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = requests.get(f"{server.url}/reports/hello", headers={"Accept": "application/json"}, timeout=10).json()
    assert summary["paths"] == {out_path: ONE_BUILD}
    attestations = requests.get(f"{server.url}/attestations/by-output/{basename_of(out_path)}", timeout=10).json()
    assert [attestation["verified"] for attestation in attestations] == [True]
