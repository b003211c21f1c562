#!/usr/bin/env python3
"""Load benchmark (issue 8): concurrent clients against `python web.py` (waitress)
on a large report, with the traffic mix builders and readers produce together:

  70% single attestations (POST /attestation/<drv>), 10% batches of 100 (POST /attestations),
  15% report GETs in every format (HTML, text, JSON summary, CycloneDX), 5% suggestions.

It prints requests per second and p50/p99 latency per kind, the error count, the
server's peak memory (VmHWM) and its RSS at the start and end of the run, and
afterwards checks in the database that every acknowledged attestation was stored.
Only loopback traffic; the run is bounded by --seconds.

usage: python bench/load.py [--seconds 60] [--paths 20000] [--clients 16]
"""
import argparse
import contextlib
import io
import json
import random
import sqlite3
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from post_build_hook import NIX_BASE32, STORE_DIR, nix_base32_encode  # noqa: E402
from closure import generate_sbom  # noqa: E402
from served import memory_kib, start_server  # noqa: E402
from web import digest_match, path_key, stored_hash  # noqa: E402

REPORT = "load"
BATCH_SIZE = 100
REPORT_FORMATS = ["text/html", "text/plain", "application/json", "application/vnd.cyclonedx+json"]
MIX = [("single", 70), ("batch", 10), ("report", 15), ("suggest", 5)]
REQUEST_TIMEOUT = 120  # a request taking longer than this counts as an error


# ---------------------------------------------------------------- setup

def create_builders(db, count):
    """One builder per client, through create_user's own code (in this process, for speed)."""
    import create_user
    tokens = []
    for number in range(count):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert create_user.main([f"load-{number}", "--db", str(db)]) == 0
        tokens.append(printed.getvalue().split()[-1])
    return tokens


def define_report(url, token, paths):
    """PUT the generated report; returns its output paths."""
    sbom = generate_sbom(paths)
    response = requests.put(f"{url}/reports/{REPORT}", data=json.dumps(sbom), timeout=REQUEST_TIMEOUT,
                            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    response.raise_for_status()
    summary = requests.get(f"{url}/reports/{REPORT}", headers={"Accept": "application/json"}, timeout=REQUEST_TIMEOUT)
    return sorted(summary.json()["paths"])


# ---------------------------------------------------------------- the clients

def random_digest(rng):
    return "".join(rng.choice(NIX_BASE32) for _ in range(32))


def random_nar_hash(rng):
    return "sha256:" + nix_base32_encode(rng.randbytes(32))


class Results:
    """Latencies per kind, errors, and every attestation the server acknowledged."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latencies = defaultdict(list)
        self.errors = []
        self.acknowledged = []  # (token index, out path, nar hash)

    def record(self, kind, seconds, error=None, attested=()):
        with self.lock:
            self.latencies[kind].append(seconds)
            if error:
                self.errors.append(f"{kind}: {error}")
            else:
                self.acknowledged.extend(attested)


def client_loop(url, tokens, client_number, report_paths, stop_at, results, seed):
    rng = random.Random(seed)
    token = tokens[client_number]
    auth = {"Authorization": f"Bearer {token}"}
    kinds, weights = zip(*MIX)
    with requests.Session() as session:
        format_turn = client_number
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            attested, started, error = [], time.perf_counter(), None
            try:
                if kind == "single":
                    out_path, nar_hash = rng.choice(report_paths), random_nar_hash(rng)
                    response = session.post(f"{url}/attestation/{random_digest(rng)}-load", headers=auth,
                                            timeout=REQUEST_TIMEOUT,
                                            json=[{"output_path": out_path, "output_hash": nar_hash, "output_sig": ""}])
                    attested = [(client_number, out_path, nar_hash)]
                elif kind == "batch":
                    items = [{"drv_path": f"{STORE_DIR}/{random_digest(rng)}-load.drv", "output_path": rng.choice(report_paths),
                              "output_hash": random_nar_hash(rng), "output_sig": ""} for _ in range(BATCH_SIZE)]
                    response = session.post(f"{url}/attestations", json=items, headers=auth, timeout=REQUEST_TIMEOUT)
                    attested = [(client_number, item["output_path"], item["output_hash"]) for item in items]
                elif kind == "report":
                    accept = REPORT_FORMATS[format_turn % len(REPORT_FORMATS)]
                    format_turn += 1
                    kind = f"report {accept}"
                    response = session.get(f"{url}/reports/{REPORT}", headers={"Accept": accept}, timeout=REQUEST_TIMEOUT)
                else:
                    response = session.get(f"{url}/reports/{REPORT}/suggest", headers=auth, timeout=REQUEST_TIMEOUT)
                response.content  # the whole body, streamed pages included
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}: {response.text[:200]}"
            except Exception as exception:  # a failed request, or a bug here: either way the run is not clean
                error = f"{exception.__class__.__name__}: {exception}"
            results.record(kind, time.perf_counter() - started, error, attested)


def run_load(url, tokens, report_paths, seconds, clients=16, seed=0):
    """Runs `clients` concurrent clients for `seconds`; returns (Results, elapsed seconds)."""
    results = Results()
    stop_at = time.monotonic() + seconds
    threads = [threading.Thread(target=client_loop, daemon=True,
                                args=(url, tokens, number % len(tokens), report_paths, stop_at, results, seed * 1000 + number))
               for number in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + REQUEST_TIMEOUT + 10)
    return results, time.monotonic() - started


# ---------------------------------------------------------------- checks

class RssSampler:
    """Samples a process's RSS once a second in the background, to show whether it keeps growing."""

    def __init__(self, pid):
        self.pid = pid
        self.samples = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self):
        while not self.stopped.wait(1.0):
            with contextlib.suppress(OSError, AttributeError):
                self.samples.append(memory_kib(self.pid, "VmRSS"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        return False

    def thirds(self):
        size = max(1, len(self.samples) // 3)
        parts = [self.samples[:size], self.samples[size:-size] or self.samples, self.samples[-size:]]
        return [sum(part) / len(part) for part in parts] if self.samples else []


def missing_writes(db, tokens, acknowledged):
    """(acknowledged attestations not in the database, stored attestations nobody was told about)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        ids = {row[0]: row[1] for row in conn.execute("SELECT name, id FROM builders")}
        builder_ids = [ids[f"load-{number}"] for number in range(len(tokens))]
        conn.execute("CREATE TEMP TABLE expected (builder_id INTEGER, digest BLOB, name TEXT, nar_hash BLOB)")
        conn.executemany("INSERT INTO expected VALUES (?, ?, ?, ?)",
                         ((builder_ids[client], *path_key(path), stored_hash(nar_hash))
                          for client, path, nar_hash in acknowledged))
        lost = conn.execute(
            "SELECT COUNT(*) FROM expected WHERE NOT EXISTS (SELECT 1 FROM attestations a JOIN store_paths p"
            f" ON p.id = a.path_id WHERE a.builder_id = expected.builder_id AND {digest_match('p', 'expected.digest')}"
            " AND p.name = expected.name AND a.nar_hash = expected.nar_hash)").fetchone()[0]
        stored = conn.execute("SELECT COUNT(*) FROM attestations").fetchone()[0]
        expected = conn.execute("SELECT COUNT(*) FROM (SELECT DISTINCT * FROM expected)").fetchone()[0]
    return lost, stored - (expected - lost)


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def summary_lines(results, elapsed):
    lines = [f"{'kind':<44} {'requests':>9} {'per s':>8} {'p50 ms':>8} {'p99 ms':>8}"]
    for kind in sorted(results.latencies):
        latencies = results.latencies[kind]
        lines.append(f"{kind:<44} {len(latencies):>9} {len(latencies) / elapsed:>8.1f} "
                     f"{1000 * percentile(latencies, 0.5):>8.1f} {1000 * percentile(latencies, 0.99):>8.1f}")
    total = sum(len(latencies) for latencies in results.latencies.values())
    lines.append(f"{'all':<44} {total:>9} {total / elapsed:>8.1f}")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--paths", type=int, default=20_000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--warm-up", type=float, default=10,
                        help="seconds of the same load before measuring, so caches fill first (default: 10)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hash-collection-load-") as directory:
        db = Path(directory) / "hashes.db"
        log = open(Path(directory) / "server.log", "w+")
        process, url = start_server(db, stderr=log)
        try:
            tokens = create_builders(db, args.clients)
            report_paths = define_report(url, tokens[0], args.paths)
            print(f"report {REPORT!r}: {len(report_paths)} paths; {args.clients} clients for {args.seconds:g} s "
                  f"against {url} (pid {process.pid})", flush=True)
            rss_cold = memory_kib(process.pid, "VmRSS")
            warm_up, _ = run_load(url, tokens, report_paths, args.warm_up, args.clients, seed=1)
            rss_start = memory_kib(process.pid, "VmRSS")
            with RssSampler(process.pid) as sampler:
                results, elapsed = run_load(url, tokens, report_paths, args.seconds, args.clients)
            rss_end = memory_kib(process.pid, "VmRSS")
            peak = memory_kib(process.pid, "VmHWM")
        finally:
            process.terminate()
            process.wait(timeout=30)
        acknowledged = warm_up.acknowledged + results.acknowledged
        lost, unacknowledged = missing_writes(db, tokens, acknowledged)
        log.seek(0)
        server_log = log.read()
        log.close()
    print("\n".join(summary_lines(results, elapsed)))
    errors = warm_up.errors + results.errors
    print(f"errors: {len(errors)} (warm-up included)")
    for error in errors[:10]:
        print(f"  {error}")
    print(f"server memory: peak (VmHWM) {peak / 1024:.0f} MiB; RSS before warm-up {rss_cold / 1024:.0f} MiB, "
          f"at start {rss_start / 1024:.0f} MiB, at end {rss_end / 1024:.0f} MiB ({(rss_end - rss_start) / 1024:+.0f} MiB); "
          f"RSS per third of the run (MiB, mean): {' / '.join(f'{value / 1024:.0f}' for value in sampler.thirds())}")
    print(f"server log: {server_log.count('Traceback')} tracebacks, "
          f"{server_log.count('Task queue depth')} waitress queue-depth warnings")
    print(f"writes: {len(acknowledged)} attestations acknowledged, {lost} of them missing from the database; "
          f"{unacknowledged} stored without acknowledgement")
    return 0 if not errors and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
