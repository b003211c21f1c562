"""The hook cannot be turned against its own machine, and no server can stall it (issue 11, client side).

Build users plant files with a real nix-build (sandbox = false, as a build user would);
slow and hostile servers are tiny socket servers on loopback.
"""
import contextlib
import grp
import gzip
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
import requests

import post_build_hook
from support import CLIENT, DEBIAN_PYTHON, HOOK_VARIABLES, nix_env, nix_string, write_derivation
from post_build_hook import NIX_BASE32, drv_ident_of

HOOK_TIMEOUT = 2  # seconds; the hooks must be done within HOOK_TIMEOUT + 1
DETERMINISTIC = "echo {text} > $out"


# ---------------------------------------------------------------- a tiny loopback server

def read_request(connection):
    """(method, path) of one request, whose body is read too so that closing does not reset the connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        if not chunk:
            return None, None
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")), 0)
    while len(body) < length:
        chunk = connection.recv(65536)
        if not chunk:
            break
        body += chunk
    method, path, _ = lines[0].split(" ", 2)
    return method, path


class LoopbackServer:
    """Answers every connection with answer(connection, method, path), each in its own thread."""

    def __init__(self, answer):
        self.answer = answer
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopped = threading.Event()
        self.paths = []
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while not self.stopped.is_set():
            try:
                connection, _ = self.listener.accept()
            except OSError:
                continue
            threading.Thread(target=self.handle, args=(connection,), daemon=True).start()

    def handle(self, connection):
        with connection, contextlib.suppress(OSError):
            connection.settimeout(30)
            method, path = read_request(connection)
            if method:
                self.paths.append(path)
                self.answer(self, connection, method, path)

    def stop(self):
        self.stopped.set()
        self.listener.close()


def reply(connection, status, body=b"{}", headers=()):
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", "Content-Type: application/json",
            "Connection: close", *headers]
    connection.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + body)


def drip(connection, data, seconds=20, interval=0.2):
    """Send data a byte at a time, one every interval, for at most `seconds`."""
    for position in range(min(len(data), int(seconds / interval))):
        connection.sendall(data[position:position + 1])
        time.sleep(interval)


def drip_headers(_server, connection, _method, _path):
    connection.sendall(b"HTTP/1.1 200 OK\r\n")
    drip(connection, b"X-Slow: " + b"a" * 1000)


def drip_body(_server, connection, _method, _path):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n")
    drip(connection, b"x" * 100000)


def endless_body(_server, connection, _method, _path):
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        connection.sendall(b" " * 65536)


def redirect_loop(_server, connection, _method, path):
    reply(connection, "302 Found", headers=[f"Location: {path}"])


def redirect_to_ok(_server, connection, _method, path):
    if path == "/ok":
        reply(connection, "200 OK")
    else:
        reply(connection, "302 Found", headers=["Location: /ok"])


@pytest.fixture
def loopback():
    started = []

    def start(answer):
        started.append(LoopbackServer(answer))
        return started[-1]

    yield start
    for server in started:
        server.stop()


# ---------------------------------------------------------------- helpers

def run_client(settings, *args, extra_env=None, timeout=60, client=(sys.executable, str(CLIENT))):
    """The client (a command line that runs post_build_hook.py) with these settings and nothing of the caller's."""
    env = {name: value for name, value in nix_env().items() if name not in HOOK_VARIABLES}
    env.update({name: str(value) for name, value in settings.items()})
    env.update(extra_env or {})
    return subprocess.run([*client, *args], env=env, capture_output=True, text=True, timeout=timeout)


def digest(text):
    return "".join(NIX_BASE32[byte % 32] for byte in text.encode().ljust(32, b"z")[:32])


def submission(name, output_hash_digit="1"):
    return {"drv_ident": f"{digest(name)}-{name}", "attestations": [
        {"output_digest": digest(name + "-out"), "output_name": name, "output_hash": "sha256:" + output_hash_digit * 52,
         "output_sig": "", "nar_size": 1}]}


def listing(directory):
    """{name: (type, bytes or link target)} of a directory, without following or opening anything but regular files."""
    entries = {}
    for entry in sorted(Path(directory).iterdir()):
        if entry.is_symlink():
            entries[entry.name] = ("link", os.readlink(entry))
        elif entry.is_fifo():
            entries[entry.name] = ("fifo", None)
        elif entry.is_dir():
            entries[entry.name] = ("dir", listing(entry))
        else:
            entries[entry.name] = ("file", entry.read_bytes())
    return entries


def spooled(spool):
    return sorted(Path(spool).glob("*.json"))


def spooled_attestations(spool):
    """Spooled submissions of attestations; the diff hook spools its diff beside them."""
    return [path for path in spooled(spool) if "attestations" in json.loads(path.read_text())]


def stored(server, drv_ident):
    response = requests.get(f"{server.url}/derivations/{drv_ident}", params={"full": "true"}, timeout=10)
    return response.json() if response.status_code == 200 else []


def group_spool(path):
    """A spool shared by root and the build users, as module.nix makes the diff hook's: root:nixbld 2770."""
    path.mkdir()
    os.chown(path, 0, grp.getgrnam("nixbld").gr_gid)
    path.chmod(0o2770)
    return path


PLANT_HOSTILE_FILES = """
cd "$spool"
printf '%s' "$good" > 1-good.json
printf '{}' > 2-empty-object.json
printf '[]' > 3-list.json
printf '\\377\\376{}' > 4-bad-utf8.json
mkfifo 5-fifo.json
ln -s /dev/zero 6-zero.json
head -c 1100000 /dev/zero | tr '\\000' ' ' > 7-oversized.json
printf '%s' "$climbing" > 8-climbing.json
echo planted > $out
"""


def plant(nix, directory, spool, files_script, **variables):
    """Runs files_script as a build user in a real nix-build, with $spool and the given variables."""
    extra = f"spool = {nix_string(str(spool))}; " + " ".join(
        f"{name} = {nix_string(value)};" for name, value in variables.items())
    nix_file = write_derivation(directory, "hook-planter", files_script, extra=extra)
    built = subprocess.run(["nix-build", "--no-out-link", str(nix_file)], env=nix(), capture_output=True, text=True,
                           timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]


def climbing_submission(canary):
    """The submission of the original attack: a drv_ident that climbs out of rejected/ to canary/registry."""
    climbing = submission("climbing")
    climbing["drv_ident"] = "x?/" + "../" * 40 + str(canary).lstrip("/") + "/registry"
    return climbing


# ---------------------------------------------------------------- defect 1: the spool

def test_root_delivers_the_build_users_good_submissions_and_writes_nothing_of_theirs(
        nix, server, shared_directory, tmp_path):
    token = server.create_user("builder")
    build_user_spool = group_spool(shared_directory / "build-user-spool")
    canary = shared_directory / "canary"
    good = submission("planted-good")
    plant(nix, shared_directory, build_user_spool, PLANT_HOSTILE_FILES,
          good=json.dumps(good), climbing=json.dumps(climbing_submission(canary)))
    planted = listing(build_user_spool)
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_BUILD_USER_SPOOL": build_user_spool}

    flushed = run_client(settings, "flush")

    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert [entry["output_hash"] for entry in stored(server, good["drv_ident"])] == ["sha256:" + "1" * 52]
    assert listing(build_user_spool) == planted  # root wrote, renamed and deleted nothing there
    assert not canary.exists()
    assert "1 delivered, 7 set aside" in flushed.stdout
    for name in ("2-empty-object", "3-list", "4-bad-utf8", "5-fifo", "6-zero", "7-oversized", "8-climbing"):
        assert f"{name}.json" in flushed.stderr
    assert set(os.listdir(tmp_path / "spool")) <= {"tmp", "log", "build-user-spool.ledger"}  # log: the indexes audit checks


def test_root_sends_each_build_user_file_once(nix, server, shared_directory, tmp_path):
    token = server.create_user("builder")
    build_user_spool = group_spool(shared_directory / "build-user-spool")
    plant(nix, shared_directory, build_user_spool, PLANT_HOSTILE_FILES,
          good=json.dumps(submission("planted-once")), climbing="{}")
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_BUILD_USER_SPOOL": build_user_spool}
    assert "1 delivered" in run_client(settings, "flush").stdout
    again = run_client(settings, "flush")
    assert "0 delivered, 0 set aside, 0 not delivered" in again.stdout
    assert again.stderr == ""


def test_file_left_in_the_old_shared_spool_cannot_steer_where_root_writes(
        nix, loopback, shared_directory):
    refusing = loopback(lambda _server, connection, _method, _path: reply(
        connection, "400 Bad Request", b'{"error": "drv_ident: no"}'))
    old_shared_spool = group_spool(shared_directory / "spool")
    canary = shared_directory / "canary"
    plant(nix, shared_directory, old_shared_spool, 'printf "%s" "$climbing" > "$spool/1-climbing.json"; echo > $out',
          climbing=json.dumps(climbing_submission(canary)))
    # The upgrade: the same directory becomes root's own.
    os.chown(old_shared_spool, 0, 0)
    old_shared_spool.chmod(0o700)
    settings = {"HASH_COLLECTION_SERVER": refusing.url, "HASH_COLLECTION_TOKEN": "t0ken",
                "HASH_COLLECTION_SPOOL": old_shared_spool, "HASH_COLLECTION_BUILD_USER_SPOOL": ""}

    flushed = run_client(settings, "flush")

    assert not canary.exists()
    assert sorted(os.listdir(old_shared_spool / "rejected")) == ["1-climbing.json"]
    assert "drv_ident" in flushed.stderr


def test_spool_names_are_made_by_the_hook_and_stay_short(tmp_path):
    spool = post_build_hook.Spool(str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir(mode=0o700)
    long_name = "n" * 207
    kept = Path(spool.add({"drv_ident": f"{digest('x')}-{long_name}", "attestations": [{}]}))
    rejected = Path(spool.add_rejected({"drv_ident": "x?/../../../etc/registry", "attestations": [{}]}, "HTTP 400"))
    assert kept.parent == tmp_path / "spool" and rejected.parent == tmp_path / "spool" / "rejected"
    assert len(kept.name.encode()) < 255 and long_name not in kept.name
    assert "registry" not in rejected.name


def test_root_refuses_a_spool_that_others_can_write(server, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spool = tmp_path / "spool"
    spool.mkdir()
    spool.chmod(0o777)
    (spool / "1-planted.json").write_text(json.dumps(submission("planted-world")))
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": spool, "HASH_COLLECTION_BUILD_USER_SPOOL": ""}
    flushed = run_client(settings, "flush")
    assert flushed.returncode == 1
    assert "refusing to use the spool" in flushed.stderr and "others can write it" in flushed.stderr
    assert stored(server, submission("planted-world")["drv_ident"]) == []


def by_status(_server, connection, _method, path):
    """Answers with the status a submission's name asks for: .../attestation/<digest>-status-404 gets 404."""
    status = path.rpartition("-status-")[2]
    reply(connection, f"{status} Status", b'{"error": "as asked"}')


def test_only_400_413_and_422_set_a_submission_aside_and_no_answer_blocks_the_next(loopback, tmp_path):
    answering = loopback(by_status)
    spool = post_build_hook.Spool(str(tmp_path / "spool"))
    (tmp_path / "spool").mkdir(mode=0o700)
    statuses = ["404", "401", "500", "302", "400", "413", "422", "200"]
    for status in statuses:
        spool.add(submission(f"status-{status}"))
    settings = {"HASH_COLLECTION_SERVER": answering.url, "HASH_COLLECTION_TOKEN": "t0ken",
                "HASH_COLLECTION_SPOOL": spool.directory, "HASH_COLLECTION_BUILD_USER_SPOOL": ""}

    run_client(settings, "flush")

    waiting = [json.loads(path.read_text())["drv_ident"].rpartition("-")[2] for path in spooled(tmp_path / "spool")]
    rejected = [json.loads(path.read_text())["drv_ident"].rpartition("-")[2]
                for path in sorted((tmp_path / "spool" / "rejected").iterdir())]
    assert waiting == ["404", "401", "500", "302"]
    assert sorted(rejected) == ["400", "413", "422"]
    assert len(answering.paths) == len(statuses)


# ---------------------------------------------------------------- defect 4: redirects

def test_a_redirect_to_a_page_that_answers_200_is_not_a_delivery(loopback, tmp_path, prebuilt):
    redirecting = loopback(redirect_to_ok)
    drv_path, out_path = prebuilt
    settings = hook_settings(redirecting.url, tmp_path)
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path})
    assert ran.returncode == 0
    assert "/ok" not in redirecting.paths
    assert "redirected to /ok" in ran.stderr
    assert len(spooled(tmp_path / "spool")) == 1


# ---------------------------------------------------------------- defect 3: deadlines

@pytest.fixture(scope="module")
def prebuilt(nix, tmp_path_factory):
    """(drv_path, out_path) of a build made without any hook."""
    nix_file = write_derivation(tmp_path_factory.mktemp("prebuilt"), "hardening-prebuilt",
                                DETERMINISTIC.format(text="pre"))
    drv_path = subprocess.run(["nix-instantiate", str(nix_file)], env=nix(), capture_output=True, text=True,
                              check=True).stdout.strip()
    out_path = subprocess.run(["nix-store", "--realise", drv_path], env=nix(), capture_output=True, text=True,
                              check=True).stdout.strip()
    return drv_path, out_path


def hook_settings(url, tmp_path):
    return {"HASH_COLLECTION_SERVER": url, "HASH_COLLECTION_TOKEN": "t0ken",
            "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_TIMEOUT": str(HOOK_TIMEOUT),
            "HASH_COLLECTION_BUILD_USER_SPOOL": "", "HASH_COLLECTION_DIFFOSCOPE": "none"}


SLOW_SERVERS = [drip_headers, drip_body, endless_body, redirect_loop]


@pytest.mark.parametrize("answer", SLOW_SERVERS, ids=lambda answer: answer.__name__)
@pytest.mark.parametrize("hook", ["post-build-hook", "diff-hook"])
def test_hook_is_done_within_its_timeout_plus_one_second_whatever_the_server_does(
        loopback, prebuilt, tmp_path, answer, hook):
    slow = loopback(answer)
    drv_path, out_path = prebuilt
    check_path = tmp_path / "rebuilt.check"
    check_path.write_text("rebuilt\n")
    arguments = ["diff-hook", out_path, str(check_path), drv_path] if hook == "diff-hook" else []
    started = time.monotonic()
    ran = run_client(hook_settings(slow.url, tmp_path), *arguments,
                     extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, timeout=30)
    elapsed = time.monotonic() - started
    assert ran.returncode == 0
    assert elapsed <= HOOK_TIMEOUT + 1, ran.stderr
    assert len(spooled_attestations(tmp_path / "spool")) == 1


def cut_off_body(_server, connection, _method, _path):
    connection.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n"
                       + b"x" * 10)


def slow_chunks(_server, connection, _method, _path):
    connection.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    drip(connection, b"1\r\nx\r\n" * 1000)


@pytest.mark.parametrize("answer", [cut_off_body, slow_chunks], ids=lambda answer: answer.__name__)
@pytest.mark.parametrize("python", [sys.executable, DEBIAN_PYTHON], ids=["venv", "debian"])
def test_an_answer_broken_off_or_cut_at_the_deadline_leaves_the_submission_spooled(
        loopback, prebuilt, reachable_client, tmp_path, answer, python):
    """Reviewed: the body is read from urllib3, whose errors requests no longer translated, and the hook lost the
    build's submission to an "unexpected ProtocolError"."""
    broken = loopback(answer)
    drv_path, out_path = prebuilt
    ran = run_client(hook_settings(broken.url, tmp_path), extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path},
                     timeout=30, client=(python, str(reachable_client)))
    assert ran.returncode == 0 and "unexpected" not in ran.stderr, ran.stderr
    assert len(spooled_attestations(tmp_path / "spool")) == 1, ran.stderr


def deeply_nested_error(_server, connection, _method, _path):
    reply(connection, "503 Service Unavailable", body=b"[" * 60_000)


@pytest.mark.parametrize("hook", ["post-build-hook", "diff-hook"])
def test_an_answer_nested_too_deeply_for_the_json_parser_still_leaves_the_submission_spooled(
        loopback, prebuilt, tmp_path, hook):
    """Reviewed: its RecursionError escaped, and the build's submission was lost."""
    hostile = loopback(deeply_nested_error)
    drv_path, out_path = prebuilt
    check_path = tmp_path / "rebuilt.check"
    check_path.write_text("rebuilt\n")
    arguments = ["diff-hook", out_path, str(check_path), drv_path] if hook == "diff-hook" else []
    ran = run_client(hook_settings(hostile.url, tmp_path), *arguments,
                     extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, timeout=30)
    assert ran.returncode == 0 and "RecursionError" not in ran.stderr, ran.stderr
    assert len(spooled_attestations(tmp_path / "spool")) == 1


def gzip_bomb(_server, connection, _method, _path):
    reply(connection, "200 OK", body=GZIP_BOMB, headers=["Content-Encoding: gzip"])


def gzip_small(_server, connection, _method, _path):
    reply(connection, "200 OK", body=gzip.compress(b'{"small": true}'), headers=["Content-Encoding: gzip"])


GZIP_BOMB = zlib.compress(bytes(64 << 20), 9, wbits=31)  # gzip: 64 MiB of zeros in 64 KiB, one piece of a read


@pytest.mark.parametrize("python", [sys.executable, DEBIAN_PYTHON], ids=["venv", "debian"])
def test_the_answer_cap_holds_for_what_a_compressed_answer_decodes_to(loopback, reachable_client, python):
    """Reviewed: Debian's urllib3 1.26, which the diff hook runs with, decoded each 64 KiB piece whole, so a
    64 KiB cap let a gzip answer take 157 MiB. The client asks a server each way, in a process of its own."""
    bomb, small = loopback(gzip_bomb), loopback(gzip_small)
    script = (f"import resource, sys; sys.path.insert(0, {str(reachable_client.parent)!r}); import post_build_hook as hook\n"
              "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              f"print(hook.http_request('GET', {small.url!r}, 10, 64 << 10).json())\nbefore = peak()\n"
              f"try:\n    hook.http_request('GET', {bomb.url!r}, 10, 64 << 10)\nexcept hook.HttpError as error:\n"
              "    print(error)\nprint(peak() - before)")
    ran = subprocess.run([python, "-c", script], capture_output=True, text=True, timeout=60)
    small_answer, refused, grown_kib = ran.stdout.splitlines()
    assert "larger than 65536 bytes" in refused and small_answer == "{'small': True}"
    assert int(grown_kib) < 16 << 10, f"{int(grown_kib) >> 10} MiB more"


def build_user_spool_holding(tmp_path, files):
    """A build users' spool of files {name: bytes}, each a build user's (nixbld1), as a build could leave them."""
    spool = tmp_path / "build-user-spool"
    spool.mkdir()
    for name, content in files.items():
        (spool / name).write_bytes(content)
        os.chown(spool / name, build_user_uid(), grp.getgrnam("nixbld").gr_gid)
    return spool


def test_hostile_json_in_the_build_users_spool_is_skipped_and_the_rest_delivered(server, prebuilt, tmp_path):
    """Reviewed: a file nested too deeply killed every flush with a RecursionError, and NaN (which no JSON
    encoder sends) was taken for an unreachable server, which stopped delivery for good."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    good = submission("spooled-good")
    nan = json.dumps(submission("spooled-nan")).replace('"nar_size": 1', '"nar_size": NaN').encode()
    spool = build_user_spool_holding(tmp_path, {"0000-deep.json": b"[" * 100_000, "0001-nan.json": nan,
                                                "0002-good.json": json.dumps(good).encode()})
    drv_path, out_path = prebuilt
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_BUILD_USER_SPOOL": spool,
                "HASH_COLLECTION_TIMEOUT": str(HOOK_TIMEOUT)}
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert "0000-deep.json, left for the build users: it is not JSON (JSON nested too deeply)" in ran.stderr
    assert "0001-nan.json, left for the build users: it is not JSON (NaN is not a JSON number)" in ran.stderr
    flushed = run_client(settings, "flush", timeout=30)
    assert flushed.returncode == 0, flushed.stderr
    good_path = post_build_hook.attested_path(good["attestations"][0])
    assert requests.get(f"{server.url}/attestations/by-output/{good_path.removeprefix('/nix/store/')}",
                        timeout=10).json() != []


def test_large_files_in_the_build_users_spool_hold_the_hook_no_longer_than_its_budget(server, prebuilt, tmp_path):
    """Reviewed: files that are read and set aside, never posted, never spent the budget: a thousand links to one
    8 MiB file held root's post-build hook for five minutes; here a hundred."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spool = build_user_spool_holding(tmp_path, {"big": b"[" + b"0," * ((4 << 20) - 10) + b"0]"})  # just under the cap
    for number in range(100):
        os.link(spool / "big", spool / f"{number:04d}.json")
    drv_path, out_path = prebuilt
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_BUILD_USER_SPOOL": spool,
                "HASH_COLLECTION_TIMEOUT": str(HOOK_TIMEOUT)}
    started = time.monotonic()
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, timeout=120)
    assert ran.returncode == 0, ran.stderr
    assert time.monotonic() - started <= HOOK_TIMEOUT + 1, ran.stderr[-2000:]


def test_a_resolver_that_never_answers_holds_the_hook_no_longer_than_its_budget(prebuilt, tmp_path):
    """Reviewed: name resolution came before any socket the watchdog could shut down, and a resolver that never
    answers held the hook for its own timeouts (5 s a try, twice) past the budget. The hook runs in a mount
    namespace of its own (unshare) whose /etc/resolv.conf names a loopback resolver that reads and never answers."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.2", 53))
    resolv_conf = tmp_path / "resolv.conf"
    resolv_conf.write_text("nameserver 127.0.0.2\n")
    drv_path, out_path = prebuilt
    in_namespace = ("unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"',
                    str(resolv_conf), sys.executable, str(CLIENT))
    started = time.monotonic()
    try:
        ran = run_client(hook_settings("http://hashes.example.org:8000", tmp_path),
                         extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, client=in_namespace)
    finally:
        silent.close()
    assert ran.returncode == 0, ran.stderr
    assert time.monotonic() - started <= HOOK_TIMEOUT + 1, ran.stderr
    assert len(spooled_attestations(tmp_path / "spool")) == 1


class HostRecorder(http.server.BaseHTTPRequestHandler):
    hosts = []

    def do_GET(self):
        self.hosts.append(self.headers["Host"])
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_a_named_server_is_asked_by_its_name_over_http_and_https(tmp_path, monkeypatch):
    """The client connects to an address it resolved itself (within the deadline), but a server behind a name is
    still asked by that name: in Host:, and in TLS, whose certificate names it."""
    import ssl
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost", "-days", "1", "-keyout", str(tmp_path / "key.pem"),
                    "-out", str(tmp_path / "cert.pem")], check=True, capture_output=True)
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostRecorder)
    secure = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HostRecorder)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for httpd in (plain, secure):
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "cert.pem"))
    try:
        for scheme, httpd in (("http", plain), ("https", secure)):
            url = f"{scheme}://localhost:{httpd.server_address[1]}/"
            assert post_build_hook.http_request("GET", url, 10, 1024).status_code == 200
    finally:
        plain.shutdown()
        secure.shutdown()
    assert HostRecorder.hosts == [f"localhost:{plain.server_address[1]}", f"localhost:{secure.server_address[1]}"]


def test_nix_build_with_the_hook_against_a_dripping_server_is_held_at_most_timeout_plus_one(
        nix, loopback, tmp_path):
    slow = loopback(drip_body)
    timing = tmp_path / "hook-seconds"
    hook = tmp_path / "hook.sh"
    exports = "\n".join(f"export {name}='{value}'" for name, value in hook_settings(slow.url, tmp_path).items())
    hook.write_text(f"#!/bin/sh\n{exports}\nstart=$(date +%s%N)\n{sys.executable} {CLIENT} 2>/dev/null\n"
                    f"echo $(( $(date +%s%N) - start )) > {timing}\n")
    hook.chmod(0o755)
    nix_file = write_derivation(tmp_path, "hook-dripped", DETERMINISTIC.format(text="dripped"))
    built = subprocess.run(["nix-build", "--no-out-link", str(nix_file), "--option", "post-build-hook", str(hook)],
                           env=nix(), capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    assert int(timing.read_text()) / 1e9 <= HOOK_TIMEOUT + 1
    assert len(spooled(tmp_path / "spool")) == 1


# ---------------------------------------------------------------- defect 8: '?' in names

def test_derivation_named_with_a_question_mark_is_attested_and_challenge_finds_it(
        nix, server, nix_key, tmp_path):
    token = server.create_user("builder", "--public-key", nix_key["public"])
    hook = tmp_path / "hook.sh"
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_SECRET_KEY_FILE": nix_key["secret_file"], "HASH_COLLECTION_SPOOL": tmp_path / "spool",
                "HASH_COLLECTION_BUILD_USER_SPOOL": "", "HASH_COLLECTION_DIFFOSCOPE": "none"}
    exports = "\n".join(f"export {name}='{value}'" for name, value in settings.items())
    hook.write_text(f"#!/bin/sh\n{exports}\nexec {sys.executable} {CLIENT}\n")
    hook.chmod(0o755)
    nix_file = write_derivation(tmp_path, "what?a=b+c", DETERMINISTIC.format(text="question"))
    built = subprocess.run(["nix-build", "--no-out-link", str(nix_file), "--option", "post-build-hook", str(hook)],
                           env=nix(), capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr[-2000:]
    out_path = built.stdout.strip()

    ran = run_client({"HASH_COLLECTION_SERVER": server.url}, "challenge", out_path)

    assert ran.stdout.splitlines()[0] == f"{out_path}: identical (builder)", ran.stderr


# ---------------------------------------------------------------- defect 9: server-supplied paths

def test_challenge_report_passes_no_server_string_to_nix_as_an_option(loopback, prebuilt):
    _drv_path, out_path = prebuilt

    def hostile(_server, connection, _method, path):
        if path.startswith("/reports/"):
            paths = {"--store": "x", "ssh://attacker": "x", "/nix/store/../etc/passwd": "x", out_path: "x"}
            reply(connection, "200 OK", json.dumps({"paths": paths}).encode())
        else:
            reply(connection, "200 OK", b"[]")

    server = loopback(hostile)
    ran = run_client({"HASH_COLLECTION_SERVER": server.url}, "challenge", "--report", "evil")
    for bad in ("--store", "ssh://attacker", "/nix/store/../etc/passwd"):
        assert f"{bad!r}, which is not a store path" in ran.stderr
    assert ran.stdout.splitlines() == [f"{out_path}: no data", "1 path: 0 identical, 0 differ, 1 without data"]


def test_drv_ident_with_a_question_mark_is_quoted_in_the_url():
    url = post_build_hook.attestation_url("http://server", f"{digest('q')}-a?b=c+d")
    assert url.endswith("-a%3Fb%3Dc%2Bd") and drv_ident_of(f"/nix/store/{digest('q')}-a?b=c+d.drv")


def test_a_log_link_left_in_the_old_shared_spool_cannot_steer_where_root_writes(server, prebuilt, tmp_path):
    """The hook records log indexes under <spool>/log; a build user could have planted that as a link before."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spool, outside = tmp_path / "spool", tmp_path / "outside"
    spool.mkdir(mode=0o700)
    outside.mkdir()
    (spool / "log").symlink_to(outside)
    drv_path, out_path = prebuilt
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": spool, "HASH_COLLECTION_BUILD_USER_SPOOL": ""}
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path})
    assert ran.returncode == 0
    assert "refusing to use the spool" in ran.stderr
    assert list(outside.iterdir()) == []


def test_a_build_users_log_directory_left_in_the_old_shared_spool_is_refused(server, prebuilt, tmp_path):
    """A real directory, but a build user's, holding a link: root must not append through it."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spool, outside = tmp_path / "spool", tmp_path / "outside"
    spool.mkdir(mode=0o700)
    outside.mkdir()
    (spool / "log").mkdir()
    (spool / "log" / "log-indexes").symlink_to(outside / "written-by-root")
    os.lchown(spool / "log", build_user_uid(), grp.getgrnam("nixbld").gr_gid)
    drv_path, out_path = prebuilt
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": spool, "HASH_COLLECTION_BUILD_USER_SPOOL": ""}
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path})
    assert ran.returncode == 0
    assert "refusing to use the spool" in ran.stderr
    assert list(outside.iterdir()) == []


def test_a_fifo_left_as_the_ledger_in_the_old_shared_spool_does_not_hold_the_hook(server, prebuilt, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    spool, build_user_spool = tmp_path / "spool", tmp_path / "build-user-spool"
    spool.mkdir(mode=0o700)
    build_user_spool.mkdir()
    os.mkfifo(spool / post_build_hook.LEDGER_NAME)
    drv_path, out_path = prebuilt
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": server.create_user("builder"),
                "HASH_COLLECTION_SPOOL": spool, "HASH_COLLECTION_BUILD_USER_SPOOL": build_user_spool,
                "HASH_COLLECTION_TIMEOUT": str(HOOK_TIMEOUT)}
    started = time.monotonic()
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert time.monotonic() - started <= HOOK_TIMEOUT + 1, ran.stderr


def build_user_uid():
    import pwd
    return pwd.getpwnam("nixbld1").pw_uid


def test_build_users_in_turn_spool_their_diffs_in_the_build_users_spool(reachable_client, shared_directory):
    """Reviewed: the first build user's diff hook made tmp/ its own (0700), and from then on every diff hook
    refused the spool, so with the server down each diff was lost. Here two build users spool in turn, as the
    diff hook does (Spool.add), with Debian's Python; root then reads both as the post-build hook does."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    import pwd
    spool = shared_directory / f"build-user-spool-{os.urandom(4).hex()}"
    spool.mkdir()
    os.chown(spool, 0, grp.getgrnam("nixbld").gr_gid)
    spool.chmod(0o2770)  # as install-hook.sh and the NixOS module make it
    (spool / "tmp").mkdir(mode=0o700)  # as the first diff hook of versions before left it
    os.chown(spool / "tmp", build_user_uid(), grp.getgrnam("nixbld").gr_gid)
    add = (f"import sys; sys.path.insert(0, {str(reachable_client.parent)!r}); import post_build_hook as hook;"
           f" spool = hook.Spool({str(spool)!r}); spool.check();"
           " spool.add(hook.new_submission('/nix/store/' + 'a' * 32 + '-x.drv', [{'n': 1}]))")
    for user in ("nixbld1", "nixbld2", "nixbld1"):
        ran = subprocess.run(["/usr/bin/python3", "-c", add], user=user, group=pwd.getpwnam(user).pw_gid,
                             extra_groups=[grp.getgrnam("nixbld").gr_gid], capture_output=True, text=True, timeout=60)
        assert ran.returncode == 0, f"{user}: {ran.stderr}"
    assert len(list(spool.glob("*.json"))) == 3
    descriptor = post_build_hook.open_directory(str(spool))
    try:
        may_own = post_build_hook.build_user_ids("nixbld").__contains__
        read = [post_build_hook.read_spooled_file(descriptor, name, may_own)
                for name in post_build_hook.submission_names(descriptor)]
    finally:
        os.close(descriptor)
    assert [spooled.problem for spooled in read] == [None] * 3
