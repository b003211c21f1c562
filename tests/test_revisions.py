"""Report revisions, history and changes against a real server; the history chart in headless Chromium."""
import contextlib
import functools
import json
import threading

import pytest
import requests

import sbom_samples as samples
import web
from support import bearer, finished_within, wait_until
from post_build_hook import name_of

TIMEOUT = 10
JSON = {"Accept": "application/json"}
HOSTILE_LABEL = "<script>document.title='pwned'</script>\"'&amp;"
# Each revision's closure: {store-path name: children}; components are named without their version.
REVISIONS = [
    {"app-1": ["liba-1.0", "libb-1.0", "libc-1.0", "libd-1.0"], "liba-1.0": [], "libb-1.0": [], "libc-1.0": [], "libd-1.0": []},
    {"app-1": ["liba-2.0", "libb-2.0", "libc-1.0", "libd-1.0"], "liba-2.0": [], "libb-2.0": [], "libc-1.0": [], "libd-1.0": []},
    {"app-1": ["liba-3.0", "libb-3.0", "libc-1.0", "libe-1.0"], "liba-3.0": [], "libb-3.0": [], "libc-1.0": [], "libe-1.0": []},
]
# Build results: (builder, result) per store-path name; two agreeing builders reproduce a path.
RESULTS = {
    "liba-1.0": [("alice", "good"), ("bob", "good")],  # reproduced, then liba-2.0 is not: a regression
    "liba-2.0": [("alice", "good")],
    "liba-3.0": [("alice", "good"), ("bob", "good")],  # fixed again in 3
    "libb-1.0": [("alice", "good")],  # not reproduced, then libb-2.0 is: a fix
    "libb-2.0": [("alice", "good"), ("bob", "good")],
    "libb-3.0": [("alice", "good"), ("bob", "other")],  # and broken again in 3
    "libc-1.0": [("alice", "good"), ("bob", "good")],
}


def closure_of(edges):
    return samples.nix_build_sbom(edges, names={name: name.split("-")[0] for name in edges})


def put(server, token, sbom, label=None, name="revised"):
    params = {"revision": label} if label is not None else None
    return requests.put(f"{server.url}/reports/{name}", json=sbom, params=params, headers=bearer(token), timeout=TIMEOUT)


@pytest.fixture
def revised(server):
    """The report 'revised' in three revisions labelled r1, r2 and r3, with every build result posted."""
    tokens = {name: server.create_user(name) for name in ("owner", "alice", "bob")}
    for number, edges in enumerate(REVISIONS, start=1):
        response = put(server, tokens["owner"], closure_of(edges).sbom, f"r{number}")
        assert response.status_code == 200, response.text
        assert response.json()["revision"] == number
    for name, posts in RESULTS.items():
        for builder, result in posts:
            response = requests.post(f"{server.url}/attestations", json=[samples.attestation(samples.out_path(name), result)],
                                     headers=bearer(tokens[builder]), timeout=TIMEOUT)
            assert response.status_code == 200, response.text
    return tokens


def changes(server, **params):
    response = requests.get(f"{server.url}/reports/revised/changes", params=params, headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def pairs(entries):
    return [(entry["name"], name_of(entry["from"]), name_of(entry["to"])) for entry in entries]


def history(server, name="revised"):
    response = requests.get(f"{server.url}/reports/{name}/history", headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["revisions"]


def test_changes_from_1_to_2_list_exactly_the_regression_and_the_fix(server, revised):
    found = changes(server, **{"from": "1", "to": "r2"})
    assert pairs(found["regressions"]) == [("liba", "liba-1.0", "liba-2.0")]
    assert pairs(found["fixes"]) == [("libb", "libb-1.0", "libb-2.0")]
    assert found["unchanged"] == []
    assert [name_of(entry["path"]) for entry in found["added"]] == sorted(["liba-2.0", "libb-2.0"], key=samples.out_path)
    assert found["kept"] == 3


def test_changes_default_to_the_last_two_revisions(server, revised):
    found = changes(server)
    assert (found["from"]["revision"], found["to"]["revision"]) == (2, 3)
    assert pairs(found["regressions"]) == [("libb", "libb-2.0", "libb-3.0")]
    assert pairs(found["fixes"]) == [("liba", "liba-2.0", "liba-3.0")]
    assert {name_of(entry["path"]) for entry in found["removed"]} == {"liba-2.0", "libb-2.0", "libd-1.0"}
    assert {name_of(entry["path"]) for entry in found["added"]} == {"liba-3.0", "libb-3.0", "libe-1.0"}


def test_changes_pair_by_name_across_any_two_revisions(server, revised):
    found = changes(server, **{"from": "r1", "to": "r3"})
    assert found["regressions"] == []
    assert pairs(found["fixes"]) == []
    assert sorted(pairs(found["unchanged"])) == [("liba", "liba-1.0", "liba-3.0"), ("libb", "libb-1.0", "libb-3.0")]


def test_a_label_used_twice_is_409_and_changes_nothing(server, revised):
    response = put(server, revised["owner"], closure_of(REVISIONS[0]).sbom, "r2")
    assert response.status_code == 409
    assert "'r2' is already used" in response.json()["error"]
    assert [revision["revision"] for revision in history(server)] == [1, 2, 3]


@pytest.mark.parametrize("label", ["42", "", "tab\there", "x" * 129])
def test_a_bad_label_is_400(server, label):
    owner = server.create_user("owner")
    response = put(server, owner, closure_of(REVISIONS[0]).sbom, label)
    assert response.status_code == 400
    assert response.json()["error"].startswith("revision:")


def test_the_same_sbom_again_without_a_label_changes_nothing(server):
    owner = server.create_user("owner")
    sbom = closure_of(REVISIONS[0]).sbom
    assert put(server, owner, sbom).json()["revision"] == 1
    again = put(server, owner, sbom)
    assert again.json() == {"report": "revised", "status": "unchanged", "revision": 1}
    assert put(server, owner, sbom, "tagged").json()["revision"] == 2


def test_history_gives_every_revision_with_its_counts_as_of_now(server, revised):
    revisions = history(server)
    assert [(r["revision"], r["label"], r["path_count"]) for r in revisions] == [(1, "r1", 5), (2, "r2", 5), (3, "r3", 5)]
    assert [r["counts"][web.REPRODUCED] for r in revisions] == [2, 2, 2]
    assert [r["counts"][web.NONDETERMINISTIC] for r in revisions] == [0, 0, 1]
    assert [r["counts"][web.NO_BUILDS] for r in revisions] == [2, 2, 2]


def test_an_older_revision_is_shown_by_number_or_label_but_its_sbom_is_gone(server, revised):
    by_number = requests.get(f"{server.url}/reports/revised", params={"revision": "1"}, headers=JSON, timeout=TIMEOUT)
    by_label = requests.get(f"{server.url}/reports/revised", params={"revision": "r1"}, headers=JSON, timeout=TIMEOUT)
    assert by_number.json() == by_label.json()
    assert by_number.json()["paths"][samples.out_path("liba-1.0")] == web.REPRODUCED
    assert by_number.json()["revision"]["label"] == "r1"
    latest = requests.get(f"{server.url}/reports/revised", headers=JSON, timeout=TIMEOUT).json()
    assert latest["revision"]["revision"] == 3 and samples.out_path("libe-1.0") in latest["paths"]
    sbom = {"Accept": web.CYCLONEDX_TYPE}
    assert requests.get(f"{server.url}/reports/revised", params={"revision": "1"}, headers=sbom, timeout=TIMEOUT).status_code == 410
    assert requests.get(f"{server.url}/reports/revised", headers=sbom, timeout=TIMEOUT).json() == closure_of(REVISIONS[2]).sbom
    text = requests.get(f"{server.url}/reports/revised", params={"revision": "r2"}, timeout=TIMEOUT).text
    assert "liba-2.0 One build" in text
    missing = requests.get(f"{server.url}/reports/revised", params={"revision": "9"}, headers=JSON, timeout=TIMEOUT)
    assert missing.status_code == 404


def test_delete_removes_every_revision(server, revised):
    response = requests.delete(f"{server.url}/reports/revised", headers=bearer(revised["owner"]), timeout=TIMEOUT)
    assert response.status_code == 200
    assert requests.get(f"{server.url}/reports/revised/history", headers=JSON, timeout=TIMEOUT).status_code == 404
    assert put(server, revised["owner"], closure_of(REVISIONS[0]).sbom, "r1").json()["revision"] == 1


def test_only_the_owner_adds_revisions(server, revised):
    mallory = server.create_user("mallory")
    assert put(server, mallory, closure_of(REVISIONS[0]).sbom, "evil").status_code == 403


def test_changes_and_history_pages_render(server, revised):
    html = {"Accept": "text/html"}
    page = requests.get(f"{server.url}/reports/revised/changes", headers=html, timeout=TIMEOUT).text
    assert 'id="regressions">Regressions (1)' in page and 'id="fixes">Fixes (1)' in page
    page = requests.get(f"{server.url}/reports/revised/history", headers=html, timeout=TIMEOUT).text
    assert page.count('<circle class="point"') == 3


def test_the_history_chart_escapes_labels_in_chromium(server):
    from playwright.sync_api import sync_playwright  # here: the flake's sandboxed selection has no playwright
    owner = server.create_user("owner")
    for number, edges in enumerate(REVISIONS):
        label = HOSTILE_LABEL if number == 1 else None
        assert put(server, owner, closure_of(edges).sbom, label).status_code == 200
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                             args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        try:
            page = browser.new_page()
            dialogs = []
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            page.goto(f"{server.url}/reports/revised/history")
            assert page.title() != "pwned" and dialogs == []
            chart = page.locator("svg#history-chart")
            assert chart.is_visible()
            assert chart.locator("circle.point").count() == 3
            assert chart.locator("polyline").count() == 1
            labels = chart.locator("text.revision-label").all_text_contents()
            assert labels == ["1", HOSTILE_LABEL, "3"]
            assert page.locator("svg#history-chart script").count() == 0
            assert HOSTILE_LABEL in chart.locator("circle.point").nth(1).locator("title").text_content()
        finally:
            browser.close()


# ---------------------------------------------------------------- remembered component ids

def test_remembered_component_ids_are_forgotten_rather_than_grow_past_their_limit(monkeypatch):
    monkeypatch.setattr(web.KnownComponentIds, "LIMIT", 3)
    known = web.KnownComponentIds()
    known.remember({b"a": 1, b"b": 2})
    known.remember({b"c": 3, b"d": 4})
    assert known == {b"c": 3, b"d": 4}
    known.remember({b"e": 5, b"f": 6, b"g": 7, b"h": 8})
    assert known == {}


@pytest.mark.parametrize("limit", [2, 50_000], ids=["forgotten", "remembered"])
def test_every_revision_lists_its_own_paths_whether_component_ids_are_remembered_or_not(client, tokens, monkeypatch, limit):
    monkeypatch.setattr(web.KnownComponentIds, "LIMIT", limit)
    owner = tokens("owner")
    for number, edges in enumerate(REVISIONS + REVISIONS[:1], start=1):
        response = client.put("/reports/revised", json=closure_of(edges).sbom, query_string={"revision": f"r{number}"},
                              headers=bearer(owner))
        assert response.status_code == 200, response.get_json()
    for number, edges in enumerate(REVISIONS + REVISIONS[:1], start=1):
        shown = client.get("/reports/revised", query_string={"revision": str(number)}, headers=JSON).get_json()
        assert set(shown["paths"]) == {samples.out_path(name) for name in edges}


@pytest.mark.parametrize("per_chunk", [1, 2, 50_000])
def test_component_ids_found_a_chunk_at_a_time_are_those_found_at_once(tmp_path, monkeypatch, per_chunk):
    """A million-component upload's ids are found a chunk of components at a time; its paths come in any order."""
    app = web.create_app({"DATABASE": str(tmp_path / "app.db")})
    closure = samples.sbomnix_sbom(samples.DIAMOND, {"shared": ["out", "dev"]})
    contents = web.report_contents("application/json", json.dumps(closure.sbom).encode(), None, 100, 100)[1]
    shuffled = list(reversed(contents.paths))
    monkeypatch.setattr(web, "COMPONENTS_PER_ID_CHUNK", per_chunk)
    with app.app_context(), contextlib.closing(web.connect(app.config["DATABASE"])) as conn:
        store = functools.partial(web.insert_shared_components, conn)
        ids = web.revision_component_ids(conn, contents.names, contents.drv_paths, shuffled, web.KnownComponentIds(), store)
        stored = {row[0]: (row[1], row[2], json.loads(row[3])) for row in
                  conn.execute("SELECT id, name, drv_path, outputs FROM revision_components")}
    outputs = [sorted([out_path, output] for out_path, index, output in contents.paths if index == position)
               for position in range(len(contents.names))]
    assert [stored[component_id] for component_id in ids] == list(zip(contents.names, contents.drv_paths, outputs))


def test_a_new_closure_s_components_get_ids_in_the_order_it_lists_them(client, tokens, app):
    """So a revision's delta-coded list of ids compresses to a few bytes, not a few bytes per component."""
    closure = samples.nix_build_sbom({f"node{number}": [] for number in range(200)})
    assert client.put("/reports/ordered", json=closure.sbom, headers=bearer(tokens("owner"))).status_code == 200
    app.extensions["pending_revisions"].wait()
    with app.app_context():
        (packed,) = web.get_db().execute("SELECT component_ids FROM report_revisions").fetchone()
    ids = web.unpacked_ids(packed)
    assert len(ids) == 200 and ids == list(range(ids[0], ids[0] + 200))


# ---------------------------------------------------------------- component ids, written after the PUT has answered

def put_in_process(client, token, edges, label):
    response = client.put("/reports/revised", json=closure_of(edges).sbom, query_string={"revision": label},
                          headers=bearer(token))
    assert response.status_code == 200, response.get_json()


def post_results_in_process(client, tokens):
    for name, posts in RESULTS.items():
        for builder, result in posts:
            response = client.post("/attestations", json=[samples.attestation(samples.out_path(name), result)],
                                   headers=bearer(tokens(builder)))
            assert response.status_code == 200, response.get_json()


def make_pending(app, *numbers):
    """Component ids as PendingRevisions leaves them until it has written them, or a process that died for good."""
    with app.app_context(), web.transaction(web.get_db()) as conn:
        conn.execute(f"UPDATE report_revisions SET component_ids = ? WHERE number IN ({','.join('?' * len(numbers))})",
                     (web.PENDING_IDS, *numbers))


def pending_numbers(app):
    with app.app_context():
        return [row[0] for row in web.get_db().execute("SELECT number FROM report_revisions WHERE component_ids = ?"
                                                       " ORDER BY number", (web.PENDING_IDS,))]


def revision_views(client):
    """What the views that read revisions' component ids give: history and changes."""
    views = [client.get("/reports/revised/history", headers=JSON), client.get("/reports/revised/changes", headers=JSON),
             client.get("/reports/revised/changes", query_string={"from": "1"}, headers=JSON)]
    assert all(view.status_code == 200 for view in views), [view.get_json() for view in views]
    return [view.get_json() for view in views]


def test_views_of_a_latest_revision_whose_component_ids_are_pending_read_the_report_s_own_rows(client, tokens, app):
    for number, edges in enumerate(REVISIONS, start=1):
        put_in_process(client, tokens("owner"), edges, f"r{number}")
    post_results_in_process(client, tokens)
    app.extensions["pending_revisions"].wait()
    assert pending_numbers(app) == []
    written = revision_views(client)
    assert written[1]["regressions"] and written[1]["fixes"]  # the views compared below are not empty
    make_pending(app, len(REVISIONS))
    assert revision_views(client) == written


def test_a_put_stores_a_few_new_components_itself_and_leaves_more_pending(client, tokens, app, monkeypatch):
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 2)
    queued = []
    monkeypatch.setattr(app.extensions["pending_revisions"], "add", lambda *revision_ids: queued.extend(revision_ids))
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")  # five components the server has not seen
    assert pending_numbers(app) == [1] and len(queued) == 1
    with app.app_context():
        web.settle_revision(web.get_db(), queued[0], web.KnownComponentIds())
    put_in_process(client, tokens("owner"), REVISIONS[1], "r2")  # two of them changed
    assert pending_numbers(app) == [] and len(queued) == 1
    renamed = samples.nix_build_sbom(REVISIONS[1], names={name: "renamed-" + name for name in REVISIONS[1]})
    assert client.put("/reports/revised", json=renamed.sbom, query_string={"revision": "r3"},
                      headers=bearer(tokens("owner"))).status_code == 200  # the same paths, five new components
    assert pending_numbers(app) == [3] and len(queued) == 2


def test_a_report_larger_than_the_paths_remembered_still_finds_its_known_components_in_the_put(client, tokens, app, monkeypatch):
    """Past KnownReportedPaths.LIMIT nothing is remembered, so every path is unknown: that says nothing of its components."""
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 2)
    monkeypatch.setattr(web.KnownReportedPaths, "LIMIT", 3)
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    app.extensions["pending_revisions"].wait()
    queued = []
    monkeypatch.setattr(app.extensions["pending_revisions"], "add", lambda *revision_ids: queued.extend(revision_ids))
    put_in_process(client, tokens("owner"), REVISIONS[0], "r2")  # five paths: none remembered, all components known
    assert queued == [] and pending_numbers(app) == []


def another_upload_publishes_after_the_next_settle(monkeypatch):
    """The next settle_latest_revision finds nothing to do, as when another upload of the report publishes a
    pending revision between it and publish_report."""
    settle, calls = web.settle_latest_revision, []

    def settle_but_the_first(*args):
        calls.append(args)
        if len(calls) > 1:
            settle(*args)
    monkeypatch.setattr(web, "settle_latest_revision", settle_but_the_first)


@pytest.mark.parametrize("when", ["by the upload that replaces it", "after another upload publishes meanwhile"])
def test_a_revision_whose_component_ids_are_pending_gets_them_before_it_is_replaced(client, tokens, app, monkeypatch, when):
    """Only a report's latest revision may be pending: once replaced, its own rows are removed."""
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 0)  # pending, with no shared rows: settling inserts them
    monkeypatch.setattr(app.extensions["pending_revisions"], "add", lambda *revision_ids: None)  # a process that died
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    assert pending_numbers(app) == [1]
    if when == "after another upload publishes meanwhile":
        another_upload_publishes_after_the_next_settle(monkeypatch)
    put_in_process(client, tokens("owner"), REVISIONS[1], "r2")
    app.extensions["report_removals"].wait()
    assert pending_numbers(app) == [2]
    shown = client.get("/reports/revised", query_string={"revision": "1"}, headers=JSON).get_json()
    assert set(shown["paths"]) == {samples.out_path(name) for name in REVISIONS[0]}


def test_a_deleted_report_s_pending_revision_is_never_written_from_its_rows_being_removed(client, tokens, app, monkeypatch):
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 0)
    queued = []
    monkeypatch.setattr(app.extensions["pending_revisions"], "add", lambda *revision_ids: queued.extend(revision_ids))
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    remove_report = web.remove_report

    def settled_while_removing(conn, name, *args):
        web.settle_revision(conn, queued[0], web.KnownComponentIds())  # as PendingRevisions may, meanwhile
        remove_report(conn, name, *args)
    monkeypatch.setattr(web, "remove_report", settled_while_removing)
    assert client.delete("/reports/revised", headers=bearer(tokens("owner"))).status_code == 200
    with app.app_context():
        assert web.get_db().execute("SELECT COUNT(*) FROM revision_components").fetchone()[0] == 0


@pytest.mark.parametrize("most_new", [2_000, 0], ids=["the PUT", "PendingRevisions"])
def test_a_path_two_components_list_is_the_first_one_s_whether_the_put_or_pending_revisions_write_the_ids(
        client, tokens, app, monkeypatch, most_new):
    """CycloneDX lets two components list one path; the report's rows, and so its views, keep it under the first."""
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", most_new)
    def component(ref, name, out_path):
        return {"bom-ref": ref, "name": name, "properties": [{"name": "nix:out_path", "value": out_path}]}
    shared = samples.out_path("shared-1.0")
    sbom = {"bomFormat": "CycloneDX", "metadata": {"component": component("app", "app", samples.out_path("app-1"))},
            "components": [component("first", "first", shared), component("second", "second", shared)],
            "dependencies": [{"ref": "app", "dependsOn": ["first", "second"]}]}
    assert client.put("/reports/twice", json=sbom, headers=bearer(tokens("owner"))).status_code == 200
    app.extensions["pending_revisions"].wait()
    with app.app_context():
        conn = web.get_db()
        revision_id, report_id = conn.execute("SELECT id, report_id FROM report_revisions").fetchone()
        written = web.revision_components(conn, revision_id)[0]
        assert written == web.own_component_objects(conn, report_id)
        assert [component["outputs"] for component in written] == [[samples.out_path("app-1")], [shared], []]


def test_pending_revisions_go_on_after_one_fails(client, tokens, app, monkeypatch):
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 0)
    settle, failures = web.settle_revision, []

    def failing_once(*args):
        if not failures:
            failures.append(args)
            raise RuntimeError("the disk is on fire")
        settle(*args)
    monkeypatch.setattr(web, "settle_revision", failing_once)
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    app.extensions["pending_revisions"].wait()
    assert failures and pending_numbers(app) == [1]  # written when replaced, or at the next start
    put_in_process(client, tokens("owner"), REVISIONS[1], "r2")
    assert finished_within(app.extensions["pending_revisions"].wait, timeout=10) and pending_numbers(app) == []


def test_an_upload_replacing_a_revision_pending_revisions_is_writing_waits_for_it_rather_than_writing_it_again(
        client, tokens, app, monkeypatch):
    monkeypatch.setattr(web, "COMPONENTS_STORED_IN_PUT", 0)
    monkeypatch.setattr(web, "settling", web.RevisionLocks())
    read_for, in_background, release = [], threading.Event(), threading.Event()
    own_components, component_ids = web.own_components, web.revision_component_ids

    def recorded_own_components(conn, report_id):
        read_for.append(report_id)
        return own_components(conn, report_id)

    def held_in_background(*args):
        if threading.current_thread().name == "write pending revisions" and not in_background.is_set():
            in_background.set()
            release.wait(TIMEOUT)
        return component_ids(*args)
    monkeypatch.setattr(web, "own_components", recorded_own_components)
    monkeypatch.setattr(web, "revision_component_ids", held_in_background)
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    wait_until(in_background.is_set, what="PendingRevisions writing revision 1")
    with app.app_context():
        (first,) = web.get_db().execute("SELECT id FROM report_revisions WHERE number = 1").fetchone()
    failures, waited = [], []

    def replace():
        try:
            put_in_process(app.test_client(), tokens("owner"), REVISIONS[1], "r2")
        except BaseException as error:  # noqa: B036 - reported to the test's thread below
            failures.append(error)
    replacing = threading.Thread(target=replace)
    replacing.start()
    wait_until(lambda: waited.append(web.settling.locks.get(first, [None, 0])[1]) or waited[-1] == 2
               or not replacing.is_alive(), what="the upload waiting to write revision 1")
    release.set()
    replacing.join(TIMEOUT)
    app.extensions["pending_revisions"].wait()
    assert not replacing.is_alive() and failures == []
    assert 2 in waited  # the upload waited for the thread writing revision 1
    revisions = client.get("/reports/revised/history", headers=JSON).get_json()["revisions"]
    assert [revision["revision"] for revision in revisions] == [1, 2] and pending_numbers(app) == []
    assert read_for.count(read_for[0]) == 1  # revision 1's rows read once, by PendingRevisions


def test_settling_a_revision_that_is_gone_or_already_written_does_nothing(client, tokens, app, monkeypatch):
    put_in_process(client, tokens("owner"), REVISIONS[0], "r1")
    app.extensions["pending_revisions"].wait()
    monkeypatch.setattr(web, "revision_component_ids", lambda *args: pytest.fail("component ids found again"))
    with app.app_context():
        conn = web.get_db()
        before = conn.execute("SELECT id, component_ids FROM report_revisions").fetchall()
        for revision_id in (before[0][0], before[0][0] + 1):
            web.settle_revision(conn, revision_id, web.KnownComponentIds())
        assert conn.execute("SELECT id, component_ids FROM report_revisions").fetchall() == before


def test_a_server_that_starts_writes_the_component_ids_a_dead_one_left_pending(server):
    put(server, server.create_user("owner"), closure_of(REVISIONS[0]).sbom, "r1")
    server.stop()
    with contextlib.closing(web.connect(str(server.db))) as conn:
        with web.transaction(conn):
            conn.execute("UPDATE report_revisions SET component_ids = ?", (web.PENDING_IDS,))
        server.start()
        wait_until(lambda: conn.execute("SELECT component_ids FROM report_revisions").fetchone()[0] != web.PENDING_IDS,
                   what="the revision's component ids")
        revision_id, report_id = conn.execute("SELECT id, report_id FROM report_revisions").fetchone()
        assert web.revision_components(conn, revision_id) == [web.own_component_objects(conn, report_id)]
        assert {path for component in web.own_component_objects(conn, report_id) for path in component["outputs"]} == {
            samples.out_path(name) for name in REVISIONS[0]}
