"""Trust policies: verdicts that count only the builders a reader trusts, against real servers,
and `challenge --trust` applying the same rule to the same data with real Nix builds."""
import sqlite3
import subprocess
import sys

import pytest
import requests

import sbom_samples as samples
import web
from attestation_samples import nix_key_pair
from binary_cache import CLIENT_VARIABLES, DETERMINISTIC, define_report, instantiate, nar_hash, realise, sbom_of
from post_build_hook import basename_of, fingerprint, sign_fingerprint, verdict
from support import REPO, bearer, nix_env, write_derivation

TIMEOUT = 10
TRUST = {"trust": "alice,bob,carol", "min": "2"}
JSON = {"Accept": "application/json"}

# Who posts which build result for the report's library path, the verdict under
# trust=alice,bob,carol&min=2, and (for contrast) the verdict without a policy.
POLICY_TABLE = [
    pytest.param([("mallory", "good")], web.NO_BUILDS, web.ONE_BUILD, id="untrusted-only-is-no-builds"),
    pytest.param([("alice", "good"), ("mallory", "good")], web.ONE_BUILD, web.REPRODUCED,
                 id="one-trusted-and-one-untrusted-is-one-build"),
    pytest.param([("alice", "good"), ("bob", "good"), ("mallory", "evil")], web.REPRODUCED, web.PARTIALLY,
                 id="two-trusted-agree-untrusted-dissent-ignored-is-reproduced"),
    pytest.param([("alice", "good"), ("bob", "good"), ("carol", "other")], web.PARTIALLY, web.PARTIALLY,
                 id="two-trusted-agree-one-differs-is-partially"),
    pytest.param([("alice", "good"), ("bob", "other"), ("mallory", "other")], web.NONDETERMINISTIC, web.PARTIALLY,
                 id="trusted-disagree-untrusted-support-ignored-is-nondeterministic"),
    pytest.param([("alice", "good"), ("alice", "other")], web.NONDETERMINISTIC, web.NONDETERMINISTIC,
                 id="one-trusted-builder-two-hashes-is-nondeterministic"),
]


@pytest.fixture
def report(server):
    closure = samples.nix_build_sbom({"policy-root": ["policy-lib"], "policy-lib": []})
    owner = server.create_user("owner")
    response = requests.put(f"{server.url}/reports/policies", json=closure.sbom, headers=bearer(owner), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    tokens = {name: server.create_user(name) for name in ("alice", "bob", "carol", "mallory")}
    return closure, tokens


def post_as(server, token, path, result):
    response = requests.post(f"{server.url}/attestations", json=[samples.attestation(path, result)],
                             headers=bearer(token), timeout=TIMEOUT)
    assert response.status_code == 200, response.text


def verdicts_under(server, params=None, report="policies"):
    response = requests.get(f"{server.url}/reports/{report}", params=params, headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()["paths"]


@pytest.mark.parametrize("posts, under_policy, without_policy", POLICY_TABLE)
def test_verdict_under_a_policy_counts_only_its_builders(server, report, posts, under_policy, without_policy):
    closure, tokens = report
    library = closure.out("policy-lib")
    for builder, result in posts:
        post_as(server, tokens[builder], library, result)
    assert verdicts_under(server, TRUST)[library] == under_policy
    assert verdicts_under(server)[library] == without_policy


@pytest.mark.parametrize("posts, under_policy, _without", POLICY_TABLE)
def test_the_shared_rule_gives_the_table(posts, under_policy, _without):
    builders_by_hash = {}
    for builder, result in posts:
        builders_by_hash.setdefault(result, set()).add(builder)
    assert verdict(builders_by_hash, frozenset({"alice", "bob", "carol"}), 2) == under_policy


def test_fewer_than_min_agreeing_is_one_build(server, report):
    closure, tokens = report
    library = closure.out("policy-lib")
    post_as(server, tokens["alice"], library, "good")
    post_as(server, tokens["bob"], library, "good")
    assert verdicts_under(server, {"trust": "alice,bob,carol", "min": "3"})[library] == web.ONE_BUILD
    assert verdicts_under(server, {"trust": "alice,bob,carol", "min": "2"})[library] == web.REPRODUCED


def test_a_policy_of_every_builder_with_min_2_gives_todays_verdicts(server, report):
    closure, tokens = report
    library = closure.out("policy-lib")
    for builder, result in [("alice", "good"), ("bob", "other"), ("mallory", "other")]:
        post_as(server, tokens[builder], library, result)
    everyone = {"trust": "owner,alice,bob,carol,mallory", "min": "2"}
    assert verdicts_under(server, everyone) == verdicts_under(server) == verdicts_under(server, {"min": "2"})


POLICY_ROUTES = ["/reports/policies", "/reports/policies/suggest", "/reports/policies/suggested",
                 "/reports/policies/pending", "/reports/policies/history", "/reports/policies/changes",
                 "/outputs/{basename}", "/derivations/{drv_ident}"]


@pytest.mark.parametrize("route", POLICY_ROUTES)
def test_unknown_builders_in_a_policy_are_400_naming_them(server, report, route):
    closure, tokens = report
    library = closure.out("policy-lib")
    response = requests.post(f"{server.url}/attestations", headers=bearer(tokens["alice"]), timeout=TIMEOUT,
                             json=[samples.attestation(library, "good", drv=samples.drv_path("policy-lib"))])
    assert response.status_code == 200, response.text
    url = route.format(basename=basename_of(library), drv_ident=basename_of(samples.drv_path("policy-lib"))[:-4])
    response = requests.get(server.url + url, params={"trust": "alice,nobody,ghost"}, headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    assert "unknown builders" in response.json()["error"]
    assert "'nobody'" in response.json()["error"] and "'ghost'" in response.json()["error"]
    assert "'alice'" not in response.json()["error"]


@pytest.mark.parametrize("minimum", ["1", "4", "two"])
def test_min_outside_2_to_the_policy_size_is_400(server, report, minimum):
    response = requests.get(f"{server.url}/reports/policies", params={"trust": "alice,bob,carol", "min": minimum},
                            headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 400
    assert response.json()["error"].startswith("min:")


def test_min_above_the_number_of_builders_is_400_without_a_trust_list_too(server, report):
    """Every larger min gives the same verdicts: each would be a view of its own to render, for anyone to ask."""
    (builders,) = sqlite3.connect(server.db).execute("SELECT COUNT(*) FROM builders").fetchone()
    for minimum, status in ((builders, 200), (builders + 1, 400), (9999, 400)):
        response = requests.get(f"{server.url}/reports/policies", params={"min": str(minimum)}, headers=JSON, timeout=TIMEOUT)
        assert response.status_code == status, response.text
    assert response.json()["error"] == f"min: expected 2 to {builders} (the number of builders), got 9999"


def signed_item(secret, path, result):
    output_hash = samples.nar_hash(result)
    return {"drv_path": None, "output_path": path, "output_hash": output_hash, "nar_size": 1024, "references": [],
            "output_sig": sign_fingerprint(secret, fingerprint(path, output_hash, 1024, []))}


def test_verified_1_counts_only_verified_attestations(server, report):
    closure, tokens = report
    library = closure.out("policy-lib")
    secret, public = nix_key_pair("dave-1")
    dave = server.create_user("dave", "--public-key", public)
    response = requests.post(f"{server.url}/attestations", json=[signed_item(secret, library, "good")],
                             headers=bearer(dave), timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    post_as(server, tokens["alice"], library, "good")
    assert verdicts_under(server, {"trust": "alice,dave", "min": "2"})[library] == web.REPRODUCED
    assert verdicts_under(server, {"trust": "alice,dave", "min": "2", "verified": "1"})[library] == web.ONE_BUILD
    assert verdicts_under(server, {"trust": "alice,dave", "min": "2", "verified": "0"})[library] == web.REPRODUCED


def test_verified_0_on_a_verified_only_server_is_400(start_server):
    server = start_server("--require-signatures")
    closure = samples.nix_build_sbom({"strict-root": []})
    owner = server.create_user("owner")
    requests.put(f"{server.url}/reports/strict", json=closure.sbom, headers=bearer(owner), timeout=TIMEOUT)
    response = requests.get(f"{server.url}/reports/strict", params={"trust": "owner", "verified": "0"},
                            headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 400
    assert "verified-only" in response.json()["error"]
    assert requests.get(f"{server.url}/reports/strict", params={"verified": "1"}, headers=JSON,
                        timeout=TIMEOUT).status_code == 200


def test_a_path_reproduced_only_by_untrusted_builders_is_still_suggested_under_the_policy(server, report):
    closure, tokens = report
    library = closure.out("policy-lib")
    post_as(server, tokens["mallory"], library, "good")
    post_as(server, server.create_user("eve"), library, "good")
    pending = lambda params: [entry["out_path"] for entry in requests.get(
        f"{server.url}/reports/policies/pending", params=params, timeout=TIMEOUT).json()["paths"]]
    assert library not in pending({})
    assert library in pending(TRUST)


def put_policy(server, token, name, body):
    return requests.put(f"{server.url}/policies/{name}", json=body, headers=bearer(token), timeout=TIMEOUT)


def test_a_named_policy_gives_the_verdicts_of_its_contents(server, report):
    closure, tokens = report
    library = closure.out("policy-lib")
    for builder, result in [("alice", "good"), ("mallory", "good")]:
        post_as(server, tokens[builder], library, result)
    response = put_policy(server, tokens["alice"], "nixos-security", {"trust": ["alice", "bob", "carol"], "min": 2})
    assert response.status_code == 200, response.text
    assert verdicts_under(server, {"policy": "nixos-security"}) == verdicts_under(server, TRUST)
    assert verdicts_under(server, {"policy": "nixos-security"})[library] == web.ONE_BUILD
    listed = requests.get(f"{server.url}/policies", timeout=TIMEOUT).json()
    assert listed == [{"name": "nixos-security", "trust": ["alice", "bob", "carol"], "min": 2, "verified": None,
                       "owner": "alice", "updated_at": listed[0]["updated_at"]}]


def test_only_the_owner_of_a_named_policy_may_change_it(server, report):
    _closure, tokens = report
    assert put_policy(server, tokens["alice"], "mine", {"trust": ["alice", "bob"]}).status_code == 200
    response = put_policy(server, tokens["mallory"], "mine", {"trust": ["mallory", "bob"]})
    assert response.status_code == 403
    assert requests.delete(f"{server.url}/policies/mine", headers=bearer(tokens["mallory"]), timeout=TIMEOUT).status_code == 403


@pytest.mark.parametrize("body, complaint", [
    ({"trust": ["alice", "nobody"]}, "unknown builders: 'nobody'"),
    ({"trust": ["alice"], "min": 2}, "min: expected 2 to 1"),
    ({"trust": "alice,bob"}, "trust: expected a list"),
    ({"trust": ["alice", "bob"], "verified": "yes"}, "verified: expected true or false"),
    ({"trust": ["alice", "bob"], "minimum": 2}, "unexpected fields 'minimum'"),
])
def test_a_bad_named_policy_is_400_naming_what_is_wrong(server, report, body, complaint):
    _closure, tokens = report
    response = put_policy(server, tokens["alice"], "bad", body)
    assert response.status_code == 400
    assert complaint in response.json()["error"]
    assert requests.get(f"{server.url}/policies", timeout=TIMEOUT).json() == []


def test_an_unknown_named_policy_is_404(server, report):
    response = requests.get(f"{server.url}/reports/policies", params={"policy": "nope"}, headers=JSON, timeout=TIMEOUT)
    assert response.status_code == 404
    assert "no policy named 'nope'" in response.json()["error"]


def test_the_html_report_shows_the_policy_and_its_links_carry_it(server, report):
    closure, tokens = report
    post_as(server, tokens["alice"], closure.out("policy-lib"), "good")
    page = requests.get(f"{server.url}/reports/policies", params=TRUST, headers={"Accept": "text/html"},
                        timeout=TIMEOUT).text
    assert "Trust policy:" in page and "alice, bob, carol" in page
    assert '<input name="trust" value="alice,bob,carol"' in page
    assert f'href="/outputs/{basename_of(closure.out("policy-lib"))}?trust=alice,bob,carol&amp;min=2&amp;verified=0"' in page
    assert '/reports/policies/history?trust=alice,bob,carol&amp;min=2&amp;verified=0' in page


# ---------------------------------------------------------------- challenge --trust, with real Nix

@pytest.fixture(scope="module")
def built(nix, tmp_path_factory):
    directory = tmp_path_factory.mktemp("policy-challenge")
    return [realise(nix, instantiate(nix, write_derivation(directory, f"policy-{text}", DETERMINISTIC.format(text=text))))
            for text in ("a", "b")]


def challenge(server, *args):
    env = {name: value for name, value in nix_env().items() if name not in CLIENT_VARIABLES}
    env["HASH_COLLECTION_SERVER"] = server.url
    return subprocess.run([sys.executable, str(REPO / "post_build_hook.py"), "challenge", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


def attest_all(server, tokens, derivation, posts):
    for builder, output_hash in posts:
        response = requests.post(f"{server.url}/attestations", headers=bearer(tokens[builder]), timeout=TIMEOUT,
                                 json=[{"drv_path": derivation.drv_path, "output_path": derivation.out,
                                        "output_hash": output_hash, "output_sig": ""}])
        assert response.status_code == 200, response.text


def test_challenge_trust_agrees_with_the_servers_policy_verdict(nix, server, built):
    first, second = built
    tokens = {name: server.create_user(name) for name in ("alice", "bob", "carol", "mallory")}
    other = "sha256:" + "1" * 52
    attest_all(server, tokens, first, [("alice", nar_hash(nix, first.out)), ("bob", nar_hash(nix, first.out)),
                                       ("mallory", other)])
    attest_all(server, tokens, second, [("alice", nar_hash(nix, second.out)), ("bob", other), ("carol", other),
                                        ("mallory", nar_hash(nix, second.out))])
    define_report(server, tokens["alice"], "challenged", sbom_of(nix, [first, second], first.out))
    server_verdicts = verdicts_under(server, TRUST, report="challenged")
    ran = challenge(server, "--report", "challenged", "--trust", "alice,bob,carol", "--min", "2")
    assert ran.returncode == 2, ran.stdout + ran.stderr
    printed = {line.split(": ", 1)[0]: line.split(": ", 1)[1].split(";")[0]
               for line in ran.stdout.splitlines() if line.startswith("/nix/store/")}
    assert printed == server_verdicts
    assert server_verdicts == {first.out: web.REPRODUCED, second.out: web.PARTIALLY}
    assert f"  bob, carol: {other}" in ran.stdout
    assert "mallory" not in ran.stdout


def test_challenge_trust_exits_0_when_every_local_hash_is_the_settled_one(nix, server, built):
    first, _second = built
    tokens = {name: server.create_user(name) for name in ("alice", "bob", "mallory")}
    attest_all(server, tokens, first, [("alice", nar_hash(nix, first.out)), ("bob", nar_hash(nix, first.out)),
                                       ("mallory", "sha256:" + "1" * 52)])
    ran = challenge(server, first.out, "--trust", "alice,bob")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.splitlines()[0] == f"{first.out}: {web.REPRODUCED}; the local hash is the one the policy settled"


def test_challenge_trust_exits_1_when_no_hash_is_settled(nix, server, built):
    first, _second = built
    tokens = {name: server.create_user(name) for name in ("alice", "mallory")}
    attest_all(server, tokens, first, [("alice", nar_hash(nix, first.out)), ("mallory", nar_hash(nix, first.out))])
    ran = challenge(server, first.out, "--trust", "alice,bob")
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert ran.stdout.splitlines()[0] == f"{first.out}: {web.ONE_BUILD}; no hash is settled under the policy"


@pytest.mark.parametrize("args, complaint", [(["--trust", "alice", "--min", "2"], "--min: expected 2 to 1"),
                                             (["--min", "2"], "--min and --verified need --trust")])
def test_challenge_trust_refuses_a_bad_policy(server, args, complaint):
    ran = challenge(server, "/nix/store/" + "a" * 32 + "-x", *args)
    assert ran.returncode == 1
    assert complaint in ran.stderr
