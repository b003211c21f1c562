"""Shared fixtures: a real server process, real Nix, and a client reachable by the build user."""
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

NIX_CONFIG = "\n".join([
    "experimental-features = nix-command",
    "substituters =",
    "sandbox = false",
])


NIX_FIXTURES = {"nix", "nix_key", "reachable_client"}


def pytest_configure(config):
    config.addinivalue_line("markers", "nix: needs a real Nix store (deselected in the flake's sandboxed check)")
    config.addinivalue_line("markers", "browser: needs headless Chromium")


def pytest_collection_modifyitems(items):
    for item in items:
        if NIX_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nix)
        if "browser" in item.nodeid or "playwright" in getattr(item.module, "__dict__", {}):
            item.add_marker(pytest.mark.browser)


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

    def __init__(self, db, extra_args=()):
        self.db = Path(db)
        self.extra_args = list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.db.with_name(self.db.name + ".server.log")
        self.process = None

    def start(self):
        command = [sys.executable, str(REPO / "web.py"), "--host", "127.0.0.1",
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
    completed = subprocess.run([str(REPO / "create_user"), *args, "--db", str(db)], cwd=REPO,
                               env={**os.environ, "PYTHON": sys.executable},
                               capture_output=True, text=True, check=True)
    words = completed.stdout.split()
    return words[-1] if words else ""


@pytest.fixture
def server(tmp_path):
    process = ServerProcess(tmp_path / "hashes.db").start()
    yield process
    process.stop()


@pytest.fixture
def start_server(tmp_path):
    """Factory for servers with extra arguments; all are stopped afterwards."""
    started = []

    def start(*extra_args, db=None):
        process = ServerProcess(db or tmp_path / f"hashes-{len(started)}.db", extra_args).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def app(tmp_path):
    import web
    return web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def tokens(app):
    """token_of(builder): a token for that builder of the in-process app, made once per builder."""
    made = {}

    def token_of(builder):
        if builder not in made:
            made[builder] = create_user(app.config["DATABASE"], builder)
        return made[builder]
    return token_of


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


# ---------------------------------------------------------------- real Nix

def nix_env(**extra):
    env = {**os.environ, "NIX_CONFIG": NIX_CONFIG}
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def nix():
    if not shutil.which("nix-build"):
        pytest.fail("nix-build is missing: run the tests through ./run-tests.sh, which installs nix-bin")
    return nix_env


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


@pytest.fixture(scope="session")
def reachable_client():
    """A copy of the client that the build user (nixbld1) can run with Debian's Python.

    The diff hook runs as the build user, who cannot enter root's home, where the
    checkout and the default Python may live.
    """
    directory = Path(tempfile.mkdtemp(prefix="hash-collection-client-"))
    directory.chmod(0o755)
    shutil.copy(REPO / "post_build_hook.py", directory / "post_build_hook.py")
    (directory / "post_build_hook.py").chmod(0o755)
    yield directory / "post_build_hook.py"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def nix_key(tmp_path_factory):
    """A real builder key from `nix key generate-secret`, readable by the build user."""
    directory = Path(tempfile.mkdtemp(prefix="hash-collection-key-"))
    directory.chmod(0o755)
    secret = directory / "secret.key"
    secret.write_text(subprocess.run(["nix", "key", "generate-secret", "--key-name", f"builder-{nonce()}"],
                                     env=nix_env(), capture_output=True, text=True, check=True).stdout)
    secret.chmod(0o644)
    public = subprocess.run(["nix", "key", "convert-secret-to-public"], input=secret.read_text(),
                            env=nix_env(), capture_output=True, text=True, check=True).stdout.strip()
    yield {"secret_file": secret, "secret": secret.read_text().strip(), "public": public}
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------- hooks as Nix runs them

HOOK_VARIABLES = ("HASH_COLLECTION_SERVER", "HASH_COLLECTION_TOKEN", "HASH_COLLECTION_TOKEN_FILE",
                  "HASH_COLLECTION_SECRET_KEY", "HASH_COLLECTION_SECRET_KEY_FILE", "HASH_COLLECTION_SPOOL",
                  "HASH_COLLECTION_TIMEOUT")
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


@pytest.fixture
def hooks():
    """Makes hooks in a world-writable directory and checks that no hook run exited non-zero."""
    directory = Path(tempfile.mkdtemp(prefix="hash-collection-hooks-"))
    directory.chmod(0o755)
    made = []

    def make(settings, **kwargs):
        made.append(Hook(directory, settings, **kwargs))
        return made[-1]

    yield make
    try:
        for hook in made:
            assert all(code == 0 for code in hook.exit_codes()), \
                f"a hook run exited non-zero: {hook.exit_codes()}\n{hook.stderr_text()}"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def token_file_settings(settings, readable_dir):
    """The builder's settings with the token in a file the build user can read."""
    token_file = Path(readable_dir) / "token"
    token_file.write_text(settings["HASH_COLLECTION_TOKEN"])
    token_file.chmod(0o644)
    spool = Path(readable_dir) / "build-user-spool"
    return {**{name: value for name, value in settings.items() if name != "HASH_COLLECTION_TOKEN"},
            "HASH_COLLECTION_TOKEN_FILE": token_file, "HASH_COLLECTION_SPOOL": spool}


def hooks_dir_of(reachable_client):
    return Path(reachable_client).parent
