#!/usr/bin/env python3
"""Revision storage benchmark: a 20,000-path report PUT 100 times (with a label each), every
revision changing 5% of its paths (new hash parts, as a nixpkgs bump gives), in an in-process
server over a temporary database. Prints the database's size after the first revision and
after the last, and the growth per revision.

Target (issue 16): the 99 later revisions add under 50 MB. Exit status 1 when missed.
usage: python bench/history.py [--paths N] [--revisions R] [--change F]
"""
import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from closure import generate_sbom  # noqa: E402
from post_build_hook import NIX_BASE32  # noqa: E402

TARGET_MB = 50
HASH_PART_RE = re.compile(r"/nix/store/([0-9a-z]{32})-")


def changed_sbom_text(sbom_text, fraction, rng):
    """The SBOM with `fraction` of its components given new out and drv hash parts, as a version bump
    gives them, replaced in one pass over the text."""
    sbom = json.loads(sbom_text)
    components = [sbom["metadata"]["component"], *sbom["components"]]
    renamed = {}
    for component in rng.sample(components, int(len(components) * fraction)):
        for prop in component.get("properties", []):
            match = HASH_PART_RE.match(prop["value"])
            if match:
                renamed[match.group(1)] = "".join(rng.choice(NIX_BASE32) for _ in range(32))
    return HASH_PART_RE.sub(lambda match: f"/nix/store/{renamed.get(match.group(1), match.group(1))}-", sbom_text)


def database_bytes(conn):
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size, pages, free = (conn.execute(f"PRAGMA {pragma}").fetchone()[0]
                              for pragma in ("page_size", "page_count", "freelist_count"))
    return page_size * (pages - free)


def settled_database_bytes(app, conn):
    """database_bytes once the server's work after its PUTs is done: a revision's shared component rows,
    when the PUT left them pending, and the removal of the copy it replaced."""
    app.extensions["pending_revisions"].wait()
    app.extensions["report_removals"].wait()
    return database_bytes(conn)


def main(argv=None):
    import web
    from create_user import main as create_user_main
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=20_000)
    parser.add_argument("--revisions", type=int, default=100)
    parser.add_argument("--change", type=float, default=0.05)
    args = parser.parse_args(argv)
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="hash-collection-history-") as directory:
        db = f"{directory}/hashes.db"
        app = web.create_app({"DATABASE": db})
        import contextlib
        import io
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            create_user_main(["owner", "--db", db])
        token = printed.getvalue().split()[-1]
        client = app.test_client()
        sbom_text = json.dumps(generate_sbom(args.paths))
        conn = web.connect(db)
        started = time.perf_counter()
        for number in range(1, args.revisions + 1):
            response = client.put(f"/reports/history?revision=rev-{number}", data=sbom_text,
                                  headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            assert response.status_code == 200, response.get_data(as_text=True)
            if number == 1:
                first = settled_database_bytes(app, conn)
            sbom_text = changed_sbom_text(sbom_text, args.change, rng)
        last = settled_database_bytes(app, conn)
        seconds = time.perf_counter() - started
    growth_mb = (last - first) / 1e6
    later = args.revisions - 1
    print(f"{args.paths} paths, {args.revisions} revisions, {args.change:.0%} changed each; {seconds:.0f} s of PUTs")
    print(f"after revision 1: {first / 1e6:.1f} MB; after revision {args.revisions}: {last / 1e6:.1f} MB")
    ok = growth_mb < TARGET_MB
    print(f"the {later} later revisions add {growth_mb:.1f} MB ({growth_mb * 1000 / max(later, 1):.0f} kB each);"
          f" target < {TARGET_MB} MB  {'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
