"""The diff hook's local work: the file-level diff of two trees, and diffoscope held to its limits."""
import hashlib
import os
import sys
import time
from pathlib import Path

import pytest

import post_build_hook
from post_build_hook import DiffLimits, changed_aspects, diff_document, file_diff, run_bounded

# Generous against a loaded 2-core machine; the limits under test are far below the stand-ins' appetite.
SLACK_S = 5.0


def tree(root, files):
    """Make a tree from {relative path: bytes | ('symlink', target) | ('executable', bytes) | 'dir'}."""
    root = Path(root)
    root.mkdir(parents=True)
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content == "dir":
            path.mkdir()
        elif isinstance(content, tuple) and content[0] == "symlink":
            path.symlink_to(content[1])
        elif isinstance(content, tuple):
            path.write_bytes(content[1])
            path.chmod(0o755)
        else:
            path.write_bytes(content)
    return root


def listed(document):
    return {entry["path"]: changed_aspects(entry["a"], entry["b"]) for entry in document["differing"]}


def diff_of(tmp_path, files_a, files_b, **limits):
    return file_diff(tree(tmp_path / "a", files_a), tree(tmp_path / "b", files_b), DiffLimits(**limits),
                     time.monotonic() + 60)


def test_only_what_differs_is_listed_with_how(tmp_path):
    document = diff_of(tmp_path,
                       {"same": b"x", "stamp": b"built at 1", "only-a": b"a", "sub/mode": b"m", "link": ("symlink", "one")},
                       {"same": b"x", "stamp": b"built at 2", "only-b": b"b", "sub/mode": ("executable", b"m"),
                        "link": ("symlink", "two")})
    assert listed(document) == {"stamp": ["contents"], "only-a": ["only in A"], "only-b": ["only in B"],
                                "sub/mode": ["executable bit"], "link": ["target"]}
    assert document["totals"]["differing"] == 5 and document["cut"] == []


def test_contents_are_named_by_sha256(tmp_path):
    document = diff_of(tmp_path, {"f": b"one"}, {"f": b"two"})
    [entry] = document["differing"]
    assert entry["a"]["sha256"] == hashlib.sha256(b"one").hexdigest()
    assert entry["b"]["sha256"] == hashlib.sha256(b"two").hexdigest()


def test_different_sizes_differ_without_reading_the_files(tmp_path):
    document = diff_of(tmp_path, {"f": b"short"}, {"f": b"longer"})
    assert listed(document) == {"f": ["size"]}
    assert document["totals"]["bytes_read"] == 0


def test_type_change_and_the_children_of_the_vanished_directory(tmp_path):
    document = diff_of(tmp_path, {"x/inner": b"1"}, {"x": b"now a file"})
    assert listed(document) == {"x": ["type"], "x/inner": ["only in A"]}


def test_identical_trees_have_no_differences(tmp_path):
    files = {"a": b"1", "b/c": ("executable", b"2"), "d": ("symlink", "a")}
    assert diff_of(tmp_path, files, files)["differing"] == []


def test_symlinks_are_compared_not_followed(tmp_path):
    document = diff_of(tmp_path, {"l": ("symlink", "/etc/hostname")}, {"l": ("symlink", "/etc/hostname")})
    assert document["differing"] == [] and document["totals"]["bytes_read"] == 0


@pytest.mark.skipif(os.getuid() == 0, reason="root reads every file")
def test_unreadable_file_is_listed_as_unreadable(tmp_path):
    root_a = tree(tmp_path / "a", {"secret": b"1"})
    root_b = tree(tmp_path / "b", {"secret": b"2"})
    (root_b / "secret").chmod(0)
    document = file_diff(root_a, root_b, DiffLimits(), time.monotonic() + 60)
    assert listed(document) == {"secret": ["unreadable"]} or document["totals"]["not_compared"] == 1


def test_entry_cap_keeps_counting(tmp_path):
    document = diff_of(tmp_path, {f"f{n}": b"a" for n in range(30)}, {f"f{n}": b"b" for n in range(30)}, max_files=10)
    assert len(document["differing"]) == 10
    assert document["totals"]["differing"] == 30
    assert "first 10 of 30" in document["cut"][0]


def test_read_budget_stops_hashing_and_says_so(tmp_path):
    document = diff_of(tmp_path, {"big": b"a" * 4096}, {"big": b"b" * 4096}, read_bytes=1000)
    assert document["differing"] == []
    assert document["totals"]["not_compared"] == 1 and document["totals"]["bytes_read"] <= 1000
    assert "read budget" in document["cut"][0]


# ---------------------------------------------------------------- diffoscope, bounded

def stand_in(directory, body):
    """A program named diffoscope that does what body says, in Python."""
    directory.mkdir(exist_ok=True)
    program = directory / "diffoscope"
    program.write_text(f"#!{sys.executable}\nimport sys, time\n{body}\n")
    program.chmod(0o755)
    return str(program)


def test_a_diffoscope_that_sleeps_forever_is_killed_at_the_deadline(tmp_path):
    program = stand_in(tmp_path / "bin", "print('started', flush=True)\ntime.sleep(3600)")
    started = time.monotonic()
    output, status, cut = run_bounded([program], DiffLimits(timeout=2), time.monotonic() + 2)
    assert time.monotonic() - started < 2 + SLACK_S
    assert (output, status) == (b"started\n", None) and "stopped after 2 s" in cut


def test_a_diffoscope_that_leaves_a_sleeping_child_is_killed_with_it(tmp_path):
    marker = tmp_path / "child-alive"
    program = stand_in(tmp_path / "bin", "import subprocess\n"
                       f"subprocess.Popen(['sh', '-c', 'sleep 3; touch {marker}'])\ntime.sleep(3600)")
    run_bounded([program], DiffLimits(timeout=1), time.monotonic() + 1)
    time.sleep(3.5)
    assert not marker.exists()


def test_a_diffoscope_that_prints_100_mib_is_cut_at_the_output_cap(tmp_path):
    program = stand_in(tmp_path / "bin", "block = b'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.buffer.write(block)")
    output, status, cut = run_bounded([program], DiffLimits(output_bytes=1 << 20), time.monotonic() + 60)
    assert len(output) == 1 << 20
    assert status is None and "output cut at 1 MiB" in cut


def test_a_diffoscope_that_allocates_without_limit_fails_inside_its_address_space(tmp_path):
    program = stand_in(tmp_path / "bin", "hoard = []\nwhile True:\n    hoard.append(bytearray(16 << 20))")
    started = time.monotonic()
    output, status, problem = run_bounded([program], DiffLimits(memory_bytes=256 << 20), time.monotonic() + 60)
    assert time.monotonic() - started < SLACK_S
    assert status not in (0, None) and "MemoryError" in problem


@pytest.mark.parametrize("body, note", [
    ("time.sleep(3600)", "was stopped"),
    ("sys.exit(2)", "exited with status 2"),
])
def test_a_failing_diffoscope_never_costs_the_file_level_diff(tmp_path, body, note):
    program = stand_in(tmp_path / "bin", f"if sys.argv[1:] == ['--version']:\n    print('diffoscope 999')\n    sys.exit(0)\n{body}")
    root_a, root_b = tree(tmp_path / "a", {"f": b"1"}), tree(tmp_path / "b", {"f": b"2"})
    document = diff_document(root_a, root_b, DiffLimits(timeout=2, diffoscope=program))
    assert listed(document["files"]) == {"f": ["contents"]}
    assert note in document["diffoscope_note"]
    assert document["tool_versions"]["diffoscope"] == "999"


def test_without_diffoscope_the_file_level_diff_says_so(tmp_path):
    root_a, root_b = tree(tmp_path / "a", {"f": b"1"}), tree(tmp_path / "b", {"f": b"2"})
    document = diff_document(root_a, root_b, DiffLimits(diffoscope=None))
    assert document["diffoscope"] is None and document["diffoscope_note"] == "diffoscope is not installed"
    assert listed(document["files"]) == {"f": ["contents"]}


def test_diffoscope_is_found_on_the_path_or_turned_off(tmp_path):
    program = stand_in(tmp_path / "bin", "")
    assert post_build_hook.diffoscope_program({"PATH": str(tmp_path / "bin")}) == program
    assert post_build_hook.diffoscope_program({"PATH": str(tmp_path / "bin"), "HASH_COLLECTION_DIFFOSCOPE": "none"}) is None
    assert post_build_hook.diffoscope_program({"PATH": str(tmp_path)}) is None


@pytest.mark.parametrize("value", ["0", "-1", "soon", "inf"])
def test_bad_diff_timeout_is_a_clear_configuration_error(value):
    with pytest.raises(post_build_hook.ConfigError, match="HASH_COLLECTION_DIFF_TIMEOUT"):
        post_build_hook.diff_limits_of({"HASH_COLLECTION_DIFF_TIMEOUT": value})
