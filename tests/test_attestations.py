"""The attestation API of issue 2: in-process through the app factory, and end to
end against `python web.py` with tokens from ./create_user."""
import re

import pytest
import requests

from attestation_samples import (base32_form, basename_of, batch_item, create_user_in_process, drv_ident,
                                 drv_path_of, first_generation, hex_form, lila_generation, nar_hash_bytes,
                                 out_path, sri_form, store_digest)
from post_build_hook import STORE_DIR
from support import bearer

MAX_BATCH = 10_000


@pytest.fixture
def token_of(app):
    """name -> a new token for that builder, made by create_user's command line."""
    return lambda name: create_user_in_process(app.config["DATABASE"], name)


def post_attestation(client, token, ident, attestations):
    return client.post(f"/attestation/{ident}", json=attestations, headers=bearer(token))


def post_batch(client, token, items):
    return client.post("/attestations", json=items, headers=bearer(token))


def by_output(client, path):
    response = client.get(f"/attestations/by-output/{basename_of(path)}")
    assert response.status_code == 200
    return response.get_json()


def derivation_counts(client, ident):
    response = client.get(f"/derivations/{ident}")
    assert response.status_code == 200
    return response.get_json()


# ---------------------------------------------------------------- health

def test_healthz_answers_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


# ---------------------------------------------------------------- both generations of fields

def test_first_generation_fields_are_stored(client, token_of):
    token, ident, path, raw = token_of("alice"), drv_ident(), out_path(), nar_hash_bytes()
    response = post_attestation(client, token, ident, [first_generation(path, base32_form(raw))])
    assert response.status_code == 200
    assert response.get_json() == {"accepted": 1, "log_index": [0]}
    [stored] = by_output(client, path)
    assert (stored["builder"], stored["output_path"], stored["output_hash"]) == ("alice", path, base32_form(raw))
    assert stored["drv_path"] == drv_path_of(ident)


def test_lila_fields_are_stored(client, token_of):
    token, ident, path, raw = token_of("alice"), drv_ident(), out_path("curl-8.6.0-bin"), nar_hash_bytes()
    response = post_attestation(client, token, ident, [lila_generation(path, base32_form(raw))])
    assert response.status_code == 200
    [stored] = by_output(client, path)
    assert (stored["builder"], stored["output_path"], stored["output_hash"]) == ("alice", path, base32_form(raw))


def test_both_generations_attest_the_same_output(client, token_of):
    ident, path, raw = drv_ident(), out_path(), nar_hash_bytes()
    post_attestation(client, token_of("alice"), ident, [first_generation(path, base32_form(raw))])
    post_attestation(client, token_of("bob"), ident, [lila_generation(path, base32_form(raw))])
    assert derivation_counts(client, ident) == {path: {base32_form(raw): 2}}


def test_one_post_may_carry_several_outputs(client, token_of):
    ident, out, dev = drv_ident("hello"), out_path("hello"), out_path("hello-dev")
    out_hash, dev_hash = base32_form(nar_hash_bytes()), base32_form(nar_hash_bytes())
    response = post_attestation(client, token_of("alice"), ident,
                                [first_generation(out, out_hash), lila_generation(dev, dev_hash)])
    assert response.get_json()["accepted"] == 2
    assert sorted(response.get_json()["log_index"]) == [0, 1]
    assert derivation_counts(client, ident) == {out: {out_hash: 1}, dev: {dev_hash: 1}}


def test_empty_signature_is_accepted_as_the_original_diff_hook_sends_it(client, token_of):
    path = out_path()
    attestation = first_generation(path, base32_form(nar_hash_bytes()), sig="")
    response = post_attestation(client, token_of("alice"), drv_ident(), [attestation])
    assert response.status_code == 200
    assert by_output(client, path)[0]["output_sig"] == ""


# ---------------------------------------------------------------- one hash, three spellings

@pytest.mark.parametrize("spelling", [hex_form, sri_form, base32_form], ids=["hex", "sri", "base32"])
def test_hash_is_stored_in_canonical_base32(client, token_of, spelling):
    path, raw = out_path(), nar_hash_bytes()
    post_attestation(client, token_of("alice"), drv_ident(), [first_generation(path, spelling(raw))])
    assert by_output(client, path)[0]["output_hash"] == base32_form(raw)


def test_sri_hex_and_base32_of_one_hash_count_as_one_hash(client, token_of):
    ident, path, raw = drv_ident(), out_path(), nar_hash_bytes()
    for builder, spelling in [("alice", sri_form), ("bob", hex_form), ("carol", base32_form)]:
        assert post_attestation(client, token_of(builder), ident, [first_generation(path, spelling(raw))]).status_code == 200
    assert derivation_counts(client, ident) == {path: {base32_form(raw): 3}}


def test_one_builder_posting_one_hash_in_three_spellings_is_one_attestation(client, token_of):
    token, ident, path, raw = token_of("alice"), drv_ident(), out_path(), nar_hash_bytes()
    for spelling in (sri_form, hex_form, base32_form):
        post_attestation(client, token, ident, [first_generation(path, spelling(raw))])
    assert len(client.get(f"/derivations/{ident}?full=true").get_json()) == 1
    assert derivation_counts(client, ident) == {path: {base32_form(raw): 1}}


# ---------------------------------------------------------------- counting builders

def test_same_builder_posting_twice_counts_once(client, token_of):
    token, ident, path, nar_hash = token_of("alice"), drv_ident(), out_path(), base32_form(nar_hash_bytes())
    for _ in range(2):
        assert post_attestation(client, token, ident, [first_generation(path, nar_hash)]).status_code == 200
    assert derivation_counts(client, ident) == {path: {nar_hash: 1}}


def test_reposting_stores_no_second_row(client, token_of):
    token, ident, path, nar_hash = token_of("alice"), drv_ident(), out_path(), base32_form(nar_hash_bytes())
    post_attestation(client, token, ident, [first_generation(path, nar_hash)])
    post_attestation(client, token, ident, [first_generation(path, nar_hash)])
    assert len(by_output(client, path)) == 1


def test_two_builders_count_two(client, token_of):
    ident, path, nar_hash = drv_ident(), out_path(), base32_form(nar_hash_bytes())
    post_attestation(client, token_of("alice"), ident, [first_generation(path, nar_hash)])
    post_attestation(client, token_of("bob"), ident, [first_generation(path, nar_hash)])
    assert derivation_counts(client, ident) == {path: {nar_hash: 2}}


def test_two_hashes_for_one_output_are_counted_apart(client, token_of):
    ident, path = drv_ident(), out_path()
    first, second = base32_form(nar_hash_bytes()), base32_form(nar_hash_bytes())
    post_attestation(client, token_of("alice"), ident, [first_generation(path, first)])
    post_attestation(client, token_of("bob"), ident, [first_generation(path, second)])
    assert derivation_counts(client, ident) == {path: {first: 1, second: 1}}


def test_one_builder_with_two_hashes_keeps_both(client, token_of):
    token, ident, path = token_of("alice"), drv_ident(), out_path()
    first, second = base32_form(nar_hash_bytes()), base32_form(nar_hash_bytes())
    post_attestation(client, token, ident, [first_generation(path, first)])
    post_attestation(client, token, ident, [first_generation(path, second)])
    assert derivation_counts(client, ident) == {path: {first: 1, second: 1}}


# ---------------------------------------------------------------- reading

def test_by_output_lists_every_builders_attestation(client, token_of):
    ident, path, nar_hash = drv_ident(), out_path(), base32_form(nar_hash_bytes())
    post_attestation(client, token_of("alice"), ident, [first_generation(path, nar_hash)])
    post_attestation(client, token_of("bob"), ident, [first_generation(path, nar_hash)])
    assert sorted(attestation["builder"] for attestation in by_output(client, path)) == ["alice", "bob"]


def test_by_output_of_an_unattested_path_is_an_empty_list(client):
    assert by_output(client, out_path()) == []


def test_by_output_of_a_malformed_path_is_a_client_error(client):
    response = client.get("/attestations/by-output/not-a-store-path")
    assert response.status_code == 400
    assert "path" in response.get_json()["error"]


def test_derivations_lists_id_and_drv_hash(client, token_of):
    token = token_of("alice")
    idents = [drv_ident("first"), drv_ident("second")]
    for ident in idents:
        post_attestation(client, token, ident, [first_generation(out_path(), base32_form(nar_hash_bytes()))])
    listed = client.get("/derivations/").get_json()
    assert [entry["drv_hash"] for entry in listed] == idents
    assert all(isinstance(entry["id"], int) for entry in listed)


def test_derivations_is_empty_on_a_new_database(client):
    response = client.get("/derivations/")
    assert response.status_code == 200
    assert response.get_json() == []


def test_unknown_derivation_is_404(client):
    response = client.get(f"/derivations/{drv_ident()}")
    assert response.status_code == 404
    assert "error" in response.get_json()


def test_unknown_derivation_in_full_is_404(client):
    assert client.get(f"/derivations/{drv_ident()}?full=true").status_code == 404


def test_full_derivation_lists_attestations_with_every_field(client, token_of):
    ident, path, raw = drv_ident(), out_path(), nar_hash_bytes()
    references = sorted([out_path("glibc-2.39"), path])
    post_attestation(client, token_of("alice"), ident,
                     [first_generation(path, sri_form(raw), nar_size=4096, references=references)])
    [attestation] = client.get(f"/derivations/{ident}?full=true").get_json()
    assert attestation["builder"] == "alice"
    assert attestation["drv_path"] == drv_path_of(ident)
    assert attestation["output_path"] == path
    assert attestation["output_hash"] == base32_form(raw)
    assert attestation["output_sig"] == ""
    assert attestation["nar_size"] == 4096
    assert attestation["references"] == references
    assert attestation["verified"] is False
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", attestation["created_at"])


def test_optional_fields_are_null_when_not_sent(client, token_of):
    path = out_path()
    post_attestation(client, token_of("alice"), drv_ident(), [first_generation(path, base32_form(nar_hash_bytes()))])
    [attestation] = by_output(client, path)
    assert attestation["nar_size"] is None
    assert attestation["references"] is None


def test_empty_references_are_kept_as_an_empty_list(client, token_of):
    path = out_path()
    post_attestation(client, token_of("alice"), drv_ident(),
                     [first_generation(path, base32_form(nar_hash_bytes()), nar_size=1, references=[])])
    assert by_output(client, path)[0]["references"] == []


def test_paths_whose_digests_share_their_first_bytes_are_kept_apart(client, token_of):
    # store_paths and derivations are indexed by the digest's first bytes: 7 nix-base32 characters hold 35 bits.
    first, second = (f"{STORE_DIR}/{'0000000' + store_digest()[7:]}-hello-2.12" for _ in range(2))
    first_drv, second_drv = (f"{STORE_DIR}/{'0000000' + store_digest()[7:]}-hello-2.12.drv" for _ in range(2))
    first_hash, second_hash = base32_form(nar_hash_bytes()), base32_form(nar_hash_bytes())
    post_batch(client, token_of("alice"), [batch_item(first, first_hash, first_drv)])
    post_batch(client, token_of("bob"), [batch_item(second, second_hash, second_drv), batch_item(first, first_hash, first_drv)])
    assert sorted(attestation["builder"] for attestation in by_output(client, first)) == ["alice", "bob"]
    assert [(attestation["builder"], attestation["output_hash"], attestation["drv_path"])
            for attestation in by_output(client, second)] == [("bob", second_hash, second_drv)]
    second_ident = second_drv[len(STORE_DIR) + 1:-len(".drv")]
    assert derivation_counts(client, second_ident) == {second: {second_hash: 1}}


# ---------------------------------------------------------------- batch import

def test_batch_stores_every_item(client, token_of):
    idents = [drv_ident() for _ in range(3)]
    items = [batch_item(out_path(), base32_form(nar_hash_bytes()), drv_path_of(ident), nar_size=10, references=[])
             for ident in idents]
    response = post_batch(client, token_of("importer"), items)
    assert response.status_code == 200
    assert response.get_json()["accepted"] == 3
    for ident, item in zip(idents, items):
        assert derivation_counts(client, ident) == {item["output_path"]: {item["output_hash"]: 1}}


def test_batch_item_without_derivation_is_stored_with_null_drv_path(client, token_of):
    path = out_path()
    post_batch(client, token_of("importer"), [batch_item(path, hex_form(nar_hash_bytes()), drv_path=None)])
    [attestation] = by_output(client, path)
    assert attestation["drv_path"] is None


def test_batch_with_one_bad_item_stores_nothing(client, token_of):
    good = [batch_item(out_path(), base32_form(nar_hash_bytes()), drv_path_of(drv_ident())) for _ in range(3)]
    bad = batch_item(out_path(), "md5:0123456789abcdef0123456789abcdef", drv_path_of(drv_ident()))
    response = post_batch(client, token_of("importer"), good[:2] + [bad] + good[2:])
    assert response.status_code == 400
    assert "[2].output_hash" in response.get_json()["error"]
    assert client.get("/derivations/").get_json() == []
    assert all(by_output(client, item["output_path"]) == [] for item in good)


def test_batch_repeating_an_attestation_counts_it_once(client, token_of):
    item = batch_item(out_path(), base32_form(nar_hash_bytes()), drv_path_of(drv_ident()))
    assert post_batch(client, token_of("importer"), [item, item]).status_code == 200
    assert len(by_output(client, item["output_path"])) == 1


def test_batch_of_the_maximum_size_is_accepted(client, token_of):
    items = [batch_item(out_path(), base32_form(nar_hash_bytes())) for _ in range(MAX_BATCH)]
    response = post_batch(client, token_of("importer"), items)
    assert response.status_code == 200
    assert response.get_json()["accepted"] == MAX_BATCH


def test_batch_over_the_maximum_size_is_refused_and_stores_nothing(client, token_of):
    items = [batch_item(out_path(), base32_form(nar_hash_bytes())) for _ in range(MAX_BATCH + 1)]
    response = post_batch(client, token_of("importer"), items)
    assert response.status_code in (400, 413)
    assert str(MAX_BATCH) in response.get_json()["error"]
    assert by_output(client, items[0]["output_path"]) == []


# ---------------------------------------------------------------- tokens

def test_post_without_token_is_401(client):
    response = client.post(f"/attestation/{drv_ident()}", json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401
    assert "token" in response.get_json()["error"]


def test_post_with_unknown_token_is_401(client):
    response = post_attestation(client, "no-such-token", drv_ident(), [first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401
    assert "token" in response.get_json()["error"]


def test_post_with_a_non_bearer_authorization_is_401(client, token_of):
    token = token_of("alice")
    response = client.post(f"/attestation/{drv_ident()}", json=[first_generation(out_path(), base32_form(nar_hash_bytes()))],
                           headers={"Authorization": f"Basic {token}"})
    assert response.status_code == 401


def test_batch_without_token_is_401(client):
    response = client.post("/attestations", json=[batch_item(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401


def test_post_with_revoked_token_is_401(client, app, token_of):
    token = token_of("alice")
    create_user_in_process(app.config["DATABASE"], "--revoke", token)
    response = post_attestation(client, token, drv_ident(), [first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401


def test_rejected_token_stores_nothing(client):
    path = out_path()
    post_attestation(client, "no-such-token", drv_ident(), [first_generation(path, base32_form(nar_hash_bytes()))])
    assert by_output(client, path) == []
    assert client.get("/derivations/").get_json() == []


def test_reads_need_no_token(client, token_of):
    ident, path = drv_ident(), out_path()
    post_attestation(client, token_of("alice"), ident, [first_generation(path, base32_form(nar_hash_bytes()))])
    assert client.get(f"/derivations/{ident}").status_code == 200
    assert client.get(f"/attestations/by-output/{basename_of(path)}").status_code == 200


# ---------------------------------------------------------------- end to end: python web.py and ./create_user

def test_server_healthz_over_http(server):
    response = requests.get(server.url + "/healthz", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_server_accepts_the_first_generation_request_from_a_created_user(server):
    token, ident, path, raw = server.create_user("alice"), drv_ident(), out_path(), nar_hash_bytes()
    response = requests.post(f"{server.url}/attestation/{ident}", json=[first_generation(path, sri_form(raw))],
                             headers=bearer(token), timeout=10)
    assert response.status_code == 200
    assert requests.get(f"{server.url}/derivations/{ident}", timeout=10).json() == {path: {base32_form(raw): 1}}


def test_server_counts_a_lila_post_and_a_first_generation_post_as_two_builders(server):
    ident, path, raw = drv_ident(), out_path("curl-8.6.0-bin"), nar_hash_bytes()
    requests.post(f"{server.url}/attestation/{ident}", json=[first_generation(path, hex_form(raw))],
                  headers=bearer(server.create_user("alice")), timeout=10).raise_for_status()
    requests.post(f"{server.url}/attestation/{ident}", json=[lila_generation(path, base32_form(raw))],
                  headers=bearer(server.create_user("bob")), timeout=10).raise_for_status()
    assert requests.get(f"{server.url}/derivations/{ident}", timeout=10).json() == {path: {base32_form(raw): 2}}


def test_server_accepts_a_body_sent_as_curl_sends_it(server):
    token, ident, path = server.create_user("alice"), drv_ident(), out_path()
    body = ('[{"output_path": "%s", "output_hash": "%s", "output_sig": ""}]'
            % (path, base32_form(nar_hash_bytes())))
    response = requests.post(f"{server.url}/attestation/{ident}", data=body, timeout=10,
                             headers={**bearer(token), "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


def test_server_refuses_a_revoked_token(server):
    token = server.create_user("alice")
    server.create_user("--revoke", token)
    response = requests.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(token),
                             json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401


def test_server_batch_import_is_all_or_nothing(server):
    token = server.create_user("importer")
    good = batch_item(out_path(), base32_form(nar_hash_bytes()), drv_path_of(drv_ident()))
    bad = batch_item("/nix/store/short-hello", base32_form(nar_hash_bytes()))
    response = requests.post(f"{server.url}/attestations", json=[good, bad], headers=bearer(token), timeout=10)
    assert response.status_code == 400
    assert "[1].output_path" in response.json()["error"]
    assert requests.get(f"{server.url}/derivations/", timeout=10).json() == []


def test_server_unknown_route_is_404_json(server):
    response = requests.get(f"{server.url}/no-such-thing", timeout=10)
    assert response.status_code == 404
    assert "error" in response.json()


# ---------------------------------------------------------------- source

@pytest.mark.parametrize("source", ["build", "check", "cache"])
def test_source_is_stored_and_returned_in_every_attestation_json(client, token_of, source):
    ident, path = drv_ident(), out_path()
    post_attestation(client, token_of("alice"), ident,
                     [first_generation(path, base32_form(nar_hash_bytes()), source=source)])
    [by_path] = by_output(client, path)
    [by_derivation] = client.get(f"/derivations/{ident}?full=true").get_json()
    [on_output_page] = client.get(f"/outputs/{basename_of(path)}").get_json()
    assert by_path["source"] == by_derivation["source"] == on_output_page["source"] == source


def test_attestation_without_a_source_has_source_null(client, token_of):
    path = out_path()
    post_attestation(client, token_of("alice"), drv_ident(), [lila_generation(path, base32_form(nar_hash_bytes()))])
    [attestation] = by_output(client, path)
    assert attestation["source"] is None


def test_batch_item_keeps_its_source(client, token_of):
    path = out_path()
    assert post_batch(client, token_of("importer"),
                      [batch_item(path, hex_form(nar_hash_bytes()), source="cache")]).status_code == 200
    assert by_output(client, path)[0]["source"] == "cache"


@pytest.mark.parametrize("source", ["rebuild", "", "BUILD", 1, ["build"]])
def test_unknown_source_is_400_naming_the_field_and_stores_nothing(client, token_of, source):
    path = out_path()
    response = post_attestation(client, token_of("alice"), drv_ident(),
                                [first_generation(path, base32_form(nar_hash_bytes()), source=source)])
    assert response.status_code == 400
    assert response.get_json()["error"].startswith("[0].source: expected")
    assert by_output(client, path) == []


def test_output_page_shows_each_attestations_source_and_unknown_for_none(client, token_of):
    path = out_path("hello-2.12")
    post_attestation(client, token_of("alice"), drv_ident(),
                     [first_generation(path, base32_form(nar_hash_bytes()), source="check")])
    post_attestation(client, token_of("bob"), drv_ident(), [first_generation(path, base32_form(nar_hash_bytes()))])
    page = client.get(f"/outputs/{basename_of(path)}", headers={"Accept": "text/html"}).get_data(as_text=True)
    rows = re.findall(r"<tr><td>(\w+)</td>.*?</tr>", page, re.S)
    assert rows == ["alice", "bob"]
    cells = [re.sub(r"<[^>]+>|\s+", " ", row).split() for row in re.findall(r"<tr><td>.*?</tr>", page, re.S)]
    assert [row[-2] for row in cells] == ["check", "unknown"]


def test_output_page_heading_is_the_name_with_the_full_path_below(client, token_of):
    path = out_path("hello-2.12")
    page = client.get(f"/outputs/{basename_of(path)}", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert re.search(r"<h1>(.*?)</h1>", page).group(1) == "hello-2.12"
    assert path in page.split("</h1>", 1)[1]
