#!/usr/bin/env python3
"""Scale benchmark (issue 17): starts `python web.py` with a temporary database and fills it through
POST /attestations, 10,000 per request, as three builders that each attest every output path (with
its drv path, a NAR size, no references, and a signature under a key the server does not know, so
nothing is verified); the third builder disagrees on 1 path in 20. It prints

  (a) the batch rate for every million attestations           (target >= 20,000/s up to 10 million),
  (b) the file size after PRAGMA wal_checkpoint(TRUNCATE)      (target <= 320 bytes per attestation
      and bytes per attestation, and where they go              at 1,020,000, the log included),
  (c) on the empty database and at the end: a single POST, the first view of a 20,000-path report
      after a PUT as HTML, text, JSON and CycloneDX, and /suggest, with the ratio end/start (target
      <= 1.5). The report's paths are attested like the others, spread over the whole ingest. On the
      empty database the views compute no verdicts, so the same views are also timed on a second
      database that holds only the report's own attestations: the ratio to those is what the
      database's size alone costs.

usage: python bench/scale.py [--attestations N] [--no-views] [--keep DIR]
       python bench/scale.py --attestations 1020000 --no-views     the storage figure of target 3
"""
import argparse
import base64
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from post_build_hook import NIX_BASE32, STORE_DIR  # noqa: E402
from closure import PACKAGES, generate_sbom  # noqa: E402
from report import closure_paths  # noqa: E402
from served import cpu_seconds, create_builder, start_server  # noqa: E402

BATCH_SIZE = 10_000
BUILDERS = ("a", "b", "c")
DISAGREEING = 20  # the third builder disagrees on 1 path in this many
REPORT_PATHS = 20_000
VIEWS = {"HTML": "text/html", "text": "text/plain", "JSON": "application/json",
         "CycloneDX": "application/vnd.cyclonedx+json"}
FROM_RFC4648 = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", NIX_BASE32.encode())


# ---------------------------------------------------------------- request bodies, made cheaply

def random_digests(count, length=32):
    """`count` random nix base32 strings of `length` characters (a multiple of 8)."""
    text = base64.b32encode(os.urandom(count * length * 5 // 8)).translate(FROM_RFC4648).decode()
    return [text[start:start + length] for start in range(0, count * length, length)]


def random_nar_hashes(count):
    """Random 'sha256:<52 nix base32>': 52 digits hold 256 bits when the first is 0 or 1."""
    return ["sha256:" + "01"[int(digits[0] in "0123456789abcdfg")] + digits[1:52] for digits in random_digests(count, 56)]


def package_name(number):
    return f"{PACKAGES[number % len(PACKAGES)]}-{number // len(PACKAGES) % 1000}.{number % 7}.{number % 11}"


def generated_paths(start, count):
    """[(out_path, drv_path)] of new random paths numbered start…"""
    outs, drvs = random_digests(count), random_digests(count)
    return [(f"{STORE_DIR}/{out}-{package_name(start + n)}", f"{STORE_DIR}/{drv}-{package_name(start + n)}.drv")
            for n, (out, drv) in enumerate(zip(outs, drvs))]


def bodies_for(paths):
    """{builder: JSON body} attesting these paths, the third builder disagreeing on 1 in DISAGREEING."""
    agreed, other = random_nar_hashes(len(paths)), random_nar_hashes(len(paths))
    bodies = {}
    for builder in BUILDERS:
        items = []
        for number, (out_path, drv_path) in enumerate(paths):
            nar_hash = other[number] if builder == BUILDERS[-1] and number % DISAGREEING == 0 else agreed[number]
            signature = f"bench-{builder}-1:{base64.b64encode(os.urandom(64)).decode()}"
            items.append(f'{{"drv_path":"{drv_path}","output_path":"{out_path}","output_hash":"{nar_hash}",'
                         f'"output_sig":"{signature}","nar_size":{1024 + number}}}')
        bodies[builder] = ("[" + ",".join(items) + "]").encode()
    return bodies


# ---------------------------------------------------------------- the server

class Server:
    def __init__(self, db):
        self.db = db
        self.process, self.url = start_server(db)
        self.tokens = {builder: create_builder(db, builder) for builder in (*BUILDERS, "single")}
        self.session = requests.Session()

    def post(self, builder, path, body):
        response = self.session.post(self.url + path, data=body, headers={
            "Authorization": f"Bearer {self.tokens[builder]}", "Content-Type": "application/json"})
        checked(response)
        return response

    def stop(self):
        self.session.close()
        self.process.terminate()
        self.process.wait(timeout=30)


def checked(response):
    if response.status_code != 200:
        sys.exit(f"bench: {response.request.method} {response.url} -> {response.status_code}: {response.text[:300]}")
    return response


class Ingest:
    """Posts batches, timing only the requests, and prints the rate of every million: per second of
    requests, and per second of the server's CPU time (which other processes on the machine do not change)."""

    def __init__(self, server):
        self.server, self.count, self.seconds, self.million_seconds, self.rates = server, 0, 0.0, 0.0, []
        self.million_cpu = cpu_seconds(server.process.pid)

    def post_paths(self, paths):
        for start in range(0, len(paths), BATCH_SIZE):
            for builder, body in bodies_for(paths[start:start + BATCH_SIZE]).items():
                began = time.perf_counter()
                accepted = self.server.post(builder, "/attestations", body).json()["accepted"]
                elapsed = time.perf_counter() - began
                self.tally(accepted, elapsed)

    def tally(self, accepted, elapsed):
        before = self.count
        self.count += accepted
        self.seconds += elapsed
        self.million_seconds += elapsed
        if self.count // 1_000_000 > before // 1_000_000:
            count = self.count - len(self.rates) * 1_000_000
            cpu = cpu_seconds(self.server.process.pid)
            self.rates.append(count / self.million_seconds)
            print(f"(a) million {len(self.rates):3d}: {self.rates[-1]:8.0f} attestations/s,"
                  f" {count / (cpu - self.million_cpu):8.0f} per second of the server's CPU", flush=True)
            self.million_seconds, self.million_cpu = 0.0, cpu


# ---------------------------------------------------------------- views

def view_times(server, sbom, labels):
    """{what: seconds}: a single POST, each report view first after a PUT (best of 3), /suggest (median of 5)."""
    owner = {"Authorization": f"Bearer {server.tokens[BUILDERS[0]]}"}
    report_url = f"{server.url}/reports/scale"
    times = {"single POST": single_post_time(server)}
    for view, accept in VIEWS.items():
        best = None
        for _ in range(3):
            # A new label each time, so the PUT writes and the view after it is cold.
            checked(server.session.put(report_url, data=sbom, params={"revision": f"scale-{next(labels)}"},
                                       headers={**owner, "Content-Type": "application/json"}))
            began = time.perf_counter()
            checked(server.session.get(report_url, headers={"Accept": accept})).content
            best = min(best or 1e9, time.perf_counter() - began)
        times[f"GET as {view}"] = best
    suggest = []
    for _ in range(5):
        began = time.perf_counter()
        checked(server.session.get(report_url + "/suggest", headers=owner)).content
        suggest.append(time.perf_counter() - began)
    times["GET /suggest"] = statistics.median(suggest)
    return times


def single_post_time(server, repeat=31):
    times = []
    for out_path, drv_path in generated_paths(0, repeat):
        body = json.dumps([{"output_path": out_path, "output_hash": random_nar_hashes(1)[0], "output_sig": "",
                            "nar_size": 1024}]).encode()
        began = time.perf_counter()
        server.post("single", f"/attestation/{drv_path[len(STORE_DIR) + 1:-len('.drv')]}", body)
        times.append(time.perf_counter() - began)
    return statistics.median(times)


# ---------------------------------------------------------------- storage

def storage(db, attestations):
    """Prints the file size after a checkpoint, per attestation, and the bytes of each table and index."""
    with sqlite3.connect(db) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        try:
            parts = conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name ORDER BY 2 DESC").fetchall()
        except sqlite3.OperationalError:
            parts = []
    size = os.path.getsize(db) + (os.path.getsize(f"{db}-wal") if os.path.exists(f"{db}-wal") else 0)
    print(f"(b) {attestations} attestations: {size / 2**20:.0f} MiB, {size / attestations:.0f} bytes per attestation"
          f"  (target <= 320 at 1,020,000)", flush=True)
    for name, part in parts[:10]:
        print(f"      {name:32s} {part / attestations:6.1f} bytes per attestation", flush=True)


def report_only_times(directory, sbom, report_paths, labels):
    """view_times on a database of its own that holds only the report's attestations."""
    server = Server(directory / "report-only.db")
    try:
        Ingest(server).post_paths(report_paths)
        return view_times(server, sbom, labels)
    finally:
        server.stop()


def run(args, directory):
    db = directory / "hashes.db"
    server = Server(db)
    try:
        ingest = Ingest(server)
        labels = iter(range(1, 1_000_000))
        start_times, report_paths = None, []
        paths_total = -(-args.attestations // len(BUILDERS))  # at least that many
        if args.views:
            sbom_document = generate_sbom(REPORT_PATHS)
            sbom = json.dumps(sbom_document).encode()
            report_paths = list(closure_paths(sbom_document).items())
            start_times = view_times(server, sbom, labels)
            print("(c) on the empty database: " + ", ".join(f"{what} {seconds * 1000:.0f} ms"
                                                           for what, seconds in start_times.items()), flush=True)
            same_work_times = report_only_times(directory, sbom, report_paths, labels)
            print(f"(c) on a database of only the report's {len(report_paths) * len(BUILDERS)} attestations: "
                  + ", ".join(f"{what} {seconds * 1000:.0f} ms" for what, seconds in same_work_times.items()), flush=True)
        made, block = 0, BATCH_SIZE * 10
        while made < paths_total:
            count = min(block, paths_total - made)
            # The report's paths in proportion, so that their rows lie all over the file, as they would.
            share = report_paths[len(report_paths) * made // paths_total:len(report_paths) * (made + count) // paths_total]
            ingest.post_paths(share + generated_paths(made, count - len(share)))
            made += count
        print(f"(a) {ingest.count} attestations in {ingest.seconds:.0f} s of requests: {ingest.count / ingest.seconds:.0f}/s"
              f" overall, slowest million {min(ingest.rates, default=0):.0f}/s  (target >= 20000)", flush=True)
        storage(db, ingest.count)
        if start_times is not None:
            end_times = view_times(server, sbom, labels)
            print(f"(c) at {ingest.count} attestations (ratio to the start, target <= 1.5; and to the same views"
                  " on the report's attestations alone):", flush=True)
            for what, seconds in end_times.items():
                print(f"      {what:22s} {seconds * 1000:8.1f} ms  {start_times[what] * 1000:8.1f} ms at the start"
                      f"  ratio {seconds / start_times[what]:.2f}  {same_work_times[what] * 1000:8.1f} ms on the"
                      f" report's alone  ratio {seconds / same_work_times[what]:.2f}", flush=True)
    finally:
        server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attestations", type=int, default=10_000_000, help="how many (default 10,000,000)")
    parser.add_argument("--no-views", dest="views", action="store_false", help="only ingest and measure the file")
    parser.add_argument("--keep", type=Path, help="build the database in this directory and keep it")
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        run(args, args.keep)
        return
    with tempfile.TemporaryDirectory(prefix="hash-collection-scale-") as directory:
        run(args, Path(directory))


if __name__ == "__main__":
    main()
