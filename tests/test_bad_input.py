"""Bad input: each request gets a 4xx whose JSON error names the field, and
nothing at all is stored from it."""
import json

import pytest
import requests

import web
from attestation_samples import (base32_form, batch_item, create_user_in_process, drv_ident, first_generation,
                                 lila_generation, nar_hash_bytes, out_path, sri_form, store_digest)
from support import bearer, database_dump

ATTESTATION_LIMIT = 64 * 1024
SINGLE, BATCH = "single", "batch"
BASE32_HASH = base32_form(nar_hash_bytes())


def good(**changes):
    """A valid first-generation attestation with some fields replaced (None removes the field)."""
    attestation = first_generation(out_path(), base32_form(nar_hash_bytes()), nar_size=512, references=[])
    attestation.update(changes)
    return {name: value for name, value in attestation.items() if value is not None}


def good_batch_item(**changes):
    item = batch_item(out_path(), base32_form(nar_hash_bytes()), f"/nix/store/{drv_ident()}.drv")
    item.update(changes)
    return item


BAD_INPUTS = [
    # (endpoint, body: bytes sent as they are, anything else as JSON, status, what the error must name)
    pytest.param(SINGLE, b'[{"output_path": ', 400, "JSON", id="malformed-json"),
    pytest.param(SINGLE, b"", 400, "body", id="empty-body"),
    pytest.param(SINGLE, b"\xff\xfe[]", 400, "JSON", id="body-not-utf8"),
    pytest.param(SINGLE, b"[" * 20_000 + b"]" * 20_000, 400, "JSON", id="json-nested-too-deep"),
    pytest.param(SINGLE, b"x" * (ATTESTATION_LIMIT + 1), 413, "body", id="oversized-single"),
    pytest.param(BATCH, b" " * (ATTESTATION_LIMIT + 1), 413, "body", id="oversized-batch"),
    pytest.param(SINGLE, good(), 400, "body", id="object-instead-of-list"),
    pytest.param(SINGLE, "a string", 400, "body", id="string-instead-of-list"),
    pytest.param(SINGLE, [], 400, "body", id="empty-list"),
    pytest.param(SINGLE, ["/nix/store/x"], 400, "[0]", id="item-not-an-object"),
    pytest.param(SINGLE, [good(), good(output_hash="md5:0123456789abcdef0123456789abcdef")], 400, "[1].output_hash",
                 id="second-item-bad"),
    pytest.param(SINGLE, [good(output_path=None)], 400, "output_", id="no-output-path"),
    pytest.param(SINGLE, [good(output_path=42)], 400, "output_path", id="output-path-not-a-string"),
    pytest.param(SINGLE, [good(output_path="/nix/store/abc-hello")], 400, "output_path", id="store-hash-too-short"),
    pytest.param(SINGLE, [good(output_path="/usr/store/" + store_digest() + "-hello")], 400, "output_path",
                 id="not-under-nix-store"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + store_digest())], 400, "output_path", id="store-path-without-name"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + store_digest() + "-.hidden")], 400, "output_path",
                 id="name-starts-with-dot"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + store_digest() + "-hello world")], 400, "output_path",
                 id="name-with-space"),
    pytest.param(SINGLE, b'[{"output_path": "/nix/store/' + store_digest().encode() + b'-\\ud800", "output_hash": "'
                 + BASE32_HASH.encode() + b'"}]', 400, "output_path", id="name-with-lone-surrogate"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + store_digest() + "-hello\x00")], 400, "output_path",
                 id="name-with-nul"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + "e" * 32 + "-hello")], 400, "output_path",
                 id="store-hash-not-nix-base32"),
    pytest.param(SINGLE, [good(output_path="/nix/store/" + store_digest() + "-hello/bin/hello")], 400, "output_path",
                 id="path-inside-store-path"),
    pytest.param(SINGLE, [lila_generation(out_path(), BASE32_HASH) | {"output_digest": "tooshort"}], 400,
                 "output_digest", id="lila-digest-too-short"),
    pytest.param(SINGLE, [{"output_digest": store_digest(), "output_hash": BASE32_HASH, "output_sig": ""}], 400,
                 "output_name", id="lila-without-name"),
    pytest.param(SINGLE, [good(output_hash=None)], 400, "output_hash", id="no-output-hash"),
    pytest.param(SINGLE, [good(output_hash=12345)], 400, "output_hash", id="output-hash-not-a-string"),
    pytest.param(SINGLE, [good(output_hash="md5:0123456789abcdef0123456789abcdef")], 400, "output_hash", id="md5-hash"),
    pytest.param(SINGLE, [good(output_hash="sha512:" + "0" * 128)], 400, "output_hash", id="sha512-hash"),
    pytest.param(SINGLE, [good(output_hash="sha256:" + "0" * 63)], 400, "output_hash", id="hex-wrong-length"),
    pytest.param(SINGLE, [good(output_hash="sha256:" + "0" * 51)], 400, "output_hash", id="base32-wrong-length"),
    pytest.param(SINGLE, [good(output_hash="sha256:2" + "0" * 51)], 400, "output_hash", id="base32-first-char-not-0-or-1"),
    pytest.param(SINGLE, [good(output_hash="sha256:1" + "e" * 51)], 400, "output_hash", id="base32-non-nix-chars"),
    pytest.param(SINGLE, [good(output_hash=sri_form(nar_hash_bytes()[:20]))], 400, "output_hash", id="sri-wrong-length"),
    pytest.param(SINGLE, [good(output_hash="sha256-!!!!")], 400, "output_hash", id="sri-not-base64"),
    pytest.param(SINGLE, [good(output_hash=BASE32_HASH[7:])], 400, "output_hash", id="hash-without-algorithm"),
    pytest.param(SINGLE, [good(nar_size=True)], 400, "nar_size", id="bool-nar-size"),
    pytest.param(SINGLE, [good(nar_size="512")], 400, "nar_size", id="string-nar-size"),
    pytest.param(SINGLE, [good(nar_size=1.5)], 400, "nar_size", id="float-nar-size"),
    pytest.param(SINGLE, [good(nar_size=-1)], 400, "nar_size", id="negative-nar-size"),
    pytest.param(SINGLE, [good(nar_size=1 << 70)], 400, "nar_size", id="huge-nar-size"),
    pytest.param(SINGLE, [good(references="/nix/store/" + store_digest() + "-glibc")], 400, "references",
                 id="references-not-a-list"),
    pytest.param(SINGLE, [good(references=["glibc"])], 400, "references[0]", id="reference-not-a-store-path"),
    pytest.param(SINGLE, [good(references=[out_path(), 7])], 400, "references[1]", id="reference-not-a-string"),
    pytest.param(SINGLE, [good(output_sig="no-colon-here")], 400, "output_sig", id="sig-without-key-name"),
    pytest.param(SINGLE, [good(output_sig="cache.example.org-1:AAAA")], 400, "output_sig", id="sig-wrong-length"),
    pytest.param(SINGLE, [good(output_sig="cache.example.org-1:not base64!")], 400, "output_sig", id="sig-not-base64"),
    pytest.param(SINGLE, [good(output_sig=["cache:AAAA"])], 400, "output_sig", id="sig-not-a-string"),
    pytest.param(BATCH, {"attestations": [good_batch_item()]}, 400, "body", id="batch-object-instead-of-list"),
    pytest.param(BATCH, [], 400, "body", id="batch-empty-list"),
    pytest.param(BATCH, [good_batch_item(drv_path="/nix/store/" + store_digest() + "-hello")], 400, "drv_path",
                 id="batch-drv-path-not-a-drv"),
    pytest.param(BATCH, [good_batch_item(drv_path=drv_ident())], 400, "drv_path", id="batch-drv-path-without-store-dir"),
    pytest.param(BATCH, [good_batch_item(drv_path=17)], 400, "drv_path", id="batch-drv-path-not-a-string"),
    pytest.param(BATCH, [good_batch_item(), good_batch_item(output_hash="sha1:" + "0" * 40)], 400, "[1].output_hash",
                 id="batch-second-item-sha1"),
]


@pytest.fixture
def app(tmp_path):
    """The app with a small attestation size limit, so an oversized body is cheap to send."""
    return web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True,
                           "MAX_ATTESTATION_BYTES": ATTESTATION_LIMIT})


@pytest.fixture
def token(app):
    """A builder's token, and one attestation already stored, so 'unchanged' is about real content."""
    token = create_user_in_process(app.config["DATABASE"], "alice")
    response = app.test_client().post(f"/attestation/{drv_ident()}", json=[good()], headers=bearer(token))
    assert response.status_code == 200
    return token


def send(client, endpoint, body, token):
    url = f"/attestation/{drv_ident()}" if endpoint == SINGLE else "/attestations"
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(url, data=data, headers={**bearer(token), "Content-Type": "application/json"})


@pytest.mark.parametrize("endpoint, body, status, named", BAD_INPUTS)
def test_bad_input_is_refused_with_a_named_field_and_stores_nothing(app, client, token, endpoint, body, status, named):
    before = database_dump(app.config["DATABASE"])
    response = send(client, endpoint, body, token)
    assert response.status_code == status
    assert named in response.get_json()["error"]
    assert database_dump(app.config["DATABASE"]) == before


def test_the_table_has_at_least_fifteen_bad_inputs():
    assert len(BAD_INPUTS) >= 15


@pytest.mark.parametrize("drv_ident_in_url", [
    "not-a-derivation",
    "e" * 32 + "-hello",
    store_digest() + "-.hidden",
    store_digest(),
])
def test_bad_drv_ident_in_the_url_is_refused_and_stores_nothing(app, client, token, drv_ident_in_url):
    before = database_dump(app.config["DATABASE"])
    response = client.post(f"/attestation/{drv_ident_in_url}", json=[good()], headers=bearer(token))
    assert response.status_code == 400
    assert "drv_ident" in response.get_json()["error"]
    assert database_dump(app.config["DATABASE"]) == before


def test_bad_body_without_token_is_401_and_stores_nothing(app, client):
    before = database_dump(app.config["DATABASE"])
    response = client.post(f"/attestation/{drv_ident()}", data=b"not json")
    assert response.status_code == 401
    assert database_dump(app.config["DATABASE"]) == before


def test_server_refuses_a_body_over_the_default_16_mib_limit(server):
    token = server.create_user("alice")
    body = b"[" + b" " * (16 * 1024 * 1024) + b"]"
    response = requests.post(f"{server.url}/attestations", data=body, timeout=60,
                             headers={**bearer(token), "Content-Type": "application/json"})
    assert response.status_code == 413
    assert "body" in response.json()["error"]
    assert requests.get(f"{server.url}/derivations/", timeout=10).json() == []


@pytest.mark.parametrize("method, url, status", [
    ("post", "/attestation/not-a-drv", 401),
    ("get", "/reports/missing", 404),
    ("get", "/derivations/missing", 404),
    ("put", "/reports/bad%20name", 401),
])
def test_every_error_body_carries_detail_for_lila_clients(client, method, url, status):
    response = getattr(client, method)(url)
    assert response.status_code == status
    body = response.get_json()
    assert body["detail"] == body["error"] and body["error"]


def test_bad_input_errors_carry_detail_too(client, token):
    response = send(client, "/attestations", [good_batch_item(output_hash="md5:nope")], token)
    assert response.status_code == 400
    assert response.get_json()["detail"] == response.get_json()["error"]
