"""The report page in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)."""
import pytest
import requests
from playwright.sync_api import sync_playwright

import sbom_samples as samples
from support import ServerProcess, bearer
from web import REPRODUCED, VERDICTS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
CLOSURE = {
    "browser-root": ["browser-lib", "browser-tool"],
    "browser-lib": ["browser-leaf"],
    "browser-tool": ["browser-leaf"],
    "browser-leaf": [],
}


@pytest.fixture(scope="module")
def report_url(tmp_path_factory):
    """One server and report for the module's tests, which only read the page: each has a page of its own."""
    server = ServerProcess(tmp_path_factory.mktemp("browser") / "hashes.db").start()
    try:
        closure = samples.nix_build_sbom(CLOSURE, names={"browser-tool": "<b>tool</b> \"quoted\""})
        owner = server.create_user("owner")
        assert requests.put(f"{server.url}/reports/browser", json=closure.sbom, headers=bearer(owner),
                            timeout=10).status_code == 200
        for builder in ("alice", "bob"):
            token = server.create_user(builder)
            response = requests.post(f"{server.url}/attestations", json=[samples.attestation(closure.out("browser-lib"))],
                                     headers=bearer(token), timeout=10)
            assert response.status_code == 200
        yield f"{server.url}/reports/browser"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def browser_page(browser):
    """A page in a context of its own (cookies, storage, viewport), collecting the console's errors."""
    context = browser.new_context()
    try:
        page = context.new_page()
        page.console_errors = []
        page.on("console", lambda message: message.type == "error" and page.console_errors.append(
            f"{message.text} at {message.location.get('url')}"))
        page.on("pageerror", lambda error: page.console_errors.append(str(error)))
        yield page
    finally:
        context.close()


def test_counts_are_visible(browser_page, report_url):
    browser_page.goto(report_url)
    counts = browser_page.locator("#counts")
    assert counts.is_visible()
    reproduced = browser_page.locator(f'#counts tr[data-verdict="{REPRODUCED}"]')
    assert reproduced.is_visible()
    assert "1" in reproduced.inner_text()


def test_share_bar_is_visible(browser_page, report_url):
    browser_page.goto(report_url)
    assert browser_page.locator("svg.bar").is_visible()


def test_tree_node_expands_on_click(browser_page, report_url):
    browser_page.goto(report_url)
    node = browser_page.locator("#tree details").first
    child = node.locator(":scope > ul > li").first
    was_open = node.evaluate("element => element.open")
    if was_open:  # a page may open the top node; close it first so the click is an expansion
        node.locator(":scope > summary").click()
    assert not child.is_visible()
    node.locator(":scope > summary").click()
    assert node.evaluate("element => element.open")
    assert child.is_visible()


def test_hostile_name_is_shown_as_text(browser_page, report_url):
    browser_page.goto(report_url)
    assert browser_page.locator("#tree b").count() == 0
    assert browser_page.get_by_text('<b>tool</b> "quoted"').first.count() == 1


def test_console_shows_no_errors(browser_page, report_url):
    browser_page.goto(report_url)
    browser_page.wait_for_load_state("networkidle")
    browser_page.locator("#tree details summary").first.click()
    assert browser_page.console_errors == []


def test_screenshot_is_saved(browser_page, report_url, tmp_path):
    browser_page.goto(report_url)
    browser_page.locator("#tree details summary").first.click()
    screenshot = tmp_path / "report.png"
    browser_page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 1000
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_page_fits_a_phone_screen(browser_page, report_url):
    browser_page.set_viewport_size({"width": 375, "height": 740})
    browser_page.goto(report_url)
    overflow = browser_page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0


def test_verdicts_are_readable_badges_without_an_emoji_font(browser_page, report_url):
    """This machine has no emoji font: every verdict must be a coloured ASCII badge with the label as its name."""
    browser_page.goto(report_url)
    browser_page.evaluate("document.querySelectorAll('details').forEach(details => details.open = true)")
    text = browser_page.locator("body").inner_text()
    assert not any(ord(character) > 0x2600 for character in text), "an emoji or pictograph is on the page"
    badges = browser_page.locator("#tree .badge")
    assert badges.count() == len(CLOSURE)
    for index in range(badges.count()):
        badge = badges.nth(index)
        assert badge.get_attribute("role") == "img"
        assert badge.get_attribute("aria-label") in VERDICTS
        assert badge.inner_text().isascii() and badge.inner_text().strip()
        assert badge.bounding_box()["width"] > 4
        background = badge.evaluate("element => getComputedStyle(element).backgroundColor")
        assert background not in ("rgba(0, 0, 0, 0)", "transparent")
    reproduced = browser_page.get_by_role("img", name=REPRODUCED)
    assert reproduced.count() >= 2  # in the counts table and on browser-lib's tree node


HOSTILE_REPORT_NAME = "-_.x--._"  # every kind of character a report name may hold, a leading '-' too


def test_badge_renders_as_svg_for_a_hostile_report_name(browser_page, server):
    owner = server.create_user("owner")
    closure = samples.nix_build_sbom(CLOSURE)
    assert requests.put(f"{server.url}/reports/{HOSTILE_REPORT_NAME}", json=closure.sbom, headers=bearer(owner),
                        timeout=10).status_code == 200
    response = browser_page.goto(f"{server.url}/reports/{HOSTILE_REPORT_NAME}/badge.svg")
    assert response.status == 200 and response.headers["content-type"].startswith("image/svg+xml")
    assert browser_page.evaluate("document.documentElement.namespaceURI") == "http://www.w3.org/2000/svg"
    assert browser_page.locator("text").all_text_contents() == ["reproduced", "0.00%"]
    assert HOSTILE_REPORT_NAME in browser_page.evaluate("document.querySelector('title').textContent")
    assert [error for error in browser_page.console_errors if "favicon.ico" not in error] == []
