"""The build client as Nix runs it: post-build hook, diff hook and flush, with real Nix and the real server."""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

import post_build_hook
from support import CLIENT, DEBIAN_PYTHON, HOOK_VARIABLES, hooks_dir_of, nix_env, token_file_settings, write_derivation
from post_build_hook import drv_ident_of, fingerprint, output_paths_in, verify_signature

DETERMINISTIC = "echo {text} > $out"
NONDETERMINISTIC = "read x < /proc/sys/kernel/random/uuid; echo $x > $out"
ONE_HOOK_RUN_SLACK = 5.0


@pytest.fixture
def builder(server, nix_key, tmp_path):
    """Settings of a builder whose public key the server knows."""
    token = server.create_user("builder", "--public-key", nix_key["public"])
    return {"HASH_COLLECTION_SERVER": server.url, "HASH_COLLECTION_TOKEN": token,
            "HASH_COLLECTION_SECRET_KEY_FILE": nix_key["secret_file"],
            "HASH_COLLECTION_SPOOL": tmp_path / "spool", "HASH_COLLECTION_TIMEOUT": "5",
            # Never the machine's own build-user spool (the default for root).
            "HASH_COLLECTION_BUILD_USER_SPOOL": tmp_path / "no-build-user-spool"}


def nix_build(nix, nix_files, *options):
    return subprocess.run(["nix-build", "--no-out-link", *map(str, nix_files), *options],
                          env=nix(), capture_output=True, text=True)


def nix_query(nix, *args):
    return subprocess.run(["nix-store", "--query", *args], env=nix(), capture_output=True, text=True,
                          check=True).stdout.split()


def instantiate(nix, nix_file):
    return subprocess.run(["nix-instantiate", str(nix_file)], env=nix(), capture_output=True, text=True,
                          check=True).stdout.strip()


def attestations_of(server, drv_path):
    response = requests.get(f"{server.url}/derivations/{drv_ident_of(drv_path)}", params={"full": "true"}, timeout=10)
    return response.json() if response.status_code == 200 else []


def run_client(settings, *args, extra_env=None, drop=()):
    """The client run directly, as Nix would, with only the given settings."""
    env = {name: value for name, value in nix_env().items() if name not in HOOK_VARIABLES and name not in drop}
    env.update({name: str(value) for name, value in settings.items()})
    env.update(extra_env or {})
    return subprocess.run([sys.executable, str(CLIENT), *args], env=env, capture_output=True, text=True, timeout=60)


def spool_reports(spool):
    return sorted(Path(spool).glob("*.json"))


@pytest.fixture(scope="module")
def prebuilt(nix, tmp_path_factory):
    """(drv_path, out_path) of a one-output build made without any hook."""
    nix_file = write_derivation(tmp_path_factory.mktemp("prebuilt"), "hook-prebuilt", DETERMINISTIC.format(text="pre"))
    drv_path = instantiate(nix, nix_file)
    out_path = subprocess.run(["nix-store", "--realise", drv_path], env=nix(), capture_output=True, text=True,
                              check=True).stdout.strip()
    return drv_path, out_path


# ---------------------------------------------------------------- post-build hook

def test_every_output_of_a_two_output_build_is_attested(nix, server, builder, hooks, tmp_path):
    hook = hooks(builder)
    nix_file = write_derivation(tmp_path, "hook-two", "echo out > $out; echo dev > $dev", outputs=("out", "dev"))
    assert nix_build(nix, [nix_file], *hook.options()).returncode == 0
    drv_path = instantiate(nix, nix_file)
    stored = {attestation["output_path"]: attestation for attestation in attestations_of(server, drv_path)}
    out_paths = nix_query(nix, "--outputs", drv_path)
    assert sorted(stored) == sorted(out_paths) and len(out_paths) == 2
    for out_path in out_paths:
        assert stored[out_path]["output_hash"] == nix_query(nix, "--hash", out_path)[0]
    assert hook.exit_codes() == [0]


def test_nix_2_8_leaves_out_paths_empty_so_outputs_come_from_the_derivation(nix, tmp_path):
    spy = tmp_path / "spy.sh"
    spy.write_text(f'#!/bin/sh\necho "OUT_PATHS=[$OUT_PATHS]" > {tmp_path}/seen\n')
    spy.chmod(0o755)
    nix_file = write_derivation(tmp_path, "hook-spy", DETERMINISTIC.format(text="spy"))
    assert nix_build(nix, [nix_file], "--option", "post-build-hook", str(spy)).returncode == 0
    version = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout
    if " 2.8." in version:
        assert (tmp_path / "seen").read_text().strip() == "OUT_PATHS=[]"


def test_signature_equals_what_nix_store_sign_attaches(nix, server, builder, nix_key, hooks, tmp_path):
    nix_file = write_derivation(tmp_path, "hook-signed", DETERMINISTIC.format(text="signed"))
    assert nix_build(nix, [nix_file], *hooks(builder).options()).returncode == 0
    [stored] = attestations_of(server, instantiate(nix, nix_file))
    out_path = stored["output_path"]
    subprocess.run(["nix", "store", "sign", "--key-file", str(nix_key["secret_file"]), out_path],
                   env=nix(), check=True, capture_output=True)
    [info] = json.loads(subprocess.run(["nix", "path-info", "--json", "--sigs", out_path], env=nix(),
                                       check=True, capture_output=True, text=True).stdout)
    assert stored["output_sig"] in info["signatures"]
    assert stored["output_sig"].startswith(nix_key["public"].partition(":")[0] + ":")


def test_stored_signature_verifies_over_the_fingerprint_rebuilt_from_stored_fields(
        nix, server, builder, nix_key, hooks, tmp_path):
    dependency = write_derivation(tmp_path, "hook-dependency", DETERMINISTIC.format(text="dependency"))
    nix_file = write_derivation(tmp_path, "hook-referrer", "echo $dep > $out", extra=f"dep = import {dependency};")
    assert nix_build(nix, [nix_file], *hooks(builder).options()).returncode == 0
    [stored] = attestations_of(server, instantiate(nix, nix_file))
    assert stored["references"] == nix_query(nix, "--references", stored["output_path"]) != []
    assert stored["nar_size"] == int(nix_query(nix, "--size", stored["output_path"])[0])
    message = fingerprint(stored["output_path"], stored["output_hash"], stored["nar_size"], stored["references"])
    assert verify_signature(nix_key["public"], message, stored["output_sig"])
    assert stored["verified"] is True


def test_hook_without_a_key_posts_unsigned_and_says_why(nix, server, builder, hooks, tmp_path):
    settings = {**builder, "HASH_COLLECTION_SECRET_KEY_FILE": tmp_path / "no-such.key"}
    hook = hooks(settings)
    nix_file = write_derivation(tmp_path, "hook-unsigned", DETERMINISTIC.format(text="unsigned"))
    assert nix_build(nix, [nix_file], *hook.options()).returncode == 0
    [stored] = attestations_of(server, instantiate(nix, nix_file))
    assert stored["output_sig"] == ""
    assert "HASH_COLLECTION_SECRET_KEY_FILE" in hook.stderr_text()
    assert "No such file" in hook.stderr_text()
    assert len(hook.stderr_text().strip().splitlines()) == 1


@pytest.mark.parametrize("missing, complaint", [
    ("HASH_COLLECTION_SERVER", "HASH_COLLECTION_SERVER is not set"),
    ("HASH_COLLECTION_TOKEN", "HASH_COLLECTION_TOKEN"),
])
def test_misconfigured_hook_exits_0_says_what_is_wrong_and_nix_goes_on(
        nix, builder, hooks, tmp_path, missing, complaint):
    hook = hooks({name: value for name, value in builder.items() if name != missing})
    first = write_derivation(tmp_path, "hook-misconfigured-1", DETERMINISTIC.format(text="1"))
    second = write_derivation(tmp_path, "hook-misconfigured-2", DETERMINISTIC.format(text="2"))
    built = nix_build(nix, [first, second], *hook.options())
    assert built.returncode == 0
    assert len(built.stdout.split()) == 2
    assert hook.exit_codes() == [0, 0]
    assert hook.stderr_text().splitlines() == [hook.stderr_text().splitlines()[0]] * 2
    assert complaint in hook.stderr_text()


def test_hook_does_not_need_home(server, builder, prebuilt):
    drv_path, out_path = prebuilt
    ran = run_client(builder, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}, drop=("HOME",))
    assert ran.returncode == 0, ran.stderr
    assert [attestation["output_path"] for attestation in attestations_of(server, drv_path)] == [out_path]


def test_hook_with_out_paths_given_reports_them(server, builder, prebuilt):
    drv_path, out_path = prebuilt
    ran = run_client(builder, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": f" {out_path} "})
    assert ran.returncode == 0 and ran.stderr == ""
    assert len(attestations_of(server, drv_path)) == 1


def test_post_build_hook_says_its_hash_comes_from_a_build(server, builder, prebuilt):
    drv_path, out_path = prebuilt
    assert run_client(builder, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}).returncode == 0
    assert [attestation["source"] for attestation in attestations_of(server, drv_path)] == ["build"]


def test_diff_hook_says_its_hash_comes_from_a_check(server, builder, prebuilt, tmp_path):
    drv_path, out_path = prebuilt
    check_path = tmp_path / "rebuilt.check"
    check_path.write_text("checked\n")
    assert run_client(builder, "diff-hook", out_path, str(check_path), drv_path).returncode == 0
    [checked] = [attestation for attestation in attestations_of(server, drv_path)
                 if attestation["output_hash"] == post_build_hook.nar_hash_and_size(str(check_path))[0]]
    assert checked["source"] == "check"


def test_hook_outside_nix_says_it_needs_drv_path(builder):
    ran = run_client(builder, drop=("DRV_PATH",))
    assert ran.returncode == 0
    assert "DRV_PATH is not set" in ran.stderr


# ---------------------------------------------------------------- diff hook

def test_check_of_a_nondeterministic_build_reports_both_hashes(
        nix, server, builder, hooks, reachable_client, tmp_path):
    nix_file = write_derivation(tmp_path, "hook-nondeterministic", NONDETERMINISTIC)
    assert nix_build(nix, [nix_file], *hooks(builder).options()).returncode == 0
    build_user_settings = token_file_settings(builder, readable_dir=hooks_dir_of(reachable_client))
    diff_hook = hooks(build_user_settings, python=DEBIAN_PYTHON, client=reachable_client, subcommand=["diff-hook"])
    checked = nix_build(nix, [nix_file], "--check", "--option", "diff-hook", str(diff_hook.script),
                        "--option", "run-diff-hook", "true")
    assert checked.returncode != 0 and "may not be deterministic" in checked.stderr
    assert diff_hook.exit_codes() == [0]
    drv_path = instantiate(nix, nix_file)
    [out_path] = nix_query(nix, "--outputs", drv_path)
    summary = requests.get(f"{server.url}/derivations/{drv_ident_of(drv_path)}", timeout=10).json()
    assert list(summary) == [out_path]
    assert len(summary[out_path]) == 2
    assert nix_query(nix, "--hash", out_path)[0] in summary[out_path]


def test_diff_hook_signs_the_rebuild_with_the_references_it_attested_before(
        nix, server, builder, hooks, reachable_client, tmp_path):
    nix_file = write_derivation(tmp_path, "hook-nondeterministic-signed", NONDETERMINISTIC)
    assert nix_build(nix, [nix_file], *hooks(builder).options()).returncode == 0
    build_user_settings = token_file_settings(builder, readable_dir=hooks_dir_of(reachable_client))
    diff_hook = hooks(build_user_settings, python=DEBIAN_PYTHON, client=reachable_client, subcommand=["diff-hook"])
    nix_build(nix, [nix_file], "--check", "--option", "diff-hook", str(diff_hook.script),
              "--option", "run-diff-hook", "true")
    attestations = attestations_of(server, instantiate(nix, nix_file))
    assert len({attestation["output_hash"] for attestation in attestations}) == 2
    assert all(attestation["verified"] for attestation in attestations), diff_hook.stderr_text()
    assert diff_hook.stderr_text() == ""


def test_diff_hook_hashes_the_check_path_and_reports_it_under_the_original(server, builder, prebuilt, tmp_path):
    drv_path, out_path = prebuilt
    check_path = tmp_path / "rebuilt.check"
    check_path.write_text("different\n")
    ran = run_client(builder, "diff-hook", out_path, str(check_path), drv_path, "/tmp/build-dir")
    assert ran.returncode == 0, ran.stderr
    expected_hash, expected_size = post_build_hook.nar_hash_and_size(str(check_path))
    reported = [attestation for attestation in attestations_of(server, drv_path)
                if attestation["output_hash"] == expected_hash]
    assert [attestation["output_path"] for attestation in reported] == [out_path]
    assert reported[0]["nar_size"] == expected_size
    assert reported[0]["verified"] is True  # root can read the key and the store: it is signed


def test_diff_hook_with_wrong_arguments_exits_0_with_usage(builder):
    ran = run_client(builder, "diff-hook", "/nix/store/x")
    assert ran.returncode == 0
    assert "usage:" in ran.stderr


# ---------------------------------------------------------------- server down, spool and flush

def test_server_down_builds_go_on_reports_wait_in_the_spool_and_flush_delivers_once(
        nix, server, builder, hooks, tmp_path):
    server.stop()
    hook = hooks(builder)
    nix_files = [write_derivation(tmp_path, f"hook-offline-{n}", DETERMINISTIC.format(text=n)) for n in (1, 2)]
    built = nix_build(nix, nix_files, *hook.options())
    assert built.returncode == 0 and len(built.stdout.split()) == 2
    spool = Path(builder["HASH_COLLECTION_SPOOL"])
    assert len(spool_reports(spool)) == 2
    assert only_reports_and_empty_subdirectories_in(spool)

    server.start()
    flushed = run_client(builder, "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert spool_reports(spool) == []
    assert run_client(builder, "flush").returncode == 0
    for nix_file in nix_files:
        assert len(attestations_of(server, instantiate(nix, nix_file))) == 1


def test_next_hook_run_delivers_the_spool_first(nix, server, builder, hooks, tmp_path):
    hook = hooks(builder)
    offline = write_derivation(tmp_path, "hook-later-1", DETERMINISTIC.format(text="later"))
    server.stop()
    assert nix_build(nix, [offline], *hook.options()).returncode == 0
    assert len(spool_reports(builder["HASH_COLLECTION_SPOOL"])) == 1
    server.start()
    online = write_derivation(tmp_path, "hook-later-2", DETERMINISTIC.format(text="now"))
    assert nix_build(nix, [online], *hook.options()).returncode == 0
    assert spool_reports(builder["HASH_COLLECTION_SPOOL"]) == []
    assert len(attestations_of(server, instantiate(nix, offline))) == 1


def test_report_the_server_rejects_moves_to_rejected_with_the_reason(server, builder):
    spool = post_build_hook.Spool(str(builder["HASH_COLLECTION_SPOOL"]))
    spool.add({"drv_ident": "0" * 32 + "-bad", "attestations": [
        {"output_digest": "1" * 32, "output_name": "bad", "output_hash": "md5:" + "0" * 32, "output_sig": ""}]})
    flushed = run_client(builder, "flush")
    assert flushed.returncode == 0
    assert spool_reports(spool.directory) == []
    [rejected] = spool_reports(Path(spool.directory) / "rejected")
    kept = json.loads(rejected.read_text())
    assert kept["attestations"][0]["output_hash"].startswith("md5:")
    assert "HTTP 400" in kept["rejected"] and "output_hash" in kept["rejected"]


def test_spool_file_that_is_not_json_is_set_aside_not_retried(server, builder):
    spool = Path(builder["HASH_COLLECTION_SPOOL"])
    spool.mkdir()
    (spool / "1-garbage.json").write_text("{not json")
    flushed = run_client(builder, "flush")
    assert flushed.returncode == 0
    assert spool_reports(spool) == []
    assert (spool / "rejected" / "1-garbage.json").read_text() == "{not json"
    assert "not JSON" in flushed.stderr


def test_flush_with_the_server_down_keeps_the_spool_and_says_so(server, builder, prebuilt):
    drv_path, out_path = prebuilt
    server.stop()
    assert run_client(builder, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path}).returncode == 0
    flushed = run_client(builder, "flush")
    assert flushed.returncode == 1
    assert "0 of 1" in flushed.stdout
    assert len(spool_reports(builder["HASH_COLLECTION_SPOOL"])) == 1


def test_unwritable_spool_warns_and_exits_0(server, builder, prebuilt):
    drv_path, out_path = prebuilt
    server.stop()
    settings = {**builder, "HASH_COLLECTION_SPOOL": "/dev/null/spool"}
    ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path})
    assert ran.returncode == 0
    assert "not writable" in ran.stderr and "/dev/null/spool" in ran.stderr


def test_server_that_accepts_but_never_answers_cannot_hold_the_hook_beyond_its_timeout(builder, prebuilt):
    drv_path, out_path = prebuilt
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        settings = {**builder, "HASH_COLLECTION_SERVER": f"http://127.0.0.1:{silent.getsockname()[1]}",
                    "HASH_COLLECTION_TIMEOUT": "1"}
        started = time.monotonic()
        ran = run_client(settings, extra_env={"DRV_PATH": drv_path, "OUT_PATHS": out_path})
        elapsed = time.monotonic() - started
    assert ran.returncode == 0
    assert elapsed < 1 + ONE_HOOK_RUN_SLACK
    assert len(spool_reports(builder["HASH_COLLECTION_SPOOL"])) == 1


def only_reports_and_empty_subdirectories_in(spool):
    for entry in Path(spool).iterdir():
        if entry.is_dir():
            if any(entry.iterdir()):
                return False
        elif entry.suffix != ".json":
            return False
    return True


# ---------------------------------------------------------------- configuration units

@pytest.mark.parametrize("shown", [
    {"/nix/store/" + "a" * 32 + "-x.drv": {"outputs": {"out": {"path": "/nix/store/" + "b" * 32 + "-x"}}}},
    {"a" * 32 + "-x.drv": {"outputs": {"out": {"path": "b" * 32 + "-x"}}}},
    {"version": 4, "derivations": {"a" * 32 + "-x.drv": {"outputs": {"out": {"path": "b" * 32 + "-x"}}}}},
], ids=["nix-2.8-to-2.31", "nix-2.32", "nix-2.34"])
def test_outputs_are_read_from_every_shape_of_derivation_json(shown):
    assert output_paths_in(shown, "/nix/store/" + "a" * 32 + "-x.drv") == ["/nix/store/" + "b" * 32 + "-x"]


def test_default_spool_for_root():
    if os.getuid() != 0:
        pytest.skip("needs root")
    assert post_build_hook.spool_directory({}) == "/var/lib/hash-collection/spool"


@pytest.mark.parametrize("env, expected", [
    ({"XDG_STATE_HOME": "/state"}, "/state/hash-collection/spool"),
    ({"HOME": "/home/u"}, "/home/u/.local/state/hash-collection/spool"),
    ({"HOME": "/home/u", "XDG_STATE_HOME": "relative"}, "/home/u/.local/state/hash-collection/spool"),
    ({}, "/nonexistent/.local/state/hash-collection/spool"),
    ({"HASH_COLLECTION_SPOOL": "/srv/spool"}, "/srv/spool"),
])
def test_default_spool_for_other_users_needs_no_home(monkeypatch, env, expected):
    monkeypatch.setattr(post_build_hook.os, "getuid", lambda: 54321)  # no such user: no home either
    assert post_build_hook.spool_directory(env) == expected


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf", "nan"])
def test_bad_timeout_is_a_clear_configuration_error(value):
    with pytest.raises(post_build_hook.ConfigError, match="HASH_COLLECTION_TIMEOUT"):
        post_build_hook.timeout_of({"HASH_COLLECTION_TIMEOUT": value})


def test_default_timeout_is_at_most_ten_seconds():
    assert 0 < post_build_hook.timeout_of({}) <= 10


def test_token_file_wins_over_the_variable(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {"HASH_COLLECTION_TOKEN": "from-env", "HASH_COLLECTION_TOKEN_FILE": str(token_file)}
    assert post_build_hook.read_secret(env, "HASH_COLLECTION_TOKEN") == "from-file"
    assert post_build_hook.read_secret({"HASH_COLLECTION_TOKEN": "from-env"}, "HASH_COLLECTION_TOKEN") == "from-env"


def test_secret_key_that_is_not_a_nix_key_is_reported_not_used():
    secret_key, problem = post_build_hook.load_secret_key({"HASH_COLLECTION_SECRET_KEY": "just-a-password"})
    assert secret_key is None and "nix key generate-secret" in problem


def key_problem_of_file(tmp_path, content):
    key_file = tmp_path / "secret.key"
    key_file.write_bytes(content)
    secret_key, problem = post_build_hook.load_secret_key({"HASH_COLLECTION_SECRET_KEY_FILE": str(key_file)})
    assert secret_key is None
    assert f"HASH_COLLECTION_SECRET_KEY_FILE={key_file}" in problem and "neither" not in problem
    return problem


def test_empty_secret_key_file_is_named_and_called_empty(tmp_path):
    assert "is empty" in key_problem_of_file(tmp_path, b"")


def test_secret_key_file_that_is_not_text_is_named(tmp_path):
    assert "not text" in key_problem_of_file(tmp_path, b"\xff\xfe\x00")


def test_secret_key_file_holding_a_public_key_says_so(tmp_path, nix_key):
    assert "is a public key" in key_problem_of_file(tmp_path, nix_key["public"].encode() + b"\n")


def test_secret_key_file_holding_a_password_is_named_without_quoting_it(tmp_path):
    problem = key_problem_of_file(tmp_path, b"hunter2\n")
    assert "nix key generate-secret" in problem and "hunter2" not in problem


def test_unreadable_secret_key_file_is_named(tmp_path):
    key_dir = tmp_path / "key-dir"
    key_dir.mkdir()
    secret_key, problem = post_build_hook.load_secret_key({"HASH_COLLECTION_SECRET_KEY_FILE": str(key_dir)})
    assert secret_key is None and f"cannot read HASH_COLLECTION_SECRET_KEY_FILE={key_dir}" in problem


@pytest.mark.parametrize("text", ["alice\nt0ken-secret\n", "t0ken secret", "t0ken\x1bsecret"], ids=["two-lines", "space", "control"])
def test_token_that_is_not_one_word_is_refused_by_name_without_showing_it(tmp_path, text):
    """`create_user NAME --public-key KEY | awk '{print $NF}'` writes the builder's name and token on two lines:
    sent as a header, the HTTP library refused it and its error printed the token."""
    token_file = tmp_path / "token"
    token_file.write_text(text)
    for env in ({"HASH_COLLECTION_TOKEN_FILE": str(token_file)}, {"HASH_COLLECTION_TOKEN": text}):
        with pytest.raises(post_build_hook.ConfigError, match="is not one word") as refused:
            post_build_hook.read_secret(env, "HASH_COLLECTION_TOKEN")
        assert "secret" not in str(refused.value).replace("HASH_COLLECTION", "")


def test_a_witness_key_whose_name_is_not_ascii_is_one_word(tmp_path):
    """Note key names may be any text without spaces: `witness --generate-key témoin.example` makes one."""
    key = post_build_hook.generate_note_key("t\u00e9moin.example", post_build_hook.COSIGNATURE_KEY_TYPE)[0]
    key_file = tmp_path / "witness.key"
    key_file.write_text(key + "\n")
    assert post_build_hook.read_secret({"HASH_COLLECTION_WITNESS_KEY_FILE": str(key_file)},
                                       "HASH_COLLECTION_WITNESS_KEY") == key


def test_hook_with_a_two_line_token_file_says_so_and_never_prints_the_token(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("alice\nt0ken-secret\n")
    result = subprocess.run([sys.executable, str(CLIENT), "flush"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HASH_COLLECTION_SERVER": "http://127.0.0.1:9",
                                 "HASH_COLLECTION_TOKEN_FILE": str(token_file),
                                 "HASH_COLLECTION_SPOOL": str(tmp_path / "spool")})
    assert f"HASH_COLLECTION_TOKEN_FILE={token_file} is not one word" in result.stderr
    assert "t0ken-secret" not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["flush", "challenge", "audit", "witness", "monitor", "diff-hook"])
def test_help_of_every_subcommand_prints_the_usage_and_does_nothing_else(tmp_path, command):
    """Reviewed: `flush --help` flushed, and the log commands refused --help as an unexpected argument."""
    spool = tmp_path / "spool"
    spool.mkdir(mode=0o700)
    (spool / "1-waiting.json").write_text(json.dumps(post_build_hook.new_submission(
        "/nix/store/" + "a" * 32 + "-x.drv", [{"output_path": "/nix/store/" + "b" * 32 + "-x", "output_hash": "sha256:x"}])))
    result = subprocess.run([sys.executable, str(CLIENT), command, "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HASH_COLLECTION_SERVER": "http://127.0.0.1:9", "HASH_COLLECTION_TOKEN": "t",
                                 "HASH_COLLECTION_SPOOL": str(spool)})
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert result.stderr == "" and (spool / "1-waiting.json").exists()


@pytest.mark.parametrize("command", ["audit", "monitor", "witness", "fetch-from-cache"])
def test_a_command_that_needs_pynacl_says_so_where_it_is_missing(tmp_path, command):
    """A Python without PyNaCl (the `python3` on a PATH, say), played by a path entry whose `nacl` cannot be imported."""
    (tmp_path / "nacl").mkdir()
    (tmp_path / "nacl" / "__init__.py").write_text("raise ImportError('no PyNaCl here')\n")
    result = subprocess.run([sys.executable, str(CLIENT), command, "some-report"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "has no PyNaCl" in result.stderr and "apt-get install python3-nacl" in result.stderr


def test_the_hook_without_pynacl_names_why_its_key_cannot_sign(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "nacl.signing", None)  # as if PyNaCl were not installed
    key_file = tmp_path / "key"
    key_file.write_text("k1:" + "A" * 86 + "==\n")
    secret_key, problem = post_build_hook.load_secret_key({"HASH_COLLECTION_SECRET_KEY_FILE": str(key_file)})
    assert secret_key is None and "the key cannot sign" in problem and "has no PyNaCl" in problem


def test_empty_token_file_is_named_not_called_unset(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("\n")
    with pytest.raises(post_build_hook.ConfigError, match=f"HASH_COLLECTION_TOKEN_FILE={token_file} is empty"):
        post_build_hook.read_secret({"HASH_COLLECTION_TOKEN_FILE": str(token_file)}, "HASH_COLLECTION_TOKEN")
