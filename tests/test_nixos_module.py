"""The NixOS module, the flake and the hook wrapper, checked without nixpkgs.

The module tests are a STRUCTURAL check, not a NixOS test: real Nix evaluates
module.nix with tests/nix/lib-shim.nix through tests/nix/module-harness.nix.
They show that the options exist, that the original README's snippet evaluates,
and what the module sets; they cannot show that NixOS accepts it. The VM test
in tests/vm.nix does that, on machines with nixpkgs. The lib stand-in follows
nixpkgs where these tests look; text the module escapes is checked under both
of nixpkgs' escapeShellArg behaviours (always quoted before 24.11, quoted only
when needed since).
"""
import json
import os
import shutil
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests

from module_layout import evaluate_module, in_private_mounts, module_scripts
import sbom_samples
from support import DEBIAN_PYTHON, REPO, ServerProcess, bearer, write_derivation

LIB_SHIM = REPO / "tests" / "nix" / "lib-shim.nix"
HOOK_WRAPPER = REPO / "nix" / "hook-wrapper.sh"

ORIGINAL_SNIPPET = """
services.hash-collection = {
  enable = true;
  collection-url = "server url";
  tokenFile = "/token/path";
  secretKeyFile = "/secret/key/path";
};
"""

BUILDER_OPTIONS = {"enable", "collection-url", "tokenFile", "secretKeyFile", "spoolDir", "buildUserSpoolDir", "timeout",
                   "diffoscope", "diffTimeout", "diffMemoryMiB", "diffOutputMiB", "logKey", "audit", "witnessKeyFile"}

# Both of nixpkgs' escapeShellArg behaviours: quoted only when needed (24.11 on), always quoted (before).
BOTH_QUOTINGS = pytest.mark.parametrize("quote_always", [False, True], ids=["quoted-when-needed", "always-quoted"])
SERVER_OPTIONS = {"enable", "package", "host", "port", "openFirewall", "dataDir", "requireSignatures",
                  "logOrigin", "logKeyFile"}
DIFF_VARIABLES = {"HASH_COLLECTION_DIFF_TIMEOUT", "HASH_COLLECTION_DIFF_MEMORY_MIB", "HASH_COLLECTION_DIFF_OUTPUT_MIB",
                  "HASH_COLLECTION_DIFFOSCOPE"}
LOG_KEY = "hashes.example.org+1a2b3c4d+AUw8aH0W3m3dFvo6Pkw+jVb2Kb7yFc3eVQJrW4ZQjTpx"
WITNESS_KEY = "witness.example.org+5e6f7a8b+BOqf3c8XmJ2hGy7oN4k6Rc2f1oVb8T9xYwq3lLZm5Kt0"
WITH_LOG_KEY = ORIGINAL_SNIPPET.replace("};", f'logKey = "{LOG_KEY}"; }};')


def evaluate(nix, configuration, quote_always=False):
    """The harness's JSON for `configuration` (Nix attribute-set body), or CalledProcessError."""
    return evaluate_module(configuration, quote_always)


def exports_of(script):
    """{NAME: value} of a script's `export NAME=value` lines, as the shell reads them."""
    exports = {}
    for line in script.splitlines():
        words = shlex.split(line)
        if words[:1] == ["export"]:
            name, _, value = words[1].partition("=")
            exports[name] = value
    return exports


def hook_texts(evaluated):
    return module_scripts(evaluated)


def secrets_service(evaluated):
    return evaluated["config"]["systemd"]["services"]["hash-collection-secrets"]


def evaluation_error(nix, configuration):
    with pytest.raises(subprocess.CalledProcessError) as failure:
        evaluate(nix, configuration)
    return failure.value.stderr


def unit_script(evaluated, unit):
    """The text of the script a systemd service of the module runs."""
    return Path(evaluated["config"]["systemd"]["services"][unit]["serviceConfig"]["ExecStart"]).read_text()


def exec_words(script):
    """The words of a script's `exec` line, as the shell reads them."""
    return next(shlex.split(line) for line in script.splitlines() if line.strip().startswith("exec "))


def server_service(evaluated):
    return evaluated["config"]["systemd"]["services"]["hash-collection-server"]["serviceConfig"]


# ---------------------------------------------------------------- parsing

@pytest.mark.parametrize("path", ["module.nix", "flake.nix", "tests/vm.nix", "nix/package.nix",
                                  "tests/nix/lib-shim.nix", "tests/nix/module-harness.nix"])
def test_nix_file_parses(nix, path):
    subprocess.run(["nix-instantiate", "--parse", str(REPO / path)], env=nix(),
                   stdout=subprocess.DEVNULL, check=True)


# ---------------------------------------------------------------- structural check of module.nix

def test_builder_options_exist_with_their_exact_names(nix):
    assert BUILDER_OPTIONS <= set(evaluate(nix, "")["options"]["hash-collection"])


def test_server_options_exist_with_their_exact_names(nix):
    assert SERVER_OPTIONS <= set(evaluate(nix, "")["options"]["hash-collection-server"])


def test_secret_paths_are_strings_not_nix_paths(nix):
    options = evaluate(nix, "")["options"]["hash-collection"]
    assert options["tokenFile"]["type"] == "null or string"
    assert options["secretKeyFile"]["type"] == "null or string"


def test_original_readme_snippet_evaluates_unchanged(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET)
    assert evaluated["failedAssertions"] == []
    assert evaluated["values"]["hash-collection"]["collection-url"] == "server url"


def test_enabling_the_builder_sets_post_build_hook_diff_hook_and_run_diff_hook(nix):
    settings = evaluate(nix, ORIGINAL_SNIPPET)["config"]["nix"]["settings"]
    assert settings["post-build-hook"]["name"] == "hash-collection-post-build-hook"
    assert settings["diff-hook"]["name"] == "hash-collection-diff-hook"
    assert settings["run-diff-hook"] is True


@BOTH_QUOTINGS
def test_hooks_pass_the_token_and_key_as_file_paths(nix, quote_always):
    settings = evaluate(nix, ORIGINAL_SNIPPET, quote_always)["config"]["nix"]["settings"]
    post_build_hook = settings["post-build-hook"]["text"]
    exports = exports_of(post_build_hook)
    assert exports["HASH_COLLECTION_TOKEN_FILE"] == "/token/path"
    assert exports["HASH_COLLECTION_SECRET_KEY_FILE"] == "/secret/key/path"
    assert exports["HASH_COLLECTION_SERVER"] == "server url"
    assert "bin/hash-collection-hook" in post_build_hook
    for text in (post_build_hook, settings["diff-hook"]["text"]):
        assert "HASH_COLLECTION_TOKEN" not in exports_of(text)
        assert "cat " not in text


@BOTH_QUOTINGS
def test_diff_hook_reads_copies_readable_by_the_build_users(nix, quote_always):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET, quote_always)
    diff_hook = evaluated["config"]["nix"]["settings"]["diff-hook"]["text"]
    assert exports_of(diff_hook)["HASH_COLLECTION_TOKEN_FILE"] == "/run/hash-collection/token"
    assert exports_of(diff_hook)["HASH_COLLECTION_SECRET_KEY_FILE"] == "/run/hash-collection/secret-key"
    assert diff_hook.rstrip().endswith('diff-hook "$@"')
    commands = [shlex.split(line) for line in secrets_service(evaluated)["script"].splitlines() if line.strip()]
    assert ["install", "-m", "0640", "-o", "root", "-g", "nixbld", "/secret/key/path",
            "/run/hash-collection/secret-key"] in commands
    assert ["install", "-d", "-m", "0750", "-o", "root", "-g", "nixbld", "/run/hash-collection"] in commands


def test_root_and_the_build_users_each_get_their_own_spool(nix):
    rules = evaluate(nix, ORIGINAL_SNIPPET)["config"]["systemd"]["tmpfiles"]["rules"]
    assert rules == ["d /var/lib/hash-collection/spool 0700 root root - -",
                     "d /var/lib/hash-collection/build-user-spool 2770 root nixbld - -"]


@BOTH_QUOTINGS
def test_root_hooks_spool_in_roots_spool_and_read_the_build_users_spool(nix, quote_always):
    hooks = hook_texts(evaluate(nix, ORIGINAL_SNIPPET, quote_always))
    for name in ("post-build-hook", "flush"):
        root_exports = exports_of(hooks[name])
        assert root_exports["HASH_COLLECTION_SPOOL"] == "/var/lib/hash-collection/spool"
        assert root_exports["HASH_COLLECTION_BUILD_USER_SPOOL"] == "/var/lib/hash-collection/build-user-spool"
        assert root_exports["HASH_COLLECTION_BUILD_USERS_GROUP"] == "nixbld"
    assert hooks["flush"].rstrip().endswith('hash-collection-hook flush "$@"')


@BOTH_QUOTINGS
def test_diff_hook_spools_only_in_the_build_users_spool(nix, quote_always):
    diff_exports = exports_of(hook_texts(evaluate(nix, ORIGINAL_SNIPPET, quote_always))["diff-hook"])
    assert diff_exports["HASH_COLLECTION_SPOOL"] == "/var/lib/hash-collection/build-user-spool"
    assert "HASH_COLLECTION_BUILD_USER_SPOOL" not in diff_exports


def test_spools_follow_their_options_and_the_build_users_group(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET.replace(
        "};", 'spoolDir = "/srv/root-spool"; buildUserSpoolDir = "/srv/build-spool"; };')
        + 'nix.settings.build-users-group = "builders";')
    assert evaluated["config"]["systemd"]["tmpfiles"]["rules"] == [
        "d /srv/root-spool 0700 root root - -", "d /srv/build-spool 2770 root builders - -"]
    hooks = hook_texts(evaluated)
    assert exports_of(hooks["diff-hook"])["HASH_COLLECTION_SPOOL"] == "/srv/build-spool"
    assert exports_of(hooks["post-build-hook"])["HASH_COLLECTION_BUILD_USERS_GROUP"] == "builders"


@pytest.mark.parametrize("spools", [('"/srv/spool"', '"/srv/spool"'), ('"/srv/spool"', '"/srv/spool/build"'),
                                    ('"/srv/spool/root"', '"/srv/spool"'), ('"spool"', '"/srv/build"')],
                         ids=["same", "build-inside-root", "root-inside-build", "relative"])
def test_spools_that_overlap_fail_an_assertion(nix, spools):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET.replace(
        "};", f"spoolDir = {spools[0]}; buildUserSpoolDir = {spools[1]}; }};"))
    assert any("spoolDir and buildUserSpoolDir" in message for message in evaluated["failedAssertions"])


def test_a_timer_flushes_the_spool_every_few_minutes(nix):
    systemd = evaluate(nix, ORIGINAL_SNIPPET)["config"]["systemd"]
    assert systemd["services"]["hash-collection-flush"]["serviceConfig"]["ExecStart"].endswith("-hash-collection-flush")
    assert systemd["timers"]["hash-collection-flush"]["timerConfig"]["OnUnitActiveSec"] == "5min"
    assert systemd["timers"]["hash-collection-flush"]["wantedBy"] == ["timers.target"]


def test_spool_dir_and_timeout_reach_the_hook(nix):
    # A spoolDir set before the split keeps working: it is now root's alone.
    evaluated = evaluate(nix, ORIGINAL_SNIPPET.replace(
        "};", 'spoolDir = "/var/spool/elsewhere"; timeout = 2; };'))
    exports = exports_of(evaluated["config"]["nix"]["settings"]["post-build-hook"]["text"])
    assert exports["HASH_COLLECTION_SPOOL"] == "/var/spool/elsewhere"
    assert exports["HASH_COLLECTION_TIMEOUT"] == "2"
    assert "d /var/spool/elsewhere 0700 root root - -" in evaluated["config"]["systemd"]["tmpfiles"]["rules"]


def test_missing_token_file_fails_an_assertion(nix):
    evaluated = evaluate(nix, 'services.hash-collection = { enable = true; collection-url = "http://hashes"; };')
    assert any("tokenFile" in message for message in evaluated["failedAssertions"])


def test_missing_collection_url_fails_an_assertion(nix):
    evaluated = evaluate(nix, 'services.hash-collection = { enable = true; tokenFile = "/token/path"; };')
    assert any("collection-url" in message for message in evaluated["failedAssertions"])


def test_a_nix_path_literal_for_the_token_is_rejected(nix):
    # A path literal would be copied into the world-readable store.
    error = evaluation_error(nix, ORIGINAL_SNIPPET.replace('"/token/path"', "/token/path"))
    assert "services.hash-collection.tokenFile' is not of type `null or string'" in error


def test_a_misspelt_option_is_rejected(nix):
    error = evaluation_error(nix, ORIGINAL_SNIPPET.replace("collection-url", "collectionUrl"))
    assert "services.hash-collection.collectionUrl' does not exist" in error


def test_a_disabled_module_sets_nothing(nix):
    assert evaluate(nix, "")["config"] == {}


def test_server_runs_under_a_dynamic_user_with_a_state_directory(nix):
    service = server_service(evaluate(nix, "services.hash-collection-server.enable = true;"))
    assert service["DynamicUser"] is True
    assert service["StateDirectory"] == "hash-collection-server"


@BOTH_QUOTINGS
def test_server_runs_web_py_on_the_database_in_its_state_directory(nix, quote_always):
    evaluated = evaluate(nix, 'services.hash-collection-server = { enable = true; host = "0.0.0.0"; port = 8123; };',
                         quote_always)
    command = shlex.split(server_service(evaluated)["ExecStart"])
    assert command[0].endswith("bin/hash-collection-server")
    assert command[1:] == ["--host", "0.0.0.0", "--port", "8123", "--db", "/var/lib/hash-collection-server/hashes.db"]


@BOTH_QUOTINGS
def test_verified_only_mode_passes_require_signatures(nix, quote_always):
    evaluated = evaluate(nix, "services.hash-collection-server = { enable = true; requireSignatures = true; };",
                         quote_always)
    assert shlex.split(server_service(evaluated)["ExecStart"])[-1] == "--require-signatures"


def test_server_is_hardened(nix):
    service = server_service(evaluate(nix, "services.hash-collection-server.enable = true;"))
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] is True
    assert service["PrivateTmp"] is True
    assert service["ProtectHome"] is True
    assert service["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "@system-service" in service["SystemCallFilter"]


def test_server_filter_lets_the_render_worker_lower_its_priority_and_fails_denied_calls_with_eperm(nix):
    """systemd applies SystemCallFilter's entries in order: after an allow-list, "~@resources" takes setpriority
    away and a later "setpriority" gives it back. Denied, it killed the render worker with SIGSYS (every view 500)."""
    service = server_service(evaluate(nix, "services.hash-collection-server.enable = true;"))
    filters = service["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert filters.index("setpriority") > filters.index("~@resources")
    assert service["SystemCallErrorNumber"] == "EPERM"


def test_a_server_whose_filter_denies_setpriority_still_renders_report_views(tmp_path):
    """The server started as the unit would start it under a filter that denies setpriority with EPERM
    (libseccomp, through tests/seccomp_exec.py): views are rendered at the server's own priority."""
    launcher = [DEBIAN_PYTHON, str(REPO / "tests" / "seccomp_exec.py"), "setpriority"]
    server = ServerProcess(tmp_path / "hashes.db", launcher=launcher).start()
    try:
        put = requests.put(f"{server.url}/reports/filtered", json=sbom_samples.nix_build_sbom(sbom_samples.DIAMOND).sbom,
                           headers=bearer(server.create_user("alice")), timeout=30)
        assert put.status_code == 200, put.text
        for accept in ("text/html", "application/json"):
            view = requests.get(f"{server.url}/reports/filtered", headers={"Accept": accept}, timeout=60)
            assert view.status_code == 200, view.text
        assert requests.get(f"{server.url}/reports/filtered/badge.svg", timeout=60).status_code == 200
    finally:
        server.stop()
    assert "setpriority failed" in server.log.read_text()


def test_open_firewall_opens_the_port(nix):
    closed = evaluate(nix, "services.hash-collection-server.enable = true;")
    opened = evaluate(nix, "services.hash-collection-server = { enable = true; openFirewall = true; port = 8123; };")
    assert closed["config"]["networking"]["firewall"]["allowedTCPPorts"] == []
    assert opened["config"]["networking"]["firewall"]["allowedTCPPorts"] == [8123]


@BOTH_QUOTINGS
def test_create_user_on_path_acts_on_the_server_database(nix, quote_always):
    packages = evaluate(nix, "services.hash-collection-server.enable = true;",
                        quote_always)["config"]["environment"]["systemPackages"]
    create_user = next(package for package in packages if package["name"] == "create_user")
    words = shlex.split(create_user["text"])
    assert "--setenv=HASH_COLLECTION_DB=/var/lib/hash-collection-server/hashes.db" in words
    assert "--property=DynamicUser=yes" in words
    assert "--property=User=hash-collection-server" in words


def test_data_dir_outside_var_lib_fails_an_assertion(nix):
    evaluated = evaluate(nix, 'services.hash-collection-server = { enable = true; dataDir = "/srv/hashes"; };')
    assert any("dataDir" in message for message in evaluated["failedAssertions"])


# ---------------------------------------------------------------- the lib stand-in is nixpkgs' lib where tests look

def shim_value(nix, expression, quote_always=False):
    completed = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr",
         f"let lib = import {LIB_SHIM} {{ quoteAlways = {'true' if quote_always else 'false'}; }}; in {expression}"],
        env=nix(), capture_output=True, text=True, check=True)
    return json.loads(completed.stdout)


# What nixpkgs' lib.escapeShellArg returns since 24.11 (lib/strings.nix): bare when
# the whole string matches [[:alnum:],._+:@%/-]+, else single-quoted.
ESCAPED_SINCE_24_11 = [
    ("/token/path", "/token/path"),
    ("user@host:1%2,x+y", "user@host:1%2,x+y"),
    ("server url", "'server url'"),
    ("it's", "'it'\\''s'"),
    ("", "''"),
    ("a=b", "'a=b'"),
    ("$HOME", "'$HOME'"),
]


@pytest.mark.parametrize("argument, escaped", ESCAPED_SINCE_24_11)
def test_stand_in_escape_shell_arg_quotes_like_nixpkgs(nix, argument, escaped):
    assert shim_value(nix, f"lib.escapeShellArg {json.dumps(argument)}") == escaped


@BOTH_QUOTINGS
@pytest.mark.parametrize("argument", [argument for argument, _ in ESCAPED_SINCE_24_11] + ["a\nb", "*", "x;y"])
def test_escaped_arguments_read_back_unchanged_in_the_shell(nix, quote_always, argument):
    escaped = shim_value(nix, f"lib.escapeShellArg {json.dumps(argument)}", quote_always)
    assert subprocess.run(["bash", "-c", f"printf %s {escaped}"], capture_output=True, text=True).stdout == argument


@pytest.mark.parametrize("type_expression, description", [
    ("lib.types.str", "string"),
    ("lib.types.nullOr lib.types.str", "null or string"),
    ("lib.types.bool", "boolean"),
    ("lib.types.port", "16 bit unsigned integer; between 0 and 65535 (both inclusive)"),
    ("lib.types.ints.positive", "positive integer, meaning >0"),
    ("lib.types.package", "package"),
])
def test_stand_in_types_describe_themselves_like_nixpkgs(nix, type_expression, description):
    assert shim_value(nix, f"({type_expression}).description") == description


def test_stand_in_package_type_accepts_what_nixpkgs_accepts(nix):
    assert shim_value(nix, "map lib.types.package.check [ { type = \"derivation\"; outPath = \"/x\"; } "
                           "\"/nix/store/00000000000000000000000000000000-x\" { outPath = \"/x\"; } \"/tmp/x\" ]") == [
        True, True, False, False]


# ---------------------------------------------------------------- secrets for the build users

def test_secrets_are_copied_by_a_service_not_an_activation_script(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET)
    assert "activationScripts" not in evaluated["config"].get("system", {})
    service = secrets_service(evaluated)
    assert service["serviceConfig"]["Type"] == "oneshot"
    assert service["serviceConfig"]["RemainAfterExit"] is True


def test_secrets_service_runs_after_users_exist_and_before_the_nix_daemon(nix):
    service = secrets_service(evaluate(nix, ORIGINAL_SNIPPET))
    # sysusers and userborn create the build users group in a service of their own.
    assert {"systemd-sysusers.service", "userborn.service"} <= set(service["after"])
    assert service["before"] == ["nix-daemon.service"]
    assert "nix-daemon.service" in service["wantedBy"]


def run_secrets_script(nix, tmp_path, configuration=ORIGINAL_SNIPPET, read_only_run=False):
    """The module's secrets copy, run by bash with /run replaced by tmp_path/run."""
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    script = secrets_service(evaluate(nix, configuration))["script"]
    return subprocess.run(in_private_mounts({"/run": run}, ["bash", "-c", script],
                                            read_only=("/run",) if read_only_run else ()),
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def secret_files(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir(mode=0o700)
    (secrets / "token").write_text("token\n")
    (secrets / "key").write_text("key\n")
    return secrets


def secrets_configuration(secrets, token="token"):
    return ORIGINAL_SNIPPET.replace('"/token/path"', f'"{secrets / token}"').replace(
        '"/secret/key/path"', f'"{secrets / "key"}"')


def test_secrets_copy_makes_copies_only_the_build_users_can_read(nix, tmp_path, secret_files):
    completed = run_secrets_script(nix, tmp_path, secrets_configuration(secret_files))
    assert completed.returncode == 0, completed.stderr
    copies = tmp_path / "run" / "hash-collection"
    assert (copies.stat().st_mode & 0o7777, copies.group()) == (0o750, "nixbld")
    for name in ("token", "secret-key"):
        assert ((copies / name).stat().st_mode & 0o7777, (copies / name).owner(), (copies / name).group()) == (
            0o640, "root", "nixbld")
    assert (copies / "token").read_text() == "token\n"


def test_secrets_copy_fails_visibly_when_the_token_is_missing(nix, tmp_path, secret_files):
    completed = run_secrets_script(nix, tmp_path, secrets_configuration(secret_files, token="missing"))
    assert completed.returncode != 0
    assert f"cannot read {secret_files / 'missing'}" in completed.stderr


def test_secrets_copy_fails_visibly_when_it_cannot_write(nix, tmp_path, secret_files):
    # In the old subshell only the last command's status counted: a failed install -d went unseen.
    completed = run_secrets_script(nix, tmp_path, secrets_configuration(secret_files), read_only_run=True)
    assert completed.returncode != 0
    assert "/run/hash-collection" in completed.stderr


def test_flush_service_can_read_a_token_under_root_or_home(nix):
    service = evaluate(nix, ORIGINAL_SNIPPET)["config"]["systemd"]["services"]["hash-collection-flush"]
    assert service["serviceConfig"]["ProtectHome"] == "read-only"


@pytest.mark.parametrize("option", ["tokenFile", "secretKeyFile"])
def test_a_secret_copied_into_the_store_fails_an_assertion(nix, option):
    # "${./file}" is a string, so the type accepts it, but it copies the file into the world-readable store.
    in_store = '"${builtins.toFile "hash-collection-test-secret" "not a secret"}"'
    original = {"tokenFile": '"/token/path"', "secretKeyFile": '"/secret/key/path"'}[option]
    evaluated = evaluate(nix, ORIGINAL_SNIPPET.replace(original, in_store))
    messages = [message for message in evaluated["failedAssertions"] if option in message]
    assert len(messages) == 1
    assert "Nix store, which every user can read" in messages[0]


def test_secrets_outside_the_store_pass_the_store_assertion(nix):
    assert evaluate(nix, ORIGINAL_SNIPPET.replace('"/token/path"', '"/nix/var/token"'))["failedAssertions"] == []


def test_auto_allocate_uids_warns_that_the_diff_hook_cannot_report(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET + "nix.settings.auto-allocate-uids = true;")
    assert len(evaluated["config"]["warnings"]) == 1
    assert "auto-allocate-uids" in evaluated["config"]["warnings"][0]
    assert "diff hook" in evaluated["config"]["warnings"][0]


def test_no_warning_without_auto_allocate_uids(nix):
    assert evaluate(nix, ORIGINAL_SNIPPET)["config"]["warnings"] == []
    assert evaluate(nix, ORIGINAL_SNIPPET + "nix.settings.auto-allocate-uids = false;")["config"]["warnings"] == []


# ---------------------------------------------------------------- diffs: diffoscope and the diff limits (issue 15)

def test_diff_options_default_to_the_hooks_own_limits_and_diffoscope_minimal(nix):
    values = evaluate(nix, ORIGINAL_SNIPPET)["values"]["hash-collection"]
    assert (values["diffTimeout"], values["diffMemoryMiB"], values["diffOutputMiB"]) == (60, 2048, 4)
    assert values["diffoscope"]["enable"] is True
    assert values["diffoscope"]["package"]["name"] == "diffoscope-minimal"


@BOTH_QUOTINGS
def test_diff_hook_gets_the_diff_limits_and_diffoscope_by_default(nix, quote_always):
    diff_exports = exports_of(hook_texts(evaluate(nix, ORIGINAL_SNIPPET, quote_always))["diff-hook"])
    assert diff_exports["HASH_COLLECTION_DIFF_TIMEOUT"] == "60"
    assert diff_exports["HASH_COLLECTION_DIFF_MEMORY_MIB"] == "2048"
    assert diff_exports["HASH_COLLECTION_DIFF_OUTPUT_MIB"] == "4"
    # A path, not a name: the nix-daemon's PATH need not hold diffoscope.
    assert diff_exports["HASH_COLLECTION_DIFFOSCOPE"] == (
        "/nix/store/00000000000000000000000000000000-diffoscope-minimal/bin/diffoscope")


@BOTH_QUOTINGS
def test_diff_options_reach_the_diff_hook_only(nix, quote_always):
    package = "/nix/store/11111111111111111111111111111111-diffoscope-250"
    hooks = hook_texts(evaluate(nix, ORIGINAL_SNIPPET.replace(
        "};", f'diffTimeout = 7; diffMemoryMiB = 512; diffOutputMiB = 1; diffoscope.package = "{package}"; }};'),
        quote_always))
    diff_exports = exports_of(hooks["diff-hook"])
    assert {name: diff_exports[name] for name in DIFF_VARIABLES} == {
        "HASH_COLLECTION_DIFF_TIMEOUT": "7", "HASH_COLLECTION_DIFF_MEMORY_MIB": "512",
        "HASH_COLLECTION_DIFF_OUTPUT_MIB": "1", "HASH_COLLECTION_DIFFOSCOPE": f"{package}/bin/diffoscope"}
    for name in ("post-build-hook", "flush"):
        assert not DIFF_VARIABLES & set(exports_of(hooks[name])), name


def test_diffoscope_disabled_runs_none_even_with_one_on_the_path(nix):
    diff_hook = hook_texts(evaluate(nix, ORIGINAL_SNIPPET.replace("};", "diffoscope.enable = false; };")))["diff-hook"]
    assert exports_of(diff_hook)["HASH_COLLECTION_DIFFOSCOPE"] == "none"


@pytest.mark.parametrize("option", ["diffTimeout", "diffMemoryMiB", "diffOutputMiB"])
def test_a_diff_limit_of_zero_is_rejected(nix, option):
    error = evaluation_error(nix, ORIGINAL_SNIPPET.replace("};", f"{option} = 0; }};"))
    assert f"services.hash-collection.{option}' is not of type `positive integer, meaning >0'" in error


# ---------------------------------------------------------------- the transparency log: audit and witness (issue 14)

def test_log_options_default_to_no_audit_and_no_witness(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET)
    values = evaluated["values"]["hash-collection"]
    assert (values["logKey"], values["witnessKeyFile"]) == (None, None)
    assert values["audit"] == {"interval": "1h", "witnesses": [], "minWitnesses": 0}
    systemd = evaluated["config"]["systemd"]
    for unit in ("hash-collection-audit", "hash-collection-witness"):
        assert unit not in systemd["services"] and unit not in systemd["timers"]


@BOTH_QUOTINGS
def test_a_log_key_runs_audit_hourly_with_the_log_key(nix, quote_always):
    evaluated = evaluate(nix, WITH_LOG_KEY, quote_always)
    audit = unit_script(evaluated, "hash-collection-audit")
    exports = exports_of(audit)
    assert exports["HASH_COLLECTION_LOG_KEY"] == LOG_KEY
    assert exports["HASH_COLLECTION_SERVER"] == "server url"
    assert exports["HASH_COLLECTION_SPOOL"] == "/var/lib/hash-collection/spool"
    assert "HASH_COLLECTION_SECRET_KEY_FILE" not in exports
    assert exec_words(audit)[2:] == ["audit", "--min-witnesses", "0", "$@"]
    timer = evaluated["config"]["systemd"]["timers"]["hash-collection-audit"]
    assert (timer["timerConfig"]["OnUnitActiveSec"], timer["wantedBy"]) == ("1h", ["timers.target"])
    assert "hash-collection-witness" not in evaluated["config"]["systemd"]["services"]


@BOTH_QUOTINGS
def test_audit_witnesses_and_interval_reach_the_audit_command(nix, quote_always):
    evaluated = evaluate(nix, WITH_LOG_KEY.replace(
        "};", f'audit = {{ interval = "15min"; witnesses = [ "{WITNESS_KEY}" ]; minWitnesses = 1; }}; }};'),
        quote_always)
    assert exec_words(unit_script(evaluated, "hash-collection-audit"))[2:] == [
        "audit", "--witness", WITNESS_KEY, "--min-witnesses", "1", "$@"]
    assert evaluated["config"]["systemd"]["timers"]["hash-collection-audit"]["timerConfig"]["OnUnitActiveSec"] == "15min"


@BOTH_QUOTINGS
def test_a_witness_key_file_runs_witness_with_its_secrets_as_file_paths(nix, quote_always):
    evaluated = evaluate(nix, WITH_LOG_KEY.replace(
        "};", 'witnessKeyFile = "/var/lib/hash-collection/witness.key"; audit.interval = "30min"; };'), quote_always)
    witness = unit_script(evaluated, "hash-collection-witness")
    exports = exports_of(witness)
    assert exports["HASH_COLLECTION_WITNESS_KEY_FILE"] == "/var/lib/hash-collection/witness.key"
    assert exports["HASH_COLLECTION_TOKEN_FILE"] == "/token/path"
    assert exports["HASH_COLLECTION_LOG_KEY"] == LOG_KEY
    assert not {"HASH_COLLECTION_WITNESS_KEY", "HASH_COLLECTION_TOKEN", "HASH_COLLECTION_SECRET_KEY_FILE"} & set(exports)
    assert exec_words(witness)[2:] == ["witness", "$@"]
    assert "cat " not in witness
    timers = evaluated["config"]["systemd"]["timers"]
    assert timers["hash-collection-witness"]["timerConfig"]["OnUnitActiveSec"] == "30min"
    assert timers["hash-collection-witness"]["wantedBy"] == ["timers.target"]


@pytest.mark.parametrize("unit", ["hash-collection-audit", "hash-collection-witness"])
def test_log_jobs_write_only_roots_spool(nix, unit):
    evaluated = evaluate(nix, WITH_LOG_KEY.replace(
        "};", 'witnessKeyFile = "/var/lib/hash-collection/witness.key"; spoolDir = "/srv/root-spool"; };'))
    service = evaluated["config"]["systemd"]["services"][unit]["serviceConfig"]
    assert (service["ProtectSystem"], service["ReadWritePaths"]) == ("strict", ["/srv/root-spool"])
    assert (service["ProtectHome"], service["NoNewPrivileges"], service["Type"]) == ("read-only", True, "oneshot")
    assert exports_of(unit_script(evaluated, unit))["HASH_COLLECTION_SPOOL"] == "/srv/root-spool"


def test_a_witness_key_file_without_a_log_key_fails_an_assertion(nix):
    evaluated = evaluate(nix, ORIGINAL_SNIPPET.replace("};", 'witnessKeyFile = "/var/lib/hash-collection/w.key"; };'))
    assert any("witnessKeyFile" in message and "logKey" in message for message in evaluated["failedAssertions"])


def test_more_required_witnesses_than_listed_fails_an_assertion(nix):
    evaluated = evaluate(nix, WITH_LOG_KEY.replace("};", "audit.minWitnesses = 1; };"))
    assert any("audit.minWitnesses" in message for message in evaluated["failedAssertions"])


def test_a_witness_key_copied_into_the_store_fails_an_assertion(nix):
    in_store = '"${builtins.toFile "hash-collection-test-witness" "not a secret"}"'
    evaluated = evaluate(nix, WITH_LOG_KEY.replace("};", f"witnessKeyFile = {in_store}; }};"))
    messages = [message for message in evaluated["failedAssertions"] if "witnessKeyFile" in message]
    assert len(messages) == 1
    assert "Nix store, which every user can read" in messages[0]


def test_a_misspelt_grouped_option_is_rejected(nix):
    error = evaluation_error(nix, WITH_LOG_KEY.replace("};", "audit.witness = [ ]; };"))
    assert "services.hash-collection.audit.witness' does not exist" in error


def test_server_log_options_default_to_web_pys_own(nix):
    evaluated = evaluate(nix, "services.hash-collection-server.enable = true;")
    assert (evaluated["values"]["hash-collection-server"]["logOrigin"],
            evaluated["values"]["hash-collection-server"]["logKeyFile"]) == (None, None)
    service = server_service(evaluated)
    assert service["LoadCredential"] == []
    assert not {"--log-origin", "--log-key"} & set(shlex.split(service["ExecStart"]))


@BOTH_QUOTINGS
def test_server_log_origin_and_key_file_reach_web_py(nix, quote_always):
    evaluated = evaluate(nix, 'services.hash-collection-server = { enable = true; logOrigin = "hashes.example.org";'
                              ' logKeyFile = "/run/secrets/log-key"; };', quote_always)
    service = server_service(evaluated)
    # The dynamic user reads root's file through systemd's credentials directory (%d).
    assert service["LoadCredential"] == ["log-key:/run/secrets/log-key"]
    assert shlex.split(service["ExecStart"])[-4:] == ["--log-origin", "hashes.example.org", "--log-key", "%d/log-key"]
    assert evaluated["failedAssertions"] == []


def test_a_server_log_key_in_the_store_fails_an_assertion(nix):
    in_store = '"${builtins.toFile "hash-collection-test-log-key" "not a secret"}"'
    evaluated = evaluate(nix, f"services.hash-collection-server = {{ enable = true; logKeyFile = {in_store}; }};")
    assert any("logKeyFile" in message for message in evaluated["failedAssertions"])

# ---------------------------------------------------------------- tests/vm.nix, evaluated in the structural check

VM_NODES = """
let
  stubPackage = name: { type = "derivation"; inherit name; outPath = "/nix/store/00000000000000000000000000000000-${name}"; };
  pkgs = {
    writeText = name: _text: stubPackage name;
    testers.runNixOSTest = test: test;
    curl = stubPackage "curl";
  };
  lib = { mkForce = value: value; };
  vm = import %(vm)s { inherit pkgs; module = %(module)s; };
  node = name: vm.nodes.${name} { inherit lib pkgs; config = { }; };
in {
  services = builtins.mapAttrs (name: _: (node name).services) vm.nodes;
  imports = builtins.mapAttrs (name: _: map toString (node name).imports) vm.nodes;
  testScript = vm.testScript;
}
"""


def test_vm_test_nodes_evaluate_with_the_module(nix):
    completed = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr",
         VM_NODES % {"vm": REPO / "tests" / "vm.nix", "module": REPO / "module.nix"}],
        env=nix(), capture_output=True, text=True, check=True)
    vm = json.loads(completed.stdout)
    assert vm["imports"] == {"builder": [str(REPO / "module.nix")], "server": [str(REPO / "module.nix")]}
    for node in ("builder", "server"):
        services = json.dumps(vm["services"][node])
        evaluated = evaluate(nix, f"services = builtins.fromJSON {json.dumps(services)};")
        assert evaluated["failedAssertions"] == [], node
    assert "create_user vm-builder" in vm["testScript"]


# ---------------------------------------------------------------- the hook wrapper, against the real server

@pytest.fixture
def builder_secrets(server, nix_key, tmp_path):
    """A registered builder whose token and key are files, as module.nix passes them."""
    token_file = tmp_path / "token"
    token_file.write_text(server.create_user("nixos-builder", "--public-key", nix_key["public"]) + "\n")
    token_file.chmod(0o600)
    return {"HASH_COLLECTION_SERVER": server.url,
            "HASH_COLLECTION_TOKEN_FILE": str(token_file),
            "HASH_COLLECTION_SECRET_KEY_FILE": str(nix_key["secret_file"]),
            "HASH_COLLECTION_SPOOL": str(tmp_path / "spool"),
            "HASH_COLLECTION_TIMEOUT": "5",
            "HASH_COLLECTION_PYTHON": sys.executable}


def build_with_hook(nix, tmp_path, hook_env):
    """nix-build a fresh derivation with the wrapper as post-build-hook; return (drv_path, out_path)."""
    derivation = write_derivation(tmp_path, "wrapper-hook", "echo built by the wrapper > $out")
    env = nix(**hook_env)
    drv_path = subprocess.run(["nix-instantiate", str(derivation)], env=env,
                              capture_output=True, text=True, check=True).stdout.strip()
    out_path = subprocess.run(["nix-build", "--no-out-link", "--option", "post-build-hook", str(HOOK_WRAPPER), drv_path],
                              env=env, capture_output=True, text=True, check=True).stdout.strip()
    return drv_path, out_path


def attestations_of(server, drv_path):
    drv_ident = drv_path[len("/nix/store/"):-len(".drv")]
    response = requests.get(f"{server.url}/derivations/{drv_ident}", params={"full": "true"}, timeout=5)
    response.raise_for_status()
    return response.json()


def test_wrapper_as_post_build_hook_delivers_a_signed_attestation(nix, server, tmp_path, builder_secrets):
    drv_path, out_path = build_with_hook(nix, tmp_path, builder_secrets)
    attestations = attestations_of(server, drv_path)
    assert [(a["builder"], a["output_path"], a["verified"]) for a in attestations] == [
        ("nixos-builder", out_path, True)]


def test_wrapper_ignores_secrets_in_the_environment(nix, server, tmp_path, builder_secrets):
    # Only the files count: a stale token in the environment must neither win nor leak.
    hook_env = {**builder_secrets, "HASH_COLLECTION_TOKEN": "not-a-token",
                "HASH_COLLECTION_SECRET_KEY": "not-a-key"}
    drv_path, _ = build_with_hook(nix, tmp_path, hook_env)
    assert [a["builder"] for a in attestations_of(server, drv_path)] == ["nixos-builder"]


@pytest.fixture
def build_user_layout(builder_secrets, reachable_client):
    """What module.nix lays out for the diff hook, which runs as a build user (nixbld1):
    root:nixbld 0640 copies of the secrets in a 0750 directory, a 2770 spool, and a
    diff-hook script that runs the wrapper. Everything lives outside root's home."""
    secrets = Path(tempfile.mkdtemp(prefix="hash-collection-run-"))
    spool = Path(tempfile.mkdtemp(prefix="hash-collection-spool-"))
    scripts = Path(tempfile.mkdtemp(prefix="hash-collection-hooks-"))
    for directory, mode in ((secrets, 0o750), (spool, 0o2770), (scripts, 0o755)):
        shutil.chown(directory, "root", "nixbld")
        directory.chmod(mode)
    copies = {}
    for variable, name in (("HASH_COLLECTION_TOKEN_FILE", "token"), ("HASH_COLLECTION_SECRET_KEY_FILE", "secret-key")):
        copies[variable] = secrets / name
        shutil.copy(builder_secrets[variable], copies[variable])
        shutil.chown(copies[variable], "root", "nixbld")
        copies[variable].chmod(0o640)
    wrapper = scripts / "hook-wrapper.sh"
    shutil.copy(HOOK_WRAPPER, wrapper)
    settings = {**builder_secrets, **copies, "HASH_COLLECTION_SPOOL": spool,
                "HASH_COLLECTION_PYTHON": "/usr/bin/python3", "HASH_COLLECTION_CLIENT": reachable_client}
    diff_hook = scripts / "diff-hook.sh"
    diff_hook.write_text("\n".join([
        "#!/bin/sh",
        *(f"export {name}={shlex.quote(str(value))}" for name, value in settings.items()),
        f'exec /bin/bash {shlex.quote(str(wrapper))} diff-hook "$@"',
        ""]))
    diff_hook.chmod(0o755)
    yield diff_hook
    for directory in (secrets, spool, scripts):
        shutil.rmtree(directory, ignore_errors=True)


def test_wrapper_as_diff_hook_reports_the_rebuild_as_the_build_user(
        nix, server, tmp_path, builder_secrets, build_user_layout):
    derivation = write_derivation(tmp_path, "wrapper-nondeterministic",
                                  "read x < /proc/sys/kernel/random/uuid; echo $x > $out")
    env = nix(**builder_secrets)
    hook = ["--option", "post-build-hook", str(HOOK_WRAPPER)]
    subprocess.run(["nix-build", "--no-out-link", str(derivation), *hook], env=env, capture_output=True, check=True)
    checked = subprocess.run(["nix-build", "--no-out-link", str(derivation), "--check",
                              "--option", "diff-hook", str(build_user_layout), "--option", "run-diff-hook", "true"],
                             env=env, capture_output=True, text=True)
    assert "may not be deterministic" in checked.stderr
    drv_path = subprocess.run(["nix-instantiate", str(derivation)], env=env, capture_output=True, text=True,
                              check=True).stdout.strip()
    attestations = attestations_of(server, drv_path)
    assert len({attestation["output_hash"] for attestation in attestations}) == 2, checked.stderr
    assert all(attestation["verified"] for attestation in attestations)


def run_wrapper(*args, **env):
    clean = {name: value for name, value in os.environ.items() if not name.startswith("HASH_COLLECTION_")}
    return subprocess.run(["bash", str(HOOK_WRAPPER), *args], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)


def test_wrapper_without_a_token_file_never_stops_nix():
    completed = run_wrapper(DRV_PATH="/nix/store/00000000000000000000000000000000-x.drv")
    assert completed.returncode == 0
    assert "HASH_COLLECTION_TOKEN_FILE is not set" in completed.stderr
    assert "usage:" in completed.stderr


def test_wrapper_without_a_token_file_fails_when_run_by_hand():
    completed = run_wrapper("flush")
    assert completed.returncode == 2
    assert "usage:" in completed.stderr


def test_wrapper_help_prints_usage():
    completed = run_wrapper("--help")
    assert completed.returncode == 0
    assert completed.stdout.startswith("usage:")


def test_wrapper_uses_the_configured_client(tmp_path):
    client = tmp_path / "client.py"
    client.write_text("import os, sys\nprint(sys.argv[1:], os.environ.get('HASH_COLLECTION_TOKEN'),"
                      " os.environ['HASH_COLLECTION_TOKEN_FILE'])\n")
    completed = run_wrapper("flush", HASH_COLLECTION_CLIENT=str(client), HASH_COLLECTION_PYTHON=sys.executable,
                            HASH_COLLECTION_TOKEN_FILE="/token/path", HASH_COLLECTION_TOKEN="secret")
    assert completed.stdout.strip() == "['flush'] None /token/path"


@pytest.mark.parametrize("unit", ["hash-collection-audit", "hash-collection-witness"])
def test_wrapper_runs_the_log_jobs_with_the_environment_the_module_gives_them(nix, tmp_path, unit):
    # The wrapper refuses to run without HASH_COLLECTION_TOKEN_FILE: the audit script must set it too.
    evaluated = evaluate(nix, WITH_LOG_KEY.replace("};", 'witnessKeyFile = "/var/lib/hash-collection/w.key"; };'))
    script = unit_script(evaluated, unit)
    client = tmp_path / "client.py"
    client.write_text("import os, sys\nprint(sys.argv[1:], os.environ['HASH_COLLECTION_LOG_KEY'])\n")
    completed = run_wrapper(*exec_words(script)[2:-1], **exports_of(script),
                            HASH_COLLECTION_CLIENT=str(client), HASH_COLLECTION_PYTHON=sys.executable)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"{exec_words(script)[2:-1]!r} {LOG_KEY}"


def test_wrapper_passes_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    subprocess.run(["shellcheck", str(HOOK_WRAPPER)], check=True)


# ---------------------------------------------------------------- flake outputs, by name only

FLAKE_OUTPUT_NAMES = """
let
  flake = import %(flake)s;
  # Only genAttrs is real: outputs are listed by name, and their values, which
  # need nixpkgs, are never evaluated.
  nixpkgs = {
    lib.genAttrs = names: function: builtins.listToAttrs (map (name: { inherit name; value = function name; }) names);
    legacyPackages = { };
  };
  outputs = flake.outputs { self = outputs; inherit nixpkgs; };
  namesIn = builtins.mapAttrs (_: perSystem: builtins.attrNames perSystem.x86_64-linux);
in {
  inputs = builtins.attrNames flake.inputs;
  top = builtins.attrNames outputs;
  perSystem = namesIn { inherit (outputs) packages apps devShells checks; };
  nixosModules = builtins.mapAttrs (_: module: toString module) outputs.nixosModules;
  overlays = builtins.attrNames outputs.overlays;
  apps = builtins.mapAttrs (_: app: app.type) outputs.apps.x86_64-linux;
}
"""


def test_flake_declares_the_outputs_the_readme_promises(nix):
    expression = FLAKE_OUTPUT_NAMES % {"flake": REPO / "flake.nix"}
    completed = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expression],
                               env=nix(), capture_output=True, text=True, check=True)
    outputs = json.loads(completed.stdout)
    assert outputs["inputs"] == ["nixpkgs"]
    assert {"packages", "apps", "nixosModules", "overlays", "devShells", "checks"} <= set(outputs["top"])
    assert outputs["perSystem"] == {"packages": ["default", "utils"], "apps": ["create_user", "default", "server"],
                                    "devShells": ["default"], "checks": ["pytest", "vm"]}
    assert outputs["nixosModules"] == {"default": str(REPO / "module.nix"), "hash-collection": str(REPO / "module.nix")}
    assert outputs["overlays"] == ["default"]
    assert outputs["apps"] == {"create_user": "app", "default": "app", "server": "app"}
