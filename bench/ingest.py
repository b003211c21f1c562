#!/usr/bin/env python3
"""Ingest benchmark: starts `python web.py` on a free port with a temporary
database, creates a builder with ./create_user, and measures in one run

  (a) GET /healthz requests per second,
  (b) sequential single-attestation POST /attestation/<drv> per second, over one keep-alive connection,
  (c) a batch import of 100,000 attestations through POST /attestations, in requests of 10,000.

Targets (issue 2): (b)/(a) >= 0.5 and (c) >= 20,000 attestations per second.
usage: python bench/ingest.py [--seconds S] [--batch-total N]
"""
import argparse
import json
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from post_build_hook import NIX_BASE32, STORE_DIR, nix_base32_encode  # noqa: E402
from served import create_builder, start_server  # noqa: E402

BATCH_SIZE = 10_000


def random_digest():
    return "".join(secrets.choice(NIX_BASE32) for _ in range(32))


def random_out_path(name="bench"):
    return f"{STORE_DIR}/{random_digest()}-{name}"


def random_nar_hash():
    return "sha256:" + nix_base32_encode(os.urandom(32))


def rate_for(seconds, send_one):
    """Calls send_one() back to back for about `seconds`; returns calls per second."""
    for _ in range(50):  # warm up the connection and the server's code paths
        send_one()
    count, start = 0, time.perf_counter()
    while True:
        send_one()
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return count / elapsed


def healthz_rate(session, url, seconds):
    def send_one():
        response = session.get(url + "/healthz")
        response.raise_for_status()
    return rate_for(seconds, send_one)


def single_post_rate(session, url, token, seconds):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    drv_ident = f"{random_digest()}-bench-single"

    def send_one():
        body = json.dumps([{"output_path": random_out_path(), "output_hash": random_nar_hash(), "output_sig": ""}])
        response = session.post(f"{url}/attestation/{drv_ident}", data=body, headers=headers)
        response.raise_for_status()
    return rate_for(seconds, send_one)


def batch_bodies(total):
    """Serialised batches, made before timing so only the server's work is measured."""
    bodies = []
    for start in range(0, total, BATCH_SIZE):
        batch = [{"drv_path": f"{STORE_DIR}/{random_digest()}-bench-batch.drv", "output_path": random_out_path(),
                  "output_hash": random_nar_hash(), "output_sig": "", "nar_size": 1024 + number,
                  "references": []}
                 for number in range(start, min(start + BATCH_SIZE, total))]
        bodies.append(json.dumps(batch).encode())
    return bodies


def batch_rate(session, url, token, total):
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    bodies = batch_bodies(total)
    stored, start = 0, time.perf_counter()
    for body in bodies:
        response = session.post(url + "/attestations", data=body, headers=headers)
        response.raise_for_status()
        stored += response.json()["accepted"]
    elapsed = time.perf_counter() - start
    if stored != total:
        sys.exit(f"bench: the server accepted {stored} of {total} batch attestations")
    return total / elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of (a) and (b) each (default 5)")
    parser.add_argument("--batch-total", type=int, default=100_000, help="attestations in (c) (default 100000)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hash-collection-bench-") as directory:
        db = Path(directory) / "hashes.db"
        process, url = start_server(db)
        try:
            token = create_builder(db, "bench")
            with requests.Session() as session:
                healthz = healthz_rate(session, url, args.seconds)
                print(f"(a) GET /healthz:                        {healthz:10.0f} requests/s", flush=True)
                single = single_post_rate(session, url, token, args.seconds)
                print(f"(b) POST /attestation/<drv>, one each:   {single:10.0f} attestations/s", flush=True)
                print(f"    (b)/(a) = {single / healthz:.2f}  (target >= 0.5)", flush=True)
                batch = batch_rate(session, url, token, args.batch_total)
                print(f"(c) POST /attestations, {BATCH_SIZE} per request: {batch:10.0f} attestations/s"
                      f"  (target >= 20000)", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=10)


if __name__ == "__main__":
    main()
