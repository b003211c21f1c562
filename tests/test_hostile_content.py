"""Hostile content stays inert: names, SBOM fields, builder names, keys and links
are shown as text in every HTML view, no injected script runs in a real browser,
and no pattern or dependency graph can hang or crash a request."""
import base64
import concurrent.futures
import functools
import json
import re
import sqlite3

import pytest
import requests

import sbom_samples
from attestation_samples import base32_form, basename_of, create_user_in_process, drv_ident, first_generation, nar_hash_bytes
from support import bearer
from post_build_hook import name_of

HTML = {"Accept": "text/html"}
FORMATS = ["text/html", "text/plain", "application/json", "application/vnd.cyclonedx+json"]
REQUEST_TIMEOUT = 120  # a hang detector, not a performance bound

# Each payload, if it ever ran, would set window.__pwned or open a dialog.
PAYLOADS = [
    "<script>window.__pwned='script'</script>",
    "<img src=x onerror=\"window.__pwned='img'\">",
    "\"><svg onload=alert('svg')>",
    "'><iframe srcdoc='<script>parent.__pwned=1</script>'>",
    "</summary></details></li></ul><script>alert('breakout')</script>",
    "javascript:alert('href')",
    "{{ 7*7 }}<!--",
]
RAW_MARKERS = ["<script>", "<img src=x", "<svg onload", "<iframe", "</ul><script"]
# Valid Nix store-path names may contain ? = + (but never < > " '), and '?' must not end a URL path.
ODD_BUT_VALID_NAME = "q?x=1+2"
HOSTILE_EDGES = {"hostile-root": ["left", ODD_BUT_VALID_NAME], "left": [], ODD_BUT_VALID_NAME: []}
HOSTILE_NAMES = {"hostile-root": PAYLOADS[0], "left": PAYLOADS[1], ODD_BUT_VALID_NAME: PAYLOADS[2]}
HOSTILE_BUILDER = "<img src=x onerror=alert('builder')>"
HOSTILE_KEY_NAME = "k\"><script>alert('key')</script>"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]


def hostile_closure():
    closure = sbom_samples.nix_build_sbom(HOSTILE_EDGES, names=HOSTILE_NAMES)
    sbom = closure.sbom
    # Payloads in every other field a producer might fill in.
    for component in [sbom["metadata"]["component"], *sbom["components"]]:
        component["version"] = PAYLOADS[3]
        component["description"] = PAYLOADS[4]
        component["purl"] = PAYLOADS[5]
        component["properties"].append({"name": "nix:output", "value": PAYLOADS[6]})
    return closure


def hostile_root_sbom():
    """A root component without any store path, so its bom-ref becomes the report's shown root."""
    sbom = sbom_samples.nix_build_sbom({"leaf": []}).sbom
    leaf = sbom["metadata"]["component"]
    sbom["metadata"]["component"] = {"type": "application", "bom-ref": PAYLOADS[3], "name": PAYLOADS[4]}
    sbom["components"] = [leaf]
    sbom["dependencies"] = [{"ref": PAYLOADS[3], "dependsOn": [leaf["bom-ref"]]}]
    return sbom


def public_key(name):
    return f"{name}:{base64.b64encode(b'k' * 32).decode()}"


def populate(url_or_client, db, create_user):
    """Everything hostile, stored through the public interfaces; returns (token, closure, odd path).

    The hostile builder name is written into the database: create_user refuses it now, but
    builders named before the name rule keep their names.
    """
    token = create_user(db, "alice")
    hostile_token = create_user(db, "hostile", "--public-key", public_key("hostile-builder-1"))
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE builders SET name = ? WHERE name = 'hostile'", (HOSTILE_BUILDER,))
    closure = hostile_closure()
    odd_path = closure.out(ODD_BUT_VALID_NAME)
    send = HttpSender(url_or_client) if isinstance(url_or_client, str) else url_or_client
    for name, sbom in [("hostile", closure.sbom), ("hostile-root", hostile_root_sbom())]:
        assert send.put(f"/reports/{name}", json=sbom, headers=bearer(token)).status_code == 200
    attestation = first_generation(odd_path, base32_form(nar_hash_bytes()))
    assert send.post(f"/attestation/{drv_ident()}", json=[attestation], headers=bearer(hostile_token)).status_code == 200
    link = "https://example.org/issues?q=%3Cscript%3E&x=1"
    assert send.post("/link_patterns", query_string={"pattern": "q", "link": link},
                     headers=bearer(token)).status_code == 200
    return token, closure, odd_path


class HttpSender:
    """The test client's put/post signature, over real HTTP."""

    def __init__(self, url):
        self.url = url

    def put(self, path, **kwargs):
        return requests.put(self.url + path, timeout=REQUEST_TIMEOUT, **kwargs)

    def post(self, path, query_string=None, **kwargs):
        return requests.post(self.url + path, params=query_string, timeout=REQUEST_TIMEOUT, **kwargs)


def views(odd_path):
    return ["/", "/reports", "/reports/hostile", "/reports/hostile-root", f"/outputs/{basename_of(odd_path).replace('?', '%3F')}",
            "/builders"]


@pytest.fixture
def hostile_app(app, client):
    token, closure, odd_path = populate(client, app.config["DATABASE"], create_user_in_process)
    return client, token, closure, odd_path


# ---------------------------------------------------------------- refused at the door

@pytest.mark.parametrize("name", ["<script>alert(1)<", "a\"b", "a'b", "..", "../etc", ".hidden", "a b", "javascript:x",
                                  "a<b>", "x" * 129])
def test_hostile_report_name_is_rejected(client, name):
    token = create_user_in_process(client.application.config["DATABASE"], "alice")
    sbom = sbom_samples.nix_build_sbom(sbom_samples.DIAMOND).sbom
    response = client.put(f"/reports/{requests.utils.quote(name, safe='')}", json=sbom, headers=bearer(token))
    assert response.status_code in (400, 404)
    assert isinstance(response.get_json()["error"], str)


@pytest.mark.parametrize("link", [
    "javascript:alert(1)", "JavaScript:alert(1)", " javascript:alert(1)", "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)", "https://example.org/\"onmouseover=\"alert(1)", "https://example.org/'onmouseover='alert(1)",
    "https://example.org/<script>", "//evil.example/x", "https://exa mple.org/",
])
def test_link_that_could_run_script_or_break_out_of_its_attribute_is_rejected(client, link):
    token = create_user_in_process(client.application.config["DATABASE"], "alice")
    response = client.post("/link_patterns", query_string={"pattern": "hello", "link": link}, headers=bearer(token))
    assert response.status_code == 400
    assert "link" in response.get_json()["error"]


@pytest.mark.parametrize("pattern", ["(a)\\1", "(?=a)a", "(?!a)b", "(?>(?:[A-Za-z0-9+._?=-]+)+!)", "(?:a+)++!",
                                     "a*+b", "(?P<x>a)(?P=x)"])
def test_link_pattern_that_needs_backtracking_is_rejected(client, pattern):
    token = create_user_in_process(client.application.config["DATABASE"], "alice")
    response = client.post("/link_patterns", query_string={"pattern": pattern, "link": "https://example.org/"},
                           headers=bearer(token))
    assert response.status_code == 400
    assert "pattern" in response.get_json()["error"]


# ---------------------------------------------------------------- inert in every view

@pytest.mark.parametrize("view", range(6), ids=["home", "reports", "report", "report-hostile-root", "output", "builders"])
def test_hostile_content_is_escaped_in_every_html_view(hostile_app, view):
    client, _token, _closure, odd_path = hostile_app
    response = client.get(views(odd_path)[view], headers=HTML)
    assert response.status_code == 200
    page = response.get_data(as_text=True)
    assert [marker for marker in RAW_MARKERS if marker in page] == []


@pytest.mark.parametrize("view, shown", [(2, "&lt;script&gt;window.__pwned"), (3, "&lt;iframe"), (1, "&lt;iframe"),
                                         (4, "&lt;img src=x onerror"), (5, "&lt;img src=x onerror")],
                         ids=["report-component-name", "report-root", "reports-root", "output-builder", "builders-name"])
def test_hostile_content_is_shown_as_text(hostile_app, view, shown):
    client, _token, _closure, odd_path = hostile_app
    page = client.get(views(odd_path)[view], headers=HTML).get_data(as_text=True)
    assert shown in page


def test_key_name_with_markup_is_refused_at_the_door(tmp_path):
    # Key names are [A-Za-z0-9._+-]: none can carry markup into /builders or a line into a narinfo.
    import create_user
    with pytest.raises(SystemExit):
        create_user.main([HOSTILE_BUILDER, "--public-key", public_key(HOSTILE_KEY_NAME), "--db", str(tmp_path / "h.db")])


def test_report_link_to_a_path_with_a_question_mark_leads_to_that_paths_page(hostile_app):
    client, _token, _closure, odd_path = hostile_app
    page = client.get("/reports/hostile", headers=HTML).get_data(as_text=True)
    hrefs = {href for href in re.findall(r'href="(/outputs/[^"]*)"', page) if "x=1+2" in href}
    assert hrefs == {"/outputs/" + basename_of(odd_path).replace("?", "%3F")}
    output_page = client.get(hrefs.pop(), headers=HTML).get_data(as_text=True)
    assert f"<h1>{name_of(odd_path)}</h1>" in output_page and f"<code>{odd_path}</code>" in output_page


def test_text_tree_of_a_hostile_report_is_served_as_plain_text(hostile_app):
    client = hostile_app[0]
    response = client.get("/reports/hostile", headers={"Accept": "text/plain"})
    assert response.mimetype == "text/plain"


def test_uploaded_sbom_is_served_back_as_cyclonedx_not_html(hostile_app):
    client = hostile_app[0]
    response = client.get("/reports/hostile", headers={"Accept": "application/vnd.cyclonedx+json"})
    assert response.mimetype == "application/vnd.cyclonedx+json"


def test_matched_link_is_rendered_as_an_attribute_that_stays_quoted(hostile_app):
    client = hostile_app[0]
    page = client.get("/reports/hostile", headers=HTML).get_data(as_text=True)
    assert 'href="https://example.org/issues?q=%3Cscript%3E&amp;x=1"' in page


# ---------------------------------------------------------------- in a real browser

def browse(url, paths):
    """Load each page in headless Chromium, open every <details>, and return what injected code did."""
    from playwright.sync_api import sync_playwright
    dialogs, pwned = [], {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        try:
            page = browser.new_page()
            # Only the server under test is reachable: anything else an injection asks for is refused.
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
            for path in paths:
                page.goto(url + path, wait_until="load")
                page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
                page.wait_for_load_state("networkidle")
                pwned[path] = page.evaluate("window.__pwned === undefined ? null : String(window.__pwned)")
        finally:
            browser.close()
    return dialogs, {path: value for path, value in pwned.items() if value is not None}


def test_the_browser_check_notices_a_payload_that_runs(server):
    """The detector itself works: a page that does run the payload is caught."""
    token = server.create_user("alice")
    assert requests.put(f"{server.url}/reports/plain", json=sbom_samples.nix_build_sbom({"a": []}).sbom,
                        headers=bearer(token), timeout=REQUEST_TIMEOUT).status_code == 200
    dialogs, pwned = browse(server.url, ["/reports/plain"])
    assert (dialogs, pwned) == ([], {})
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
        page = browser.new_page()
        page.set_content(f"<p>{PAYLOADS[0]}</p>")
        assert page.evaluate("window.__pwned") == "script"
        browser.close()


def test_no_injected_script_runs_in_headless_chromium(server):
    _token, _closure, odd_path = populate(server.url, server.db, lambda db, *args: server.create_user(*args))
    dialogs, pwned = browse(server.url, views(odd_path))
    assert dialogs == []
    assert pwned == {}


# ---------------------------------------------------------------- patterns and graphs that cannot hang

# Backtracking shapes: each is either refused or matched in linear time; none may stop the server.
SLOW_FOR_BACKTRACKING = ["(?>(?:[A-Za-z0-9+._?=-]+)+!)", "(?:[a-z0-9-]+)++!", "(a+)+$", "(a|aa)*b", "(a*)*b",
                         "(x+x+)+y", "(.*a){12}", "(a|a?)+b", "(?:a+){2,}b", "a*" * 10 + "b", "^(([a-z])+.)+[A-Z]([a-z])+$"]


def test_no_link_pattern_stops_the_server_while_a_report_page_renders(server):
    token = server.create_user("alice")
    for pattern in SLOW_FOR_BACKTRACKING:
        response = requests.post(f"{server.url}/link_patterns", headers=bearer(token), timeout=REQUEST_TIMEOUT,
                                 params={"pattern": pattern, "link": "https://example.org/"})
        assert response.status_code in (200, 400), response.text
    names = {"a" * 60: [], "x" * 60: [], "aaaa-bbbb-cccc-dddd-eeee-ffff-gggg-hhhh-iiii-jjjj-kkkk": []}
    closure = sbom_samples.nix_build_sbom(names)
    assert requests.put(f"{server.url}/reports/slow", json=closure.sbom, headers=bearer(token),
                        timeout=REQUEST_TIMEOUT).status_code == 200
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        page = pool.submit(requests.get, f"{server.url}/reports/slow", headers=HTML, timeout=REQUEST_TIMEOUT)
        assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200  # a hang detector
        assert page.result().status_code == 200


def test_polynomial_link_pattern_cannot_hang_a_report_page(server):
    """a*a*…a*b has no nested repeat, yet backtracks in O(n^11) on a long run of a's."""
    token = server.create_user("alice")
    response = requests.post(f"{server.url}/link_patterns", headers=bearer(token), timeout=REQUEST_TIMEOUT,
                             params={"pattern": "a*" * 10 + "b", "link": "https://example.org/"})
    if response.status_code == 400:
        return
    closure = sbom_samples.nix_build_sbom({"a" * 60: []})
    assert requests.put(f"{server.url}/reports/slow", json=closure.sbom, headers=bearer(token),
                        timeout=REQUEST_TIMEOUT).status_code == 200
    page = requests.get(f"{server.url}/reports/slow", headers=HTML, timeout=30)
    assert page.status_code == 200


CHAIN_LENGTH = 10_000


@functools.lru_cache(maxsize=None)
def chain_sbom(cyclic=False):
    """root -> n1 -> n2 -> ... -> n9999 (-> root when cyclic), as JSON text."""
    names = [f"chain-{number}" for number in range(CHAIN_LENGTH)]
    edges = {name: [child] for name, child in zip(names, names[1:])}
    edges[names[-1]] = [names[0]] if cyclic else []
    return json.dumps(sbom_samples.nix_build_sbom(edges).sbom)


def put_raw(server, name, sbom_text):
    token = server.create_user("alice")
    return requests.put(f"{server.url}/reports/{name}", data=sbom_text, timeout=REQUEST_TIMEOUT,
                        headers={**bearer(token), "Content-Type": "application/json"})


@pytest.mark.parametrize("cyclic", [False, True], ids=["chain", "cycle"])
def test_ten_thousand_deep_dependency_graph_can_be_defined(server, cyclic):
    response = put_raw(server, "deep", chain_sbom(cyclic))
    assert response.status_code == 200


@pytest.mark.parametrize("accept", FORMATS)
@pytest.mark.parametrize("cyclic", [False, True], ids=["chain", "cycle"])
def test_ten_thousand_deep_dependency_graph_renders_in_every_format(server, cyclic, accept):
    assert put_raw(server, "deep", chain_sbom(cyclic)).status_code == 200
    response = requests.get(f"{server.url}/reports/deep", headers={"Accept": accept}, timeout=REQUEST_TIMEOUT)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith(accept)


def peak_memory_kib(pid):
    status = open(f"/proc/{pid}/status").read()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))


def test_html_of_a_ten_thousand_deep_chain_does_not_take_a_gigabyte(server):
    """The page's nesting markup must not be built as one string per depth (quadratic memory)."""
    sbom = chain_sbom()
    assert put_raw(server, "deep", sbom).status_code == 200
    before = peak_memory_kib(server.pid())
    assert requests.get(f"{server.url}/reports/deep", headers=HTML, timeout=REQUEST_TIMEOUT).status_code == 200
    grown_mib = (peak_memory_kib(server.pid()) - before) / 1024
    assert grown_mib < 256, f"server peak memory grew by {grown_mib:.0f} MiB for a {len(sbom) >> 20} MiB SBOM"


CYCLE_EDGES = {"cyc-root": ["cyc-a"], "cyc-a": ["cyc-b"], "cyc-b": ["cyc-c", "cyc-b"], "cyc-c": ["cyc-a", "cyc-root"]}


@pytest.fixture
def cyclic_report(client):
    token = create_user_in_process(client.application.config["DATABASE"], "alice")
    closure = sbom_samples.nix_build_sbom(CYCLE_EDGES)
    assert client.put("/reports/cycle", json=closure.sbom, headers=bearer(token)).status_code == 200
    return closure


def test_cycle_is_expanded_once_in_the_text_tree(client, cyclic_report):
    text = client.get("/reports/cycle", headers={"Accept": "text/plain"}).get_data(as_text=True)
    expanded = [line.split()[0] for line in text.splitlines() if "(shown above)" not in line]
    assert sorted(expanded) == sorted(cyclic_report.all_paths)


def test_cycle_back_edges_are_listed_as_shown_above_in_the_text_tree(client, cyclic_report):
    text = client.get("/reports/cycle", headers={"Accept": "text/plain"}).get_data(as_text=True)
    back_edges = sorted(line.split()[0] for line in text.splitlines() if "(shown above)" in line)
    out = cyclic_report.out
    assert back_edges == sorted([out("cyc-a"), out("cyc-root")])


def test_cycle_is_expanded_once_in_the_html_tree(client, cyclic_report):
    page = client.get("/reports/cycle", headers=HTML).get_data(as_text=True)
    tree = page[page.index('id="tree"'):]
    expanded_part = re.sub(r'<li class="shown-above">.*?</li>', "", tree, flags=re.S)
    counts = {path: expanded_part.count(f'href="/outputs/{basename_of(path)}"') for path in cyclic_report.all_paths}
    assert counts == {path: 1 for path in cyclic_report.all_paths}


def test_cycle_paths_are_listed_once_in_the_json_summary(client, cyclic_report):
    summary = client.get("/reports/cycle", headers={"Accept": "application/json"}).get_json()
    assert sorted(summary["paths"]) == sorted(cyclic_report.all_paths)


def test_self_dependency_is_not_shown_as_its_own_child(client, cyclic_report):
    text = client.get("/reports/cycle", headers={"Accept": "text/plain"}).get_data(as_text=True)
    b_lines = [line for line in text.splitlines() if cyclic_report.out("cyc-b") in line]
    assert len(b_lines) == 1


# ---------------------------------------------------------------- diffs are builder-supplied, so hostile too

def hostile_diff_url(server):
    """A diff whose file names, link target, tool version and diffoscope text are all payloads; returns its URL."""
    from attestation_samples import out_path
    token = server.create_user("alice")
    path = out_path(ODD_BUT_VALID_NAME)
    hash_a, hash_b = sorted(base32_form(nar_hash_bytes()) for _ in range(2))
    attestation = first_generation(path, hash_a)
    assert requests.post(f"{server.url}/attestation/{drv_ident()}", json=[attestation], headers=bearer(token),
                         timeout=REQUEST_TIMEOUT).status_code == 200
    side = {"type": "symlink", "target": PAYLOADS[4]}
    differing = [{"path": payload, "a": side, "b": None} for payload in PAYLOADS]
    diffoscope = "\n".join(PAYLOADS * 20)  # long enough to be folded into <details>
    body = {"files": {"differing": differing, "totals": {"differing": len(PAYLOADS)}, "cut": [PAYLOADS[1]]},
            "diffoscope": diffoscope, "diffoscope_note": PAYLOADS[2], "tool_versions": {"diffoscope": PAYLOADS[3]}}
    url = f"/diffs/{basename_of(path).replace('?', '%3F')}/{hash_a}/{hash_b}"
    assert requests.put(server.url + url, json=body, headers=bearer(token), timeout=REQUEST_TIMEOUT).status_code == 200
    return url, basename_of(path).replace("?", "%3F")


def test_hostile_diff_is_escaped_and_no_injected_script_runs_in_headless_chromium(server):
    url, basename = hostile_diff_url(server)
    pages = [url, f"/diffs/{basename}", f"/outputs/{basename}"]
    for page in pages:
        html = requests.get(server.url + page, headers=HTML, timeout=REQUEST_TIMEOUT).text
        assert [marker for marker in RAW_MARKERS if marker in html] == []
    diff_page = requests.get(server.url + url, headers=HTML, timeout=REQUEST_TIMEOUT).text
    assert "&lt;script&gt;window.__pwned" in diff_page and "<details>" in diff_page
    dialogs, pwned = browse(server.url, pages)
    assert dialogs == []
    assert pwned == {}
