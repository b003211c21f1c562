#!/usr/bin/env python3
"""Report benchmark: a 20,000-path closure against `python web.py` on a free port
with a temporary database. Half of the paths get attestations from three builders,
some of them disagreeing. Then, in one run, it times

  json.load of the SBOM file, PUT /reports/<name>, GET /reports/<name> as HTML,
  text, JSON and CycloneDX, and GET /reports/<name>/suggest,

prints each time and its ratio to json.load; then json.load and PUT of the same closure as
`nix path-info --json -r` prints it (Content-Type application/x-nix-path-info+json); then both json.loads again, to
show whether the machine's speed held during the run (the ratios are only as sure as that); and reads the peak
resident memory (VmHWM) of the server and of each worker process it started from /proc/<pid>/status at the end.

Every timed PUT really writes: each has a new revision label (the same body again without one is a no-op).
Each format's PUT is timed twice: as a new revision of an existing report (whose replaced copy is removed),
and as a new report under a name not used before. The SBOM's is timed a third time as the first report of
another closure, attested as the first, none of whose paths any report lists yet: the server then works out
who attested each path (reported_paths), where the other PUTs find that kept already.
Every timed GET is cold: the first view of that report and format after an untimed PUT of a new revision,
so a server that caches views still renders each one that is timed.

Targets (issue 17): PUT and each cold GET (HTML, text, JSON, CycloneDX) <= 3x json.load, peak RSS <= 200 MB;
(issue 4) /suggest <= 0.5x.
Issue 19: the path-info PUT <= 3x json.load of the path-info file.
Issue 16: GET as HTML and JSON with ?trust=<two of the builders>&min=2 <= 1.2x the same GET without a policy;
GET /changes between two revisions (the second changing 5% of the components) <= 2x json.load.
Each time is the median of --repeat runs (default 3), json.load's of 7, with the server idle. Exit status 1 when a target
is missed.
usage: python bench/report.py [--paths N] [--repeat R]
"""
import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from post_build_hook import nix_base32_encode  # noqa: E402
from closure import generate_path_info, generate_sbom  # noqa: E402
from history import changed_sbom_text  # noqa: E402
from served import child_pids, create_builder, memory_kib, start_server, wait_until_idle  # noqa: E402

BATCH_SIZE = 10_000
BUILDERS = ("bench-a", "bench-b", "bench-c")
REPORT = "bench-closure"
PUT_TARGET = GET_TARGET = 3.0  # issue 17
SUGGEST_TARGET = 0.5
PATH_INFO_TARGET = 3.0  # issue 19: a `nix path-info --json -r` PUT, against json.load of that file
POLICY_TARGET = 1.2  # of the same view without a policy
CHANGES_TARGET = 2.0
VIEWS = (("text/html", "text/html"), ("text/plain", "text/plain"), ("application/json", "application/json"),
         ("CycloneDX", "application/vnd.cyclonedx+json"))
POLICY = {"trust": ",".join(BUILDERS[:2]), "min": "2"}
RSS_TARGET_MB = 200
DRIFT_WARNING = 0.15  # json.load at the end against the start
# json.load's own time varies by a fifth from one run to the next (how much its garbage collection finds to do):
# the ratios' baseline is the median of more runs than the rest.
BASELINE_REPEAT = 7


def write_sbom(path, paths):
    with open(path, "w") as sbom_file:
        json.dump(generate_sbom(paths), sbom_file)


def closure_paths(sbom):
    """Output paths with their drv paths, from the nix-build-sbom properties."""
    paths = {}
    for component in [sbom["metadata"]["component"], *sbom["components"]]:
        properties = {prop["name"]: prop["value"] for prop in component.get("properties", [])}
        out_path = properties.get("nix:out_path") or properties.get("nix:output_path") or component["bom-ref"]
        paths[out_path] = properties.get("nix:drv_path")
    return paths


def nar_hash(rng):
    return "sha256:" + nix_base32_encode(rng.randbytes(32))


def attestation_batches(paths, seed=2):
    """{builder: [serialised batch]}: half the paths, built by all three builders.

    b disagrees with a on 5% of them, c on 10%, so every verdict but 'One build' shows up.
    """
    rng = random.Random(seed)
    chosen = rng.sample(sorted(paths), len(paths) // 2)
    items = {builder: [] for builder in BUILDERS}
    for out_path in chosen:
        agreed = nar_hash(rng)
        for builder, disagreement in zip(BUILDERS, (0.0, 0.05, 0.10)):
            output_hash = nar_hash(rng) if rng.random() < disagreement else agreed
            items[builder].append({"drv_path": paths[out_path], "output_path": out_path,
                                   "output_hash": output_hash, "output_sig": ""})
    return {builder: [json.dumps(builder_items[start:start + BATCH_SIZE]).encode()
                      for start in range(0, len(builder_items), BATCH_SIZE)]
            for builder, builder_items in items.items()}, len(chosen)


# ---------------------------------------------------------------- measuring

def median_time(repeat, run, prepare=lambda: None):
    """The median time of `run`, each run after an untimed `prepare`."""
    times = []
    for _ in range(repeat):
        prepare()
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def post_attestations(session, url, tokens, batches):
    for builder, bodies in batches.items():
        for body in bodies:
            checked_response(session.post(f"{url}/attestations", data=body, headers={
                "Authorization": f"Bearer {tokens[builder]}", "Content-Type": "application/json"}))


def checked_response(response):
    if response.status_code != 200:
        sys.exit(f"bench: {response.request.method} {response.url} -> {response.status_code}: {response.text[:300]}")
    return response


def run(args, directory):
    sbom_file = directory / "sbom.cdx.json"
    write_sbom(sbom_file, args.paths)
    raw_sbom = sbom_file.read_bytes()
    paths = closure_paths(json.loads(raw_sbom))
    batches, attested = attestation_batches(paths)
    db = directory / "hashes.db"
    process, url = start_server(db)
    try:
        tokens = {builder: create_builder(db, builder) for builder in BUILDERS}
        with requests.Session() as session:
            post_attestations(session, url, tokens, batches)
            print(f"closure: {len(paths)} paths, {len(raw_sbom) / 2**20:.1f} MiB of SBOM; "
                  f"{attested} paths attested by {len(BUILDERS)} builders", flush=True)
            report_url = f"{url}/reports/{REPORT}"
            owner = {"Authorization": f"Bearer {tokens[BUILDERS[0]]}"}

            def load():
                with open(sbom_file, "rb") as sbom_stream:
                    json.load(sbom_stream)

            labels = itertools.count(1)

            def put(body=raw_sbom, target=report_url, content_type="application/json"):
                # A new label each time: the same body again without one is a no-op, not a write.
                checked_response(session.put(target, data=body, params={"revision": f"bench-{next(labels)}"},
                                             headers={**owner, "Content-Type": content_type}))

            def get_as(accept, params=None):
                return lambda: checked_response(session.get(report_url, params=params, headers={"Accept": accept})).content

            def changes():
                checked_response(session.get(report_url + "/changes", headers={"Accept": "application/json"})).content

            def suggest():
                checked_response(session.get(report_url + "/suggest", headers=owner)).content

            changed_sbom = changed_sbom_text(raw_sbom.decode(), 0.05, random.Random(5)).encode()

            def two_revisions():
                put()
                put(changed_sbom)

            path_info_file = directory / "path-info.json"
            path_info_file.write_text(json.dumps(generate_path_info(args.paths)))
            raw_path_info = path_info_file.read_bytes()

            def load_path_info():
                with open(path_info_file, "rb") as path_info_stream:
                    json.load(path_info_stream)

            def put_path_info(target=report_url + "-path-info"):
                put(raw_path_info, target, "application/x-nix-path-info+json")

            new_names = itertools.count(1)
            unlisted, seeds = {}, itertools.count(100)

            def attest_unlisted_closure():
                """Another closure of the same size, none of whose paths a report lists yet, attested as the first."""
                document = generate_sbom(args.paths, seed=next(seeds))
                post_attestations(session, url, tokens, attestation_batches(closure_paths(document))[0])
                unlisted["sbom"] = json.dumps(document).encode()

            def new_report_url():
                return f"{report_url}-new-{next(new_names)}"

            # json.load with the server idle: it shares the machine's cores with the client.
            wait_until_idle(process.pid)
            baseline = median_time(BASELINE_REPEAT, load)
            path_info_baseline = median_time(BASELINE_REPEAT, load_path_info)
            put_path_info()  # as with the SBOM, the timed PUTs below add revisions to a report that exists
            put()  # the report must exist before the GETs; the timed PUTs below redefine it
            rows = [("json.load", baseline, None),
                    ("PUT /reports/<name>", median_time(args.repeat, put), PUT_TARGET),
                    ("PUT of a new report", median_time(args.repeat, lambda: put(target=new_report_url())), PUT_TARGET),
                    ("PUT of paths no report lists yet", median_time(
                        args.repeat, lambda: put(unlisted["sbom"], new_report_url()), attest_unlisted_closure), PUT_TARGET)]
            # Every view is cold: the first of that report and format after a new revision (untimed) changed it.
            rows += [(f"cold GET as {what}", median_time(args.repeat, get_as(accept), put), GET_TARGET)
                     for what, accept in VIEWS]
            rows.append(("cold GET /suggest", median_time(args.repeat, suggest, put), SUGGEST_TARGET))
            policy_rows = [(f"cold GET as {what} ?trust=", median_time(args.repeat, get_as(accept, POLICY), put),
                            POLICY_TARGET, next(seconds for name, seconds, _target in rows if name == f"cold GET as {what}"))
                           for what, accept in VIEWS if what in ("text/html", "application/json")]
            rows.append(("cold GET /changes", median_time(args.repeat, changes, two_revisions), CHANGES_TARGET))
            rows = [(*row, baseline) for row in rows] + [
                ("json.load of path-info", path_info_baseline, None, path_info_baseline),
                ("PUT path-info", median_time(args.repeat, put_path_info), PATH_INFO_TARGET, path_info_baseline),
                ("PUT path-info of a new report", median_time(args.repeat, lambda: put_path_info(new_report_url())),
                 PATH_INFO_TARGET, path_info_baseline)]
            # Again at the end: the ratios are only as good as the machine's speed was steady during the run.
            wait_until_idle(process.pid)
            drift = [(what, start, median_time(BASELINE_REPEAT, again)) for what, start, again in (
                ("json.load", baseline, load), ("json.load of path-info", path_info_baseline, load_path_info))]
        rss = memory_kib(process.pid, "VmHWM") / 1024
        workers_rss = [memory_kib(pid, "VmHWM") / 1024 for pid in child_pids(process.pid)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    return rows, policy_rows, drift, rss, workers_rss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", type=int, default=20_000, help="closure size (default 20000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement; the median counts (default 3)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="hash-collection-bench-") as directory:
        rows, policy_rows, drift, rss, workers_rss = run(args, Path(directory))
    missed = []
    for what, seconds, target, baseline in rows:
        ratio = seconds / baseline
        verdict = "" if target is None else f"target <= {target:g}x  {'ok' if ratio <= target else 'MISSED'}"
        if target is not None and ratio > target:
            missed.append(what)
        print(f"{what:38} {seconds * 1000:9.1f} ms  {ratio:6.2f}x json.load  {verdict}")
    for what, seconds, target, without in policy_rows:
        ratio = seconds / without
        if ratio > target:
            missed.append(what)
        print(f"{what:38} {seconds * 1000:9.1f} ms  {ratio:6.2f}x without  target <= {target:g}x"
              f"  {'ok' if ratio <= target else 'MISSED'}")
    for what, start, end in drift:
        change = end / start - 1
        print(f"{what + ', at the end':38} {end * 1000:9.1f} ms  {change:+.0%} against the start"
              + (f"  (the machine's speed changed by more than {DRIFT_WARNING:.0%}: the ratios above are unsure)"
                 if abs(change) > DRIFT_WARNING else ""))
    rss_ok = rss <= RSS_TARGET_MB
    print(f"{'server peak RSS (VmHWM)':38} {rss:9.1f} MB  target <= {RSS_TARGET_MB} MB  {'ok' if rss_ok else 'MISSED'}")
    print(f"{'its worker processes, each (VmHWM)':38} {', '.join(f'{worker:.1f}' for worker in workers_rss)} MB"
          "  (render and tree workers; no target)")
    if not rss_ok:
        missed.append("peak RSS")
    if missed:
        print("missed: " + ", ".join(missed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
