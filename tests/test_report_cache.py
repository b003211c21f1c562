"""Cached report views: ETag and 304, a render per change of the report, the trust policy in the key,
at most MAX_STALE_S of staleness, and the page saying how old it is."""
import concurrent.futures
import contextlib
import threading
import time
from datetime import datetime, timezone

import pytest
import requests

import sbom_samples as samples
import web
from support import bearer

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
TEXT = {"Accept": "text/plain"}
CYCLONEDX = {"Accept": "application/vnd.cyclonedx+json"}
FORMATS = [HTML, TEXT, JSON, CYCLONEDX]
CLOSURE = {"cache-root": ["cache-lib"], "cache-lib": []}


@pytest.fixture
def closure():
    return samples.nix_build_sbom(CLOSURE)


@pytest.fixture
def report(client, tokens, closure):
    """Report "cached": cache-lib built once by alice (one build), the root unbuilt."""
    put = client.put("/reports/cached", json=closure.sbom, headers=bearer(tokens("owner")))
    assert put.status_code == 200, put.get_json()
    attest(client, tokens("alice"), closure.out("cache-lib"), "good")
    return closure


@pytest.fixture
def renders(monkeypatch):
    """The report views rendered so far, as (path, query, format)."""
    rendered = []
    render = web.render_view_job

    def counting_render(path, query_string, wanted):
        rendered.append((path, query_string, wanted))
        return render(path, query_string, wanted)
    monkeypatch.setattr(web, "render_view_job", counting_render)
    return rendered


def attest(client, token, path, result):
    response = client.post("/attestations", json=[samples.attestation(path, result)], headers=bearer(token))
    assert response.status_code == 200, response.get_json()


def verdict_of(client, path, query=None):
    response = client.get("/reports/cached", headers=JSON, query_string=query)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["paths"][path]


@pytest.mark.parametrize("accept", FORMATS, ids=lambda accept: accept["Accept"])
def test_a_view_asked_again_with_its_etag_is_304(client, report, accept):
    first = client.get("/reports/cached", headers=accept)
    assert first.status_code == 200 and first.headers["ETag"]
    again = client.get("/reports/cached", headers={**accept, "If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304
    assert again.data == b""
    assert again.headers["ETag"] == first.headers["ETag"]


def test_a_view_asked_with_another_etag_is_sent_whole(client, report):
    response = client.get("/reports/cached", headers={**JSON, "If-None-Match": '"something-else"'})
    assert response.status_code == 200
    assert response.get_json()["name"] == "cached"


def test_an_unchanged_report_is_rendered_once_per_format(client, report, renders):
    for _ in range(3):
        for accept in (HTML, TEXT, JSON):
            assert client.get("/reports/cached", headers=accept).status_code == 200
    assert sorted(wanted for _path, _query, wanted in renders) == ["application/json", "text/html", "text/plain"]


def test_an_attestation_that_changes_a_verdict_shows_in_the_next_view(client, tokens, report):
    library = report.out("cache-lib")
    before = client.get("/reports/cached", headers=JSON)
    assert before.get_json()["paths"][library] == web.ONE_BUILD
    attest(client, tokens("bob"), library, "good")
    after = client.get("/reports/cached", headers=JSON)
    assert after.get_json()["paths"][library] == web.REPRODUCED
    assert after.headers["ETag"] != before.headers["ETag"]


def test_an_attestation_on_another_report_keeps_the_view(client, tokens, report, renders):
    other = samples.nix_build_sbom({"other-root": []})
    assert client.put("/reports/other", json=other.sbom, headers=bearer(tokens("owner"))).status_code == 200
    client.get("/reports/cached", headers=JSON)
    attest(client, tokens("bob"), other.out("other-root"), "good")
    client.get("/reports/cached", headers=JSON)
    assert len(renders) == 1


@pytest.mark.parametrize("query, expected", [
    ({}, web.ONE_BUILD),
    ({"trust": "alice,bob", "min": "2"}, web.ONE_BUILD),
    ({"trust": "bob,carol", "min": "2"}, web.NO_BUILDS),
    ({"trust": "carol,bob", "min": "2"}, web.NO_BUILDS),
    ({"trust": "alice,bob,carol", "min": "3"}, web.ONE_BUILD),
], ids=["default", "alice-bob", "bob-carol", "carol-bob", "min-3"])
def test_trust_parameters_never_share_a_cache_entry(client, tokens, report, query, expected):
    for name in ("bob", "carol"):
        tokens(name)
    library = report.out("cache-lib")
    for other in ({}, {"trust": "bob,carol", "min": "2"}, {"trust": "alice,bob", "min": "2"}):
        verdict_of(client, library, other)  # every other policy's view is cached first
    assert verdict_of(client, library, query) == expected


def test_a_named_policy_and_its_parameters_are_separate_entries(client, tokens, report):
    for name in ("bob", "carol"):
        tokens(name)
    put = client.put("/policies/bob-carol", json={"trust": ["bob", "carol"]}, headers=bearer(tokens("owner")))
    assert put.status_code == 200, put.get_json()
    plain = client.get("/reports/cached", headers=HTML, query_string={"trust": "bob,carol", "min": "2"}).get_data(as_text=True)
    named = client.get("/reports/cached", headers=HTML, query_string={"policy": "bob-carol"}).get_data(as_text=True)
    assert "policy=bob-carol" in named  # its links carry the policy's name
    assert "policy=bob-carol" not in plain


def test_a_new_link_pattern_shows_in_the_next_page(client, tokens, report):
    assert "https://example.org/issue/7" not in client.get("/reports/cached", headers=HTML).get_data(as_text=True)
    posted = client.post("/link_patterns", query_string={"pattern": "^cache-lib$", "link": "https://example.org/issue/7"},
                         headers=bearer(tokens("owner")))
    assert posted.status_code == 200, posted.get_json()
    assert "https://example.org/issue/7" in client.get("/reports/cached", headers=HTML).get_data(as_text=True)


def test_the_page_says_as_of_when_its_verdicts_are(client, report):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    response = client.get("/reports/cached", headers=HTML)
    after = datetime.now(timezone.utc)
    html = response.get_data(as_text=True)
    as_of = html.split('id="as-of"', 1)[1].split('<time datetime="', 1)[1].split('"', 1)[0]
    assert before <= datetime.strptime(as_of, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc) <= after
    assert f"up to {web.MAX_STALE_S:g} seconds" in html
    assert int(response.headers["Age"]) >= 0
    assert response.headers["Last-Modified"]


def test_a_page_rendered_again_with_the_same_verdicts_keeps_its_etag(client, tokens, report, renders, monkeypatch):
    """Only the time the page says its verdicts are from differs; a browser asking again gets 304."""
    first = client.get("/reports/cached", headers=HTML)
    ticks = iter(range(1, 100))
    monkeypatch.setattr(web, "iso_time", lambda _seconds: f"2030-01-01T00:00:{next(ticks):02}Z")
    put = client.put("/policies/unrelated", json={"trust": ["alice", "owner"]}, headers=bearer(tokens("owner")))
    assert put.status_code == 200  # any write but an attestation: every view is rendered again
    again = client.get("/reports/cached", headers={**HTML, "If-None-Match": first.headers["ETag"]})
    assert len(renders) == 2 and again.status_code == 304
    whole = client.get("/reports/cached", headers=HTML)
    assert "2030-01-01T00:00:" in whole.get_data(as_text=True) and whole.headers["ETag"] == first.headers["ETag"]
    assert first.headers["ETag"].startswith('W/"')  # the bytes differ
    attest(client, tokens("bob"), report.out("cache-lib"), "good")
    assert client.get("/reports/cached", headers=HTML).headers["ETag"] != first.headers["ETag"]


def test_a_view_larger_than_half_the_cache_is_kept_apart_and_keeps_the_others(client, report, renders, monkeypatch):
    """One at a time: a large view (or upload) does not push the other views out, and is not rendered again either."""
    small = len(client.get("/reports/cached", headers=JSON).data)
    monkeypatch.setattr(web, "LARGEST_CACHED_VIEW_BYTES", small + 1)
    for _ in range(2):
        assert client.get("/reports/cached", headers=HTML).status_code == 200  # larger than that
        assert client.get("/reports/cached", headers=JSON).status_code == 200
    assert [wanted for _path, _query, wanted in renders] == ["application/json", "text/html"]
    views = client.application.extensions["report_views"]
    assert [key[2] for key in views.large] == ["text/html"] and all(len(view.body) <= small + 1 for view in views.views.values())
    trusted = {"trust": "alice,owner", "min": "2"}
    assert client.get("/reports/cached", headers=HTML, query_string=trusted).status_code == 200  # in its place
    assert client.get("/reports/cached", headers=HTML).status_code == 200
    assert [query for _path, query, _wanted in renders[2:]] == ["trust=alice,owner&min=2", ""]
    assert client.get("/reports/cached", headers=JSON).status_code == 200 and len(renders) == 4


@pytest.mark.parametrize("path", ["/reports/cached", "/reports", "/reports/cached/history"])
def test_views_chosen_by_accept_say_so_in_vary(client, report, path):
    assert "Accept" in client.get(path, headers=HTML).headers.get("Vary", "")


def test_a_type_refused_with_q_0_is_not_chosen(client, report):
    response = client.get("/reports/cached", headers={"Accept": "application/json;q=0, text/html"})
    assert response.mimetype == "text/html"
    response = client.get("/reports/cached", headers={"Accept": "application/vnd.cyclonedx+json;q=0, text/plain"})
    assert response.mimetype == "text/plain"


def test_other_formats_say_their_age_in_headers(client, report):
    for accept in (TEXT, JSON):
        response = client.get("/reports/cached", headers=accept)
        assert int(response.headers["Age"]) >= 0
        assert response.last_modified is not None


@pytest.fixture
def counted(monkeypatch):
    """The verdict counts computed so far (the index's and the badge's), as (report id, policy)."""
    computed = []
    count = web.render_counts_job
    monkeypatch.setattr(web, "render_counts_job", lambda report_id, policy: computed.append((report_id, policy))
                        or count(report_id, policy))
    return computed


def test_the_index_counts_come_from_the_view_cache(client, tokens, report, counted):
    for _ in range(3):
        assert client.get("/reports", headers=HTML).status_code == 200
    assert len(counted) == 1
    attest(client, tokens("bob"), report.out("cache-lib"), "good")
    assert client.get("/reports", headers=HTML).status_code == 200
    assert len(counted) == 2


def test_the_badge_counts_come_from_the_view_cache_per_policy(client, tokens, report, counted):
    tokens("bob")
    for _ in range(3):
        assert client.get("/reports/cached/badge.svg").status_code == 200
    assert client.get("/reports", headers=HTML).status_code == 200  # the same counts as the badge's
    assert len(counted) == 1
    for _ in range(2):
        assert client.get("/reports/cached/badge.svg", query_string={"trust": "alice,bob"}).status_code == 200
    assert [policy.builders for _report_id, policy in counted] == [None, ("alice", "bob")]
    attest(client, tokens("bob"), report.out("cache-lib"), "good")
    assert b"50.00%" in client.get("/reports/cached/badge.svg").get_data()  # cache-lib reproduced, the root not
    assert len(counted) == 3


def test_a_new_revision_is_parsed_without_the_views_of_the_one_it_replaces(client, tokens, report, monkeypatch):
    other = samples.nix_build_sbom({"other-root": []})
    assert client.put("/reports/other", json=other.sbom, headers=bearer(tokens("owner"))).status_code == 200
    for name in ("cached", "other"):
        assert client.get(f"/reports/{name}", headers=HTML).status_code == 200
    views = client.application.extensions["report_views"]
    with contextlib.closing(web.connect(client.application.config["DATABASE"])) as conn:
        report_ids = {name: web.find_report(conn, name)["id"] for name in ("cached", "other")}
    kept_during_parse = []
    parse = web.report_contents

    def noting_parse(*args, **options):
        kept_during_parse.extend(key[0] for key in views.views)
        return parse(*args, **options)
    monkeypatch.setattr(web, "report_contents", noting_parse)
    changed = samples.nix_build_sbom({**CLOSURE, "cache-root": ["cache-lib", "cache-new"], "cache-new": []})
    assert client.put("/reports/cached", json=changed.sbom, headers=bearer(tokens("owner"))).status_code == 200
    assert kept_during_parse == [report_ids["other"]]


# ---------------------------------------------------------------- the staleness rule, with a render held back

class HeldRenders:
    """A ReportViews whose renders wait until released: what a request sees while a render is under way."""

    def __init__(self, app):
        self.views = web.ReportViews(app)
        self.views.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self.release = threading.Event()
        self.numbers = iter(range(1, 100))

    def job(self, held=False):
        def render():
            started = time.time()
            if held:
                assert self.release.wait(10)
            return started, 200, "text/plain", f"render {next(self.numbers)}".encode(), "etag"
        return (render,)

    def start_view(self, counter):
        """A request in another thread whose render is held; returns once that render is under way."""
        self.requests = concurrent.futures.ThreadPoolExecutor(max_workers=2)
        started = self.requests.submit(self.views.view, "key", counter, self.job(held=True), time.time())
        deadline = time.monotonic() + 10
        while "key" not in self.views.rendering and time.monotonic() < deadline:
            time.sleep(0.01)
        return started


def test_a_view_under_render_again_is_served_as_it_was_within_the_bound(app):
    held = HeldRenders(app)
    first = held.views.view("key", (0, 1), held.job(), time.time())
    starter = held.start_view((0, 2))  # the report changed: this request starts a render and waits for it
    try:
        # A request while that render is under way gets the last view, which began MAX_STALE_S before it ...
        assert held.views.view("key", (0, 2), held.job(), first.started + web.MAX_STALE_S).body == b"render 1"
        assert not starter.done()
    finally:
        held.release.set()
    # ... and the request that started the render gets the new one.
    assert starter.result(timeout=10).body == b"render 2"


def test_a_view_older_than_the_bound_is_never_served_after_a_change(app):
    held = HeldRenders(app)
    first = held.views.view("key", (0, 1), held.job(), time.time())
    held.start_view((0, 2))
    late = held.requests.submit(held.views.view, "key", (0, 2), held.job(), first.started + web.MAX_STALE_S + 0.01)
    held.release.set()
    assert late.result(timeout=10).body == b"render 2"


def test_a_quiet_server_renders_a_changed_view_before_answering(app):
    held = HeldRenders(app)
    held.views.view("key", (0, 1), held.job(), time.time())
    held.release.set()
    assert held.views.view("key", (0, 2), held.job(held=True), time.time()).body == b"render 2"


# ---------------------------------------------------------------- against a real server and its render worker

def test_the_worker_shows_a_new_verdict_within_the_bound(server, closure):
    owner, alice, bob = (server.create_user(name) for name in ("owner", "alice", "bob"))
    put = requests.put(f"{server.url}/reports/cached", json=closure.sbom, headers=bearer(owner), timeout=30)
    assert put.status_code == 200, put.text
    library = closure.out("cache-lib")
    for token in (alice, bob):
        first = requests.get(f"{server.url}/reports/cached", headers=JSON, timeout=30)
        assert first.status_code == 200, first.text
        posted = requests.post(f"{server.url}/attestations", json=[samples.attestation(library)],
                               headers=bearer(token), timeout=30)
        assert posted.status_code == 200, posted.text
    time.sleep(web.MAX_STALE_S)
    after = requests.get(f"{server.url}/reports/cached", headers=JSON, timeout=30)
    assert after.json()["paths"][library] == web.REPRODUCED
    assert requests.get(f"{server.url}/reports/cached", headers={**JSON, "If-None-Match": after.headers["ETag"]},
                        timeout=30).status_code == 304


def test_a_view_beyond_the_renders_allowed_is_refused_unless_the_last_is_within_the_bound(app, monkeypatch):
    monkeypatch.setattr(web, "MAX_RENDERS", 1)
    held = HeldRenders(app)
    old = held.views.view("another key", (0, 0), held.job(), time.time())
    starter = held.start_view((0, 1))
    try:
        assert held.views.view("another key", (0, 1), held.job(), old.started + web.MAX_STALE_S).body == b"render 1"
        with pytest.raises(web.ViewsBusy, match="1 other views are being rendered"):
            held.views.view("another key", (0, 1), held.job(), old.started + web.MAX_STALE_S + 0.01)
    finally:
        held.release.set()
    assert starter.result(timeout=10).body == b"render 2"
    assert held.views.view("another key", (0, 1), held.job(), time.time()).body == b"render 3"


def test_a_busy_render_worker_answers_503_with_retry_after(client, report, monkeypatch):
    def busy(*_args):
        raise web.ViewsBusy("8 other views are being rendered")
    monkeypatch.setattr(client.application.extensions["report_views"], "view", busy)
    for path in ("/reports/cached", "/reports/cached/history", "/reports/cached/changes"):
        response = client.get(path, headers=JSON)
        assert response.status_code == 503 and response.headers["Retry-After"] == str(web.VIEW_RETRY_AFTER_S)
        assert response.get_json() == {"error": f"8 other views are being rendered; retry in {web.VIEW_RETRY_AFTER_S} seconds",
                                       "detail": f"8 other views are being rendered; retry in {web.VIEW_RETRY_AFTER_S} seconds"}


def test_history_and_changes_are_rendered_once_per_change(client, tokens, report, renders):
    changed = samples.nix_build_sbom({**CLOSURE, "cache-root": ["cache-lib", "cache-new"], "cache-new": []})
    assert client.put("/reports/cached", json=changed.sbom, headers=bearer(tokens("owner"))).status_code == 200
    for _ in range(2):
        for path in ("/reports/cached/history", "/reports/cached/changes", "/reports/cached/changes?from=1&to=2"):
            for accept in (JSON, HTML):
                assert client.get(path, headers=accept).status_code == 200
    assert len(renders) == 4  # from=1&to=2 names the default two revisions: the same view
    before = client.get("/reports/cached/history", headers=JSON)
    attest(client, tokens("bob"), report.out("cache-lib"), "good")
    after = client.get("/reports/cached/history", headers=JSON)
    assert len(renders) == 5 and after.headers["ETag"] != before.headers["ETag"]
    assert after.get_json()["revisions"][-1]["counts"][web.REPRODUCED] == 1
    assert client.get("/reports/cached/history", headers={**JSON, "If-None-Match": after.headers["ETag"]}).status_code == 304
