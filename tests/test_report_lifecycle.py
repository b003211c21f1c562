"""Defining, redefining and deleting reports; every bad upload is refused with its own 400, changing nothing."""
import contextlib
import json
import sqlite3
import threading
import time

import pytest
import requests

import sbom_samples as samples
import web
from support import bearer, database_dump, wait_until

JSON = {"Accept": "application/json"}
CYCLONEDX = {"Accept": "application/vnd.cyclonedx+json"}
FIRST = samples.nix_build_sbom({"first-root": ["first-lib"], "first-lib": []})
SECOND = samples.sbomnix_sbom({"second-root": ["second-a", "second-b"], "second-a": [], "second-b": []})


@pytest.fixture
def defined(client, tokens):
    """Report "life" defined by "owner" from FIRST."""
    response = client.put("/reports/life", json=FIRST.sbom, headers=bearer(tokens("owner")))
    assert response.status_code == 200, response.get_json()


def dump(app):
    return database_dump(app.config["DATABASE"])


def report_paths(client, name="life"):
    response = client.get(f"/reports/{name}", headers=JSON)
    return set(response.get_json()["paths"]) if response.status_code == 200 else response.status_code


# ---------------------------------------------------------------- redefinition

def test_redefinition_replaces_the_paths(client, tokens, defined):
    client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
    assert report_paths(client) == SECOND.all_paths


def test_redefinition_replaces_the_root(client, tokens, defined):
    client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
    assert client.get("/reports/life", headers=JSON).get_json()["root"] == SECOND.root


def test_redefinition_replaces_the_stored_sbom(client, tokens, defined):
    client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
    assert client.get("/reports/life", headers=CYCLONEDX).get_json() == SECOND.sbom


def test_redefinition_keeps_one_report_of_that_name(client, tokens, defined):
    client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
    client.put("/reports/life", json=FIRST.sbom, headers=bearer(tokens("owner")))
    assert client.get("/reports").get_json() == ["life"]


def test_redefinition_leaves_no_rows_of_the_old_report(app, client, tokens, defined):
    client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
    app.extensions["report_removals"].wait()  # the replaced copy goes after the PUT has answered
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        stored = {row[0] for row in conn.execute("SELECT out_path FROM report_paths")}
    finally:
        conn.close()
    assert stored == SECOND.all_paths


def test_replaced_copies_are_removed_whole_a_chunk_of_rows_at_a_time(app, client, tokens, monkeypatch):
    """SECOND has 3 components and paths, FIRST 2: removed 2 rows per transaction, one copy leaves a partial
    last chunk and the other none."""
    monkeypatch.setattr(web, "ROWS_PER_TRANSACTION", 2)
    monkeypatch.setattr(web, "COMPONENTS_PER_PIECE", 2)
    for sbom in (SECOND.sbom, FIRST.sbom, SECOND.sbom):
        assert client.put("/reports/life", json=sbom, headers=bearer(tokens("owner"))).status_code == 200
        app.extensions["report_removals"].wait()
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        rows = {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("reports", "report_component_pieces", "report_paths", "report_sbom_pieces")}
    finally:
        conn.close()
    assert rows == {"reports": 1, "report_component_pieces": 2, "report_paths": 3, "report_sbom_pieces": 1}


def test_an_upload_written_a_row_a_statement_with_one_statement_ahead_is_stored_whole(app, client, tokens, monkeypatch):
    """The request thread makes the statements while the writer's thread runs them, one waiting at most."""
    monkeypatch.setattr(web, "ROWS_PER_TRANSACTION", 1)
    monkeypatch.setattr(web, "COMPONENTS_PER_PIECE", 1)
    monkeypatch.setattr(web, "ROW_STATEMENTS_AHEAD", 1)
    assert client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner"))).status_code == 200
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        pieces = conn.execute("SELECT piece FROM report_component_pieces ORDER BY seq").fetchall()
        stored = {path for (path,) in conn.execute("SELECT out_path FROM report_paths")}
    finally:
        conn.close()
    assert [json.loads(piece)[0][0] for (piece,) in pieces] == ["second-root", "second-a", "second-b"]
    assert stored == SECOND.all_paths
    page = client.get("/reports/life", headers={"Accept": "text/plain"}).get_data(as_text=True)
    assert all(path in page for path in SECOND.all_paths)


def rows_of_reports(app):
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        return conn.execute("SELECT COUNT(*) FROM report_paths").fetchone()[0]
    finally:
        conn.close()


def test_a_replaced_copy_is_removed_once_no_upload_is_being_written(app, client, tokens, defined):
    """The next upload's writes come first: a removal that started waits between chunks, and does not hold
    the write lock meanwhile."""
    removals = app.extensions["report_removals"]
    with removals.upload_under_way():  # as another upload would be
        client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
        time.sleep(0.5)
        while_writing = rows_of_reports(app)
        assert web.process_write_lock.acquire(timeout=1)
        web.process_write_lock.release()
    removals.wait()
    assert (while_writing, rows_of_reports(app)) == (len(FIRST.all_paths) + len(SECOND.all_paths), len(SECOND.all_paths))


def test_a_replaced_copy_is_removed_once_no_view_is_being_rendered(app, client, tokens, defined):
    """The new revision's first views, rendered right after the PUT, come first too."""
    removals, views = app.extensions["report_removals"], app.extensions["report_views"]
    views.rendering["a render"] = None  # as ReportViews notes a render under way
    try:
        client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
        time.sleep(0.5)
        while_rendering = rows_of_reports(app)
    finally:
        del views.rendering["a render"]
    removals.wait()
    assert (while_rendering, rows_of_reports(app)) == (len(FIRST.all_paths) + len(SECOND.all_paths), len(SECOND.all_paths))


def test_a_stream_of_uploads_does_not_keep_a_replaced_copy_for_ever(app, client, tokens, defined, monkeypatch):
    monkeypatch.setattr(web, "REMOVAL_WAIT_S", 0.2)
    with app.extensions["report_removals"].upload_under_way():
        client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner")))
        app.extensions["report_removals"].wait()
        assert rows_of_reports(app) == len(SECOND.all_paths)


def test_a_burst_of_uploads_leaves_a_bounded_backlog_of_replaced_copies(app, client, tokens, defined):
    """Past REMOVAL_BACKLOG copies waiting, removals go on while uploads are under way."""
    with app.extensions["report_removals"].upload_under_way():
        for sbom in [SECOND, FIRST] * 3:
            assert client.put("/reports/life", json=sbom.sbom, headers=bearer(tokens("owner"))).status_code == 200
        wait_until(lambda: replaced_copies(app) <= web.REMOVAL_BACKLOG + 1, timeout=5, what="a short backlog")


def replaced_copies(app):
    with contextlib.closing(sqlite3.connect(app.config["DATABASE"])) as conn:
        return conn.execute("SELECT COUNT(*) FROM reports WHERE name LIKE '.replaced-%'").fetchone()[0]


def test_a_replaced_copy_a_crash_left_behind_is_removed_by_the_next_upload(app, client, tokens, defined):
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        with conn:  # what a process that died before ReportRemovals finished leaves: the old copy, renamed
            conn.execute("UPDATE reports SET name = '.replaced-crashed' WHERE name = 'life'")
        client.put("/reports/other", json=SECOND.sbom, headers=bearer(tokens("owner")))
        app.extensions["report_removals"].wait()
        names = [row[0] for row in conn.execute("SELECT name FROM reports")]
        paths = {row[0] for row in conn.execute("SELECT out_path FROM report_paths")}
    finally:
        conn.close()
    assert (names, paths) == (["other"], SECOND.all_paths)


def test_redefinition_by_another_builder_is_403_and_changes_nothing(app, client, tokens, defined):
    mallory = tokens("mallory")
    before = dump(app)
    response = client.put("/reports/life", json=SECOND.sbom, headers=bearer(mallory))
    assert response.status_code == 403
    assert dump(app) == before


def test_admin_may_redefine_another_builders_report(client, tokens, defined):
    response = client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("root", "--admin")))
    assert response.status_code == 200
    assert report_paths(client) == SECOND.all_paths


def test_readers_see_old_or_new_report_never_a_mix_during_redefinition(server):
    """Atomic replacement: while one client redefines, every read sees one whole report."""
    token = server.create_user("owner")
    url = f"{server.url}/reports/life"
    assert requests.put(url, json=FIRST.sbom, headers=bearer(token), timeout=10).status_code == 200
    seen, failures, done = [], [], threading.Event()

    def read():
        with requests.Session() as session:
            while not done.is_set():
                response = session.get(url, headers=JSON, timeout=10)
                if response.status_code != 200:
                    failures.append(response.status_code)
                else:
                    seen.append(frozenset(response.json()["paths"]))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        with requests.Session() as session:
            for number in range(20):
                sbom = (SECOND if number % 2 == 0 else FIRST).sbom
                assert session.put(url, json=sbom, headers=bearer(token), timeout=10).status_code == 200
    finally:
        done.set()
        reader.join(timeout=30)
    assert failures == []
    assert set(seen) <= {frozenset(FIRST.all_paths), frozenset(SECOND.all_paths)}


# ---------------------------------------------------------------- deletion

def test_delete_needs_a_token(app, client, defined):
    before = dump(app)
    assert client.delete("/reports/life").status_code == 401
    assert dump(app) == before


def test_delete_with_unknown_token_is_401(client, defined):
    assert client.delete("/reports/life", headers=bearer("nope")).status_code == 401
    assert report_paths(client) == FIRST.all_paths


def test_owner_deletes_report(client, tokens, defined):
    assert client.delete("/reports/life", headers=bearer(tokens("owner"))).status_code == 200
    assert client.get("/reports/life", headers=JSON).status_code == 404
    assert client.get("/reports").get_json() == []


def test_delete_by_another_builder_is_403_and_changes_nothing(app, client, tokens, defined):
    mallory = tokens("mallory")
    before = dump(app)
    assert client.delete("/reports/life", headers=bearer(mallory)).status_code == 403
    assert dump(app) == before


def test_admin_deletes_another_builders_report(client, tokens, defined):
    assert client.delete("/reports/life", headers=bearer(tokens("root", "--admin"))).status_code == 200
    assert client.get("/reports/life", headers=JSON).status_code == 404


def test_deleting_unknown_report_is_404(client, tokens):
    assert client.delete("/reports/nothing", headers=bearer(tokens("owner"))).status_code == 404


def test_delete_removes_report_rows(app, client, tokens, defined):
    client.delete("/reports/life", headers=bearer(tokens("owner")))
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        counts = [conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                  for table in ("reports", "report_component_pieces", "report_paths")]
    finally:
        conn.close()
    assert counts == [0, 0, 0]


def test_report_can_be_defined_again_after_deletion(client, tokens, defined):
    client.delete("/reports/life", headers=bearer(tokens("owner")))
    assert client.put("/reports/life", json=SECOND.sbom, headers=bearer(tokens("owner"))).status_code == 200
    assert report_paths(client) == SECOND.all_paths


# ---------------------------------------------------------------- bad uploads

def sbom_without(key):
    sbom = json.loads(json.dumps(FIRST.sbom))
    del sbom[key]
    return sbom


def sbom_without_store_paths():
    return {"bomFormat": "CycloneDX", "specVersion": "1.5",
            "metadata": {"component": {"type": "application", "bom-ref": "pkg:npm/left-pad@1.3.0", "name": "left-pad"}},
            "components": [{"type": "library", "bom-ref": "pkg:npm/is-even@1.0.0", "name": "is-even"}],
            "dependencies": [{"ref": "pkg:npm/left-pad@1.3.0", "dependsOn": ["pkg:npm/is-even@1.0.0"]}]}


BAD_BODIES = [
    pytest.param(b"", "empty", id="empty-body"),
    pytest.param(b"{not json", "not JSON", id="not-json"),
    pytest.param(b"\xff\xfe\x00garbage", "not UTF-8", id="binary-garbage"),
    pytest.param(json.dumps([1, 2]).encode(), "CycloneDX", id="json-list-not-cyclonedx"),
    pytest.param(json.dumps({"spdxVersion": "SPDX-2.3"}).encode(), "CycloneDX", id="spdx-not-cyclonedx"),
    pytest.param(json.dumps({**FIRST.sbom, "bomFormat": "SPDX"}).encode(), "CycloneDX", id="wrong-bom-format"),
    pytest.param(json.dumps(sbom_without("metadata")).encode(), "no root", id="no-metadata"),
    pytest.param(json.dumps({**FIRST.sbom, "metadata": {"timestamp": "now"}}).encode(), "no root", id="no-root-component"),
    pytest.param(json.dumps({**FIRST.sbom, "metadata": {"component": {"name": "x"}}}).encode(), "no root",
                 id="root-without-bom-ref"),
    pytest.param(json.dumps(sbom_without_store_paths()).encode(), "no store path", id="no-store-path"),
]


@pytest.mark.parametrize("body, reason", BAD_BODIES)
def test_bad_upload_is_400_naming_the_reason(client, tokens, defined, body, reason):
    response = client.put("/reports/life", data=body,
                          headers={**bearer(tokens("owner")), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert reason in response.get_json()["error"]


@pytest.mark.parametrize("body, reason", BAD_BODIES)
def test_bad_upload_over_existing_report_changes_nothing(app, client, tokens, defined, body, reason):
    before = dump(app)
    client.put("/reports/life", data=body, headers={**bearer(tokens("owner")), "Content-Type": "application/json"})
    assert dump(app) == before


@pytest.mark.parametrize("body, reason", BAD_BODIES)
def test_bad_upload_under_new_name_creates_nothing(app, client, tokens, defined, body, reason):
    before = dump(app)
    client.put("/reports/other", data=body, headers={**bearer(tokens("owner")), "Content-Type": "application/json"})
    assert dump(app) == before
    assert client.get("/reports").get_json() == ["life"]


@pytest.mark.parametrize("name", [".hidden", "with%20space", "a" * 129, "semi;colon", "quote%22d", "%3Cscript%3E",
                                  "caf%C3%A9"])
def test_bad_report_name_is_400_and_changes_nothing(app, client, tokens, defined, name):
    before = dump(app)
    response = client.put(f"/reports/{name}", json=SECOND.sbom, headers=bearer(tokens("owner")))
    assert response.status_code == 400
    assert "report name" in response.get_json()["error"]
    assert dump(app) == before


@pytest.mark.parametrize("name", ["gnome-iso", "nixos_24.05", "A1", "x" * 128])
def test_url_safe_report_names_are_accepted(client, tokens, name):
    assert client.put(f"/reports/{name}", json=FIRST.sbom, headers=bearer(tokens("owner"))).status_code == 200


def test_put_without_token_is_401_and_changes_nothing(app, client, defined):
    before = dump(app)
    assert client.put("/reports/life", json=SECOND.sbom).status_code == 401
    assert dump(app) == before


def test_readme_curl_flow_defines_a_report(server):
    """The lila README recipe: curl -X PUT --data @sbom.cdx.json -H 'Content-Type: application/json' ..."""
    token = server.create_user("readme")
    response = requests.put(f"{server.url}/reports/readme", data=json.dumps(FIRST.sbom).encode(),
                            headers={**bearer(token), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 200
    page = requests.get(f"{server.url}/reports/readme", headers={"Accept": "text/html,*/*;q=0.8"}, timeout=10)
    assert page.headers["Content-Type"].startswith("text/html")
    assert FIRST.root in page.text
