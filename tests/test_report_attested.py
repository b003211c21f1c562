"""The server keeps who attested each reported path (reported_paths: attested and attested_fixed), written when a
report first lists it and brought up to date in the transaction of every attestation that changes it: what views
read must always be what the attestations say now, whichever came first, the report or the attestation."""
import json
import sqlite3

import pytest

import attestation_samples as samples
import web
from post_build_hook import fingerprint, fixed_output_path, sign_fingerprint
from support import bearer

PATH_INFO = "application/x-nix-path-info+json"
JSON = {"Accept": "application/json"}
CA = "fixed:r:" + samples.base32_form(samples.nar_hash_bytes())
FIXED = fixed_output_path(CA, "source")


@pytest.fixture
def paths():
    return {name: samples.out_path(name) for name in ("root", "agreed", "disputed", "late", "twin")} | {"fixed": FIXED}


@pytest.fixture
def keys():
    return {builder: samples.nix_key_pair(builder) for builder in ("alice", "bob", "carol")}


@pytest.fixture
def builders(tokens, keys):
    return {builder: tokens(builder, "--public-key", public) for builder, (_secret, public) in keys.items()}


def attest(client, builders, keys, builder, path, nar_hash, signed=False, **extra):
    signature = sign_fingerprint(keys[builder][0], fingerprint(path, nar_hash, 1024, [])) if signed else ""
    item = samples.batch_item(path, nar_hash, sig=signature, nar_size=1024, references=[], **extra)
    response = client.post("/attestations", json=[item], headers=bearer(builders[builder]))
    assert response.status_code == 200, response.get_json()


def define(client, builders, name, paths):
    body = [{"path": path, "references": []} for path in paths]
    response = client.put(f"/reports/{name}", data=json.dumps(body), content_type=PATH_INFO, headers=bearer(builders["alice"]))
    assert response.status_code == 200, response.get_json()


def stored_and_recounted(app):
    """{store path: (attested as a set of hash groups, attested_fixed, builders, verified_builders)} of each reported
    path, as kept and as counted now."""
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        rows = conn.execute(f"SELECT reported_paths.digest, reported_paths.name,"
                            f" {', '.join(f'reported_paths.{column}' for column in web.ATTESTED_COLUMNS)},"
                            f" {web.attested_values('store_paths.id')} FROM reported_paths LEFT JOIN store_paths"
                            " ON store_paths.digest = reported_paths.digest AND store_paths.name = reported_paths.name").fetchall()
    kept = {web.path_text(digest, name): (groups(attested), *counts) for digest, name, attested, *counts, _, _, _, _ in rows}
    recounted = {web.path_text(digest, name): (groups(attested), *counts) for digest, name, _, _, _, _, attested, *counts in rows}
    return kept, recounted


def groups(attested):
    return frozenset(frozenset(group.split(",")) for group in attested.split("|")) if attested else frozenset()


def builder_id(app, name):
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        return conn.execute("SELECT id FROM builders WHERE name = ?", (name,)).fetchone()[0]


def kept_of(app, path):
    kept, _ = stored_and_recounted(app)
    return kept[path]


def test_reported_paths_keep_what_the_attestations_say_before_and_after_the_report(app, client, builders, keys, paths):
    good, other = samples.base32_form(samples.nar_hash_bytes()), samples.base32_form(samples.nar_hash_bytes())
    attest(client, builders, keys, "alice", paths["agreed"], good)
    attest(client, builders, keys, "bob", paths["agreed"], good, signed=True)
    define(client, builders, "first", [paths[name] for name in ("root", "agreed", "disputed", "fixed", "twin")])
    define(client, builders, "second", [paths["disputed"], paths["late"]])
    attest(client, builders, keys, "carol", paths["disputed"], good)
    attest(client, builders, keys, "alice", paths["disputed"], other)
    attest(client, builders, keys, "alice", paths["late"], good, signed=True)
    attest(client, builders, keys, "alice", paths["fixed"], good, ca=CA)
    attest(client, builders, keys, "alice", paths["agreed"], good, signed=True)  # upgrades alice's unverified one
    # Another name with the twin's hash part is another store path: it changes no row of the twin's.
    attest(client, builders, keys, "bob", paths["twin"].replace("-twin", "-not-twin"), good)

    kept, recounted = stored_and_recounted(app)
    assert kept == recounted
    assert set(kept) == {paths[name] for name in ("root", "agreed", "disputed", "fixed", "twin", "late")}
    alice, bob, carol = (builder_id(app, name) for name in ("alice", "bob", "carol"))
    assert kept_of(app, paths["agreed"]) == (groups(f"{alice}v,{bob}v"), 0, 2, 2)
    assert kept_of(app, paths["disputed"]) == (groups(f"{carol}|{alice}"), 0, 2, 0)
    assert kept_of(app, paths["late"]) == (groups(f"{alice}v"), 0, 1, 1)
    assert kept_of(app, paths["fixed"]) == (groups(f"{alice}"), 1, 1, 0)
    assert kept_of(app, paths["twin"]) == (frozenset(), 0, 0, 0)


def test_views_read_the_kept_rows_under_every_policy(client, builders, keys, paths):
    good = samples.base32_form(samples.nar_hash_bytes())
    define(client, builders, "first", [paths[name] for name in ("root", "agreed", "fixed")])
    attest(client, builders, keys, "alice", paths["agreed"], good)
    attest(client, builders, keys, "bob", paths["agreed"], good, signed=True)
    attest(client, builders, keys, "alice", paths["fixed"], good, ca=CA)

    def verdicts(query=""):
        return client.get(f"/reports/first{query}", headers=JSON).get_json()["paths"]

    assert verdicts()[paths["agreed"]] == web.REPRODUCED
    assert verdicts()[paths["fixed"]] == web.FIXED_OUTPUT
    assert verdicts("?verified=1")[paths["agreed"]] == web.ONE_BUILD
    assert verdicts("?trust=alice,bob")[paths["agreed"]] == web.REPRODUCED
    assert verdicts("?trust=alice,carol")[paths["agreed"]] == web.ONE_BUILD
    assert verdicts("?trust=carol,alice&verified=1")[paths["agreed"]] == web.NO_BUILDS
    attest(client, builders, keys, "alice", paths["agreed"], good, signed=True)
    assert verdicts("?verified=1")[paths["agreed"]] == web.REPRODUCED


def test_suggestions_read_the_kept_rows(client, builders, keys, paths):
    good = samples.base32_form(samples.nar_hash_bytes())
    define(client, builders, "first", [paths[name] for name in ("root", "agreed", "disputed", "fixed")])
    attest(client, builders, keys, "alice", paths["agreed"], good)
    attest(client, builders, keys, "bob", paths["agreed"], good)
    attest(client, builders, keys, "carol", paths["disputed"], good)
    attest(client, builders, keys, "carol", paths["fixed"], good, ca=CA)

    def suggested(builder, query=""):
        response = client.get(f"/reports/first/suggest?limit=10{query}", headers=bearer(builders[builder]))
        assert response.status_code == 200, response.get_json()
        return {item["out_path"] for item in response.get_json()}

    assert suggested("alice") == {paths["root"], paths["disputed"]}
    assert suggested("carol") == {paths["root"]}
    assert suggested("carol", "&trust=alice,carol") == {paths["root"], paths["agreed"]}
    assert suggested("bob", "&verified=1") == {paths["root"], paths["disputed"], paths["agreed"]}
    attest(client, builders, keys, "alice", paths["agreed"], good, signed=True)
    attest(client, builders, keys, "bob", paths["agreed"], good, signed=True)
    assert suggested("carol", "&verified=1") == {paths["root"], paths["disputed"]}
