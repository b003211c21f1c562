"""Trust (issue 6): builder keys, signatures verified on arrival, verified-only mode,
and the per-builder narinfo export that Nix's own `nix store verify` checks.

Everything runs against `python web.py` with real Nix: store paths come from real
builds, keys from `nix key generate-secret`, signatures from `nix store sign`.

Not covered here: an attestation imported from a real binary cache arriving
verified (the cache-import builder with cache.nixos.org's key) belongs to the
cache-import tests of issue 5.
"""
import base64
import json
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass

import pytest
import requests

import web
from support import REPO, bearer, write_derivation
from post_build_hook import drv_ident_of, fingerprint, fixed_output_path, nix_base32_encode, verify_signature

TIMEOUT = 10


# ---------------------------------------------------------------- real builds and keys

@dataclass
class BuiltPath:
    """A store path as Nix registered it, with what its fingerprint needs."""
    drv_path: str
    out_path: str
    nar_hash: str
    nar_size: int
    references: list

    @property
    def basename(self):
        return self.out_path.removeprefix("/nix/store/")

    @property
    def digest(self):
        return self.basename[:32]

    @property
    def drv_ident(self):
        return drv_ident_of(self.drv_path)


def nix_store_query(nix, *args):
    return subprocess.run(["nix-store", "--query", *args], env=nix(), capture_output=True, text=True,
                          check=True).stdout.split()


def build(nix, nix_file):
    out_path = subprocess.run(["nix-build", "--no-out-link", str(nix_file)], env=nix(), capture_output=True,
                              text=True, check=True).stdout.strip()
    [drv_path] = nix_store_query(nix, "--deriver", out_path)
    [nar_hash] = nix_store_query(nix, "--hash", out_path)
    [nar_size] = nix_store_query(nix, "--size", out_path)
    return BuiltPath(drv_path, out_path, nar_hash, int(nar_size), nix_store_query(nix, "--references", out_path))


@pytest.fixture
def built(nix, tmp_path):
    """A fresh path that refers to a fresh dependency, so its fingerprint has a non-empty references field."""
    dependency = write_derivation(tmp_path, "trust-dependency", "echo dependency > $out")
    referrer = write_derivation(tmp_path, "trust-referrer", "echo $dep > $out", extra=f"dep = import {dependency};")
    path = build(nix, referrer)
    assert path.references, "the test path should refer to its dependency"
    return path


@pytest.fixture
def dependency_of(nix):
    """The BuiltPath of a built path's (only) reference."""
    def of(path):
        [reference] = path.references
        [drv_path] = nix_store_query(nix, "--deriver", reference)
        [nar_hash] = nix_store_query(nix, "--hash", reference)
        [nar_size] = nix_store_query(nix, "--size", reference)
        return BuiltPath(drv_path, reference, nar_hash, int(nar_size), nix_store_query(nix, "--references", reference))
    return of


def generate_key(nix, directory, key_name):
    """{"secret_file", "public"} of a new key from `nix key generate-secret`."""
    secret = subprocess.run(["nix", "key", "generate-secret", "--key-name", key_name], env=nix(),
                            capture_output=True, text=True, check=True).stdout
    secret_file = directory / f"{key_name}-{uuid.uuid4().hex[:8]}.secret"
    secret_file.write_text(secret)
    public = subprocess.run(["nix", "key", "convert-secret-to-public"], input=secret, env=nix(),
                            capture_output=True, text=True, check=True).stdout.strip()
    return {"secret_file": secret_file, "public": public}


@pytest.fixture(scope="module")
def key_factory(nix, tmp_path_factory):
    directory = tmp_path_factory.mktemp("trust-keys")
    return lambda key_name: generate_key(nix, directory, key_name)


@pytest.fixture(scope="module")
def bob_key(key_factory):
    return key_factory(f"bob-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def impostor_key(key_factory, nix_key):
    """Another key that carries the same key name as nix_key."""
    return key_factory(key_name_of(nix_key["public"]))


def key_name_of(key_text):
    return key_text.partition(":")[0]


def nix_signature(nix, key, path):
    """Sign the path as Nix does, and read the signature back from Nix's own database.

    The path may already carry signatures by keys of the same name, so pick the
    one that this key's public half verifies.
    """
    subprocess.run(["nix", "store", "sign", "--key-file", str(key["secret_file"]), path.out_path],
                   env=nix(), check=True, capture_output=True)
    [info] = json.loads(subprocess.run(["nix", "path-info", "--json", "--sigs", path.out_path], env=nix(),
                                       check=True, capture_output=True, text=True).stdout)
    message = fingerprint(path.out_path, path.nar_hash, path.nar_size, path.references)
    [signature] = [sig for sig in info["signatures"] if verify_signature(key["public"], message, sig)]
    return signature


def flipped_byte(signature):
    key_name, _, encoded = signature.partition(":")
    raw = bytearray(base64.b64decode(encoded))
    raw[10] ^= 0x01
    return f"{key_name}:{base64.b64encode(bytes(raw)).decode()}"


# ---------------------------------------------------------------- talking to the server

def attestation_of(path, signature):
    return {"output_path": path.out_path, "output_hash": path.nar_hash, "output_sig": signature,
            "nar_size": path.nar_size, "references": path.references}


def post_attestation(server, token, path, signature):
    return requests.post(f"{server.url}/attestation/{path.drv_ident}", json=[attestation_of(path, signature)],
                         headers=bearer(token), timeout=TIMEOUT)


def post_batch(server, token, items):
    return requests.post(f"{server.url}/attestations", json=items, headers=bearer(token), timeout=TIMEOUT)


def batch_item(path, signature):
    return {"drv_path": path.drv_path, **attestation_of(path, signature)}


def by_output(server, path):
    response = requests.get(f"{server.url}/attestations/by-output/{path.basename}", timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def full_derivation(server, path):
    response = requests.get(f"{server.url}/derivations/{path.drv_ident}", params={"full": "true"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def database_dump(server):
    conn = sqlite3.connect(server.db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def report_sbom(path):
    """A one-component CycloneDX SBOM in nix-build-sbom's shape, whose only path is `path`."""
    root = {"type": "application", "bom-ref": path.out_path, "name": path.basename[33:],
            "properties": [{"name": "nix:out_path", "value": path.out_path},
                           {"name": "nix:drv_path", "value": path.drv_path},
                           {"name": "nix:output", "value": "out"}]}
    return {"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1, "metadata": {"component": root},
            "components": [], "dependencies": [{"ref": path.out_path, "dependsOn": []}]}


def put_report(server, token, name, path):
    response = requests.put(f"{server.url}/reports/{name}", json=report_sbom(path), headers=bearer(token),
                            timeout=TIMEOUT)
    assert response.status_code == 200, response.text


def report_summary(server, name):
    response = requests.get(f"{server.url}/reports/{name}", headers={"Accept": "application/json"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def report_html(server, name):
    response = requests.get(f"{server.url}/reports/{name}", headers={"Accept": "text/html"}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.text


def reproduced_by_one_verified_and_one_unverified(server, nix, nix_key, path):
    """alice (key registered) posts a signed attestation, bob (no key) posts the same hash unsigned,
    and a report holds the path. Returns the report name."""
    alice = server.create_user("alice", "--public-key", nix_key["public"])
    bob = server.create_user("bob")
    assert post_attestation(server, alice, path, nix_signature(nix, nix_key, path)).status_code == 200
    assert post_attestation(server, bob, path, "").status_code == 200
    put_report(server, alice, "trust", path)
    return "trust"


def nix_store_verify(nix, store_url, public_key, path):
    return subprocess.run(["nix", "store", "verify", "--no-contents", "--store", store_url,
                           "--trusted-public-keys", public_key, "--sigs-needed", "1", path.out_path],
                          env=nix(), capture_output=True, text=True, timeout=60)


def run_create_user(server, *args):
    return subprocess.run([str(REPO / "create_user"), *args, "--db", str(server.db)], cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
                          capture_output=True, text=True, check=True).stdout


# ---------------------------------------------------------------- verification on arrival

def test_attestation_signed_by_nix_arrives_verified_in_the_full_derivation_list(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    response = post_attestation(server, token, built, nix_signature(nix, nix_key, built))
    assert response.status_code == 200, response.text
    [stored] = full_derivation(server, built)
    assert (stored["builder"], stored["output_path"], stored["verified"]) == ("alice", built.out_path, True)


def test_attestation_signed_by_nix_arrives_verified_by_output(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    signature = nix_signature(nix, nix_key, built)
    assert post_attestation(server, token, built, signature).status_code == 200
    [stored] = by_output(server, built)
    assert stored["verified"] is True
    assert (stored["output_sig"], stored["nar_size"], stored["references"]) == (signature, built.nar_size,
                                                                                 built.references)


def test_signature_with_a_flipped_byte_is_rejected(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    response = post_attestation(server, token, built, flipped_byte(nix_signature(nix, nix_key, built)))
    assert response.status_code == 400
    assert "output_sig" in response.json()["error"]


def test_signature_with_a_flipped_byte_stores_nothing(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    before = database_dump(server)
    post_attestation(server, token, built, flipped_byte(nix_signature(nix, nix_key, built)))
    assert database_dump(server) == before
    assert by_output(server, built) == []


def test_signature_by_another_key_under_the_builders_key_name_is_rejected(server, nix, nix_key, impostor_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    before = database_dump(server)
    response = post_attestation(server, token, built, nix_signature(nix, impostor_key, built))
    assert response.status_code == 400
    assert database_dump(server) == before


def test_two_keys_of_one_name_registered_to_a_builder_both_verify(server, nix, nix_key, impostor_key, built):
    """Reviewed: the later key of a name replaced the earlier one, whose signatures were then refused."""
    token = server.create_user("alice", "--public-key", nix_key["public"])
    server.create_user("alice", "--public-key", impostor_key["public"])
    for key in (nix_key, impostor_key):
        response = post_attestation(server, token, built, nix_signature(nix, key, built))
        assert response.status_code == 200, response.text
    assert [stored["verified"] for stored in by_output(server, built)] == [True]


def test_signature_under_another_builders_key_is_rejected(server, nix, nix_key, bob_key, built):
    """alice posts a signature that bob's registered key made: it is not alice's to give."""
    alice = server.create_user("alice", "--public-key", nix_key["public"])
    server.create_user("bob", "--public-key", bob_key["public"])
    before = database_dump(server)
    response = post_attestation(server, alice, built, nix_signature(nix, bob_key, built))
    assert response.status_code == 400, response.text
    assert database_dump(server) == before


def test_unsigned_attestation_arrives_unverified(server, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    assert post_attestation(server, token, built, "").status_code == 200
    [stored] = by_output(server, built)
    assert (stored["output_sig"], stored["verified"]) == ("", False)


def test_signed_attestation_without_size_and_references_arrives_unverified(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    first_generation = {"output_path": built.out_path, "output_hash": built.nar_hash,
                        "output_sig": nix_signature(nix, nix_key, built)}
    response = requests.post(f"{server.url}/attestation/{built.drv_ident}", json=[first_generation],
                             headers=bearer(token), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    [stored] = by_output(server, built)
    assert stored["verified"] is False


def test_signed_batch_arrives_verified(server, nix, nix_key, built, dependency_of):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    dependency = dependency_of(built)
    items = [batch_item(path, nix_signature(nix, nix_key, path)) for path in (dependency, built)]
    assert post_batch(server, token, items).json()["accepted"] == 2
    assert [attestation["verified"] for path in (dependency, built) for attestation in by_output(server, path)] == \
        [True, True]


def test_batch_with_one_bad_signature_stores_nothing(server, nix, nix_key, built, dependency_of):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    dependency = dependency_of(built)
    items = [batch_item(dependency, nix_signature(nix, nix_key, dependency)),
             batch_item(built, flipped_byte(nix_signature(nix, nix_key, built)))]
    before = database_dump(server)
    response = post_batch(server, token, items)
    assert response.status_code == 400
    assert "[1].output_sig" in response.json()["error"]
    assert database_dump(server) == before


def test_output_page_shows_which_attestations_are_verified(server, nix, nix_key, built):
    alice = server.create_user("alice", "--public-key", nix_key["public"])
    bob = server.create_user("bob")
    post_attestation(server, alice, built, nix_signature(nix, nix_key, built))
    post_attestation(server, bob, built, "")
    response = requests.get(f"{server.url}/outputs/{built.basename}", headers={"Accept": "text/html"},
                            timeout=TIMEOUT)
    assert response.status_code == 200
    assert ">verified<" in response.text and ">unverified<" in response.text


# ---------------------------------------------------------------- verified-only mode

def test_verified_only_mode_does_not_count_an_unverified_second_attestation(start_server, nix, nix_key, built,
                                                                            tmp_path):
    database = tmp_path / "shared.db"
    counting_all = start_server(db=database)
    report = reproduced_by_one_verified_and_one_unverified(counting_all, nix, nix_key, built)
    verified_only = start_server("--require-signatures", db=database)
    assert report_summary(counting_all, report)["paths"][built.out_path] == web.REPRODUCED
    assert report_summary(verified_only, report)["paths"][built.out_path] == web.ONE_BUILD


def test_require_signatures_environment_variable_turns_on_verified_only_mode(server, nix, nix_key, built,
                                                                             monkeypatch):
    report = reproduced_by_one_verified_and_one_unverified(server, nix, nix_key, built)
    monkeypatch.setenv("HASH_COLLECTION_REQUIRE_SIGNATURES", "1")
    app = web.create_app({"DATABASE": str(server.db), "TESTING": True})
    assert app.config["REQUIRE_SIGNATURES"] is True
    response = app.test_client().get(f"/reports/{report}", headers={"Accept": "application/json"})
    assert response.get_json()["paths"][built.out_path] == web.ONE_BUILD


def test_require_signatures_environment_variable_reaches_the_server_process(start_server, nix, nix_key, built,
                                                                            tmp_path, monkeypatch):
    database = tmp_path / "shared.db"
    report = reproduced_by_one_verified_and_one_unverified(start_server(db=database), nix, nix_key, built)
    monkeypatch.setenv("HASH_COLLECTION_REQUIRE_SIGNATURES", "1")
    verified_only = start_server(db=database)
    assert report_summary(verified_only, report)["paths"][built.out_path] == web.ONE_BUILD


def test_output_page_verdict_in_verified_only_mode_counts_only_verified_attestations(start_server, nix, nix_key,
                                                                                    built):
    verified_only = start_server("--require-signatures")
    reproduced_by_one_verified_and_one_unverified(verified_only, nix, nix_key, built)
    response = requests.get(f"{verified_only.url}/outputs/{built.basename}", headers={"Accept": "text/html"},
                            timeout=TIMEOUT)
    assert web.ONE_BUILD in response.text
    assert web.REPRODUCED not in response.text


def test_report_page_says_verified_only_mode_is_on(start_server, nix, nix_key, built):
    verified_only = start_server("--require-signatures")
    report = reproduced_by_one_verified_and_one_unverified(verified_only, nix, nix_key, built)
    assert "verified-only mode" in report_html(verified_only, report).lower()


def test_report_page_says_every_attestation_counts_by_default(server, nix, nix_key, built):
    report = reproduced_by_one_verified_and_one_unverified(server, nix, nix_key, built)
    page = report_html(server, report).lower()
    assert "verified-only mode" not in page
    assert "every attestation" in page


# ---------------------------------------------------------------- per-builder narinfo export

def test_narinfo_carries_what_nix_needs_to_check_the_signature(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    signature = nix_signature(nix, nix_key, built)
    post_attestation(server, token, built, signature)
    response = requests.get(f"{server.url}/signatures/alice/{built.digest}.narinfo", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/x-nix-narinfo")
    fields = dict(line.split(": ", 1) for line in response.text.splitlines())
    assert fields["StorePath"] == built.out_path
    assert fields["URL"]
    assert fields["NarHash"] == built.nar_hash
    assert int(fields["NarSize"]) == built.nar_size
    assert fields["References"].split() == [reference.removeprefix("/nix/store/") for reference in built.references]
    assert fields["Deriver"] == built.drv_path.removeprefix("/nix/store/")
    assert fields["Sig"] == signature


def test_nix_cache_info_names_the_store_dir(server):
    server.create_user("alice")
    response = requests.get(f"{server.url}/signatures/alice/nix-cache-info", timeout=TIMEOUT)
    assert response.status_code == 200
    assert "StoreDir: /nix/store" in response.text.splitlines()


def test_narinfo_serves_the_latest_of_several_hashes_by_one_builder(server, nix, nix_key, built):
    token = server.create_user("alice")
    earlier = {**attestation_of(built, ""), "output_hash": "sha256:" + "0" * 52}
    requests.post(f"{server.url}/attestation/{built.drv_ident}", json=[earlier], headers=bearer(token),
                  timeout=TIMEOUT).raise_for_status()
    post_attestation(server, token, built, "").raise_for_status()
    response = requests.get(f"{server.url}/signatures/alice/{built.digest}.narinfo", timeout=TIMEOUT)
    assert f"NarHash: {built.nar_hash}" in response.text.splitlines()


def test_nix_store_verify_accepts_the_export_with_the_builders_key(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    assert post_attestation(server, token, built, nix_signature(nix, nix_key, built)).status_code == 200
    verify = nix_store_verify(nix, f"{server.url}/signatures/alice", nix_key["public"], built)
    assert verify.returncode == 0, verify.stderr


def test_nix_store_verify_rejects_the_export_with_another_key(server, nix, nix_key, impostor_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    assert post_attestation(server, token, built, nix_signature(nix, nix_key, built)).status_code == 200
    verify = nix_store_verify(nix, f"{server.url}/signatures/alice", impostor_key["public"], built)
    assert verify.returncode != 0
    assert "untrusted" in verify.stderr


def test_nix_store_verify_does_not_trust_an_unsigned_fixed_output_attestation(server, nix, nix_key):
    """Reviewed: with a CA: line, Nix trusts a content-addressed path without any signature, and with --no-contents
    never checks its NarHash: the export vouched for a hash nobody signed. The export has no CA: line."""
    token = server.create_user("alice", "--public-key", nix_key["public"])
    ca = "fixed:sha256:" + nix_base32_encode(bytes(range(32)))
    path = fixed_output_path(ca, f"src-{uuid.uuid4().hex[:8]}.tar.gz")
    unsigned = {"output_path": path, "output_hash": "sha256:" + "1" * 52, "output_sig": "", "nar_size": 1234,
                "references": [], "ca": ca}
    assert post_batch(server, token, [unsigned]).status_code == 200
    verify = subprocess.run(["nix", "store", "verify", "--no-contents", "--store", f"{server.url}/signatures/alice",
                             "--trusted-public-keys", nix_key["public"], "--sigs-needed", "1", path],
                            env=nix(), capture_output=True, text=True, timeout=60)
    assert verify.returncode != 0 and "untrusted" in verify.stderr, verify.stderr


# ---------------------------------------------------------------- builders and their keys

def test_builders_json_lists_keys_and_attestation_counts(server, nix_key, built):
    alice = server.create_user("alice", "--public-key", nix_key["public"])
    server.create_user("bob")
    post_attestation(server, alice, built, "").raise_for_status()
    response = requests.get(f"{server.url}/builders", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == [{"name": "alice", "public_keys": [nix_key["public"]], "attestations": 1},
                               {"name": "bob", "public_keys": [], "attestations": 0}]


def test_builders_never_show_tokens(server, nix_key):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    for accept in ("application/json", "text/html"):
        response = requests.get(f"{server.url}/builders", headers={"Accept": accept}, timeout=TIMEOUT)
        assert token not in response.text
        assert web.token_digest(token) not in response.text


def test_builders_is_html_for_a_browser(server, nix_key):
    server.create_user("alice", "--public-key", nix_key["public"])
    response = requests.get(f"{server.url}/builders", headers={"Accept": "text/html"}, timeout=TIMEOUT)
    assert response.headers["Content-Type"].startswith("text/html")
    assert "alice" in response.text and nix_key["public"] in response.text


def test_create_user_twice_with_two_keys_registers_both(server, nix_key, bob_key):
    server.create_user("alice", "--public-key", nix_key["public"])
    server.create_user("alice", "--public-key", bob_key["public"])
    [alice] = requests.get(f"{server.url}/builders", timeout=TIMEOUT).json()
    assert sorted(alice["public_keys"]) == sorted([nix_key["public"], bob_key["public"]])


def test_create_user_list_shows_every_key_of_a_builder(server, nix_key, bob_key):
    server.create_user("alice", "--public-key", nix_key["public"])
    server.create_user("alice", "--public-key", bob_key["public"])
    [line] = [line for line in run_create_user(server, "--list").splitlines() if line.startswith("alice")]
    assert nix_key["public"] in line and bob_key["public"] in line


def test_key_registered_later_verifies_later_attestations(server, nix, nix_key, built):
    token = server.create_user("alice")
    server.create_user("alice", "--public-key", nix_key["public"])
    assert post_attestation(server, token, built, nix_signature(nix, nix_key, built)).status_code == 200
    [stored] = by_output(server, built)
    assert stored["verified"] is True


def test_reposting_with_a_good_signature_upgrades_an_unverified_attestation(server, nix, nix_key, built):
    token = server.create_user("alice", "--public-key", nix_key["public"])
    assert post_attestation(server, token, built, "").status_code == 200
    assert post_attestation(server, token, built, nix_signature(nix, nix_key, built)).status_code == 200
    [stored] = by_output(server, built)
    assert stored["verified"] is True
