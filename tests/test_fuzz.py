"""Property-based fuzzing of every endpoint that takes input.

For any input at all, the server keeps three promises:
  - it never answers 5xx;
  - every 4xx carries a JSON object with an "error" string;
  - after a 4xx the database content is unchanged (compared by a full dump).

Each test runs HASH_COLLECTION_FUZZ_EXAMPLES examples (default 50, so CI stays fast);
set it higher for a long run. Requests go in-process through the Flask test client
to one app per module over a small temporary database, so an example costs milliseconds.
"""
import contextlib
import copy
import json
import os
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sbom_samples
import web
from attestation_samples import (base32_form, batch_item, create_user_in_process, drv_ident, first_generation,
                                 lila_generation, nar_hash_bytes, out_path, store_digest)
from support import bearer, database_dump

EXAMPLES = int(os.environ.get("HASH_COLLECTION_FUZZ_EXAMPLES", "50"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example, HealthCheck.function_scoped_fixture])

# Hypothesis warns when it prints a large failing example; big SBOMs are the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

DEEP = 100_000  # nesting depth of the deepest JSON we send: far past Python's recursion limit

# ---------------------------------------------------------------- generated values

# Every code point, lone surrogates included: JSON can carry them as \ud800 escapes.
ANY_CHARACTER = st.characters(min_codepoint=0, max_codepoint=0x10FFFF, blacklist_categories=())
ANY_TEXT = st.text(ANY_CHARACTER, max_size=40)
HOSTILE_TEXT = st.sampled_from([
    "", " ", "..", "../../etc/passwd", "/nix/store/..", "/nix/store/../etc/passwd",
    f"/nix/store/{'0' * 32}-..", f"/nix/store/{'0' * 32}-a/../b", "\x00", "a\x00b", f"/nix/store/{'0' * 32}-a\x00",
    "\ud800", "\udfff", "\u202e\u0000", "\U0010ffff", "<script>window.__pwned=1</script>", "javascript:alert(1)",
    "\"'><img src=x onerror=alert(1)>", "sha256:" + "0" * 52 + "\n", "sha256-" + "A" * 43 + "=", "%00", "%2e%2e%2f",
    "a" * 100_000, "é" * 10_000, "\n" * 1000, "NaN", "-1", "1e999",
])
HUGE_INTEGERS = st.sampled_from([2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -2**63 - 1, 10**100, -(10**300)])
SCALARS = (st.none() | st.booleans() | st.integers() | HUGE_INTEGERS | st.floats(allow_nan=True, allow_infinity=True)
           | ANY_TEXT | HOSTILE_TEXT)
JSON_VALUES = st.recursive(SCALARS, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(ANY_TEXT | HOSTILE_TEXT, children, max_size=5), max_leaves=20)
# Bodies no json.dumps would write: deep nesting, numbers past Python's digit limit, bad UTF-8, duplicate keys.
RAW_BODIES = st.sampled_from([
    b"[" * DEEP + b"]" * DEEP,
    b"[" * DEEP,
    b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    b"[" + b"{}," * 10_000 + b"{}]",
    b'[{"output_path": "x", "nar_size": ' + b"9" * 5000 + b"}]",
    b'[{"nar_size": 1e99999}]',
    b"[NaN, Infinity, -Infinity]",
    b"\xff\xfe[]", b"\xef\xbb\xbf[]", b"[\"\xc3\x28\"]", b"\x00", b"[\x00]", b"null", b"0", b'"\\ud800"',
    b'{"bomFormat": "CycloneDX", "bomFormat": 1}',
]) | st.binary(max_size=200)


def fields_replaced(document, replacements):
    """A deep copy of `document` with the value at each key path replaced.

    A path that an earlier replacement already removed is skipped.
    """
    document = copy.deepcopy(document)
    for key_path, value in replacements:
        if not key_path:
            return value
        with contextlib.suppress(KeyError, IndexError, TypeError):
            value_at(document, key_path[:-1])[key_path[-1]] = value
    return document


def key_paths(document, prefix=()):
    """Every key path inside a JSON document, the empty path (the whole document) first."""
    yield prefix
    items = document.items() if isinstance(document, dict) else enumerate(document) if isinstance(document, list) else ()
    for key, value in items:
        yield from key_paths(value, prefix + (key,))


def value_at(document, key_path):
    for key in key_path:
        document = document[key]
    return document


def mutations_of(document, values=JSON_VALUES):
    """A valid document with a few of its values swapped for random or hostile ones, or with a key added."""
    paths = [path for path in key_paths(document) if path]
    objects = [path for path in key_paths(document) if isinstance(value_at(document, path), dict)]
    swapped = st.lists(st.tuples(st.sampled_from(paths), values), min_size=1, max_size=4)
    added = st.tuples(st.sampled_from(objects), ANY_TEXT | HOSTILE_TEXT, values)
    return (swapped.map(lambda pairs: fields_replaced(document, pairs))
            | added.map(lambda extra: fields_replaced(document, [(extra[0] + (extra[1],), extra[2])])))


def url_part(text):
    """Percent-encode anything, lone surrogates included, for use as one URL path segment or query value."""
    return quote(text, safe="", errors="surrogatepass")


# ---------------------------------------------------------------- the world the requests land in

SBOM = sbom_samples.nix_build_sbom(sbom_samples.DIAMOND).sbom
ATTESTATION = first_generation(out_path(), base32_form(nar_hash_bytes()), nar_size=512, references=[out_path()])
LILA_ATTESTATION = lila_generation(out_path(), base32_form(nar_hash_bytes()), nar_size=512, references=[])
BATCH_ITEM = batch_item(out_path(), base32_form(nar_hash_bytes()), f"/nix/store/{drv_ident()}.drv",
                        nar_size=512, references=[])


class World:
    """An app over a database holding one of everything: builders, a report, attestations, a link pattern."""

    def __init__(self, directory):
        self.db = str(directory / "fuzz.db")
        self.app = web.create_app({"DATABASE": self.db})
        self.client = self.app.test_client()
        self.token = create_user_in_process(self.db, "alice")
        create_user_in_process(self.db, "bob")
        self.headers = bearer(self.token)
        self.attested = out_path("fuzzed-1.0")
        self.expect_ok(self.client.put("/reports/diamond", json=SBOM, headers=self.headers))
        self.expect_ok(self.client.post(f"/attestation/{drv_ident()}", headers=self.headers, json=[
            first_generation(self.attested, base32_form(nar_hash_bytes()), nar_size=4096, references=[self.attested])]))
        self.expect_ok(self.client.post("/link_patterns?pattern=^fuzzed-&link=https://example.org/fuzzed",
                                        headers=self.headers))

    @staticmethod
    def expect_ok(response):
        assert response.status_code == 200, response.get_data(as_text=True)

    def dump(self):
        # A replaced report's rows are removed after its upload has answered: that is not the next request's doing.
        self.app.extensions["report_removals"].wait()
        return database_dump(self.db)

    def request(self, method, url, **kwargs):
        """Send one request and check the three promises; returns the response."""
        before = self.dump()
        response = self.client.open(url, method=method, **kwargs)
        status = response.status_code
        assert status < 500, f"{method} {url[:200]} -> {status}: {response.get_data(as_text=True)[:300]}"
        if 400 <= status < 500:
            body = response.get_json(silent=True)
            assert isinstance(body, dict) and isinstance(body.get("error"), str), \
                f"{method} {url[:200]} -> {status} without a JSON error: {response.get_data()[:200]!r}"
            assert self.dump() == before, f"{method} {url[:200]} -> {status} but the database changed"
        return response

    def post_json(self, url, body, headers=None):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", url, data=data,
                            headers={**self.headers, "Content-Type": "application/json", **(headers or {})})

    def put_json(self, url, body):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("PUT", url, data=data, headers={**self.headers, "Content-Type": "application/json"})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return World(tmp_path_factory.mktemp("fuzz"))


# ---------------------------------------------------------------- POST /attestation/<drv_ident>

@FUZZ
@given(body=JSON_VALUES)
def test_single_attestation_with_any_json_body_keeps_the_promises(world, body):
    world.post_json(f"/attestation/{drv_ident()}", body)


@FUZZ
@given(body=RAW_BODIES)
def test_single_attestation_with_raw_bytes_body_keeps_the_promises(world, body):
    world.post_json(f"/attestation/{drv_ident()}", body)


@FUZZ
@given(body=st.lists(mutations_of(ATTESTATION) | mutations_of(LILA_ATTESTATION), min_size=1, max_size=3))
def test_single_attestation_with_mutated_fields_keeps_the_promises(world, body):
    world.post_json(f"/attestation/{drv_ident()}", body)


@FUZZ
@given(ident=ANY_TEXT | HOSTILE_TEXT | st.builds(lambda name: f"{store_digest()}-{name}", ANY_TEXT))
def test_single_attestation_with_odd_drv_ident_in_the_url_keeps_the_promises(world, ident):
    world.post_json(f"/attestation/{url_part(ident)}", [dict(ATTESTATION, output_path=out_path())])


@FUZZ
@given(authorization=st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=60)
       | st.sampled_from(["Bearer", "Bearer ", "bearer \t", "Basic dXNlcjpwYXNz", "Bearer " + "x" * 10_000]))
def test_single_attestation_with_odd_authorization_header_keeps_the_promises(world, authorization):
    response = world.post_json(f"/attestation/{drv_ident()}", [dict(ATTESTATION, output_path=out_path())],
                               headers={"Authorization": authorization})
    assert response.status_code == 401


# ---------------------------------------------------------------- POST /attestations

@FUZZ
@given(body=JSON_VALUES)
def test_batch_with_any_json_body_keeps_the_promises(world, body):
    world.post_json("/attestations", body)


@FUZZ
@given(body=RAW_BODIES)
def test_batch_with_raw_bytes_body_keeps_the_promises(world, body):
    world.post_json("/attestations", body)


@FUZZ
@given(body=st.lists(mutations_of(BATCH_ITEM), min_size=1, max_size=3))
def test_batch_with_mutated_fields_keeps_the_promises(world, body):
    world.post_json("/attestations", body)


# ---------------------------------------------------------------- PUT /reports/<name>

@FUZZ
@given(body=JSON_VALUES)
def test_put_report_with_any_json_body_keeps_the_promises(world, body):
    world.put_json("/reports/fuzzed", body)


@FUZZ
@given(body=RAW_BODIES)
def test_put_report_with_raw_bytes_body_keeps_the_promises(world, body):
    world.put_json("/reports/fuzzed", body)


@FUZZ
@example(body=fields_replaced(SBOM, [(("components", 0, "properties"), 5)]))
@example(body=fields_replaced(SBOM, [(("dependencies", 0, "ref"), [])]))
@example(body=fields_replaced(SBOM, [(("components", 0, "name"), "\ud800")]))
@given(body=mutations_of(SBOM))
def test_put_report_with_mutated_sbom_keeps_the_promises(world, body):
    world.put_json("/reports/fuzzed", body)


def sbom_reading(read):
    """What a reader makes of an SBOM: its contents, or the message of the error it names."""
    try:
        return read()
    except web.BadInput as error:
        return f"{type(error).__name__}: {error}"


def typed_and_generic_readings(sbom, limit=100):
    body = json.dumps(sbom).encode()
    generic = sbom_reading(lambda: web.parse_sbom(json.loads(body), limit, limit))
    try:
        return sbom_reading(lambda: web.usual_sbom_contents(body, limit, limit)), generic
    except web.NotUsualShape:
        return None, generic


PRODUCERS_SBOMS = [sbom_samples.nix_build_sbom(sbom_samples.DIAMOND),
                   sbom_samples.nix_build_sbom(sbom_samples.CYCLE, property_name="nix:output_path"),
                   sbom_samples.sbomnix_sbom(sbom_samples.DIAMOND, {"shared": ["out", "dev"]}),
                   sbom_samples.bombon_sbom(sbom_samples.DIAMOND), sbom_samples.odd_sbom()]
PRODUCERS = ["nix-build-sbom", "output_path", "sbomnix", "bombon", "odd"]


@pytest.mark.parametrize("closure", PRODUCERS_SBOMS, ids=PRODUCERS)
def test_the_typed_reader_takes_every_producers_sbom_and_reads_what_the_generic_reader_does(closure):
    typed, generic = typed_and_generic_readings(closure.sbom)
    assert isinstance(generic, web.SbomContents)
    assert typed == generic


@FUZZ
@example(body=fields_replaced(SBOM, [(("components", 0, "properties"), 5)]))
@example(body=fields_replaced(SBOM, [(("components", 0, "bom-ref"), None)]))
@example(body=fields_replaced(SBOM, [(("dependencies", 0, "dependsOn"), None)]))
@given(body=mutations_of(SBOM))
def test_the_typed_reader_reads_any_sbom_it_takes_as_the_generic_reader_does(body):
    """The typed reader decides speed only: what it takes, it reads as the generic reader does, errors included."""
    typed, generic = typed_and_generic_readings(body, limit=4)
    assert typed is None or typed == generic


def whole_and_split_readings(sbom, limit=6, root=None):
    """What report_contents makes of an upload read whole, and read in two parts as an upload with the tree worker
    is: the request thread without edges, then the worker's tree (its error only if the request thread had none)."""
    upload = ("application/json", json.dumps(sbom).encode(), root, limit, limit)

    def whole():
        contents = web.report_contents(*upload)[1]
        return contents._replace(children=None), contents.tree_json()

    def split():
        contents = web.report_contents(*upload, edges=False)[1]
        return contents, web.upload_tree_json(*upload)
    return sbom_reading(whole), sbom_reading(split)


# What Nix 2.8's `nix path-info --json -r` prints: a list (tests/data has it keyed by path, as newer Nix prints it).
PATH_INFO = [{"path": path, **info} for path, info in
             json.loads((Path(__file__).parent / "data" / "path-info-keyed.json").read_text()).items()]


@pytest.mark.parametrize(("upload", "root"), [(closure.sbom, None) for closure in PRODUCERS_SBOMS]
                         + [({**SBOM, "components": SBOM["components"] + SBOM["components"][:1]}, None),
                            (PATH_INFO, None), (PATH_INFO, PATH_INFO[-1]["path"]),
                            ([{**item, "path": item["path"].rsplit("/", 1)[1]} for item in PATH_INFO], None),
                            (json.loads((Path(__file__).parent / "data" / "path-info-keyed.json").read_text()), None)],
                         ids=PRODUCERS + ["a bom-ref twice", "path-info", "path-info ?root=", "path-info basenames",
                                              "path-info keyed"])
def test_every_producers_upload_read_in_two_parts_reads_as_it_does_whole(upload, root):
    whole, split = whole_and_split_readings(upload, limit=100, root=root)
    assert isinstance(whole, tuple)
    assert split == whole


@FUZZ
@example(body=fields_replaced(SBOM, [(("dependencies", 0, "dependsOn"), ["x"] * 9)]))
@example(body=fields_replaced(SBOM, [(("components", 0, "bom-ref"), None)]))
@example(body=fields_replaced(SBOM, [(("components", 0, "properties"), 5)]))
@example(body=fields_replaced(SBOM, [(("metadata", "component", "bom-ref"), 7)]))
@given(body=mutations_of(SBOM))
def test_an_sbom_read_in_two_parts_reads_as_it_does_whole(body):
    """The tree worker reads an SBOM's edges apart from the request thread: together they read what one reader
    does, and refuse what it refuses with its message."""
    whole, split = whole_and_split_readings(body)
    assert split == whole


@FUZZ
@example(body=fields_replaced(PATH_INFO, [((0, "references", 0), "/nix/store/" + "a" * 32 + "-elsewhere")]))
@example(body=fields_replaced(PATH_INFO, [((1, "references"), [7])]))
@example(body=fields_replaced(PATH_INFO, [((0, "path"), PATH_INFO[1]["path"])]))
@given(body=mutations_of(PATH_INFO))
def test_path_info_read_in_two_parts_reads_as_it_does_whole(body):
    whole, split = whole_and_split_readings(body)
    assert split == whole


@FUZZ
@given(name=ANY_TEXT | HOSTILE_TEXT)
def test_put_report_with_odd_name_keeps_the_promises(world, name):
    world.put_json(f"/reports/{url_part(name)}", SBOM)


@FUZZ
@given(name=ANY_TEXT | HOSTILE_TEXT)
def test_delete_report_with_odd_name_keeps_the_promises(world, name):
    world.request("DELETE", f"/reports/{url_part(name)}", headers=world.headers)


# ---------------------------------------------------------------- POST /link_patterns

@FUZZ
@example(pattern="(a+)+$", link="https://example.org")
@example(pattern="(a|aa)*b", link="https://example.org")
@example(pattern="a{1000000000}", link="https://example.org")
@example(pattern="(" * 150 + ")" * 50, link="https://example.org")
@example(pattern="x", link="javascript:alert(1)")
@given(pattern=ANY_TEXT | HOSTILE_TEXT | st.sampled_from(["(?P<a>x)(?P=a)", "(?=x)", "\\", "[", "(?i)x", "x" * 201]),
       link=ANY_TEXT | HOSTILE_TEXT | st.builds(lambda text: "https://example.org/" + text, ANY_TEXT))
def test_link_pattern_with_odd_query_parameters_keeps_the_promises(world, pattern, link):
    query = urlencode({"pattern": pattern, "link": link}, errors="surrogatepass")
    world.request("POST", f"/link_patterns?{query}", headers=world.headers)


# ---------------------------------------------------------------- GET /signatures/<builder>/<hash>.narinfo

@FUZZ
@given(builder=st.sampled_from(["alice", "bob"]) | ANY_TEXT | HOSTILE_TEXT,
       digest=st.just(None) | ANY_TEXT | HOSTILE_TEXT | st.text("0123456789abcdfghijklmnpqrsvwxyz", min_size=32, max_size=32))
def test_narinfo_with_odd_builder_and_hash_keeps_the_promises(world, builder, digest):
    digest = world.attested[11:43] if digest is None else digest
    world.request("GET", f"/signatures/{url_part(builder)}/{url_part(digest)}.narinfo")


# ---------------------------------------------------------------- suggestions and pending

LIMITS = ANY_TEXT | HOSTILE_TEXT | st.integers().map(str) | HUGE_INTEGERS.map(str) | st.sampled_from(
    ["0", "-0", "+5", " 5", "5 ", "0x10", "1_000", "²", "٣", "9" * 5000, "1e3", ""])


@FUZZ
@given(limit=LIMITS, report=st.just("diamond") | ANY_TEXT, use_token=st.booleans())
def test_suggest_with_odd_limit_keeps_the_promises(world, limit, report, use_token):
    world.request("GET", f"/reports/{url_part(report)}/suggest?{urlencode({'limit': limit}, errors='surrogatepass')}",
                  headers=world.headers if use_token else {})


@FUZZ
@given(limit=LIMITS, report=st.just("diamond") | ANY_TEXT)
def test_suggested_with_odd_limit_keeps_the_promises(world, limit, report):
    world.request("GET", f"/reports/{url_part(report)}/suggested?{urlencode({'limit': limit}, errors='surrogatepass')}")


@FUZZ
@given(after=ANY_TEXT | HOSTILE_TEXT | st.just(SBOM["metadata"]["component"]["bom-ref"]),
       limit=st.none() | LIMITS, use_token=st.booleans())
def test_pending_with_odd_cursor_and_limit_keeps_the_promises(world, after, limit, use_token):
    query = {"after": after} if limit is None else {"after": after, "limit": limit}
    world.request("GET", f"/reports/diamond/pending?{urlencode(query, errors='surrogatepass')}",
                  headers=world.headers if use_token else {})


# ---------------------------------------------------------------- read-only pages with odd path parameters

@FUZZ
@given(page=st.sampled_from(["/outputs/{}", "/reports/{}", "/attestations/by-output/{}", "/derivations/{}",
                             "/derivations/{}?full=true", "/signatures/{}/nix-cache-info", "/{}"]),
       part=ANY_TEXT | HOSTILE_TEXT, accept=st.sampled_from(["text/html", "application/json", "text/plain", "*/*",
                                                             "application/vnd.cyclonedx+json", "x/\x7f;q=abc"]))
def test_pages_with_odd_path_parameters_keep_the_promises(world, page, part, accept):
    world.request("GET", page.format(url_part(part)), headers={"Accept": accept})
