"""PUT /diffs/<path>/<hash A>/<hash B> and the views of diffs: who may send one, what is refused, where it shows."""
import json
import re
import zlib

import pytest

import sbom_samples as samples
from attestation_samples import base32_form, hex_form, nar_hash_bytes, out_path, sri_form
from support import bearer
from post_build_hook import basename_of

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}


def pair():
    """Two canonical NAR hashes, A < B."""
    return sorted(base32_form(nar_hash_bytes()) for _ in range(2))


def diff_body(*differing, diffoscope="--- a/stamp\n+++ b/stamp\n-1\n+2\n"):
    return {"files": {"differing": list(differing) or [regular_change("stamp")],
                      "totals": {"paths_a": 3, "paths_b": 3, "differing": len(differing) or 1}, "cut": []},
            "diffoscope": diffoscope, "tool_versions": {"hash-collection-diff": "1", "diffoscope": "245"}}


def regular_change(path, size=2):
    return {"path": path, "a": {"type": "regular", "size": size, "executable": False, "sha256": "a" * 64},
            "b": {"type": "regular", "size": size, "executable": False, "sha256": "b" * 64}}


def diff_url(path, hash_a, hash_b):
    return f"/diffs/{basename_of(path).replace('?', '%3F')}/{hash_a}/{hash_b}"


@pytest.fixture
def attested(client, tokens):
    """(out path, hash A, hash B): alice attested A, bob attested B."""
    path, (hash_a, hash_b) = out_path("stamped-1.0"), pair()
    for builder, nar_hash in (("alice", hash_a), ("bob", hash_b)):
        response = client.post("/attestations", json=[{"output_path": path, "output_hash": nar_hash, "output_sig": ""}],
                               headers=bearer(tokens(builder)))
        assert response.status_code == 200, response.get_json()
    return path, hash_a, hash_b


def put_diff(client, token, url, body):
    return client.put(url, json=body, headers=bearer(token))


# ---------------------------------------------------------------- storing

def test_a_builder_that_attested_one_hash_stores_the_diff_and_anyone_reads_it(client, tokens, attested):
    path, hash_a, hash_b = attested
    response = put_diff(client, tokens("bob"), diff_url(*attested), diff_body())
    assert response.status_code == 200 and response.get_json()["status"] == "stored"
    shown = client.get(diff_url(*attested), headers=JSON).get_json()
    assert (shown["output_path"], shown["hash_a"], shown["hash_b"], shown["uploader"]) == (path, hash_a, hash_b, "bob")
    assert [entry["path"] for entry in shown["files"]["differing"]] == ["stamp"]
    assert shown["diffoscope"].startswith("--- a/stamp")
    assert shown["tool_versions"]["diffoscope"] == "245"


def test_the_same_diff_sent_again_changes_nothing(client, tokens, attested):
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body()).get_json()["status"] == "stored"
    again = put_diff(client, tokens("alice"), diff_url(*attested), diff_body(diffoscope="other text"))
    assert again.status_code == 200 and again.get_json()["status"] == "known"
    shown = client.get(diff_url(*attested), headers=JSON).get_json()
    assert shown["uploader"] == "bob" and shown["diffoscope"].startswith("--- a/stamp")
    assert len(client.get(f"/diffs/{basename_of(attested[0])}", headers=JSON).get_json()) == 1


def test_a_diff_listing_differing_paths_replaces_one_that_listed_none(client, tokens, attested):
    """Reviewed: an empty diff, sent first, kept the evidence out for good."""
    empty = {**diff_body(), "files": {"differing": [], "totals": {}, "cut": []}, "diffoscope": ""}
    assert put_diff(client, tokens("alice"), diff_url(*attested), empty).get_json()["status"] == "stored"
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body()).get_json()["status"] == "stored"
    shown = client.get(diff_url(*attested), headers=JSON).get_json()
    assert shown["uploader"] == "bob" and [entry["path"] for entry in shown["files"]["differing"]] == ["stamp"]
    assert put_diff(client, tokens("alice"), diff_url(*attested), empty).get_json()["status"] == "known"
    assert client.get(diff_url(*attested), headers=JSON).get_json()["uploader"] == "bob"


def test_diff_is_stored_compressed(app, client, tokens, attested):
    text = "same line of diffoscope output\n" * 20_000
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body(diffoscope=text)).status_code == 200
    import sqlite3
    with sqlite3.connect(app.config["DATABASE"]) as conn:
        [(stored,)] = conn.execute("SELECT document FROM diffs").fetchall()
    assert len(stored) < len(text) / 20
    assert json.loads(zlib.decompress(stored))["diffoscope"] == text


def test_file_table_is_kept_sorted_whatever_the_upload_order(client, tokens, attested):
    body = diff_body(regular_change("z"), regular_change("a"), regular_change("m"))
    assert put_diff(client, tokens("bob"), diff_url(*attested), body).status_code == 200
    shown = client.get(diff_url(*attested), headers=JSON).get_json()
    assert [entry["path"] for entry in shown["files"]["differing"]] == ["a", "m", "z"]


# ---------------------------------------------------------------- refused

def test_a_builder_that_attested_neither_hash_gets_403(client, tokens, attested):
    response = put_diff(client, tokens("mallory"), diff_url(*attested), diff_body())
    assert response.status_code == 403 and "neither hash" in response.get_json()["error"]
    assert client.get(diff_url(*attested), headers=JSON).status_code == 404


def test_a_hash_attested_for_another_path_does_not_count(client, tokens, attested):
    _path, hash_a, hash_b = attested
    response = put_diff(client, tokens("alice"), diff_url(out_path("other-1.0"), hash_a, hash_b), diff_body())
    assert response.status_code == 403


def test_without_a_token_401(client, attested):
    assert client.put(diff_url(*attested), json=diff_body()).status_code == 401


def test_hashes_in_the_wrong_order_are_400_on_upload_and_404_on_reading(client, tokens, attested):
    path, hash_a, hash_b = attested
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body()).status_code == 200
    swapped = diff_url(path, hash_b, hash_a)
    response = put_diff(client, tokens("bob"), swapped, diff_body())
    assert response.status_code == 400 and "hash A < hash B" in response.get_json()["error"]
    assert client.get(swapped, headers=JSON).status_code == 404


@pytest.mark.parametrize("encode", [hex_form, sri_form, lambda raw: "md5:" + raw.hex()[:32],
                                    lambda raw: base32_form(raw).upper()], ids=["base16", "sri", "md5", "upper"])
def test_hash_not_in_canonical_form_is_400_on_upload_and_404_on_reading(client, tokens, attested, encode):
    path, hash_a, _hash_b = attested
    other = next(text for text in (encode(nar_hash_bytes()) for _ in range(100)) if "/" not in text)  # SRI's base64 may hold '/'
    url = f"/diffs/{basename_of(path)}/{hash_a}/{other}" if hash_a < other else f"/diffs/{basename_of(path)}/{other}/{hash_a}"
    response = put_diff(client, tokens("alice"), url, diff_body())
    assert response.status_code == 400 and "canonical form" in response.get_json()["error"]
    assert client.get(url, headers=JSON).status_code == 404


def test_bad_store_path_is_400(client, tokens, attested):
    _path, hash_a, hash_b = attested
    response = put_diff(client, tokens("alice"), f"/diffs/not-a-store-path/{hash_a}/{hash_b}", diff_body())
    assert response.status_code == 400 and "path" in response.get_json()["error"]


@pytest.mark.parametrize("body, complaint", [
    ([], "expected a JSON object"),
    ({"diffoscope": "x"}, "body.files: missing"),
    ({"files": {"differing": "stamp"}}, "files.differing: expected list"),
    ({"files": {"differing": [{"path": "x", "a": None, "b": None}]}}, "missing on both sides"),
    ({"files": {"differing": [{"path": "", "a": {"type": "regular"}}]}}, "path: expected 1 to"),
    ({"files": {"differing": [{"path": "x", "a": {"type": "socket"}}]}}, "a.type: expected one of"),
    ({"files": {"differing": [{"path": "x", "a": {"type": ["regular"]}}]}}, "a.type: expected one of"),
    ({"files": {"differing": [{"path": "x", "b": {"type": {"regular": 1}}}]}}, "b.type: expected one of"),
    ({"files": {"differing": [{"path": "x", "a": {"type": "regular", "size": -1}}]}}, "a.size"),
    ({"files": {"differing": [{"path": "x", "a": {"type": "regular", "sha256": "XYZ"}}]}}, "a.sha256"),
    ({"files": {"differing": [{"path": "x", "b": {"type": "regular", "executable": "yes"}}]}}, "b.executable"),
    ({"files": {"differing": [], "totals": {"n": "many"}}}, "files.totals"),
    ({"files": {"differing": []}, "diffoscope": 7}, "body.diffoscope: expected str"),
    ({"files": {"differing": []}, "tool_versions": {"diffoscope": 245}}, "tool_versions.diffoscope"),
    ({"files": {"differing": [{"path": "x", "a": {"type": "regular"}}] * 10_001}}, "at most 10000 paths"),
])
def test_malformed_diff_is_400_naming_what_is_wrong(client, tokens, attested, body, complaint):
    response = put_diff(client, tokens("alice"), diff_url(*attested), body)
    assert response.status_code == 400
    assert complaint in response.get_json()["error"]
    assert client.get(diff_url(*attested), headers=JSON).status_code == 404


def test_body_that_is_not_json_is_400(client, tokens, attested):
    response = client.put(diff_url(*attested), data=b"{not json", headers=bearer(tokens("alice")))
    assert response.status_code == 400 and "not JSON" in response.get_json()["error"]


def test_lone_surrogate_is_400_not_500(client, tokens, attested):
    response = client.put(diff_url(*attested), data=b'{"files": {"differing": []}, "diffoscope": "\\ud800"}',
                          headers=bearer(tokens("alice")))
    assert response.status_code == 400 and "surrogate" in response.get_json()["error"]


def test_body_over_16_mib_is_413(client, tokens, attested):
    body = diff_body(diffoscope="x" * (16 << 20))
    assert put_diff(client, tokens("alice"), diff_url(*attested), body).status_code == 413
    assert client.get(diff_url(*attested), headers=JSON).status_code == 404


def test_diff_over_8_mib_compressed_is_413_and_says_the_limit(client, tokens, attested):
    import os
    import base64
    incompressible = base64.b64encode(os.urandom(11 << 20)).decode()[:15 << 20]
    response = put_diff(client, tokens("alice"), diff_url(*attested), diff_body(diffoscope=incompressible))
    assert response.status_code == 413
    assert "compressed" in response.get_json()["error"] and str(8 << 20) in response.get_json()["error"]
    assert client.get(diff_url(*attested), headers=JSON).status_code == 404


# ---------------------------------------------------------------- views

def test_diff_page_shows_the_file_table_first_then_diffoscope_folded_after_one_screen(client, tokens, attested):
    text = "".join(f"line {n}\n" for n in range(100))
    body = diff_body(regular_change("stamp"), {"path": "only-in-b", "a": None, "b": {"type": "regular", "size": 5}},
                     diffoscope=text)
    assert put_diff(client, tokens("bob"), diff_url(*attested), body).status_code == 200
    page = client.get(diff_url(*attested), headers=HTML).get_data(as_text=True)
    assert page.index('id="files"') < page.index('id="diffoscope"')
    assert "only in B" in page and "sha256 aaaaaaaaaaaa…" in page and "100 lines" in page
    shown = re.search(r'<pre id="diffoscope">(.*?)</pre>', page, re.S).group(1)
    assert "line 0\n" in shown and "line 99" not in shown
    assert re.search(r"<details><summary>\d+ more lines</summary>\s*<pre[^>]*>[^<]*line 99", page)


def test_list_of_diffs_of_a_path(client, tokens, attested):
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body()).status_code == 200
    listed = client.get(f"/diffs/{basename_of(attested[0])}", headers=JSON).get_json()
    assert [(diff["hash_a"], diff["hash_b"], diff["href"]) for diff in listed] == [
        (attested[1], attested[2], diff_url(*attested))]
    page = client.get(f"/diffs/{basename_of(attested[0])}", headers=HTML).get_data(as_text=True)
    assert f'href="{diff_url(*attested)}"' in page


def test_output_page_links_the_pair_to_its_diff(client, tokens, attested):
    page = client.get(f"/outputs/{basename_of(attested[0])}", headers=HTML).get_data(as_text=True)
    assert "/diffs/" not in page
    assert put_diff(client, tokens("bob"), diff_url(*attested), diff_body()).status_code == 200
    page = client.get(f"/outputs/{basename_of(attested[0])}", headers=HTML).get_data(as_text=True)
    assert f'href="{diff_url(*attested)}"' in page


@pytest.fixture
def report_with_diff(client, tokens):
    """Report "diffed": "flaky" is nondeterministic and has a diff; "other" is nondeterministic without one."""
    closure = samples.nix_build_sbom({"diff-root": ["flaky", "other"], "flaky": [], "other": []})
    assert client.put("/reports/diffed", json=closure.sbom, headers=bearer(tokens("owner"))).status_code == 200
    hashes = {}
    for name in ("flaky", "other"):
        for builder, result in (("alice", "one"), ("bob", "two")):
            attestation = samples.attestation(closure.out(name), f"{name}-{result}")
            assert client.post("/attestations", json=[attestation], headers=bearer(tokens(builder))).status_code == 200
            hashes.setdefault(name, []).append(attestation["output_hash"])
    flaky_pair = sorted(hashes["flaky"])
    assert put_diff(client, tokens("bob"), diff_url(closure.out("flaky"), *flaky_pair), diff_body()).status_code == 200
    return closure, flaky_pair


def test_report_page_shows_a_diff_link_only_where_a_diff_exists(client, report_with_diff):
    closure, flaky_pair = report_with_diff
    page = client.get("/reports/diffed", headers=HTML).get_data(as_text=True)
    section = page[page.index('id="not-reproducible"'):page.index('id="unchecked"')]
    assert re.findall(r'<a class="diff" href="([^"]*)">diff</a>', section) == [diff_url(closure.out("flaky"), *flaky_pair)]


def test_report_json_lists_the_diffs_of_its_paths(client, report_with_diff):
    closure, flaky_pair = report_with_diff
    summary = client.get("/reports/diffed", headers=JSON).get_json()
    assert summary["diffs"] == {closure.out("flaky"): [flaky_pair]}


def test_migration_from_version_1_adds_the_diffs_table(tmp_path):
    import sqlite3
    import web
    from support import REPO
    db = tmp_path / "old.db"
    version_1 = (REPO / "tests" / "data" / "schema-v1.sql").read_text()
    with sqlite3.connect(db) as conn:
        conn.executescript(version_1)
    web.create_app({"DATABASE": str(db)})
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == web.SCHEMA_VERSION
        assert conn.execute("SELECT COUNT(*) FROM diffs").fetchone()[0] == 0
