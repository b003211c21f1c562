"""install-hook.sh run as a user runs it, against temporary --conf-dir, --prefix and --state-dir,
with real Nix and a real server. It never touches the machine's /etc/nix."""
import contextlib
import grp
import http.server
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
import requests

from support import NIX_CONFIG, REPO, nix_env, write_derivation

INSTALL_HOOK = REPO / "install-hook.sh"
NONDETERMINISTIC = "read x < /proc/sys/kernel/random/uuid; echo $x > $out"
ORIGINAL_NIX_CONF = NIX_CONFIG + "\n# the machine's own settings\nkeep-outputs = true\n"
BUILD_USERS_GROUP = "nixbld"


class Layout:
    """A temporary conf dir, prefix and state dir, reachable by the build users like /etc and /opt are."""

    def __init__(self, root):
        self.root = root
        self.conf_dir = root / "conf"
        self.nix_conf = self.conf_dir / "nix.conf"
        self.prefix = root / "opt" / "hash-collection"
        self.state_dir = root / "var" / "hash-collection"
        self.secrets = root / "secrets"

    def options(self):
        return ["--conf-dir", str(self.conf_dir), "--prefix", str(self.prefix), "--state-dir", str(self.state_dir)]

    def nix_env(self):
        return nix_env(NIX_CONF_DIR=str(self.conf_dir), NIX_USER_CONF_FILES=str(self.nix_conf))


@pytest.fixture
def layout():
    root = Path(tempfile.mkdtemp(prefix="hash-collection-install-"))
    root.chmod(0o755)
    made = Layout(root)
    made.conf_dir.mkdir(mode=0o755)
    made.nix_conf.write_text(ORIGINAL_NIX_CONF)
    made.nix_conf.chmod(0o644)
    # Root-only, like a key in /etc/nix: the diff hook can only use the installer's copies.
    made.secrets.mkdir(mode=0o700)
    yield made
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def credentials(server, nix_key, layout):
    """--server, --token-file and --key-file of a builder whose public key the server knows."""
    token_file = layout.secrets / "token"
    token_file.write_text(server.create_user("alice", "--public-key", nix_key["public"]) + "\n")
    key_file = layout.secrets / "key"
    key_file.write_text(nix_key["secret"] + "\n")
    for secret in (token_file, key_file):
        secret.chmod(0o600)
    return ["--server", server.url, "--token-file", str(token_file), "--key-file", str(key_file)]


def install_hook(layout, *args, stdin=subprocess.DEVNULL):
    return subprocess.run([str(INSTALL_HOOK), *args], env=layout.nix_env(), stdin=stdin,
                          capture_output=True, text=True, timeout=120)


def installed(layout, credentials, *extra):
    completed = install_hook(layout, *credentials, *layout.options(), "--yes", "--no-check", *extra)
    assert completed.returncode == 0, completed.stderr
    return completed


def nix_build(layout, nix_file, *options):
    return subprocess.run(["nix-build", "--no-out-link", str(nix_file), *options], env=layout.nix_env(),
                          capture_output=True, text=True, timeout=120)


def attestations_of(server, out_path):
    return requests.get(f"{server.url}/attestations/by-output/{Path(out_path).name}", timeout=10).json()


def tree(*roots):
    """Every file and directory under roots: content, mode and owner, to compare two states."""
    found = {}
    for root in roots:
        for path in [root, *sorted(root.rglob("*"))]:
            status = path.lstat()
            content = path.read_bytes() if path.is_file() else None
            found[path] = (content, status.st_mode, status.st_uid, status.st_gid)
    return found


def launcher_settings(launcher):
    """The variables a launcher exports, as the shell would read them."""
    settings = {}
    for line in launcher.read_text().splitlines():
        if line.startswith("export "):
            name, value = line[len("export "):].split("=", 1)
            settings[name] = shlex.split(value)[0]
    return settings


# ---------------------------------------------------------------- end to end

def test_install_checks_itself_by_finding_a_verified_attestation(layout, credentials):
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 0, completed.stderr
    assert "ok: the server has a signed, verified attestation of /nix/store/" in completed.stdout
    assert "hash-collection-install-check" in completed.stdout


def test_builds_and_check_rebuilds_reach_the_server_signed_from_both_hooks(layout, credentials, server, tmp_path):
    installed(layout, credentials)
    nix_file = write_derivation(tmp_path, "install-hook-nondeterministic", NONDETERMINISTIC)
    built = nix_build(layout, nix_file)
    assert built.returncode == 0, built.stderr
    out_path = built.stdout.strip()
    checked = nix_build(layout, nix_file, "--check")
    assert "may not be deterministic" in checked.stderr
    attestations = attestations_of(server, out_path)
    # The second hash comes only from the diff hook, which Nix runs as a build user.
    assert len({attestation["output_hash"] for attestation in attestations}) == 2, checked.stderr
    assert all(attestation["verified"] and attestation["builder"] == "alice" for attestation in attestations)


def test_check_fails_clearly_when_the_server_refuses_the_token(layout, credentials):
    (layout.secrets / "token").write_text("not-a-token\n")
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert "the hook is installed, but the server has no attestation of /nix/store/" in completed.stderr


def test_check_does_not_follow_a_redirect_to_a_page_that_claims_the_attestation(layout, credentials):
    with redirecting_server() as url:
        credentials = [url if value.startswith("http://") else value for value in credentials]
        completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert f"cannot read {url}/attestations/by-output/" in completed.stderr
    assert "302" in completed.stderr
    assert "ok:" not in completed.stdout


@contextlib.contextmanager
def redirecting_server():
    """A server that redirects every request to a page claiming a verified attestation of anything."""
    class Redirecting(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the name http.server calls
            if self.path == "/landing":
                self.answer(200, b'[{"verified": true}]', "Content-Type", "application/json")
            else:
                self.answer(302, b"", "Location", "/landing")

        do_POST = do_PUT = do_GET

        def answer(self, status, body, header, value):
            self.send_response(status)
            self.send_header(header, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirecting)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------- what it installs

def test_files_have_the_owners_and_modes_root_and_the_build_users_need(layout, credentials):
    installed(layout, credentials)
    group = grp.getgrnam(BUILD_USERS_GROUP).gr_gid
    expected = {
        layout.prefix / "post_build_hook.py": (0o755, 0),
        layout.prefix / "hook-wrapper.sh": (0o755, 0),
        layout.prefix / "run-client.py": (0o644, 0),
        layout.prefix / "__pycache__": (0o755, 0),
        layout.prefix / "post-build-hook": (0o755, 0),
        layout.prefix / "diff-hook": (0o755, 0),
        layout.state_dir / "credentials": (0o750, group),
        layout.state_dir / "credentials" / "token": (0o640, group),
        layout.state_dir / "credentials" / "secret-key": (0o640, group),
        layout.state_dir / "spool": (0o700, 0),
        layout.state_dir / "build-user-spool": (0o2770, group),
    }
    for path, (mode, gid) in expected.items():
        status = path.stat()
        assert (stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid) == (mode, 0, gid), path
    assert (layout.prefix / "post_build_hook.py").read_bytes() == (REPO / "post_build_hook.py").read_bytes()
    assert (layout.prefix / "hook-wrapper.sh").read_bytes() == (REPO / "nix" / "hook-wrapper.sh").read_bytes()
    assert (layout.prefix / "run-client.py").read_bytes() == (REPO / "nix" / "run-client.py").read_bytes()
    # The client's bytecode, which the root hook runs: nobody but root may write it.
    (bytecode,) = (layout.prefix / "__pycache__").iterdir()
    assert bytecode.name.startswith("post_build_hook.") and bytecode.suffix == ".pyc"
    assert (stat.S_IMODE(bytecode.stat().st_mode), bytecode.stat().st_uid) == (0o644, 0)


def test_root_and_the_build_users_each_get_their_own_spool(layout, credentials):
    installed(layout, credentials)
    post_build = launcher_settings(layout.prefix / "post-build-hook")
    diff = launcher_settings(layout.prefix / "diff-hook")
    assert post_build["HASH_COLLECTION_SPOOL"] == str(layout.state_dir / "spool")
    assert post_build["HASH_COLLECTION_BUILD_USER_SPOOL"] == str(layout.state_dir / "build-user-spool")
    assert post_build["HASH_COLLECTION_BUILD_USERS_GROUP"] == BUILD_USERS_GROUP
    assert diff["HASH_COLLECTION_SPOOL"] == str(layout.state_dir / "build-user-spool")
    assert "HASH_COLLECTION_BUILD_USER_SPOOL" not in diff
    assert (layout.prefix / "diff-hook").read_text().rstrip().endswith('hook-wrapper.sh\' diff-hook "$@"')


def test_nix_conf_gains_the_hooks_and_run_diff_hook(layout, credentials):
    installed(layout, credentials)
    added = layout.nix_conf.read_text()[len(ORIGINAL_NIX_CONF):].splitlines()
    assert [line for line in added if not line.startswith("#")] == [
        f"post-build-hook = {layout.prefix}/post-build-hook",
        f"diff-hook = {layout.prefix}/diff-hook",
        "run-diff-hook = true"]


# ---------------------------------------------------------------- running it again, and undoing it

def test_installing_twice_changes_nothing(layout, credentials):
    installed(layout, credentials)
    before = tree(layout.conf_dir, layout.prefix, layout.state_dir)
    again = installed(layout, credentials)
    assert "already has the hook settings" in again.stdout
    assert tree(layout.conf_dir, layout.prefix, layout.state_dir) == before


def test_installing_with_another_prefix_replaces_its_own_lines(layout, credentials):
    installed(layout, credentials)
    other_prefix = layout.root / "other-prefix"
    installed(layout, credentials, "--prefix", str(other_prefix))
    text = layout.nix_conf.read_text()
    assert text.startswith(ORIGINAL_NIX_CONF)
    assert text.count("post-build-hook =") == 1
    assert f"post-build-hook = {other_prefix}/post-build-hook\n" in text


def test_uninstall_restores_nix_conf_byte_for_byte_and_removes_what_it_installed(layout, credentials):
    original = layout.nix_conf.read_bytes()
    installed(layout, credentials)
    completed = install_hook(layout, "--uninstall", *layout.options())
    assert completed.returncode == 0, completed.stderr
    assert layout.nix_conf.read_bytes() == original
    assert not layout.prefix.exists()
    assert not layout.state_dir.exists()


def test_uninstall_removes_only_the_clients_bytecode(layout, credentials):
    installed(layout, credentials)
    other = layout.prefix / "__pycache__" / "something_else.cpython-311.pyc"
    other.write_bytes(b"not ours")
    completed = install_hook(layout, "--uninstall", *layout.options())
    assert completed.returncode == 0, completed.stderr
    assert [path.name for path in (layout.prefix / "__pycache__").iterdir()] == [other.name]


def test_uninstall_keeps_a_spool_holding_submissions_and_says_so(layout, credentials):
    installed(layout, credentials)
    waiting = layout.state_dir / "build-user-spool" / "waiting.json"
    waiting.write_text("{}")
    completed = install_hook(layout, "--uninstall", *layout.options())
    assert completed.returncode == 0, completed.stderr
    assert waiting.exists()
    assert f"kept {layout.state_dir / 'build-user-spool'}" in completed.stdout
    assert not (layout.state_dir / "spool").exists()
    assert not (layout.state_dir / "credentials").exists()


def test_uninstall_keeps_only_the_log_indexes_audit_needs_and_counts_no_submission(layout, credentials):
    """Reviewed: the hook's own log/log-indexes was counted as an undelivered submission, and the advice to delete
    the directory would have thrown away what `audit` checks."""
    installed(layout, credentials)
    spool = layout.state_dir / "spool"
    (spool / "log").mkdir(parents=True)
    (spool / "log" / "log-indexes").write_text("0 /nix/store/x sha256:y 1\n")
    (spool / "tmp").mkdir()
    completed = install_hook(layout, "--uninstall", *layout.options())
    assert completed.returncode == 0, completed.stderr
    assert "submission" not in completed.stdout and f"kept {spool / 'log'}" in completed.stdout
    assert [path.name for path in spool.iterdir()] == ["log"]


def test_uninstall_keeps_what_a_witness_remembers_of_the_log(layout, credentials):
    installed(layout, credentials)
    remembered = layout.state_dir / "spool" / "log" / "witness-checkpoint"
    remembered.parent.mkdir(parents=True)
    remembered.write_text("hashes.example.org\n5\nroot\n")
    completed = install_hook(layout, "--uninstall", *layout.options())
    assert completed.returncode == 0, completed.stderr
    assert remembered.exists() and "witness" in completed.stdout


# ---------------------------------------------------------------- refusals

def test_refuses_to_replace_a_post_build_hook_it_did_not_write(layout, credentials):
    layout.nix_conf.write_text(ORIGINAL_NIX_CONF + "post-build-hook = /usr/local/bin/upload-to-cache\n")
    before = layout.nix_conf.read_bytes()
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert "refusing to change" in completed.stderr
    assert "post-build-hook = /usr/local/bin/upload-to-cache" in completed.stderr
    assert layout.nix_conf.read_bytes() == before
    assert not layout.prefix.exists() and not layout.state_dir.exists()


def test_refuses_a_spool_others_could_write_before(layout, credentials):
    spool = layout.state_dir / "spool"
    spool.mkdir(parents=True)
    os.chown(spool, 0, grp.getgrnam(BUILD_USERS_GROUP).gr_gid)
    spool.chmod(0o2770)
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert f"{spool} already exists, owned by uid 0 with mode 2770" in completed.stderr
    assert layout.nix_conf.read_text() == ORIGINAL_NIX_CONF
    assert stat.S_IMODE(spool.stat().st_mode) == 0o2770


def test_refuses_a_bytecode_directory_others_could_write_before(layout, credentials):
    """Root's hook runs what is there (nix/run-client.py): a bytecode file planted by anyone else must not stay."""
    pycache = layout.prefix / "__pycache__"
    pycache.mkdir(parents=True)
    layout.prefix.chmod(0o755)
    pycache.chmod(0o777)
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert f"{pycache} already exists, owned by uid 0 with mode 777" in completed.stderr
    assert layout.nix_conf.read_text() == ORIGINAL_NIX_CONF


def test_reinstalling_compiles_the_client_afresh(layout, credentials):
    """Bytecode a Python before an upgrade left, or anyone's, does not stay beside the new."""
    installed(layout, credentials)
    stale = layout.prefix / "__pycache__" / "post_build_hook.cpython-39.pyc"
    stale.write_bytes(b"stale")
    installed(layout, credentials)
    (compiled,) = (layout.prefix / "__pycache__").iterdir()
    assert compiled.name.startswith("post_build_hook.cpython-") and compiled.name != stale.name


def test_without_yes_or_a_terminal_it_shows_the_change_and_changes_nothing(layout, credentials):
    completed = install_hook(layout, *credentials, *layout.options())
    assert completed.returncode == 1
    assert f"+post-build-hook = {layout.prefix}/post-build-hook" in completed.stdout
    assert "--yes" in completed.stderr
    assert layout.nix_conf.read_text() == ORIGINAL_NIX_CONF
    assert not layout.prefix.exists()


def test_empty_key_file_is_refused_naming_it(layout, credentials):
    key_file = layout.secrets / "key"
    key_file.write_text("")
    completed = install_hook(layout, *credentials, *layout.options(), "--yes")
    assert completed.returncode == 1
    assert f"the key file {key_file} is empty" in completed.stderr
    assert not layout.prefix.exists()


@pytest.mark.parametrize("args", [
    [],
    ["--bogus"],
    ["--server"],
    ["--server", "ftp://example.org", "--token-file", "/token"],
    ["--server", "https://example.org"],
    ["--server", "https://example.org", "--token-file", "/token", "--prefix", "relative/path"],
], ids=["nothing", "unknown", "missing-value", "not-http", "no-token", "relative-prefix"])
def test_wrong_arguments_print_usage(layout, args):
    completed = install_hook(layout, *args)
    assert completed.returncode == 2
    assert "usage:" in completed.stderr


def test_help_prints_usage():
    completed = subprocess.run([str(INSTALL_HOOK), "--help"], capture_output=True, text=True)
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage:")


def test_install_hook_passes_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    subprocess.run(["shellcheck", str(INSTALL_HOOK)], check=True)


def test_machine_nix_conf_is_not_touched(layout, credentials):
    machine_conf = Path("/etc/nix/nix.conf")
    before = machine_conf.read_bytes() if machine_conf.exists() else None
    installed(layout, credentials)
    install_hook(layout, "--uninstall", *layout.options())
    assert (machine_conf.read_bytes() if machine_conf.exists() else None) == before


# ---------------------------------------------------------------- the commands docs/builder.md gives, as written

BUILDER_DOC = REPO / "docs" / "builder.md"
DOCUMENTED_KEY_FILE = "/etc/nix/hash-collection.key"


def documented_commands(heading):
    """The first sh block under the heading in docs/builder.md."""
    section = BUILDER_DOC.read_text().split(f"\n## {heading}\n", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def stock_nix_env(directory):
    """Nix as Debian ships it: no experimental features turned on."""
    conf_dir = directory / "stock-nix-conf"
    conf_dir.mkdir()
    (conf_dir / "nix.conf").write_text("")
    return nix_env(NIX_CONF_DIR=str(conf_dir), NIX_USER_CONF_FILES=str(conf_dir / "nix.conf"))


def run_key_commands(tmp_path, env):
    script = documented_commands("Signing key")
    assert DOCUMENTED_KEY_FILE in script, "the key commands no longer write the key this test expects"
    # sh, not bash -e: as a user pastes them into a shell.
    return subprocess.run(["sh", "-c", script.replace(DOCUMENTED_KEY_FILE, str(tmp_path / "hash-collection.key"))],
                          env=env, capture_output=True, text=True, timeout=60)


def test_documented_key_commands_make_a_root_only_key_on_stock_nix(tmp_path):
    env = stock_nix_env(tmp_path)
    completed = run_key_commands(tmp_path, env)
    assert completed.returncode == 0, completed.stderr
    key_file = tmp_path / "hash-collection.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    public = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "key", "convert-secret-to-public"],
                            stdin=key_file.open(), env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert completed.stdout.strip().splitlines()[-1] == public
    assert public.startswith("builder-alice-1:")


def test_documented_key_commands_leave_no_empty_key_when_nix_fails(tmp_path):
    failing_nix = tmp_path / "bin" / "nix"
    failing_nix.parent.mkdir()
    failing_nix.write_text("#!/bin/sh\necho 'error: experimental Nix feature is disabled' >&2\nexit 1\n")
    failing_nix.chmod(0o755)
    env = {**stock_nix_env(tmp_path), "PATH": f"{failing_nix.parent}:{os.environ['PATH']}"}
    completed = run_key_commands(tmp_path, env)
    assert completed.returncode != 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["bin", "stock-nix-conf"]


def test_documented_install_command_installs_and_finds_its_attestation(layout, credentials, server):
    command = documented_commands("Installing the hook on a non-NixOS builder").strip()
    words = shlex.split(command)
    assert words[:2] == ["sudo", "./install-hook.sh"], command
    documented_options = words[2::2]
    ours = dict(zip(credentials[::2], credentials[1::2]))
    assert set(documented_options) <= set(ours), f"this test has no value for an option of {command}"
    # Only the values change: the server's URL, the test's token and key.
    arguments = [word for option in documented_options for word in (option, ours[option])]
    completed = install_hook(layout, *arguments, *layout.options(), "--yes")
    assert completed.returncode == 0, completed.stderr
    assert "signed, verified attestation" in completed.stdout

