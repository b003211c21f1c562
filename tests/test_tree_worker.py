"""The tree worker: a process that lays out an SBOM upload's display tree while the request thread parses the rest.

The worker is a real process (spawned, as web.py starts it); these tests run it in-process apps with TREE_WORKER on.
The end-to-end tests run it too, through web.py, for every report they define.
"""
import contextlib
import concurrent.futures
import concurrent.futures.process
import json
import os
import signal
import sqlite3

import pytest
import requests

import sbom_samples as samples
import web
from attestation_samples import create_user_in_process
from support import bearer, wait_until

CLOSURE = samples.nix_build_sbom(samples.DIAMOND)


def upload_memory_files():
    """The upload files in memory (web.upload_memory_file) this process holds open."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:hash-collection-upload"):
                held.append(fd)
    return held


@pytest.fixture
def worker_app(tmp_path):
    app = web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True, "TREE_WORKER": True})
    yield app
    app.extensions["report_removals"].wait()
    worker = app.extensions["tree_worker"]
    if worker.executor is not None:
        worker.executor.shutdown(wait=True)


def stored_tree(app, name):
    conn = sqlite3.connect(app.config["DATABASE"])
    try:
        return conn.execute("SELECT tree FROM reports WHERE name = ?", (name,)).fetchone()[0]
    finally:
        conn.close()


def tree_laid_out_here(sbom):
    return web.report_contents("application/json", json.dumps(sbom).encode(), None, 1000, 1000)[1].tree_json()


def token(app, name="owner"):
    return create_user_in_process(app.config["DATABASE"], name)


def test_a_report_defined_through_the_worker_has_the_tree_the_request_thread_lays_out(worker_app):
    worker = worker_app.extensions["tree_worker"]
    laid_out = []
    real_lay_out = worker.lay_out
    worker.lay_out = lambda *args: laid_out.append(real_lay_out(*args)) or laid_out[-1]
    response = worker_app.test_client().put("/reports/life", json=CLOSURE.sbom, headers=bearer(token(worker_app)))
    assert response.status_code == 200, response.get_json()
    assert [type(tree) for tree in laid_out] == [web.WorkerTree]
    assert laid_out[0].checked.result() is None
    assert laid_out[0].laid_out.result() == tree_laid_out_here(CLOSURE.sbom)
    assert stored_tree(worker_app, "life") == tree_laid_out_here(CLOSURE.sbom)
    wait_until(lambda: not upload_memory_files(), what="the upload's file in memory closed")


def test_path_info_is_laid_out_by_the_worker(worker_app):
    paths = sorted(CLOSURE.all_paths)
    path_info = [{"path": path, "references": paths[position + 1:position + 2]} for position, path in enumerate(paths)]
    worker = worker_app.extensions["tree_worker"]
    laid_out = []
    real_lay_out = worker.lay_out
    worker.lay_out = lambda *args: laid_out.append(real_lay_out(*args)) or laid_out[-1]
    response = worker_app.test_client().put("/reports/life", json=path_info, headers=bearer(token(worker_app)))
    assert response.status_code == 200, response.get_json()
    expected = web.report_contents("application/json", json.dumps(path_info).encode(), None, 1000, 1000)[1].tree_json()
    assert laid_out[0].laid_out.result() == expected == stored_tree(worker_app, "life")


def test_nix_s_text_formats_are_laid_out_by_the_request_thread(worker_app):
    worker = worker_app.extensions["tree_worker"]
    worker.lay_out = lambda *args: pytest.fail("text sent to the tree worker")
    paths = "".join(path + "\n" for path in sorted(CLOSURE.all_paths))
    response = worker_app.test_client().put("/reports/life", data=paths, content_type="text/x-nix-paths",
                                            headers=bearer(token(worker_app)))
    assert response.status_code == 200, response.get_json()


def test_too_many_edges_found_by_the_worker_are_refused_naming_the_limit_and_nothing_is_stored(tmp_path):
    app = web.create_app({"DATABASE": str(tmp_path / "app.db"), "TESTING": True, "TREE_WORKER": True,
                          "MAX_REPORT_EDGES": 2})
    try:
        owner = token(app)
        response = app.test_client().put("/reports/life", json=CLOSURE.sbom, headers=bearer(owner))
        conn = sqlite3.connect(app.config["DATABASE"])
        try:
            counts = [conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in
                      ("reports", "report_paths", "reported_paths", "revision_components", "revision_trees")]
        finally:
            conn.close()
    finally:
        app.extensions["tree_worker"].executor.shutdown(wait=True)
    assert response.status_code == 413
    assert "more than 2 distinct dependency edges" in response.get_json()["error"]
    assert counts == [0, 0, 0, 0, 0]  # not even the rows reports share
    assert not upload_memory_files()


def test_an_upload_whose_worker_was_killed_gets_its_tree_all_the_same(worker_app):
    client, owner = worker_app.test_client(), bearer(token(worker_app))
    worker = worker_app.extensions["tree_worker"]
    worker.start()
    wait_until(lambda: worker.executor._processes, what="the worker started")
    (pid,) = list(worker.executor._processes)
    os.kill(pid, signal.SIGKILL)
    for label in ("after-kill", "after-restart"):
        response = client.put(f"/reports/life?revision={label}", json=CLOSURE.sbom, headers=owner)
        assert response.status_code == 200, response.get_json()
        assert stored_tree(worker_app, "life") == tree_laid_out_here(CLOSURE.sbom)
    assert pid not in worker.executor._processes  # a new worker, for the uploads after the one that found it dead


@pytest.mark.parametrize("failure", [concurrent.futures.process.BrokenProcessPool("killed"), MemoryError()],
                         ids=["worker killed", "worker out of memory"])
@pytest.mark.parametrize("checked_too", [True, False], ids=["failed checking the edges", "failed laying out"])
def test_a_tree_the_worker_could_not_lay_out_is_laid_out_by_the_request_thread(failure, checked_too):
    failed, checked = concurrent.futures.Future(), concurrent.futures.Future()
    failed.set_exception(failure)
    checked.set_result(None)
    upload = ("application/json", json.dumps(CLOSURE.sbom).encode(), None, 1000, 1000)
    tree = web.WorkerTree(failed if checked_too else checked, failed, upload)
    tree.edges_checked()
    assert tree.tree() == tree_laid_out_here(CLOSURE.sbom)


class RecordedFuture(concurrent.futures.Future):
    """A Future that remembers how long each caller would wait for it."""

    def __init__(self):
        super().__init__()
        self.timeouts = []

    def result(self, timeout=None):
        self.timeouts.append(timeout)
        return super().result(timeout)


def test_a_worker_that_does_not_check_in_time_is_not_waited_for_again(monkeypatch):
    monkeypatch.setattr(web, "TREE_WORKER_TIMEOUT_S", 0.05)
    checked, laid_out = RecordedFuture(), RecordedFuture()  # neither ever done
    upload = ("application/json", json.dumps(CLOSURE.sbom).encode(), None, 1000, 1000)
    tree = web.WorkerTree(checked, laid_out, upload)
    tree.edges_checked()
    assert tree.tree() == tree_laid_out_here(CLOSURE.sbom)
    assert len(checked.timeouts) == 1 and laid_out.timeouts == []


def test_the_check_and_the_tree_share_one_deadline(monkeypatch):
    monkeypatch.setattr(web, "TREE_WORKER_TIMEOUT_S", 0.05)
    checked, laid_out = RecordedFuture(), RecordedFuture()
    checked.set_result(None)
    upload = ("application/json", json.dumps(CLOSURE.sbom).encode(), None, 1000, 1000)
    assert web.WorkerTree(checked, laid_out, upload).tree() == tree_laid_out_here(CLOSURE.sbom)
    assert len(laid_out.timeouts) == 1 and 0 <= laid_out.timeouts[0] < 0.05  # what is left of the one deadline


def test_what_the_worker_refuses_in_the_edges_is_refused():
    refused, never = concurrent.futures.Future(), concurrent.futures.Future()
    refused.set_exception(web.ReportTooLarge("SBOM: more than 2 distinct dependency edges"))
    tree = web.WorkerTree(refused, never, ("application/json", b"{}", None, 1000, 1000))
    for step in (tree.edges_checked, tree.tree):
        with pytest.raises(web.ReportTooLarge, match="more than 2"):
            step()


class HeldExecutor:
    """An executor whose jobs never run: the test settles their Futures, or refuses them from the nth on."""

    def __init__(self, refused_from=None, error=RuntimeError("cannot schedule new futures after shutdown")):
        self.futures, self.refused_from, self.error = [], refused_from, error

    def submit(self, *_job):
        if self.refused_from is not None and len(self.futures) >= self.refused_from:
            raise self.error
        self.futures.append(concurrent.futures.Future())
        return self.futures[-1]

    def shutdown(self, wait=True):
        pass


def test_the_upload_s_file_in_memory_is_closed_once_the_worker_has_checked_it_not_after_the_layout(worker_app):
    worker = worker_app.extensions["tree_worker"]
    worker.executor = executor = HeldExecutor()
    tree = worker.lay_out(("application/json", b"{}", None, 1000, 1000))
    checked, laid_out = executor.futures
    assert tree is not None and len(upload_memory_files()) == 1
    checked.set_result(None)
    assert upload_memory_files() == [] and worker.busy
    laid_out.set_result("[]")
    assert not worker.busy


@pytest.mark.parametrize("refused_from", [0, 1], ids=["the check refused", "the layout refused"])
def test_an_upload_the_worker_refuses_leaves_no_file_in_memory_open(worker_app, refused_from):
    worker = worker_app.extensions["tree_worker"]
    worker.executor = executor = HeldExecutor(refused_from)
    with pytest.raises(RuntimeError, match="after shutdown"):
        worker.lay_out(("application/json", b"{}", None, 1000, 1000))
    for future in executor.futures:  # the check asked for runs, and reads the file, before it is closed
        assert upload_memory_files() != []
        future.set_exception(concurrent.futures.CancelledError())
    assert upload_memory_files() == [] and not worker.busy


def test_a_broken_worker_is_not_kept_and_leaves_no_file_in_memory_open(worker_app):
    worker = worker_app.extensions["tree_worker"]
    worker.executor = HeldExecutor(0, concurrent.futures.process.BrokenProcessPool("killed"))
    assert worker.lay_out(("application/json", b"{}", None, 1000, 1000)) is None
    assert worker.executor is None and upload_memory_files() == [] and not worker.busy


def test_an_upload_that_finds_the_worker_busy_lays_out_its_tree_itself(worker_app):
    worker = worker_app.extensions["tree_worker"]
    worker.busy = True  # another upload's tree is being laid out
    assert worker.lay_out(("application/json", b"{}", None, 1000, 1000)) is None
    assert not upload_memory_files()
    response = worker_app.test_client().put("/reports/life", json=CLOSURE.sbom, headers=bearer(token(worker_app)))
    assert response.status_code == 200
    assert stored_tree(worker_app, "life") == tree_laid_out_here(CLOSURE.sbom)


def test_an_upload_that_cannot_make_its_file_in_memory_lays_out_its_tree_itself(worker_app, monkeypatch):
    def refused(_name):
        raise PermissionError("memfd_create: not allowed here")
    monkeypatch.setattr(os, "memfd_create", refused)
    worker = worker_app.extensions["tree_worker"]
    assert worker.lay_out(("application/json", b"{}", None, 1000, 1000)) is None
    response = worker_app.test_client().put("/reports/life", json=CLOSURE.sbom, headers=bearer(token(worker_app)))
    assert response.status_code == 200
    assert stored_tree(worker_app, "life") == tree_laid_out_here(CLOSURE.sbom)


def path_info_of(closure):
    """A path-info list of the closure's paths, each referencing the next two (the last ones wrap around)."""
    paths = sorted(closure.all_paths)
    return [{"path": path, "references": [paths[(position + step) % len(paths)] for step in (1, 2)]}
            for position, path in enumerate(paths)]


@pytest.mark.parametrize("upload", [CLOSURE.sbom, samples.nix_build_sbom(samples.CYCLE, property_name="nix:output_path").sbom,
                                    path_info_of(CLOSURE)], ids=["diamond", "cycle", "path-info"])
def test_web_py_serves_the_tree_an_app_without_the_worker_lays_out(server, client, tokens, upload):
    """End to end: web.py lays out trees in its worker; the in-process app (TREE_WORKER off) in the request thread."""
    text = {"Accept": "text/plain"}
    response = requests.put(f"{server.url}/reports/life", json=upload,
                            headers=bearer(server.create_user("owner")), timeout=30)
    assert response.status_code == 200, response.text
    assert client.put("/reports/life", json=upload, headers=bearer(tokens("owner"))).status_code == 200
    served = requests.get(f"{server.url}/reports/life", headers=text, timeout=30).text
    assert served == client.get("/reports/life", headers=text).get_data(as_text=True)
    assert "(shown above)" in served
