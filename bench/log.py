#!/usr/bin/env python3
"""Transparency-log benchmark: builds a log of N entries (default 1,000,000) in-process through
the server's own append function, then starts `python web.py` on it and measures the median
time to serve an inclusion proof and a consistency proof at that size, over HTTP.

Target (issue 14): each median <= 5 ms at 1,000,000 entries.
usage: python bench/log.py [--entries N] [--requests R]
"""
import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import web  # noqa: E402
from post_build_hook import nix_base32_encode  # noqa: E402
from served import start_server  # noqa: E402

def build_log(db, entries):
    """Attestations stored and logged by the server's own store_attestations, a batch at a time."""
    app = web.create_app({"DATABASE": str(db)})
    with app.app_context():
        conn = web.get_db()
        with web.transaction(conn):
            builder = {"id": conn.execute("INSERT INTO builders (name) VALUES ('bench')").lastrowid, "name": "bench"}
        for start in range(0, entries, web.MAX_BATCH):
            items = [{"output_path": f"/nix/store/{number:032d}-bench", "output_hash": "sha256:" + nix_base32_encode(os.urandom(32))}
                     for number in range(start, min(start + web.MAX_BATCH, entries))]
            web.store_attestations(conn, builder, web.parse_attestation_list(items, lambda _item, _where: None))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        web.forget_connection()


def median_ms(session, url, paths):
    times = []
    for path in paths:
        started = time.perf_counter()
        response = session.get(url + path)
        times.append(time.perf_counter() - started)
        response.raise_for_status()
    return statistics.median(times) * 1000


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hash-collection-bench-log-") as directory:
        db = Path(directory) / "hashes.db"
        started = time.perf_counter()
        build_log(db, args.entries)
        print(f"built a log of {args.entries} entries in {time.perf_counter() - started:.1f} s; "
              f"database {db.stat().st_size / args.entries:.0f} bytes per attestation", flush=True)
        process, url = start_server(db)
        try:
            size = args.entries
            with requests.Session() as session:
                session.get(url + "/log/checkpoint").raise_for_status()
                inclusion = median_ms(session, url, [f"/log/proof/inclusion?index={random.randrange(size)}&size={size}"
                                                     for _ in range(args.requests)])
                consistency = median_ms(session, url, [f"/log/proof/consistency?old={random.randrange(1, size)}"
                                                       f"&size={size}" for _ in range(args.requests)])
            print(f"inclusion proof at {size} entries:   median {inclusion:6.2f} ms  (target <= 5)")
            print(f"consistency proof at {size} entries: median {consistency:6.2f} ms  (target <= 5)")
        finally:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
