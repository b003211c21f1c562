#!/usr/bin/env python3
"""Writes tests/data/version-8.sql and version-8-answers.json: a database as the server at schema
version 8 wrote it, through its own API, and what that server answered about it.

Run once, with a checkout of the last version-8 commit (198930f), from this repository:
  git worktree add /tmp/v8 198930f && .venv/bin/python tests/data/make_version_8_database.py /tmp/v8
tests/test_migrations.py loads the dump, starts today's server on it and asks the same questions.
"""
import base64
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent.parent))

from attestation_samples import base32_form, nar_hash_bytes, nix_key_pair  # noqa: E402
from post_build_hook import basename_of, fingerprint, fixed_output_path, sign_fingerprint  # noqa: E402
from sbom_samples import drv_path, nix_build_sbom  # noqa: E402

ORIGIN = "v8.example.org"
ACCEPTS = {"json": "application/json", "text": "text/plain"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(checkout, db):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(checkout / "web.py"), "--host", "127.0.0.1", "--port", str(port),
                                "--db", str(db)], cwd=checkout, env={**os.environ, "HASH_COLLECTION_LOG_ORIGIN": ORIGIN})
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except requests.RequestException:
            time.sleep(0.1)
    process.kill()
    sys.exit("the version-8 server did not start")


def create_user(checkout, db, *args):
    completed = subprocess.run([str(checkout / "create_user"), *args, "--db", str(db)], cwd=checkout, check=True,
                               env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True)
    return completed.stdout.split()[-1]


def signed(secret, path, nar_hash, nar_size, references):
    return sign_fingerprint(secret, fingerprint(path, nar_hash, nar_size, references))


def attestations(closure, secrets):
    """{builder: [batches]}: verified, unverified, an upgrade, ca, every source, references, a foreign key."""
    root, lib, tool, docs = (closure.out(name) for name in ("app-1.0", "lib-2.1", "tool-0.3", "docs-1"))
    ca = "fixed:r:sha256:" + base32_form(nar_hash_bytes())[7:]
    source = fixed_output_path(ca, "source-1.0.tar.gz")
    agreed, other, lib_hash = (base32_form(nar_hash_bytes()) for _ in range(3))
    alice_root = signed(secrets["alice"], root, agreed, 4096, [lib])
    alice_lib = signed(secrets["alice"], lib, lib_hash, 2048, [])
    foreign_secret, _public = nix_key_pair("elsewhere-1")

    def item(path, nar_hash, **fields):
        return {"output_path": path, "output_hash": nar_hash, "drv_path": drv_path(path[44:]), **fields}
    return {
        "alice": [[item(root, agreed, output_sig=alice_root, nar_size=4096, references=[lib], source="build"),
                   item(lib, lib_hash, output_sig=alice_lib, source="build")],  # no size: stored unverified
                  [item(lib, lib_hash, output_sig=alice_lib, nar_size=2048, references=[], source="build")]],  # upgrade
        "bob": [[item(root, agreed, source="check"), item(lib, lib_hash),
                 item(source, base32_form(nar_hash_bytes()), ca=ca, nar_size=100, references=[], source="cache")]],
        "carol": [[item(root, other, output_sig=signed(foreign_secret, root, other, 4096, [lib]), nar_size=4096,
                        references=[lib]),
                   {"output_path": tool, "output_hash": other, "output_sig": "", "nar_size": 1, "references": [docs]}]],
    }, (root, agreed, other)


def diff_body():
    change = {"path": "stamp", "a": {"type": "regular", "size": 2, "executable": False, "sha256": "a" * 64},
              "b": {"type": "regular", "size": 2, "executable": False, "sha256": "b" * 64}}
    return {"files": {"differing": [change], "totals": {"paths_a": 3, "paths_b": 3, "differing": 1}, "cut": []},
            "diffoscope": "--- a/stamp\n+++ b/stamp\n-1\n+2\n", "tool_versions": {"hash-collection-diff": "1"}}


def fill(url, tokens, closure, batches, diff):
    for builder, requests_of_builder in batches.items():
        for batch in requests_of_builder:
            requests.post(f"{url}/attestations", json=batch, headers=bearer(tokens[builder]),
                          timeout=30).raise_for_status()
    requests.put(f"{url}/reports/r", json=closure.sbom, headers=bearer(tokens["alice"]), timeout=30).raise_for_status()
    path, hash_a, hash_b = diff
    hash_a, hash_b = sorted((hash_a, hash_b))
    requests.put(f"{url}/diffs/{basename_of(path)}/{hash_a}/{hash_b}", json=diff_body(), headers=bearer(tokens["carol"]),
                 timeout=30).raise_for_status()
    return f"/diffs/{basename_of(path)}/{hash_a}/{hash_b}"


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def questions(closure, db, diff_url):
    """The URLs (with the Accept header to send) whose answers must survive the migration."""
    with sqlite3.connect(db) as conn:
        size = conn.execute("SELECT COUNT(*) FROM log_entries").fetchone()[0]
        drv_idents = [ident for (ident,) in conn.execute("SELECT drv_ident FROM derivations")]
        paths = sorted({path for (path,) in conn.execute("SELECT output_path FROM attestations")} | closure.all_paths)
    asked = [("/builders", "json"), ("/derivations/", "json"), ("/reports/r", "json"), ("/reports/r", "text"),
             ("/reports/r/history", "json"), ("/reports/r/pending", "json"), (diff_url, "json"),
             (f"/log/tile/entries/000.p/{size}", "json"), (f"/log/tile/0/000.p/{size}", "json")]
    asked += [(f"/log/proof/inclusion?index={index}&size={size}", "json") for index in range(size)]
    asked += [(f"/derivations/{ident}{full}", "json") for ident in drv_idents for full in ("", "?full=true")]
    for path in paths:
        asked += [(f"/attestations/by-output/{basename_of(path)}", "json"), (f"/outputs/{basename_of(path)}", "json"),
                  (f"/diffs/{basename_of(path)}", "json")]
        asked += [(f"/signatures/{builder}/{basename_of(path)[:32]}.narinfo", "text") for builder in ("alice", "bob", "carol")]
    return asked


def answers(url, asked):
    recorded = []
    for path, accept in asked:
        response = requests.get(url + path, headers={"Accept": ACCEPTS[accept]}, timeout=30)
        recorded.append({"path": path, "accept": accept, "status": response.status_code,
                         "body": base64.b64encode(response.content).decode()})
    checkpoint = requests.get(url + "/log/checkpoint", timeout=30).text.split("\n")[:3]
    return {"checkpoint": checkpoint, "answers": recorded}


def main(argv):
    checkout = Path(argv[1]).resolve()
    with tempfile.TemporaryDirectory() as directory:
        db = Path(directory) / "hashes.db"
        process, url = start(checkout, db)
        try:
            secrets, tokens = {}, {}
            for name in ("alice", "bob", "carol"):
                secrets[name], public = nix_key_pair(f"{name}-1")
                tokens[name] = create_user(checkout, db, name, *(["--public-key", public] if name == "alice" else []))
            closure = nix_build_sbom({"app-1.0": ["lib-2.1", "tool-0.3"], "lib-2.1": [], "tool-0.3": ["docs-1"],
                                      "docs-1": []})
            batches, diff = attestations(closure, secrets)
            diff_url = fill(url, tokens, closure, batches, diff)
            recorded = answers(url, questions(closure, db, diff_url))
        finally:
            process.terminate()
            process.wait(timeout=30)
        with sqlite3.connect(db) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 8
            dump = "\n".join(conn.iterdump())
    (HERE / "version-8.sql").write_text(dump + "\nPRAGMA user_version = 8;\n")
    (HERE / "version-8-answers.json").write_text(json.dumps(recorded, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv)
