"""rebuilder.sh with real Nix, the real post-build and diff hooks, a real binary cache and the real server."""
import os

import pytest

from binary_cache import (HttpDirectory, attestations_of_output, build_closure, component, copy_to_cache, define_report, generate_key,
                          instantiate, nar_hash, out_paths_of, realise, report_verdicts, run_script, sbom_of,
                          summary_line)
from support import NIX_CONFIG, nonce, write_derivation
from post_build_hook import nix_base32_encode
from support import DEBIAN_PYTHON, hooks_dir_of, token_file_settings
from web import NO_BUILDS, NONDETERMINISTIC, ONE_BUILD, REPRODUCED

SCRIPT = "rebuilder.sh"
REPORT = "rebuild-me"


@pytest.fixture(scope="module")
def built_closure(nix, tmp_path_factory):
    return build_closure(nix, tmp_path_factory.mktemp("closure"))


@pytest.fixture(scope="module")
def cache(nix, built_closure, tmp_path_factory):
    """(url, public key) of a served cache with every path of the closure."""
    directory = tmp_path_factory.mktemp("cache")
    secret_file, public = generate_key(nix, directory, f"test-cache-{nonce()}-1")
    http = HttpDirectory(copy_to_cache(nix, directory / "cache", secret_file, out_paths_of(built_closure.values())))
    yield http.url, public
    http.stop()


@pytest.fixture
def extra(nix, tmp_path):
    """Report entries beyond the cache's: not built yet, failing, built without a drv path in the SBOM, and a ghost."""
    fresh = instantiate(nix, write_derivation(tmp_path, "fresh", "echo fresh > $out"))
    failing = instantiate(nix, write_derivation(tmp_path, "failing", "echo doomed; exit 1"))
    thin = realise(nix, instantiate(nix, write_derivation(tmp_path, "thin", "echo thin > $out")))
    ghost = f"/nix/store/{nix_base32_encode(os.urandom(20))}-ghost"
    return {"fresh": fresh, "failing": failing, "thin": thin, "ghost": ghost}


@pytest.fixture
def filled(nix, server, built_closure, cache, extra):
    """A report over the closure and the extra entries, with the cache's hashes imported by fetch-from-cache.sh."""
    cache_url, public = cache
    cache_token = server.create_user("cache", "--public-key", public)
    extras = [component(extra["fresh"].out, extra["fresh"].drv_path, "out"),
              component(extra["failing"].out, extra["failing"].drv_path, "out"),
              component(extra["thin"].out, None, "out"),
              component(extra["ghost"], extra["ghost"] + ".drv", "out")]
    define_report(server, cache_token, REPORT, sbom_of(nix, built_closure.values(), built_closure["root"].out, extras))
    imported = run_script("fetch-from-cache.sh", [REPORT], {
        "HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": cache_token,
        "HASH_COLLECTION_CACHE": cache_url, "HASH_COLLECTION_CACHE_KEY": public})
    assert summary_line(imported.stdout) == "10 paths: 6 imported, 4 not in cache, 0 bad signature, 0 failed"
    return server


@pytest.fixture
def local_builder(server, nix_key, hooks, reachable_client, tmp_path):  # noqa: F811 - hooks is a fixture
    """(settings, NIX_CONFIG with both hooks) of a local builder whose key the server knows."""
    token = server.create_user("local", "--public-key", nix_key["public"])
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_SECRET_KEY_FILE": nix_key["secret_file"],
                "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_TIMEOUT": "5"}
    post_build = hooks(settings)
    # The diff hook runs as the build user: Debian's Python, a reachable client and a readable token.
    diff = hooks(token_file_settings(settings, readable_dir=hooks_dir_of(reachable_client)),
                 python=DEBIAN_PYTHON, client=reachable_client, subcommand=["diff-hook"])
    nix_config = "\n".join([NIX_CONFIG, f"post-build-hook = {post_build.script}", f"diff-hook = {diff.script}",
                            "run-diff-hook = true"])
    return {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token}, nix_config


def rebuild(settings, nix_config, *args):
    return run_script(SCRIPT, args or [REPORT], settings, nix_config=nix_config)


def outcome_lines(stdout):
    """{short path: outcome} from the per-item lines."""
    outcomes = {}
    for line in stdout.strip().splitlines()[:-1]:
        words = line.partition("] ")[2].partition(":")[0]
        outcome, _, path = words.rpartition(" ")
        outcomes[path.partition("…-")[2]] = outcome
    return outcomes


def test_rebuild_reproduces_deterministic_outputs_and_exposes_the_nondeterministic_one(
        nix, filled, built_closure, extra, local_builder):
    settings, nix_config = local_builder
    ran = rebuild(settings, nix_config, REPORT, "-j", "2")
    assert ran.returncode == 0, ran.stderr
    assert summary_line(ran.stdout) == "10 paths: 7 reproduced, 1 differs, 1 build failed, 1 drv missing"
    assert outcome_lines(ran.stdout) == {
        "leaf": "reproduced", "mid": "reproduced", "two": "reproduced", "two-dev": "reproduced",
        "root": "reproduced", "nondeterministic": "differs", "fresh": "reproduced", "thin": "reproduced",
        "failing": "build failed", "ghost": "drv missing"}
    verdicts = report_verdicts(filled, REPORT)
    for label in ("leaf", "mid", "two", "root"):
        for out_path in built_closure[label].outputs.values():
            assert verdicts[out_path] == REPRODUCED, out_path
    assert verdicts[built_closure["nondeterministic"].out] == NONDETERMINISTIC
    assert verdicts[extra["fresh"].out] == ONE_BUILD
    assert verdicts[extra["thin"].out] == ONE_BUILD
    assert verdicts[extra["failing"].out] == NO_BUILDS


def test_output_missing_locally_is_built_then_checked_and_the_hook_reports_it(
        nix, filled, extra, local_builder):
    settings, nix_config = local_builder
    rebuild(settings, nix_config, "-j", "1", REPORT)
    [attestation] = attestations_of_output(filled, extra["fresh"].out)
    assert attestation["builder"] == "local"
    assert attestation["output_hash"] == nar_hash(nix, extra["fresh"].out)
    assert attestation["verified"] is True


def test_second_run_tries_only_what_is_still_open_and_terminates(filled, local_builder):
    settings, nix_config = local_builder
    assert rebuild(settings, nix_config).returncode == 0
    again = rebuild(settings, nix_config)
    assert again.returncode == 0, again.stderr
    assert summary_line(again.stdout) == "2 paths: 0 reproduced, 0 differs, 1 build failed, 1 drv missing"


def test_failed_build_is_named_with_nixs_reason(filled, extra, local_builder):
    settings, nix_config = local_builder
    ran = rebuild(settings, nix_config)
    [failed] = [line for line in ran.stdout.splitlines() if "-failing" in line]
    assert "build failed" in failed and "failed with exit code 1" in failed


@pytest.mark.parametrize("configured, missing", [
    ((), "post-build-hook, diff-hook, run-diff-hook = true"),
    (("post-build-hook",), "diff-hook, run-diff-hook = true"),
    (("post-build-hook", "diff-hook"), "run-diff-hook = true"),
])
def test_refuses_to_start_without_the_hooks(filled, extra, local_builder, configured, missing):
    settings, nix_config = local_builder
    kept = [line for line in nix_config.splitlines()
            if not line.startswith(("post-build-hook", "diff-hook", "run-diff-hook")) or
            line.split(" = ")[0] in configured]
    ran = rebuild(settings, "\n".join(kept))
    assert ran.returncode != 0
    assert f"refusing to rebuild: {missing} not configured" in ran.stderr
    assert ran.stdout == ""


def test_help_and_usage():
    helped = run_script(SCRIPT, ["--help"], {})
    assert helped.returncode == 0 and helped.stdout.startswith("usage: rebuilder.sh REPORT [-j N]")
    bare = run_script(SCRIPT, [], {})
    assert bare.returncode != 0 and "usage:" in bare.stderr


def test_default_jobs_come_from_max_cores():
    from post_build_hook import default_rebuild_jobs
    assert default_rebuild_jobs({"MAX_CORES": "3"}) == 3
    assert default_rebuild_jobs({}) >= 1


def test_bad_jobs_names_the_script_not_the_python_subcommand():
    ran = run_script(SCRIPT, [REPORT, "-j", "0"], {})
    assert ran.returncode != 0
    assert "usage: rebuilder.sh REPORT [-j N]: -j expects a positive number of jobs, got '0'" in ran.stderr


def test_without_a_token_the_warning_names_both_ways_to_give_one(server, local_builder):
    _settings, nix_config = local_builder
    ran = rebuild({"HASH_COLLECTION_SERVER": server.url}, nix_config, "no-such-report")
    assert "neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set" in ran.stderr
