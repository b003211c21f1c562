"""/reports/<name>/suggested, /suggest and /pending: what rebuilders should build next."""
import pytest

import sbom_samples as samples
from support import bearer

ENDPOINTS = ["suggested", "suggest"]


def flat_closure(count, prefix="pkg"):
    """A root depending directly on count - 1 libraries."""
    names = [f"{prefix}-{number}" for number in range(count)]
    return samples.nix_build_sbom({names[0]: names[1:], **{name: [] for name in names[1:]}})


def define(client, token, defined_closure, name="closure"):
    response = client.put(f"/reports/{name}", json=defined_closure.sbom, headers=bearer(token))
    assert response.status_code == 200, response.get_json()


def attest(client, token, paths, result="good"):
    response = client.post("/attestations", json=[samples.attestation(path, result) for path in paths],
                           headers=bearer(token))
    assert response.status_code == 200, response.get_json()


def suggested_paths(client, endpoint, token=None, limit=None, name="closure"):
    response = client.get(f"/reports/{name}/{endpoint}", query_string={"limit": limit} if limit else {},
                          headers=bearer(token) if token else {})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    return body if endpoint == "suggested" else [suggestion["out_path"] for suggestion in body]


@pytest.fixture
def defined_closure(client, tokens):
    defined_closure = flat_closure(10)
    define(client, tokens("owner"), defined_closure)
    return defined_closure


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_exclude_callers_own_attestations(client, tokens, defined_closure, endpoint):
    mine = [defined_closure.out("pkg-1"), defined_closure.out("pkg-2")]
    attest(client, tokens("alice"), mine)
    suggested = suggested_paths(client, endpoint, tokens("alice"))
    assert not set(mine) & set(suggested)
    assert set(suggested) == defined_closure.all_paths - set(mine)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_keep_other_builders_one_build_paths(client, tokens, defined_closure, endpoint):
    attest(client, tokens("alice"), [defined_closure.out("pkg-1")])
    assert defined_closure.out("pkg-1") in suggested_paths(client, endpoint, tokens("bob"))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_without_token_exclude_no_caller(client, tokens, defined_closure, endpoint):
    attest(client, tokens("alice"), [defined_closure.out("pkg-1")])
    assert set(suggested_paths(client, endpoint)) == defined_closure.all_paths


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_exclude_settled_paths(client, tokens, defined_closure, endpoint):
    settled = defined_closure.out("pkg-3")
    attest(client, tokens("alice"), [settled])
    attest(client, tokens("bob"), [settled])
    for token in (None, tokens("carol")):
        assert settled not in suggested_paths(client, endpoint, token)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_disagreeing_builders_also_settle_a_path(client, tokens, defined_closure, endpoint):
    path = defined_closure.out("pkg-3")
    attest(client, tokens("alice"), [path], "one")
    attest(client, tokens("bob"), [path], "two")
    assert path not in suggested_paths(client, endpoint)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_one_builder_twice_does_not_settle_a_path(client, tokens, defined_closure, endpoint):
    path = defined_closure.out("pkg-3")
    attest(client, tokens("alice"), [path], "one")
    attest(client, tokens("alice"), [path], "two")
    assert path in suggested_paths(client, endpoint, tokens("bob"))


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_one_build_paths_come_before_unbuilt_paths(client, tokens, defined_closure, endpoint):
    one_build = {defined_closure.out(f"pkg-{number}") for number in (2, 5, 7)}
    attest(client, tokens("alice"), sorted(one_build))
    suggested = suggested_paths(client, endpoint, tokens("bob"))
    assert set(suggested[:3]) == one_build
    assert set(suggested[3:]) == defined_closure.all_paths - one_build


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_are_empty_when_everything_is_settled(client, tokens, defined_closure, endpoint):
    attest(client, tokens("alice"), sorted(defined_closure.all_paths))
    attest(client, tokens("bob"), sorted(defined_closure.all_paths))
    assert suggested_paths(client, endpoint) == []
    assert suggested_paths(client, endpoint, tokens("carol")) == []


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_are_empty_when_caller_built_everything_else_settled(client, tokens, defined_closure, endpoint):
    paths = sorted(defined_closure.all_paths)
    attest(client, tokens("alice"), paths)
    attest(client, tokens("bob"), paths[:5])
    assert suggested_paths(client, endpoint, tokens("alice")) == []


def test_suggest_objects_carry_drv_path_and_output(client, tokens, defined_closure):
    suggestions = client.get("/reports/closure/suggest").get_json()
    by_path = {suggestion["out_path"]: suggestion for suggestion in suggestions}
    assert by_path[defined_closure.out("pkg-4")] == {"out_path": defined_closure.out("pkg-4"), "drv_path": samples.drv_path("pkg-4"),
                                             "output": "out"}


def test_bombon_suggestions_have_no_drv_path(client, tokens):
    define(client, tokens("owner"), samples.bombon_sbom(samples.DIAMOND), "bombon")
    suggestions = client.get("/reports/bombon/suggest").get_json()
    assert suggestions and all("drv_path" not in suggestion for suggestion in suggestions)


@pytest.fixture
def big_closure(client, tokens):
    defined_closure = flat_closure(620, prefix="big")
    define(client, tokens("owner"), defined_closure)
    return defined_closure


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_default_limit_is_50(client, big_closure, endpoint):
    assert len(suggested_paths(client, endpoint)) == 50


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_limit_up_to_500_is_honoured(client, big_closure, endpoint):
    assert len(suggested_paths(client, endpoint, limit=499)) == 499


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_larger_limit_is_clamped_to_500(client, big_closure, endpoint):
    assert len(suggested_paths(client, endpoint, limit=100_000)) == 500


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_have_no_duplicates(client, big_closure, endpoint):
    suggested = suggested_paths(client, endpoint, limit=500)
    assert len(set(suggested)) == len(suggested)


@pytest.mark.parametrize("limit", ["abc", "-1", "1.5"])
def test_malformed_limit_is_400(client, defined_closure, limit):
    response = client.get("/reports/closure/suggested", query_string={"limit": limit})
    assert response.status_code == 400
    assert "limit" in response.get_json()["error"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_of_unknown_report_are_404(client, endpoint):
    assert client.get(f"/reports/missing/{endpoint}").status_code == 404


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_suggestions_with_unknown_token_are_401(client, defined_closure, endpoint):
    assert client.get(f"/reports/closure/{endpoint}", headers=bearer("not-a-token")).status_code == 401


# ---------------------------------------------------------------- /pending

def all_pending(client, token=None, limit=7, name="closure"):
    """Follow `next` from the first page to the last; return every page's paths in order."""
    seen, after = [], None
    for _ in range(10_000):
        query = {"limit": limit, **({"after": after} if after else {})}
        response = client.get(f"/reports/{name}/pending", query_string=query, headers=bearer(token) if token else {})
        assert response.status_code == 200, response.get_json()
        body = response.get_json()
        seen.extend(entry["out_path"] for entry in body["paths"])
        after = body["next"]
        if after is None:
            return seen
    raise AssertionError("pending never ended")


def test_pending_pages_through_every_open_path_exactly_once(client, big_closure):
    seen = all_pending(client, limit=37)
    assert len(seen) == len(set(seen)) == len(big_closure.all_paths)
    assert set(seen) == big_closure.all_paths


def test_pending_is_sorted_by_out_path(client, big_closure):
    seen = all_pending(client, limit=37)
    assert seen == sorted(seen)


def test_pending_page_size_dividing_the_total_still_ends(client, tokens):
    defined_closure = flat_closure(14)
    define(client, tokens("owner"), defined_closure, "fourteen")
    seen = all_pending(client, limit=7, name="fourteen")
    assert sorted(seen) == sorted(defined_closure.all_paths)


def test_pending_default_page_is_500(client, big_closure):
    body = client.get("/reports/closure/pending").get_json()
    assert len(body["paths"]) == 500
    assert body["next"] == body["paths"][-1]["out_path"]


def test_pending_excludes_callers_own_and_settled_paths(client, tokens, defined_closure):
    attest(client, tokens("alice"), [defined_closure.out("pkg-1")])
    attest(client, tokens("alice"), [defined_closure.out("pkg-2")])
    attest(client, tokens("bob"), [defined_closure.out("pkg-2")])
    seen = all_pending(client, tokens("alice"))
    assert set(seen) == defined_closure.all_paths - {defined_closure.out("pkg-1"), defined_closure.out("pkg-2")}


def test_pending_without_token_excludes_only_settled_paths(client, tokens, defined_closure):
    attest(client, tokens("alice"), [defined_closure.out("pkg-1"), defined_closure.out("pkg-2")])
    attest(client, tokens("bob"), [defined_closure.out("pkg-2")])
    assert set(all_pending(client)) == defined_closure.all_paths - {defined_closure.out("pkg-2")}
