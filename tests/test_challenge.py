"""`post_build_hook.py challenge`: the local store against every builder's attestations, with real Nix builds."""
import subprocess
import sys

import pytest
import requests

from binary_cache import CLIENT_VARIABLES, DETERMINISTIC, define_report, instantiate, nar_hash, realise, sbom_of
from support import REPO, bearer, nix_env, write_derivation

OTHER_HASH = "sha256:" + "1" * 52


@pytest.fixture(scope="module")
def built(nix, tmp_path_factory):
    """Two deterministic builds in the local store, and one derivation that is only instantiated."""
    directory = tmp_path_factory.mktemp("challenge")
    first = realise(nix, instantiate(nix, write_derivation(directory, "challenge-a", DETERMINISTIC.format(text="a"))))
    second = realise(nix, instantiate(nix, write_derivation(directory, "challenge-b", DETERMINISTIC.format(text="b"))))
    unbuilt = instantiate(nix, write_derivation(directory, "challenge-unbuilt", DETERMINISTIC.format(text="u")))
    return {"first": first, "second": second, "unbuilt": unbuilt}


def attest(server, builder, derivation, output_hash):
    token = server.create_user(builder)
    response = requests.post(f"{server.url}/attestations", headers=bearer(token), timeout=10, json=[
        {"drv_path": derivation.drv_path, "output_path": derivation.out, "output_hash": output_hash,
         "output_sig": ""}])
    assert response.status_code == 200, response.text
    return token


def challenge(server, *args):
    env = {name: value for name, value in nix_env().items() if name not in CLIENT_VARIABLES}
    env["HASH_COLLECTION_SERVER"] = server.url
    return subprocess.run([sys.executable, str(REPO / "post_build_hook.py"), "challenge", *map(str, args)],
                          env=env, capture_output=True, text=True, timeout=120)


def test_identical_when_every_builder_has_the_local_hash(nix, server, built):
    first = built["first"]
    attest(server, "alice", first, nar_hash(nix, first.out))
    attest(server, "bob", first, nar_hash(nix, first.out))
    ran = challenge(server, first.out)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == [f"{first.out}: identical (alice, bob)",
                                       "1 path: 1 identical, 0 differ, 0 without data"]


def test_differs_names_which_builders_have_which_hash(nix, server, built):
    first = built["first"]
    local_hash = nar_hash(nix, first.out)
    attest(server, "alice", first, local_hash)
    attest(server, "mallory", first, OTHER_HASH)
    ran = challenge(server, first.out)
    assert ran.returncode == 2, ran.stderr
    assert ran.stdout.splitlines() == [f"{first.out}: differs",
                                       f"  local hash: {local_hash}",
                                       f"  alice: {local_hash} (same as local)",
                                       f"  mallory: {OTHER_HASH}",
                                       "1 path: 0 identical, 1 differ, 0 without data"]


def test_one_difference_among_identical_paths_still_exits_2(nix, server, built):
    attest(server, "alice", built["first"], nar_hash(nix, built["first"].out))
    attest(server, "mallory", built["second"], OTHER_HASH)
    ran = challenge(server, built["first"].out, built["second"].out)
    assert ran.returncode == 2
    assert ran.stdout.splitlines()[-1] == "2 paths: 1 identical, 1 differ, 0 without data"


def test_no_data_at_all_exits_1(server, built):
    ran = challenge(server, built["second"].out)
    assert ran.returncode == 1
    assert ran.stdout.splitlines() == [f"{built['second'].out}: no data",
                                       "1 path: 0 identical, 0 differ, 1 without data"]


def test_some_paths_without_data_do_not_fail_an_identical_run(nix, server, built):
    attest(server, "alice", built["first"], nar_hash(nix, built["first"].out))
    ran = challenge(server, built["first"].out, built["second"].out)
    assert ran.returncode == 0
    assert ran.stdout.splitlines()[-1] == "2 paths: 1 identical, 0 differ, 1 without data"


def test_path_not_in_the_local_store_is_an_error_on_stderr(nix, server, built):
    attest(server, "alice", built["first"], nar_hash(nix, built["first"].out))
    ran = challenge(server, built["first"].out, built["unbuilt"].out)
    assert ran.returncode == 1
    assert f"{built['unbuilt'].out}: not in the local store" in ran.stderr
    assert built["unbuilt"].out not in ran.stdout


def test_result_link_is_followed(nix, server, built, tmp_path):
    attest(server, "alice", built["first"], nar_hash(nix, built["first"].out))
    link = tmp_path / "result"
    link.symlink_to(built["first"].out)
    ran = challenge(server, link)
    assert ran.returncode == 0
    assert ran.stdout.startswith(f"{built['first'].out}: identical")


def test_report_checks_every_report_path_present_locally(nix, server, built):
    token = attest(server, "alice", built["first"], nar_hash(nix, built["first"].out))
    attest(server, "mallory", built["second"], OTHER_HASH)
    define_report(server, token, "challenged", sbom_of(nix, built.values(), built["first"].out))
    ran = challenge(server, "--report", "challenged")
    assert ran.returncode == 2
    assert ran.stdout.splitlines()[-1] == "2 paths: 1 identical, 1 differ, 0 without data"
    assert "2 of 3 report paths in the local store" in ran.stderr


def test_unknown_report_is_an_error(server):
    ran = challenge(server, "--report", "nope")
    assert ran.returncode == 1
    assert "nope" in ran.stderr and ran.stdout == ""


def test_without_arguments_it_prints_usage(server):
    ran = challenge(server)
    assert ran.returncode == 1
    assert "usage: challenge" in ran.stderr
