"""Nobody speaks for another builder: attestations belong to the token's builder,
reports to their definer (or an admin), and a revoked token stops at once."""
import hashlib
import sqlite3

import pytest
import requests

import sbom_samples
import web
from attestation_samples import (base32_form, basename_of, batch_item, create_user_in_process, drv_ident,
                                 first_generation, lila_generation, nar_hash_bytes, out_path)
from support import bearer, create_user, database_dump as dump

SBOM = sbom_samples.nix_build_sbom(sbom_samples.DIAMOND).sbom
OTHER_SBOM = sbom_samples.nix_build_sbom({"other": ["leaf"], "leaf": []}).sbom
JSON = {"Accept": "application/json"}


@pytest.fixture
def team(tokens):
    """alice defines reports, bob is another builder, root is an admin."""
    return {"alice": tokens("alice"), "bob": tokens("bob"), "root": tokens("root", "--admin")}


@pytest.fixture
def alices_report(client, team):
    response = client.put("/reports/diamond", json=SBOM, headers=bearer(team["alice"]))
    assert response.status_code == 200, response.get_json()
    return "diamond"


def builders_of(client, path):
    return [attestation["builder"] for attestation in
            client.get(f"/outputs/{basename_of(path)}", headers=JSON).get_json()]


# ---------------------------------------------------------------- attestations belong to the token's builder

def test_single_attestation_naming_another_builder_is_recorded_under_the_tokens_builder(client, team):
    path = out_path()
    attestation = first_generation(path, base32_form(nar_hash_bytes()), builder="bob", builder_id=2)
    response = client.post(f"/attestation/{drv_ident()}", json=[attestation], headers=bearer(team["alice"]))
    assert response.status_code == 200
    assert builders_of(client, path) == ["alice"]


def test_lila_attestation_naming_another_builder_is_recorded_under_the_tokens_builder(client, team):
    path = out_path()
    attestation = lila_generation(path, base32_form(nar_hash_bytes()), builder="bob")
    response = client.post(f"/attestation/{drv_ident()}", json=[attestation], headers=bearer(team["alice"]))
    assert response.status_code == 200
    assert builders_of(client, path) == ["alice"]


def test_batch_attestation_naming_another_builder_is_recorded_under_the_tokens_builder(client, team):
    path = out_path()
    item = batch_item(path, base32_form(nar_hash_bytes()), f"/nix/store/{drv_ident()}.drv", builder="bob")
    response = client.post("/attestations", json=[item], headers=bearer(team["alice"]))
    assert response.status_code == 200
    assert builders_of(client, path) == ["alice"]


def test_builder_query_parameter_does_not_change_who_attests(client, team):
    path = out_path()
    attestation = first_generation(path, base32_form(nar_hash_bytes()))
    response = client.post(f"/attestation/{drv_ident()}?builder=bob", json=[attestation], headers=bearer(team["alice"]))
    assert response.status_code == 200
    assert builders_of(client, path) == ["alice"]


# ---------------------------------------------------------------- reports belong to their definer

def test_another_builder_cannot_replace_a_report(app, client, team, alices_report):
    before = dump(app.config["DATABASE"])
    response = client.put(f"/reports/{alices_report}", json=OTHER_SBOM, headers=bearer(team["bob"]))
    assert response.status_code == 403
    assert isinstance(response.get_json()["error"], str)
    assert dump(app.config["DATABASE"]) == before


def test_another_builder_cannot_delete_a_report(app, client, team, alices_report):
    before = dump(app.config["DATABASE"])
    response = client.delete(f"/reports/{alices_report}", headers=bearer(team["bob"]))
    assert response.status_code == 403
    assert isinstance(response.get_json()["error"], str)
    assert dump(app.config["DATABASE"]) == before


def test_the_definer_can_replace_its_report(client, team, alices_report):
    response = client.put(f"/reports/{alices_report}", json=OTHER_SBOM, headers=bearer(team["alice"]))
    assert response.status_code == 200
    root = client.get(f"/reports/{alices_report}", headers=JSON).get_json()["root"]
    assert root == OTHER_SBOM["metadata"]["component"]["bom-ref"]


def test_the_definer_can_delete_its_report(client, team, alices_report):
    response = client.delete(f"/reports/{alices_report}", headers=bearer(team["alice"]))
    assert response.status_code == 200
    assert client.get(f"/reports/{alices_report}", headers=JSON).status_code == 404


def test_an_admin_can_replace_anyones_report(client, team, alices_report):
    response = client.put(f"/reports/{alices_report}", json=OTHER_SBOM, headers=bearer(team["root"]))
    assert response.status_code == 200
    root = client.get(f"/reports/{alices_report}", headers=JSON).get_json()["root"]
    assert root == OTHER_SBOM["metadata"]["component"]["bom-ref"]


def test_an_admin_can_delete_anyones_report(client, team, alices_report):
    response = client.delete(f"/reports/{alices_report}", headers=bearer(team["root"]))
    assert response.status_code == 200
    assert client.get(f"/reports/{alices_report}", headers=JSON).status_code == 404


def test_a_report_replaced_by_an_admin_still_cannot_be_changed_by_a_third_builder(client, team, alices_report):
    assert client.put(f"/reports/{alices_report}", json=OTHER_SBOM, headers=bearer(team["root"])).status_code == 200
    response = client.delete(f"/reports/{alices_report}", headers=bearer(team["bob"]))
    assert response.status_code == 403


def test_a_non_admin_created_with_the_same_name_later_gets_no_admin_rights(app, client, team, alices_report):
    # A second token for an existing builder must not touch is_admin either way.
    second_bob_token = create_user_in_process(app.config["DATABASE"], "bob")
    response = client.delete(f"/reports/{alices_report}", headers=bearer(second_bob_token))
    assert response.status_code == 403


def test_deleting_a_report_without_a_token_is_401(client, alices_report):
    response = client.delete(f"/reports/{alices_report}")
    assert response.status_code == 401
    assert isinstance(response.get_json()["error"], str)


# ---------------------------------------------------------------- team

def test_revoked_token_is_refused_on_the_next_request(server):
    token = server.create_user("alice")
    first = requests.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(token),
                          json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert first.status_code == 200
    create_user(server.db, "--revoke", token)
    second = requests.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(token),
                           json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert second.status_code == 401
    assert isinstance(second.json()["error"], str)


def test_revoked_token_is_refused_on_the_same_keep_alive_connection(server):
    token = server.create_user("alice")
    with requests.Session() as session:
        for _ in range(8):  # touch every worker thread's cached connection before revoking
            assert session.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(token),
                                json=[first_generation(out_path(), base32_form(nar_hash_bytes()))]).status_code == 200
        create_user(server.db, "--revoke", token)
        refused = [session.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(token),
                                json=[first_generation(out_path(), base32_form(nar_hash_bytes()))]).status_code
                   for _ in range(8)]
    assert refused == [401] * 8


def test_revoking_one_token_leaves_the_builders_other_token_working(server):
    first = server.create_user("alice")
    second = server.create_user("alice")
    create_user(server.db, "--revoke", first)
    response = requests.post(f"{server.url}/attestation/{drv_ident()}", timeout=10, headers=bearer(second),
                             json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 200


def test_database_stores_tokens_only_as_sha256_hex(app, team):
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        stored = {row[0] for row in conn.execute("SELECT token_sha256 FROM tokens")}
    assert stored == {hashlib.sha256(token.encode()).hexdigest() for token in team.values()}


def test_no_token_appears_anywhere_in_the_database_file(app, team):
    # The WAL is checkpointed first so that the main file holds every row.
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    content = open(app.config["DATABASE"], "rb").read()
    assert not [name for name, token in team.items() if token.encode() in content]


def test_token_is_looked_up_by_its_sha256(app, client):
    # A row holding only the digest is enough to authenticate: the server hashes what it is sent.
    token = "looked-up-by-digest-" + "x" * 20
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        builder_id = conn.execute("INSERT INTO builders (name) VALUES ('carol')").lastrowid
        conn.execute("INSERT INTO tokens (builder_id, token_sha256) VALUES (?, ?)",
                     (builder_id, hashlib.sha256(token.encode()).hexdigest()))
    path = out_path()
    response = client.post(f"/attestation/{drv_ident()}", json=[first_generation(path, base32_form(nar_hash_bytes()))],
                           headers=bearer(token))
    assert response.status_code == 200
    assert builders_of(client, path) == ["carol"]


def test_the_stored_digest_itself_is_not_a_token(app, client, team):
    digest = hashlib.sha256(team["alice"].encode()).hexdigest()
    response = client.post(f"/attestation/{drv_ident()}", headers=bearer(digest),
                           json=[first_generation(out_path(), base32_form(nar_hash_bytes()))])
    assert response.status_code == 401


# ---------------------------------------------------------------- link patterns

def post_pattern(client, token, pattern, link="https://example.org/alice"):
    return client.post("/link_patterns", query_string={"pattern": pattern, "link": link}, headers=bearer(token))


def delete_pattern(client, token, pattern):
    return client.delete("/link_patterns", query_string={"pattern": pattern}, headers=bearer(token) if token else {})


def links(client):
    return {row["pattern"]: (row["link"], row["owner"]) for row in client.get("/link_patterns").get_json()}


def test_another_builder_cannot_replace_a_link_pattern(client, team):
    assert post_pattern(client, team["alice"], "^gcc-").status_code == 200
    response = post_pattern(client, team["bob"], "^gcc-", "https://example.org/bob")
    assert response.status_code == 403
    assert links(client) == {"^gcc-": ("https://example.org/alice", "alice")}


def test_another_builder_cannot_delete_a_link_pattern(client, team):
    post_pattern(client, team["alice"], "^gcc-")
    assert delete_pattern(client, team["bob"], "^gcc-").status_code == 403
    assert links(client) == {"^gcc-": ("https://example.org/alice", "alice")}


def test_the_owner_deletes_a_link_pattern(client, team):
    post_pattern(client, team["alice"], "^gcc-")
    response = delete_pattern(client, team["alice"], "^gcc-")
    assert response.status_code == 200
    assert response.get_json() == {"pattern": "^gcc-", "status": "deleted"}
    assert links(client) == {}


def test_an_admin_may_change_and_delete_anyones_link_pattern(client, team):
    post_pattern(client, team["alice"], "^gcc-")
    assert post_pattern(client, team["root"], "^gcc-", "https://example.org/root").status_code == 200
    assert links(client) == {"^gcc-": ("https://example.org/root", "alice")}
    assert delete_pattern(client, team["root"], "^gcc-").status_code == 200
    assert links(client) == {}


def test_deleting_a_link_pattern_needs_a_token(client, team):
    post_pattern(client, team["alice"], "^gcc-")
    assert delete_pattern(client, None, "^gcc-").status_code == 401


def test_deleting_an_unknown_link_pattern_is_404(client, team):
    response = delete_pattern(client, team["alice"], "^nothing-")
    assert response.status_code == 404
    assert "^nothing-" in response.get_json()["error"]


def test_link_pattern_slots_are_per_builder(client, team):
    for number in range(web.MAX_LINK_PATTERNS):
        assert post_pattern(client, team["alice"], f"^alice-{number}-").status_code == 200
    full = post_pattern(client, team["alice"], "^one-more-")
    assert full.status_code == 400
    assert "per builder" in full.get_json()["error"]
    assert post_pattern(client, team["bob"], "^bob-").status_code == 200
    assert post_pattern(client, team["alice"], "^alice-0-", "https://example.org/new").status_code == 200
