"""GET /reports/<name> as HTML, text, JSON and CycloneDX; the report index; /outputs; link patterns."""
import json
import re

import pytest

import sbom_samples as samples
import web
from support import bearer

HTML = {"Accept": "text/html"}
JSON = {"Accept": "application/json"}
TEXT = {"Accept": "text/plain"}
CYCLONEDX = {"Accept": "application/vnd.cyclonedx+json"}

HOSTILE = "<script>alert(\"x\")</script>'q\""
HOSTILE_TOO = "<img src=x onerror='boom'>\"end"

# root -> app-lib (reproduced), flaky (nondeterministic), fresh (no builds)
#      -> flaky -> shared;  fresh -> shared (so "shared" is shown once, then referenced)
CLOSURE = {
    "view-root": ["app-lib", "flaky", "fresh"],
    "app-lib": [],
    "flaky": ["shared"],
    "fresh": ["shared"],
    "shared": [],
}


@pytest.fixture
def sbom_closure():
    return samples.nix_build_sbom(CLOSURE, names={"flaky": HOSTILE, "fresh": HOSTILE_TOO})


@pytest.fixture
def report(client, tokens, sbom_closure):
    """Report "views" with app-lib reproduced, flaky nondeterministic, the rest unbuilt."""
    put = client.put("/reports/views", json=sbom_closure.sbom, headers=bearer(tokens("owner")))
    assert put.status_code == 200, put.get_json()
    attest(client, tokens("alice"), sbom_closure.out("app-lib"), "good")
    attest(client, tokens("bob"), sbom_closure.out("app-lib"), "good")
    attest(client, tokens("alice"), sbom_closure.out("flaky"), "one")
    attest(client, tokens("bob"), sbom_closure.out("flaky"), "two")
    return sbom_closure


def attest(client, token, path, result):
    response = client.post("/attestations", json=[samples.attestation(path, result)], headers=bearer(token))
    assert response.status_code == 200, response.get_json()


def page(client, name="views"):
    response = client.get(f"/reports/{name}", headers=HTML)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    return response.get_data(as_text=True)


def section(html, element_id):
    """The markup of the element with this id, up to its first closing tag of the same kind."""
    match = re.search(rf'<(\w+)[^>]*\bid="{element_id}"', html)
    assert match, f"no element with id {element_id!r}"
    end = html.index(f"</{match.group(1)}>", match.end())
    return html[match.start():end]


def href_of(path):
    return "/outputs/" + path[len("/nix/store/"):]


# ---------------------------------------------------------------- HTML page

def test_html_page_shows_report_name(client, report):
    assert "views" in re.search(r"<h1>(.*?)</h1>", page(client), re.S).group(1)


def test_html_page_shows_root(client, report):
    assert report.root in page(client)


def test_html_page_shows_count_of_each_verdict(client, report):
    counts = section(page(client), "counts")
    expected = {web.REPRODUCED: 1, web.NONDETERMINISTIC: 1, web.NO_BUILDS: 3, web.PARTIALLY: 0, web.ONE_BUILD: 0}
    for label, count in expected.items():
        row = re.search(rf'<tr data-verdict="{label}">(.*?)</tr>', counts, re.S)
        assert row, f"no counts row for {label}"
        assert re.search(rf"<td>{count}</td>", row.group(1)), row.group(1)


def test_html_page_shows_percentages(client, report):
    counts = section(page(client), "counts")
    assert "20.0%" in counts  # 1 of 5 reproduced
    assert "60.0%" in counts  # 3 of 5 unbuilt


def test_html_page_has_inline_svg_bar(client, report):
    html = page(client)
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert svg.count("<rect") == 3  # reproduced, nondeterministic, no builds
    assert "<script" not in html.lower().replace("&lt;script", "")


def test_html_page_lists_not_reproducible_paths(client, report):
    listed = section(page(client), "not-reproducible")
    assert href_of(report.out("flaky")) in listed
    assert href_of(report.out("app-lib")) not in listed


def test_html_page_lists_unchecked_paths(client, report):
    listed = section(page(client), "unchecked")
    for name in ("view-root", "fresh", "shared"):
        assert href_of(report.out(name)) in listed
    assert href_of(report.out("flaky")) not in listed


def test_html_tree_uses_collapsible_details(client, report):
    tree = page(client).split('id="tree"', 1)[1]
    assert "<details" in tree and "<summary>" in tree


def test_html_tree_shows_component_names(client, report):
    tree = page(client).split('id="tree"', 1)[1]
    assert ">app-lib</a>" in tree
    assert ">shared</a>" in tree


def test_html_tree_shows_repeated_subtree_once(client, report):
    tree = page(client).split('id="tree"', 1)[1]
    assert tree.count("shown above") == 1


def test_html_links_every_path_to_its_output_page(client, report):
    html = page(client)
    for path in report.all_paths:
        assert f'href="{href_of(path)}"' in html


def test_html_shows_link_pattern_links_for_matching_paths(client, tokens, report):
    posted = client.post("/link_patterns", query_string={"pattern": "^flaky$", "link": "https://example.org/issue/1"},
                         headers=bearer(tokens("owner")))
    assert posted.status_code == 200, posted.get_json()
    listed = section(page(client), "not-reproducible")
    assert 'href="https://example.org/issue/1"' in listed


def test_html_escapes_script_names(client, report):
    html = page(client)
    assert "<script>" not in html
    assert "&lt;script&gt;alert(" in html


def test_html_escapes_quotes_in_names(client, report):
    html = page(client)
    assert "<img" not in html
    assert "onerror=&#39;boom&#39;" in html or "onerror=&#x27;boom&#x27;" in html


def test_html_escapes_hostile_name_in_not_reproducible_list(client, report):
    listed = section(page(client), "not-reproducible")
    assert "&lt;script&gt;" in listed and "<script>" not in listed


def test_html_escapes_hostile_name_in_unchecked_list(client, report):
    listed = section(page(client), "unchecked")
    assert "&lt;img" in listed and "<img" not in listed


# ---------------------------------------------------------------- text tree

def test_text_is_the_default_view(client, report):
    response = client.get("/reports/views")
    assert response.mimetype == "text/plain"
    assert response.get_data(as_text=True).startswith(report.root + " ")


def test_text_tree_prints_each_path_with_its_verdict(client, report):
    text = client.get("/reports/views", headers=TEXT).get_data(as_text=True)
    assert f"  {report.out('app-lib')} {web.REPRODUCED}\n" in text
    assert f"  {report.out('flaky')} {web.NONDETERMINISTIC}\n" in text


def test_text_tree_prints_repeated_subtree_once_then_a_reference(client, report):
    lines = client.get("/reports/views", headers=TEXT).get_data(as_text=True).splitlines()
    shared = [line for line in lines if report.out("shared") in line]
    assert shared == [f"    {report.out('shared')} {web.NO_BUILDS}", f"    {report.out('shared')} (shown above)"]


def test_text_tree_indents_at_most_so_far_and_says_the_level_deeper(client, tokens):
    """A chain: indented by its depth, each line of a chain of 20,000 paths took 40 KB."""
    depth = web.TEXT_INDENT_LEVELS + 10
    chain = {f"link-{level}": [f"link-{level + 1}"] for level in range(depth)} | {f"link-{depth}": []}
    sbom_closure = samples.nix_build_sbom(chain)
    assert client.put("/reports/chain", json=sbom_closure.sbom, headers=bearer(tokens("owner"))).status_code == 200
    lines = client.get("/reports/chain", headers=TEXT).get_data(as_text=True).splitlines()
    indent = "  " * web.TEXT_INDENT_LEVELS
    assert lines[web.TEXT_INDENT_LEVELS] == f"{indent}{sbom_closure.out(f'link-{web.TEXT_INDENT_LEVELS}')} {web.NO_BUILDS}"
    assert lines[depth] == f"{indent}(level {depth}) {sbom_closure.out(f'link-{depth}')} {web.NO_BUILDS}"
    assert max(len(line) - len(line.lstrip(" ")) for line in lines) == len(indent)


def test_text_tree_shows_cycle_once(client, tokens):
    sbom_closure = samples.nix_build_sbom(samples.CYCLE)
    client.put("/reports/cycle", json=sbom_closure.sbom, headers=bearer(tokens("owner")))
    lines = client.get("/reports/cycle", headers=TEXT).get_data(as_text=True).splitlines()
    assert [line for line in lines if "(shown above)" not in line] == [
        f"{sbom_closure.out('cyc-root')} {web.NO_BUILDS}",
        f"  {sbom_closure.out('cyc-a')} {web.NO_BUILDS}",
        f"    {sbom_closure.out('cyc-b')} {web.NO_BUILDS}",
    ]
    assert len(lines) == 4


def test_text_tree_stays_linear_on_stacked_diamonds(client, tokens):
    # 30 stacked diamonds have 2**30 root-to-leaf walks; each node must appear once, each edge at most once more.
    edges = {"top-0": []}
    for level in range(30):
        edges[f"top-{level}"] = [f"left-{level}", f"right-{level}"]
        edges[f"left-{level}"] = [f"top-{level + 1}"]
        edges[f"right-{level}"] = [f"top-{level + 1}"]
    edges["top-30"] = []
    sbom_closure = samples.nix_build_sbom(edges)
    client.put("/reports/diamonds", json=sbom_closure.sbom, headers=bearer(tokens("owner")))
    lines = client.get("/reports/diamonds", headers=TEXT).get_data(as_text=True).splitlines()
    edge_count = sum(len(children) for children in edges.values())
    assert len(lines) <= len(edges) + edge_count


def test_text_view_prints_names_verbatim(client, tokens):
    sbom_closure = samples.nix_build_sbom({"plain-root": []}, names={"plain-root": HOSTILE})
    client.put("/reports/plain", json=sbom_closure.sbom, headers=bearer(tokens("owner")))
    assert "&lt;" not in client.get("/reports/plain", headers=TEXT).get_data(as_text=True)


# ---------------------------------------------------------------- JSON and CycloneDX

def test_json_summary_has_name_root_counts_paths(client, report):
    summary = client.get("/reports/views", headers=JSON).get_json()
    assert set(summary) == {"name", "root", "counts", "headline", "paths", "diffs", "revision"}
    assert (summary["name"], summary["root"]) == ("views", report.root)


def test_json_summary_paths_carry_verdicts(client, report):
    paths = client.get("/reports/views", headers=JSON).get_json()["paths"]
    assert paths == {
        report.out("view-root"): web.NO_BUILDS,
        report.out("app-lib"): web.REPRODUCED,
        report.out("flaky"): web.NONDETERMINISTIC,
        report.out("fresh"): web.NO_BUILDS,
        report.out("shared"): web.NO_BUILDS,
    }


def test_json_summary_counts_every_label(client, report):
    counts = client.get("/reports/views", headers=JSON).get_json()["counts"]
    assert counts == {web.REPRODUCED: 1, web.PARTIALLY: 0, web.NONDETERMINISTIC: 1, web.ONE_BUILD: 0, web.NO_BUILDS: 3,
                      web.FIXED_OUTPUT: 0}


def test_cyclonedx_round_trip_is_byte_identical(client, tokens, sbom_closure):
    raw = json.dumps(sbom_closure.sbom, indent=3, ensure_ascii=False).encode() + b"\n\n"
    client.put("/reports/round", data=raw, headers={**bearer(tokens("owner")), "Content-Type": "application/json"})
    response = client.get("/reports/round", headers=CYCLONEDX)
    assert response.status_code == 200
    assert response.mimetype == "application/vnd.cyclonedx+json"
    assert response.get_data() == raw


def test_unknown_report_is_404(client):
    assert client.get("/reports/nothing-here", headers=JSON).status_code == 404


# ---------------------------------------------------------------- report index

def test_root_is_the_html_index(client, report):
    response = client.get("/", headers=HTML)
    assert response.mimetype == "text/html"
    assert 'href="/reports/views"' in response.get_data(as_text=True)


def test_reports_index_as_html_shows_share_reproduced(client, report):
    html = client.get("/reports", headers=HTML).get_data(as_text=True)
    assert 'href="/reports/views"' in html
    assert "20.00%" in html


def test_reports_without_html_accept_is_json_list_of_names(client, report):
    response = client.get("/reports")
    assert response.get_json() == ["views"]


def test_reports_with_json_accept_is_json_list_of_names(client, report):
    assert client.get("/reports", headers=JSON).get_json() == ["views"]


# ---------------------------------------------------------------- /outputs

def test_output_page_shows_each_builders_hash(client, report):
    html = client.get(href_of(report.out("flaky")), headers=HTML).get_data(as_text=True)
    assert "alice" in html and "bob" in html
    assert samples.nar_hash("one") in html and samples.nar_hash("two") in html


def test_output_page_says_which_builders_agree(client, report):
    html = client.get(href_of(report.out("app-lib")), headers=HTML).get_data(as_text=True)
    assert re.search(r"alice, bob.*agree", html)


def test_output_page_shows_when_each_reported(client, report):
    html = client.get(href_of(report.out("app-lib")), headers=HTML).get_data(as_text=True)
    assert len(re.findall(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", html)) == 2


def test_output_as_json_lists_attestations(client, report):
    attestations = client.get(href_of(report.out("app-lib")), headers=JSON).get_json()
    assert sorted(attestation["builder"] for attestation in attestations) == ["alice", "bob"]


def test_output_link_with_question_mark_name_resolves(client, tokens):
    sbom_closure = samples.odd_sbom()
    client.put("/reports/odd", json=sbom_closure.sbom, headers=bearer(tokens("owner")))
    attest(client, tokens("alice"), sbom_closure.out("what?"), "good")
    html = page(client, "odd")
    href = re.search(r'href="(/outputs/[^"]*what[^"]*)"', html).group(1)
    attestations = client.get(href, headers=JSON).get_json()
    assert [attestation["output_path"] for attestation in attestations] == [sbom_closure.out("what?")]


# ---------------------------------------------------------------- link patterns

def post_pattern(client, token, pattern, link):
    return client.post("/link_patterns", query_string={"pattern": pattern, "link": link},
                       headers=bearer(token) if token else {})


def test_link_patterns_are_listed(client, tokens):
    post_pattern(client, tokens("owner"), "^gcc-", "https://example.org/gcc")
    assert client.get("/link_patterns").get_json() == [{"pattern": "^gcc-", "link": "https://example.org/gcc",
                                                        "owner": "owner"}]


def test_link_pattern_needs_a_token(client):
    assert post_pattern(client, None, "^gcc-", "https://example.org/gcc").status_code == 401


def test_link_pattern_is_replaced_by_posting_it_again(client, tokens):
    post_pattern(client, tokens("owner"), "^gcc-", "https://example.org/old")
    post_pattern(client, tokens("owner"), "^gcc-", "https://example.org/new")
    assert client.get("/link_patterns").get_json() == [{"pattern": "^gcc-", "link": "https://example.org/new",
                                                        "owner": "owner"}]


@pytest.mark.parametrize("link", ["javascript:alert(1)", "ftp://example.org/x", "data:text/html,hi", "/relative",
                                  "https://example.org/\"onmouseover=x", ""])
def test_link_must_be_http_url(client, tokens, link):
    response = post_pattern(client, tokens("owner"), "^gcc-", link)
    assert response.status_code == 400
    assert "link" in response.get_json()["error"]


@pytest.mark.parametrize("link", ["http://example.org/a", "https://example.org/issues?q=1&r=2"])
def test_http_and_https_links_are_accepted(client, tokens, link):
    assert post_pattern(client, tokens("owner"), "^gcc-", link).status_code == 200


@pytest.mark.parametrize("pattern", [r"(a)\1", "(?=a)a", "(?<!a)b", "(?>a+)b", "a++b", "[", ""])
def test_pattern_without_a_linear_time_match_or_invalid_is_rejected(client, tokens, pattern):
    response = post_pattern(client, tokens("owner"), pattern, "https://example.org/x")
    assert response.status_code == 400
    assert "pattern" in response.get_json()["error"]
    assert client.get("/link_patterns").get_json() == []


def test_overlong_pattern_is_rejected(client, tokens):
    assert post_pattern(client, tokens("owner"), "a" * 10_000, "https://example.org/x").status_code == 400


def test_page_with_link_patterns_renders_for_adversarial_names(client, tokens):
    sbom_closure = samples.nix_build_sbom({"a" * 150 + "-x": []})
    assert client.put("/reports/adversarial", json=sbom_closure.sbom, headers=bearer(tokens("owner"))).status_code == 200
    for pattern in ("a+a+a+b", "^(a|b)*c", "a{1,100}a{1,100}z"):
        post_pattern(client, tokens("owner"), pattern, "https://example.org/x")
    assert client.get("/reports/adversarial", headers=HTML).status_code == 200
