"""The diff hook sends a diff after the attestation: end to end with real Nix, and held to its budget."""
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests

from support import DEBIAN_PYTHON, hooks_dir_of, token_file_settings, write_derivation
from test_hook import builder, instantiate, nix_build, nix_query, run_client  # noqa: F401 - builder is a fixture
from post_build_hook import basename_of

ONE_HOOK_RUN_SLACK = 5.0
# Three files: one stable, one with the build's timestamp, one that only the first build writes.
THREE_FILES = """
mkdir $out
echo stable > $out/stable
stamp=$(date +%s.%N)
echo "built at $stamp" > $out/stamp
touch {record}/stamp-$stamp
if [ ! -e {record}/built-once ]; then echo first > $out/first-build-only; touch {record}/built-once; fi
"""


@pytest.fixture
def build_user_directory():
    """A directory the builder, running as a build user, can write: pytest's tmp_path is root's alone."""
    made = []

    def make():
        made.append(Path(tempfile.mkdtemp(prefix="hash-collection-diff-")))
        made[-1].chmod(0o777)
        return made[-1]

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def diffs_of(server, out_path):
    return requests.get(f"{server.url}/diffs/{basename_of(out_path)}", headers={"Accept": "application/json"}, timeout=10).json()


def the_diff(server, out_path):
    [listed] = diffs_of(server, out_path)
    return requests.get(server.url + listed["href"], headers={"Accept": "application/json"}, timeout=10).json()


def test_check_of_a_nondeterministic_build_sends_a_diff_naming_exactly_the_differing_files(
        nix, server, builder, hooks, reachable_client, build_user_directory, tmp_path):
    if not shutil.which("diffoscope"):
        pytest.fail("diffoscope is missing: run the tests through ./run-tests.sh, which installs diffoscope-minimal")
    record = build_user_directory()
    nix_file = write_derivation(tmp_path, "diff-three-files", THREE_FILES.format(record=record))
    assert nix_build(nix, [nix_file], *hooks(builder).options()).returncode == 0
    build_user_settings = token_file_settings(builder, readable_dir=hooks_dir_of(reachable_client))
    diff_hook = hooks(build_user_settings, python=DEBIAN_PYTHON, client=reachable_client, subcommand=["diff-hook"])
    checked = nix_build(nix, [nix_file], "--check", "--option", "diff-hook", str(diff_hook.script),
                        "--option", "run-diff-hook", "true")
    assert "may not be deterministic" in checked.stderr
    [out_path] = nix_query(nix, "--outputs", instantiate(nix, nix_file))
    diff = the_diff(server, out_path)
    assert sorted(entry["path"] for entry in diff["files"]["differing"]) == ["first-build-only", "stamp"]
    stamps = [path.name.removeprefix("stamp-") for path in record.glob("stamp-*")]
    assert len(stamps) == 2
    assert all(stamp in diff["diffoscope"] for stamp in stamps), (diff["diffoscope"], diff["diffoscope_note"])
    assert diff_hook.stderr_text() == ""


@pytest.fixture(scope="module")
def prebuilt_tree(nix, tmp_path_factory):
    nix_file = write_derivation(tmp_path_factory.mktemp("prebuilt"), "diff-prebuilt",
                                "mkdir $out; echo stable > $out/stable; echo 1 > $out/stamp")
    drv_path = instantiate(nix, nix_file)
    out_path = subprocess.run(["nix-store", "--realise", drv_path], env=nix(), capture_output=True, text=True,
                              check=True).stdout.strip()
    return drv_path, out_path


def rebuilt_copy(out_path, directory):
    check_path = Path(directory) / "rebuilt.check"
    shutil.copytree(out_path, check_path, symlinks=True)
    (check_path / "stamp").chmod(0o644)
    (check_path / "stamp").write_text("2\n")
    return check_path


def stand_in(directory, body):
    directory.mkdir()
    program = directory / "diffoscope"
    program.write_text(f"#!{sys.executable}\nimport sys, time\n"
                       f"if sys.argv[1:] == ['--version']:\n    print('diffoscope 0')\n    sys.exit(0)\n{body}\n")
    program.chmod(0o755)
    return directory


STAND_INS = {
    "sleeps-forever": ("time.sleep(3600)", {}, "was stopped: stopped after 3 s"),
    "prints-100-mib": ("block = b'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.buffer.write(block)",
                       {"HASH_COLLECTION_DIFF_OUTPUT_MIB": "1"}, "output cut at 1 MiB"),
    "allocates-without-limit": ("hoard = []\nwhile True:\n    hoard.append(bytearray(16 << 20))",
                                {"HASH_COLLECTION_DIFF_MEMORY_MIB": "256"}, "MemoryError"),
}


@pytest.mark.parametrize("kind", STAND_INS)
def test_a_runaway_diffoscope_is_cut_off_and_the_file_level_diff_still_arrives_in_time(
        server, builder, prebuilt_tree, tmp_path, kind):
    body, settings, note = STAND_INS[kind]
    drv_path, out_path = prebuilt_tree
    path = f"{stand_in(tmp_path / 'bin', body)}:/usr/bin:/bin"
    diff_timeout, network_timeout = 3, float(builder["HASH_COLLECTION_TIMEOUT"])
    started = time.monotonic()
    ran = run_client({**builder, "HASH_COLLECTION_DIFF_TIMEOUT": diff_timeout, **settings}, "diff-hook", out_path,
                     str(rebuilt_copy(out_path, tmp_path)), drv_path, extra_env={"PATH": path})
    elapsed = time.monotonic() - started
    assert ran.returncode == 0, ran.stderr
    assert elapsed <= diff_timeout + network_timeout + ONE_HOOK_RUN_SLACK
    diff = the_diff(server, out_path)
    assert [entry["path"] for entry in diff["files"]["differing"]] == ["stamp"]
    assert note in diff["diffoscope_note"]


def spooled_diffs(spool):
    """The diffs waiting in a spool, which holds them beside the attestations, as submissions."""
    return [path for path in Path(spool).glob("*.json") if "diff" in json.loads(path.read_text())]


def test_a_diff_the_server_cannot_take_now_waits_in_the_spool_and_goes_out_with_the_next(
        server, builder, prebuilt_tree, tmp_path):
    drv_path, out_path = prebuilt_tree
    settings = {**builder, "HASH_COLLECTION_DIFFOSCOPE": "none"}
    server.stop()
    first = run_client(settings, "diff-hook", out_path, str(rebuilt_copy(out_path, tmp_path / "one")), drv_path)
    assert first.returncode == 0 and "spooled" in first.stderr
    assert len(spooled_diffs(builder["HASH_COLLECTION_SPOOL"])) == 1
    server.start()
    second_copy = rebuilt_copy(out_path, tmp_path / "two")
    (second_copy / "stable").chmod(0o644)
    (second_copy / "stable").write_text("changed too\n")
    second = run_client(settings, "diff-hook", out_path, str(second_copy), drv_path)
    assert second.returncode == 0, second.stderr
    assert spooled_diffs(builder["HASH_COLLECTION_SPOOL"]) == []
    assert len(diffs_of(server, out_path)) == 2
