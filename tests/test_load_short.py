"""The load benchmark's core for 10 seconds against the real server: 16 clients
with the full traffic mix on a 2,000-path report, with zero errors and no lost writes.
The 60-second, 20,000-path version is `python bench/load.py`."""
import importlib.util
import sys

import pytest

from support import REPO, ServerProcess

SECONDS = 10
PATHS = 2_000
CLIENTS = 16


def load_module():
    sys.path.insert(0, str(REPO / "bench"))  # load.py imports its neighbour served.py
    spec = importlib.util.spec_from_file_location("load", REPO / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load():
    return load_module()


@pytest.fixture(scope="module")
def finished_run(load, tmp_path_factory):
    """One run, shared by the checks below: `python web.py` on a fresh database, as in the benchmark."""
    server = ServerProcess(tmp_path_factory.mktemp("load") / "hashes.db").start()
    try:
        tokens = load.create_builders(server.db, CLIENTS)
        report_paths = load.define_report(server.url, tokens[0], PATHS)
        results, _elapsed = load.run_load(server.url, tokens, report_paths, SECONDS, CLIENTS)
    finally:
        server.stop()
    return load, server, tokens, results


def test_ten_second_load_run_has_no_errors(finished_run):
    _load, _server, _tokens, results = finished_run
    assert results.errors == []


def test_ten_second_load_run_loses_no_acknowledged_write(finished_run):
    load, server, tokens, results = finished_run
    lost, _unacknowledged = load.missing_writes(server.db, tokens, results.acknowledged)
    assert results.acknowledged and lost == 0


def test_ten_second_load_run_exercises_every_kind_of_request(finished_run):
    _load, _server, _tokens, results = finished_run
    assert set(results.latencies) == {"single", "batch", "suggest", "report text/html", "report text/plain",
                                      "report application/json", "report application/vnd.cyclonedx+json"}
