"""./create_user as users run it, and the database it shares with web.py."""
import math
import os
import sqlite3
import string
import subprocess
import sys

import pytest
import requests

import web
from post_build_hook import COSIGNATURE_KEY_TYPE, generate_note_key
from attestation_samples import base32_form, drv_ident, first_generation, nar_hash_bytes, out_path
from support import REPO, ServerProcess, bearer, create_user_command as create_user, free_port, wait_until


def run_create_user(*args, env=None):
    return subprocess.run([str(REPO / "create_user"), *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def post_one(server, token, ident=None, path=None, nar_hash=None):
    attestation = first_generation(path or out_path(), nar_hash or base32_form(nar_hash_bytes()))
    return requests.post(f"{server.url}/attestation/{ident or drv_ident()}", json=[attestation],
                         headers=bearer(token), timeout=10)


def token_bits(token):
    """Entropy bound of a token from the smallest usual alphabet that spells it."""
    for alphabet in (string.hexdigits.lower(), string.ascii_letters + string.digits + "-_",
                     string.ascii_letters + string.digits + "+/="):
        if set(token) <= set(alphabet):
            return len(token) * math.log2(len(set(alphabet)))
    return len(token.encode()) * 8


def database_files(db):
    return [path for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")) if path.exists()]


# ---------------------------------------------------------------- tokens

def test_create_user_prints_a_token_that_the_server_accepts(server):
    token = create_user(server.db, "alice")
    assert post_one(server, token).status_code == 200


def test_generated_token_has_at_least_256_bits(tmp_path):
    token = create_user(tmp_path / "hashes.db", "alice")
    assert token_bits(token) >= 256


def test_generated_tokens_differ(tmp_path):
    db = tmp_path / "hashes.db"
    assert create_user(db, "alice") != create_user(db, "bob")


def test_given_token_is_printed_and_accepted(server):
    token = create_user(server.db, "bob", "token-from-the-original-readme")
    assert token == "token-from-the-original-readme"
    assert post_one(server, token).status_code == 200


def test_one_token_cannot_belong_to_two_builders(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "bob", "shared-token")
    completed = run_create_user("carol", "shared-token", "--db", str(db))
    assert completed.returncode != 0
    assert "shared-token" not in completed.stdout


def test_builder_may_hold_several_tokens(server):
    first, second = create_user(server.db, "alice"), create_user(server.db, "alice")
    assert first != second
    assert post_one(server, first).status_code == 200
    assert post_one(server, second).status_code == 200


def test_posts_through_two_tokens_of_one_builder_count_once(server):
    first, second = create_user(server.db, "alice"), create_user(server.db, "alice")
    ident, path, nar_hash = drv_ident(), out_path(), base32_form(nar_hash_bytes())
    post_one(server, first, ident, path, nar_hash)
    post_one(server, second, ident, path, nar_hash)
    assert requests.get(f"{server.url}/derivations/{ident}", timeout=10).json() == {path: {nar_hash: 1}}


def test_revoked_token_gets_401(server):
    token = create_user(server.db, "alice")
    create_user(server.db, "--revoke", token)
    assert post_one(server, token).status_code == 401


def test_revoking_one_token_keeps_the_builders_other_tokens(server):
    revoked, kept = create_user(server.db, "alice"), create_user(server.db, "alice")
    create_user(server.db, "--revoke", revoked)
    assert post_one(server, kept).status_code == 200


def test_revoking_an_unknown_token_fails(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice")
    completed = run_create_user("--revoke", "no-such-token", "--db", str(db))
    assert completed.returncode != 0
    assert "no such token" in completed.stderr


def test_list_shows_builders_and_token_counts_but_never_tokens(tmp_path):
    db = tmp_path / "hashes.db"
    tokens = [create_user(db, "alice"), create_user(db, "alice"), create_user(db, "bob", "bobs-given-token")]
    listing = create_user_output(db, "--list")
    assert "alice" in listing and "bob" in listing
    assert "2 active token" in listing
    assert not any(token in listing for token in tokens)


def create_user_output(db, *args):
    completed = run_create_user(*args, "--db", str(db))
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


WITNESS_KEY = generate_note_key("witness.example.org", COSIGNATURE_KEY_TYPE)[1]


def test_witness_keys_and_admin_rights_are_confirmed_and_listed(tmp_path):
    """Reviewed: --witness-key and --admin on a builder that exists printed an empty line, and --list left
    witness keys out."""
    db = tmp_path / "hashes.db"
    create_user(db, "carol")
    assert create_user_output(db, "carol", "--witness-key", WITNESS_KEY) == f"added witness key {WITNESS_KEY} to carol\n"
    assert create_user_output(db, "carol", "--witness-key", WITNESS_KEY) == f"already has witness key {WITNESS_KEY} for carol\n"
    assert create_user_output(db, "carol", "--admin") == "carol is an admin: may replace or delete anyone's report\n"
    assert f"carol admin: 1 active token(s); keys: none; witness keys: {WITNESS_KEY}" in create_user_output(db, "--list")


def test_database_files_never_contain_a_token(tmp_path):
    db = tmp_path / "hashes.db"
    tokens = [create_user(db, "alice"), create_user(db, "bob", "a-token-given-on-the-command-line")]
    create_user(db, "--revoke", tokens[0])
    contents = b"".join(path.read_bytes() for path in database_files(db))
    assert contents
    assert not any(token.encode() in contents for token in tokens)


def test_database_files_of_a_running_server_never_contain_a_token(server):
    token = create_user(server.db, "alice")
    assert post_one(server, token).status_code == 200
    contents = b"".join(path.read_bytes() for path in database_files(server.db))
    assert token.encode() not in contents


def test_create_user_without_arguments_prints_usage(tmp_path):
    completed = run_create_user("--db", str(tmp_path / "hashes.db"))
    assert completed.returncode != 0
    assert "usage" in completed.stderr


# ---------------------------------------------------------------- HASH_COLLECTION_DB

def test_create_user_reads_the_database_path_from_the_environment(tmp_path):
    db = tmp_path / "from-env.db"
    completed = run_create_user("alice", env={"HASH_COLLECTION_DB": str(db)})
    assert completed.returncode == 0
    assert "alice" in create_user_output(db, "--list")


def test_revoke_and_list_read_the_database_path_from_the_environment(tmp_path):
    db = tmp_path / "from-env.db"
    env = {"HASH_COLLECTION_DB": str(db)}
    token = run_create_user("alice", env=env).stdout.split()[-1]
    assert run_create_user("--revoke", token, env=env).returncode == 0
    assert "alice: 0 active token" in run_create_user("--list", env=env).stdout


def test_server_reads_the_database_path_from_the_environment(tmp_path):
    db = tmp_path / "from-env.db"
    token = create_user(db, "alice")
    port = free_port()
    process = subprocess.Popen([sys.executable, str(REPO / "web.py"), "--port", str(port)], cwd=tmp_path,
                               env={**os.environ, "HASH_COLLECTION_DB": str(db)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(url), what="server started with HASH_COLLECTION_DB")
        response = requests.post(f"{url}/attestation/{drv_ident()}", headers=bearer(token), timeout=10,
                                 json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
        assert response.status_code == 200
        assert not (tmp_path / "hashes.db").exists()
    finally:
        process.terminate()
        process.wait(timeout=10)


def healthy(url):
    try:
        return requests.get(url + "/healthz", timeout=1).status_code == 200
    except requests.RequestException:
        return False


# ---------------------------------------------------------------- schema version and migration

def test_new_database_records_the_schema_version(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice")
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION >= 1


def test_restarting_the_server_on_an_existing_database_keeps_its_data(server):
    token = create_user(server.db, "alice")
    ident, path, nar_hash = drv_ident(), out_path(), base32_form(nar_hash_bytes())
    assert post_one(server, token, ident, path, nar_hash).status_code == 200
    server.restart()
    assert requests.get(f"{server.url}/derivations/{ident}", timeout=10).json() == {path: {nar_hash: 1}}
    assert post_one(server, token).status_code == 200


def test_restart_keeps_the_schema_version(server):
    create_user(server.db, "alice")
    server.restart()
    with sqlite3.connect(server.db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION


def test_server_started_on_a_database_made_by_create_user_keeps_its_builders(tmp_path):
    db = tmp_path / "hashes.db"
    token = create_user(db, "alice")
    server = ServerProcess(db).start()
    try:
        assert post_one(server, token).status_code == 200
    finally:
        server.stop()


def test_server_refuses_a_database_from_a_newer_schema_and_leaves_it_alone(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice")
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {web.SCHEMA_VERSION + 99}")
    before = dump(db)
    completed = subprocess.run([sys.executable, str(REPO / "web.py"), "--port", str(free_port()), "--db", str(db)],
                               cwd=REPO, capture_output=True, text=True, timeout=30)
    assert completed.returncode != 0
    assert "schema version" in completed.stderr
    assert dump(db) == before


def dump(db):
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump()) + [conn.execute("PRAGMA user_version").fetchone()[0]]


def test_every_schema_version_after_the_first_has_a_migration():
    # Version 1 is schema.sql itself; every later version is reached through MIGRATIONS.
    assert [target for target, _sql in web.MIGRATIONS] == list(range(2, web.SCHEMA_VERSION + 1))


# ---------------------------------------------------------------- builder names

PUBLIC_KEY = "alice-1:" + "A" * 43 + "="


def active_tokens(db, name):
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT COUNT(*) FROM tokens JOIN builders ON builders.id = tokens.builder_id"
                            " WHERE builders.name = ? AND revoked = 0", (name,)).fetchone()[0]


@pytest.mark.parametrize("name", ["a b/c", ".hidden", "a/b", "alice?x=1", "名前", "a" * 101, "tab\tname"])
def test_a_new_builder_name_outside_the_store_name_rule_is_refused(tmp_path, name):
    db = tmp_path / "hashes.db"
    completed = run_create_user(name, "--db", str(db))
    assert completed.returncode != 0
    assert f"builder name {name!r}: use 1 to 100 of A-Z a-z 0-9 + . _ -" in completed.stderr
    assert completed.stdout == ""


@pytest.mark.parametrize("name", ["alice", "cache.nixos.org", "x86_64-builder+2", "_", "a" * 100])
def test_builder_names_of_the_store_name_rule_are_accepted(tmp_path, name):
    assert run_create_user(name, "--db", str(tmp_path / "hashes.db")).returncode == 0


def test_a_builder_made_before_the_name_rule_keeps_working(tmp_path, server):
    create_user(server.db, "renamed-later")
    with sqlite3.connect(server.db) as conn:
        conn.execute("UPDATE builders SET name = 'old name/with slash' WHERE name = 'renamed-later'")
    token = create_user(server.db, "old name/with slash")
    assert post_one(server, token).status_code == 200
    assert "old name/with slash" in create_user_output(server.db, "--list")


# ---------------------------------------------------------------- adding keys

def test_adding_a_key_to_a_builder_says_so_and_makes_no_token(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice")
    completed = run_create_user("alice", "--public-key", PUBLIC_KEY, "--db", str(db))
    assert completed.returncode == 0
    assert completed.stdout == f"added key {PUBLIC_KEY} to alice\n"
    assert active_tokens(db, "alice") == 1


def test_a_new_builder_with_a_key_gets_the_key_and_a_token(tmp_path):
    db = tmp_path / "hashes.db"
    completed = run_create_user("alice", "--public-key", PUBLIC_KEY, "--db", str(db))
    key_line, token_line = completed.stdout.splitlines()
    assert key_line == f"added key {PUBLIC_KEY} to alice"
    assert token_line.startswith("builder alice: new token ")
    assert active_tokens(db, "alice") == 1


def test_new_token_with_a_key_makes_a_token_for_a_builder_that_exists(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice")
    token = create_user(db, "alice", "--public-key", PUBLIC_KEY, "--new-token")
    assert active_tokens(db, "alice") == 2 and token != PUBLIC_KEY


def test_adding_a_key_twice_says_the_builder_already_has_it(tmp_path):
    db = tmp_path / "hashes.db"
    create_user(db, "alice", "--public-key", PUBLIC_KEY)
    completed = run_create_user("alice", "--public-key", PUBLIC_KEY, "--db", str(db))
    assert completed.returncode == 0 and completed.stdout == f"alice already has key {PUBLIC_KEY}\n"


def test_new_tokens_never_start_with_a_dash_so_revoke_takes_them_as_written(monkeypatch):
    import create_user
    drawn = iter(["-starts-with-a-dash", "plain-token"])
    monkeypatch.setattr(create_user.secrets, "token_urlsafe", lambda _bytes: next(drawn))
    assert create_user.new_token() == "plain-token"
