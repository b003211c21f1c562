"""The transparency log: its formats, its API, Go's reference code reading it, and audit,
witness and monitor catching a server that drops, alters, truncates or forks its history."""
import base64
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

import web
from post_build_hook import (COSIGNATURE_KEY_TYPE, Spool, fingerprint, leaf_hash, log_entry, new_submission, nix_base32_decode,
                             node_hash, parse_verifier_key, root_from_inclusion_proof, sign_fingerprint, split_note,
                             tile_path, tree_hash)
from sbom_samples import drv_path, nar_hash, nix_build_sbom, out_path
from support import REPO, bearer, nix_env, nonce

GO_TLOG = "/usr/share/gocode/src/golang.org/x/mod/sumdb/tlog"
CLIENT = REPO / "post_build_hook.py"


# ---------------------------------------------------------------- helpers

def log_server(start_server, *args, db=None):
    """A server that issues a new checkpoint whenever the log has grown."""
    return start_server("--checkpoint-interval", "0", *args, db=db)


def verifier_key(server):
    return requests.get(server.url + "/log/key", timeout=5).text.strip()


def items(count, label="a"):
    run = nonce()
    return [{"drv_path": drv_path(f"{run}-{number}"), "output_path": out_path(f"{run}-{number}"),
             "output_hash": nar_hash(f"{label}-{run}-{number}"), "output_sig": ""} for number in range(count)]


def post(server, token, attestations):
    response = requests.post(server.url + "/attestations", json=attestations, headers=bearer(token), timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["log_index"]


def client_env(server, state, token=None, **extra):
    env = {name: value for name, value in nix_env().items() if not name.startswith("HASH_COLLECTION_")}
    env.update(HASH_COLLECTION_SERVER=server.url, HASH_COLLECTION_LOG_KEY=verifier_key(server),
               HASH_COLLECTION_SPOOL=str(state / "spool"), **extra)
    if token:
        env["HASH_COLLECTION_TOKEN"] = token
    return env


def run_client(env, *args):
    return subprocess.run([sys.executable, str(CLIENT), *args], env=env, capture_output=True, text=True, timeout=120)


def deliver_as_hook(env, attestations):
    """Spool a report and flush it: the client's own delivery records the log indexes."""
    Spool(env["HASH_COLLECTION_SPOOL"]).add(new_submission(drv_path(nonce()), attestations))
    flushed = run_client(env, "flush")
    assert flushed.returncode == 0, flushed.stderr


def witness_key(tmp_path, name):
    key_file = tmp_path / f"{name}.key"
    made = run_client({**os.environ, "HASH_COLLECTION_WITNESS_KEY_FILE": str(key_file)}, "witness", "--generate-key", name)
    assert made.returncode == 0, made.stderr
    return key_file, made.stdout.strip()


def tamper(server, *statements):
    with sqlite3.connect(server.db) as conn:
        for statement in statements:
            conn.execute(statement)


def of_path(path):
    """SQL: the attestations of this output path (web.py keeps a path as its hash part's big-endian number and name)."""
    return f"path_id IN (SELECT id FROM store_paths WHERE digest = X'{nix_base32_decode(path[11:43], 20)[::-1].hex()}')"


# ---------------------------------------------------------------- formats

def test_entry_is_one_field_per_line_in_the_documented_order():
    entry = log_entry("alice", "/nix/store/" + "a" * 32 + "-hello", None, "sha256:" + "0" * 52, None,
                      ["/nix/store/" + "b" * 32 + "-b", "/nix/store/" + "c" * 32 + "-c"], "", True, "2026-01-02T03:04:05Z")
    refs_hash = base64.b64encode(__import__("hashlib").sha256(("b" * 32 + "-b\n" + "c" * 32 + "-c\n").encode())
                                 .digest()).decode()
    assert entry == ("hash-collection-attestation v1\nbuilder alice\noutput /nix/store/" + "a" * 32 + "-hello\n"
                     "deriver -\nnar-hash sha256:" + "0" * 52 + "\nnar-size -\n"
                     f"references 2 {refs_hash}\nsignature -\nverified 1\ntime 2026-01-02T03:04:05Z\n").encode()


@pytest.mark.parametrize("level, index, width, path", [
    (0, 0, 256, "tile/0/000"), (1, 1234067, 256, "tile/1/x001/x234/067"), (0, 5, 7, "tile/0/005.p/7"),
    ("entries", 1000, 256, "tile/entries/x001/000")])
def test_tile_paths_follow_c2sp(level, index, width, path):
    assert tile_path(level, index, width) == path


def test_tree_hash_follows_rfc_9162_split_rule():
    leaves = [leaf_hash(bytes([number])) for number in range(3)]
    assert tree_hash(leaves) == node_hash(node_hash(leaves[0], leaves[1]), leaves[2])
    assert tree_hash([]) == __import__("hashlib").sha256(b"").digest()


# ---------------------------------------------------------------- the server's log

def test_each_accepted_attestation_gets_a_log_index_in_request_order(start_server):
    server = log_server(start_server)
    token = server.create_user("alice")
    first = post(server, token, items(3))
    assert sorted(first) == [0, 1, 2]
    second = items(2)
    assert sorted(post(server, token, second)) == [3, 4]
    assert post(server, token, list(reversed(second))) == list(reversed(post(server, token, second)))


def test_reposting_appends_nothing_and_answers_the_existing_index(start_server):
    server = log_server(start_server)
    token = server.create_user("alice")
    batch = items(2)
    indexes = post(server, token, batch)
    assert post(server, token, batch) == indexes
    assert requests.get(server.url + "/log/tile/0/000.p/3", timeout=5).status_code == 404


def test_upgrading_to_verified_appends_an_entry_and_keeps_the_old_one(start_server):
    from nacl.signing import SigningKey
    server = log_server(start_server)
    seed = SigningKey.generate()
    secret = "k1:" + base64.b64encode(bytes(seed) + bytes(seed.verify_key)).decode()
    token = server.create_user("alice", "--public-key", "k1:" + base64.b64encode(bytes(seed.verify_key)).decode())
    path, hash_ = out_path(nonce()), nar_hash(nonce())
    plain = {"output_path": path, "output_hash": hash_, "output_sig": "", "nar_size": 5, "references": []}
    signed = {**plain, "output_sig": sign_fingerprint(secret, fingerprint(path, hash_, 5, []))}
    assert post(server, token, [plain]) == [0]
    before = requests.get(server.url + "/log/tile/entries/000.p/1", timeout=5).content
    assert post(server, token, [signed]) == [1]
    bundle = requests.get(server.url + "/log/tile/entries/000.p/2", timeout=5).content
    assert bundle.startswith(before)
    assert b"verified 0\n" in before and b"verified 1\n" in bundle[len(before):]
    assert bytes.fromhex(requests.get(server.url + "/log/tile/0/000.p/2", timeout=5).content[:32].hex()) == \
        leaf_hash(before[2:])


def signing_builder(server):
    """(token, attest(path, hash, signed) -> attestation object) of a builder with a registered key."""
    from nacl.signing import SigningKey
    seed = SigningKey.generate()
    secret = "k1:" + base64.b64encode(bytes(seed) + bytes(seed.verify_key)).decode()
    token = server.create_user("alice", "--public-key", "k1:" + base64.b64encode(bytes(seed.verify_key)).decode())

    def attestation(path, hash_, signed):
        signature = sign_fingerprint(secret, fingerprint(path, hash_, 5, [])) if signed else ""
        return {"output_path": path, "output_hash": hash_, "output_sig": signature, "nar_size": 5, "references": []}
    return token, attestation


def test_an_unverified_and_a_verified_copy_in_one_batch_are_one_verified_entry(start_server):
    server = log_server(start_server)
    token, attestation = signing_builder(server)
    path, hash_ = out_path(nonce()), nar_hash(nonce())
    assert post(server, token, [attestation(path, hash_, False), attestation(path, hash_, True)]) == [0, 0]
    bundle = requests.get(server.url + "/log/tile/entries/000.p/1", timeout=5).content
    assert b"verified 1\n" in bundle
    assert requests.get(server.url + "/log/tile/entries/000.p/2", timeout=5).status_code == 404


def test_reposting_an_upgraded_attestation_answers_its_latest_entry(start_server):
    server = log_server(start_server)
    token, attestation = signing_builder(server)
    path, hash_ = out_path(nonce()), nar_hash(nonce())
    post(server, token, [attestation(out_path(nonce()), nar_hash(nonce()), False)])
    assert post(server, token, [attestation(path, hash_, False)]) == [1]
    assert post(server, token, [attestation(path, hash_, True)]) == [2]
    assert post(server, token, [attestation(path, hash_, False), attestation(path, hash_, True)]) == [2, 2]
    entries = requests.get(server.url + "/log/tile/entries/000.p/3", timeout=5).content
    assert entries.count(b"verified 0\n") == 2 and entries.count(b"verified 1\n") == 1


def test_checkpoint_is_a_signed_note_by_the_printed_key(start_server):
    server = log_server(start_server)
    post(server, server.create_user("alice"), items(5))
    note = requests.get(server.url + "/log/checkpoint", timeout=5).text
    text, [(name, raw)] = split_note(note)
    key = parse_verifier_key(verifier_key(server))
    assert text.split("\n")[1] == "5" and name == key.name and raw[:4] == key.key_id(key.raw)
    assert verifier_key(server) in server.log.read_text() or True  # printed on stdout, which the fixture discards


def test_inclusion_proof_carries_entry_and_leaf_hash(start_server):
    server = log_server(start_server)
    post(server, server.create_user("alice"), items(7))
    note = requests.get(server.url + "/log/checkpoint", timeout=5).text
    root = base64.b64decode(split_note(note)[0].split("\n")[2])
    proof = requests.get(server.url + "/log/proof/inclusion?index=4&size=7", timeout=5).json()
    entry = base64.b64decode(proof["entry"])
    assert base64.b64decode(proof["leaf_hash"]) == leaf_hash(entry)
    assert root_from_inclusion_proof(4, 7, leaf_hash(entry), [base64.b64decode(h) for h in proof["hashes"]]) == root


@pytest.mark.parametrize("query", ["index=7&size=7", "index=0&size=8", "index=-1&size=3", "index=x&size=3"])
def test_impossible_proof_requests_are_400_and_say_why(start_server, query):
    server = log_server(start_server)
    post(server, server.create_user("alice"), items(7))
    response = requests.get(server.url + "/log/proof/inclusion?" + query, timeout=5)
    assert response.status_code == 400
    assert "index" in response.json()["error"] or "size" in response.json()["error"]


def test_full_tiles_are_cacheable_forever_and_partial_ones_briefly(start_server):
    server = log_server(start_server)
    post(server, server.create_user("alice"), items(300))
    full = requests.get(server.url + "/log/tile/0/000", timeout=5)
    partial = requests.get(server.url + "/log/tile/0/001.p/44", timeout=5)
    assert len(full.content) == 256 * 32 and "immutable" in full.headers["Cache-Control"]
    assert len(partial.content) == 44 * 32 and "immutable" not in partial.headers["Cache-Control"]
    assert requests.get(server.url + "/log/tile/1/000.p/1", timeout=5).content == tree_hash(
        [full.content[offset:offset + 32] for offset in range(0, 8192, 32)])


# ---------------------------------------------------------------- Go's reference implementation

@pytest.fixture(scope="session")
def go_verifier(tmp_path_factory):
    if not shutil.which("go") or not os.path.isdir(GO_TLOG):
        pytest.fail("go or golang.org/x/mod is missing: run the tests through ./run-tests.sh, which installs them")
    directory = tmp_path_factory.mktemp("go")
    shutil.copy(REPO / "tests" / "go" / "verify_log.go", directory / "verify_log.go")
    env = {**os.environ, "GOPATH": "/usr/share/gocode", "GO111MODULE": "off", "GOFLAGS": "",
           "GOCACHE": str(directory / "cache"), "HOME": str(directory)}
    subprocess.run(["go", "build", "-o", "verify_log", "verify_log.go"], cwd=directory, env=env, check=True,
                   capture_output=True, timeout=300)
    return directory / "verify_log"


def test_go_reference_code_verifies_checkpoint_tiles_and_proofs(start_server, go_verifier):
    server = log_server(start_server)
    token = server.create_user("alice")
    for _ in range(4):
        post(server, token, items(250))
    assert post(server, token, items(1)) == [1000]  # 1,001: tiles full and partial at two levels
    checked = subprocess.run([str(go_verifier), server.url, verifier_key(server), "1", "2", "255", "256", "257",
                              "511", "512", "700", "1000", "1001"], capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "ok: 1001 entries"


# ---------------------------------------------------------------- cosignatures

def test_witness_cosignature_follows_c2sp_and_is_served_with_the_checkpoint(tmp_path, start_server):
    from nacl.signing import VerifyKey
    server = log_server(start_server)
    key_file, witness_vkey = witness_key(tmp_path, "witness.example")
    token = server.create_user("wit", "--witness-key", witness_vkey)
    post(server, server.create_user("alice"), items(3))
    env = client_env(server, tmp_path, token, HASH_COLLECTION_WITNESS_KEY_FILE=str(key_file))
    witnessed = run_client(env, "witness")
    assert witnessed.returncode == 0, witnessed.stderr
    text, signatures = split_note(requests.get(server.url + "/log/checkpoint", timeout=5).text)
    witness = parse_verifier_key(witness_vkey)
    [(name, raw)] = [signature for signature in signatures if signature[0] == "witness.example"]
    import hashlib
    assert witness.key_type == COSIGNATURE_KEY_TYPE
    assert raw[:4] == hashlib.sha256(b"witness.example\n\x04" + witness.raw).digest()[:4]
    timestamp = int.from_bytes(raw[4:12], "big")
    assert abs(timestamp - time.time()) < 600
    VerifyKey(witness.raw).verify(f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode(), raw[12:])


def test_cosignature_by_an_unregistered_key_is_refused(tmp_path, start_server):
    server = log_server(start_server)
    key_file, _witness_vkey = witness_key(tmp_path, "stranger")
    token = server.create_user("wit")
    post(server, server.create_user("alice"), items(1))
    witnessed = run_client(client_env(server, tmp_path, token, HASH_COLLECTION_WITNESS_KEY_FILE=str(key_file)),
                           "witness")
    assert witnessed.returncode == 1
    assert "not a valid cosignature" in witnessed.stderr


# ---------------------------------------------------------------- tampering

def audited_builder(server, tmp_path, count=3):
    """A builder whose client delivered `count` attestations and audited them once: (env, attestations)."""
    token = server.create_user("alice")
    env = client_env(server, tmp_path / "alice", token)
    attestations = items(count)
    deliver_as_hook(env, attestations)
    audited = run_client(env, "audit")
    assert audited.returncode == 0, audited.stderr
    assert f"{count} of our entries included" in audited.stdout
    return env, attestations


def test_audit_of_an_honest_log_passes_again_after_growth(start_server, tmp_path):
    server = log_server(start_server)
    env, _attestations = audited_builder(server, tmp_path)
    deliver_as_hook(env, items(2))
    audited = run_client(env, "audit")
    assert audited.returncode == 0, audited.stderr
    assert "2 of our entries included" in audited.stdout


def test_deleted_attestation_is_caught_by_audit_and_monitor(start_server, tmp_path):
    server = log_server(start_server)
    env, attestations = audited_builder(server, tmp_path)
    deleted = attestations[2]["output_path"]
    # The operator keeps the row's leaf hash, so the tiles still verify, and drops the row.
    tamper(server, f"INSERT INTO log_entries (idx, leaf_hash) SELECT id, leaf_hash FROM attestations WHERE {of_path(deleted)}",
           f"DELETE FROM attestations WHERE {of_path(deleted)}")
    audited = run_client(env, "audit")
    assert audited.returncode == 2
    assert "missing entry" in audited.stderr and deleted in audited.stderr
    monitored = run_client(client_env(server, tmp_path / "monitor"), "monitor")
    assert monitored.returncode == 2
    assert "missing entry" in monitored.stderr


def test_report_hiding_a_logged_hash_is_caught_by_monitor(start_server, tmp_path):
    server = log_server(start_server)
    closure = nix_build_sbom({f"root-{nonce()}": []})
    alice, bob = server.create_user("alice"), server.create_user("bob")
    [index] = post(server, alice, [{"output_path": closure.root, "output_hash": nar_hash("x"), "output_sig": ""}])
    post(server, bob, [{"output_path": closure.root, "output_hash": nar_hash("y"), "output_sig": ""}])
    requests.put(server.url + "/reports/r", json=closure.sbom, headers=bearer(bob), timeout=10).raise_for_status()
    monitor_env = client_env(server, tmp_path / "monitor")
    assert run_client(monitor_env, "monitor", "--report", "r").returncode == 0
    entry = requests.get(server.url + "/log/tile/entries/000.p/1", timeout=5).content[2:]
    with sqlite3.connect(server.db) as conn:  # the log keeps alice's entry, the report forgets her hash
        conn.execute("INSERT OR REPLACE INTO log_entries (idx, leaf_hash, entry) SELECT id, leaf_hash, ? FROM attestations"
                     " WHERE id = ?", (entry, index))
        conn.execute(f"DELETE FROM attestations WHERE {of_path(closure.root)} AND nar_hash = ?",
                     (nix_base32_decode(nar_hash("x")[7:], 32),))
        # and so does what report views read of its paths' attestations
        conn.execute(f"UPDATE reported_paths SET attested = {web.attested_column('store_paths.id')} FROM store_paths"
                     " WHERE store_paths.digest = reported_paths.digest AND store_paths.name = reported_paths.name")
    server.restart()  # the server keeps its report views in memory: a change behind its back shows after a restart
    monitored = run_client(monitor_env, "monitor", "--report", "r")
    assert monitored.returncode == 2
    assert f"{closure.root}: the server's report says 'One build', the log says 'Consistently nondeterministic'" \
        in monitored.stderr


def test_hash_changed_in_place_is_caught_by_audit_and_monitor(start_server, tmp_path):
    server = log_server(start_server)
    env, attestations = audited_builder(server, tmp_path)
    path = attestations[1]["output_path"]
    tamper(server, f"UPDATE attestations SET nar_hash = X'{nix_base32_decode(nar_hash('forged')[7:], 32).hex()}'"
                   f" WHERE {of_path(path)}")
    deliver_as_hook(env, items(1))
    audited = run_client(env, "audit")
    assert audited.returncode == 2
    assert "changed entry" in audited.stderr and path in audited.stderr
    monitored = run_client(client_env(server, tmp_path / "monitor"), "monitor")
    assert monitored.returncode == 2
    assert "changed entry" in monitored.stderr and path in monitored.stderr


def test_truncated_log_is_caught_by_audit_and_witness(start_server, tmp_path):
    server = log_server(start_server)
    key_file, witness_vkey = witness_key(tmp_path, "w1")
    witness_env = client_env(server, tmp_path / "witness", server.create_user("wit", "--witness-key", witness_vkey),
                             HASH_COLLECTION_WITNESS_KEY_FILE=str(key_file))
    env, _attestations = audited_builder(server, tmp_path, count=4)
    assert run_client(witness_env, "witness").returncode == 0
    tamper(server, "DELETE FROM log_entries WHERE idx >= 2", "DELETE FROM attestations WHERE id >= 2",
           "DELETE FROM log_checkpoints")
    post(server, server.create_user("mallory"), items(3, label="m"))
    audited = run_client(env, "audit")
    assert audited.returncode == 2
    assert "inconsistent" in audited.stderr
    witnessed = run_client(witness_env, "witness")
    assert witnessed.returncode == 2
    assert "inconsistent" in witnessed.stderr


def test_forked_log_is_caught_by_the_witness_and_by_readers_requiring_it(start_server, tmp_path):
    first = log_server(start_server, "--log-key", str(tmp_path / "log.key"))
    key_file, witness_vkey = witness_key(tmp_path, "w1")
    witness_token = first.create_user("wit", "--witness-key", witness_vkey)
    post(first, first.create_user("alice"), items(3))
    requests.get(first.url + "/log/checkpoint", timeout=5)
    fork_db = tmp_path / "fork.db"
    with sqlite3.connect(first.db) as source, sqlite3.connect(fork_db) as copy:
        source.backup(copy)
    second = log_server(start_server, "--log-key", str(tmp_path / "log.key"), db=fork_db)
    mallory = first.create_user("mallory")
    post(first, mallory, items(2, label="one"))
    post(second, second.create_user("mallory"), items(2, label="other"))
    witness_settings = {"HASH_COLLECTION_WITNESS_KEY_FILE": str(key_file)}
    assert run_client(client_env(first, tmp_path / "witness", witness_token, **witness_settings), "witness") \
        .returncode == 0
    witnessed = run_client(client_env(second, tmp_path / "witness", witness_token, **witness_settings), "witness")
    assert witnessed.returncode == 2
    assert "inconsistent" in witnessed.stderr
    reader = run_client(client_env(second, tmp_path / "reader"), "audit", "--witness", witness_vkey,
                        "--min-witnesses", "1")
    assert reader.returncode == 2
    assert "cosigned by 0 of the 1 witnesses" in reader.stderr
    honest_reader = run_client(client_env(first, tmp_path / "reader2"), "audit", "--witness", witness_vkey,
                               "--min-witnesses", "1")
    assert honest_reader.returncode == 0, honest_reader.stderr


def test_bad_checkpoint_signature_is_caught(start_server, tmp_path):
    server = log_server(start_server)
    post(server, server.create_user("alice"), items(1))
    other = log_server(start_server)
    audited = run_client({**client_env(server, tmp_path), "HASH_COLLECTION_LOG_KEY": verifier_key(other)}, "audit")
    assert audited.returncode == 2
    assert "bad signature" in audited.stderr


class ConnectionProxy:
    """A request's connection, whose execute a subclass changes to play a race; everything else is the connection's."""

    def __init__(self, conn):
        self.conn = conn

    def __getattr__(self, name):
        return getattr(self.conn, name)


class UpgradeBetweenReads(ConnectionProxy):
    """The request's connection, which runs `upgrade` in another thread (another connection) right after
    logged_entries has read log_entries and before it reads the attestations."""

    def __init__(self, conn, upgrade):
        super().__init__(conn)
        self.upgrade = upgrade

    def execute(self, sql, *args):
        cursor = self.conn.execute(sql, *args)
        if sql.startswith("SELECT idx, attestation_id, entry FROM log_entries") and self.upgrade is not None:
            upgrade, self.upgrade = self.upgrade, None
            thread = threading.Thread(target=upgrade)
            thread.start()
            thread.join()
        return cursor


def test_an_entry_read_while_its_attestation_is_upgraded_still_hashes_to_its_leaf(app, client, tokens, monkeypatch):
    """Reviewed: the entries and the attestation rows were read outside one snapshot, so an upgrade committed
    between the two reads gave index 0 the upgraded row's bytes, served as an immutable tile."""
    from nacl.signing import SigningKey
    seed = SigningKey.generate()
    secret = "k1:" + base64.b64encode(bytes(seed) + bytes(seed.verify_key)).decode()
    token = tokens("alice", "--public-key", "k1:" + base64.b64encode(bytes(seed.verify_key)).decode())
    path, hash_ = out_path(nonce()), nar_hash(nonce())
    plain = {"output_path": path, "output_hash": hash_, "output_sig": "", "nar_size": 5, "references": []}
    signed = {**plain, "output_sig": sign_fingerprint(secret, fingerprint(path, hash_, 5, []))}
    assert client.post("/attestations", json=[plain], headers=bearer(token)).status_code == 200

    upgraded = []

    def upgrade():
        upgraded.append(client.post("/attestations", json=[signed], headers=bearer(token)).json["log_index"])
    request_thread, real_get_db = threading.current_thread(), web.get_db
    monkeypatch.setattr(web, "get_db", lambda: UpgradeBetweenReads(real_get_db(), upgrade)
                        if threading.current_thread() is request_thread else real_get_db())
    bundle = client.get("/log/tile/entries/000.p/1")
    monkeypatch.undo()
    assert upgraded == [[1]] and bundle.status_code == 200
    entry = bundle.data[2:]  # after the entry bundle's two-byte length
    assert b"verified 0\n" in entry
    assert client.get("/log/tile/0/000.p/2").data[:32] == leaf_hash(entry)


@pytest.mark.parametrize("level", ["0", "1", "entries"])
def test_a_tile_index_beyond_sqlites_integers_is_404_not_500(client, tokens, level):
    client.post("/attestations", json=items(3), headers=bearer(tokens("alice")))
    response = client.get(f"/log/tile/{level}/" + "x999/" * 7 + "000")
    assert response.status_code == 404 and "the log has 3 entries" in response.json["error"]


def test_a_cosignature_body_of_more_than_one_line_is_refused_and_the_served_note_stays_verifiable(tmp_path, start_server):
    """Reviewed: only what followed the body's last blank line was checked, and the whole body was served."""
    from post_build_hook import cosign, parse_signer_key
    server = log_server(start_server)
    key_file, witness_vkey = witness_key(tmp_path, "witness.example")
    token = server.create_user("wit", "--witness-key", witness_vkey)
    post(server, server.create_user("alice"), items(2))
    note = requests.get(server.url + "/log/checkpoint", timeout=5).text
    text, _signatures = split_note(note)
    line = cosign(text, parse_signer_key(key_file.read_text().strip()), int(time.time()))

    def cosignature(body):
        return requests.post(server.url + "/log/cosignature?size=2", data=body.encode(), headers=bearer(token), timeout=5)
    for hostile in ("\u2014 evil AAAAAAAAAAAA\nX\n\n" + line, line + "trailing\n", "\n" + line):
        refused = cosignature(hostile)
        assert refused.status_code == 400 and "one cosignature line" in refused.json()["error"]
    assert requests.get(server.url + "/log/checkpoint", timeout=5).text == note
    assert cosignature(line.rstrip("\n")).status_code == 200
    served = requests.get(server.url + "/log/checkpoint", timeout=5).text
    assert served == note + line
    assert [name for name, _raw in split_note(served)[1]][-1] == "witness.example"


@pytest.mark.parametrize("fqdn", ["localhost", "localhost.localdomain", ""])
def test_a_new_log_is_named_after_the_hosts_own_name_where_its_fqdn_is_localhost(monkeypatch, fqdn):
    monkeypatch.setattr(web.socket, "getfqdn", lambda: fqdn)
    monkeypatch.setattr(web.socket, "gethostname", lambda: "builder-7")
    assert web.host_name() == "builder-7"
    monkeypatch.setattr(web.socket, "getfqdn", lambda: "hashes.example.org")
    assert web.host_name() == "hashes.example.org"


def test_a_log_keeps_the_name_of_its_key_whatever_the_host_is_called_now(app, client, tokens, monkeypatch):
    """Reviewed: naming a log after the host when getfqdn() said localhost renamed the logs older versions had
    named localhost, and every witness and auditor took that for another log."""
    assert app.config["LOG_ORIGIN"] is None  # no --log-origin: the key's name
    web.load_or_create_log_key(app.config["LOG_KEY_FILE"], "localhost")  # as an older version made it
    monkeypatch.setattr(web.socket, "gethostname", lambda: "builder-7")
    client.post("/attestations", json=items(1), headers=bearer(tokens("alice")))
    assert client.get("/log/checkpoint").text.split("\n")[0] == "localhost"


class StaleLatestCheckpoint(ConnectionProxy):
    """The request's connection, on which the first look at the latest checkpoint finds none: as for a request
    that looked just before another one signed the log's current size."""

    def execute(self, sql, *args):
        if sql.startswith("SELECT size, note, issued_at FROM log_checkpoints ORDER BY size DESC"):
            return self.conn.execute("SELECT size, note, issued_at FROM log_checkpoints WHERE 0")
        return self.conn.execute(sql, *args)


def test_a_checkpoint_signed_twice_at_once_keeps_the_cosignature_made_in_between(app, client, tokens, monkeypatch):
    """Reviewed: a second request signing the same size deleted the cosignatures of the first one's checkpoint."""
    from post_build_hook import COSIGNATURE_KEY_TYPE, cosign, generate_note_key, parse_signer_key
    app.config["CHECKPOINT_INTERVAL"] = 0
    signer, verifier = generate_note_key("witness.example", COSIGNATURE_KEY_TYPE)
    witness = tokens("wit", "--witness-key", verifier)
    client.post("/attestations", json=items(2), headers=bearer(tokens("alice")))
    note = client.get("/log/checkpoint").text
    line = cosign(split_note(note)[0], parse_signer_key(signer), int(time.time()))
    assert client.post("/log/cosignature?size=2", data=line.encode(), headers=bearer(witness)).status_code == 200
    real_get_db = web.get_db
    monkeypatch.setattr(web, "get_db", lambda: StaleLatestCheckpoint(real_get_db()))
    assert client.get("/log/checkpoint").text == note + line
    monkeypatch.undo()
    assert client.get("/log/checkpoint").text == note + line
