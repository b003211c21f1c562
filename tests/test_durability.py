"""Every attestation the server acknowledged survives `kill -9`; and the
README's first command documents its options."""
import subprocess
import sys
import threading

import requests

from attestation_samples import base32_form, basename_of, batch_item, drv_ident, first_generation, nar_hash_bytes, out_path
from support import REPO, bearer, wait_until


def stored_builders(server, path):
    response = requests.get(f"{server.url}/attestations/by-output/{basename_of(path)}", timeout=10)
    assert response.status_code == 200
    return [(attestation["builder"], attestation["output_hash"]) for attestation in response.json()]


def post_until_stopped(server, token, acknowledged, stop):
    """Posts single attestations until told to stop or the server goes away; records each 2xx."""
    with requests.Session() as session:
        session.headers.update(bearer(token))
        while not stop.is_set():
            attestation = first_generation(out_path(), base32_form(nar_hash_bytes()))
            try:
                response = session.post(f"{server.url}/attestation/{drv_ident()}", json=[attestation], timeout=10)
            except requests.RequestException:
                return
            if 200 <= response.status_code < 300:
                acknowledged.append(attestation)


def test_acknowledged_single_posts_survive_kill_9(server):
    token = server.create_user("alice")
    acknowledged = []
    for _ in range(50):
        attestation = first_generation(out_path(), base32_form(nar_hash_bytes()))
        response = requests.post(f"{server.url}/attestation/{drv_ident()}", json=[attestation],
                                 headers=bearer(token), timeout=10)
        assert response.status_code == 200
        acknowledged.append(attestation)
    server.kill9()
    server.start()
    for attestation in acknowledged:
        assert stored_builders(server, attestation["output_path"]) == [("alice", attestation["output_hash"])]


def test_acknowledged_batch_survives_kill_9(server):
    token = server.create_user("importer")
    items = [batch_item(out_path(), base32_form(nar_hash_bytes()), f"/nix/store/{drv_ident()}.drv") for _ in range(2_000)]
    response = requests.post(f"{server.url}/attestations", json=items, headers=bearer(token), timeout=60)
    assert response.status_code == 200
    server.kill9()
    server.start()
    assert len(requests.get(f"{server.url}/derivations/", timeout=30).json()) == len(items)
    assert stored_builders(server, items[-1]["output_path"]) == [("importer", items[-1]["output_hash"])]


def test_attestations_acknowledged_while_writing_survive_kill_9_mid_stream(server):
    token = server.create_user("alice")
    acknowledged, stop = [], threading.Event()
    writers = [threading.Thread(target=post_until_stopped, args=(server, token, acknowledged, stop)) for _ in range(4)]
    for writer in writers:
        writer.start()
    try:
        wait_until(lambda: len(acknowledged) >= 300, timeout=60, what="300 acknowledged attestations")
        server.kill9()
    finally:
        stop.set()
        for writer in writers:
            writer.join(timeout=30)
    survivors = list(acknowledged)
    server.start()
    for attestation in survivors:
        assert stored_builders(server, attestation["output_path"]) == [("alice", attestation["output_hash"])]


def web_py_help():
    completed = subprocess.run([sys.executable, str(REPO / "web.py"), "--help"], cwd=REPO,
                               capture_output=True, text=True, timeout=30)
    assert completed.returncode == 0
    return completed.stdout


def test_web_py_help_documents_host_port_and_db():
    help_text = web_py_help()
    for option in ("--host", "--port", "--db"):
        assert option in help_text


def test_web_py_help_shows_the_default_address_and_database():
    # The README's first command relies on these defaults: 127.0.0.1:8000 and ./hashes.db.
    help_text = web_py_help()
    for default in ("127.0.0.1", "8000", "hashes.db"):
        assert default in help_text
