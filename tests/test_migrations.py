"""The whole migration chain, from a database as version 1 (the first release) wrote it,
through `python web.py` as a deployment starts it.

tests/data/schema-v1.sql is schema.sql as version 1 shipped it; never edit it. When you add
a migration, add rows for what it changes to version_1_database and checks to this file.
"""
import base64
import contextlib
import hashlib
from html import escape
import json
import sqlite3
import subprocess

import pytest
import requests

import web
from attestation_samples import base32_form, nar_hash_bytes, nix_key_pair, out_path, signed_attestation
from support import REPO, ServerProcess, bearer, wait_for_pending_revisions
from post_build_hook import basename_of, consistency_holds, nix_base32_encode

TIMEOUT = 30
ALICE_SECRET, ALICE_PUBLIC = nix_key_pair("alice-1")
_BOB_SECRET, BOB_PUBLIC = nix_key_pair("bob-1")
TOKENS = {"alice": "alice-token", "mallory": "mallory-token", "root": "root-token", "bob": "bob-token"}
REPORT_PATHS = [out_path("hello-2.12"), out_path("glibc-2.38")]
REPORT_DRV_PATHS = [out_path("hello-2.12.drv"), None]
REPORT_NAMES = ["hello-2.12 (as the SBOM names it)", "glibc-2.38"]
HOSTILE_SIGNATURE = "evil\nInjected-line:" + base64.b64encode(b"s" * 64).decode()


def version_1_rows(conn):
    """Representative rows, written with version 1's own SQL."""
    for name in TOKENS:
        conn.execute("INSERT INTO builders (name, is_admin) VALUES (?, ?)", (name, int(name == "root")))
        conn.execute("INSERT INTO tokens (builder_id, token_sha256) VALUES ((SELECT id FROM builders WHERE name = ?), ?)",
                     (name, hashlib.sha256(TOKENS[name].encode()).hexdigest()))
    # mallory registered alice's key bytes under his own name, after alice (defect 5 of issue 11).
    for name, key in [("alice", ALICE_PUBLIC), ("mallory", "mallory-1:" + ALICE_PUBLIC.partition(":")[2]),
                      ("bob", BOB_PUBLIC)]:
        conn.execute("INSERT INTO public_keys (builder_id, key_name, public_key)"
                     " VALUES ((SELECT id FROM builders WHERE name = ?), ?, ?)", (name, key.partition(":")[0], key))
    signed = signed_attestation(ALICE_SECRET)
    relabelled = "mallory-1:" + signed["output_sig"].partition(":")[2]
    hostile = signed_attestation(ALICE_SECRET)
    for builder, attestation, signature, verified in [("alice", signed, signed["output_sig"], 1),
                                                      ("mallory", signed, relabelled, 1),
                                                      ("bob", hostile, HOSTILE_SIGNATURE, 0)]:
        conn.execute("INSERT INTO attestations (builder_id, output_path, output_hash, output_sig, nar_size, refs,"
                     " verified, created_at) VALUES ((SELECT id FROM builders WHERE name = ?), ?, ?, ?, ?, '[]', ?,"
                     " '2024-01-01T00:00:00Z')", (builder, attestation["output_path"], attestation["output_hash"],
                                                   signature, attestation["nar_size"], verified))
    version_1_report(conn)
    conn.executemany("INSERT INTO link_patterns (pattern, link) VALUES (?, ?)",
                     [("^hello-", "https://example.org/hello"), ("(?>glibc)", "https://example.org/atomic")])
    return {"signed": signed, "hostile": hostile}


def version_1_report(conn):
    root, child = REPORT_PATHS
    tree = [[0, 0, True], [1, 1, True]]
    report_id = conn.execute(
        "INSERT INTO reports (name, owner_id, root, sbom, tree, created_at)"
        " VALUES ('old', (SELECT id FROM builders WHERE name = 'alice'), ?, ?, ?, '2024-01-01T00:00:00Z')",
        (root, b'{"bomFormat": "CycloneDX"}', json.dumps(tree))).lastrowid
    for index, (path, drv_path, name) in enumerate(zip(REPORT_PATHS, REPORT_DRV_PATHS, REPORT_NAMES)):
        conn.execute("INSERT INTO report_components (report_id, idx, name, drv_path) VALUES (?, ?, ?, ?)",
                     (report_id, index, name, drv_path))
        conn.execute("INSERT INTO report_paths (report_id, out_path, component_idx, output) VALUES (?, ?, ?, 'out')",
                     (report_id, path, index))
    conn.execute("INSERT INTO attestations (builder_id, output_path, output_hash, created_at)"
                 " VALUES ((SELECT id FROM builders WHERE name = 'alice'), ?, ?, '2024-01-01T00:00:00Z')",
                 (root, base32_form(nar_hash_bytes())))


@pytest.fixture
def migrated(tmp_path):
    """A version 1 database with representative rows, opened by `python web.py`."""
    db = tmp_path / "hashes.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((REPO / "tests" / "data" / "schema-v1.sql").read_text())
        rows = version_1_rows(conn)
    server = ServerProcess(db).start()
    yield server, rows
    server.stop()


def schema_of(conn):
    """Columns, indexes and foreign keys of every table: what the code relies on, not the SQL text
    (but for an index on an expression, whose expression only the SQL text names)."""
    tables = [name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {table: {
        "columns": conn.execute(f"PRAGMA table_info({table})").fetchall(),
        "indexes": sorted(index_of(conn, name, unique) for _seq, name, unique, *_rest in conn.execute(f"PRAGMA index_list({table})")),
        "foreign_keys": conn.execute(f"PRAGMA foreign_key_list({table})").fetchall(),
    } for table in tables}


def index_of(conn, name, unique):
    columns = tuple(column[2] for column in conn.execute(f"PRAGMA index_info({name})"))
    if None not in columns:
        return name, unique, columns
    [sql] = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)).fetchone()
    return name, unique, columns, " ".join(sql.split())


def builders(server):
    return {row["name"]: row["public_keys"] for row in requests.get(f"{server.url}/builders", timeout=TIMEOUT).json()}


def stored(server, path):
    return requests.get(f"{server.url}/attestations/by-output/{basename_of(path)}", timeout=TIMEOUT).json()


def test_migrated_database_has_the_current_schema(migrated):
    server, _rows = migrated
    fresh = sqlite3.connect(":memory:")
    fresh.executescript((REPO / "schema.sql").read_text())
    with sqlite3.connect(server.db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION
        assert schema_of(conn) == schema_of(fresh)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []


@pytest.mark.parametrize("table", ["store_paths", "derivations"])
def test_migrated_paths_are_indexed_by_their_digests_first_bytes(migrated, table):
    server, _rows = migrated
    with sqlite3.connect(server.db) as conn:
        [sql] = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (f"{table}_by_digest",)).fetchone()
        plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT id FROM {table} WHERE substr(digest, 1, 4) = ?", (b"abcd",)).fetchall()
    assert sql == f"CREATE INDEX {table}_by_digest ON {table}(substr(digest, 1, {web.DIGEST_INDEX_BYTES}))"
    assert f"USING INDEX {table}_by_digest" in plan[0][3]


def test_builders_and_their_tokens_survive(migrated):
    server, _rows = migrated
    attestation = {"output_path": out_path(), "output_hash": base32_form(nar_hash_bytes())}
    response = requests.post(f"{server.url}/attestation/{basename_of(out_path())}", json=[attestation],
                             headers=bearer(TOKENS["bob"]), timeout=TIMEOUT)
    assert response.status_code == 200


def test_a_duplicate_key_keeps_its_oldest_registration_and_is_named_at_start_up(migrated):
    server, _rows = migrated
    assert builders(server) == {"alice": [ALICE_PUBLIC], "bob": [BOB_PUBLIC], "mallory": [], "root": []}
    log = server.log.read_text()
    assert "dropped public key 'mallory-1:" in log and "already registered to 'alice'" in log


def test_attestations_verified_by_a_dropped_duplicate_key_lose_their_mark(migrated):
    server, rows = migrated
    marks = {row["builder"]: row["verified"] for row in stored(server, rows["signed"]["output_path"])}
    assert marks == {"alice": True, "mallory": False}


def test_a_dropped_key_bytes_cannot_be_registered_again_by_another_builder(migrated):
    server, _rows = migrated
    completed = subprocess.run(
        [str(REPO / "create_user"), "mallory", "--public-key", "mallory-2:" + ALICE_PUBLIC.partition(":")[2],
         "--db", str(server.db)], cwd=REPO, capture_output=True, text=True)
    assert completed.returncode != 0
    assert "already registered to builder 'alice'" in completed.stderr


def test_a_signature_stored_before_never_adds_lines_to_the_narinfo_export(migrated):
    server, rows = migrated
    digest = rows["hostile"]["output_path"][11:43]
    narinfo = requests.get(f"{server.url}/signatures/bob/{digest}.narinfo", timeout=TIMEOUT)
    assert narinfo.status_code == 200
    assert "Injected-line" not in narinfo.text
    assert [line.partition(":")[0] for line in narinfo.text.splitlines()] == [
        "StorePath", "URL", "Compression", "NarHash", "NarSize", "References"]
    assert [row["output_sig"] for row in stored(server, rows["hostile"]["output_path"])] == [HOSTILE_SIGNATURE]


def test_reports_survive_and_render(migrated):
    server, _rows = migrated
    report = requests.get(f"{server.url}/reports/old", headers={"Accept": "application/json"}, timeout=TIMEOUT).json()
    assert sorted(report["paths"]) == sorted(REPORT_PATHS)
    page = requests.get(f"{server.url}/reports/old", headers={"Accept": "text/html"}, timeout=TIMEOUT)
    assert page.status_code == 200
    assert "https://example.org/hello" in page.text
    assert "https://example.org/atomic" not in page.text  # RE2 refuses (?>…): it links nothing


def test_report_paths_made_before_keep_their_verdicts(migrated):
    server, _rows = migrated
    root, child = REPORT_PATHS
    report = requests.get(f"{server.url}/reports/old", headers={"Accept": "application/json"}, timeout=TIMEOUT).json()
    assert report["paths"] == {root: web.ONE_BUILD, child: web.NO_BUILDS}


def test_report_components_keep_their_names_and_drv_paths(migrated):
    server, _rows = migrated
    page = requests.get(f"{server.url}/reports/old", headers={"Accept": "text/html"}, timeout=TIMEOUT)
    assert all(escape(name) in page.text for name in REPORT_NAMES)
    suggested = requests.get(f"{server.url}/reports/old/suggest", timeout=TIMEOUT).json()
    assert {row["out_path"]: row.get("drv_path") for row in suggested} == dict(zip(REPORT_PATHS, REPORT_DRV_PATHS))


def same_components_again(server):
    """PUT the version 1 report's components again as revision 2; how many shared component rows there were
    before and after."""
    components = [{"bom-ref": path, "name": name, "properties": [{"name": "nix:out_path", "value": path},
                                                                 {"name": "nix:output", "value": "out"}]
                   + ([{"name": "nix:drv_path", "value": drv_path}] if drv_path else [])}
                  for path, drv_path, name in zip(REPORT_PATHS, REPORT_DRV_PATHS, REPORT_NAMES)]
    sbom = {"bomFormat": "CycloneDX", "metadata": {"component": components[0]}, "components": components[1:],
            "dependencies": [{"ref": REPORT_PATHS[0], "dependsOn": [REPORT_PATHS[1]]}]}
    with sqlite3.connect(server.db) as conn:
        before = conn.execute("SELECT COUNT(*) FROM revision_components").fetchone()[0]
    response = requests.put(f"{server.url}/reports/old", json=sbom, headers=bearer(TOKENS["alice"]), timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["revision"] == 2
    with contextlib.closing(sqlite3.connect(server.db)) as conn:
        wait_for_pending_revisions(conn)
        return before, conn.execute("SELECT COUNT(*) FROM revision_components").fetchone()[0]


def test_a_new_revision_of_the_same_components_shares_their_rows_with_revision_1(migrated):
    server, _rows = migrated
    assert same_components_again(server) == (2, 2)


def test_shared_component_rows_that_version_11_named_are_found_again(tmp_path, monkeypatch):
    """Version 11 named a shared component row by the SHA-256 of its repr; version 12 renames them, so that a
    new revision of the same components finds them rather than adding copies. The database is the version 1
    one, migrated to version 11 by this code with the names version 11 gave."""
    db = tmp_path / "hashes.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((REPO / "tests" / "data" / "schema-v1.sql").read_text())
        version_1_rows(conn)
    monkeypatch.setattr(web, "MIGRATIONS", [migration for migration in web.MIGRATIONS if migration[0] <= 11])
    monkeypatch.setattr(web, "SCHEMA_VERSION", 11)
    web.create_app({"DATABASE": str(db)})
    with sqlite3.connect(db) as conn:
        for row_id, name, drv_path, outputs in conn.execute(
                "SELECT id, name, drv_path, outputs FROM revision_components").fetchall():
            component = (name, drv_path, [tuple(output) for output in json.loads(outputs)])
            conn.execute("UPDATE revision_components SET digest = ? WHERE id = ?",
                         (hashlib.sha256(repr(component).encode()).digest()[:16], row_id))
        # A copy of a row under another name, which the new names would make the same: it keeps its old one.
        conn.execute("INSERT INTO revision_components (digest, name, drv_path, outputs)"
                     " SELECT x'00112233445566778899aabbccddeeff', name, drv_path, outputs FROM revision_components LIMIT 1")
    server = ServerProcess(db).start()
    try:
        assert same_components_again(server) == (3, 3)
    finally:
        server.stop()


def test_a_server_of_version_13_refuses_a_database_whose_revisions_may_be_pending(tmp_path, monkeypatch):
    """Version 14 may leave a revision's component ids pending (an empty blob), which version 13 cannot read."""
    web.create_app({"DATABASE": str(tmp_path / "hashes.db")})
    monkeypatch.setattr(web, "MIGRATIONS", [migration for migration in web.MIGRATIONS if migration[0] <= 13])
    monkeypatch.setattr(web, "SCHEMA_VERSION", 13)
    with pytest.raises(RuntimeError, match="unknown schema version"):
        web.create_app({"DATABASE": str(tmp_path / "hashes.db")})


def test_link_patterns_made_before_have_no_owner_and_only_admins_change_them(migrated):
    server, _rows = migrated
    listed = requests.get(f"{server.url}/link_patterns", timeout=TIMEOUT).json()
    assert [(row["pattern"], row["owner"]) for row in listed] == [("^hello-", None), ("(?>glibc)", None)]
    delete = lambda token: requests.delete(f"{server.url}/link_patterns", params={"pattern": "^hello-"},
                                           headers=bearer(token), timeout=TIMEOUT)
    assert delete(TOKENS["alice"]).status_code == 403
    assert delete(TOKENS["root"]).status_code == 200


def test_attestations_made_before_have_no_source_and_new_ones_keep_theirs(migrated):
    server, rows = migrated
    assert {row["source"] for row in stored(server, rows["signed"]["output_path"])} == {None}
    attestation = {"output_path": out_path(), "output_hash": base32_form(nar_hash_bytes()), "source": "check"}
    assert requests.post(f"{server.url}/attestation/{basename_of(out_path())}", json=[attestation],
                         headers=bearer(TOKENS["bob"]), timeout=TIMEOUT).status_code == 200
    assert [row["source"] for row in stored(server, attestation["output_path"])] == ["check"]


def test_restarting_a_migrated_server_changes_nothing(migrated):
    server, _rows = migrated
    with sqlite3.connect(server.db) as conn:
        before = list(conn.iterdump())
    server.restart()
    with sqlite3.connect(server.db) as conn:
        assert list(conn.iterdump()) == before


def test_existing_attestations_enter_the_transparency_log_once_in_id_order(migrated):
    server, _rows = migrated
    with sqlite3.connect(server.db) as conn:
        in_id_order = [f"/nix/store/{nix_base32_encode(digest[::-1])}-{name}" for digest, name in conn.execute(
            "SELECT digest, name FROM attestations JOIN store_paths ON store_paths.id = path_id ORDER BY attestations.id")]
    bundle = requests.get(f"{server.url}/log/tile/entries/000.p/{len(in_id_order)}", timeout=TIMEOUT)
    assert bundle.status_code == 200
    logged = [line.split()[1] for line in bundle.content.decode(errors="replace").split("\n") if line.startswith("output ")]
    assert logged == in_id_order
    beyond = requests.get(f"{server.url}/log/tile/entries/000.p/{len(in_id_order) + 1}", timeout=TIMEOUT)
    assert beyond.status_code == 404


def test_a_report_keeps_its_sbom_byte_for_byte(migrated):
    server, _rows = migrated
    sbom = requests.get(f"{server.url}/reports/old", headers={"Accept": "application/vnd.cyclonedx+json"}, timeout=TIMEOUT)
    assert sbom.content == b'{"bomFormat": "CycloneDX"}'


def test_a_report_made_before_version_7_is_cyclonedx_with_no_fixed_output_path(migrated):
    server, _rows = migrated
    report = requests.get(f"{server.url}/reports/old", headers={"Accept": "application/json"}, timeout=TIMEOUT).json()
    assert report["headline"] == {"reproduced": 0, "total": 2, "percent": 0.0, "fixed_output": 0}
    sbom = requests.get(f"{server.url}/reports/old", headers={"Accept": "application/vnd.cyclonedx+json"}, timeout=TIMEOUT)
    assert sbom.headers["Content-Type"] == "application/vnd.cyclonedx+json"


def test_an_existing_report_becomes_its_revision_1(migrated):
    server, _rows = migrated
    history = requests.get(f"{server.url}/reports/old/history", headers={"Accept": "application/json"},
                           timeout=TIMEOUT).json()["revisions"]
    assert [(revision["revision"], revision["label"], revision["path_count"], revision["created_at"])
            for revision in history] == [(1, None, 2, "2024-01-01T00:00:00Z")]
    assert history[0]["counts"][web.ONE_BUILD] == 1 and history[0]["counts"][web.NO_BUILDS] == 1
    first = requests.get(f"{server.url}/reports/old", params={"revision": "1"}, headers={"Accept": "application/json"},
                         timeout=TIMEOUT).json()
    assert sorted(first["paths"]) == sorted(REPORT_PATHS)
    assert requests.get(f"{server.url}/policies", timeout=TIMEOUT).json() == []


# ---------------------------------------------------------------- a database written by version 8
# tests/data/version-8.sql is a database that the server at schema version 8 filled through its API (verified
# and unverified attestations, an upgrade that kept its first log entry's bytes, ca, sources, references, a
# report and a diff); version-8-answers.json is what that server answered about it. See make_version_8_database.py.

DATA = REPO / "tests" / "data"


@pytest.fixture
def version_8(tmp_path):
    db = tmp_path / "hashes.db"
    with sqlite3.connect(db) as conn:
        conn.executescript((DATA / "version-8.sql").read_text())
    server = ServerProcess(db, ["--log-origin", "v8.example.org"]).start()
    yield server, json.loads((DATA / "version-8-answers.json").read_text())
    server.stop()


def answer(server, asked):
    accept = {"json": "application/json", "text": "text/plain"}[asked["accept"]]
    response = requests.get(server.url + asked["path"], headers={"Accept": accept}, timeout=TIMEOUT)
    return {**asked, "status": response.status_code, "body": base64.b64encode(response.content).decode()}


def test_a_version_8_database_answers_every_question_as_version_8_did(version_8):
    server, recorded = version_8
    with sqlite3.connect(server.db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION
    assert [answer(server, asked) for asked in recorded["answers"]] == [
        without_ca_line(asked) for asked in recorded["answers"]]


def without_ca_line(answer):
    """A recorded answer as it is now: a /signatures narinfo has no CA: line any more, on purpose (Nix trusts a
    content-addressed path without a signature: test_trust.py)."""
    if not answer["path"].endswith(".narinfo"):
        return answer
    lines = base64.b64decode(answer["body"]).decode().splitlines(keepends=True)
    body = "".join(line for line in lines if not line.startswith("CA: "))
    return {**answer, "body": base64.b64encode(body.encode()).decode()}


def test_a_version_8_log_keeps_its_size_and_root(version_8):
    server, recorded = version_8
    checkpoint = requests.get(f"{server.url}/log/checkpoint", timeout=TIMEOUT).text.split("\n")[:3]
    assert checkpoint == recorded["checkpoint"]


def test_a_version_8_entry_that_no_longer_rebuilds_keeps_its_bytes(version_8):
    server, _recorded = version_8
    with sqlite3.connect(server.db) as conn:
        kept = conn.execute("SELECT idx, attestation_id FROM log_entries WHERE entry IS NOT NULL").fetchall()
        relogged = conn.execute("SELECT idx, attestation_id FROM log_entries WHERE entry IS NULL").fetchall()
    assert kept == [(0, 0)] and relogged == [(2, 0)]  # the upgraded attestation: its first entry, its second


def test_a_migrated_log_grows_consistently(version_8):
    server, recorded = version_8
    old_size = int(recorded["checkpoint"][1])
    token = server.create_user("dave")
    attestation = {"output_path": out_path(), "output_hash": base32_form(nar_hash_bytes())}
    response = requests.post(f"{server.url}/attestations", json=[attestation], headers=bearer(token), timeout=TIMEOUT)
    assert response.json()["log_index"] == [old_size]
    proof = requests.get(f"{server.url}/log/proof/consistency", params={"old": old_size, "size": old_size + 1},
                         timeout=TIMEOUT).json()["hashes"]
    new_root = requests.get(f"{server.url}/log/checkpoint", timeout=TIMEOUT).text.split("\n")[2]
    assert consistency_holds(old_size, old_size + 1, base64.b64decode(recorded["checkpoint"][2]),
                             base64.b64decode(new_root), [base64.b64decode(hash_) for hash_ in proof])
    assert [entry["builder"] for entry in stored(server, attestation["output_path"])] == ["dave"]
