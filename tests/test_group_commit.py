"""Attestations of concurrent requests are written together, in one transaction (AttestationWriter): each
request gets what it would have got written alone, requests that wait for a write are written together
after it, a request at fault fails alone, and one that waits too long is refused and not written.
test_concurrency and test_load_short post through the writer over HTTP, to web.py."""
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

import web
from attestation_samples import (base32_form, create_user_in_process, drv_ident, first_generation, nar_hash_bytes,
                                 nix_key_pair, out_path, signed_attestation)
from support import bearer, wait_until


def builder_row(conn, name):
    return conn.execute("SELECT id, name, is_admin FROM builders WHERE name = ?", (name,)).fetchone()


def parsed(items):
    return web.parse_attestation_list(items, lambda _item, _where: None)


def verified_requests(conn, requests):
    for builder, attestations in requests:
        web.verify_attestations(conn, builder, attestations)
    return requests


def logged_attestation(conn, index):
    """(builder id, store path id, NAR hash) of the log's leaf at index."""
    return tuple(conn.execute("SELECT builder_id, path_id, nar_hash FROM attestations WHERE id = ?"
                        " UNION ALL SELECT a.builder_id, a.path_id, a.nar_hash FROM log_entries e"
                        " JOIN attestations a ON a.id = e.attestation_id WHERE e.idx = ?", (index, index)).fetchone())


def stored_attestations(conn):
    return sorted(tuple(row) for row in conn.execute(
        "SELECT b.name, p.name, hex(a.nar_hash), a.verified, hex(a.sig), a.nar_size FROM attestations a"
        " JOIN builders b ON b.id = a.builder_id JOIN store_paths p ON p.id = a.path_id"))


def sample_requests(secret_key):
    """Requests of alice, bob and alice again: the same path twice by alice (unsigned, then signed), once by bob."""
    signed = signed_attestation(secret_key)
    unsigned = first_generation(signed["output_path"], signed["output_hash"])
    other = first_generation(out_path(), base32_form(nar_hash_bytes()))
    return [("alice", [unsigned, first_generation(out_path(), base32_form(nar_hash_bytes()))]),
            ("bob", [dict(unsigned), other]),
            ("alice", [signed, dict(other)])]


@pytest.fixture
def two_apps(tmp_path):
    """Two in-process apps on databases with the same builders: alice with a registered key, and bob."""
    secret, public = nix_key_pair("alice-1")
    apps = []
    for name in ("together", "alone"):
        db = tmp_path / f"{name}.db"
        app = web.create_app({"DATABASE": str(db), "TESTING": True})
        create_user_in_process(db, "alice", "--public-key", public)
        create_user_in_process(db, "bob")
        apps.append(app)
    return apps, secret


def test_requests_written_together_store_what_each_written_alone_does_at_indexes_of_their_own(two_apps):
    (together, alone), secret = two_apps
    plan = sample_requests(secret)
    results = {}
    for app, grouped in ((together, True), (alone, False)):
        with app.app_context():
            conn = web.get_db()
            requests = verified_requests(conn, [(builder_row(conn, name), parsed(items)) for name, items in plan])
            if grouped:
                results[app] = web.write_attestations(conn, requests)
            else:
                results[app] = [web.write_attestations(conn, [request])[0] for request in requests]
            stored = stored_attestations(conn)
            for (builder, attestations), indexes in zip(requests, results[app]):
                assert len(indexes) == len(attestations)
                for attestation, index in zip(attestations, indexes):
                    path_id = conn.execute("SELECT id FROM store_paths WHERE digest = ? AND name = ?",
                                           web.path_key(attestation["output_path"])).fetchone()
                    assert logged_attestation(conn, index) == (builder["id"], path_id[0],
                                                               web.stored_hash(attestation["output_hash"]))
            results[app, "stored"] = stored
    assert results[together, "stored"] == results[alone, "stored"]
    # Alice's path, sent unsigned and then signed: one attestation, verified, with her signature.
    alice_rows = [row for row in results[together, "stored"] if row[0] == "alice"]
    assert len(alice_rows) == 3 and sum(row[3] for row in alice_rows) == 1
    # Both requests of alice's name that hold her path are answered with the same (latest) log index.
    assert results[together][0][0] == results[together][2][0]


def test_a_request_at_fault_fails_alone_and_leaves_nothing(app):
    with app.app_context():
        conn = web.get_db()
        create_user_in_process(app.config["DATABASE"], "alice")
        alice = builder_row(conn, "alice")
        good = [parsed([first_generation(out_path(), base32_form(nar_hash_bytes()))]) for _ in range(2)]
        faulty = parsed([first_generation(out_path(), base32_form(nar_hash_bytes()))])
        faulty[0]["output_hash"] = "sha256:not-a-hash"  # what parsing never lets through: a fault in the write
        requests = [web.WriteRequest(alice, attestations) for attestations in (good[0], faulty, good[1])]
        for request in requests:
            web.verify_attestations(conn, alice, request.attestations)
        web.write_group(conn, requests)
        assert all(request.woken.is_set() for request in requests)
        with pytest.raises(ValueError, match="not a NAR hash"):
            requests[1].outcome()
        for request in (requests[0], requests[2]):
            (index,) = request.outcome()
            assert logged_attestation(conn, index)[2] == web.stored_hash(request.attestations[0]["output_hash"])
        assert conn.execute("SELECT COUNT(*) FROM attestations").fetchone()[0] == 2
        assert conn.execute("SELECT COUNT(*) FROM store_paths").fetchone()[0] == 2


def post_single(client, token):
    attestation = first_generation(out_path(), base32_form(nar_hash_bytes()))
    response = client.post(f"/attestation/{drv_ident()}", json=[attestation], headers=bearer(token))
    return attestation, response


def counted_groups(monkeypatch):
    """The size of each group written from now on."""
    sizes, write_group = [], web.write_group

    def counting(conn, group):
        sizes.append(len(group))
        return write_group(conn, group)
    monkeypatch.setattr(web, "write_group", counting)
    return sizes


def test_requests_that_wait_for_a_write_are_written_together_after_it(app, tokens, monkeypatch):
    sizes = counted_groups(monkeypatch)
    writer = app.extensions["attestation_writer"]
    alice, bob, carol = tokens("alice"), tokens("bob"), tokens("carol")
    with ThreadPoolExecutor(3) as pool:
        with web.process_write_lock:  # the first request's write waits for it, and so the others wait for that
            first = pool.submit(post_single, app.test_client(), alice)
            wait_until(lambda: writer.busy and not writer.waiting, what="the first write to start")
            others = [pool.submit(post_single, app.test_client(), token) for token in (bob, carol)]
            wait_until(lambda: len(writer.waiting) == 2, what="two requests waiting")
        posted = [future.result() for future in (first, *others)]
    assert [response.status_code for _attestation, response in posted] == [200, 200, 200]
    assert sizes == [1, 2]
    assert sorted(response.get_json()["log_index"][0] for _attestation, response in posted) == [0, 1, 2]
    wait_until(lambda: not writer.busy and not writer.waiting, what="the writer to be idle")


def test_a_request_that_waits_too_long_is_refused_and_not_written(app, tokens, monkeypatch):
    monkeypatch.setattr(web, "WRITER_TIMEOUT_S", 0.2)
    writer = app.extensions["attestation_writer"]
    alice, bob = tokens("alice"), tokens("bob")
    with ThreadPoolExecutor(2) as pool:
        with web.process_write_lock:
            first = pool.submit(post_single, app.test_client(), alice)
            wait_until(lambda: writer.busy, what="the first write to start")
            _late, refused = post_single(app.test_client(), bob)
        _attestation, written = first.result()
    assert refused.status_code == 503 and "not written within" in refused.get_json()["error"]
    assert written.status_code == 200
    with app.app_context():
        assert web.get_db().execute("SELECT COUNT(*) FROM attestations").fetchone()[0] == 1
    assert not writer.busy and not writer.waiting


def test_concurrent_requests_are_all_stored_at_log_indexes_of_their_own(app, tokens, monkeypatch):
    sizes = counted_groups(monkeypatch)
    names = [f"builder-{number}" for number in range(8)]
    for name in names:
        tokens(name)
    start = threading.Barrier(len(names))

    def post_many(name):
        client = app.test_client()
        start.wait()
        return [post_single(client, tokens(name)) for _ in range(40)]

    with ThreadPoolExecutor(len(names)) as pool:
        posted = [item for result in pool.map(post_many, names) for item in result]
    assert all(response.status_code == 200 for _attestation, response in posted)
    indexes = [response.get_json()["log_index"][0] for _attestation, response in posted]
    assert sorted(indexes) == list(range(len(posted)))
    with app.app_context():
        conn = web.get_db()
        for (attestation, _response), index in zip(posted, indexes):
            assert logged_attestation(conn, index)[2] == web.stored_hash(attestation["output_hash"])
    assert sum(sizes) == len(posted)


def in_background(function, *args):
    """A Future of function(*args), run by a daemon thread: a test that fails does not wait for it to end."""
    future = Future()
    threading.Thread(target=lambda: future.set_result(function(*args)), daemon=True).start()
    return future


def test_requests_the_writer_cannot_write_are_answered_503_and_it_writes_the_next(app, tokens, monkeypatch):
    writer = app.extensions["attestation_writer"]
    alice, bob = tokens("alice"), tokens("bob")

    def unavailable():
        raise web.sqlite3.OperationalError("unable to open database file")
    with web.process_write_lock:
        first = in_background(post_single, app.test_client(), alice)
        wait_until(lambda: writer.busy, what="the first write to start")
        monkeypatch.setattr(writer, "connection", unavailable)
        second = in_background(post_single, app.test_client(), bob)
        wait_until(lambda: len(writer.waiting) == 1, what="a request waiting")
    assert first.result(timeout=30)[1].status_code == 200
    assert second.result(timeout=30)[1].status_code == 503
    monkeypatch.undo()
    wait_until(lambda: not writer.busy, what="the writer to be idle")
    with web.process_write_lock:
        first = in_background(post_single, app.test_client(), alice)
        wait_until(lambda: writer.busy and not writer.threads_turn, what="the first write to start")
        second = in_background(post_single, app.test_client(), bob)
        wait_until(lambda: len(writer.waiting) == 1, what="a request waiting")
    assert [future.result(timeout=30)[1].status_code for future in (first, second)] == [200, 200]


def test_a_batch_larger_than_a_statement_is_stored_whole_with_each_signature_in_its_place(app, tmp_path):
    secret, public = nix_key_pair("alice-1")
    token = create_user_in_process(app.config["DATABASE"], "alice", "--public-key", public)
    count = 2 * web.ROWS_PER_STATEMENT + 500
    items = [first_generation(out_path(), base32_form(nar_hash_bytes())) for _ in range(count)]
    for position in range(1, count, 5):
        items[position] = signed_attestation(secret)
    batch = [{**item, "drv_path": f"{web.STORE_DIR}/{drv_ident()}.drv"} for item in items]
    response = app.test_client().post("/attestations", json=batch, headers=bearer(token))
    assert response.status_code == 200, response.get_data(as_text=True)
    assert sorted(response.get_json()["log_index"]) == list(range(count))
    with app.app_context():
        conn = web.get_db()
        assert conn.execute("SELECT COUNT(*) FROM derivations").fetchone()[0] == count
        for item, index in zip(batch, response.get_json()["log_index"]):
            row = conn.execute("SELECT a.nar_hash, a.sig, a.verified, d.name FROM attestations a"
                               " JOIN derivations d ON d.id = a.derivation_id WHERE a.id = ?", (index,)).fetchone()
            assert row["nar_hash"] == web.stored_hash(item["output_hash"])
            assert row["name"] == item["drv_path"].rpartition("/")[2][33:]
            assert row["verified"] == bool(item["output_sig"])
            assert web.signature_text("alice-1", row["sig"]) == item["output_sig"]


def test_a_request_that_fails_alone_leaves_no_trace_in_another_of_the_same_builder(app):
    secret, public = nix_key_pair("alice-1")
    create_user_in_process(app.config["DATABASE"], "alice", "--public-key", public)
    signed = signed_attestation(secret)
    with app.app_context():
        conn = web.get_db()
        alice = builder_row(conn, "alice")
        unsigned = parsed([first_generation(signed["output_path"], signed["output_hash"])])
        faulty = parsed([dict(signed), first_generation(out_path(), base32_form(nar_hash_bytes()))])
        faulty[1]["drv_ident"] = "!" * 32 + "-bad"  # what parsing never lets through: its write fails after the merge
        requests = [web.WriteRequest(alice, attestations) for attestations in (unsigned, faulty)]
        for request in requests:
            web.verify_attestations(conn, alice, request.attestations)
        web.write_group(conn, requests)
        (index,) = requests[0].outcome()
        with pytest.raises(ValueError):
            requests[1].outcome()
        # The group had merged the signed copy into the unsigned one; written alone, the unsigned one is as sent.
        assert [tuple(row) for row in conn.execute("SELECT id, verified, sig FROM attestations")] == [(index, 0, None)]
