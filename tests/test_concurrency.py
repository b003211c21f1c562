"""Eight builders writing at once, while others read: every attestation is
stored and nobody sees a server error."""
import sqlite3
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import requests

from attestation_samples import (base32_form, basename_of, create_user_in_process, drv_ident, first_generation,
                                 nar_hash_bytes, out_path)
from post_build_hook import STORE_DIR, nix_base32_encode
from support import bearer

WRITERS = 8
ATTESTATIONS_PER_WRITER = 1_000
READERS = 2


def planned_attestations(count):
    """(drv_ident, attestation) pairs, one derivation per build as builders send them."""
    return [(drv_ident(), first_generation(out_path(), base32_form(nar_hash_bytes()))) for _ in range(count)]


def write(url, token, plan, published):
    """Posts each attestation on its own over one keep-alive session; returns the status counts."""
    statuses = Counter()
    with requests.Session() as session:
        session.headers.update(bearer(token))
        for ident, attestation in plan:
            response = session.post(f"{url}/attestation/{ident}", json=[attestation], timeout=60)
            statuses[response.status_code] += 1
            if response.status_code == 200:
                published.append((ident, attestation["output_path"]))
    return statuses


def read(url, published, writers_done):
    """Reads what writers have published until they are done; returns the status counts."""
    statuses = Counter()
    with requests.Session() as session:
        rounds = 0
        while not writers_done.is_set():
            rounds += 1
            urls = [f"{url}/healthz"]
            if published:
                ident, path = published[-1]
                urls += [f"{url}/derivations/{ident}", f"{url}/derivations/{ident}?full=true",
                         f"{url}/attestations/by-output/{basename_of(path)}"]
            if rounds % 25 == 0:
                urls.append(f"{url}/derivations/")
            for target in urls:
                statuses[session.get(target, timeout=60).status_code] += 1
    return statuses


def run_writers_and_readers(server, tokens, plans):
    published, writers_done = [], threading.Event()
    with ThreadPoolExecutor(READERS) as reader_pool, ThreadPoolExecutor(WRITERS) as writer_pool:
        readers = [reader_pool.submit(read, server.url, published, writers_done) for _ in range(READERS)]
        writers = [writer_pool.submit(write, server.url, token, plan, published) for token, plan in zip(tokens, plans)]
        try:
            writer_statuses = sum((writer.result() for writer in writers), Counter())
        finally:
            writers_done.set()
        reader_statuses = sum((reader.result() for reader in readers), Counter())
    return writer_statuses, reader_statuses


def test_eight_concurrent_writers_with_readers_store_everything_without_errors(server):
    tokens = [create_user_in_process(server.db, f"builder-{number}") for number in range(WRITERS)]
    plans = [planned_attestations(ATTESTATIONS_PER_WRITER) for _ in range(WRITERS)]

    writer_statuses, reader_statuses = run_writers_and_readers(server, tokens, plans)

    assert writer_statuses == Counter({200: WRITERS * ATTESTATIONS_PER_WRITER})
    assert reader_statuses[200] > 0
    assert all(status < 500 for status in reader_statuses), reader_statuses
    with sqlite3.connect(server.db) as conn:
        stored = {(builder, f"{STORE_DIR}/{nix_base32_encode(digest[::-1])}-{name}", "sha256:" + nix_base32_encode(nar_hash))
                  for builder, digest, name, nar_hash in conn.execute(
                      "SELECT builders.name, store_paths.digest, store_paths.name, attestations.nar_hash FROM attestations"
                      " JOIN builders ON builders.id = attestations.builder_id"
                      " JOIN store_paths ON store_paths.id = attestations.path_id")}
    expected = {(f"builder-{number}", attestation["output_path"], attestation["output_hash"])
                for number, plan in enumerate(plans) for _ident, attestation in plan}
    assert stored == expected
    assert len(requests.get(f"{server.url}/derivations/", timeout=60).json()) == WRITERS * ATTESTATIONS_PER_WRITER
