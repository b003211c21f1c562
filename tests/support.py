"""Test support: a real server process, real Nix in its own configuration, hook wrappers and small helpers.

Fixtures live in conftest.py; everything a test imports by name lives here.
"""
import atexit
import contextlib
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NIX_CONFIG = "\n".join([
    "experimental-features = nix-command",
    "substituters =",
    "sandbox = false",
])


def database_dump(path):
    """The database's rows and schema as SQL, once no revision's component ids are pending."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        wait_for_pending_revisions(conn)
        return list(conn.iterdump())


def finished_within(wait, timeout=60.0):
    """Whether wait() returned within timeout: a background thread that died would make it wait forever."""
    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    waiter.join(timeout)
    return not waiter.is_alive()


def wait_for_pending_revisions(conn):
    """Until no revision's component ids are pending: the server may write them after a report's PUT has
    answered (web.PendingRevisions), which is not the next request's doing."""
    wait_until(lambda: not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'report_revisions'").fetchone()
               or not conn.execute("SELECT 1 FROM report_revisions WHERE component_ids = x''").fetchone(),
               what="the revisions' component ids")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition, timeout=15.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


class ServerProcess:
    """`python web.py` on a free loopback port, as a user starts it."""

    def __init__(self, db, extra_args=(), launcher=()):
        self.db = Path(db)
        self.extra_args = list(extra_args)
        self.launcher = list(launcher)  # a command that runs the server's command line given after it
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.db.with_name(self.db.name + ".server.log")
        self.process = None

    def start(self):
        command = [*self.launcher, sys.executable, str(REPO / "web.py"), "--host", "127.0.0.1",
                   "--port", str(self.port), "--db", str(self.db), *self.extra_args]
        # A file, not a pipe: nobody reads a pipe during the test, and a full one
        # would block the server the next time it logs.
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
        wait_until(self.is_healthy, what=f"server on {self.url}")
        return self

    def is_healthy(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"server exited: {self.log.read_text(errors='replace')}")
        try:
            return requests.get(self.url + "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self):
        if self.process:
            stop_process(self.process)

    def kill9(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def restart(self):
        self.stop()
        return self.start()

    def create_user(self, name, *args):
        """Run ./create_user against this server's database; return the token (last word of stdout)."""
        return create_user(self.db, name, *args)

    def pid(self):
        return self.process.pid


def stop_process(process):
    """Terminate, and kill if it will not go within 10 s."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def create_user(db, *args):
    """The last word ./create_user prints, from the command's own code (create_user.main) run in this process:
    starting an interpreter for each builder took most of a second. test_create_user.py runs the command."""
    from attestation_samples import create_user_in_process
    return create_user_in_process(db, *args)


def create_user_command(db, *args):
    """The last word ./create_user prints, run as users run it."""
    completed = subprocess.run([str(REPO / "create_user"), *args, "--db", str(db)], cwd=REPO,
                               env={**os.environ, "PYTHON": sys.executable},
                               capture_output=True, text=True, check=True)
    words = completed.stdout.split()
    return words[-1] if words else ""


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- real Nix

def nix_env(**extra):
    """The environment for a Nix command in a test: Nix reads only the tests' own configuration.

    NIX_CONF_DIR and NIX_USER_CONF_FILES point at a private nix.conf, so a post-build hook,
    key or server configured in the machine's /etc/nix or the user's ~/.config/nix never fires.
    """
    env = {name: value for name, value in os.environ.items() if name not in ISOLATED_NIX_VARIABLES}
    conf_dir = private_nix_conf_dir()
    env.update(NIX_CONF_DIR=str(conf_dir), NIX_USER_CONF_FILES=str(conf_dir / "nix.conf"))
    env.update(extra)
    return env


# Variables through which the machine's own Nix set-up could reach a test.
ISOLATED_NIX_VARIABLES = ("NIX_CONFIG", "NIX_CONF_DIR", "NIX_USER_CONF_FILES", "NIX_REMOTE")
PRIVATE_NIX_CONF_DIR = []


def private_nix_conf_dir():
    """A nix.conf of the tests' own, readable by the build users (the diff hook runs Nix as one)."""
    if not PRIVATE_NIX_CONF_DIR:
        directory = Path(tempfile.mkdtemp(prefix="hash-collection-nix-conf-"))
        directory.chmod(0o755)
        (directory / "nix.conf").write_text(NIX_CONFIG + "\n")
        (directory / "nix.conf").chmod(0o644)
        PRIVATE_NIX_CONF_DIR.append(directory)
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return PRIVATE_NIX_CONF_DIR[0]


def nonce():
    return uuid.uuid4().hex[:12]


def write_derivation(directory, name, script, outputs=("out",), extra=""):
    """A /bin/sh derivation with a unique nonce, so every test run really builds it."""
    outputs_nix = " ".join(f'"{output}"' for output in outputs)
    path = Path(directory) / f"{name}.nix"
    path.write_text(
        f'derivation {{ name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh";\n'
        f'  PATH = "/usr/bin:/bin"; nonce = "{nonce()}"; outputs = [ {outputs_nix} ];\n'
        f'  args = [ "-c" {nix_string(script)} ]; {extra} }}\n')
    return path


def nix_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${") + '"'


# ---------------------------------------------------------------- hooks as Nix runs them

HOOK_VARIABLES = ("HASH_COLLECTION_SERVER", "HASH_COLLECTION_TOKEN", "HASH_COLLECTION_TOKEN_FILE",
                  "HASH_COLLECTION_SECRET_KEY", "HASH_COLLECTION_SECRET_KEY_FILE", "HASH_COLLECTION_SPOOL",
                  "HASH_COLLECTION_TIMEOUT", "HASH_COLLECTION_BUILD_USER_SPOOL", "HASH_COLLECTION_BUILD_USERS_GROUP",
                  "HASH_COLLECTION_DIFF_TIMEOUT", "HASH_COLLECTION_DIFF_MEMORY_MIB",
                  "HASH_COLLECTION_DIFF_OUTPUT_MIB", "HASH_COLLECTION_DIFFOSCOPE")
CLIENT = REPO / "post_build_hook.py"
DEBIAN_PYTHON = "/usr/bin/python3"


class Hook:
    """A wrapper script for Nix to run; it records every exit code and all stderr of the client."""

    def __init__(self, directory, settings, python=sys.executable, client=CLIENT, subcommand=()):
        self.directory = Path(tempfile.mkdtemp(prefix="hook-", dir=directory))
        # The diff hook runs as the build user, which must write its logs here.
        self.directory.chmod(0o777)
        self.script = self.directory / "hook.sh"
        self.codes = self.directory / "codes"
        self.stderr = self.directory / "stderr"
        exports = [f"export {name}={shlex.quote(str(value))}" for name, value in settings.items()]
        command = " ".join(shlex.quote(str(word)) for word in (python, client, *subcommand))
        self.script.write_text("\n".join([
            "#!/bin/sh",
            "unset " + " ".join(HOOK_VARIABLES),
            *exports,
            f'{command} "$@" 2>>{shlex.quote(str(self.stderr))}',
            "code=$?",
            f"echo \"$code\" >> {shlex.quote(str(self.codes))}",
            'exit "$code"',
            ""]))
        self.script.chmod(0o755)

    def exit_codes(self):
        return [int(line) for line in self.codes.read_text().split()] if self.codes.exists() else []

    def stderr_text(self):
        return self.stderr.read_text() if self.stderr.exists() else ""

    def options(self):
        return ["--option", "post-build-hook", str(self.script)]


def token_file_settings(settings, readable_dir):
    """The builder's settings with the token in a file the build user can read."""
    token_file = Path(readable_dir) / "token"
    token_file.write_text(settings["HASH_COLLECTION_TOKEN"])
    token_file.chmod(0o644)
    spool = build_user_spool(Path(readable_dir) / "build-user-spool")
    return {**{name: value for name, value in settings.items() if name != "HASH_COLLECTION_TOKEN"},
            "HASH_COLLECTION_TOKEN_FILE": token_file, "HASH_COLLECTION_SPOOL": spool}


def build_user_spool(path):
    """The diff hook's spool as module.nix and install-hook.sh make it: root:nixbld, 2770."""
    import grp
    path.mkdir(exist_ok=True)
    os.chown(path, 0, grp.getgrnam("nixbld").gr_gid)
    path.chmod(0o2770)
    return path


def hooks_dir_of(reachable_client):
    return Path(reachable_client).parent
