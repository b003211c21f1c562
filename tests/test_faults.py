"""Faults, produced for real: kill -9 mid-batch, a read-only database, a full disk,
and a server that fails the build hook in every way. Nothing is lost or corrupted,
errors are clear 503s, and everything recovers when the fault goes away."""
import contextlib
import json
import os
import secrets
import shlex
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import requests

from support import REPO, bearer, nix_env, write_derivation
from post_build_hook import NIX_BASE32, STORE_DIR, drv_ident_of, nix_base32_encode

BATCH_SIZE = 10_000
TIMEOUT = 120  # a hang detector for requests, not a performance bound


def random_digest():
    return "".join(secrets.choice(NIX_BASE32) for _ in range(32))


def batch(size, tag):
    """Attestations whose output names all end in -<tag>, so they can be counted afterwards."""
    return [{"drv_path": f"{STORE_DIR}/{random_digest()}-{tag}.drv", "output_path": f"{STORE_DIR}/{random_digest()}-{tag}",
             "output_hash": "sha256:" + nix_base32_encode(os.urandom(32)), "output_sig": "", "nar_size": 1024 + number,
             "references": []} for number in range(size)]


def count_tagged(db, tag):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("SELECT COUNT(*) FROM attestations JOIN store_paths ON store_paths.id = attestations.path_id"
                            " WHERE store_paths.name = ?", (tag,)).fetchone()[0]


def integrity(db):
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]


def post_batch(server, token, items):
    return requests.post(f"{server.url}/attestations", data=json.dumps(items), timeout=TIMEOUT,
                         headers={**bearer(token), "Content-Type": "application/json"})


def raw_post(url, path, token, body):
    """The whole request on a raw socket, so the caller knows the moment it has been sent."""
    host, port = url.removeprefix("http://").split(":")
    connection = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    connection.sendall(head.encode() + body)
    return connection


# ---------------------------------------------------------------- kill -9 during a large batch

# Delays around the time the server takes to parse and commit 10,000 items, so some kills land mid-commit.
@pytest.mark.parametrize("delay", [0.0, 0.05, 0.1, 0.125, 0.15, 0.175, 0.2, 0.4])
def test_batch_is_fully_present_or_fully_absent_after_kill_9(server, delay):
    token = server.create_user("alice")
    tag = f"killed{int(delay * 1000)}"
    body = json.dumps(batch(BATCH_SIZE, tag)).encode()
    connection = raw_post(server.url, "/attestations", token, body)
    time.sleep(delay)
    server.kill9()
    connection.close()
    server.start()
    assert count_tagged(server.db, tag) in (0, BATCH_SIZE)


def test_database_passes_integrity_check_after_kill_9_mid_batch(server):
    token = server.create_user("alice")
    connection = raw_post(server.url, "/attestations", token, json.dumps(batch(BATCH_SIZE, "killed")).encode())
    time.sleep(0.1)
    server.kill9()
    connection.close()
    server.start()
    assert integrity(server.db) == "ok"


def test_acknowledged_batch_is_fully_present_after_kill_9(server):
    token = server.create_user("alice")
    assert post_batch(server, token, batch(BATCH_SIZE, "acknowledged")).status_code == 200
    server.kill9()
    server.start()
    assert count_tagged(server.db, "acknowledged") == BATCH_SIZE


# ---------------------------------------------------------------- a read-only database (chattr +i)

@pytest.fixture
def immutable(server):
    """Makes the database and its WAL immutable, for real: even root cannot write them.

    Not the -shm file: sqlite maps it into memory, and a write to an immutable
    mapping is a SIGBUS, which is a crash, not a read-only database.
    """
    files = [str(server.db), f"{server.db}-wal"]
    state = {"on": False}

    def set_immutable(on):
        subprocess.run(["chattr", "+i" if on else "-i", *files], check=True)
        state["on"] = on

    token = server.create_user("alice")
    # Write once, so that the server's own connection and the WAL exist before the fault.
    assert post_batch(server, token, batch(10, "before")).status_code == 200
    yield token, set_immutable
    if state["on"]:
        set_immutable(False)


def test_write_to_a_read_only_database_gives_503_with_a_json_error(server, immutable):
    token, set_immutable = immutable
    set_immutable(True)
    response = post_batch(server, token, batch(100, "readonly"))
    assert response.status_code == 503
    assert "database" in response.json()["error"]


def test_single_attestation_to_a_read_only_database_gives_503_with_a_json_error(server, immutable):
    token, set_immutable = immutable
    set_immutable(True)
    [item] = batch(1, "readonly")
    response = requests.post(f"{server.url}/attestation/{drv_ident_of(item.pop('drv_path'))}", json=[item],
                             headers=bearer(token), timeout=TIMEOUT)
    assert response.status_code == 503
    assert isinstance(response.json()["error"], str)


def test_report_to_a_read_only_database_gives_503_with_a_json_error(server, immutable):
    import sbom_samples
    token, set_immutable = immutable
    set_immutable(True)
    response = requests.put(f"{server.url}/reports/readonly", json=sbom_samples.nix_build_sbom(sbom_samples.DIAMOND).sbom,
                            headers=bearer(token), timeout=TIMEOUT)
    assert response.status_code == 503
    assert isinstance(response.json()["error"], str)


def test_read_only_database_still_serves_reads(server, immutable):
    _token, set_immutable = immutable
    set_immutable(True)
    assert requests.get(f"{server.url}/derivations/", timeout=TIMEOUT).status_code == 200


def test_read_only_database_stores_nothing_and_stays_intact(server, immutable):
    token, set_immutable = immutable
    set_immutable(True)
    post_batch(server, token, batch(100, "readonly"))
    set_immutable(False)
    assert count_tagged(server.db, "readonly") == 0
    assert integrity(server.db) == "ok"


def test_server_recovers_when_the_database_is_writable_again(server, immutable):
    token, set_immutable = immutable
    set_immutable(True)
    for _ in range(8):  # fail on as many worker threads as there are
        assert post_batch(server, token, batch(10, "refused")).status_code == 503
    set_immutable(False)
    statuses = [post_batch(server, token, batch(10, "recovered")).status_code for _ in range(8)]
    assert statuses == [200] * 8
    assert count_tagged(server.db, "recovered") == 80


def test_server_started_on_a_read_only_database_serves_reads_and_refuses_writes_with_503(server, immutable):
    token, set_immutable = immutable
    server.stop()
    set_immutable(True)
    server.start()
    assert requests.get(f"{server.url}/derivations/", timeout=TIMEOUT).status_code == 200
    assert post_batch(server, token, batch(10, "readonly")).status_code == 503


# ---------------------------------------------------------------- a full disk (a small tmpfs)

DISK_SIZE = "4m"
# More than fits in the space SQLite reuses without growing a file: once the background checkpointer has
# copied the WAL into the database, the next writes start the WAL again from its beginning, in space the
# full disk has already given, and a small batch is stored (rightly).
FULL_DISK_BATCH = 10_000


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs mount; fill() fills it to the last byte, free() frees it."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount_point)], check=True)
    filler = mount_point / "filler"

    class Disk:
        path = mount_point

        @staticmethod
        def fill():
            descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                while os.write(descriptor, b"\0" * 4096):
                    pass
            except OSError:
                pass  # ENOSPC: the disk is full
            finally:
                os.close(descriptor)

        @staticmethod
        def free():
            filler.unlink(missing_ok=True)

    yield Disk
    if subprocess.run(["umount", str(mount_point)]).returncode != 0:
        subprocess.run(["umount", "-l", str(mount_point)])


@pytest.fixture
def full_disk_server(small_disk, start_server):
    server = start_server(db=small_disk.path / "hashes.db")
    token = server.create_user("alice")
    assert post_batch(server, token, batch(10, "before")).status_code == 200
    return server, token, small_disk


def test_write_to_a_full_disk_gives_503_with_a_json_error(full_disk_server):
    server, token, disk = full_disk_server
    disk.fill()
    response = post_batch(server, token, batch(FULL_DISK_BATCH, "full"))
    assert response.status_code == 503
    assert "database" in response.json()["error"]


def test_full_disk_stores_nothing_of_the_refused_batch_and_stays_intact(full_disk_server):
    server, token, disk = full_disk_server
    disk.fill()
    post_batch(server, token, batch(FULL_DISK_BATCH, "full"))
    disk.free()
    assert count_tagged(server.db, "full") == 0
    assert integrity(server.db) == "ok"


def test_full_disk_still_serves_reads(full_disk_server):
    server, _token, disk = full_disk_server
    disk.fill()
    assert requests.get(f"{server.url}/derivations/", timeout=TIMEOUT).status_code == 200


def test_server_recovers_when_disk_space_is_freed(full_disk_server):
    server, token, disk = full_disk_server
    disk.fill()
    assert post_batch(server, token, batch(FULL_DISK_BATCH, "full")).status_code == 503
    disk.free()
    assert post_batch(server, token, batch(2_000, "after")).status_code == 200
    assert count_tagged(server.db, "after") == 2_000


# ---------------------------------------------------------------- the build hook against a failing server

class FaultyServer:
    """A loopback server that answers every request in one bad way."""

    ANSWERS = {
        "500": b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\nContent-Length: 21\r\n"
               b"Connection: close\r\n\r\n<h1>it broke</h1>\n\n\n\n",
        "401": b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: 27\r\n"
               b"Connection: close\r\n\r\n{\"error\": \"unknown token\"}\n",
        "garbage": b"\x00\xff\xfeSSH-2.0-OpenSSH_9.6 not http at all\r\n\r\n",
        "400-garbage": b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/html\r\nContent-Length: 18\r\n"
                       b"Connection: close\r\n\r\n<p>nope</p>\x00\x01\x02\x03\x04\x05\x06",
    }

    def __init__(self, mode):
        self.mode = mode
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.held = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.listener.settimeout(0.2)
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            if self.mode == "silent":
                self.held.append(connection)  # accepted, read by nobody, never answered
                continue
            with connection:
                with contextlib.suppress(OSError):
                    connection.settimeout(2)
                    connection.recv(65536)
                    connection.sendall(self.ANSWERS[self.mode])

    def stop(self):
        self.stopped.set()
        self.thread.join()
        for connection in self.held:
            connection.close()
        self.listener.close()


@pytest.fixture
def faulty_server():
    started = []

    def start(mode):
        started.append(FaultyServer(mode))
        return started[-1]

    yield start
    for server in started:
        server.stop()


class HookScript:
    """The client as Nix's post-build-hook, through a wrapper that records its exit status."""

    def __init__(self, directory, settings):
        self.directory = Path(directory)
        self.codes = self.directory / "codes"
        self.script = self.directory / "hook.sh"
        exports = "\n".join(f"export {name}={shlex.quote(str(value))}" for name, value in settings.items())
        self.script.write_text(f"#!/bin/sh\n{exports}\n{shlex.quote(sys.executable)} "
                               f"{shlex.quote(str(REPO / 'post_build_hook.py'))} \"$@\" 2>>{self.directory}/stderr\n"
                               f"code=$?\necho $code >> {self.codes}\nexit $code\n")
        self.script.chmod(0o755)

    def exit_codes(self):
        return [int(word) for word in self.codes.read_text().split()] if self.codes.exists() else []


def spooled(spool, subdirectory=""):
    directory = Path(spool) / subdirectory
    return sorted(directory.glob("*.json")) if directory.is_dir() else []


@pytest.fixture
def hook_build(nix, tmp_path, faulty_server):
    """Builds a fresh derivation with the hook pointed at a server failing in `mode`."""

    def build(mode):
        server = faulty_server(mode)
        spool = tmp_path / "spool"
        hook_directory = Path(tempfile.mkdtemp(prefix="hook-faults-", dir=tmp_path))
        hook = HookScript(hook_directory, {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": "t0ken",
                                           "HASH_COLLECTION_SPOOL": spool, "HASH_COLLECTION_TIMEOUT": "2",
                                           "HASH_COLLECTION_BUILD_USER_SPOOL": ""})
        nix_file = write_derivation(tmp_path, f"hook-fault-{mode}", "echo built > $out")
        built = subprocess.run(["nix-build", "--no-out-link", str(nix_file), "--option", "post-build-hook",
                                str(hook.script)], env=nix(), capture_output=True, text=True, timeout=300)
        drv_path = subprocess.run(["nix-instantiate", str(nix_file)], env=nix(), capture_output=True, text=True,
                                  check=True).stdout.strip()
        return built, hook, spool, drv_ident_of(drv_path)

    return build


HOOK_FAULTS = ["500", "401", "garbage", "silent"]


@pytest.mark.parametrize("mode", HOOK_FAULTS + ["400-garbage"])
def test_build_succeeds_when_the_server_fails(hook_build, mode):
    built, _hook, _spool, _ident = hook_build(mode)
    assert built.returncode == 0, built.stderr[-2000:]
    assert Path(built.stdout.strip()).read_text() == "built\n"


@pytest.mark.parametrize("mode", HOOK_FAULTS + ["400-garbage"])
def test_hook_exits_0_when_the_server_fails(hook_build, mode):
    _built, hook, _spool, _ident = hook_build(mode)
    assert hook.exit_codes() == [0]


@pytest.mark.parametrize("mode", HOOK_FAULTS)
def test_report_is_spooled_when_the_server_fails(hook_build, mode):
    _built, _hook, spool, ident = hook_build(mode)
    [report_file] = spooled(spool)
    report = json.loads(report_file.read_text())
    assert report["drv_ident"] == ident and len(report["attestations"]) == 1


def test_report_refused_with_a_garbage_400_is_set_aside_with_the_reason(hook_build):
    _built, _hook, spool, ident = hook_build("400-garbage")
    assert spooled(spool) == []
    [rejected] = spooled(spool, "rejected")
    report = json.loads(rejected.read_text())
    assert report["drv_ident"] == ident
    assert "400" in report["rejected"]


@pytest.mark.parametrize("mode", HOOK_FAULTS)
def test_report_spooled_during_a_fault_is_delivered_by_flush_once_the_server_is_back(hook_build, server, mode):
    _built, _hook, spool, ident = hook_build(mode)
    token = server.create_user("builder")
    env = {**nix_env(), "HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
           "HASH_COLLECTION_SPOOL": str(spool), "HASH_COLLECTION_BUILD_USER_SPOOL": ""}
    flushed = subprocess.run([sys.executable, str(REPO / "post_build_hook.py"), "flush"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert spooled(spool) == []
    attested = requests.get(f"{server.url}/derivations/{ident}", params={"full": "true"}, timeout=TIMEOUT).json()
    assert [attestation["builder"] for attestation in attested] == ["builder"]
