"""Builds the way NixOS runs them: a user's nix-build talks to nix-daemon, which runs
the post-build hook as root, with its own environment, and the diff hook as a build user.

Each test starts Debian's nix-daemon with a configuration of its own (NIX_CONF_DIR, and
NIX_DAEMON_SOCKET_PATH in a temporary directory, so no other daemon is touched) and stops
it by its process id. What module.nix installs is used as it writes it: the hook scripts
and the secrets copy come from the structural check of module.nix, the package is laid
out by nix/package.nix's own install phase, and the spools are made from the module's
tmpfiles rules. The daemon runs in a private mount namespace where /run and /var/lib are
temporary directories, so the module's paths (/run/hash-collection, /var/lib/hash-collection)
are used unchanged and the machine's own stay untouched. The user is `nobody`.

What this cannot show: NixOS's sandbox (Debian's Nix runs with sandbox = false here),
systemd running the units, and sysusers or userborn creating the build users.
"""
import json
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import requests

from module_layout import evaluate_module, in_private_mounts, lay_out_package, module_scripts, write_shell_script
from support import DEBIAN_PYTHON, nix_env, stop_process, wait_until, write_derivation

USER = "nobody"
BUILDER = "daemon-builder"
# Private mounts of the daemon: the module's paths under /run and /var/lib land in these.
BINDS = {"/run": "run", "/var/lib": "var-lib"}
MACHINE_SETTINGS = {"experimental-features": "nix-command", "substituters": "", "sandbox": "false",
                    "build-users-group": "nixbld"}


class BuilderMachine:
    """A temporary directory laid out as module.nix lays out a builder, and its nix-daemon."""

    def __init__(self, root, server_url, nix_key, token):
        self.root = root
        self.binds = {target: root / name for target, name in BINDS.items()}
        self.socket = root / "daemon-socket"
        self.daemon = None
        package = lay_out_package(self.directory("package"), DEBIAN_PYTHON)
        secrets = self.directory("secrets", 0o700)
        (secrets / "token").write_text(token + "\n")
        shutil.copy(nix_key["secret_file"], secrets / "secret-key")
        for secret in secrets.iterdir():
            secret.chmod(0o600)
        self.evaluated = evaluate_module(module_configuration(server_url, secrets, package))
        assert self.evaluated["failedAssertions"] == []
        self.scripts = {name: write_shell_script(self.directory("hooks"), name, text)
                        for name, text in module_scripts(self.evaluated).items()}
        for target in self.binds.values():
            target.mkdir(mode=0o755)
        self.apply_tmpfiles_rules()

    def directory(self, name, mode=0o755):
        path = self.root / name
        path.mkdir(exist_ok=True)
        path.chmod(mode)
        return path

    def local(self, path):
        """Where a path of the daemon's mount namespace lies in this machine's directory."""
        for target, source in self.binds.items():
            if path.startswith(target + "/"):
                return source / path[len(target) + 1:]
        raise ValueError(f"{path} is outside the private mounts {list(self.binds)}")

    def apply_tmpfiles_rules(self):
        for rule in self.evaluated["config"]["systemd"]["tmpfiles"]["rules"]:
            kind, path, mode, user, group, *_ = rule.split()
            assert kind == "d", rule
            directory = self.local(path)
            directory.mkdir(parents=True)
            shutil.chown(directory, user, group)
            directory.chmod(int(mode, 8))

    def spool(self, option):
        return self.local(self.evaluated["values"]["hash-collection"][option])

    def write_nix_conf(self):
        settings = {**MACHINE_SETTINGS}
        for name, value in self.evaluated["config"]["nix"]["settings"].items():
            if isinstance(value, dict):
                settings[name] = str(self.scripts[name])
            else:
                settings[name] = json.dumps(value)
        conf = self.directory("nix-conf")
        (conf / "nix.conf").write_text("".join(f"{name} = {value}\n" for name, value in settings.items()))
        return conf

    def start_daemon(self):
        """nix-daemon after the secrets copy, as systemd orders them, in the private mounts."""
        conf = self.write_nix_conf()
        secrets_copy = self.evaluated["config"]["systemd"]["services"]["hash-collection-secrets"]["script"]
        command = ["bash", "-c", 'bash -c "$1" && exec nix-daemon', "bash", secrets_copy]
        # Only what systemd would give it: no HASH_COLLECTION_* and no user's settings.
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "NIX_CONF_DIR": str(conf),
               "NIX_USER_CONF_FILES": str(conf / "nix.conf"), "NIX_DAEMON_SOCKET_PATH": str(self.socket)}
        with open(self.root / "daemon.log", "ab") as log:
            self.daemon = subprocess.Popen(in_private_mounts(self.binds, command), env=env,
                                           stdout=log, stderr=log)
        wait_until(self.daemon_is_listening, what="nix-daemon's socket")

    def daemon_is_listening(self):
        if self.daemon.poll() is not None:
            raise RuntimeError(f"nix-daemon exited: {(self.root / 'daemon.log').read_text(errors='replace')}")
        return self.socket.exists()

    def stop_daemon(self):
        if self.daemon:
            stop_process(self.daemon)

    def as_root(self, script_name):
        """One of the module's scripts run by root, as systemd would run the flush service."""
        return subprocess.run(in_private_mounts(self.binds, [str(self.scripts[script_name])]),
                              env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, capture_output=True, text=True,
                              timeout=120)

    def as_user(self, *command):
        """A Nix command of the unprivileged user, through the daemon."""
        home = self.directory("home")
        shutil.chown(home, USER)
        env = nix_env(PATH="/usr/bin:/bin", HOME=str(home), NIX_REMOTE="daemon",
                      NIX_DAEMON_SOCKET_PATH=str(self.socket),
                      # The user's own settings must not reach the hooks, which run in the daemon.
                      HASH_COLLECTION_SERVER="http://127.0.0.1:9", HASH_COLLECTION_TOKEN="not-the-token")
        return subprocess.run(command, user=USER, group=pwd.getpwnam(USER).pw_gid, extra_groups=[], env=env,
                              cwd=self.root, capture_output=True, text=True, timeout=300)

    def daemon_log(self):
        return (self.root / "daemon.log").read_text(errors="replace")


def module_configuration(server_url, secrets, package):
    return f"""services.hash-collection = {{
      enable = true;
      collection-url = "{server_url}";
      tokenFile = "{secrets / 'token'}";
      secretKeyFile = "{secrets / 'secret-key'}";
      package = {{ type = "derivation"; name = "nix-hash-collection"; outPath = "{package}"; }};
    }};"""


@pytest.fixture
def machine(nix, server, nix_key):
    token = server.create_user(BUILDER, "--public-key", nix_key["public"])
    root = Path(tempfile.mkdtemp(prefix="hash-collection-daemon-"))
    root.chmod(0o755)
    machine = None
    try:
        machine = BuilderMachine(root, server.url, nix_key, token)
        machine.start_daemon()
        yield machine
    finally:
        if machine:
            machine.stop_daemon()
        shutil.rmtree(root, ignore_errors=True)


def user_derivation(machine, name, script):
    """A derivation file the user can read, instantiated by the user through the daemon."""
    derivation = write_derivation(machine.directory("derivations"), name, script)
    derivation.chmod(0o644)
    completed = machine.as_user("nix-instantiate", str(derivation))
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def attestations_of(server, drv_path):
    drv_ident = drv_path[len("/nix/store/"):-len(".drv")]
    response = requests.get(f"{server.url}/derivations/{drv_ident}", params={"full": "true"}, timeout=5)
    response.raise_for_status()
    return response.json()


def spooled(directory):
    """The submissions waiting in a spool: its regular files (work in progress lives in subdirectories)."""
    return sorted(path.name for path in directory.iterdir() if path.is_file())


def test_daemon_build_by_a_user_delivers_a_signed_verified_attestation(server, machine):
    drv_path = user_derivation(machine, "daemon-build", "echo built through the daemon > $out")
    built = machine.as_user("nix-build", "--no-out-link", drv_path)
    assert built.returncode == 0, built.stderr
    attestations = attestations_of(server, drv_path)
    assert [(a["builder"], a["output_path"], a["verified"]) for a in attestations] == [
        (BUILDER, built.stdout.strip(), True)], machine.daemon_log()
    assert spooled(machine.spool("spoolDir")) == []


def test_daemon_check_rebuild_reports_the_differing_hash_from_the_diff_hook(server, machine):
    drv_path = user_derivation(machine, "daemon-unstable", "read x < /proc/sys/kernel/random/uuid; echo $x > $out")
    built = machine.as_user("nix-build", "--no-out-link", drv_path)
    assert built.returncode == 0, built.stderr
    checked = machine.as_user("nix-build", "--no-out-link", "--check", drv_path)
    assert "may not be deterministic" in checked.stderr
    attestations = attestations_of(server, drv_path)
    assert len({a["output_hash"] for a in attestations}) == 2, machine.daemon_log()
    assert all(a["verified"] and a["builder"] == BUILDER for a in attestations)
    assert spooled(machine.spool("buildUserSpoolDir")) == []


def test_spools_are_laid_out_for_root_and_for_the_build_users(machine):
    root_spool, build_user_spool = machine.spool("spoolDir"), machine.spool("buildUserSpoolDir")
    assert (root_spool.owner(), root_spool.group(), root_spool.stat().st_mode & 0o7777) == ("root", "root", 0o700)
    assert (build_user_spool.owner(), build_user_spool.group(), build_user_spool.stat().st_mode & 0o7777) == (
        "root", "nixbld", 0o2770)
    copies = machine.local("/run/hash-collection")
    assert {(path.name, path.group(), path.stat().st_mode & 0o777) for path in copies.iterdir()} == {
        ("token", "nixbld", 0o640), ("secret-key", "nixbld", 0o640)}


def test_what_the_post_build_hook_spools_root_flushes_later(server, machine):
    drv_path = user_derivation(machine, "daemon-spooled", "echo spooled > $out")
    server.stop()
    built = machine.as_user("nix-build", "--no-out-link", drv_path)
    assert built.returncode == 0, built.stderr  # the hook never stops a build
    assert len(spooled(machine.spool("spoolDir"))) == 1, machine.daemon_log()
    server.start()
    flushed = machine.as_root("flush")
    assert flushed.returncode == 0, flushed.stderr
    assert [a["verified"] for a in attestations_of(server, drv_path)] == [True]
    assert spooled(machine.spool("spoolDir")) == []


def test_what_the_diff_hook_spools_roots_flush_delivers(server, machine):
    drv_path = user_derivation(machine, "daemon-unstable-spooled",
                               "read x < /proc/sys/kernel/random/uuid; echo $x > $out")
    assert machine.as_user("nix-build", "--no-out-link", drv_path).returncode == 0
    server.stop()
    machine.as_user("nix-build", "--no-out-link", "--check", drv_path)
    assert spooled(machine.spool("buildUserSpoolDir")), machine.daemon_log()
    server.start()
    flushed = machine.as_root("flush")
    assert flushed.returncode == 0, flushed.stderr
    attestations = attestations_of(server, drv_path)
    assert len({a["output_hash"] for a in attestations}) == 2
    # The build was signed; the rebuild's hash may arrive unsigned: with the server down, the build user
    # could neither ask the store (it cannot reach the daemon's database) nor the server for the references.
    assert any(a["verified"] for a in attestations)
