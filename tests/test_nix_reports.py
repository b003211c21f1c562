"""Reports from Nix's own output (path-info JSON, --tree text, path lists), fixed-output paths, the headline and badge."""
import base64
import json
import sqlite3
import subprocess
import xml.etree.ElementTree as ElementTree

import pytest
import requests

import post_build_hook as hook
import sbom_samples as samples
import web
from attestation_samples import create_user_in_process
from support import REPO, bearer, database_dump, nix_env, write_derivation

DATA = REPO / "tests" / "data"
JSON = {"Accept": "application/json"}
TOP = "/nix/store/12rw54nxyrf1zbx74clsvjpyjhl04hik-top"
SRC = "/nix/store/svf8sc2h744f55dn5kpbggmq16zvc0bz-src.txt"  # fixed-output: "echo hello" by sha256
DEP = "/nix/store/zrvnb2xzslqxq45xga6zd8q9imrz48gd-dep"
OTHER_DEP = "/nix/store/1rvnb2xzslqxq45xga6zd8q9imrz48gd-dep"
TOP_DRV = "/nix/store/wj07b91zxhy0ymb6l9f4hxc49076b7g9-top.drv"
SRC_CA = "fixed:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq"


def nix_28_path_info():
    """What Nix 2.8's `nix path-info --json -r TOP` prints for that closure: a list."""
    keyed = json.loads((DATA / "path-info-keyed.json").read_text())
    return [{"path": path, **info} for path, info in keyed.items()]


def put(client, token, name, body, content_type, query=""):
    data = body if isinstance(body, str) else json.dumps(body)
    return client.put(f"/reports/{name}{query}", data=data, content_type=content_type, headers=bearer(token))


def summary(client, name):
    response = client.get(f"/reports/{name}", headers=JSON)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def text_tree(client, name):
    return client.get(f"/reports/{name}", headers={"Accept": "text/plain"}).get_data(as_text=True)


def attest(client, token, path, result="good", **extra):
    response = client.post("/attestations", json=[{**samples.attestation(path, result), **extra}], headers=bearer(token))
    assert response.status_code == 200, response.get_json()


# ---------------------------------------------------------------- the three formats

@pytest.mark.parametrize("content_type", ["application/x-nix-path-info+json", "application/json"])
def test_nix_28_path_info_list_gives_paths_edges_and_drv_links(client, tokens, content_type):
    assert put(client, tokens("owner"), "pi", nix_28_path_info(), content_type).status_code == 200
    assert summary(client, "pi")["root"] == TOP
    assert set(summary(client, "pi")["paths"]) == {TOP, SRC, DEP}
    lines = text_tree(client, "pi").splitlines()
    assert lines[0].startswith(TOP) and {line.strip().split()[0] for line in lines[1:]} == {SRC, DEP}
    assert all(line.startswith("  ") for line in lines[1:])
    suggested = client.get("/reports/pi/suggest?limit=10").get_json()
    assert {"out_path": TOP, "drv_path": TOP_DRV, "output": "out"} in suggested


@pytest.mark.parametrize("fixture", ["path-info-keyed.json", "path-info-v2.json"])
def test_path_info_keyed_by_path_as_newer_nix_prints_it_is_parsed(client, tokens, fixture):
    body = (DATA / fixture).read_text()
    assert put(client, tokens("owner"), "keyed", body, "application/json", f"?root={TOP}").status_code == 200
    report = summary(client, "keyed")
    assert set(report["paths"]) == {TOP, SRC, DEP}
    assert report["paths"][SRC] == web.FIXED_OUTPUT
    assert report["headline"] == {"reproduced": 0, "total": 2, "percent": 0.0, "fixed_output": 1}


def test_nix_tree_text_gives_edges_and_repeats(client, tokens):
    tree = (f"{TOP}\n├───{DEP}\n│   └───{SRC}\n└───{SRC} [...]\n")
    assert put(client, tokens("owner"), "tree", tree, "text/x-nix-tree").status_code == 200
    lines = text_tree(client, "tree").splitlines()
    assert lines[0].startswith(TOP) and lines[1].startswith(f"  {DEP}") and lines[2].startswith(f"    {SRC}")
    assert lines[3] == f"  {SRC} (shown above)"


def test_path_list_links_outputs_to_the_drv_of_their_name_and_ends_with_the_root(client, tokens):
    listed = f"{SRC}\n{DEP}\n{TOP}\n{TOP_DRV}\n"
    assert put(client, tokens("owner"), "list", listed, "text/x-nix-paths").status_code == 200
    assert summary(client, "list")["root"] == TOP_DRV
    suggested = client.get("/reports/list/suggest?limit=10").get_json()
    assert {"out_path": TOP, "drv_path": TOP_DRV, "output": "out"} in suggested
    assert {"out_path": DEP} in suggested  # its .drv is not listed


def test_an_older_revision_of_a_report_from_nix_has_no_upload_but_its_headline(client, tokens):
    for label, body in (("r1", nix_28_path_info()), ("r2", nix_28_path_info()[::-1])):
        response = put(client, tokens("owner"), "revised", body, "application/x-nix-path-info+json", f"?revision={label}")
        assert response.status_code == 200, response.get_json()
    older = client.get("/reports/revised?revision=r1", headers={"Accept": "application/x-nix-path-info+json"})
    assert older.status_code == 410 and "upload of its latest revision (2)" in older.get_json()["error"]
    latest = client.get("/reports/revised", headers={"Accept": "application/x-nix-path-info+json"})
    assert latest.status_code == 200 and json.loads(latest.data) == nix_28_path_info()[::-1]
    assert summary(client, "revised?revision=r1")["headline"] == {"reproduced": 0, "total": 2, "percent": 0.0, "fixed_output": 1}


def test_history_and_changes_count_the_paths_an_upload_marks_fixed_output_apart(client, tokens):
    """The latest revision's counts in the history are its view's; an older one keeps its upload's fixed-output paths."""
    attest(client, tokens("alice"), SRC)
    attest(client, tokens("bob"), SRC)  # reproduced, were it not fixed-output
    for label in ("r1", "r2"):
        assert put(client, tokens("owner"), "revised", nix_28_path_info(), "application/json", f"?revision={label}").status_code == 200
    counts = summary(client, "revised")["counts"]
    history = client.get("/reports/revised/history", headers=JSON).get_json()["revisions"]
    assert [revision["counts"] for revision in history] == [counts, counts]
    assert counts[web.FIXED_OUTPUT] == 1 and counts[web.REPRODUCED] == 0
    assert summary(client, "revised?revision=r1")["paths"][SRC] == web.FIXED_OUTPUT
    # Each revision's own upload says which of its paths are fixed-output: the first's removed, the third's added.
    for label, body, content_type in (("a", nix_28_path_info(), "application/json"),
                                      ("b", f"{TOP}\n\u2514\u2500\u2500\u2500{OTHER_DEP}\n", "text/x-nix-tree"),
                                      ("c", nix_28_path_info(), "application/json")):
        assert put(client, tokens("owner"), "other", body, content_type, f"?revision={label}").status_code == 200
    for old, new, listed in (("a", "b", "removed"), ("b", "c", "added")):
        changed = client.get(f"/reports/other/changes?from={old}&to={new}", headers=JSON).get_json()
        assert {entry["path"]: entry["verdict"] for entry in changed[listed]} == {DEP: web.NO_BUILDS, SRC: web.FIXED_OUTPUT}


def test_history_and_an_older_revision_count_the_paths_an_attestation_marks_fixed_output_apart(client, tokens):
    tree = f"{TOP}\n\u251c\u2500\u2500\u2500{DEP}\n\u2514\u2500\u2500\u2500{SRC}\n"
    for label in ("r1", "r2"):
        assert put(client, tokens("owner"), "attested", tree, "text/x-nix-tree", f"?revision={label}").status_code == 200
    attest(client, tokens("alice"), SRC, ca=SRC_CA)
    history = client.get("/reports/attested/history", headers=JSON).get_json()["revisions"]
    assert [revision["counts"].get(web.FIXED_OUTPUT) for revision in history] == [1, 1]
    assert summary(client, "attested?revision=r1")["paths"][SRC] == web.FIXED_OUTPUT


def test_a_version_14_database_keeps_the_fixed_output_paths_of_each_reports_latest_revision(tmp_path):
    """Written by this code, then taken back to version 14 as that version wrote it: no fixed_output column."""
    db = tmp_path / "v14.db"
    app = web.create_app({"DATABASE": str(db), "TESTING": True})
    token = create_user_in_process(db, "owner")
    for label in ("r1", "r2"):
        assert put(app.test_client(), token, "old", nix_28_path_info(), "application/json", f"?revision={label}").status_code == 200
    assert put(app.test_client(), token, "tree", f"{TOP}\n\u2514\u2500\u2500\u2500{SRC}\n", "text/x-nix-tree").status_code == 200
    app.extensions["report_removals"].wait()
    with app.app_context():
        web.forget_connection()  # this thread's: SQLite checks an ALTER TABLE against the schema it last read
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE report_revisions DROP COLUMN fixed_output")
        conn.execute("PRAGMA user_version = 14")
    migrated = web.create_app({"DATABASE": str(db), "TESTING": True}).test_client()
    history = migrated.get("/reports/old/history", headers=JSON).get_json()["revisions"]
    # The latest revision's marks are its report's rows'; the older one's upload was gone before version 15.
    assert [revision["counts"].get(web.FIXED_OUTPUT, 0) for revision in history] == [0, 1]
    with sqlite3.connect(db) as conn:
        packed = conn.execute("SELECT fixed_output FROM report_revisions ORDER BY report_id, number").fetchall()
    assert packed[0] == packed[2] == (None,)
    assert web.unpacked_ids(packed[1][0]) == [[item["path"] for item in nix_28_path_info()].index(SRC)]


def test_a_report_from_nix_is_given_back_as_uploaded_and_not_as_cyclonedx(client, tokens):
    tree = f"{TOP}\n└───{DEP}\n"
    put(client, tokens("owner"), "orig", tree, "text/x-nix-tree")
    assert client.get("/reports/orig", headers={"Accept": "application/vnd.cyclonedx+json"}).status_code == 406
    original = client.get("/reports/orig", headers={"Accept": "text/x-nix-tree"})
    assert original.status_code == 200 and original.mimetype == "text/x-nix-tree"
    assert original.get_data(as_text=True) == tree


# ---------------------------------------------------------------- bad input: a 4xx naming what is wrong, nothing stored

BAD_UPLOADS = [
    ("text/x-nix-tree", f"{TOP}\n├──{DEP}\n", "tree line 2"),
    ("text/x-nix-tree", f"{TOP}\n│   │   └───{DEP}\n", "tree line 2: indented deeper"),
    ("text/x-nix-tree", f"{TOP}\n└───/nix/store/not-a-store-path\n", "tree line 2"),
    ("application/json", [{"references": []}], "path-info [0].path: missing"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [DEP]}], "not list"),
    ("application/x-nix-path-info+json", {TOP: None}, "not a valid path"),
    ("application/x-nix-path-info+json", [{"path": DEP, "references": [], "ca": SRC_CA}], "path-info [0].ca"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": ["glibc"]}], "path-info [0].references[0]"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [TOP, 7]}], "path-info [0].references[1]"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [[TOP]]}], "path-info [0].references[0]"),
    ("application/x-nix-path-info+json", {TOP: {"references": ["not-a-basename"]}}, ".references[0]: expected a store path"),
    # Two store paths in one string: the paths are checked together, joined by newlines.
    ("application/x-nix-path-info+json", [{"path": TOP, "references": []}, {"path": f"{DEP}\n{SRC}", "references": []}],
     "path-info [1].path"),
    # References that are not a list are named before what is wrong further on, with the tree worker or without.
    ("application/x-nix-path-info+json", [{"path": TOP, "references": "abc"}, {"path": DEP, "references": [], "ca": SRC_CA}],
     "path-info [0].references"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [], "deriver": TOP_DRV},
                                          {"path": DEP, "references": [], "deriver": "dep.drv"}], "path-info [1].deriver"),
    # Of the usual shape, read by the typed reader first: a path that climbs out of the store is still named.
    ("application/x-nix-path-info+json", [{"path": TOP, "references": []},
                                          {"path": "/nix/store/../../etc/passwd", "references": []}], "path-info [1].path"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": []}, {"path": DEP, "references": []},
                                          {"path": TOP, "references": []}], f"path-info [2]: {TOP} is listed twice"),
    ("text/x-nix-paths", f"{TOP}\nhello\n", "line 2"),
    ("text/x-nix-paths", f"{DEP}\n{TOP}\n{DEP}\n", f"line 1: {DEP} is listed twice"),
    ("text/x-nix-paths", f"{TOP_DRV}\n", "lists only .drv"),
    ("text/x-nix-paths", "\n \n", "lists no store path"),
    ("application/x-nix-path-info+json", [], "lists no store path"),
    # Split at newlines alone: a control character that str.splitlines splits at does not make two lines of one.
    ("text/x-nix-paths", f"{TOP}\x0b{DEP}\n", "line 1:"),
    ("text/x-nix-paths", f"{TOP}\n\x0c\x0cjunk\n", "line 2:"),
    ("text/x-nix-tree", f"{TOP}\n\u2514\u2500\u2500\u2500{DEP}\x85{SRC}\n", "tree line 2"),
    # Shapes Nix never prints: a repeat of a path not shown above, and paths listed under a repeat.
    ("text/x-nix-tree", f"{TOP}\n\u2514\u2500\u2500\u2500{DEP} [...]\n", f"tree line 2: {DEP} is marked [...]"),
    ("text/x-nix-tree", f"{TOP}\n\u251c\u2500\u2500\u2500{DEP}\n\u2514\u2500\u2500\u2500{DEP} [...]\n    \u2514\u2500\u2500\u2500{SRC}\n",
     "tree line 4: " + SRC + " is listed under a line marked [...]"),
    # Nix 2.8 prints a path that is not in the store so, without references; with them it is read by the typed reader.
    ("application/x-nix-path-info+json", [{"path": TOP, "valid": False}], "path-info [0]: " + TOP + " is not a valid path"),
    ("application/x-nix-path-info+json", [{"path": TOP, "valid": False, "references": []}], "is not a valid path"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [], "deriver": DEP}],
     "path-info [0].deriver: expected the .drv"),
    ("application/x-nix-path-info+json", [{"path": TOP, "references": [], "ca": 5}],
     "path-info [0].ca: expected a content address"),
    *[("application/x-nix-path-info+json", [{"path": TOP_DRV, "references": [], "ca": ca}], "path-info [0].ca")
      for ca in ("bogus", "", "text:garbage", "text:sha256:" + "e" * 52, {"method": "bogus", "hash": "x"},
                 {"method": "text", "hash": "garbage"})],
    ("text/csv", "a,b\n", "Content-Type"),
]


@pytest.mark.parametrize("content_type, body, named", BAD_UPLOADS)
def test_bad_upload_is_refused_naming_what_is_wrong_and_nothing_is_stored(app, client, tokens, content_type, body, named):
    """Nothing at all: the upload's bytes are stored while it is parsed, and removed when it is refused."""
    token = tokens("owner")
    before = database_dump(app.config["DATABASE"])
    response = put(client, token, "bad", body, content_type)
    assert response.status_code == 400
    assert named in response.get_json()["error"]
    assert client.get("/reports/bad", headers=JSON).status_code == 404
    assert database_dump(app.config["DATABASE"]) == before


def test_a_server_with_its_tree_worker_refuses_bad_json_as_the_request_thread_alone_does(start_server):
    """The served server reads path-info's references in its tree worker, and the rest without them: what the
    worker refuses leaves nothing either, not even the rows reports share (reported paths, components)."""
    server = start_server()
    token = server.create_user("owner")
    before = database_dump(server.db)
    for content_type, body, named in [upload for upload in BAD_UPLOADS if not isinstance(upload[1], str)]:
        response = requests.put(f"{server.url}/reports/bad", data=json.dumps(body), timeout=10,
                                headers={**bearer(token), "Content-Type": content_type})
        assert response.status_code == 400 and named in response.json()["error"], (body, response.text)
        assert requests.get(f"{server.url}/reports/bad", headers=JSON, timeout=10).status_code == 404
        assert database_dump(server.db) == before, body


def test_path_info_read_by_the_typed_reader_gives_the_items_read_one_by_one():
    typed = web.usual_path_info_items(json.dumps(nix_28_path_info()))
    assert any(item.ca for item in typed)
    assert typed == list(web.path_info_one_by_one(nix_28_path_info()))
    without_references = web.usual_path_info_items(json.dumps(nix_28_path_info()), edges=False)
    assert without_references == [item._replace(references=None) for item in typed]


def test_a_content_address_that_makes_no_fixed_output_path_is_not_fixed_output():
    """A .drv's text:… (in any derivation closure), and a content-addressed derivation's output, which has references:
    neither is refused, and neither counted apart."""
    drv_text = "text:sha256:15ddavfvd42r1w8qfvnl1n5c6s3pr1z9ahfyfgji5w7bvkvzn852"
    assert web.path_info_ca(drv_text, TOP_DRV, "here", []) is None
    assert web.path_info_ca({"method": "text", "hash": "sha256-" + "A" * 43 + "="}, TOP_DRV, "here", []) is None
    assert web.path_info_ca(SRC_CA, SRC, "here", web.msgspec.Raw(b"[ ]")) == SRC_CA
    with pytest.raises(web.BadInput, match="here.ca"):
        web.path_info_ca(SRC_CA, DEP, "here", [])
    # With references, it must be the content address of a content-addressed derivation's output with them.
    with pytest.raises(web.BadInput, match="here.ca: expected fixed:r:sha256"):
        web.path_info_ca(SRC_CA, SRC, "here", [DEP])
    with pytest.raises(web.BadInput, match="here.ca: .* with its references: the store path differs"):
        web.path_info_ca(SRC_CA.replace("fixed:", "fixed:r:"), SRC, "here", web.msgspec.Raw(f'["{DEP}"]'.encode()))


def test_text_formats_refuse_a_body_of_more_lines_than_the_limits_allow_before_reading_them():
    with pytest.raises(web.ReportTooLarge, match="more than 10 lines"):
        web.report_contents("text/x-nix-paths", b"\n" * 11 + TOP.encode(), None, 5, 5)
    assert web.report_contents("text/x-nix-paths", b"\n" * 9 + TOP.encode(), None, 5, 5)[1].root == TOP


def test_path_list_links_an_output_to_the_drv_of_its_name_only_when_one_is_listed():
    """Of several .drv files of one name only two are kept, which is enough to know that there is not exactly one."""
    drvs = [f"/nix/store/{n:032d}-a.drv".replace("0", "a", 1) for n in range(3)]
    b_drv, a_out, b_out = ("/nix/store/" + "b" * 32 + "-b.drv", "/nix/store/" + "c" * 32 + "-a",
                           "/nix/store/" + "d" * 32 + "-b-dev")
    items = web.nix_paths_items("\n".join([*drvs, b_drv, a_out, b_out]), 100)
    derivers = {item.path: item.deriver for item in items}
    assert derivers[a_out] is None and derivers[b_out] == b_drv
    assert {item.path: item.deriver for item in web.nix_paths_items(f"{drvs[0]}\n{a_out}\n", 100)}[a_out] == drvs[0]


@pytest.mark.parametrize("fixture", ["path-info-keyed.json", "path-info-v2.json"])
def test_path_info_the_typed_reader_does_not_take_is_left_to_the_generic_reader(fixture):
    with pytest.raises(web.NotUsualShape):
        web.usual_path_info_items((DATA / fixture).read_text())


def test_root_outside_the_closure_is_refused(client, tokens):
    response = put(client, tokens("owner"), "bad", nix_28_path_info(), "application/json", f"?root={TOP_DRV}")
    assert response.status_code == 400 and "root" in response.get_json()["error"]


def test_oversized_closure_is_refused(start_server):
    server = start_server("--max-report-paths", "2")
    token = server.create_user("owner")
    response = requests.put(f"{server.url}/reports/big", data=json.dumps(nix_28_path_info()),
                            headers={**bearer(token), "Content-Type": "application/json"}, timeout=10)
    assert response.status_code == 413 and "--max-report-paths" in response.json()["error"]
    assert response.json()["detail"] == response.json()["error"]  # as lila's clients read it
    assert requests.get(f"{server.url}/reports/big", headers=JSON, timeout=10).status_code == 404


# ---------------------------------------------------------------- fixed-output paths

def test_an_attestation_with_ca_makes_a_path_fixed_output_in_every_view(client, tokens):
    put(client, tokens("owner"), "tree", f"{TOP}\n├───{DEP}\n└───{SRC}\n", "text/x-nix-tree")
    attest(client, tokens("alice"), SRC, ca=SRC_CA)
    report = summary(client, "tree")
    assert report["paths"][SRC] == web.FIXED_OUTPUT
    assert report["counts"][web.FIXED_OUTPUT] == 1 and report["counts"][web.NO_BUILDS] == 2
    assert report["headline"] == {"reproduced": 0, "total": 2, "percent": 0.0, "fixed_output": 1}
    suggested = [entry["out_path"] for entry in client.get("/reports/tree/suggest?limit=10").get_json()]
    assert SRC not in suggested and len(suggested) == 2
    assert SRC not in [entry["out_path"] for entry in client.get("/reports/tree/pending").get_json()["paths"]]
    html = client.get("/reports/tree", headers={"Accept": "text/html"}).get_data(as_text=True)
    assert "0 of 2 paths reproduced (0.00%)" in html and "Fixed-output, checked by hash (1)" in html


def test_an_attestation_whose_ca_does_not_make_its_path_is_refused(client, tokens):
    response = client.post("/attestations", json=[{**samples.attestation(DEP), "ca": SRC_CA}],
                           headers=bearer(tokens("mallory")))
    assert response.status_code == 400 and "[0].ca" in response.get_json()["error"]


def test_headline_counts_match_the_verdicts(client, tokens):
    put(client, tokens("owner"), "pi", nix_28_path_info(), "application/json")
    attest(client, tokens("alice"), DEP)
    attest(client, tokens("bob"), DEP)
    report = summary(client, "pi")
    assert report["paths"] == {TOP: web.NO_BUILDS, DEP: web.REPRODUCED, SRC: web.FIXED_OUTPUT}
    assert report["headline"] == {"reproduced": 1, "total": 2, "percent": 50.0, "fixed_output": 1}


# ---------------------------------------------------------------- the badge

def test_badge_is_valid_svg_with_the_percentage_and_a_conditional_etag(client, tokens):
    put(client, tokens("owner"), "pi", nix_28_path_info(), "application/json")
    attest(client, tokens("alice"), DEP)
    attest(client, tokens("bob"), DEP)
    badge = client.get("/reports/pi/badge.svg")
    assert badge.mimetype == "image/svg+xml"
    svg = ElementTree.fromstring(badge.get_data())
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert "50.00%" in [text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")]
    assert client.get("/reports/pi/badge.svg", headers={"If-None-Match": badge.headers["ETag"]}).status_code == 304
    attest(client, tokens("alice"), TOP)  # one build: the headline, and so the badge, stays the same
    assert client.get("/reports/pi/badge.svg", headers={"If-None-Match": badge.headers["ETag"]}).status_code == 304
    attest(client, tokens("bob"), TOP)
    assert client.get("/reports/pi/badge.svg", headers={"If-None-Match": badge.headers["ETag"]}).status_code == 200


def test_badge_of_an_unknown_report_is_404(client):
    assert client.get("/reports/nothing/badge.svg").status_code == 404


# ---------------------------------------------------------------- real Nix

FIXED_SRC = ('derivation { name = "src.txt"; system = builtins.currentSystem; builder = "/bin/sh";'
             ' args = [ "-c" "echo hello > $out" ]; outputHashMode = "flat"; outputHashAlgo = "sha256";'
             ' outputHash = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"; }')


@pytest.fixture(scope="module")
def built_closure(tmp_path_factory, nix):
    """A top-level output with a runtime dependency and a fixed-output source, built by real Nix."""
    directory = tmp_path_factory.mktemp("closure")
    dep = write_derivation(directory, "nixreports-dep", "echo dep > $out")
    top = write_derivation(directory, "nixreports-top", "echo $dep $src > $out",
                           extra=f"dep = import {dep}; src = {FIXED_SRC};")
    env = nix()
    drv = subprocess.run(["nix-instantiate", str(top)], env=env, capture_output=True, text=True, check=True).stdout.strip()
    out = subprocess.run(["nix-build", "--no-out-link", str(top)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    run = lambda *args: subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return {"drv": drv, "out": out, "env": env, "run": run}


def test_real_nix_closures_make_three_reports(client, tokens, built_closure):
    run, out, drv = built_closure["run"], built_closure["out"], built_closure["drv"]
    path_info = run("nix", "--extra-experimental-features", "nix-command", "path-info", "--json", "-r", out)
    closure = {info["path"] for info in json.loads(path_info)}
    assert SRC in closure and len(closure) == 3
    listed = run("nix-store", "-qR", "--include-outputs", drv)
    for name, body, content_type in [("pi", path_info, "application/json"),
                                     ("tree", run("nix-store", "-q", "--tree", out), "text/x-nix-tree"),
                                     ("build", listed, "text/x-nix-paths")]:
        response = put(client, tokens("owner"), name, body, content_type)
        assert response.status_code == 200, response.get_json()
    assert set(summary(client, "pi")["paths"]) == closure == set(summary(client, "tree")["paths"])
    assert summary(client, "pi")["paths"][SRC] == web.FIXED_OUTPUT  # path-info's ca
    build = summary(client, "build")
    assert closure <= set(build["paths"]) and build["root"] == listed.split()[-1]
    assert {"out_path": out, "drv_path": drv, "output": "out"} in client.get("/reports/build/suggest?limit=50").get_json()
    assert [line for line in text_tree(client, "tree").splitlines() if line.startswith(f"  {SRC}")]


def test_the_hook_attests_ca_of_a_fixed_output_path_and_the_build_report_counts_it_apart(client, tokens, built_closure):
    out_paths = [SRC, built_closure["out"]]
    infos = hook.path_infos(out_paths, built_closure["env"])
    attestations = [hook.attestation(info, None, "build") for info in infos]
    assert attestations[0]["ca"] == SRC_CA and "ca" not in attestations[1]
    listed = built_closure["run"]("nix-store", "-qR", "--include-outputs", built_closure["drv"])
    put(client, tokens("owner"), "build", listed, "text/x-nix-paths")
    assert summary(client, "build")["paths"][SRC] == web.NO_BUILDS
    response = client.post(f"/attestation/{hook.drv_ident_of(built_closure['drv'])}", json=attestations,
                           headers=bearer(tokens("alice")))
    assert response.status_code == 200, response.get_json()
    assert summary(client, "build")["paths"][SRC] == web.FIXED_OUTPUT


def test_real_nix_derivation_closure_path_info_is_a_report(client, tokens, built_closure, tmp_path):
    """`nix path-info --json -r --derivation` lists .drv files, whose ca is text:…, and the sources they use, whose
    ca is fixed:r:…: the .drv files are read as the components they are, and a source is fixed-output."""
    (tmp_path / "build.sh").write_text("echo built > $out\n")
    top = write_derivation(tmp_path, "nixreports-sourced", "sh $src", extra="src = ./build.sh;")
    drv = built_closure["run"]("nix-instantiate", str(top)).strip()
    listed = json.loads(built_closure["run"]("nix", "--extra-experimental-features", "nix-command", "path-info", "--json",
                                              "-r", "--derivation", drv))
    assert {info["ca"].split(":")[0] for info in listed if info["path"].endswith(".drv")} == {"text"}
    [source] = [info["path"] for info in listed if not info["path"].endswith(".drv")]
    response = put(client, tokens("owner"), "derivations", listed, "application/x-nix-path-info+json", f"?root={drv}")
    assert response.status_code == 200, response.get_json()
    assert summary(client, "derivations")["paths"] == {source: web.FIXED_OUTPUT}


def content_addressed_output(tmp_path):
    """(out path, `nix path-info --json -r` of it) of a content-addressed derivation's output that refers to
    itself and to a dependency, built by real Nix with the experimental feature on in its own configuration."""
    env = nix_env(NIX_CONFIG="experimental-features = nix-command ca-derivations")
    dep = write_derivation(tmp_path, "nixreports-ca-dep", "echo dep > $out")
    top = write_derivation(tmp_path, "nixreports-ca-top", "echo $dep $out > $out", extra=f"dep = import {dep};"
                           ' __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";')
    out = subprocess.run(["nix-build", "--no-out-link", str(top)], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    return out, json.loads(subprocess.run(["nix", "path-info", "--json", "-r", out], env=env, capture_output=True,
                                          text=True, check=True).stdout)


def test_real_nix_content_addressed_output_is_attested_with_its_ca_and_not_counted_fixed_output(client, tokens,
                                                                                                 tmp_path, nix):
    """Reviewed: an attestation's ca was checked without its references, so a content-addressed derivation's
    output was refused with its whole batch."""
    out, listed = content_addressed_output(tmp_path)
    [item] = [item for item in listed if item["path"] == out]
    attestation = {"output_path": out, "output_hash": item["narHash"], "output_sig": "", "nar_size": item["narSize"],
                   "references": item["references"], "ca": item["ca"]}
    response = client.post("/attestations", json=[attestation], headers=bearer(tokens("alice")))
    assert response.status_code == 200, response.get_json()
    response = put(client, tokens("owner"), "ca-attested", listed, "application/x-nix-path-info+json", f"?root={out}")
    assert response.status_code == 200, response.get_json()
    assert summary(client, "ca-attested")["paths"][out] == web.ONE_BUILD
    wrong = {**attestation, "ca": item["ca"][:-1] + ("0" if item["ca"][-1] != "0" else "1")}
    response = client.post("/attestations", json=[wrong], headers=bearer(tokens("alice")))
    assert response.status_code == 400 and "with its references: the store path differs" in response.get_json()["error"]


def test_real_nix_content_addressed_derivation_output_is_checked_and_not_fixed_output(client, tokens, tmp_path, nix):
    """A content-addressed derivation's output (experimental in Nix 2.8) has ca fixed:r:sha256 and references: its
    store path is made from both, and whether it reproduces is what a report is for."""
    out, listed = content_addressed_output(tmp_path)
    [item] = [item for item in listed if item["path"] == out]
    assert item["ca"].startswith("fixed:r:sha256:") and out in item["references"] and len(item["references"]) == 2
    response = put(client, tokens("owner"), "ca", listed, "application/x-nix-path-info+json", f"?root={out}")
    assert response.status_code == 200, response.get_json()
    assert set(summary(client, "ca")["paths"].values()) == {web.NO_BUILDS}
    item["ca"] = item["ca"][:-1] + ("0" if item["ca"][-1] != "0" else "1")
    response = put(client, tokens("owner"), "ca", listed, "application/x-nix-path-info+json", f"?root={out}")
    assert response.status_code == 400 and "with its references: the store path differs" in response.get_json()["error"]


def test_the_cache_importer_takes_a_content_addressed_output_with_references_as_not_fixed_output(tmp_path, nix):
    """The narinfo a binary cache serves for a real content-addressed derivation's output (its fields from Nix's
    path-info of it, its Sig made with a key the importer trusts): imported, without a fixed-output mark."""
    from nacl.signing import SigningKey
    out, listed = content_addressed_output(tmp_path)
    [item] = [item for item in listed if item["path"] == out]
    seed = SigningKey.generate()
    secret = "cache-1:" + base64.b64encode(bytes(seed) + bytes(seed.verify_key)).decode()
    nar_hash = hook.normalize_nar_hash(item["narHash"])
    message = hook.fingerprint(out, nar_hash, item["narSize"], item["references"])
    narinfo = {"StorePath": out, "NarHash": item["narHash"], "NarSize": str(item["narSize"]), "CA": item["ca"],
               "References": " ".join(hook.basename_of(path) for path in item["references"]),
               "Deriver": hook.basename_of(item["deriver"]),
               "Sig": [hook.sign_fingerprint(secret, message)]}
    public = "cache-1:" + base64.b64encode(bytes(seed.verify_key)).decode()
    cache = hook.Cache("http://127.0.0.1:9", {"cache-1": public}, 5)
    outcome, attestation = hook.narinfo_attestation(cache, {"out_path": out}, narinfo)
    assert outcome == hook.CACHE_VERIFIED, attestation
    assert "ca" not in attestation and attestation["references"] == sorted(item["references"])
