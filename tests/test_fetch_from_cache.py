"""fetch-from-cache.sh against a real file:// binary cache served over HTTP, real builds and the real server."""
import http.server
import threading
from pathlib import Path

import pytest

from binary_cache import (attestations_of_output, build_closure, copy_to_cache, define_report, edit_narinfo,
                          generate_key, nar_hash, narinfo_file, out_paths_of, query, run_script, sbom_of,
                          served_copy, summary_line)
from support import free_port, nonce
from post_build_hook import fingerprint, parse_report_arguments, verify_signature

SCRIPT = "fetch-from-cache.sh"
REPORT = "closure"


@pytest.fixture(scope="module")
def cached_closure(nix, tmp_path_factory):
    return build_closure(nix, tmp_path_factory.mktemp("closure"))


@pytest.fixture(scope="module")
def signed_cache(nix, cached_closure, tmp_path_factory):
    """(cache directory, public key) of every path of the closure, signed by a fresh cache key."""
    directory = tmp_path_factory.mktemp("cache")
    secret_file, public = generate_key(nix, directory, f"test-cache-{nonce()}-1")
    cache_dir = copy_to_cache(nix, directory / "cache", secret_file, out_paths_of(cached_closure.values()))
    return cache_dir, public


@pytest.fixture
def cache(signed_cache, tmp_path):
    """A served private copy of the cache: (directory, url, public key)."""
    cache_dir, public = signed_cache
    copy, http = served_copy(cache_dir, tmp_path)
    yield copy, http.url, public
    http.stop()


def setup_server(server, nix, cached_closure, public_key):
    """Defines the report and registers the cache builder with the cache's key; returns the cache builder's token."""
    token = server.create_user("cache", "--public-key", public_key)
    define_report(server, token, REPORT, sbom_of(nix, cached_closure.values(), cached_closure["root"].out))
    return token


def fetch(server, token, cache_url, public_key, *args):
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_CACHE": cache_url, "HASH_COLLECTION_CACHE_KEY": public_key}
    return run_script(SCRIPT, [REPORT, *args] if args else [REPORT], settings)


def stored_attestations(server, cached_closure):
    return {out_path: attestations_of_output(server, out_path) for out_path in out_paths_of(cached_closure.values())}


# ---------------------------------------------------------------- imports

def test_imports_every_path_with_the_caches_signature_and_it_verifies(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    token = setup_server(server, nix, cached_closure, public)
    ran = fetch(server, token, cache_url, public, "-j", "4")
    assert ran.returncode == 0, ran.stderr
    assert summary_line(ran.stdout) == "6 paths: 6 imported, 0 not in cache, 0 bad signature, 0 failed"
    for out_path, attestations in stored_attestations(server, cached_closure).items():
        [attestation] = attestations
        assert attestation["builder"] == "cache"
        assert attestation["verified"] is True
        assert attestation["source"] == "cache"
        assert attestation["output_hash"] == nar_hash(nix, out_path)
        assert attestation["references"] == sorted(query(nix, "--references", out_path))
        message = fingerprint(out_path, attestation["output_hash"], attestation["nar_size"], attestation["references"])
        assert verify_signature(public, message, attestation["output_sig"])


def test_references_of_a_dependent_path_are_imported(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    [attestation] = attestations_of_output(server, cached_closure["mid"].out)
    assert attestation["references"] == [cached_closure["leaf"].out]


def test_deriver_comes_from_the_narinfo(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    [attestation] = attestations_of_output(server, cached_closure["two"].outputs["dev"])
    assert attestation["drv_path"] == cached_closure["two"].drv_path


@pytest.mark.parametrize("deriver", [None, "unknown-deriver"])
def test_without_a_deriver_the_reports_drv_path_is_used(nix, server, cached_closure, cache, deriver):
    cache_dir, cache_url, public = cache
    edit_narinfo(cache_dir, cached_closure["leaf"].out, "Deriver", deriver)
    fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    [attestation] = attestations_of_output(server, cached_closure["leaf"].out)
    assert attestation["drv_path"] == cached_closure["leaf"].drv_path
    assert attestation["verified"] is True


def test_progress_names_each_path_once_with_a_running_count(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    ran = fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    progress = ran.stdout.strip().splitlines()[:-1]
    assert [line.split("]")[0] for line in progress] == [f"[{count}/6" for count in range(1, 7)]
    assert sorted(line.split("…-")[1] for line in progress) == sorted(
        Path(out_path).name[33:] for out_path in out_paths_of(cached_closure.values()))
    assert all(" imported " in line for line in progress)


# ---------------------------------------------------------------- what is not imported

def test_tampered_nar_hash_counts_as_bad_signature_and_is_not_imported(nix, server, cached_closure, cache):
    cache_dir, cache_url, public = cache
    edit_narinfo(cache_dir, cached_closure["mid"].out, "NarHash", nar_hash(nix, cached_closure["leaf"].out))
    ran = fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    assert ran.returncode == 1, ran.stderr  # a bad signature is a failure, not an absence
    assert summary_line(ran.stdout) == "6 paths: 5 imported, 0 not in cache, 1 bad signature, 0 failed"
    assert attestations_of_output(server, cached_closure["mid"].out) == []
    assert f"bad signature {Path(cached_closure['mid'].out).name[:7]}…-mid" in ran.stdout


def test_signature_by_an_untrusted_key_counts_as_bad_signature(nix, server, cached_closure, cache, tmp_path):
    _cache_dir, cache_url, public = cache
    token = setup_server(server, nix, cached_closure, public)
    _secret, other_public = generate_key(nix, tmp_path, f"someone-else-{nonce()}-1")
    ran = fetch(server, token, cache_url, other_public)
    assert summary_line(ran.stdout) == "6 paths: 0 imported, 0 not in cache, 6 bad signature, 0 failed"
    assert all(attestations == [] for attestations in stored_attestations(server, cached_closure).values())


def test_path_missing_from_the_cache_counts_as_not_in_cache(nix, server, cached_closure, cache):
    cache_dir, cache_url, public = cache
    narinfo_file(cache_dir, cached_closure["nondeterministic"].out).unlink()
    ran = fetch(server, setup_server(server, nix, cached_closure, public), cache_url, public)
    assert ran.returncode == 0, ran.stderr
    assert summary_line(ran.stdout) == "6 paths: 5 imported, 1 not in cache, 0 bad signature, 0 failed"
    assert attestations_of_output(server, cached_closure["nondeterministic"].out) == []


# ---------------------------------------------------------------- it finishes

def test_second_run_finds_nothing_new(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    token = setup_server(server, nix, cached_closure, public)
    assert fetch(server, token, cache_url, public).returncode == 0
    before = stored_attestations(server, cached_closure)
    again = fetch(server, token, cache_url, public)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines() == ["0 paths: 0 imported, 0 not in cache, 0 bad signature, 0 failed"]
    assert stored_attestations(server, cached_closure) == before


def test_second_run_tries_what_the_cache_lacked_once_more_and_stops(nix, server, cached_closure, cache):
    cache_dir, cache_url, public = cache
    narinfo_file(cache_dir, cached_closure["leaf"].out).unlink()
    token = setup_server(server, nix, cached_closure, public)
    fetch(server, token, cache_url, public)
    again = fetch(server, token, cache_url, public)
    assert summary_line(again.stdout) == "1 path: 0 imported, 1 not in cache, 0 bad signature, 0 failed"


def test_two_jobs_give_the_same_outcome_as_one(nix, start_server, cached_closure, cache):
    cache_dir, cache_url, public = cache
    narinfo_file(cache_dir, cached_closure["leaf"].out).unlink()
    edit_narinfo(cache_dir, cached_closure["root"].out, "NarSize", "1")
    outcomes = []
    for jobs in ("1", "2"):
        server = start_server()
        token = setup_server(server, nix, cached_closure, public)
        ran = fetch(server, token, cache_url, public, "-j", jobs)
        stored = {out_path: [(attestation["builder"], attestation["output_hash"], attestation["verified"])
                             for attestation in attestations]
                  for out_path, attestations in stored_attestations(server, cached_closure).items()}
        outcomes.append((summary_line(ran.stdout), sorted(ran.stdout.splitlines()[:-1]), stored))
    assert outcomes[0][0] == "6 paths: 4 imported, 1 not in cache, 1 bad signature, 0 failed"
    assert [outcome[0] for outcome in outcomes] == [outcomes[0][0]] * 2
    assert [sorted(line.partition("] ")[2] for line in outcome[1]) for outcome in outcomes] == \
        [sorted(line.partition("] ")[2] for line in outcomes[0][1])] * 2
    assert outcomes[0][2] == outcomes[1][2]


# ---------------------------------------------------------------- transient failures

class FlakyCache(http.server.SimpleHTTPRequestHandler):
    """Answers 503 to the first request for every narinfo, and serves the cache after that."""

    failed = set()
    lock = threading.Lock()

    def do_GET(self):
        with self.lock:
            first = self.path not in self.failed
            self.failed.add(self.path)
        if first and self.path.endswith(".narinfo"):
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


class BrokenCache(FlakyCache):
    def do_GET(self):
        self.send_error(502, "bad gateway")


def serve_in_thread(handler, directory):
    handler_class = type("Handler", (handler,), {"failed": set()})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), lambda *args: handler_class(*args, directory=str(directory)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_transient_cache_errors_are_retried(nix, server, cached_closure, signed_cache):
    cache_dir, public = signed_cache
    httpd, url = serve_in_thread(FlakyCache, cache_dir)
    try:
        ran = fetch(server, setup_server(server, nix, cached_closure, public), url, public, "-j", "6")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert summary_line(ran.stdout) == "6 paths: 6 imported, 0 not in cache, 0 bad signature, 0 failed"


def test_cache_that_keeps_failing_counts_as_failed_and_the_run_ends(nix, server, cached_closure, signed_cache):
    cache_dir, public = signed_cache
    httpd, url = serve_in_thread(BrokenCache, cache_dir)
    try:
        ran = fetch(server, setup_server(server, nix, cached_closure, public), url, public, "-j", "6")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert ran.returncode == 1, ran.stderr
    assert summary_line(ran.stdout) == "6 paths: 0 imported, 0 not in cache, 0 bad signature, 6 failed"
    assert "HTTP 502" in ran.stdout


# ---------------------------------------------------------------- configuration

def test_without_a_token_it_refuses_to_start(nix, server, cached_closure, cache):
    _cache_dir, cache_url, public = cache
    setup_server(server, nix, cached_closure, public)
    ran = run_script(SCRIPT, [REPORT], {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_CACHE": cache_url})
    assert ran.returncode != 0
    assert "HASH_COLLECTION_TOKEN" in ran.stderr


@pytest.mark.parametrize("problem, setting, expected", [
    ("cache key", {"HASH_COLLECTION_CACHE_KEY": "not-a-key"}, "HASH_COLLECTION_CACHE_KEY"),
    ("token", {"HASH_COLLECTION_TOKEN": "wrong"}, "refused the token"),
    ("report", {"report": "no-such-report"}, "no report named"),
])
def test_misconfiguration_exits_non_zero_with_a_clear_message(nix, server, cached_closure, cache, problem, setting,
                                                                  expected):
    _cache_dir, cache_url, public = cache
    token = setup_server(server, nix, cached_closure, public)
    settings = {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
                "HASH_COLLECTION_CACHE": cache_url, "HASH_COLLECTION_CACHE_KEY": public}
    settings.update({name: value for name, value in setting.items() if name != "report"})
    report = setting.get("report", REPORT)
    ran = run_script(SCRIPT, [report], settings)
    assert ran.returncode != 0
    assert expected in ran.stderr


def test_help_and_usage():
    helped = run_script(SCRIPT, ["--help"], {})
    assert helped.returncode == 0 and helped.stdout.startswith("usage: fetch-from-cache.sh REPORT [-j N]")
    bare = run_script(SCRIPT, [], {})
    assert bare.returncode != 0 and "usage:" in bare.stderr


@pytest.mark.parametrize("args, expected", [
    (["r"], ("r", 8)),
    (["r", "-j", "3"], ("r", 3)),
    (["-j", "3", "r"], ("r", 3)),
    (["-j3", "r"], ("r", 3)),
    (["r", "--jobs", "2"], ("r", 2)),
])
def test_jobs_go_before_or_after_the_report(args, expected):
    assert parse_report_arguments("fetch-from-cache", args, 8) == expected


@pytest.mark.parametrize("args", [[], ["-j", "2"], ["r", "-j"], ["r", "-j", "0"], ["r", "s"], ["r", "--x"]])
def test_wrong_arguments_are_a_usage_error(args):
    from post_build_hook import ConfigError
    with pytest.raises(ConfigError, match="usage:"):
        parse_report_arguments("fetch-from-cache", args, 8)


def test_bad_jobs_names_the_script_not_the_python_subcommand():
    ran = run_script(SCRIPT, [REPORT, "-j", "x"], {})
    assert ran.returncode != 0
    assert "usage: fetch-from-cache.sh REPORT [-j N]: -j expects a positive number of jobs, got 'x'" in ran.stderr


def test_unreachable_cache_fails_the_run_and_says_why_in_words(nix, server, cached_closure, cache):
    _cache_dir, _cache_url, public = cache
    unreachable = f"http://127.0.0.1:{free_port()}"
    ran = fetch(server, setup_server(server, nix, cached_closure, public), unreachable, public)
    assert ran.returncode == 1
    assert summary_line(ran.stdout) == "6 paths: 0 imported, 0 not in cache, 0 bad signature, 6 failed"
    failed = [line for line in ran.stdout.splitlines() if " failed " in line]
    assert len(failed) == 6 and all(f"cannot reach {unreachable}/" in line for line in failed)
    assert all(": connection refused" in line for line in failed)
    assert "Error" not in ran.stdout + ran.stderr


def test_a_run_that_finds_nothing_in_the_cache_exits_1(nix, server, cached_closure, cache, tmp_path):
    _cache_dir, _cache_url, public = cache
    empty_cache = tmp_path / "empty-cache"
    empty_cache.mkdir()
    httpd, url = serve_in_thread(http.server.SimpleHTTPRequestHandler, empty_cache)
    try:
        ran = fetch(server, setup_server(server, nix, cached_closure, public), url, public)
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert ran.returncode == 1
    assert summary_line(ran.stdout) == "6 paths: 0 imported, 6 not in cache, 0 bad signature, 0 failed"


class NotACollection(http.server.SimpleHTTPRequestHandler):
    """Answers every GET 200 with a JSON list, as some other service at HASH_COLLECTION_SERVER might."""

    def do_GET(self):
        body = b"[1, 2, 3]"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_that_is_not_a_collection_is_named_without_a_traceback(tmp_path):
    """Reviewed: an answer to /pending that was not an object ended the run in a TypeError."""
    httpd, url = serve_in_thread(NotACollection, tmp_path)
    try:
        ran = run_script(SCRIPT, [REPORT], {"HASH_COLLECTION_SERVER": url, "HASH_COLLECTION_TOKEN": "t"})
    finally:
        httpd.shutdown()
    assert ran.returncode == 1 and "Traceback" not in ran.stderr, ran.stderr
    assert "is not an object with a list of paths; is HASH_COLLECTION_SERVER this collection's address?" in ran.stderr
