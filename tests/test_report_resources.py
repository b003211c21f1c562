"""Large reports within bounds: limits with 413, deduplicated edges, upload slots with 503,
chunked publishing that writers and readers never wait on, and an index that does not recount."""
import json
import os
import re
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

import sbom_samples as samples
import web
from post_build_hook import STORE_DIR
from attestation_samples import create_user_in_process
from support import bearer, wait_until

JSON = {"Accept": "application/json"}
HTML = {"Accept": "text/html"}
LONG = os.environ.get("HASH_COLLECTION_LONG_TESTS", "") not in ("", "0")


def tiny_component_sbom(count):
    """An SBOM of `count` components with nothing but a bom-ref each, as JSON text: the most paths per byte."""
    refs = [f"{STORE_DIR}/{samples.digest_of(str(number))}-a" for number in range(count)]
    return json.dumps(samples.cyclonedx({"bom-ref": samples.out_path("tiny-root")},
                                        [{"bom-ref": ref} for ref in refs], []), separators=(",", ":"))


def put(url, token, name, sbom_text, timeout=600):
    return requests.put(f"{url}/reports/{name}", data=sbom_text, timeout=timeout,
                        headers={**bearer(token), "Content-Type": "application/json"})


def unpublished_reports(db):
    with sqlite3.connect(db) as conn:
        return unpublished_in(conn)


def unpublished_in(conn):
    return conn.execute("SELECT name, (SELECT COUNT(*) FROM report_paths WHERE report_id = reports.id)"
                        " FROM reports WHERE name LIKE '.%'").fetchall()


def hold_write_lock_once(holder, condition, timeout, what):
    """Takes the write lock as soon as condition(holder) holds under it: what it saw stays so while held.

    holder has no busy timeout and tries again at once: SQLite's busy handler sleeps for milliseconds,
    long enough for an upload writing chunk after chunk to take every turn and finish meanwhile.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            holder.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # locked: the upload is writing a chunk
            continue
        if condition(holder):
            return
        holder.execute("ROLLBACK")
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


# ---------------------------------------------------------------- limits

@pytest.fixture
def small_limits(tmp_path):
    return web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True,
                           "MAX_REPORT_PATHS": 4, "MAX_REPORT_EDGES": 3})


def test_more_paths_than_the_limit_is_413_naming_the_limit(small_limits):
    token = create_user_in_process(small_limits.config["DATABASE"], "alice")
    closure = samples.nix_build_sbom({f"p{number}": [] for number in range(5)})
    response = small_limits.test_client().put("/reports/big", json=closure.sbom, headers=bearer(token))
    assert response.status_code == 413
    assert "4" in response.get_json()["error"] and "--max-report-paths" in response.get_json()["error"]
    assert small_limits.test_client().get("/reports").get_json() == []


def test_more_edges_than_the_limit_is_413_naming_the_limit(small_limits):
    token = create_user_in_process(small_limits.config["DATABASE"], "alice")
    closure = samples.nix_build_sbom({"root": ["a", "b", "c"], "a": ["b"], "b": [], "c": []})
    response = small_limits.test_client().put("/reports/big", json=closure.sbom, headers=bearer(token))
    assert response.status_code == 413
    assert "3" in response.get_json()["error"] and "--max-report-edges" in response.get_json()["error"]


def test_a_child_listed_many_times_is_one_edge(small_limits):
    token = create_user_in_process(small_limits.config["DATABASE"], "alice")
    closure = samples.nix_build_sbom({"root": ["child"], "child": []})
    closure.sbom["dependencies"][0]["dependsOn"] *= 1000
    client = small_limits.test_client()
    assert client.put("/reports/dup", json=closure.sbom, headers=bearer(token)).status_code == 200
    text = client.get("/reports/dup", headers={"Accept": "text/plain"}).get_data(as_text=True)
    assert text.splitlines() == [f"{closure.out('root')} No builds", f"  {closure.out('child')} No builds"]


def test_limits_are_server_options(start_server):
    server = start_server("--max-report-paths", "2")
    token = server.create_user("alice")
    response = put(server.url, token, "big", json.dumps(samples.nix_build_sbom({"a": [], "b": [], "c": []}).sbom))
    assert response.status_code == 413
    assert "more than 2 " in response.json()["error"]


# ---------------------------------------------------------------- upload slots

def test_an_upload_beyond_the_slots_is_503_with_retry_after(start_server):
    """Two uploads while the test holds the database: one takes the only slot and waits, the other is refused."""
    server = start_server("--max-report-uploads", "1")
    token = server.create_user("alice")
    holder = sqlite3.connect(server.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    responses = []
    uploads = [threading.Thread(target=lambda name=name: responses.append(put(server.url, token, name, tiny_component_sbom(10))))
               for name in ("one", "two")]
    for upload in uploads:
        upload.start()
    try:
        wait_until(lambda: responses, timeout=20, what="an upload refused for want of a slot")
    finally:
        holder.execute("ROLLBACK")
        for upload in uploads:
            upload.join(timeout=120)
    refused, defined = responses
    assert refused.status_code == 503
    assert refused.headers["Retry-After"].isdigit()
    assert "1 report uploads" in refused.json()["error"] and refused.json()["detail"] == refused.json()["error"]
    assert defined.status_code == 200


# ---------------------------------------------------------------- chunked publishing

BIG = 150_000


def test_attestations_are_stored_while_a_large_report_is_written_and_readers_never_see_it_half_written(server):
    """The upload is visible in the database in chunks long before it is published; meanwhile an
    attestation is stored and the report's name still answers 404."""
    token = server.create_user("alice")
    sbom = tiny_component_sbom(BIG)
    upload = {}
    thread = threading.Thread(target=lambda: upload.update(response=put(server.url, token, "big", sbom)))
    thread.start()
    try:
        wait_until(lambda: any(paths for _name, paths in unpublished_reports(server.db)), timeout=120,
                   what="the first chunk of the upload")
        attestation = [samples.attestation(f"{STORE_DIR}/{samples.digest_of('7')}-a")]
        posted = requests.post(f"{server.url}/attestations", json=attestation, headers=bearer(token), timeout=60)
        assert posted.status_code == 200
        assert requests.get(f"{server.url}/reports/big", headers=JSON, timeout=60).status_code == 404
        assert requests.get(f"{server.url}/reports", headers=JSON, timeout=60).json() == []
    finally:
        thread.join(timeout=300)
    assert upload["response"].status_code == 200
    assert len(requests.get(f"{server.url}/reports/big", headers=JSON, timeout=120).json()["paths"]) == BIG + 1


def test_an_upload_cut_off_by_a_crash_is_removed_at_the_next_start(server):
    token = server.create_user("alice")
    thread = threading.Thread(target=lambda: put_ignoring_errors(server.url, token, "big", tiny_component_sbom(BIG)))
    thread.start()
    holder = sqlite3.connect(server.db, isolation_level=None, timeout=0)
    try:
        # The upload stops at its next chunk, even one fast enough to finish between two looks: it dies half-written.
        hold_write_lock_once(holder, lambda conn: any(paths for _name, paths in unpublished_in(conn)), timeout=120,
                             what="the first chunk of the upload")
        server.kill9()
    finally:
        holder.execute("ROLLBACK") if holder.in_transaction else None
        holder.close()
        thread.join(timeout=60)
    assert unpublished_reports(server.db)
    server.start()
    assert unpublished_reports(server.db) == []
    with sqlite3.connect(server.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM report_paths").fetchone()[0] == 0
        assert conn.execute("SELECT COUNT(*) FROM report_sbom_pieces").fetchone()[0] == 0


def put_ignoring_errors(url, token, name, sbom_text):
    try:
        put(url, token, name, sbom_text)
    except requests.RequestException:
        pass


def test_a_failed_upload_leaves_nothing(app, client, tokens):
    """A lone surrogate is found while the SBOM is stored, after its unpublished copy was begun."""
    headers = {**bearer(tokens("alice")), "Content-Type": "application/json"}
    before = dump(app)
    body = tiny_component_sbom(3).replace('{"bom-ref":', '{"name":"\\ud800","bom-ref":', 2)
    response = client.put("/reports/broken", data=body.encode(), headers=headers)
    assert response.status_code == 400
    assert "surrogate" in response.get_json()["error"]
    assert dump(app) == before


def dump(app):
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        return list(conn.iterdump())


# ---------------------------------------------------------------- the index

@pytest.fixture
def indexed(client, tokens):
    closure = samples.nix_build_sbom({"idx-root": ["idx-lib"], "idx-lib": []})
    assert client.put("/reports/indexed", json=closure.sbom, headers=bearer(tokens("alice"))).status_code == 200
    return closure


def reproduced_on_index(client):
    page = client.get("/", headers=HTML).get_data(as_text=True)
    return re.search(r"<td>(\d+) \([0-9.]+%\)</td>", page).group(1)


def test_index_counts_follow_new_attestations(client, tokens, indexed):
    assert reproduced_on_index(client) == "0"
    for builder in ("alice", "bob"):
        client.post("/attestations", json=[samples.attestation(indexed.out("idx-lib"))], headers=bearer(tokens(builder)))
    assert reproduced_on_index(client) == "1"


def test_index_view_reads_no_report_paths_when_nothing_changed(app, client, indexed):
    client.get("/", headers=HTML)
    conn = web.connections.by_path[app.config["DATABASE"]]
    statements = []
    conn.set_trace_callback(statements.append)
    try:
        assert client.get("/", headers=HTML).status_code == 200
    finally:
        conn.set_trace_callback(None)
    assert statements and not [sql for sql in statements if "report_paths" in sql]


def test_an_attestation_outside_every_report_recounts_nothing(app, client, tokens, indexed):
    client.get("/", headers=HTML)
    client.post("/attestations", json=[samples.attestation(samples.out_path("elsewhere"))], headers=bearer(tokens("bob")))
    conn = web.connections.by_path[app.config["DATABASE"]]
    statements = []
    conn.set_trace_callback(statements.append)
    try:
        client.get("/", headers=HTML)
    finally:
        conn.set_trace_callback(None)
    assert not [sql for sql in statements if "JOIN attestations" in sql]


# ---------------------------------------------------------------- the 64 MiB SBOM (HASH_COLLECTION_LONG_TESTS=1)

def child_pids(pid):
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir() for child in (task / "children").read_text().split()]


def peak_rss_mib(pid):
    return int(re.search(r"VmHWM:\s+(\d+) kB", open(f"/proc/{pid}/status").read()).group(1)) / 1024


@pytest.mark.skipif(not LONG, reason="slow: set HASH_COLLECTION_LONG_TESTS=1")
def test_a_64_mib_sbom_of_tiny_components_stays_under_600_mb_and_attestations_answer_within_1_s(start_server):
    count = 1_080_000
    sbom = tiny_component_sbom(count)
    assert 60 * 2 ** 20 < len(sbom) <= 64 * 2 ** 20
    server = start_server("--max-report-paths", "2000000")
    token = server.create_user("alice")
    latencies, done = [], threading.Event()

    def post_attestations():
        with requests.Session() as session:
            session.headers.update(bearer(token))
            for number in iter(int, 1):
                if done.is_set():
                    return
                started = time.monotonic()
                attestation = [samples.attestation(samples.out_path(f"during-{number}"))]
                assert session.post(f"{server.url}/attestations", json=attestation, timeout=60).status_code == 200
                latencies.append(time.monotonic() - started)
                time.sleep(0.05)

    poster = threading.Thread(target=post_attestations)
    poster.start()
    try:
        response = put(server.url, token, "huge", sbom)
    finally:
        done.set()
        poster.join(timeout=120)
    peak = peak_rss_mib(server.pid())
    workers = [peak_rss_mib(pid) for pid in child_pids(server.pid())]  # the render and tree workers
    print(f"peak RSS {peak:.0f} MiB, its workers' {', '.join(f'{worker:.0f}' for worker in workers)} MiB;"
          f" {len(latencies)} attestation POSTs, slowest {max(latencies):.2f} s")
    assert response.status_code == 200
    assert peak < 600
    assert max(workers) < 450
    assert max(latencies) < 1.0


def test_back_to_back_uploads_keep_the_wal_small(start_server):
    """An upload's commits checkpoint the WAL themselves: left to the background checkpointer, which copies while
    the next upload appends, the WAL never started again from its beginning and grew by every upload."""
    server = start_server()
    token = server.create_user("owner")
    sbom_text = tiny_component_sbom(40_000)  # 4 MiB, 40,000 rows
    for number in range(12):
        response = put(server.url, token, f"r{number % 2}?revision=v{number}", sbom_text)
        assert response.status_code == 200, response.text
    assert Path(f"{server.db}-wal").stat().st_size < 48 * 2**20
