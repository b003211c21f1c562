"""The project reads nothing outside its own directory: a user's clone has nothing beside it."""
import re
import subprocess

from support import REPO

# A sibling checkout's files, or a path that climbs out of the repository from a file in it.
# (Spelled in pieces, so that this file does not itself contain what it looks for.)
SIBLING, WORKPLACE = "shared", "work"
OUTSIDE = re.compile(rf"\.\./{SIBLING}|{SIBLING}/(?:tools|fixtures)|/{WORKPLACE}/|parents\[[2-9]\]")


def tracked_files():
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    return [REPO / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in tracked_files():
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        offenders += [f"{path.relative_to(REPO)}: {match.group(0)}" for match in OUTSIDE.finditer(text)]
    assert offenders == []


def test_the_check_finds_a_reference_to_a_sibling_checkout():
    assert OUTSIDE.search(f'GEN_SBOM = Path(__file__).resolve().parents[{2}] / "{SIBLING}/tools/gen_sbom.py"')
    assert OUTSIDE.search(f"sys.path.insert(0, '../{SIBLING}')")
