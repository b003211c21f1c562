"""Fixtures: servers, an in-process app, real Nix, a builder key and hooks. Helpers are in support.py."""
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from attestation_samples import create_user_in_process
from support import REPO, Hook, ServerProcess, finished_within, nix_env, nonce


NIX_FIXTURES = {"nix", "nix_key", "reachable_client"}


def pytest_configure(config):
    config.addinivalue_line("markers", "nix: needs a real Nix store (deselected in the flake's sandboxed check)")
    config.addinivalue_line("markers", "browser: needs headless Chromium")


def pytest_collection_modifyitems(items):
    for item in items:
        if NIX_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.nix)
        if "browser" in item.nodeid or "chromium" in item.nodeid or "playwright" in getattr(item.module, "__dict__", {}):
            item.add_marker(pytest.mark.browser)


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
    app = web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True})
    yield app
    # Replaced reports are removed after the PUT has answered, and some revisions get their component ids then.
    for background in (app.extensions["report_removals"], app.extensions["pending_revisions"]):
        assert finished_within(background.wait), f"{type(background).__name__} did not finish its work"


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def tokens(app):
    """token_of(builder, *create_user options): a token for that builder of the in-process app, made once per builder."""
    made = {}

    def token_of(builder, *options):
        if builder not in made:
            made[builder] = create_user_in_process(app.config["DATABASE"], builder, *options)
        return made[builder]
    return token_of


@pytest.fixture(scope="session")
def nix():
    if not shutil.which("nix-build"):
        pytest.fail("nix-build is missing: run the tests through ./run-tests.sh, which installs nix-bin")
    return nix_env


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


@pytest.fixture
def shared_directory():
    """A directory under /tmp that other users (build users, nobody) can reach; pytest's tmp_path is root-only."""
    directory = Path(tempfile.mkdtemp(prefix="hash-collection-shared-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)
