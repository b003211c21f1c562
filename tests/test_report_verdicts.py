"""Every verdict, from real HTTP posts by several builders to a real server, and the rule itself."""
import pytest
import requests

import sbom_samples as samples
import web
from support import bearer

# Each case: who posts which build result for the one library path of the report.
VERDICT_TABLE = [
    pytest.param([], web.NO_BUILDS, id="nobody-is-no-builds"),
    pytest.param([("alice", "good")], web.ONE_BUILD, id="one-builder-once-is-one-build"),
    pytest.param([("alice", "good"), ("alice", "good")], web.ONE_BUILD, id="one-builder-twice-is-one-build"),
    pytest.param([("alice", "good"), ("bob", "good")], web.REPRODUCED, id="two-builders-agree-is-reproduced"),
    pytest.param([("alice", "good"), ("bob", "good"), ("carol", "good")], web.REPRODUCED,
                 id="three-builders-agree-is-reproduced"),
    pytest.param([("alice", "good"), ("alice", "other")], web.NONDETERMINISTIC,
                 id="one-builder-two-hashes-is-nondeterministic"),
    pytest.param([("alice", "good"), ("bob", "other")], web.NONDETERMINISTIC,
                 id="two-builders-disagree-is-nondeterministic"),
    pytest.param([("alice", "good"), ("bob", "good"), ("carol", "other")], web.PARTIALLY,
                 id="three-builders-two-agree-is-partially"),
    pytest.param([("alice", "good"), ("alice", "other"), ("bob", "good")], web.PARTIALLY,
                 id="builder-with-two-hashes-and-one-agreeing-is-partially"),
]


@pytest.fixture
def report(server):
    closure = samples.nix_build_sbom({"verdict-root": ["verdict-lib"], "verdict-lib": []})
    token = server.create_user("owner")
    response = requests.put(f"{server.url}/reports/verdicts", json=closure.sbom, headers=bearer(token), timeout=10)
    assert response.status_code == 200, response.text
    return closure


def post_as(server, tokens, builder, path, result):
    if builder not in tokens:
        tokens[builder] = server.create_user(builder)
    response = requests.post(f"{server.url}/attestations", json=[samples.attestation(path, result)],
                             headers=bearer(tokens[builder]), timeout=10)
    assert response.status_code == 200, response.text


def verdicts_of(server):
    response = requests.get(f"{server.url}/reports/verdicts", headers={"Accept": "application/json"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("posts, expected", VERDICT_TABLE)
def test_verdict_from_http_posts(server, report, posts, expected):
    tokens = {}
    library = report.out("verdict-lib")
    for builder, result in posts:
        post_as(server, tokens, builder, library, result)
    assert verdicts_of(server)["paths"][library] == expected


@pytest.mark.parametrize("posts, expected", VERDICT_TABLE)
def test_verdict_counts_match_paths(server, report, posts, expected):
    tokens = {}
    for builder, result in posts:
        post_as(server, tokens, builder, report.out("verdict-lib"), result)
    summary = verdicts_of(server)
    expected_counts = {label: 0 for label in web.REPORT_LABELS}
    expected_counts[web.NO_BUILDS] += 1  # the root, never attested here
    expected_counts[expected] += 1
    assert summary["counts"] == expected_counts


def test_same_builder_twice_is_not_reproduced(server, report):
    tokens = {}
    library = report.out("verdict-lib")
    post_as(server, tokens, "alice", library, "good")
    post_as(server, tokens, "alice", library, "good")
    assert verdicts_of(server)["paths"][library] != web.REPRODUCED


def test_attestations_of_another_name_with_the_same_hash_part_count_for_neither(server, report):
    tokens = {}
    library = report.out("verdict-lib")
    namesake = library[:len("/nix/store/") + 33] + "other-name"
    post_as(server, tokens, "alice", namesake, "good")
    post_as(server, tokens, "bob", namesake, "good")
    assert verdicts_of(server)["paths"][library] == web.NO_BUILDS


def test_verdict_table_covers_every_label():
    assert {param.values[1] for param in VERDICT_TABLE} == set(web.VERDICTS)


# ---------------------------------------------------------------- web.verdict, the one home of the rule

def test_verdict_without_attestations_is_no_builds():
    assert web.verdict({}) == web.NO_BUILDS


def test_verdict_of_one_builder_one_hash_is_one_build():
    assert web.verdict({"h1": {1}}) == web.ONE_BUILD


def test_verdict_of_two_builders_one_hash_is_reproduced():
    assert web.verdict({"h1": {1, 2}}) == web.REPRODUCED


def test_verdict_of_one_builder_two_hashes_is_nondeterministic():
    assert web.verdict({"h1": {1}, "h2": {1}}) == web.NONDETERMINISTIC


def test_verdict_of_two_builders_two_hashes_is_nondeterministic():
    assert web.verdict({"h1": {1}, "h2": {2}}) == web.NONDETERMINISTIC


def test_verdict_with_a_hash_backed_by_two_builders_and_another_is_partially():
    assert web.verdict({"h1": {1, 2}, "h2": {3}}) == web.PARTIALLY


def test_verdict_with_two_hashes_each_backed_by_two_builders_is_partially():
    assert web.verdict({"h1": {1, 2}, "h2": {3, 4}}) == web.PARTIALLY


def test_verdict_of_three_hashes_from_three_builders_is_nondeterministic():
    assert web.verdict({"h1": {1}, "h2": {2}, "h3": {3}}) == web.NONDETERMINISTIC
