#!/usr/bin/env python3
"""nix-hash-collection server: collects build attestations from builders and
shows, for every store path of a report, whether independent builders agree."""
import argparse
from array import array
import base64
import calendar
import concurrent.futures
import gc
import contextlib
import ctypes
import functools
import hashlib
import heapq
from html import escape as escape_html
import io
import itertools
import json
import multiprocessing
import operator
import os
import queue
import random
import re
import socket
import resource
import secrets
import signal
import sqlite3
import sys
import threading
import time
import weakref
import zlib
from collections import Counter, defaultdict, deque
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple
from urllib.parse import quote, urlencode

from flask import Blueprint, Flask, Response, abort, current_app, g, jsonify, render_template, request, stream_with_context
from markupsafe import Markup
from werkzeug.exceptions import HTTPException
from werkzeug.wsgi import wrap_file

import msgspec
import re2
from post_build_hook import (DIGEST_RE, KEY_NAME_RE, STORE_DIR, drv_ident_of, fingerprint, is_signature,
                             is_store_path, normalize_nar_hash, parse_key, parse_store_basename, parse_store_path, running_as,
                             shorten, verify_signature)
from post_build_hook import STORE_PATH_RE, TO_STANDARD_BASE32, are_store_paths, basename_of, name_of, nix_base32_encode, nix_base32_number, store_path
from post_build_hook import CANONICAL_SHA256_RE, NIX_BASE32, changed_aspects, fixed_content_address, fixed_output_mark, sri_hash
from post_build_hook import NO_BUILDS, NONDETERMINISTIC, ONE_BUILD, PARTIALLY, REPRODUCED, verdict  # noqa: F401
from post_build_hook import (ED25519_KEY_TYPE, EMPTY_TREE_HASH, TILE_HEIGHT, TILE_WIDTH, checkpoint_text,
                             cosignature_time, entry_bundle, generate_note_key, leaf_hash, log_entry, node_hash,
                             parse_signer_key, parse_tile_index, parse_verifier_key, sign_note, signature_line,
                             split_note, split_point, tree_hash, verifier_key_text, verifier_of_signer)

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

VERDICTS = [REPRODUCED, PARTIALLY, NONDETERMINISTIC, ONE_BUILD, NO_BUILDS]
# A fixed-output path (a source fetched by hash) is identical by construction: it is labelled apart,
# never counted in the reproducibility share, and never suggested for building.
FIXED_OUTPUT = "Fixed-output, checked by hash"
REPORT_LABELS = VERDICTS + [FIXED_OUTPUT]
VERDICT_COLOURS = {REPRODUCED: "#2e9d3a", PARTIALLY: "#e0a000", NONDETERMINISTIC: "#d3302f",
                   ONE_BUILD: "#8fa3b8", NO_BUILDS: "#d9d9d9", FIXED_OUTPUT: "#6a8caf"}
# Each verdict's badge: a CSS class and one ASCII character. Not emoji, which a machine
# without an emoji font shows as empty boxes; the label itself is the badge's accessible name.
VERDICT_BADGES = {REPRODUCED: ("reproduced", "R"), PARTIALLY: ("partial", "P"), NONDETERMINISTIC: ("nondeterministic", "N"),
                  ONE_BUILD: ("one-build", "1"), NO_BUILDS: ("no-builds", "0"), FIXED_OUTPUT: ("fixed-output", "F")}

M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # from glibc's malloc.h
PR_SET_PDEATHSIG = 1  # from linux/prctl.h
MAX_BATCH = 10_000
SIGNATURE_BYTES = 64  # Ed25519's
LARGE_BATCH = 1_000
LARGE_BATCH_CACHE_KIB = 256 * 1024
MAX_SUGGEST = 500
DEFAULT_SUGGEST = 50
# An attestation's optional "source": a build, a `--check` rebuild (the diff hook), an import from a binary cache.
ATTESTATION_SOURCES = ("build", "check", "cache")
REPORT_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_LINK_PATTERNS = 100  # per builder
MAX_PATTERN_LENGTH = 200
LINK_PATTERN_MEMORY = 1 * MiB  # RE2's bound on one compiled pattern and its match cache
LINK_MATCHING_BUDGET_S = 0.2
# The maximum merge delay: a checkpoint served includes every entry accepted this many seconds before.
DEFAULT_CHECKPOINT_INTERVAL = 2.0
WAL_CHECKPOINT_INTERVAL_S = 0.5  # SQLite's, of the WAL into the database file: not the log's checkpoints

CYCLONEDX_TYPE = "application/vnd.cyclonedx+json"
# What sqlite says when the database cannot be written for now; anything else is a bug.
UNAVAILABLE_SYMPTOMS = ("locked", "readonly", "read-only", "disk", "full", "I/O", "unable to open", "busy")
CLOSE_NODE = "</ul></details></li>\n"


def database_from_env():
    return os.environ.get("HASH_COLLECTION_DB", "hashes.db")


def log_origin_from_env():
    """The origin asked for, or None: then the log's is its key's name (log_origin)."""
    return os.environ.get("HASH_COLLECTION_LOG_ORIGIN") or None


def host_name():
    """This host's fully qualified name, else its own name: getfqdn() gives "localhost" where /etc/hosts maps the
    host's name to 127.0.0.1 that way, and a log named localhost is any host's log."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn in ("", "localhost", "localhost.localdomain") else fqdn


def signatures_required_by_env():
    return os.environ.get("HASH_COLLECTION_REQUIRE_SIGNATURES", "") not in ("", "0")


def whole_number_from_env(name, default):
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        return positive_whole_number(raw)
    except argparse.ArgumentTypeError as error:
        raise SystemExit(f"{name}: {error}") from None


def positive_whole_number(text):
    if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


# Settings with an environment variable and a command-line option of the same name:
# {config key: (environment variable, default)}.
SERVER_LIMITS = {
    # A full NixOS system closure has 5,000 to 50,000 paths; tens of times that is still a report.
    "MAX_REPORT_PATHS": ("HASH_COLLECTION_MAX_REPORT_PATHS", 500_000),
    # Real closures have 5 to 15 references per path.
    "MAX_REPORT_EDGES": ("HASH_COLLECTION_MAX_REPORT_EDGES", 5_000_000),
    # Each report upload being parsed holds memory in proportion to its SBOM.
    "MAX_REPORT_UPLOADS": ("HASH_COLLECTION_MAX_REPORT_UPLOADS", 2),
    # Waitress answers nobody once this many connections are open, idle ones included.
    "CONNECTION_LIMIT": ("HASH_COLLECTION_CONNECTION_LIMIT", 1000),
    # Seconds before waitress closes a connection that sends nothing.
    "CHANNEL_TIMEOUT": ("HASH_COLLECTION_CHANNEL_TIMEOUT", 30),
}


def limits_from_env():
    return {key: whole_number_from_env(variable, default) for key, (variable, default) in SERVER_LIMITS.items()}


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(
        DATABASE=database_from_env(),
        REQUIRE_SIGNATURES=signatures_required_by_env(),
        MAX_ATTESTATION_BYTES=16 * MiB,
        MAX_REPORT_BYTES=64 * MiB,
        MAX_DIFF_BYTES=16 * MiB,
        MAX_STORED_DIFF_BYTES=8 * MiB,
        JSON_SORT_KEYS=False,
        LOG_ORIGIN=log_origin_from_env(),
        CHECKPOINT_INTERVAL=DEFAULT_CHECKPOINT_INTERVAL,
        RENDER_WORKER=False,
        TREE_WORKER=False,
        BACKGROUND_CHECKPOINTS=False,
        **limits_from_env(),
    )
    app.config.update(config or {})
    app.config.setdefault("LOG_KEY_FILE", log_key_from_env() or default_log_key_file(app.config["DATABASE"]))
    app.extensions["report_uploads"] = threading.BoundedSemaphore(app.config["MAX_REPORT_UPLOADS"])
    app.extensions["unpublished_reports"] = UnpublishedReports()
    app.extensions["report_removals"] = ReportRemovals(app)
    app.extensions["component_ids"] = KnownComponentIds()
    app.extensions["pending_revisions"] = PendingRevisions(app)
    app.extensions["reported_paths"] = KnownReportedPaths()
    app.extensions["report_changes"] = ReportChanges()
    app.extensions["report_views"] = ReportViews(app)
    app.extensions["tree_worker"] = TreeWorker(app)
    app.extensions["attestation_writer"] = AttestationWriter(app)
    app.json.sort_keys = False
    app.json.compact = True
    app.teardown_appcontext(close_db)
    app.after_request(release_freed_memory)
    app.after_request(note_other_writes)
    app.after_request(vary_by_accept)
    app.jinja_env.filters["output_href"] = output_href
    app.jinja_env.filters["name_of"] = name_of
    app.jinja_env.filters["badge"] = verdict_badge
    app.jinja_env.globals["badge_colours"] = [(VERDICT_BADGES[label][0], VERDICT_COLOURS[label]) for label in REPORT_LABELS]
    app.register_blueprint(routes)
    with app.app_context():
        init_db()
    return app


# ---------------------------------------------------------------- database

def connect(path):
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.create_function("nix32_digest", 1, digest_of, deterministic=True)
    # Only takes effect when the file is created: 16 KiB pages store a report's SBOM,
    # tens of MiB, in a quarter of the pages, which halves the time to write it.
    conn.execute("PRAGMA page_size = 16384")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA journal_mode = WAL")
    # NORMAL in WAL mode loses nothing when the server process is killed; only
    # an OS crash or power loss can drop the last commits.
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


# One connection per thread and database, kept across requests: opening one costs
# more than a whole attestation, and closing the last one checkpoints the WAL.
connections = threading.local()


def get_db():
    path = current_app.config["DATABASE"]
    by_path = connections.__dict__.setdefault("by_path", {})
    if path not in by_path:
        by_path[path] = server_connection(path, current_app.config["BACKGROUND_CHECKPOINTS"])
    g.db = by_path[path]
    return g.db


def server_connection(path, background_checkpoints):
    """A connection of the server's threads: WAL checkpoints are wal_checkpointer's when it runs.
    Not of a report upload's writer or the removal of a replaced report: they write tens of MiB back to back,
    and keep SQLite's own checkpoint in their commits. A checkpointer copying alongside them never found all of
    the WAL copied, so it never started again from its beginning: 837 MiB after 20 uploads of a 15 MiB SBOM,
    against 19 MiB."""
    conn = connect(path)
    if background_checkpoints:
        conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


# Set after a large batch's commit: the checkpointer starts at once.
wal_grown = threading.Event()


def wal_checkpointer(path, interval=WAL_CHECKPOINT_INTERVAL_S, rounds=5):
    """Copy the WAL into the database in the background, outside the write lock.

    SQLite's automatic checkpoint runs inside the COMMIT that fills the WAL, so one attestation in a
    thousand took up to 200 ms under load while every other writer queued behind it; a passive
    checkpoint from another connection never blocks writers.

    A writer starts the WAL again from its beginning only when a checkpoint has copied all of it: after a
    large batch the checkpointer starts at once and goes on until it has, or batch ingest grew the WAL
    without end (900 MB at 10 million attestations), each batch's pages written to new parts of the file.
    """
    conn = connect(path)
    while True:
        wal_grown.wait(interval)
        wal_grown.clear()
        try:
            for _round in range(rounds):
                _busy, wal_frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if copied == wal_frames:
                    break
        except sqlite3.Error as error:
            print(f"web.py: WAL checkpoint failed, trying again: {error}", file=sys.stderr, flush=True)


def forget_connection():
    conn = connections.__dict__.get("by_path", {}).pop(current_app.config["DATABASE"], None)
    g.pop("db", None)
    if conn is not None:
        conn.close()


def close_db(_exception=None):
    conn = g.pop("db", None)
    if conn is not None and conn.in_transaction:
        conn.execute("ROLLBACK")


def init_db():
    """Create the schema on an empty database, or migrate an older one."""
    conn = get_db()
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0 and not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table'").fetchone():
        conn.executescript(f"BEGIN IMMEDIATE;{(HERE / 'schema.sql').read_text()};"
                           f"PRAGMA user_version = {SCHEMA_VERSION};COMMIT;")
        return
    for target, migrate in MIGRATIONS:
        if version < target:
            with transaction(conn):
                migrate(conn)
                conn.execute(f"PRAGMA user_version = {target}")
    if conn.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
        raise RuntimeError(f"database {current_app.config['DATABASE']} has an unknown schema version")


# Writers of this process queue on a Python lock before SQLite's: SQLite's busy handler polls with
# growing sleeps, so a request waiting for the write lock could miss every short gap between the
# chunks of a large report upload, for seconds.
process_write_lock = threading.Lock()
WRITE_LOCK_TIMEOUT_S = 30


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, so a write is all or nothing."""

    def __init__(self, conn):
        self.conn = conn
        self.outermost = False

    def __enter__(self):
        self.outermost = not self.conn.in_transaction
        if not self.outermost:
            return self.conn
        if not process_write_lock.acquire(timeout=WRITE_LOCK_TIMEOUT_S):
            raise sqlite3.OperationalError(f"database is locked: no write turn within {WRITE_LOCK_TIMEOUT_S} s")
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except BaseException:
            process_write_lock.release()
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if not self.outermost:
            return False
        try:
            if self.conn.in_transaction:
                self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
        except BaseException:
            # A COMMIT that failed can leave the transaction open: what the connection writes next would join it.
            with contextlib.suppress(sqlite3.Error):
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            raise
        finally:
            process_write_lock.release()
        return False


@contextlib.contextmanager
def read_snapshot(conn):
    """One read transaction: every query in it sees the database as the first one did, so a
    report that is replaced or removed meanwhile (a chunk at a time) is still seen whole."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        leave_snapshot(conn)


def leave_snapshot(conn):
    """End a read_snapshot early, before waiting for something else: an open read transaction keeps
    SQLite from checkpointing the WAL past it."""
    if conn.in_transaction:
        conn.execute("ROLLBACK")


@contextlib.contextmanager
def cache_for(conn, row_count):
    """A large page cache for the length of a large insert only.

    Large inserts into several indexes thrash SQLite's default 2 MiB cache;
    keeping a large cache on every thread's connection would cost more memory than it saves.
    """
    if row_count < LARGE_BATCH:
        yield
        return
    set_cache_kib(conn, LARGE_BATCH_CACHE_KIB)
    try:
        yield
    finally:
        set_cache_kib(conn, DEFAULT_CACHE_KIB)


DEFAULT_CACHE_KIB = 2000  # SQLite's own default


def set_cache_kib(conn, kib):
    conn.execute(f"PRAGMA cache_size = -{kib:d}")


_gc_pauses = {"count": 0, "lock": threading.Lock()}


@contextlib.contextmanager
def cyclic_gc_paused():
    """No cycle collection while a large request builds its objects.

    A 20,000-path SBOM becomes half a million acyclic objects, and the collector
    would scan them again and again while they are made: it doubles the time to
    parse one. Counted, because the collector is one switch for all threads.
    """
    with _gc_pauses["lock"]:
        _gc_pauses["count"] += 1
        gc.disable()
    try:
        yield
    finally:
        with _gc_pauses["lock"]:
            _gc_pauses["count"] -= 1
            if _gc_pauses["count"] == 0:
                gc.enable()


ISO_SECONDS = "%Y-%m-%dT%H:%M:%SZ"  # how every time the server shows is written: UTC, to the second


def iso_time(seconds):
    return time.strftime(ISO_SECONDS, time.gmtime(seconds))


def now_iso():
    return iso_time(time.time())


# ---------------------------------------------------------------- migrations
# schema.sql is version 1 plus every migration below; a database made by an older
# version is brought up to date at start-up, each step in one transaction.

def migrate_to_2(conn):
    """Public keys unique by their bytes; link patterns owned by the builder who made them.

    Patterns made before have no known owner (NULL): only admins may change or delete them.
    """
    conn.execute("ALTER TABLE public_keys ADD COLUMN key_bytes BLOB")
    for key_id, builder_id, key_text in conn.execute(
            "SELECT id, builder_id, public_key FROM public_keys ORDER BY id").fetchall():
        keep_or_drop_public_key(conn, key_id, builder_id, key_text)
    conn.execute("CREATE UNIQUE INDEX public_keys_by_bytes ON public_keys(key_bytes)")
    conn.execute("ALTER TABLE link_patterns ADD COLUMN owner_id INTEGER REFERENCES builders(id)")
    conn.execute("CREATE INDEX link_patterns_by_owner ON link_patterns(owner_id)")


def keep_or_drop_public_key(conn, key_id, builder_id, key_text):
    """Keep the oldest registration of each key's bytes, in its one spelling; drop the rest, loudly.

    Attestations a dropped key verified lose their mark, unless the builder keeps a key of that name.
    """
    name, raw = version_1_public_key(key_text)
    holder = conn.execute("SELECT builders.name FROM public_keys JOIN builders ON builders.id = public_keys.builder_id"
                          " WHERE public_keys.key_bytes = ?", (raw,)).fetchone() if raw else None
    if raw is not None and holder is None:
        conn.execute("UPDATE public_keys SET key_name = ?, public_key = ?, key_bytes = ? WHERE id = ?",
                     (name, f"{name}:{base64.b64encode(raw).decode()}", raw, key_id))
        return
    builder_name = conn.execute("SELECT name FROM builders WHERE id = ?", (builder_id,)).fetchone()[0]
    why = f"its bytes are already registered to {holder[0]!r}" if holder else "it is not NAME:BASE64 of 32 bytes"
    print(f"web.py: schema version 2: dropped public key {key_text!r} of builder {builder_name!r}: {why}",
          file=sys.stderr, flush=True)
    conn.execute("DELETE FROM public_keys WHERE id = ?", (key_id,))
    conn.execute("UPDATE attestations SET verified = 0 WHERE builder_id = ? AND verified = 1"
                 " AND substr(output_sig, 1, length(?) + 1) = ? || ':'"
                 " AND NOT EXISTS (SELECT 1 FROM public_keys WHERE builder_id = ? AND key_name = ?)",
                 (builder_id, name, name, builder_id, name))


def version_1_public_key(key_text):
    """(name, 32 key bytes) as version 1's create_user read a key, or (name or '', None) when it cannot be used now."""
    name, _sep, encoded = key_text.strip().partition(":")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        return name, None
    if len(raw) != 32 or not KEY_NAME_RE.fullmatch(name):
        return name, None
    return name, raw


def migrate_to_6(conn):
    """Attestations say where their hash came from; those made before have no source (NULL, shown as unknown)."""
    conn.execute("ALTER TABLE attestations ADD COLUMN source TEXT CHECK (source IN ('build', 'check', 'cache'))")


def migrate_to_3(conn):
    """Builder-supplied diffs between two outputs of one path."""
    conn.execute("""CREATE TABLE diffs (
        id INTEGER PRIMARY KEY,
        output_path TEXT NOT NULL,
        hash_a TEXT NOT NULL,
        hash_b TEXT NOT NULL,
        uploader_id INTEGER NOT NULL REFERENCES builders(id),
        differing INTEGER NOT NULL,
        document BLOB NOT NULL,
        created_at TEXT NOT NULL,
        UNIQUE (output_path, hash_a, hash_b)
    )""")


def migrate_to_4(conn):
    """The transparency log, with every existing attestation appended once, in id order."""
    for statement in LOG_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    log_existing_attestations(conn)


# Version 4 to 8 kept attestations as text and one log_entries row per entry; migrations 4 and 9 read them so.
VERSION_8_COLUMNS = (
    "SELECT {a}.id, builders.name AS builder, {d}.drv_ident, {a}.output_path, {a}.output_hash, {a}.output_sig,"
    " {a}.nar_size, {a}.refs, {a}.verified, {a}.created_at{extra} FROM {a} JOIN builders ON builders.id = {a}.builder_id"
    " LEFT JOIN {d} ON {d}.id = {a}.derivation_id ")
VERSION_4_ROWS = VERSION_8_COLUMNS.format(a="attestations", d="derivations", extra="")


def version_8_entry(row):
    """The log entry of a VERSION_8_COLUMNS row, as versions 4 to 8 rebuilt it."""
    drv_path = store_path(f"{row['drv_ident']}.drv") if row["drv_ident"] else None
    references = None if row["refs"] is None else json.loads(row["refs"])
    return log_entry(row["builder"], row["output_path"], drv_path, row["output_hash"], row["nar_size"], references,
                     row["output_sig"], row["verified"], row["created_at"])


def log_existing_attestations(conn, slice_length=40 * TILE_WIDTH):
    """Migration 4: append every attestation to the log once, in id order, a slice at a time."""
    last_id, size, subtrees = 0, 0, []
    while True:
        rows = conn.execute(VERSION_4_ROWS + "WHERE attestations.id > ? ORDER BY attestations.id LIMIT ?",
                            (last_id, slice_length)).fetchall()
        if not rows:
            break
        leaves = [leaf_hash(version_8_entry(row)) for row in rows]
        conn.executemany("INSERT INTO log_entries (idx, attestation_id, leaf_hash) VALUES (?, ?, ?)",
                         [(size + offset, row["id"], leaf) for offset, (row, leaf) in enumerate(zip(rows, leaves))])
        subtrees += [tree_hash(leaves[start:start + TILE_WIDTH]) for start in range(0, len(leaves) - TILE_WIDTH + 1, TILE_WIDTH)]
        size, last_id = size + len(rows), rows[-1]["id"]
    level = 1
    while subtrees:
        conn.executemany("INSERT INTO log_subtrees (level, idx, hash) VALUES (?, ?, ?)",
                         [(level, index, subtree) for index, subtree in enumerate(subtrees)])
        subtrees = [tree_hash(subtrees[start:start + TILE_WIDTH])
                    for start in range(0, len(subtrees) - TILE_WIDTH + 1, TILE_WIDTH)]
        level += 1


LOG_TABLES = """
CREATE TABLE log_entries (
    idx INTEGER PRIMARY KEY,
    attestation_id INTEGER NOT NULL,
    leaf_hash BLOB NOT NULL,
    entry BLOB
);
CREATE INDEX log_entries_by_attestation ON log_entries(attestation_id);
CREATE TABLE log_subtrees (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE log_checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL,
    issued_at REAL NOT NULL
);
CREATE TABLE witness_keys (
    id INTEGER PRIMARY KEY,
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    verifier_key TEXT NOT NULL UNIQUE
);
CREATE TABLE log_cosignatures (
    size INTEGER NOT NULL,
    witness_key_id INTEGER NOT NULL REFERENCES witness_keys(id),
    line TEXT NOT NULL,
    PRIMARY KEY (size, witness_key_id)
) WITHOUT ROWID;
"""


def migrate_to_5(conn):
    """A report's SBOM is stored in pieces, written one per transaction, not as one blob."""
    conn.execute("""CREATE TABLE report_sbom_pieces (
               report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
               seq INTEGER NOT NULL,
               piece BLOB NOT NULL,
               PRIMARY KEY (report_id, seq))""")
    conn.execute("""INSERT INTO report_sbom_pieces (report_id, seq, piece) SELECT id, 0, sbom FROM reports""")
    conn.execute("""ALTER TABLE reports DROP COLUMN sbom""")


def migrate_to_7(conn):
    """Fixed-output paths, from a report (path-info's ca) or an attestation; a report's upload format."""
    conn.execute("ALTER TABLE attestations ADD COLUMN ca TEXT")
    conn.execute("ALTER TABLE report_paths ADD COLUMN ca TEXT")
    conn.execute(f"ALTER TABLE reports ADD COLUMN source_type TEXT NOT NULL DEFAULT '{CYCLONEDX_TYPE}'")


def migrate_to_8(conn):
    """Named trust policies, and report revisions: every existing report becomes its revision 1."""
    for statement in POLICY_AND_REVISION_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    for report in conn.execute("SELECT id, root, tree, created_at FROM reports ORDER BY id").fetchall():
        record_existing_report_as_revision_1(conn, report)


POLICY_AND_REVISION_TABLES = """
CREATE TABLE policies (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER NOT NULL REFERENCES builders(id),
    builders TEXT NOT NULL,
    min INTEGER NOT NULL,
    verified_only INTEGER,
    updated_at TEXT NOT NULL
);
CREATE TABLE revision_trees (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    tree BLOB NOT NULL
);
CREATE TABLE revision_components (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    name TEXT,
    drv_path TEXT,
    outputs TEXT NOT NULL
);
CREATE TABLE report_revisions (
    id INTEGER PRIMARY KEY,
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    number INTEGER NOT NULL,
    label TEXT,
    created_at TEXT NOT NULL,
    root TEXT NOT NULL,
    path_count INTEGER NOT NULL,
    sbom_sha256 TEXT NOT NULL,
    component_ids BLOB NOT NULL,
    tree_id INTEGER NOT NULL REFERENCES revision_trees(id),
    UNIQUE (report_id, number),
    UNIQUE (report_id, label)
);
"""


def record_existing_report_as_revision_1(conn, report):
    names, drv_paths = [], []
    for name, drv_path in conn.execute("SELECT name, drv_path FROM report_components WHERE report_id = ? ORDER BY idx",
                                       (report["id"],)):
        names.append(name)
        drv_paths.append(drv_path)
    paths = conn.execute("SELECT out_path, component_idx, output FROM report_paths WHERE report_id = ?",
                         (report["id"],)).fetchall()
    sbom_sha256 = hashlib.sha256()
    for piece in sbom_pieces(conn, report["id"]):
        sbom_sha256.update(piece)
    revision = new_revision(conn, None, report["root"], report["tree"], sbom_sha256.hexdigest(), names, drv_paths, paths)
    add_revision(conn, report["id"], revision._replace(created_at=report["created_at"]))


def migrate_to_9(conn):
    """Compact attestations (schema.sql says how), whose first log entry's index becomes their id.

    Each row's log entries are rebuilt from its new form and checked against their stored leaf hashes;
    an entry that does not rebuild the same keeps its bytes. The old tables are read once and dropped.
    """
    for table in ("attestations", "derivations", "log_entries"):
        conn.execute(f"ALTER TABLE {table} RENAME TO v8_{table}")
    for statement in COMPACT_ATTESTATION_TABLES.split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO derivations (id, digest, name)"
                 " SELECT id, nix32_digest(substr(drv_ident, 1, 32)), substr(drv_ident, 34) || '.drv' FROM v8_derivations")
    conn.execute(f"INSERT INTO store_paths (digest, name) SELECT nix32_digest(substr(output_path, {PATH_PREFIX + 1}, 32)),"
                 f" substr(output_path, {PATH_PREFIX + 34}) FROM v8_attestations GROUP BY output_path ORDER BY MIN(id)")
    conn.execute("CREATE INDEX store_paths_by_digest ON store_paths(digest)")
    migrate_version_8_attestations(conn)
    migrate_version_8_later_entries(conn)
    for table in ("v8_log_entries", "v8_attestations", "v8_derivations"):
        conn.execute(f"DROP TABLE {table}")
    for statement in COMPACT_ATTESTATION_INDEXES.split(";"):
        if statement.strip():
            conn.execute(statement)


COMPACT_ATTESTATION_TABLES = """
CREATE TABLE store_paths (id INTEGER PRIMARY KEY, digest BLOB NOT NULL, name TEXT NOT NULL);
CREATE TABLE derivations (id INTEGER PRIMARY KEY, digest BLOB NOT NULL, name TEXT NOT NULL);
CREATE TABLE key_names (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE TABLE attestations (
    id INTEGER PRIMARY KEY,
    path_id INTEGER NOT NULL REFERENCES store_paths(id),
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    derivation_id INTEGER REFERENCES derivations(id),
    nar_hash BLOB NOT NULL,
    sig_key_id INTEGER REFERENCES key_names(id),
    sig BLOB,
    nar_size INTEGER,
    refs TEXT,
    verified INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    source TEXT CHECK (source IN ('build', 'check', 'cache')),
    ca TEXT,
    leaf_hash BLOB NOT NULL
);
CREATE TABLE log_entries (idx INTEGER PRIMARY KEY, attestation_id INTEGER, leaf_hash BLOB NOT NULL, entry BLOB);
"""
COMPACT_ATTESTATION_INDEXES = """
CREATE INDEX derivations_by_digest ON derivations(digest);
CREATE INDEX attestations_by_path ON attestations(path_id, builder_id, nar_hash, verified);
CREATE INDEX attestations_fixed_output ON attestations(path_id) WHERE ca IS NOT NULL;
CREATE INDEX attestations_by_derivation ON attestations(derivation_id);
CREATE INDEX log_entries_by_attestation ON log_entries(attestation_id);
"""


def migrate_version_8_attestations(conn, slice_length=10_000):
    """Each old row in its new form, its id the index of its first log entry (whose bytes stay as they were)."""
    last_id = -1
    while True:
        rows = conn.execute(
            VERSION_8_COLUMNS.format(a="v8_attestations", d="v8_derivations", extra=", store_paths.id AS path_id")
            + f" JOIN store_paths ON {path_match('store_paths', 'v8_attestations.output_path')}"
            " WHERE v8_attestations.id > ? ORDER BY v8_attestations.id LIMIT ?", (last_id, slice_length)).fetchall()
        if not rows:
            return
        for row in rows:
            first = conn.execute("SELECT idx, leaf_hash, entry FROM v8_log_entries WHERE attestation_id = ?"
                                 " ORDER BY idx LIMIT 1", (row["id"],)).fetchone()
            if first is None:
                raise LogDamaged(f"attestation {row['id']} has no log entry")
            migrate_version_8_row(conn, row, first)
        last_id = rows[-1]["id"]


def migrate_version_8_row(conn, row, first):
    key_name, sig = compact_signature(row["output_sig"])
    compact = {"nar_hash": compact_text(row["output_hash"], stored_hash, hash_text), "sig": sig,
               "key_name": key_name, "created_at": compact_text(row["created_at"], stored_time, stored_time_text)}
    key_ids = key_name_ids(conn, {key_name})
    conn.execute("INSERT INTO attestations (id, path_id, builder_id, derivation_id, nar_hash, sig_key_id, sig, nar_size,"
                 " refs, verified, created_at, source, ca, leaf_hash)"
                 " SELECT ?, ?, builder_id, derivation_id, ?, ?, ?, nar_size, refs, verified, ?, source, ca, ?"
                 " FROM v8_attestations WHERE id = ?",
                 (first["idx"], row["path_id"], compact["nar_hash"], key_ids.get(key_name), sig, compact["created_at"],
                  first["leaf_hash"], row["id"]))
    original = first["entry"] if first["entry"] is not None else version_8_entry(row)
    if original != entry_of_attestation(attestation_object(attestation_row(conn, first["idx"]))):
        conn.execute("INSERT INTO log_entries (idx, attestation_id, leaf_hash, entry) VALUES (?, ?, ?, ?)",
                     (first["idx"], first["idx"], first["leaf_hash"], original))


def compact_text(text, compact, rebuilt):
    """The compact form of a stored text, or the text itself when the compact form would not give it back."""
    try:
        value = compact(text)
    except (ValueError, TypeError, OverflowError):
        return text
    return value if rebuilt(value) == text else text


def compact_signature(text):
    """(key name, 64 bytes) of a signature, (None, None) of none, (None, text) of one not in the one spelling."""
    if not text:
        return None, None
    try:
        return parse_key(text, 64)
    except ValueError:
        return None, text


def stored_time(text):
    return calendar.timegm(time.strptime(text, ISO_SECONDS))


VERSION_8_ROWS = VERSION_8_COLUMNS.format(a="v8_attestations", d="v8_derivations", extra="")


def migrate_version_8_later_entries(conn):
    """The old entries that are not their attestation's first: an upgrade's, or one whose row is gone."""
    rows = conn.execute(
        "SELECT entries.idx, entries.leaf_hash, entries.entry, (SELECT MIN(idx) FROM v8_log_entries"
        " WHERE attestation_id = entries.attestation_id) AS attestation_id, v8_attestations.id AS old_id"
        " FROM v8_log_entries AS entries LEFT JOIN v8_attestations ON v8_attestations.id = entries.attestation_id"
        " WHERE v8_attestations.id IS NULL OR entries.idx > (SELECT MIN(idx) FROM v8_log_entries"
        " WHERE attestation_id = entries.attestation_id)")
    for row in rows:
        attestation_id = row["attestation_id"] if row["old_id"] is not None else None
        entry = row["entry"]
        if entry is None and attestation_id is not None:
            old = conn.execute(VERSION_8_ROWS + "WHERE v8_attestations.id = ?", (row["old_id"],)).fetchone()
            original = version_8_entry(old)
            if original != entry_of_attestation(attestation_object(attestation_row(conn, attestation_id))):
                entry = original
        conn.execute("INSERT INTO log_entries (idx, attestation_id, leaf_hash, entry) VALUES (?, ?, ?, ?)",
                     (row["idx"], attestation_id, row["leaf_hash"], entry))


def migrate_to_10(conn):
    """Report paths keep their digest (path_digest's), so views join store_paths by its index."""
    conn.execute("ALTER TABLE report_paths ADD COLUMN digest BLOB")
    conn.execute(f"UPDATE report_paths SET digest = nix32_digest(substr(out_path, {PATH_PREFIX + 1}, 32))")


def migrate_to_12(conn):
    """A report's components are kept in pieces of JSON, not a row each (schema.sql says why), and its paths
    carry their component's drv_path. Shared component rows are named by component_digest's new spelling."""
    conn.execute("CREATE TABLE report_component_pieces (report_id INTEGER NOT NULL REFERENCES reports(id)"
                 " ON DELETE CASCADE, seq INTEGER NOT NULL, piece TEXT NOT NULL, PRIMARY KEY (report_id, seq))")
    conn.execute("ALTER TABLE report_paths ADD COLUMN drv_path TEXT")
    conn.execute("UPDATE report_paths SET drv_path = (SELECT drv_path FROM report_components"
                 " WHERE report_components.report_id = report_paths.report_id AND idx = component_idx)")
    for (report_id,) in conn.execute("SELECT id FROM reports").fetchall():
        components = conn.execute("SELECT name, drv_path FROM report_components WHERE report_id = ? ORDER BY idx",
                                  (report_id,)).fetchall()
        for statement, parameters in component_piece_statements([name for name, _drv_path in components],
                                                                [drv_path for _name, drv_path in components]):
            conn.execute(statement, (report_id, *parameters))
    conn.execute("DROP TABLE report_components")
    rehash_shared_components(conn)


def rehash_shared_components(conn, slice_length=10_000):
    """Each shared component row's digest as component_digest now spells it, a slice of rows at a time."""
    last_id = 0
    while rows := conn.execute("SELECT id, name, drv_path, outputs FROM revision_components WHERE id > ? ORDER BY id"
                               " LIMIT ?", (last_id, slice_length)).fetchall():
        # OR IGNORE: two rows of one component under different old names keep the second's; revisions list ids.
        conn.executemany("UPDATE OR IGNORE revision_components SET digest = ? WHERE id = ?",
                         [(component_digest((name, drv_path, json.loads(outputs))), row_id)
                          for row_id, name, drv_path, outputs in rows])
        last_id = rows[-1][0]


def migrate_to_11(conn):
    """Store paths and derivations are indexed by their digest's first 4 bytes (DIGEST_INDEX_BYTES), not all 20."""
    for table in ("store_paths", "derivations"):
        conn.execute(f"DROP INDEX {table}_by_digest")
        conn.execute(f"CREATE INDEX {table}_by_digest ON {table}(substr(digest, 1, 4))")


def migrate_to_13(conn):
    """What the attestations say of each reported path is kept (reported_paths), brought up to date as attestations
    arrive, so that views read it rather than search the attestations of every path."""
    conn.execute("CREATE TABLE reported_paths (digest BLOB NOT NULL, name TEXT NOT NULL, attested TEXT,"
                 " attested_fixed INTEGER NOT NULL DEFAULT 0, builders INTEGER NOT NULL DEFAULT 0,"
                 " verified_builders INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (digest, name)) WITHOUT ROWID")
    conn.execute(f"INSERT INTO reported_paths (digest, name, {', '.join(ATTESTED_COLUMNS)})"
                 + reported_rows(f"SELECT DISTINCT digest, substr(out_path, {PATH_PREFIX + 34}) AS name FROM report_paths"))


def migrate_to_14(conn):
    """Nothing to change: from this version a revision's component_ids may be pending (PENDING_IDS), which
    servers of earlier versions cannot read, so they refuse a database of this one rather than fail on it."""


def migrate_to_15(conn):
    """Each revision keeps the paths its upload marks fixed-output. The latest revision's are its report's own rows';
    an older revision's upload is gone: it counts as fixed-output only what attestations mark so."""
    conn.execute("ALTER TABLE report_revisions ADD COLUMN fixed_output BLOB")
    latest = conn.execute("SELECT id, report_id FROM report_revisions WHERE number = (SELECT MAX(number)"
                          " FROM report_revisions AS later WHERE later.report_id = report_revisions.report_id)").fetchall()
    for revision_id, report_id in latest:
        indices = [index for (index,) in conn.execute("SELECT DISTINCT component_idx FROM report_paths"
                                                      " WHERE report_id = ? AND ca IS NOT NULL ORDER BY 1", (report_id,))]
        if indices:
            conn.execute("UPDATE report_revisions SET fixed_output = ? WHERE id = ?", (packed_ids(indices), revision_id))


# (version, function) pairs: the function brings a database from the version before to this one.
# Append, never edit; the last version is the schema this code speaks.
MIGRATIONS = [(2, migrate_to_2), (3, migrate_to_3), (4, migrate_to_4), (5, migrate_to_5), (6, migrate_to_6),
              (7, migrate_to_7), (8, migrate_to_8), (9, migrate_to_9), (10, migrate_to_10),
              (11, migrate_to_11), (12, migrate_to_12), (13, migrate_to_13), (14, migrate_to_14), (15, migrate_to_15)]
SCHEMA_VERSION = MIGRATIONS[-1][0] if MIGRATIONS else 1


# ---------------------------------------------------------------- builders and tokens

def token_digest(token):
    return hashlib.sha256(token.encode()).hexdigest()


def builder_of_token(conn, token):
    # Looked up by the token's SHA-256: the comparison happens on a digest in
    # an index, so no secret is ever compared byte by byte.
    return conn.execute(
        "SELECT builders.id, builders.name, builders.is_admin FROM tokens JOIN builders ON builders.id = tokens.builder_id"
        " WHERE tokens.token_sha256 = ? AND tokens.revoked = 0", (token_digest(token),)).fetchone()


def bearer_token():
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def optional_builder():
    token = bearer_token()
    if token is None:
        return None
    builder = builder_of_token(get_db(), token)
    if builder is None:
        abort(401, "unknown or revoked token")
    return builder


def require_builder():
    if bearer_token() is None:
        abort(401, "missing token: send 'Authorization: Bearer <token>'")
    return optional_builder()


def register_public_key(conn, builder_id, key_text):
    """Register a Nix public key for a builder, or raise BadInput naming who holds its bytes.

    Compared by the 32 key bytes, not the text: one signer relabelled under two names
    would otherwise count as two builders.
    """
    name, raw = checked("public key", lambda text: parse_key(text, 32), key_text)
    holder = conn.execute("SELECT builders.id, builders.name, public_keys.public_key FROM public_keys"
                          " JOIN builders ON builders.id = public_keys.builder_id WHERE public_keys.key_bytes = ?",
                          (raw,)).fetchone()
    if holder is None:
        conn.execute("INSERT INTO public_keys (builder_id, key_name, public_key, key_bytes) VALUES (?, ?, ?, ?)",
                     (builder_id, name, key_text, raw))
    elif holder["id"] != builder_id or holder["public_key"] != key_text:
        raise BadInput(f"public key {key_text}: these key bytes are already registered to builder "
                       f"{holder['name']!r} as {holder['public_key']}")


def registered_keys(conn, builder_id):
    """({key name: [public keys]} of this builder, names of keys registered to other builders). A name may have
    several keys: `nix key generate-secret` with the same --key-name again, say, while rotating."""
    own, foreign_names = defaultdict(list), set()
    for owner, key_name, public_key in conn.execute("SELECT builder_id, key_name, public_key FROM public_keys"):
        if owner == builder_id:
            own[key_name].append(public_key)
        else:
            foreign_names.add(key_name)
    return own, foreign_names


# ---------------------------------------------------------------- request bodies

class BadInput(ValueError):
    """A client error; the message names the field and what was expected."""


def body_text(limit_key, expected):
    """The request body as text; JSON on the wire is UTF-8 (RFC 8259)."""
    return utf8_text(body_bytes(limit_key, expected))


def body_bytes(limit_key, expected):
    request.max_content_length = current_app.config[limit_key]
    length = request.content_length
    raw = read_exactly(request.stream, length) if length else request.get_data(cache=False)
    if not raw:
        raise BadInput(f"empty body: expected {expected}")
    return raw


def read_exactly(stream, length):
    """A body of known length, read into one buffer: get_data reads 64 KiB at a time into a growing buffer
    and copies the whole at the end, which for a 16 MiB report held the interpreter for 20 ms."""
    body = bytearray(length)
    filled = 0
    with memoryview(body) as view:
        while filled < length:
            count = stream.readinto(view[filled:])
            if not count:
                break
            filled += count
    return body if filled == length else body[:filled]


def utf8_checked(raw):
    """raw, once known to be UTF-8: ASCII is, and is told in a fraction of the time a decode takes."""
    if not raw.isascii():
        utf8_text(raw)
    return raw


def utf8_text(raw):
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"body is not UTF-8, so neither JSON nor text: invalid at byte {error.start}") from None


def parsed_json(text):
    try:
        return json.loads(text, object_hook=give_other_threads_a_turn)
    except (ValueError, RecursionError) as error:
        raise BadInput(f"body is not JSON: {shorten(str(error), 120)}") from None


def give_other_threads_a_turn(json_object):
    """Returned unchanged. json.loads alone holds the interpreter for the whole parse (0.7 s for a
    64 MiB SBOM); a call into Python for each object lets the other request threads run meanwhile."""
    return json_object


def json_body(limit_key):
    return parsed_json(body_text(limit_key, "JSON"))


def field(item, name, where, kind=str, required=True):
    if name not in item or item[name] is None:
        if required:
            raise BadInput(f"{where}.{name}: missing")
        return None
    value = item[name]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise BadInput(f"{where}.{name}: expected an integer, got {type(value).__name__}")
    if not isinstance(value, kind):
        raise BadInput(f"{where}.{name}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def checked(where, check, value):
    try:
        return check(value)
    except ValueError as error:
        raise BadInput(f"{where}: {error}") from None


def parse_attestation(item, where, drv_ident):
    """Validate one attestation object of either generation into a row dict."""
    if not isinstance(item, dict):
        raise BadInput(f"{where}: expected an object, got {type(item).__name__}")
    output_path = attested_output_path(item, where)
    output_hash = checked(f"{where}.output_hash", normalize_nar_hash, field(item, "output_hash", where))
    output_sig = field(item, "output_sig", where, required=False) or ""
    if len(output_sig) > 1024:
        raise BadInput(f"{where}.output_sig: longer than 1024 characters")
    signature = checked(f"{where}.output_sig", lambda sig: parse_key(sig, SIGNATURE_BYTES), output_sig) if output_sig else (None, None)
    nar_size = field(item, "nar_size", where, kind=int, required=False)
    if nar_size is not None and not 0 < nar_size < 1 << 62:
        raise BadInput(f"{where}.nar_size: expected a positive size in bytes, got {nar_size}")
    references = field(item, "references", where, kind=list, required=False)
    if references is not None:
        for position, reference in enumerate(references):
            checked(f"{where}.references[{position}]", parse_store_path, reference)
        references = sorted(set(references))
    ca = field(item, "ca", where, required=False)
    if ca is not None:
        ca = checked(f"{where}.ca", lambda value: fixed_output_mark(output_path, value, references or ()), ca)
    return {"drv_ident": drv_ident, "output_path": output_path, "output_hash": output_hash,
            "output_sig": output_sig, "signature": signature, "nar_size": nar_size, "references": references,
            "source": attestation_source(item, where), "ca": ca}


def attestation_source(item, where):
    """Where the hash came from, or None: older clients send no source."""
    source = field(item, "source", where, required=False)
    if source is not None and source not in ATTESTATION_SOURCES:
        raise BadInput(f"{where}.source: expected one of {', '.join(map(repr, ATTESTATION_SOURCES))} or no source, "
                       f"got {shorten(source)!r}")
    return source


def attested_output_path(item, where):
    if "output_path" in item:
        return checked(f"{where}.output_path", lambda path: parse_store_path(path) and path,
                       field(item, "output_path", where))
    digest = field(item, "output_digest", where)
    name = field(item, "output_name", where)
    basename = f"{digest}-{name}"
    checked(f"{where}.output_digest/output_name", parse_store_basename, basename)
    return store_path(basename)


def parse_attestation_list(body, drv_ident_for):
    if not isinstance(body, list):
        raise BadInput(f"body: expected a JSON list of attestations, got {type(body).__name__}")
    if not body:
        raise BadInput("body: the list of attestations is empty")
    if len(body) > MAX_BATCH:
        raise BadInput(f"body: at most {MAX_BATCH} attestations per request, got {len(body)}")
    return [parse_attestation(item, f"[{position}]", drv_ident_for(item, f"[{position}]"))
            for position, item in enumerate(body)]


def batch_drv_ident(item, where):
    if not isinstance(item, dict):
        return None
    drv_path = item.get("drv_path")
    if drv_path is None:
        return None
    if not isinstance(drv_path, str):
        raise BadInput(f"{where}.drv_path: expected a /nix/store/….drv path or null, got {type(drv_path).__name__}")
    return checked(f"{where}.drv_path", drv_ident_of, drv_path)


# ---------------------------------------------------------------- attestations

def verify_attestation(attestation, public_keys, foreign_key_names, where):
    """True when the signature verifies, False when it cannot be checked; BadInput when it is wrong."""
    signature = attestation["output_sig"]
    if not signature or attestation["nar_size"] is None or attestation["references"] is None:
        return False
    key_name = signature.partition(":")[0]
    if key_name not in public_keys:
        if key_name in foreign_key_names:
            raise BadInput(f"{where}.output_sig: key {key_name!r} is registered to another builder")
        return False
    message = fingerprint(attestation["output_path"], attestation["output_hash"],
                          attestation["nar_size"], attestation["references"])
    if not any(verify_signature(public_key, message, signature) for public_key in public_keys[key_name]):
        raise BadInput(f"{where}.output_sig: the signature by key {key_name!r} does not verify over "
                       f"the fingerprint of {attestation['output_path']}")
    return True


def store_attestations(conn, builder, attestations):
    """Store and log the attestations; returns each one's log index, in request order."""
    verify_attestations(conn, builder, attestations)
    log_indexes = current_app.extensions["attestation_writer"].write(conn, builder, attestations)
    current_app.extensions["report_changes"].note_attested(attestation["output_path"] for attestation in attestations)
    return log_indexes


def verify_attestations(conn, builder, attestations):
    """Mark each attestation verified or not, as its signature under the builder's keys says; BadInput if one is wrong."""
    public_keys, foreign_key_names = registered_keys(conn, builder["id"])
    for position, attestation in enumerate(attestations):
        attestation["verified"] = verify_attestation(attestation, public_keys, foreign_key_names, f"[{position}]")


def write_attestations(conn, requests):
    """Store and log the verified attestations of one or more requests [(builder, attestations)] in one
    transaction; returns each request's log indexes, in its order."""
    attestations = [attestation for builder, listed in requests for attestation in with_builder(builder, listed)]
    created_at = int(time.time())
    with transaction(conn), cache_for(conn, len(attestations)):
        path_ids = interned_paths(conn, "store_paths", {attestation["output_path"] for attestation in attestations})
        # In index order: a batch's order means nothing, and equal attestations keep theirs.
        ordered = sorted(attestations, key=lambda attestation: path_ids[attestation["output_path"]])
        stored = StoredVersions(conn, {builder["id"] for builder, _listed in requests}, path_ids.values())
        new, upgrades = stored.changes(ordered, path_ids)
        size = log_size(conn)
        indexes = {}
        upgrades.sort(key=lambda upgrade: upgrade[0])
        for offset, (attestation_id, attestation) in enumerate(upgrades):
            indexes[key_of(attestation)] = upgrade_attestation(conn, attestation_id, attestation, size + offset)
        first_new = size + len(upgrades)
        insert_attestations(conn, new, path_ids, first_new, created_at)
        indexes.update((key_of(attestation), first_new + offset) for offset, attestation in enumerate(new))
        store_complete_subtrees(conn, size, first_new + len(new))
        refresh_reported_paths(conn, {path_ids[attestation["output_path"]]
                                      for attestation in itertools.chain(new, (upgraded for _id, upgraded in upgrades))})
        return [[log_index_of(conn, attestation, indexes, stored, path_ids) for attestation in listed]
                for _builder, listed in requests]


def log_index_of(conn, attestation, indexes, stored, path_ids):
    """The log index this request's attestation got, or that of the stored one it left as it was."""
    index = indexes.get(key_of(attestation))
    return stored.latest_index(conn, path_ids[attestation["output_path"]], attestation) if index is None else index


class WriteRequest:
    """One request's attestations on their way to the database (AttestationWriter)."""

    def __init__(self, builder, attestations):
        self.builder, self.attestations = builder, attestations
        self.woken = threading.Event()  # set once it is written
        self.log_indexes = self.error = None

    def finish(self, log_indexes=None, error=None):
        self.log_indexes, self.error = log_indexes, error
        self.woken.set()

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.log_indexes


ATTESTATIONS_PER_GROUP = LARGE_BATCH
WRITER_TIMEOUT_S = 2 * WRITE_LOCK_TIMEOUT_S
WRITER_IDLE_S = 5  # then the writer's thread ends, and closes its connection, until it is wanted again


class AttestationWriter:
    """Writes the attestations of concurrent requests together, in one transaction (group commit). A request
    that finds no write under way writes its own at once, in its thread, as if alone. Requests that come
    meanwhile wait; then a thread of the writer's own writes every request waiting, up to ATTESTATIONS_PER_GROUP
    attestations a transaction, until none is left.

    Under load, a request that wrote only its own single attestation held the write lock for ten times the work
    it did there: each of its dozen SQLite calls gives up the interpreter, and waits to get it back from the
    other request threads. Written together, the attestations of every request waiting share those calls and
    one commit. A group that fails is written again a request at a time, so that only a request at fault gets
    the error; a request is answered only once its group has committed."""

    def __init__(self, app):
        self.database, self.background_checkpoints = app.config["DATABASE"], app.config["BACKGROUND_CHECKPOINTS"]
        self.lock = threading.Lock()
        self.turn = threading.Condition(self.lock)  # the writer's thread is woken when the waiting are its to write
        self.waiting = deque()
        self.busy = self.threads_turn = False  # a write is under way; it is the writer's thread's
        self.thread = self.conn = None

    def write(self, conn, builder, attestations):
        """write_attestations of one request: its log indexes, once committed."""
        request = WriteRequest(builder, attestations)
        with self.lock:
            writes_now = not self.busy
            if writes_now:
                self.busy = True
            else:
                self.waiting.append(request)
        if writes_now:
            try:
                write_group(conn, [request])
            finally:
                self.hand_over()
        elif not request.woken.wait(WRITER_TIMEOUT_S):
            self.stop_waiting(request)
        return request.outcome()

    def hand_over(self):
        """After a request's own write: the requests that came meanwhile are the writer's thread's to write."""
        with self.lock:
            if not self.waiting:
                self.busy = False
                return
            if self.thread is not None:
                self.threads_turn = True
                self.turn.notify()
                return
            thread = threading.Thread(target=self.run, name="attestation writer", daemon=True)
            try:
                thread.start()
            except RuntimeError as error:  # no thread to be had: the waiting are answered 503, not left to wait
                while self.waiting:
                    self.waiting.popleft().finish(error=sqlite3.OperationalError(f"database is busy: {error}"))
                self.busy = False
                return
            self.thread, self.threads_turn = thread, True

    def stop_waiting(self, request):
        """Give up a request that is still waiting; one in a group being written is waited for."""
        with self.lock:
            if request in self.waiting:
                self.waiting.remove(request)
                raise sqlite3.OperationalError(f"database is locked: not written within {WRITER_TIMEOUT_S} s")
        request.woken.wait()

    def run(self):
        with self.lock:
            while True:
                if not self.threads_turn:
                    if not self.turn.wait(WRITER_IDLE_S) and not self.threads_turn:
                        self.thread = None
                        self.close()
                        return
                elif not self.waiting:
                    self.busy = self.threads_turn = False
                else:
                    group = self.next_group()
                    self.lock.release()
                    try:
                        self.write_waiting(group)
                    finally:
                        self.lock.acquire()

    def write_waiting(self, group):
        """write_group on the writer's connection; every request is finished, whatever fails."""
        try:
            write_group(self.connection(), group)
        except Exception as error:  # no connection could be made
            for request in group:
                request.finish(error=error)
        if any(request.error is not None for request in group):
            self.close()  # a fault of the database, say: the next group connects again

    def next_group(self):
        group, count = [], 0
        while self.waiting and count < ATTESTATIONS_PER_GROUP:
            group.append(self.waiting.popleft())
            count += len(group[-1].attestations)
        return group

    def connection(self):
        if self.conn is None:
            self.conn = server_connection(self.database, self.background_checkpoints)
        return self.conn

    def close(self):
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.close()
            self.conn = None


def write_group(conn, group):
    """Write the WriteRequests in one transaction and finish each; a group that fails is written a request at a time."""
    try:
        results = write_attestations(conn, [(request.builder, request.attestations) for request in group])
    except Exception as error:
        if len(group) == 1 or database_is_unavailable(error):  # then each alone would wait as long again
            for request in group:
                request.finish(error=error)
        else:
            for request in group:
                write_group(conn, [request])
        return
    for request, log_indexes in zip(group, results):
        request.finish(log_indexes)


def with_builder(builder, attestations):
    for attestation in attestations:
        attestation["builder"] = builder
    return attestations


def key_of(attestation):
    return attestation["builder"]["id"], attestation["output_path"], attestation["output_hash"]


class StoredVersions:
    """What some builders have stored for some paths: {(builder id, path_id, nar hash bytes): (id, verified)}."""

    def __init__(self, conn, builder_ids, path_ids, per_query=500):
        self.versions = {}
        path_ids, builder_ids = sorted(path_ids), sorted(builder_ids)
        for start in range(0, len(path_ids), per_query):
            chunk = path_ids[start:start + per_query]
            for attestation_id, builder_id, path_id, nar_hash, verified in conn.execute(
                    "SELECT id, builder_id, path_id, nar_hash, verified FROM attestations"
                    f" WHERE path_id IN ({','.join('?' * len(chunk))}) AND builder_id IN ({','.join('?' * len(builder_ids))})",
                    [*chunk, *builder_ids]):
                self.versions[builder_id, path_id, nar_hash] = (attestation_id, verified)

    def changes(self, ordered, path_ids):
        """(new attestations, [(id, attestation)] upgrades of stored unverified ones to verified).

        As a unique index with "ON CONFLICT DO UPDATE … WHERE unverified" would: the first of equal
        attestations is stored, and the first verified one among them upgrades it.
        """
        new, upgrades, pending = [], [], {}
        for attestation in ordered:
            attestation["stored_hash"] = stored_hash(attestation["output_hash"])
            key = (attestation["builder"]["id"], path_ids[attestation["output_path"]], attestation["stored_hash"])
            if key in pending:
                position = pending[key]
                if attestation["verified"] and not new[position]["verified"]:
                    # A copy: the first may be another request's, which a failed group writes again alone.
                    new[position] = {**new[position], **upgraded_fields(attestation)}
            elif key in self.versions:
                attestation_id, verified = self.versions[key]
                if attestation["verified"] and not verified:
                    upgrades.append((attestation_id, attestation))
                    self.versions[key] = (attestation_id, 1)
            else:
                pending[key] = len(new)
                new.append(attestation)
        return new, upgrades

    def latest_index(self, conn, path_id, attestation):
        """The index of the latest log entry of a stored attestation that this request left as it was."""
        attestation_id, _verified = self.versions[attestation["builder"]["id"], path_id, stored_hash(attestation["output_hash"])]
        later = conn.execute("SELECT MAX(idx) FROM log_entries WHERE attestation_id = ?", (attestation_id,)).fetchone()[0]
        return attestation_id if later is None else max(later, attestation_id)


def upgraded_fields(attestation):
    """What an upgrade to verified changes."""
    return {name: attestation[name] for name in ("output_sig", "signature", "nar_size", "references", "verified")}


def insert_attestations(conn, new, path_ids, first_id, created_at):
    drv_paths = [store_path(f"{attestation['drv_ident']}.drv") if attestation["drv_ident"] else None
                 for attestation in new]
    drv_ids = interned_paths(conn, "derivations", set(drv_paths) - {None})
    key_ids = key_name_ids(conn, {attestation["signature"][0] for attestation in new})
    time_text = stored_time_text(created_at)
    rows = []
    for offset, (attestation, drv_path) in enumerate(zip(new, drv_paths)):
        key_name, sig = attestation["signature"]
        builder = attestation["builder"]
        entry = log_entry(builder["name"], attestation["output_path"], drv_path, attestation["output_hash"],
                          attestation["nar_size"], attestation["references"], attestation["output_sig"],
                          attestation["verified"], time_text)
        rows.append(((first_id + offset, path_ids[attestation["output_path"]], builder["id"], drv_ids.get(drv_path),
                      key_ids.get(key_name), attestation["nar_size"], stored_references(attestation["references"]),
                      int(attestation["verified"]), created_at, attestation["source"], attestation.get("ca")),
                     attestation["stored_hash"] + leaf_hash(entry), sig))
    for chunk in chunks_of(rows, ROWS_PER_STATEMENT):
        insert_attestation_rows(conn, chunk)


# Rows are written a statement over JSON per ROWS_PER_STATEMENT, not a statement each: a statement gives up the
# interpreter, and under load waits to get it back, all the while holding the write lock. Not more at once:
# SQLite parses a statement's JSON whole, and a batch of 10,000 in one took 5 MiB more.
ROWS_PER_STATEMENT = 2_000


def insert_attestation_rows(conn, rows):
    """Insert (column values, NAR hash and leaf hash bytes, signature bytes or None) rows in one statement; the
    hashes and signatures, of fixed sizes, are cut from two blobs."""
    values, sigs = [], []
    for columns, _hashes, sig in rows:
        values.append((*columns, None if sig is None else len(sigs)))
        if sig is not None:
            sigs.append(sig)
    conn.execute("INSERT INTO attestations (id, path_id, builder_id, derivation_id, nar_hash, sig_key_id, sig,"
                 " nar_size, refs, verified, created_at, source, ca, leaf_hash)"
                 " SELECT value->>0, value->>1, value->>2, value->>3, substr(?2, 64 * key + 1, 32), value->>4,"
                 f" iif(value->>11 IS NULL, NULL, substr(?3, {SIGNATURE_BYTES} * (value->>11) + 1, {SIGNATURE_BYTES})),"
                 " value->>5, value->>6, value->>7, value->>8, value->>9, value->>10, substr(?2, 64 * key + 33, 32)"
                 " FROM json_each(?1)", (json_rows(values), b"".join([hashes for _columns, hashes, _sig in rows]), b"".join(sigs)))


def upgrade_attestation(conn, attestation_id, attestation, index):
    """Mark a stored attestation verified, keeping the bytes of its log entries so far; log it again at index."""
    freeze_entries(conn, attestation_id)
    key_name, sig = attestation["signature"]
    key_ids = key_name_ids(conn, {key_name})
    conn.execute("UPDATE attestations SET sig_key_id = ?, sig = ?, nar_size = ?, refs = ?, verified = 1 WHERE id = ?",
                 (key_ids.get(key_name), sig, attestation["nar_size"], stored_references(attestation["references"]),
                  attestation_id))
    entry = entry_of_attestation(attestation_object(attestation_row(conn, attestation_id)))
    conn.execute("INSERT INTO log_entries (idx, attestation_id, leaf_hash) VALUES (?, ?, ?)",
                 (index, attestation_id, leaf_hash(entry)))
    return index


def interned_paths(conn, table, paths):
    """{store path: id} in `table` (store_paths or derivations), adding the new ones, in index order; found and
    added a statement per ROWS_PER_STATEMENT paths."""
    keyed = sorted((path_key(path), path) for path in paths)
    ids = {}
    for chunk in chunks_of(keyed, ROWS_PER_STATEMENT):
        ids.update(stored_path_ids(conn, table, chunk))
    missing = [(key, path) for key, path in keyed if path not in ids]
    if missing:
        next_id = (conn.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0] or 0) + 1
        for start in range(0, len(missing), ROWS_PER_STATEMENT):
            chunk = missing[start:start + ROWS_PER_STATEMENT]
            conn.execute(f"INSERT INTO {table} (id, digest, name) SELECT ?3 + key, substr(?2, 20 * key + 1, 20), value"
                         " FROM json_each(?1)", (json_rows([name for (_digest, name), _path in chunk]),
                                                 b"".join([digest for (digest, _name), _path in chunk]), next_id + start))
        ids.update((path, next_id + offset) for offset, (_key, path) in enumerate(missing))
    return ids


def stored_path_ids(conn, table, keyed):
    """{store path: id} of those of the ((digest, name), path) in `table`, from one statement."""
    listed = "SELECT key, value AS name, substr(?2, 20 * key + 1, 20) AS digest FROM json_each(?1)"
    (found,) = conn.execute(f"SELECT json_group_array(json_array(listed.key, {table}.id)) FROM ({listed}) AS listed"
                            f" JOIN {table} ON {digest_match(table, 'listed.digest')} AND {table}.name = listed.name",
                            (json_rows([name for (_digest, name), _path in keyed]),
                             b"".join([digest for (digest, _name), _path in keyed]))).fetchone()
    return {keyed[position][1]: path_id for position, path_id in msgspec.json.decode(found)}


def key_name_ids(conn, names):
    """{key name: id}, adding the names not stored yet; the empty name (no signature) has none."""
    names = sorted(name for name in names if name)
    conn.executemany("INSERT OR IGNORE INTO key_names (name) VALUES (?)", [(name,) for name in names])
    return {name: conn.execute("SELECT id FROM key_names WHERE name = ?", (name,)).fetchone()[0] for name in names}


# ---------------------------------------------------------------- stored forms
# Attestations keep paths, hashes, signatures and times in their binary forms; these give back the
# exact text that was posted (which web.py had checked to be in its one spelling). A row migrated
# from version 8 that was not keeps its text, which these pass through.

PATH_PREFIX = len(STORE_DIR) + 1
# store_paths and derivations are indexed by this many first bytes of the digest (schema.sql), not all 20:
# a batch's new paths land all over those indexes, and the smaller they are, the fewer pages it rewrites.
DIGEST_INDEX_BYTES = 4


def path_key(path):
    """A checked store path -> (digest bytes, name)."""
    return path_digest(path), path[PATH_PREFIX + 33:]


def path_digest(path):
    """A checked store path's hash part -> its number in 20 big-endian bytes, as store_paths keeps it."""
    return nix_base32_number(path[PATH_PREFIX:PATH_PREFIX + 32]).to_bytes(20, "big")


def path_digests(paths):
    """path_digest of each of many checked store paths: their hash parts are translated in one go, which takes
    a third of the time of a translation each."""
    hash_parts = "".join([path[PATH_PREFIX:PATH_PREFIX + 32] for path in paths]).translate(TO_STANDARD_BASE32)
    return [int(hash_parts[start:start + 32], 32).to_bytes(20, "big") for start in range(0, len(hash_parts), 32)]


def digest_of(text):
    """32 nix base32 characters -> their number in 20 big-endian bytes (which sort as the text does), or None."""
    if not isinstance(text, str) or not DIGEST_RE.fullmatch(text):
        return None
    return nix_base32_number(text).to_bytes(20, "big")


def path_text(digest, name):
    return f"{STORE_DIR}/{nix_base32_encode(digest[::-1])}-{name}"


def indexed_prefix(digest):
    """SQL: what store_paths and derivations index of a digest (the SQL expression `digest`)."""
    return f"substr({digest}, 1, {DIGEST_INDEX_BYTES})"


def digest_match(table, digest):
    """SQL: the row `table` (of store_paths or derivations) has the digest that the SQL expression `digest` gives."""
    return f"{indexed_prefix(f'{table}.digest')} = {indexed_prefix(digest)} AND {table}.digest = {digest}"


def path_match(table, column):
    """SQL: the store_paths row `table` is the path in the text column `column`."""
    return (f"{digest_match(table, f'nix32_digest(substr({column}, {PATH_PREFIX + 1}, 32))')}"
            f" AND {table}.name = substr({column}, {PATH_PREFIX + 34})")


def path_id_condition(column):
    """SQL: column holds the id of the store path whose path_lookup() are the parameters."""
    return f"{column} IN (SELECT id FROM store_paths WHERE {digest_match('store_paths', '?')} AND name = ?)"


def path_lookup(path):
    """A checked store path -> (digest, digest, name): the parameters of path_id_condition, whose digest_match
    on '?' takes the digest twice (for the index's prefix and for the whole)."""
    digest, name = path_key(path)
    return digest, digest, name


def stored_hash(text):
    """'sha256:<nix base32>' (normalize_nar_hash's spelling) -> its 32 bytes."""
    if not CANONICAL_SHA256_RE.fullmatch(text):
        raise ValueError(f"not a NAR hash in its one spelling: {shorten(text)!r}")
    return nix_base32_number(text[7:]).to_bytes(32, "little")


def hash_text(value):
    return value if isinstance(value, str) else "sha256:" + nix_base32_encode(value)


def signature_text(key_name, sig):
    if sig is None:
        return ""
    return sig if isinstance(sig, str) else f"{key_name}:{base64.b64encode(sig).decode()}"


def stored_references(references):
    return None if references is None else json.dumps(references)


def stored_time_text(seconds):
    return seconds if isinstance(seconds, str) else iso_time(seconds)


# What a log entry holds and an attestation object shows.
ATTESTATION_COLUMNS = (
    "SELECT attestations.id, builders.name AS builder, derivations.digest AS drv_digest, derivations.name AS drv_name,"
    " store_paths.digest AS path_digest, store_paths.name AS path_name, attestations.nar_hash,"
    " key_names.name AS key_name, attestations.sig, attestations.nar_size, attestations.refs, attestations.verified,"
    " attestations.created_at, attestations.source, attestations.ca"
    " FROM attestations JOIN builders ON builders.id = attestations.builder_id"
    " JOIN store_paths ON store_paths.id = attestations.path_id"
    " LEFT JOIN derivations ON derivations.id = attestations.derivation_id"
    " LEFT JOIN key_names ON key_names.id = attestations.sig_key_id ")


def attestation_row(conn, attestation_id):
    return conn.execute(ATTESTATION_COLUMNS + "WHERE attestations.id = ?", (attestation_id,)).fetchone()


def attestation_object(row):
    """The attestation as the API shows it, from an ATTESTATION_COLUMNS row."""
    return {
        "builder": row["builder"],
        "drv_path": path_text(row["drv_digest"], row["drv_name"]) if row["drv_digest"] else None,
        "output_path": path_text(row["path_digest"], row["path_name"]),
        "output_hash": hash_text(row["nar_hash"]),
        "output_sig": signature_text(row["key_name"], row["sig"]),
        "nar_size": row["nar_size"],
        "references": json.loads(row["refs"]) if row["refs"] is not None else None,
        "created_at": stored_time_text(row["created_at"]),
        "verified": bool(row["verified"]),
        "source": row["source"],
        "ca": row["ca"],
    }


def attestations_of_output(conn, output_path):
    rows = conn.execute(ATTESTATION_COLUMNS + "WHERE " + path_id_condition("attestations.path_id") +
                        " ORDER BY attestations.id", path_lookup(output_path))
    return [attestation_object(row) for row in rows]


def output_path_of_basename(basename):
    checked("path", parse_store_basename, basename)
    return store_path(basename)


# ---------------------------------------------------------------- verdicts

# verdict(builders_by_hash, trusted, minimum), the rule itself, is in post_build_hook.py:
# `monitor` applies it to the log and `challenge --trust` to the server's attestations.

MAX_POLICY_BUILDERS = 100
POLICY_NAME_RE = REPORT_NAME_RE


class Policy(NamedTuple):
    """Whose attestations count towards a verdict, and how many of them must agree.

    builders: the trusted builders' names, sorted (None: every builder); builder_ids: their ids;
    minimum: distinct builders with one hash for "reproduced"; verified_only: only verified
    attestations count; name: the named policy it came from, if any.
    """
    builders: tuple = None
    builder_ids: frozenset = None
    minimum: int = 2
    verified_only: bool = False
    name: str = None

    @property
    def cache_key(self):
        """The same for every request that gets the same verdicts: what a view cache keys on."""
        trusted = ",".join(self.builders) if self.builders is not None else "*"
        return f"trust={trusted};min={self.minimum};verified={int(self.verified_only)}"

    @property
    def is_default(self):
        return self.builders is None and self.minimum == 2 and self.verified_only == default_policy().verified_only

    def verdict(self, builders_by_hash):
        """builders_by_hash holds builder ids of the attestations that count (is_counted)."""
        return verdict(builders_by_hash, self.builder_ids, self.minimum)

    def attestations_clause(self):
        """The SQL side of is_counted, to append to a condition on attestations."""
        return " AND attestations.verified = 1" if self.verified_only else ""

    def is_counted(self, attestation):
        return bool(attestation["verified"]) or not self.verified_only

    def trusts(self, builder_id):
        return self.builder_ids is None or builder_id in self.builder_ids

    def query_args(self):
        """The URL query that gives this policy again: links carry it."""
        if self.name is not None:
            return {"policy": self.name}
        if self.is_default:
            return {}
        args = {"min": str(self.minimum), "verified": str(int(self.verified_only))}
        return {"trust": ",".join(self.builders), **args} if self.builders is not None else args


def default_policy():
    """Today's rule: every builder, two must agree, and the server's verified-only mode."""
    return Policy(verified_only=bool(current_app.config["REQUIRE_SIGNATURES"]))


def policy_of(conn, names, minimum, verified, name=None):
    """A checked Policy from builder names (None: every builder), min and verified (None: the server's mode)."""
    require_signatures = bool(current_app.config["REQUIRE_SIGNATURES"])
    if verified is False and require_signatures:
        raise BadInput("verified: this server counts only verified attestations (verified-only mode); verified=0 is refused")
    verified_only = require_signatures if verified is None else verified
    if names is None:
        # At most the number of builders, as with a trust list: each larger min is the same verdicts, and a view
        # of its own to render.
        (builders,) = conn.execute("SELECT COUNT(*) FROM builders").fetchone()
        if not 2 <= minimum <= max(2, builders):
            raise BadInput(f"min: expected 2 to {max(2, builders)} (the number of builders), got {minimum}")
        return Policy(None, None, minimum, verified_only, name)
    ids = builder_ids_of(conn, names)
    if not 2 <= minimum <= len(ids):
        raise BadInput(f"min: expected 2 to {len(ids)} (the number of builders in trust), got {minimum}")
    return Policy(tuple(sorted(ids)), frozenset(ids.values()), minimum, verified_only, name)


def builder_ids_of(conn, names):
    """{name: id} of these builders; 400 naming every unknown one."""
    if not names:
        raise BadInput("trust: expected a comma-separated list of builder names, got none")
    if len(names) > MAX_POLICY_BUILDERS:
        raise BadInput(f"trust: at most {MAX_POLICY_BUILDERS} builders, got {len(names)}")
    ids = dict(conn.execute("SELECT name, id FROM builders WHERE name IN (SELECT value FROM json_each(?))",
                            (json.dumps(names),)).fetchall())
    unknown = [name for name in names if name not in ids]
    if unknown:
        raise BadInput(f"trust: unknown builders: {', '.join(repr(shorten(name)) for name in unknown)}")
    return ids


def request_policy(conn):
    """The policy a request asks for (?policy=NAME, or ?trust=&min=&verified=), else the server's default."""
    args = request.args
    if "policy" in args:
        if {"trust", "min", "verified"} & args.keys():
            raise BadInput("policy: give either policy=NAME or trust, min and verified, not both")
        return named_policy(conn, args["policy"])
    if not {"trust", "min", "verified"} & args.keys():
        return default_policy()
    # An empty trust (the page's form left blank) is every builder.
    names = list(dict.fromkeys(filter(None, args["trust"].split(",")))) if args.get("trust") else None
    return policy_of(conn, names, policy_minimum(args.get("min", "2")), policy_verified(args.get("verified")))


def policy_minimum(raw):
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and re.fullmatch(r"[0-9]{1,4}", raw):
        return int(raw)
    raise BadInput(f"min: expected a whole number, got {shorten(json.dumps(raw))}")


def policy_verified(raw):
    if raw is None or isinstance(raw, bool):
        return raw
    if raw not in ("0", "1"):
        raise BadInput(f"verified: expected 0 or 1, got {shorten(raw)!r}")
    return raw == "1"


def named_policy(conn, name):
    row = conn.execute("SELECT name, builders, min, verified_only FROM policies WHERE name = ?", (name,)).fetchone()
    if row is None:
        abort(404, f"no policy named {shorten(name)!r}")
    verified = None if row["verified_only"] is None else bool(row["verified_only"])
    return policy_of(conn, json.loads(row["builders"]), row["min"], verified, row["name"])


def parse_policy_body(conn, body):
    """The stored columns of a policy from {"trust": [names], "min": N, "verified": true|false}, checked."""
    if not isinstance(body, dict):
        raise BadInput('policy: expected a JSON object {"trust": [builder names], "min": 2, "verified": true}')
    unexpected = body.keys() - {"trust", "min", "verified"}
    if unexpected:
        raise BadInput(f"policy: unexpected fields {', '.join(sorted(map(repr, unexpected)))}")
    names = body.get("trust")
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise BadInput("trust: expected a list of builder names")
    names = list(dict.fromkeys(names))
    verified = body.get("verified")
    if verified is not None and not isinstance(verified, bool):
        raise BadInput(f"verified: expected true or false, got {shorten(json.dumps(verified))}")
    policy = policy_of(conn, names, policy_minimum(body.get("min", 2)), verified)
    return json.dumps(list(policy.builders)), policy.minimum, verified


POLICY_COLUMNS = ("SELECT policies.name, policies.builders, policies.min, policies.verified_only, policies.updated_at,"
                  " builders.name AS owner FROM policies JOIN builders ON builders.id = policies.owner_id")


def policy_object(row):
    verified = None if row["verified_only"] is None else bool(row["verified_only"])
    return {"name": row["name"], "trust": json.loads(row["builders"]), "min": row["min"], "verified": verified,
            "owner": row["owner"], "updated_at": row["updated_at"]}


def path_verdicts(conn, out_paths, policy):
    """{out_path: label} for any store paths, such as an older revision's, under a policy: from their attestations
    now, where report_labels reads what reported_paths keeps. FIXED_OUTPUT where a counted attestation says so, as
    report_labels does; what an upload says is the revision's (as_listed)."""
    rows = conn.execute(f"SELECT paths.value, {attested_column('store_paths.id')},"
                        f" {attested_fixed_column('store_paths.id')} >= {counted_fixed_output()} FROM json_each(?) AS paths"
                        f" LEFT JOIN store_paths ON {path_match('store_paths', 'paths.value')}",
                        (json.dumps(list(dict.fromkeys(out_paths))),))
    verdict_of = verdict_of_attested(policy)
    return {out_path: FIXED_OUTPUT if fixed else verdict_of(attested) for out_path, attested, fixed in rows}


def attested_column(path_id):
    """SQL: who attested which hash of the store path whose id is the SQL expression path_id, as text: the
    builder ids of each hash joined by ',', a 'v' after a verified one, and the hashes by '|' ('1v,2|3';
    NULL: none). Every verdict, under any policy, is read from it (counted_builders_by_hash). reported_paths
    keeps it for each path a report lists, brought up to date as attestations arrive (refresh_reported_paths),
    so views read a row per path rather than search the attestations of each."""
    return ("(SELECT group_concat(builders, '|') FROM (SELECT group_concat(attestations.builder_id"
            " || iif(attestations.verified, 'v', '')) AS builders"
            f" FROM attestations WHERE attestations.path_id = {path_id} GROUP BY attestations.nar_hash))")


def attested_fixed_column(path_id):
    """SQL: 2 when a verified attestation of the path (by id) says it is fixed-output, 1 when only unverified
    ones do, else 0: through the index of the few fixed-output attestations."""
    return (f"(SELECT ifnull(MAX(1 + attestations.verified), 0) FROM attestations"
            f" WHERE attestations.path_id = {path_id} AND attestations.ca IS NOT NULL)")


def builder_count_column(path_id, verified_only):
    """SQL: how many distinct builders attested the store path (by id), counting only verified attestations if so."""
    return (f"(SELECT COUNT(DISTINCT attestations.builder_id) FROM attestations WHERE attestations.path_id = {path_id}"
            f"{Policy(verified_only=verified_only).attestations_clause()})")


# What reported_paths keeps of each path's attestations, and the SQL that computes them from a store path id.
ATTESTED_COLUMNS = ("attested", "attested_fixed", "builders", "verified_builders")


def attested_values(path_id):
    """SQL: the values of ATTESTED_COLUMNS for the store path whose id is the SQL expression path_id."""
    return ", ".join([attested_column(path_id), attested_fixed_column(path_id), builder_count_column(path_id, False),
                      builder_count_column(path_id, True)])


def reported_rows(listed):
    """SQL: (digest, name, ATTESTED_COLUMNS) of the store paths that the query `listed` gives as (digest, name)."""
    return (f" SELECT listed.digest, listed.name, {attested_values('store_paths.id')} FROM ({listed}) AS listed"
            f" LEFT JOIN store_paths ON {digest_match('store_paths', 'listed.digest')} AND store_paths.name = listed.name")


def counted_builders_by_hash(attested, verified_only):
    """{hash: builder ids} of attested_column's text, of the attestations that count (only verified ones, if so)."""
    builders_by_hash = {}
    for position, builders in enumerate(attested.split("|") if attested else ()):
        ids = {int(entry.rstrip("v")) for entry in builders.split(",") if not verified_only or entry.endswith("v")}
        if ids:
            builders_by_hash[position] = ids
    return builders_by_hash


def verdict_of_attested(policy):
    """A function from attested_column's text to the verdict under the policy, remembering each text's:
    a report has a few such texts for its thousands of paths."""
    @functools.lru_cache(maxsize=None)
    def verdict_of(attested):
        return policy.verdict(counted_builders_by_hash(attested, policy.verified_only))
    return verdict_of


def counted_fixed_output():
    """The least attested_fixed_column that makes a path fixed-output: a verified attestation's in verified-only mode."""
    return 2 if default_policy().verified_only else 1


def fixed_output_condition():
    """SQL: the report path is fixed-output, as its upload (path-info's ca) or a counted attestation says
    (for a query that has joined its reported_paths row: REPORTED_PATHS_JOIN)."""
    return f"(report_paths.ca IS NOT NULL OR ifnull(reported_paths.attested_fixed, 0) >= {counted_fixed_output()})"


# The reported_paths row of each report path, for the views.
REPORTED_PATHS_JOIN = ("LEFT JOIN reported_paths ON reported_paths.digest = report_paths.digest"
                       f" AND reported_paths.name = substr(report_paths.out_path, {PATH_PREFIX + 34})")


def report_labels(conn, report_id, policy):
    """{out_path: label} that every view of a report shows: the path's verdict under the policy, or FIXED_OUTPUT.
    From one query, a row per path in the report's path order."""
    rows = conn.execute(f"SELECT report_paths.out_path, {fixed_output_condition()}, reported_paths.attested"
                        f" FROM report_paths {REPORTED_PATHS_JOIN} WHERE report_paths.report_id = ?", (report_id,))
    verdict_of = verdict_of_attested(policy)
    return {out_path: FIXED_OUTPUT if fixed else verdict_of(attested) for out_path, fixed, attested in rows}


def refresh_reported_paths(conn, path_ids):
    """Bring the reported_paths rows of these store paths (by id), whose attestations changed, up to date: a probe
    of its primary key each, in the writer's transaction, so no view reads a row older than the attestations."""
    conn.execute(f"UPDATE reported_paths SET ({', '.join(ATTESTED_COLUMNS)}) = ({attested_values('store_paths.id')})"
                 " FROM json_each(?) AS changed JOIN store_paths ON store_paths.id = changed.value"
                 " WHERE reported_paths.digest = store_paths.digest AND reported_paths.name = store_paths.name",
                 (json_rows(sorted(path_ids)),))


def verdict_counts(labels):
    counts = Counter(labels.values())
    return {label: counts.get(label, 0) for label in REPORT_LABELS}


def headline(counts):
    """r13y's headline: paths reproduced among those that are not fixed-output."""
    total = sum(counts[label] for label in VERDICTS)
    reproduced = counts[REPRODUCED]
    return {"reproduced": reproduced, "total": total, "percent": round(100 * reproduced / total, 2) if total else None,
            "fixed_output": counts[FIXED_OUTPUT]}


def headline_sentence(numbers):
    if not numbers["total"]:
        return "0 of 0 paths reproduced"
    return f"{numbers['reproduced']} of {numbers['total']} paths reproduced ({numbers['percent']:.2f}%)"


# ---------------------------------------------------------------- SBOM parsing

class ReportTooLarge(BadInput):
    """An SBOM beyond this server's limits on a report's size; the message names the limit."""


class SbomContents(NamedTuple):
    """What a report keeps of its SBOM: columns by component index, not an object per component,
    so that a million-path SBOM costs one tuple per store path."""
    root: str
    names: list
    drv_paths: list
    paths: list  # (out_path, component index, output name)
    children: dict  # {component index: {child index: None}}, the edges
    fixed_output: dict = {}  # {out_path: "fixed:…" ca} of paths the upload marks fixed-output

    def tree_json(self):
        """The display tree's rows as JSON (display_tree)."""
        return tree_json(display_tree(len(self.names), self.children))


def parse_sbom(sbom, max_paths, max_edges, edges=True):
    """Map a CycloneDX SBOM of any producer's shape, as generic JSON, to its components, store paths and display tree.

    The SBOM's objects are released as they are read, so a large SBOM is never held twice.
    """
    if not isinstance(sbom, dict) or sbom.get("bomFormat") != "CycloneDX":
        raise BadInput("body is not a CycloneDX SBOM: expected a JSON object with \"bomFormat\": \"CycloneDX\"")
    metadata = sbom.get("metadata")
    root_component = metadata.get("component") if isinstance(metadata, dict) else None
    if not isinstance(root_component, dict) or not isinstance(root_component.get("bom-ref"), str):
        raise BadInput("SBOM has no root: expected metadata.component with a bom-ref")
    raw_components = sbom.get("components") or []
    if not isinstance(raw_components, list):
        raise BadInput("SBOM components: expected a list")
    dependencies = sbom.get("dependencies")
    return sbom_contents(root_component["bom-ref"], generic_components(root_component, raw_components),
                         generic_dependencies(dependencies if isinstance(dependencies, list) else []), max_paths, max_edges,
                         edges)


def sbom_contents(root_ref, components, dependencies, max_paths, max_edges, edges=True):
    """SbomContents of an SBOM's (bom-ref, name, {nix property: [values]}) components, the root first,
    and its (ref, [dependsOn refs]) dependencies, whichever reader gave them; without edges (children
    None, dependencies not read) when the tree worker reads them (usual_sbom_edges)."""
    index_of_ref, names, drv_paths, paths = read_components(components, max_paths)
    if not paths:
        raise BadInput("SBOM yields no store path: no component has a /nix/store output path")
    refuse_nul_characters(names, "name")
    refuse_nul_characters([output for _out_path, _index, output in paths], "nix:output")
    root = paths[0][0] if paths[0][1] == 0 else root_ref
    children = dependency_children(dependencies, index_of_ref, max_edges) if edges else None
    return SbomContents(root, names, drv_paths, paths, children)


def refuse_nul_characters(texts, what):
    """A NUL character is not text, and SQLite's JSON functions, which write a report's rows, would cut it short."""
    if "\x00" in "".join(filter(None, texts)):
        found = next(text for text in texts if text and "\x00" in text)
        raise BadInput(f"SBOM: a component's {what} {shorten(found)!r} holds a NUL character, which is not text")


def generic_components(root_component, raw_components):
    """(bom-ref, name, nix properties) of each component object with a string bom-ref; anything else is skipped."""
    for raw in itertools.chain([root_component], released(raw_components)):
        ref = raw.get("bom-ref") if type(raw) is dict else None
        if type(ref) is str:
            name = raw.get("name")
            yield ref, name if type(name) is str else None, nix_properties(raw)


def generic_dependencies(dependencies):
    """(ref, dependsOn) of each dependency object with a string ref and a list; anything else is skipped."""
    for dependency in released(dependencies):
        if type(dependency) is dict:
            parent, depends_on = dependency.get("ref"), dependency.get("dependsOn")
            if type(parent) is str and type(depends_on) is list:
                yield parent, depends_on


def read_components(components, max_paths):
    """({bom-ref: index}, names, drv_paths, [(out_path, index, output)]); the root is index 0."""
    index_of_ref, names, drv_paths, paths = {}, [], [], []
    for ref, name, properties in components:
        if ref in index_of_ref:
            continue
        index = len(names)
        if index == max_paths:
            raise ReportTooLarge(f"SBOM: more than {max_paths} components; this server's limit is {max_paths}"
                                 " components and store paths per report (--max-report-paths)")
        index_of_ref[ref] = index
        drv_path, outputs = component_outputs_of(ref, properties, index)
        names.append(name)
        drv_paths.append(drv_path)
        paths += outputs
        if len(paths) > max_paths:
            raise ReportTooLarge(f"SBOM: more than {max_paths} store paths; this server's limit is {max_paths}"
                                 " components and store paths per report (--max-report-paths)")
    return index_of_ref, names, drv_paths, paths


def released(items):
    """Each item of a list, dropped from the list once read, so its memory goes as the next is built."""
    for position, item in enumerate(items):
        items[position] = None
        yield item


def release_in_slices(*lists, slice_length=10_000):
    """Empty the lists from the end a slice at a time: freeing a million tuples in one go
    holds the interpreter, and so every other request, for a second."""
    for items in lists:
        while items:
            del items[-slice_length:]


NIX_PROPERTIES = frozenset({"nix:drv_path", "nix:out_path", "nix:output_path", "nix:output"})


def nix_properties(raw):
    """{name: [values]} of a component's nix: string properties that component_outputs_of reads; a name may repeat (sbomnix)."""
    found = {}
    listed = raw.get("properties")
    if type(listed) is list:
        for prop in listed:
            if type(prop) is dict:
                name, value = prop.get("name"), prop.get("value")
                if type(name) is str and type(value) is str and name in NIX_PROPERTIES:
                    found.setdefault(name, []).append(value)
    return found


def component_outputs_of(ref, properties, index):
    """(drv_path, [(out_path, index, output)]) of one SBOM component: its bom-ref and {nix property: [values]}."""
    drv_path = properties["nix:drv_path"][0] if "nix:drv_path" in properties else None
    if drv_path is None and ref.endswith(".drv"):
        drv_path = ref if ref.startswith(STORE_DIR + "/") else store_path(ref)
    if drv_path is not None and not (STORE_PATH_RE.fullmatch(drv_path) and drv_path.endswith(".drv")):
        drv_path = None
    candidates = properties.get("nix:out_path", []) + properties.get("nix:output_path", [])
    if not candidates and not ref.endswith(".drv"):
        candidates = [ref if ref.startswith("/") else store_path(ref)]
    if len(candidates) == 1:  # the usual case, without a list built by a comprehension
        out_paths = candidates if STORE_PATH_RE.fullmatch(candidates[0]) else []
    else:
        out_paths = [path for path in dict.fromkeys(candidates) if STORE_PATH_RE.fullmatch(path)]
    output_names = properties.get("nix:output")
    if len(out_paths) == 1 and output_names:
        outputs = [(out_paths[0], index, output_names[0])]
    else:
        outputs = [(path, index, output_name(path, drv_path)) for path in out_paths]
    return drv_path, outputs


def output_name(out_path, drv_path):
    """'out', 'dev', ... from how Nix names outputs: <drv name> or <drv name>-<output>. Both are valid store paths."""
    if drv_path is None:
        return None
    drv_name = name_of(drv_path).removesuffix(".drv")
    out_name = name_of(out_path)
    if out_name == drv_name:
        return "out"
    if out_name.startswith(drv_name + "-"):
        return out_name[len(drv_name) + 1:]
    return None


def dependency_children(dependencies, index_of_ref, max_edges):
    """{component index: {child index: None}} of (ref, dependsOn) pairs, each child once; refs that match
    no component are dropped.

    A child listed many times is one edge: the limit counts distinct edges.
    """
    children, edges = {}, 0
    index_of = index_of_ref.get
    for parent, depends_on in dependencies:
        parent = index_of(parent)
        if parent is None:
            continue
        try:
            found = dict.fromkeys(map(index_of, depends_on))
        except TypeError:  # a ref that is a list or object, which cannot be a dict key, names no component
            found = dict.fromkeys(index_of(ref) for ref in depends_on if type(ref) is str)
        found.pop(None, None)
        found.pop(parent, None)
        kids = children.get(parent)
        if kids is None:  # the usual case: one dependencies entry per component
            children[parent], edges = found, edges + len(found)
        else:
            edges -= len(kids)
            kids.update(found)
            edges += len(kids)
        if edges > max_edges:
            raise ReportTooLarge(f"SBOM: more than {max_edges} distinct dependency edges; this server's limit"
                                 f" is {max_edges} per report (--max-report-edges)")
    return children


def display_tree(count, children):
    """Depth-first rows as compact JSON: [depth,index,1] for a component shown with its subtree, and
    [depth,[indices],0] for children already shown (or cycles), listed as references.

    Each component is expanded once, so the tree stays linear in the SBOM's size.
    Components that the root does not reach follow it at depth 0. Each row is written
    here, not by json.dumps, which takes twice as long over tuples of ints.
    """
    expanded = bytearray(count)
    text = list(map(str, range(count)))  # each index as text once, not once per row that lists it
    for top in range(count):
        if expanded[top]:
            continue
        stack = [(top, 0)]
        while stack:
            index, depth = stack.pop()
            if expanded[index]:
                yield f"[{depth},[{text[index]}],0]"
                continue
            expanded[index] = 1
            yield f"[{depth},{text[index]},1]"
            kids = children.get(index)
            if not kids:
                continue
            below = depth + 1
            shown = [text[child] for child in kids if expanded[child]]
            if shown:
                yield f"[{below},[{','.join(shown)}],0]"
            stack.extend([(child, below) for child in reversed(kids) if not expanded[child]])


def tree_json(rows, rows_per_piece=10_000):
    """The rows of display_tree as one JSON list, joined a piece at a time rather than as a list of all rows."""
    rows, pieces = iter(rows), []
    while piece := ",".join(itertools.islice(rows, rows_per_piece)):
        pieces.append(piece)
    return "[" + ",".join(pieces) + "]"


# ---------------------------------------------------------------- the usual shapes, read by msgspec
# CycloneDX SBOMs and Nix 2.8's path-info are read by msgspec into typed objects when they have the usual
# shape: in C, it skips the fields nothing reads and checks the types of those that are read, in about half
# the time json.loads takes to build every object. An upload of any other shape fails that check and is read
# again as generic JSON by the readers above, which accept what they can and name what is wrong; so the
# typed readers decide speed, never what is accepted. Lists are decoded a slice of items at a time: one
# decode of a whole 64 MiB upload would hold the interpreter, and so every other request, for a quarter second.

TYPED_ITEMS_PER_DECODE = 2_000


class SbomProperty(msgspec.Struct):
    name: str
    value: str


class SbomComponent(msgspec.Struct):
    bom_ref: str | None = msgspec.field(name="bom-ref", default=None)
    name: str | None = None
    properties: list[SbomProperty] | None = None


class SbomDependency(msgspec.Struct):
    ref: str
    dependsOn: list[str] | None = None


class SbomMetadata(msgspec.Struct):
    component: SbomComponent


class UsualSbom(msgspec.Struct):
    bomFormat: str
    metadata: SbomMetadata
    components: list[msgspec.Raw] | None = None
    dependencies: list[msgspec.Raw] | None = None


class PathInfoItem(msgspec.Struct):
    path: str
    references: list[str]
    deriver: str | None = None
    ca: str | None = None
    valid: object = True  # Nix 2.8 prints false, and no references, for a path that is not in the store


class PathInfoNode(msgspec.Struct):
    """A path-info item with its references undecoded (usual_path_info_items checks they are a list): when the
    tree worker reads them, decoding them here too would take the request thread twice as long."""
    path: str
    references: msgspec.Raw
    deriver: str | None = None
    ca: str | None = None
    valid: object = True


USUAL_SBOM = msgspec.json.Decoder(UsualSbom)
SBOM_COMPONENTS = msgspec.json.Decoder(list[SbomComponent])
SBOM_DEPENDENCIES = msgspec.json.Decoder(list[SbomDependency])
PATH_INFO_LIST = msgspec.json.Decoder(list[msgspec.Raw])
PATH_INFO_ITEMS = msgspec.json.Decoder(list[PathInfoItem])
PATH_INFO_NODES = msgspec.json.Decoder(list[PathInfoNode])


class NotUsualShape(Exception):
    """The upload is not of the shape the typed readers take: the generic readers read it."""


def typed_items(raws, decoder):
    """The items of a list of raw JSON values, decoded a slice at a time; NotUsualShape if one is not of the type."""
    for start in range(0, len(raws), TYPED_ITEMS_PER_DECODE):
        yield from typed_document(decoder, b"[" + b",".join(raws[start:start + TYPED_ITEMS_PER_DECODE]) + b"]")


def typed_document(decoder, text):
    """The JSON text decoded to the decoder's type; NotUsualShape if it is not of that type."""
    try:
        return decoder.decode(text)
    except (msgspec.DecodeError, RecursionError):  # msgspec names deep nesting a RecursionError
        raise NotUsualShape from None


def usual_sbom_contents(body, max_paths, max_edges, edges=True):
    """SbomContents of a CycloneDX SBOM of the usual shape; NotUsualShape for any other JSON."""
    sbom = typed_document(USUAL_SBOM, body)
    root_component = sbom.metadata.component
    if sbom.bomFormat != "CycloneDX" or root_component.bom_ref is None:
        raise NotUsualShape
    components = itertools.chain([root_component], typed_items(sbom.components or [], SBOM_COMPONENTS))
    dependencies = typed_items(sbom.dependencies or [], SBOM_DEPENDENCIES)
    return sbom_contents(root_component.bom_ref,
                         ((component.bom_ref, component.name, typed_nix_properties(component.properties))
                          for component in components if component.bom_ref is not None),
                         ((dependency.ref, dependency.dependsOn) for dependency in dependencies
                          if dependency.dependsOn is not None), max_paths, max_edges, edges)


def typed_nix_properties(properties):
    """nix_properties of a typed component's properties."""
    found = {}
    for prop in properties or ():
        if prop.name in NIX_PROPERTIES:
            found.setdefault(prop.name, []).append(prop.value)
    return found


def usual_path_info_items(body, edges=True):
    """ClosureItems of Nix 2.8's path-info list when every path and deriver is a full store path, checked over
    all items at once; NotUsualShape for any other JSON (newer Nix's object keyed by path, basenames, errors).
    Without references (None) unless edges."""
    items = list(typed_items(typed_document(PATH_INFO_LIST, body), PATH_INFO_ITEMS if edges else PATH_INFO_NODES))
    if not edges and not all(memoryview(item.references)[:1] == b"[" for item in items):
        raise NotUsualShape  # not a list: the generic reader names the first item whose references are wrong
    paths = [item.path for item in items]
    derivers = [item.deriver for item in items if item.deriver is not None]
    if not (are_store_paths(paths) and are_store_paths(derivers) and all(item.valid is True for item in items)
            and all(deriver.endswith(".drv") for deriver in derivers)):
        raise NotUsualShape
    wheres = [f"path-info [{position}]" for position in range(len(items))]
    cas = [path_info_ca(item.ca, path, where, item.references) for item, path, where in zip(items, paths, wheres)]
    return [ClosureItem(item.path, item.references if edges else None, item.deriver, ca, where)
            for item, ca, where in zip(items, cas, wheres)]


# ---------------------------------------------------------------- reports from Nix's own output
# `nix path-info --json -r`, `nix-store -q --tree` and `nix-store -qR [--include-outputs]` describe a
# closure directly. Each is read into ClosureItems, and closure_contents turns those into the same
# SbomContents a CycloneDX SBOM gives, so storage, limits and views are shared.

PATH_INFO_TYPE = "application/x-nix-path-info+json"
NIX_TREE_TYPE = "text/x-nix-tree"
NIX_PATHS_TYPE = "text/x-nix-paths"
REPORT_TYPES = (CYCLONEDX_TYPE, PATH_INFO_TYPE, NIX_TREE_TYPE, NIX_PATHS_TYPE)
# One level of `nix-store -q --tree`: "├───" or "└───" before a path, "│   " or four spaces above it.
# Possessive (*+): the indentation is matched without a backtracking frame per level, which took 35 times a body's size.
TREE_LINE_RE = re.compile(r"((?:\u2502   |    )*+)([\u251c\u2514]\u2500\u2500\u2500)?(\S+?)( \[\.\.\.\])?")


class ClosureItem(NamedTuple):
    path: str
    references: list | None  # store paths, or in path-info the basenames newer Nix writes; closure_children checks
    # them. None when the tree worker reads them (usual_path_info_items)
    deriver: str | None
    ca: str | None  # "fixed:…" for a fixed-output path
    where: str  # where the item is in the upload, for error messages


def full_store_path(text, where, name):
    """A store path, from the full path or the basename newer Nix writes in path-info JSON; an error names where.name."""
    path = as_full_path(text)
    if type(path) is str and STORE_PATH_RE.fullmatch(path):
        return path
    return checked(f"{where}.{name}", lambda value: parse_store_path(value) and value, path)


def as_full_path(text):
    """The full path of what may be a basename (newer Nix's path-info JSON); anything else unchanged."""
    return store_path(text) if type(text) is str and not text.startswith("/") else text


def path_info_entries(document):
    """(path text, info object, where) from Nix 2.8's list or the object keyed by path of Nix 2.19 and later."""
    if isinstance(document, list):
        for position, info in enumerate(released(document)):
            where = f"path-info [{position}]"
            if type(info) is not dict:
                raise BadInput(f"{where}: expected an object, got {type(info).__name__}")
            yield field(info, "path", where), info, where
    elif isinstance(document, dict):
        for path, info in document.items():
            where = f"path-info {shorten(path)!r}"
            if not isinstance(info, dict):
                raise BadInput(f"{where}: expected an object, got {'null: not a valid path' if info is None else type(info).__name__}")
            yield path, info, where
    else:
        raise BadInput(f"path-info: expected a JSON list or object, got {type(document).__name__}")


def path_info_items(document):
    """ClosureItems of path-info as generic JSON; references are checked in closure_children, against the paths listed."""
    return list(path_info_one_by_one(document))


def path_info_one_by_one(document):
    for path_text, info, where in path_info_entries(document):
        path = full_store_path(path_text, where, "path")
        if info.get("valid", True) is not True:
            raise BadInput(f"{where}: {shorten(path)} is not a valid path (\"valid\": {json.dumps(info['valid'])})")
        references = field(info, "references", where, kind=list, required=False) or []
        deriver = info.get("deriver")
        deriver = path_info_deriver(deriver, where) if deriver is not None else None
        yield ClosureItem(path, references, deriver, path_info_ca(info.get("ca"), path, where, references), where)


def path_info_deriver(text, where):
    deriver = full_store_path(text, where, "deriver")
    if not deriver.endswith(".drv"):
        raise BadInput(f"{where}.deriver: expected the .drv store path that built it, got {shorten(deriver)!r}")
    return deriver


def path_info_ca(ca, path, where, references):
    """An item's ca as "fixed:…" once checked to be the content address of its path; None if it has none, or a well
    formed one that does not make it fixed-output: a .drv's text:…, or the output of a content-addressed derivation,
    which has references (Nix refuses a fixed-output path that has any), checked with them. references: a list, or
    its raw JSON."""
    if ca is None or checked(f"{where}.ca", is_text_content_address, ca):
        return None
    fixed = checked(f"{where}.ca", fixed_content_address, ca)
    if fixed is None:
        raise BadInput(f"{where}.ca: expected a content address, fixed:…, text:sha256:… or an object with method and hash,"
                       f" got {shorten(json.dumps(ca))}")
    paths = reference_paths(references)
    if paths is None:  # closure_children names what is wrong with them
        return None
    return checked(f"{where}.ca", lambda value: fixed_output_mark(path, value, paths), fixed)


def reference_paths(references):
    """The store paths of path-info references, full paths or basenames, in a list or its raw JSON (PathInfoNode);
    None unless they are a list of text."""
    if isinstance(references, msgspec.Raw):
        try:
            references = msgspec.json.decode(references)
        except msgspec.DecodeError:
            return None
    if type(references) is not list or not all(type(reference) is str for reference in references):
        return None
    return [as_full_path(reference) for reference in references]


TEXT_CA_RE = re.compile(f"text:sha256:[{NIX_BASE32}]{{52}}")


def is_text_content_address(ca):
    """Whether ca is a well formed content address of a path made from text (a .drv) or git: Nix 2.8's text:sha256:…,
    or newer Nix's {"method": "text"|"git", "hash": SRI}. ValueError for such an object whose hash is not one."""
    if isinstance(ca, dict) and ca.get("method") in ("text", "git"):
        sri_hash(ca.get("hash"))
        return True
    return isinstance(ca, str) and TEXT_CA_RE.fullmatch(ca) is not None


def nix_tree_items(text, max_lines):
    """Items of `nix-store -q --tree` output: a line's parent is the nearest line above it one level up. As Nix
    prints it, a path marked [...] was shown above, and nothing is listed under it."""
    references, where_of, parents = {}, {}, []  # parents: (path, marked [...]) of the lines above, by depth
    for number, line in text_lines(text, max_lines):
        depth, path, repeated = tree_line(line, number)
        if depth > len(parents):
            raise BadInput(f"tree line {number}: indented deeper than the line above it allows, in {shorten(line)!r}")
        del parents[depth:]
        if parents:
            parent, parent_repeated = parents[-1]
            if parent_repeated:
                raise BadInput(f"tree line {number}: {shorten(path)} is listed under a line marked [...],"
                               " which Nix never expands")
            references[parent][path] = None
        if repeated and path not in references:
            raise BadInput(f"tree line {number}: {shorten(path)} is marked [...], shown above, but no line above shows it")
        references.setdefault(path, {})
        where_of.setdefault(path, f"tree line {number}")
        parents.append((path, repeated))
    return [ClosureItem(path, list(refs), None, None, where_of[path]) for path, refs in references.items()]


def tree_line(line, number):
    """(depth, store path, whether it is marked [...]) of one line of `nix-store -q --tree`."""
    match = TREE_LINE_RE.fullmatch(line)
    if not match or (match.group(1) and not match.group(2)):
        raise BadInput(f"tree line {number}: expected a store path indented by `nix-store -q --tree`"
                       f" (├───, └───, │), got {shorten(line)!r}")
    path = checked(f"tree line {number}", lambda value: parse_store_path(value) and value, match.group(3))
    return len(match.group(1)) // 4 + bool(match.group(2)), path, match.group(4) is not None


def text_lines(text, max_lines):
    """(number, line) of each line of Nix's text output that is not blank, split at "\n" alone, as Nix ends its lines
    (a "\r" before it is dropped): str.splitlines also splits at control characters, and would name the wrong line.
    A line at a time, and a body of more than max_lines is refused first: a body of empty lines would otherwise
    cost a list of tens of millions."""
    if text.count("\n") > max_lines:
        raise ReportTooLarge(f"body: more than {max_lines} lines; this server allows as many as its limits of store paths"
                             " and references per report (--max-report-paths, --max-report-edges)")
    start = 0
    for number in itertools.count(1):
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if line.strip():
            yield number, line.removesuffix("\r")
        if end < 0:
            return
        start = end + 1


def nix_paths_items(text, max_lines):
    """Items of `nix-store -qR [--include-outputs]` output, one path a line; each output is linked to the
    listed .drv of its name, when exactly one matches. The path asked for is the last line."""
    listed = [(number, checked(f"line {number}", lambda value: parse_store_path(value) and value, line.strip()))
              for number, line in text_lines(text, max_lines)]
    drvs_by_name = defaultdict(list)  # up to two: one is a match, two are none, and more would be searched for each output
    for _number, path in listed:
        if path.endswith(".drv"):
            same_name = drvs_by_name[parse_store_path(path)[1][:-len(".drv")]]
            if len(same_name) < 2:
                same_name.append(path)
    items = [ClosureItem(path, [], deriver_by_name(path, drvs_by_name), None, f"line {number}") for number, path in listed]
    return items[-1:] + items[:-1]


def deriver_by_name(out_path, drvs_by_name):
    """The one .drv whose outputs Nix would name like out_path (<name> or <name>-<output>), else None."""
    if out_path.endswith(".drv"):
        return None
    name = parse_store_path(out_path)[1]
    candidates = [drv for cut in [len(name)] + [i for i, char in enumerate(name) if char == "-"]
                  for drv in drvs_by_name.get(name[:cut], ())]
    return candidates[0] if len(candidates) == 1 else None


def closure_contents(items, root, max_paths, max_edges, edges=True):
    """SbomContents of a closure's items, the root first; fixed_output maps each fixed-output path to its ca.
    Without edges (children None) when the tree worker reads them (usual_path_info_edges).
    A list at a time: a loop over the items took half as long again."""
    items = root_first(list(items), root)
    if not items:
        raise BadInput("closure: the upload lists no store path")
    index_of = closure_index(items[:max_paths + 1])
    if len(items) > max_paths:
        raise ReportTooLarge(f"closure: more than {max_paths} store paths; this server's limit is {max_paths}"
                             " components and store paths per report (--max-report-paths)")
    drv_paths = [path if path.endswith(".drv") else deriver for path, _references, deriver, _ca, _where in items]
    paths = [(path, index, output_name(path, deriver))
             for index, (path, deriver) in enumerate(zip(index_of, drv_paths)) if not path.endswith(".drv")]
    if not paths:
        raise BadInput("closure yields no output path: it lists only .drv files")
    fixed_output = {item.path: item.ca for item in items if item.ca is not None}
    children = closure_children(items, index_of, max_edges) if edges else None
    return SbomContents(items[0].path, list(map(name_of, index_of)), drv_paths, paths, children, fixed_output)


def closure_index(items):
    """{path: index} of the items; an error names the first path listed twice."""
    index_of = dict(zip([item.path for item in items], range(len(items))))
    if len(index_of) < len(items):
        seen = set()
        for path, _references, _deriver, _ca, where in items:
            if path in seen:
                raise BadInput(f"{where}: {path} is listed twice")
            seen.add(path)
    return index_of


def root_first(items, root):
    """The items with the one of path root first; all as listed if root is None."""
    if root is not None:
        position = next((position for position, item in enumerate(items) if item.path == root), None)
        if position is None:
            raise BadInput(f"root: {shorten(root)} is not in the closure")
        items.insert(0, items.pop(position))
    return items


def closure_children(items, index_of, max_edges):
    """{index: {child index: None}} from references, full paths or basenames; a reference outside the closure
    is refused, as a report of part of a closure would count and suggest paths without what they depend on."""
    children, edges = {}, 0
    for index, item in enumerate(items):
        kids = children[index] = reference_indices(item, index_of)
        kids.pop(index, None)
        edges += len(kids)
        if edges > max_edges:
            raise ReportTooLarge(f"closure: more than {max_edges} distinct references; this server's limit"
                                 f" is {max_edges} per report (--max-report-edges)")
    return children


def reference_indices(item, index_of):
    """{index: None} of the paths an item references, each once, in order."""
    try:
        found = dict.fromkeys(map(index_of.get, item.references))
    except TypeError:  # a list or object, which cannot be a dict key, is not a path
        found = {None: None}
    if None in found:  # basenames, as newer Nix writes them, or a reference that names no listed path
        found = {}
        for position, reference in enumerate(item.references):
            child = index_of.get(as_full_path(reference)) if type(reference) is str else None
            if child is None:
                raise unlisted_reference(item.where, position, reference)
            found[child] = None
    return found


def unlisted_reference(where, position, reference):
    """The error for a reference that names no listed path: not a store path at all, or one the closure lacks."""
    path = full_store_path(reference, where, f"references[{position}]")
    return BadInput(f"{where}: references {shorten(path)}, which the closure does not list;"
                    " send the whole closure (nix path-info --json -r)")


def looks_like_path_info(document):
    """Nix 2.8's list of objects with path and references, or newer Nix's object keyed by store path."""
    if isinstance(document, list):
        return bool(document) and isinstance(document[0], dict) and bool({"path", "references"} & document[0].keys())
    return (isinstance(document, dict) and "bomFormat" not in document and bool(document)
            and all(isinstance(key, str) and (key.startswith(STORE_DIR + "/") or DIGEST_RE.match(key))
                    for key in itertools.islice(document, 10)))


def check_report_type(content_type):
    """Refuse an upload that is none of the report formats before it is read."""
    if content_type not in (*REPORT_TYPES, "application/json", ""):
        raise BadInput(f"Content-Type: expected one of {', '.join(REPORT_TYPES)} or application/json,"
                       f" got {shorten(content_type)!r}")


def report_contents(content_type, body, root, max_paths, max_edges, edges=True):
    """(the upload's format, its SbomContents) by Content-Type, from the body's UTF-8 bytes; JSON that is path-info
    is detected. edges=False leaves the edges of JSON (CycloneDX or path-info) to the tree worker; the text formats
    read theirs."""
    if content_type == NIX_TREE_TYPE:
        return NIX_TREE_TYPE, closure_contents(nix_tree_items(body.decode(), max_paths + max_edges), root, max_paths, max_edges)
    if content_type == NIX_PATHS_TYPE:
        return NIX_PATHS_TYPE, closure_contents(nix_paths_items(body.decode(), max_paths + max_edges), root, max_paths, max_edges)
    try:
        return usual_report_contents(content_type, body, root, max_paths, max_edges, edges)
    except NotUsualShape:
        pass
    document = parsed_json(body.decode())
    if content_type == PATH_INFO_TYPE or (content_type != CYCLONEDX_TYPE and looks_like_path_info(document)):
        return PATH_INFO_TYPE, closure_contents(path_info_items(document), root, max_paths, max_edges, edges)
    if root is not None:
        raise BadInput("root: a CycloneDX SBOM names its own root (metadata.component)")
    return CYCLONEDX_TYPE, parse_sbom(document, max_paths, max_edges, edges)


def usual_report_contents(content_type, body, root, max_paths, max_edges, edges=True):
    """report_contents of JSON of the usual shape, by the typed readers; NotUsualShape for any other."""
    if is_path_info_list(content_type, body):
        return PATH_INFO_TYPE, closure_contents(usual_path_info_items(body, edges), root, max_paths, max_edges, edges)
    contents = usual_sbom_contents(body, max_paths, max_edges, edges)
    if root is not None:
        raise BadInput("root: a CycloneDX SBOM names its own root (metadata.component)")
    return CYCLONEDX_TYPE, contents


JSON_LIST_RE = re.compile(rb"[ \t\r\n]*\[")


def is_path_info_list(content_type, body):
    return content_type == PATH_INFO_TYPE or (content_type != CYCLONEDX_TYPE and JSON_LIST_RE.match(body) is not None)


def edges_read_apart(content_type):
    """Whether the tree worker reads the upload's edges: JSON, CycloneDX or path-info, not Nix's text formats."""
    return content_type not in (NIX_TREE_TYPE, NIX_PATHS_TYPE)


# ---------------------------------------------------------------- edges, read apart
# The tree worker reads only an SBOM's bom-refs and dependencies, or path-info's paths and references,
# and the request thread all but those.

class SbomRef(msgspec.Struct):
    bom_ref: str | None = msgspec.field(name="bom-ref", default=None)


class SbomRefMetadata(msgspec.Struct):
    component: SbomRef


class SbomEdges(msgspec.Struct):
    metadata: SbomRefMetadata
    components: list[SbomRef] | None = None
    dependencies: list[SbomDependency] | None = None


SBOM_EDGES = msgspec.json.Decoder(SbomEdges)


class PathInfoEdges(msgspec.Struct):
    path: str
    references: list[str]


PATH_INFO_EDGES = msgspec.json.Decoder(list[PathInfoEdges])


def upload_edges(content_type, body, root, max_paths, max_edges):
    """(component count, children) of an upload, as report_contents reads them: an SBOM or a path-info list
    of the usual shape from its edges alone, anything else by report_contents itself."""
    try:
        if is_path_info_list(content_type, body):
            return usual_path_info_edges(body, root, max_edges)
        return usual_sbom_edges(body, max_edges)
    except NotUsualShape:
        contents = report_contents(content_type, body, root, max_paths, max_edges)[1]
        return len(contents.names), contents.children


def usual_sbom_edges(body, max_edges):
    """upload_edges of a CycloneDX SBOM of the usual shape; NotUsualShape for any other JSON. The components
    are indexed as read_components indexes them; its checks and limits, and that the upload is CycloneDX,
    are the request thread's."""
    sbom = typed_document(SBOM_EDGES, body)
    index_of_ref = {}
    for component in itertools.chain([sbom.metadata.component], sbom.components or ()):
        if component.bom_ref is not None:
            index_of_ref.setdefault(component.bom_ref, len(index_of_ref))
    children = dependency_children(((dependency.ref, dependency.dependsOn) for dependency in sbom.dependencies or ()
                                    if dependency.dependsOn is not None), index_of_ref, max_edges)
    return len(index_of_ref), children


def usual_path_info_edges(body, root, max_edges):
    """upload_edges of Nix 2.8's path-info list when every path is a full store path; NotUsualShape for any
    other JSON. The paths are indexed as closure_contents indexes them; its checks and limits are the request thread's."""
    listed = typed_document(PATH_INFO_EDGES, body)
    if not are_store_paths([item.path for item in listed]):
        raise NotUsualShape
    items = root_first([ClosureItem(item.path, item.references, None, None, f"path-info [{position}]")
                        for position, item in enumerate(listed)], root)
    index_of = {}
    for index, item in enumerate(items):
        index_of.setdefault(item.path, index)
    return len(items), closure_children(items, index_of, max_edges)


# ---------------------------------------------------------------- reports
# A report is written under an unpublished name, a chunk of rows per transaction, and published by
# renaming it in one short transaction: attestation writers wait for one chunk at most, never for a
# whole report, and no reader ever sees half of one. Report names cannot start with '.', so no URL
# reaches an unpublished report: ".writing-…" is an upload under way, ".replaced-…" and ".deleted-…"
# are old versions being removed. A process that dies leaves them behind; the next start or upload
# removes them.

UNPUBLISHED_PREFIX = "."
ROWS_PER_TRANSACTION = 10_000
SBOM_BYTES_PER_PIECE = 4 * MiB
UPLOAD_RETRY_AFTER_S = 10


def find_report(conn, name):
    report = None
    if not name.startswith(UNPUBLISHED_PREFIX):
        report = conn.execute("SELECT id, name, owner_id, root, source_type, created_at FROM reports WHERE name = ?",
                              (name,)).fetchone()
    if report is None:
        abort(404, f"no report named {shorten(name)!r}")
    return report


def check_report_name(name):
    if not REPORT_NAME_RE.fullmatch(name):
        raise BadInput(f"report name: expected 1 to 128 characters of [A-Za-z0-9._-], not starting with '.', got {shorten(name)!r}")


def check_may_change_report(report, builder):
    if report["owner_id"] is not None and report["owner_id"] != builder["id"] and not builder["is_admin"]:
        abort(403, "only the builder that defined this report, or an admin, may change it")


def report_to_replace(conn, name, builder, label):
    """The report of that name if there is one, once the builder may replace it and the label is free.
    Checked before the upload is read; publish_report and add_revision check again, as either may change meanwhile."""
    existing = conn.execute("SELECT id, owner_id FROM reports WHERE name = ?", (name,)).fetchone()
    if existing is None:
        return None
    check_may_change_report(existing, builder)
    if label is not None and conn.execute("SELECT 1 FROM report_revisions WHERE report_id = ? AND label = ?",
                                          (existing["id"], label)).fetchone():
        raise LabelTaken(f"revision label {shorten(label)!r} is already used by report {name!r}")
    return existing


class ViewsBusy(Exception):
    """Too many views wait for the render worker."""


class UploadsBusy(Exception):
    """Every report upload slot is taken."""


@contextlib.contextmanager
def report_upload_slot():
    """At most MAX_REPORT_UPLOADS uploads are parsed and written at once: each holds memory in
    proportion to its SBOM, so more would grow the server without bound. The next one is told to retry."""
    slots = current_app.extensions["report_uploads"]
    if not slots.acquire(blocking=False):
        raise UploadsBusy(f"{current_app.config['MAX_REPORT_UPLOADS']} report uploads are already being processed;"
                          f" retry in {UPLOAD_RETRY_AFTER_S} seconds")
    try:
        yield
    finally:
        slots.release()


class UnpublishedReports:
    """The unpublished report names this process is writing or removing, which no one else may remove."""

    def __init__(self):
        self.lock = threading.Lock()
        self.in_use = set()

    @contextlib.contextmanager
    def using(self, *names):
        self.claim(*names)
        try:
            yield
        finally:
            self.release(*names)

    def claim(self, *names):
        with self.lock:
            self.in_use.update(names)

    def release(self, *names):
        with self.lock:
            self.in_use.difference_update(names)

    def abandoned(self, conn):
        names = [row[0] for row in conn.execute("SELECT name FROM reports WHERE name LIKE ?", (UNPUBLISHED_PREFIX + "%",))]
        with self.lock:
            return [name for name in names if name not in self.in_use]


def unpublished_name(state):
    return f"{UNPUBLISHED_PREFIX}{state}-{secrets.token_hex(8)}"


def remove_abandoned_reports(conn):
    unpublished = current_app.extensions["unpublished_reports"]
    for name in unpublished.abandoned(conn):
        with unpublished.using(name):
            remove_report(conn, name)


def define_report(conn, name, owner, sbom, sbom_digest, label, parse, worker_tree):
    """Publish the upload as the report's latest revision; returns its number.
    parse() gives (source type, SbomContents); the upload's bytes are stored meanwhile (UploadWriter).
    worker_tree (a WorkerTree, or None) checks the edges and lays out the tree when the contents have no edges."""
    unpublished = current_app.extensions["unpublished_reports"]
    staging, replaced = unpublished_name("writing"), unpublished_name("replaced")
    unpublished.claim(replaced)  # until ReportRemovals has removed it, or nothing was replaced
    with unpublished.using(staging), current_app.extensions["report_removals"].upload_under_way():
        writer = UploadWriter(current_app.config["DATABASE"], staging, owner, sbom)
        try:
            source_type, contents = parse()
            try:
                revision = written_revision(conn, writer, label, sbom_digest, source_type, contents, worker_tree)
            finally:
                writer.finished()  # before the lists it reads are emptied
                release_in_slices(contents.paths, contents.names, contents.drv_paths)
            number, revision_id, replaced_one = published_revision(conn, staging, name, owner, replaced, revision)
        except BaseException:
            unpublished.release(replaced)
            writer.finished()
            remove_report_if_possible(conn, staging)
            raise
    if revision.component_ids == PENDING_IDS:
        current_app.extensions["pending_revisions"].add(revision_id)
    if replaced_one:
        current_app.extensions["report_removals"].remove(replaced)
    else:
        unpublished.release(replaced)
    return number


REMOVAL_WAIT_S = 10
REMOVAL_POLL_S = 0.02
REMOVAL_BACKLOG = 2  # replaced copies waiting to be removed, past which removals wait for nothing


class ReportRemovals:
    """Removes replaced copies of reports in a thread of its own, one after another, after the upload that
    replaced them has answered: once renamed they are garbage no one can see, and removing 20,000 paths' rows
    takes longer than the rest of a PUT's writes. A name stays claimed in UnpublishedReports until its copy is
    gone; a process that dies first leaves it for remove_abandoned_reports at the next start or upload.

    Before each chunk of rows it waits while an upload is being written or a view rendered (for REMOVAL_WAIT_S
    at most, and not at all while REMOVAL_BACKLOG more copies wait, so that a busy server cannot keep garbage
    without end): the next upload's writes, under the one write lock, and the new revision's first views come
    first. Without the backlog, 100 back-to-back uploads of a 20,000-path report left 99 copies, 660 MB."""

    def __init__(self, app):
        self.database, self.unpublished, self.logger = app.config["DATABASE"], app.extensions["unpublished_reports"], app.logger
        self.removals = WorkQueue("remove replaced reports", app.logger)
        self.uploads = 0
        self.no_uploads = threading.Condition()
        self.rendering = lambda: app.extensions["report_views"].rendering_now()

    @contextlib.contextmanager
    def upload_under_way(self):
        with self.no_uploads:
            self.uploads += 1
        try:
            yield
        finally:
            with self.no_uploads:
                self.uploads -= 1
                self.no_uploads.notify_all()

    def wait_until_idle(self):
        deadline = time.monotonic() + REMOVAL_WAIT_S
        with self.no_uploads:
            while ((self.uploads or self.rendering()) and time.monotonic() < deadline
                   and self.removals.backlog() < REMOVAL_BACKLOG):
                self.no_uploads.wait(REMOVAL_POLL_S)  # woken when an upload ends; renders are polled

    def remove(self, name):
        """Remove the unpublished report `name`, which the caller has claimed, and release the name."""
        self.removals.put(self.remove_now, name)

    def remove_now(self, name):
        try:
            with contextlib.closing(connect(self.database)) as conn:  # SQLite's checkpoints: see server_connection
                remove_report(conn, name, before_each_chunk=self.wait_until_idle)
        except sqlite3.Error as error:
            self.logger.error("could not remove the replaced report %s yet: %s", name, error)
        finally:
            self.unpublished.release(name)

    def wait(self):
        """Until every removal asked for so far is done (tests)."""
        self.removals.join()


class WorkQueue:
    """Jobs run one after another by a daemon thread of their own, started with the first; one that fails is
    logged, and the next one runs."""

    def __init__(self, name, logger):
        self.name, self.logger = name, logger
        self.jobs = queue.Queue()
        self.lock, self.thread = threading.Lock(), None

    def put(self, job, *args):
        self.jobs.put((job, args))
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name=self.name, daemon=True)
                self.thread.start()

    def run(self):
        while True:
            job, args = self.jobs.get()
            try:
                job(*args)
            except Exception:
                self.logger.exception("%s: %s%r failed", self.name, job.__name__, args)
            finally:
                self.jobs.task_done()

    def join(self):
        self.jobs.join()

    def backlog(self):
        """How many jobs wait, besides the one running."""
        return self.jobs.qsize()


def written_revision(conn, writer, label, sbom_digest, source_type, contents, worker_tree):
    """The upload written under its unpublished name, and its Revision. The writer's thread writes the rows
    while this one finds the ids of the shared component rows, unless more than COMPONENTS_STORED_IN_PUT of them
    are new, or of its paths new to this process (KnownReportedPaths): then they are pending (PendingRevisions).
    The display tree is laid out here, or by the tree worker (worker_tree, which there is exactly when the
    contents have no edges).
    The rows that stay when an upload is refused for what it holds (reported_paths, shared components and trees)
    are written only once its edges are known to be good: when the tree worker reads them, it is what finds them
    wrong. An upload that fails later, at publish_report, can leave some."""
    reported = current_app.extensions["reported_paths"]
    large = len(contents.paths) >= LARGE_BATCH
    writer.write_rows(report_row_statements(contents), large)
    if contents.children is None:
        worker_tree.edges_checked()
    unknown = unknown_reported_paths(contents.paths, reported)
    writer.write_rows(reported_path_statements(unknown), large)
    component_ids = packed_component_ids_or_pending(conn, writer, contents, len(unknown))
    tree = contents.tree_json() if contents.children is not None else worker_tree.tree()
    tree_id = writer.store_tree(tree)
    report_id = writer.written()
    reported.remember(dict.fromkeys(out_path for out_path, _index, _output in contents.paths))
    with transaction(conn):
        conn.execute("UPDATE reports SET root = ?, tree = ?, source_type = ? WHERE id = ?",
                     (contents.root, tree, source_type, report_id))
    # Counted by SQLite, not as a set of a million paths: that set was the upload's peak of memory.
    (stored_paths,) = conn.execute("SELECT COUNT(*) FROM report_paths WHERE report_id = ?", (report_id,)).fetchone()
    return Revision(label, contents.root, stored_paths, sbom_digest, component_ids, tree_id.result(), now_iso(),
                    fixed_output_indices(contents))


def packed_component_ids_or_pending(conn, writer, contents, unknown_paths):
    """The upload's packed component ids, with up to COMPONENTS_STORED_IN_PUT new shared rows written; PENDING_IDS
    if more are new. Many paths this process has not seen reported (unknown_paths) say that without looking their
    components up, unless the report is larger than what the process remembers: then every path is unknown."""
    if unknown_paths > COMPONENTS_STORED_IN_PUT and len(contents.paths) <= KnownReportedPaths.LIMIT:
        return PENDING_IDS
    try:
        return packed_ids(revision_component_ids(
            conn, contents.names, contents.drv_paths, paths_as_stored(contents.paths),
            current_app.extensions["component_ids"], storing_at_most(COMPONENTS_STORED_IN_PUT, writer.store_components)))
    except ManyNewComponents:
        return PENDING_IDS


class TreeWorker:
    """Lays out an upload's display tree in a process of its own, from the upload's text, while the request
    thread parses the same text and finds its component ids: the layout is pure Python, and in the server's
    process it would wait for the interpreter behind them. Both read the upload with the same functions, so
    the tree is the one the request thread would lay out. One upload at a time, and none when the app is not
    configured for it (TREE_WORKER): an upload that finds the worker busy, or a worker that failed, has its
    tree laid out by the request thread."""

    def __init__(self, app):
        self.enabled = app.config["TREE_WORKER"]
        self.lock = threading.Lock()
        self.busy = False
        self.executor = None
        self.upload_numbers = itertools.count()

    def start(self):
        """Start the worker now, so that the first upload does not wait for it."""
        with self.lock:
            if self.enabled and self.executor is None:
                self.executor = worker_executor(start_tree_worker)
                self.executor.submit(os.getpid)

    def lay_out(self, upload):
        """A WorkerTree of the upload from its bytes, or None when the worker is busy, broken or not enabled.
        The bytes go through a file in memory (upload_memory_file): down a pipe, each of a few hundred writes
        would wait for the interpreter, which the request thread holds while it parses the same upload; a file on
        disk took tens of milliseconds to write while SQLite wrote the database. The worker checks the edges
        first, and says so, then lays out the tree: the upload's shared rows but the tree's wait for the check only."""
        with self.lock:
            if not self.enabled or self.busy:
                return None
            if self.executor is None:
                self.executor = worker_executor(start_tree_worker)
            content_type, body, *limits = upload
            memory_file = upload_memory_file(body)
            if memory_file is None:
                return None
            try:
                checked, laid_out = self.submitted(*memory_file, content_type, limits)
            except concurrent.futures.BrokenExecutor:
                self.executor = None  # killed (out of memory, say): the next upload starts another
                return None
            self.busy = True
        laid_out.add_done_callback(self.done)
        return WorkerTree(checked, laid_out, upload)

    def submitted(self, fd, path, content_type, limits):
        """The Futures of the worker's check and layout of the upload in the memory file (fd, path), which is
        closed once the check has read it, or has failed; at once if the check cannot be asked for."""
        number = next(self.upload_numbers)
        try:
            checked = self.executor.submit(upload_file_edges, path, number, content_type, *limits)
        except BaseException:
            os.close(fd)
            raise
        checked.add_done_callback(lambda _checked: os.close(fd))
        return checked, self.executor.submit(kept_tree_json, number)

    def done(self, future):
        with self.lock:
            self.busy = False
            if isinstance(future.exception(), concurrent.futures.BrokenExecutor):
                self.executor = None


class WorkerTree:
    """An upload's display tree as the tree worker makes it: two Futures, of the check of its edges and of the
    tree, waited for until one deadline. What the worker could not do in time (killed, say) is done in this thread."""

    def __init__(self, checked, laid_out, upload):
        self.checked, self.laid_out, self.upload = checked, laid_out, upload
        self.deadline = time.monotonic() + TREE_WORKER_TIMEOUT_S
        self.laid_out_here = None  # the tree, once this thread has it: nothing is waited for after that

    def edges_checked(self):
        """Returns once the upload's edges are checked; what they hold wrong (too many, say) is raised as the
        worker found it."""
        if self.laid_out_here is not None:
            return
        try:
            self.worker_result(self.checked)
        except BadInput:
            raise
        except Exception:
            self.laid_out_here = upload_tree_json(*self.upload)

    def tree(self):
        """The display tree's JSON, once the edges are checked."""
        self.edges_checked()
        if self.laid_out_here is None:
            with contextlib.suppress(Exception):
                self.laid_out_here = self.worker_result(self.laid_out)
        if self.laid_out_here is None:
            self.laid_out_here = upload_tree_json(*self.upload)
        return self.laid_out_here

    def worker_result(self, future):
        return future.result(timeout=max(0.0, self.deadline - time.monotonic()))


TREE_WORKER_TIMEOUT_S = 60


def upload_memory_file(raw):
    """(descriptor, path) of a new file in memory (memfd) that holds raw: another process of this user opens it
    by that path, and it is gone once the descriptor is closed, or this process dies. None if none can be made."""
    try:
        fd = os.memfd_create("hash-collection-upload")
    except (AttributeError, OSError):  # not Linux, or not allowed
        return None
    try:
        with open(fd, "wb", closefd=False) as file:
            file.write(raw)
    except OSError:
        os.close(fd)
        return None
    return fd, f"/proc/{os.getpid()}/fd/{fd}"


# In the tree worker: the edges upload_file_edges checked, until kept_tree_json lays them out.
kept_edges = None


def upload_file_edges(path, number, content_type, *limits):
    """Check the edges of the upload whose bytes are in the file at path (upload_memory_file), and keep them
    under the upload's number."""
    global kept_edges
    kept_edges = None
    with open(path, "rb") as upload_file:
        body = upload_file.read()
    with cyclic_gc_paused():
        kept_edges = (number, upload_edges(content_type, body, *limits))


def kept_tree_json(number):
    """The display tree's JSON of the edges upload_file_edges kept of the upload of that number; None if it found
    them wrong, or kept none of that upload."""
    global kept_edges
    kept, kept_edges = kept_edges, None
    return laid_out_tree_json(kept[1]) if kept is not None and kept[0] == number else None


def upload_tree_json(*upload):
    """The display tree's JSON of an upload (content type, body, root, max paths, max edges), from its edges alone."""
    with cyclic_gc_paused():
        edges = upload_edges(*upload)
    return laid_out_tree_json(edges)


def laid_out_tree_json(edges):
    """The display tree's JSON of (component count, children)."""
    with cyclic_gc_paused():
        tree = tree_json(display_tree(*edges))
    trim_malloc()
    return tree


def start_tree_worker(server_pid):
    die_with_server(server_pid)
    limit_malloc_arenas()


class UploadWriter:
    """Writes an upload under its unpublished name, on a connection and thread of its own, a job at a time
    in the order asked, while the request thread parses and lays it out: SQLite writes without holding the
    interpreter, so with two cores the two overlap. The first job stores the upload's bytes. Rows are written
    a chunk per statement over JSON (json_each): a statement per row would take the interpreter back from
    the request thread for every row."""

    def __init__(self, database, staging, owner, sbom):
        self.conn = self.report_id = self.failure = None
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"write {staging}")
        self.jobs = []
        self.submit(self.begin, database, staging, owner["id"], sbom)

    def begin(self, database, staging, owner_id, sbom):
        self.conn = connect(database)  # with SQLite's own checkpoints: see server_connection
        with transaction(self.conn):
            self.report_id = self.conn.execute("INSERT INTO reports (name, owner_id, root, tree, created_at)"
                                               " VALUES (?, ?, '', '[]', ?)", (staging, owner_id, now_iso())).lastrowid
        write_sbom(self.conn, self.report_id, sbom)

    def submit(self, job, *args):
        """A Future of job(*args), run after the jobs asked for before it; once one has failed, the rest raise its error."""
        future = self.executor.submit(self.run, job, args)
        self.jobs.append(future)
        return future

    def run(self, job, args):
        if self.failure is not None:
            raise self.failure
        try:
            return job(*args)
        except BaseException as error:
            self.failure = error
            raise

    def write_rows(self, statements, large):
        """Queue statements that write the upload's rows (report_row_statements, reported_path_statements). They are
        made in this thread and run in the writer's, which holds no interpreter while SQLite writes. At most
        ROW_STATEMENTS_AHEAD wait, so a large upload's are never all in memory; this thread goes on while the
        last of them run, which for a closure of 20,000 paths is all of them. A large upload's are written with
        a large page cache (as cache_for, over jobs rather than a block)."""
        if large:
            self.submit(lambda: set_cache_kib(self.conn, LARGE_BATCH_CACHE_KIB))
        for statement, parameters in statements:
            if len(self.jobs) > ROW_STATEMENTS_AHEAD:
                self.jobs[-ROW_STATEMENTS_AHEAD].result()
            self.submit(self.execute_in_transaction, statement, parameters)
        if large:
            self.submit(lambda: set_cache_kib(self.conn, DEFAULT_CACHE_KIB))  # its memory, while the ids are found

    def execute_in_transaction(self, statement, parameters):
        """A statement of write_rows, its first parameter this upload's report id."""
        with transaction(self.conn):
            self.conn.execute(statement, (self.report_id, *parameters))

    def store_tree(self, tree):
        """A Future of the tree's shared row id."""
        return self.submit(lambda: shared_tree_id(self.conn, tree))

    def store_components(self, components):
        """insert_shared_components, once the jobs before have run."""
        if components:
            self.submit(lambda: insert_shared_components(self.conn, components)).result()

    def written(self):
        """The unpublished report's id once every job asked for so far has run; raises what stopped one."""
        for job in list(self.jobs):
            job.result()
        return self.report_id

    def finished(self):
        """Wait for the jobs, failed or not, and close the connection; again is harmless."""
        self.executor.shutdown(wait=True)
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def json_rows(rows):
    """Rows as the compact JSON text json_each reads; msgspec writes it in a third of the json module's time,
    which the request thread would otherwise wait for."""
    return msgspec.json.encode(rows).decode()


ROW_STATEMENTS_AHEAD = 8  # about 1.5 MiB of JSON each


def report_row_statements(contents):
    """(SQL, parameters after the first) that write the parsed upload's component pieces and path rows, a chunk
    per statement; the first parameter (?1) is the unpublished report's id. Each is made as it is asked for."""
    fixed_output, drv_paths = contents.fixed_output.get, contents.drv_paths
    yield from component_piece_statements(contents.names, drv_paths)
    # A copy is sorted: contents.paths keeps its order.
    for chunk in chunks_of(sorted_in_runs(list(contents.paths)), ROWS_PER_TRANSACTION):
        rows = [(out_path, index, output, fixed_output(out_path), drv_paths[index]) for out_path, index, output in chunk]
        yield ("INSERT OR IGNORE INTO report_paths (report_id, out_path, component_idx, output, ca, digest, drv_path)"
               " SELECT ?1, value->>0, value->>1, value->>2, value->>3, substr(?3, 20 * key + 1, 20), value->>4"
               " FROM json_each(?2)", (json_rows(rows), b"".join(path_digests([row[0] for row in chunk]))))


def paths_as_stored(paths):
    """The (out_path, index, output) rows report_paths keeps of an upload's: a path that two components list
    (CycloneDX allows it) under the first only, as the report's views and own_components show it."""
    return list({row[0]: row for row in reversed(paths)}.values())


def unknown_reported_paths(paths, reported):
    """The (out_path, index, output) rows of the upload's paths not in `reported` (KnownReportedPaths)."""
    return [row for row in paths if row[0] not in reported]


def reported_path_statements(unknown):
    """Statements as report_row_statements makes them that write the reported_paths rows of these paths
    (unknown_reported_paths) that are not there yet."""
    for chunk in chunks_of(sorted_in_runs(unknown), ROWS_PER_TRANSACTION):
        out_paths = [row[0] for row in chunk]
        yield NEW_REPORTED_PATHS, (json_rows(out_paths), b"".join(path_digests(out_paths)))


# The reported_paths rows of some of an upload's paths (?2, their digests ?3) that are not there yet,
# with who attested each; ?1 is not used.
NEW_REPORTED_PATHS = (
    f"INSERT OR IGNORE INTO reported_paths (digest, name, {', '.join(ATTESTED_COLUMNS)})"
    + reported_rows(f"SELECT substr(?3, 20 * key + 1, 20) AS digest, substr(value, {PATH_PREFIX + 34}) AS name FROM json_each(?2)")
    + " WHERE NOT EXISTS (SELECT 1 FROM reported_paths WHERE reported_paths.digest = listed.digest"
    " AND reported_paths.name = listed.name)")


COMPONENTS_PER_PIECE = 10_000


def component_piece_statements(names, drv_paths):
    """report_row_statements of the components: their [name, drv_path] as JSON pieces of COMPONENTS_PER_PIECE."""
    for seq, start in enumerate(range(0, len(names), COMPONENTS_PER_PIECE)):
        piece = json_rows(list(zip(names[start:start + COMPONENTS_PER_PIECE], drv_paths[start:start + COMPONENTS_PER_PIECE])))
        yield "INSERT INTO report_component_pieces (report_id, seq, piece) VALUES (?1, ?2, ?3)", (seq, piece)


def insert_shared_components(conn, components):
    """Shared component rows of (digest, (name, drv_path, [(out_path, output)])) not there yet, a chunk per
    transaction. In the order given, so their ids follow the order the revision lists them in, and its
    delta-coded list of ids stays small."""
    for chunk in chunks_of(components, ROWS_PER_TRANSACTION):
        rows = json_rows([(name, drv_path, json.dumps(listed, separators=(",", ":")))
                          for _digest, (name, drv_path, listed) in chunk])
        with transaction(conn):
            conn.execute("INSERT OR IGNORE INTO revision_components (digest, name, drv_path, outputs)"
                         " SELECT substr(?2, 16 * key + 1, 16), value->>0, value->>1, value->>2 FROM json_each(?1)",
                         (rows, b"".join([digest for digest, _component in chunk])))


def chunks_of(rows, length):
    """Lists of up to `length` rows of an iterable, in order."""
    rows = iter(rows)
    while chunk := list(itertools.islice(rows, length)):
        yield chunk


def write_sbom(conn, report_id, sbom):
    """The SBOM's bytes, a piece per transaction: one blob of tens of MiB would hold the write lock for seconds."""
    for seq, start in enumerate(range(0, len(sbom), SBOM_BYTES_PER_PIECE)):
        piece = memoryview(sbom)[start:start + SBOM_BYTES_PER_PIECE]
        with transaction(conn):
            conn.execute("INSERT INTO report_sbom_pieces (report_id, seq, piece) VALUES (?, ?, ?)", (report_id, seq, piece))


def sbom_pieces(conn, report_id):
    return [row[0] for row in conn.execute("SELECT piece FROM report_sbom_pieces WHERE report_id = ? ORDER BY seq",
                                           (report_id,))]


def sorted_in_runs(rows, run_length=50_000):
    """The rows in order of their first column, for index-friendly inserts; rows with the same first column
    stay in the order given (the first one is kept). Sorted a run at a time and merged lazily:
    one sort of a million rows would hold the interpreter, and so every other request, for seconds."""
    starts, key = range(0, len(rows), run_length), operator.itemgetter(0)
    for start in starts:
        rows[start:start + run_length] = sorted(rows[start:start + run_length], key=key)
    if len(starts) <= 1:
        return iter(rows)
    return heapq.merge(*(itertools.islice(rows, start, start + run_length) for start in starts), key=key)


class LatestPending(Exception):
    """The report to be replaced has a latest revision whose component ids are pending."""


def published_revision(conn, staging, name, owner, replaced, revision):
    """publish_report, once the revision it replaces has its component ids: only a report's latest revision may
    be pending. They are written first, outside publish_report's transaction, and again if another upload of the
    report has published a pending one since (each time round, another upload has published)."""
    while True:
        settle_latest_revision(conn, name, current_app.extensions["component_ids"])
        try:
            return publish_report(conn, staging, name, owner, replaced, revision)
        except LatestPending:
            continue


def pending_latest_revision(conn, report_id):
    """The id of the report's latest revision if its component ids are pending, else None."""
    latest = conn.execute("SELECT id, component_ids FROM report_revisions WHERE report_id = ? ORDER BY number DESC LIMIT 1",
                          (report_id,)).fetchone()
    return latest[0] if latest is not None and latest[1] == PENDING_IDS else None


def publish_report(conn, staging, name, owner, replaced, revision):
    """Give the written report its name in one short transaction, with the earlier revisions and the new one;
    the latest revision before it, replaced as the report's own rows, is renamed to `replaced`.
    Returns (the new revision's number, its id, whether a report was replaced)."""
    with transaction(conn):
        existing = conn.execute("SELECT id, owner_id FROM reports WHERE name = ?", (name,)).fetchone()
        staged_id = conn.execute("SELECT id FROM reports WHERE name = ?", (staging,)).fetchone()[0]
        if existing is not None:
            check_may_change_report(existing, owner)
            if pending_latest_revision(conn, existing["id"]) is not None:
                raise LatestPending  # nothing written yet: its ids are written outside this short transaction
            conn.execute("UPDATE reports SET name = ? WHERE id = ?", (replaced, existing["id"]))
            conn.execute("UPDATE report_revisions SET report_id = ? WHERE report_id = ?", (staged_id, existing["id"]))
        conn.execute("UPDATE reports SET name = ?, created_at = ? WHERE id = ?", (name, now_iso(), staged_id))
        return *add_revision(conn, staged_id, revision), existing is not None


def remove_report(conn, name, before_each_chunk=lambda: None):
    """Delete a report a chunk of rows per transaction, so writers wait for one chunk at most."""
    report = conn.execute("SELECT id FROM reports WHERE name = ?", (name,)).fetchone()
    if report is None:
        return
    for table, key, per_transaction in (("report_sbom_pieces", "seq", 1), ("report_paths", "out_path", ROWS_PER_TRANSACTION),
                                        ("report_component_pieces", "seq", 1)):
        while True:
            before_each_chunk()
            if not remove_first_rows(conn, table, key, report["id"], per_transaction):
                break
    with transaction(conn):
        conn.execute("DELETE FROM reports WHERE id = ?", (report["id"],))


def remove_first_rows(conn, table, key, report_id, count):
    """Delete a report's first `count` rows of a table in key order, as one range of its primary key (a range
    is deleted in half the time of a list of keys); whether any rows are left."""
    with transaction(conn):
        last = conn.execute(f"SELECT {key} FROM {table} WHERE report_id = ? ORDER BY {key} LIMIT 1 OFFSET ?",
                            (report_id, count - 1)).fetchone()
        if last is None:
            conn.execute(f"DELETE FROM {table} WHERE report_id = ?", (report_id,))
            return False
        conn.execute(f"DELETE FROM {table} WHERE report_id = ? AND {key} <= ?", (report_id, last[0]))
        return True


def remove_report_if_possible(conn, name):
    """After a failed upload: what cannot be removed now (the database is failing) goes at the next start or upload."""
    try:
        remove_report(conn, name)
    except sqlite3.Error as error:
        current_app.logger.error("could not remove the unpublished report %s yet: %s", name, error)


# ---------------------------------------------------------------- revisions
# Re-PUTting a report adds a revision. The latest revision is the report itself (report_component_pieces,
# report_paths, the SBOM's pieces). Every revision, the latest too, is also a report_revisions row that
# lists its components as ids of revision_components rows, which all revisions share: a revision that
# changes 5% of a closure adds rows for that 5% only, and its list of ids, delta-coded, compresses to a
# few KiB. Older revisions keep their path set and tree, not their SBOM.

MAX_REVISION_LABEL = 128
COMPONENT_LOOKUPS_PER_QUERY = 500


class Revision(NamedTuple):
    """A report_revisions row to be added, in its columns' order after report_id and number."""
    label: str
    root: str
    path_count: int
    sbom_sha256: str
    component_ids: bytes
    tree_id: int
    created_at: str
    fixed_output: bytes | None = None  # fixed_output_indices


class LabelTaken(Exception):
    """A revision label the report already has."""


def check_revision_label(label):
    if label is None:
        return None
    if not 1 <= len(label) <= MAX_REVISION_LABEL or not label.isprintable() or label.isdigit():
        raise BadInput(f"revision: expected a label of 1 to {MAX_REVISION_LABEL} printable characters,"
                       f" not only digits (those are revision numbers), got {shorten(label)!r}")
    return label


def new_revision(conn, label, root, tree_json_text, sbom_sha256, names, drv_paths, paths, known_ids=None):
    """A Revision of these components, with their shared rows written (a chunk per transaction).
    known_ids: {digest: id} of shared component rows already known, which this adds to (KnownComponentIds)."""
    ids = revision_component_ids(conn, names, drv_paths, paths, KnownComponentIds() if known_ids is None else known_ids,
                                 functools.partial(insert_shared_components, conn))
    return Revision(label, root, path_count(paths), sbom_sha256, packed_ids(ids), shared_tree_id(conn, tree_json_text),
                    now_iso())


def path_count(paths):
    return len({out_path for out_path, _index, _output in paths})


def shared_tree_id(conn, tree_json_text):
    """The id of the shared row of this tree, written if it is new: a revision mostly keeps its tree's shape."""
    encoded = tree_json_text.encode()
    digest = hashlib.sha256(encoded).digest()[:16]
    found = conn.execute("SELECT id FROM revision_trees WHERE digest = ?", (digest,)).fetchone()
    if found is not None:
        return found[0]
    with transaction(conn):
        # Level 1: a fifth of level 6's time, for a fifth more bytes.
        conn.execute("INSERT OR IGNORE INTO revision_trees (digest, tree) VALUES (?, ?)", (digest, zlib.compress(encoded, 1)))
        return conn.execute("SELECT id FROM revision_trees WHERE digest = ?", (digest,)).fetchone()[0]


def component_outputs(count, paths, first=0):
    """[(out_path, output)] of each of `count` components from index `first`, sorted; paths holds theirs only."""
    outputs = [[] for _ in range(count)]
    for out_path, index, output in paths:
        outputs[index - first].append((out_path, output))
    for listed in outputs:
        if len(listed) > 1:
            listed.sort()
    return outputs


def component_digest(component):
    """The digest that names the shared row of a component (name, drv_path, [(out_path, output)]): of its
    compact JSON as msgspec spells it, in half the time repr took (and schema versions before 12 hashed)."""
    return hashlib.sha256(msgspec.json.encode(component)).digest()[:16]


class KnownRows(dict):
    """What this process knows of rows that are never deleted, so that once known it stays right, up to LIMIT."""
    LIMIT = 50_000  # about 6 MiB

    def remember(self, rows):
        """Keep these too: all are forgotten first when they would not fit, and more than LIMIT are not kept."""
        if len(self) + len(rows) > self.LIMIT:
            self.clear()
        if len(rows) <= self.LIMIT:
            self.update(rows)


class KnownComponentIds(KnownRows):
    """{digest: id} of the shared component rows this process has looked up or written. Those rows are never
    changed, so an id once known stays right; a report's next revision mostly lists the components of the
    last one, and finds their ids here rather than by thousands of index lookups."""


class KnownReportedPaths(KnownRows):
    """{store path: None} of the paths whose reported_paths row this process has seen written: a report's next
    revision, or another report of much the same closure, mostly lists those, and skips probing for them."""


COMPONENTS_PER_ID_CHUNK = 50_000


def revision_component_ids(conn, names, drv_paths, paths, known_ids, store_components):
    """The shared component row id of each component; store_components (as insert_shared_components) inserts
    the rows not there yet.
    A chunk of components at a time: a million components' digests and rows at once took 700 MB more."""
    paths_of_chunk = [[] for _start in range(0, len(names), COMPONENTS_PER_ID_CHUNK)]
    for row in paths:
        paths_of_chunk[row[1] // COMPONENTS_PER_ID_CHUNK].append(row)
    ids = []
    for start, chunk_paths in zip(range(0, len(names), COMPONENTS_PER_ID_CHUNK), paths_of_chunk):
        chunk_names = names[start:start + COMPONENTS_PER_ID_CHUNK]
        components = list(zip(chunk_names, drv_paths[start:start + COMPONENTS_PER_ID_CHUNK],
                              component_outputs(len(chunk_names), chunk_paths, start)))
        ids += component_ids(conn, components, known_ids, store_components)
    return ids


def component_ids(conn, components, known_ids, store_components):
    """revision_component_ids of (name, drv_path, [(out_path, output)]) components."""
    digests = list(map(component_digest, components))
    # Another upload may add to known_ids meanwhile, or clear it: what this one found is its own.
    found = {digest: known_ids.get(digest) for digest in digests}
    found.update(shared_component_ids(conn, [digest for digest, known in found.items() if known is None]))
    missing = {digest: component for digest, component in zip(digests, components) if found[digest] is None}
    store_components(list(missing.items()))
    found.update(shared_component_ids(conn, list(missing)))
    known_ids.remember(found)
    return [found[digest] for digest in digests]


class ManyNewComponents(Exception):
    """More new shared component rows than a PUT stores itself."""


def storing_at_most(count, store_components):
    """store_components, raising ManyNewComponents instead once more than `count` would be stored in all."""
    stored = 0

    def store(components):
        nonlocal stored
        stored += len(components)
        if stored > count:
            raise ManyNewComponents
        store_components(components)
    return store


def shared_component_ids(conn, digests):
    ids = {}
    for start in range(0, len(digests), COMPONENT_LOOKUPS_PER_QUERY):
        chunk = digests[start:start + COMPONENT_LOOKUPS_PER_QUERY]
        ids.update(conn.execute(f"SELECT digest, id FROM revision_components WHERE digest IN"
                                f" ({','.join('?' * len(chunk))})", chunk).fetchall())
    return ids


def packed_ids(ids):
    deltas = array("q", [ids[0] if ids else 0]) + array("q", (b - a for a, b in itertools.pairwise(ids)))
    return zlib.compress(deltas.tobytes(), 6)


def unpacked_ids(blob):
    deltas = array("q")
    deltas.frombytes(zlib.decompress(blob))
    return list(itertools.accumulate(deltas))


# A revision's component_ids until PendingRevisions has written them: packed_ids never gives an empty blob.
PENDING_IDS = b""
# A PUT stores up to this many new shared component rows itself (a revision changing a tenth of a 20,000-path
# closure): the views of a new revision read them at once. More wait for PendingRevisions.
COMPONENTS_STORED_IN_PUT = 2_000


class PendingRevisions:
    """Writes the shared component rows and ids of a revision whose PUT found too many of them new
    (COMPONENTS_STORED_IN_PUT), in a thread of its own, after the PUT has answered: for a closure the server had
    not seen, they took two fifths of the PUT. Until then the revision's component_ids is PENDING_IDS, and what
    reads them reads the report's own rows, which hold the same components (revision_components). Only a report's
    latest revision may be pending: an upload that replaces it settles it first (settle_latest_revision). What a
    process that dies leaves pending, the next start queues."""

    def __init__(self, app):
        self.database, self.known_ids = app.config["DATABASE"], app.extensions["component_ids"]
        self.settles = WorkQueue("write pending revisions", app.logger)

    def add(self, *revision_ids):
        for revision_id in revision_ids:
            self.settles.put(self.settle, revision_id)

    def settle(self, revision_id):
        """A revision that fails stays pending: the next upload of its report, or the next start, tries again (and
        that upload fails with the same error, if it is one that stays)."""
        with contextlib.closing(connect(self.database)) as conn, cyclic_gc_paused():
            settle_revision(conn, revision_id, self.known_ids)
        trim_malloc()  # as after a report request: the rows read are freed in this thread's arena

    def wait(self):
        """Until every revision queued so far is settled (tests)."""
        self.settles.join()


def pending_revision_ids(conn):
    return [row[0] for row in conn.execute("SELECT id FROM report_revisions WHERE component_ids = ?", (PENDING_IDS,))]


def settle_latest_revision(conn, name, known_ids):
    """Write the component ids of the latest revision of the report `name`, if there is one and they are pending."""
    report = conn.execute("SELECT id FROM reports WHERE name = ?", (name,)).fetchone()
    pending = pending_latest_revision(conn, report[0]) if report is not None else None
    if pending is not None:
        settle_revision(conn, pending, known_ids)


class RevisionLocks:
    """A lock per revision id, there while a thread holds or waits for it."""

    def __init__(self):
        self.guard, self.locks = threading.Lock(), {}  # {revision id: [lock, threads holding or waiting]}

    @contextlib.contextmanager
    def holding(self, revision_id):
        with self.guard:
            entry = self.locks.setdefault(revision_id, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self.guard:
                entry[1] -= 1
                if not entry[1]:
                    del self.locks[revision_id]


# Held while a revision is settled: an upload that must settle the revision it replaces, while PendingRevisions
# is settling it, waits for that rather than doing the same work beside it, each at half speed.
settling = RevisionLocks()


def settle_revision(conn, revision_id, known_ids):
    """Write a pending revision's shared component rows and ids from its report's own rows, read in one snapshot;
    nothing if they are not pending (any more)."""
    with settling.holding(revision_id):
        with read_snapshot(conn):
            row = conn.execute("SELECT report_id FROM report_revisions WHERE id = ? AND component_ids = ?",
                               (revision_id, PENDING_IDS)).fetchone()
            if row is None:
                return
            names, drv_paths, paths = own_components(conn, row[0])
        ids = revision_component_ids(conn, names, drv_paths, paths, known_ids,
                                     functools.partial(insert_shared_components, conn))
        with transaction(conn):
            conn.execute("UPDATE report_revisions SET component_ids = ? WHERE id = ? AND component_ids = ?",
                         (packed_ids(ids), revision_id, PENDING_IDS))


def own_components(conn, report_id):
    """(names, drv_paths, [(out_path, component index, output)]) of a report's own rows, as its upload gave them."""
    names, drv_paths = [], []
    for name, drv_path in component_pieces(conn, report_id):
        names.append(name)
        drv_paths.append(drv_path)
    paths = [tuple(row) for row in conn.execute("SELECT out_path, component_idx, output FROM report_paths"
                                                " WHERE report_id = ?", (report_id,))]
    return names, drv_paths, paths


def add_revision(conn, report_id, revision):
    """Append a revision to a report, in the caller's transaction; its number is the next one.
    Returns (its number, its id)."""
    if revision.label is not None and conn.execute("SELECT 1 FROM report_revisions WHERE report_id = ? AND label = ?",
                                                   (report_id, revision.label)).fetchone():
        raise LabelTaken(f"revision label {shorten(revision.label)!r} is already used by this report")
    number = conn.execute("SELECT COALESCE(MAX(number), 0) + 1 FROM report_revisions WHERE report_id = ?",
                          (report_id,)).fetchone()[0]
    # A revision without fixed-output paths leaves their column out: migrate_to_8 adds revisions to a table without it.
    columns = Revision._fields if revision.fixed_output is not None else Revision._fields[:-1]
    inserted = conn.execute(f"INSERT INTO report_revisions (report_id, number, {', '.join(columns)})"
                            f" VALUES (?, ?, {', '.join('?' * len(columns))})", (report_id, number, *revision[:len(columns)]))
    return number, inserted.lastrowid


REVISION_COLUMNS = "SELECT id, number, label, created_at, root, path_count, sbom_sha256 FROM report_revisions"


def revision_fixed_output(conn, revision, components):
    """The paths that the revision's upload marks fixed-output, of its components (revision_components). Kept as the
    components' indices (packed_ids), as few bytes as its component ids, and read only by the views that count them."""
    (packed,) = conn.execute("SELECT fixed_output FROM report_revisions WHERE id = ?", (revision["id"],)).fetchone()
    if packed is None:
        return frozenset()
    return frozenset(path for index in unpacked_ids(packed) for path in components[index]["outputs"])


def fixed_output_indices(contents):
    """revision_fixed_output's packed component indices of an upload's SbomContents; None when it marks no path."""
    fixed_output = contents.fixed_output
    if not fixed_output:
        return None
    return packed_ids(sorted({index for out_path, index, _output in contents.paths if out_path in fixed_output}))


def as_listed(verdicts, fixed_output):
    """path_verdicts' {path: label}, with the paths of fixed_output (revision_fixed_output) fixed-output."""
    return {path: FIXED_OUTPUT if path in fixed_output else label for path, label in verdicts.items()}


def latest_revision(conn, report_id):
    return conn.execute(REVISION_COLUMNS + " WHERE report_id = ? ORDER BY number DESC LIMIT 1", (report_id,)).fetchone()


def report_revisions(conn, report_id):
    return conn.execute(REVISION_COLUMNS + " WHERE report_id = ? ORDER BY number", (report_id,)).fetchall()


def find_revision(conn, report, wanted):
    """The revision a ?revision= names: its number, or its label."""
    column = "number" if re.fullmatch(r"[0-9]{1,9}", wanted) else "label"
    row = conn.execute(REVISION_COLUMNS + f" WHERE report_id = ? AND {column} = ?",
                       (report["id"], int(wanted) if column == "number" else wanted)).fetchone()
    if row is None:
        abort(404, f"report {report['name']!r} has no revision {shorten(wanted)!r}")
    return row


def revision_components(conn, *revision_ids):
    """[{name, drv_path, outputs: [out_path], output_names}] of each revision, by component index, from one read
    of the shared rows they list (two revisions of a report mostly list the same ones); a pending revision's
    from its report's own rows."""
    rows = {row[0]: row for row in conn.execute("SELECT id, report_id, component_ids FROM report_revisions"
                                                " WHERE id IN (SELECT value FROM json_each(?))",
                                                (json_rows(list(revision_ids)),))}
    id_lists = {revision_id: unpacked_ids(rows[revision_id][2]) for revision_id in revision_ids
                if rows[revision_id][2] != PENDING_IDS}
    by_id = shared_components(conn, set().union(*id_lists.values()))
    return [[by_id[component_id] for component_id in id_lists[revision_id]] if revision_id in id_lists
            else own_component_objects(conn, rows[revision_id][1]) for revision_id in revision_ids]


def own_component_objects(conn, report_id):
    """revision_components of a report's own rows."""
    names, drv_paths, paths = own_components(conn, report_id)
    return [{"name": name, "drv_path": drv_path, "outputs": [out_path for out_path, _output in listed],
             "output_names": [output for _out_path, output in listed]}
            for name, drv_path, listed in zip(names, drv_paths, component_outputs(len(names), paths))]


def shared_components(conn, ids):
    """{id: {name, drv_path, outputs, output_names}} of these shared component rows."""
    rows = conn.execute("SELECT id, name, drv_path, outputs FROM revision_components"
                        " WHERE id IN (SELECT value FROM json_each(?))", (json_rows(sorted(ids)),)).fetchall()
    # One parse of all the outputs lists: a parse per row would cost more than the query.
    outputs = msgspec.json.decode("[" + ",".join([row[3] for row in rows]) + "]")
    return {row[0]: {"name": row[1], "drv_path": row[2], "outputs": [out_path for out_path, _output in listed],
                     "output_names": [output for _out_path, output in listed]} for row, listed in zip(rows, outputs)}


def revision_tree(conn, revision_id):
    (blob,) = conn.execute("SELECT revision_trees.tree FROM report_revisions JOIN revision_trees"
                           " ON revision_trees.id = report_revisions.tree_id WHERE report_revisions.id = ?",
                           (revision_id,)).fetchone()
    return msgspec.json.decode(zlib.decompress(blob))


def revision_counts(conn, revisions, policy):
    """(revision, verdict counts as of now) for each revision: one lookup of every path any of them lists."""
    components_of = revision_components(conn, *[revision["id"] for revision in revisions])
    path_sets = [{path for component in components for path in component["outputs"]} for components in components_of]
    verdicts = path_verdicts(conn, list(set().union(*path_sets)), policy)
    for revision, components, paths in zip(revisions, components_of, path_sets):
        fixed_output = revision_fixed_output(conn, revision, components)
        yield revision, verdict_counts(as_listed({path: verdicts[path] for path in paths}, fixed_output))


def compared_revisions(conn, report, revisions):
    """The revisions ?from= and ?to= name (numbers or labels); by default the last two."""
    default_to = revisions[-1]
    default_from = revisions[-2] if len(revisions) > 1 else default_to
    old = find_revision(conn, report, request.args["from"]) if "from" in request.args else default_from
    new = find_revision(conn, report, request.args["to"]) if "to" in request.args else default_to
    return old, new


def package_name(name):
    """A store path's name without its version, as Nix's parseDrvName splits it: up to the first '-' not followed by a letter."""
    match = re.search(r"-(?![A-Za-z])", name)
    return name[:match.start()] if match else name


def component_of_paths(components):
    """{out_path: (component name, output name)}, the first component that lists each path."""
    names = {}
    for component in components:
        for out_path, output in zip(component["outputs"], component["output_names"]):
            names.setdefault(out_path, (component["name"], output))
    return names


def pairing_key(out_path, name, output):
    """The component's name, else the store-path name after the hash; without a version; and the output."""
    return package_name(name or name_of(out_path)), output


def unique_by_key(out_paths, names):
    """{pairing key: out_path} for the keys that exactly one of these paths has: only those pair up."""
    paths_of_key = defaultdict(list)
    for out_path in out_paths:
        paths_of_key[pairing_key(out_path, *names[out_path])].append(out_path)
    return {key: paths[0] for key, paths in paths_of_key.items() if len(paths) == 1}


def revision_changes(conn, old, new, policy):
    """Paths added and removed from revision `old` to `new`, and their pairs by name, as regressions,
    fixes (reproduced before and not now, or the reverse) and unchanged; verdicts as of now."""
    old_components, new_components = revision_components(conn, old["id"], new["id"])
    old_names, new_names = component_of_paths(old_components), component_of_paths(new_components)
    added = sorted(new_names.keys() - old_names.keys())
    removed = sorted(old_names.keys() - new_names.keys())
    verdicts = path_verdicts(conn, added + removed, policy)
    verdicts = {**as_listed({path: verdicts[path] for path in removed}, revision_fixed_output(conn, old, old_components)),
                **as_listed({path: verdicts[path] for path in added}, revision_fixed_output(conn, new, new_components))}
    successors = unique_by_key(added, new_names)
    changes = {"regressions": [], "fixes": [], "unchanged": []}
    for key, old_path in sorted(unique_by_key(removed, old_names).items()):
        new_path = successors.get(key)
        if new_path is None:
            continue
        was, now = verdicts[old_path] == REPRODUCED, verdicts[new_path] == REPRODUCED
        kind = "regressions" if was and not now else "fixes" if now and not was else "unchanged"
        changes[kind].append({"name": key[0], "output": key[1], "from": old_path, "from_verdict": verdicts[old_path],
                              "to": new_path, "to_verdict": verdicts[new_path]})
    return {"from": revision_object(old), "to": revision_object(new),
            "added": [{"path": path, "verdict": verdicts[path]} for path in added],
            "removed": [{"path": path, "verdict": verdicts[path]} for path in removed],
            "kept": len(new_names.keys() & old_names.keys()), **changes}


def history_chart(revisions, width=600, height=200, margin=30):
    """The SVG line chart of the reproduced share over revisions: points in the plot's coordinates."""
    points = []
    step = (width - 2 * margin) / max(len(revisions) - 1, 1)
    for position, revision in enumerate(revisions):
        total = sum(revision["counts"].values())
        share = revision["counts"][REPRODUCED] / total if total else 0.0
        points.append({"x": round(margin + position * step, 1), "y": round(height - margin - share * (height - 2 * margin), 1),
                       "share": share, "revision": revision})
    return {"width": width, "height": height, "margin": margin, "points": points,
            "line": " ".join(f"{point['x']},{point['y']}" for point in points)}


def revision_object(revision):
    return {"revision": revision["number"], "label": revision["label"], "created_at": revision["created_at"],
            "path_count": revision["path_count"]}


class ReportChanges:
    """A change counter for each report, in memory, that moves when attestations touch one of its paths.

    Cached views (ReportViews) are valid while their report's counter stays where it was when they
    were rendered. Writers only note which paths they attested; the next reader looks those paths
    up in each known report's primary key and moves the counters of the reports that hold one.
    Any other successful write (a report, policy, link pattern or diff) moves the epoch, which every
    counter includes: it may change any view, and report ids can be reused.
    """
    MAX_NOTED_PATHS = 100_000

    def __init__(self):
        self.folding = threading.Lock()
        self.noting = threading.Lock()
        self.counters = {}
        self.epoch = 0
        self.attested_stores = 0
        self.attested = set()
        self.overflowed = False

    def note_attested(self, out_paths):
        with self.noting:
            self.attested_stores += 1
            if self.overflowed:
                return
            self.attested.update(out_paths)
            if len(self.attested) > self.MAX_NOTED_PATHS:  # beyond this, assuming every report changed is cheaper
                self.attested, self.overflowed = set(), True

    def note_other_change(self):
        with self.folding:
            self.epoch += 1
            self.counters = {}

    def take_noted(self):
        with self.noting:
            noted = None if self.overflowed else self.attested
            self.attested, self.overflowed = set(), False
            return noted, self.attested_stores

    def counter(self, conn, report_id, latest=True):
        """The report's counter; read it before the snapshot a view is computed from. An older
        revision's paths may have left the report: its views change with any attestation."""
        with self.folding:
            noted, attested_stores = self.take_noted()
            known = set(self.counters)
            changed = known if noted is None else reports_holding(conn, known, noted) if noted else set()
            for changed_id in changed:
                self.counters[changed_id] += 1
            self.counters.setdefault(report_id, 0)
            return (self.epoch, self.counters[report_id] if latest else f"any attestation {attested_stores}")


ATTESTATION_ENDPOINTS = ("routes.post_attestation", "routes.post_attestations")


def vary_by_accept(response):
    """Report views, lists and pages are HTML, JSON, text or the upload by Accept: a cache must keep them apart."""
    if request.method in ("GET", "HEAD"):
        response.vary.add("Accept")
    return response


def note_other_writes(response):
    """A successful write other than an attestation (a report, policy, link pattern, diff) may change any view."""
    if request.method not in ("GET", "HEAD", "OPTIONS") and response.status_code < 400 \
            and request.endpoint not in ATTESTATION_ENDPOINTS:
        current_app.extensions["report_changes"].note_other_change()
        current_app.extensions["report_views"].forget()  # none of them can be served again
    return response


def reports_holding(conn, report_ids, out_paths, per_query=500):
    """The reports among report_ids that list any of these paths, by primary-key lookups."""
    out_paths, holding = sorted(out_paths), set()
    for report_id in report_ids:
        for start in range(0, len(out_paths), per_query):
            chunk = out_paths[start:start + per_query]
            if conn.execute(f"SELECT 1 FROM report_paths WHERE report_id = ? AND out_path IN ({','.join('?' * len(chunk))})"
                            " LIMIT 1", [report_id, *chunk]).fetchone():
                holding.add(report_id)
                break
    return holding


def report_components(conn, report_id):
    """[{name, drv_path, outputs: [out_path]}] by component index."""
    components = [{"name": name, "drv_path": drv_path, "outputs": []} for name, drv_path in component_pieces(conn, report_id)]
    # In the primary key's order, which needs no sort: each component's outputs come out ordered by path.
    for out_path, index in conn.execute(
            "SELECT out_path, component_idx FROM report_paths WHERE report_id = ? ORDER BY out_path", (report_id,)):
        components[index]["outputs"].append(out_path)
    return components


def component_pieces(conn, report_id):
    """(name, drv_path) of each of a report's components, in index order."""
    for (piece,) in conn.execute("SELECT piece FROM report_component_pieces WHERE report_id = ? ORDER BY seq", (report_id,)):
        yield from msgspec.json.decode(piece)


def report_tree(conn, report_id):
    return msgspec.json.decode(conn.execute("SELECT tree FROM reports WHERE id = ?", (report_id,)).fetchone()[0])


TEXT_INDENT_LEVELS = 50


def text_indent(depth):
    """Two spaces a level, up to TEXT_INDENT_LEVELS; a line deeper still says its level: indented by its depth, each line
    of a chain of 20,000 paths made a view of 400 MB."""
    if depth <= TEXT_INDENT_LEVELS:
        return "  " * depth
    return "  " * TEXT_INDENT_LEVELS + f"(level {depth}) "


def text_tree_lines(tree, components, verdicts):
    """The text view, a line per store path indented by text_indent; a row of references is one string."""
    lines_of = [component["outputs"] or [component["name"] or "(component without store path)"] for component in components]
    for depth, indices, expanded in tree:
        indent = text_indent(depth)
        if expanded:
            for path in lines_of[indices]:
                yield f"{indent}{path} {verdicts.get(path, '')}\n"
        else:
            shown = [path for index in indices for path in lines_of[index]]
            yield indent + f" (shown above)\n{indent}".join(shown) + " (shown above)\n"


def batched(lines, size=2000):
    """Join lines into larger chunks: the server writes each chunk separately."""
    lines = iter(lines)
    while chunk := "".join(itertools.islice(lines, size)):
        yield chunk


def open_questions(conn, report_id, builder, policy, after=None, limit=None):
    """Report paths that still need builds: fewer than the policy's minimum of its builders
    attested them, and the caller did not. Returns rows (out_path, builders), ordered by out_path.
    Counted by SQLite from each path's reported_paths row, so that no request thread holds the interpreter for it.
    """
    if policy.builder_ids is None:
        builders = f"ifnull(reported_paths.{'verified_builders' if policy.verified_only else 'builders'}, 0)"
    else:
        builders = " + ".join(attested_by(builder_id, policy.verified_only) for builder_id in sorted(policy.builder_ids))
    caller = f" AND NOT {attested_by(builder['id'], policy.verified_only)}" if builder is not None else ""
    # The count first: most paths of a well-built report have enough builders, and it is the cheaper test.
    sql = (f"SELECT report_paths.out_path, {builders} AS counted_builders FROM report_paths {REPORTED_PATHS_JOIN}"
           f" WHERE report_paths.report_id = ? AND counted_builders < ? AND NOT {fixed_output_condition()}{caller}"
           + (" AND report_paths.out_path > ?" if after else "") + " ORDER BY report_paths.out_path")
    parameters = [report_id, policy.minimum] + ([after] if after else [])
    if limit is not None:
        sql += " LIMIT ?"
        parameters.append(limit)
    return sorted(map(tuple, rows_in_one_step(conn, sql, parameters, ("out_path", "counted_builders"))))


def rows_in_one_step(conn, sql, parameters, columns):
    """The rows of a query, as lists of the columns named, from one step of SQLite's: each step gives up the
    interpreter, and under load a request thread waits each time to get it back, a row at a time."""
    (rows,) = conn.execute(f"SELECT json_group_array(json_array({', '.join(columns)})) FROM ({sql})", parameters).fetchone()
    return msgspec.json.decode(rows)


def attested_by(builder_id, verified_only):
    """SQL: 1 if the joined reported_paths row's attested text holds an attestation by this builder (an id from the
    database) that counts (a verified one, if so), else 0."""
    entries = "(',' || replace(ifnull(reported_paths.attested, ''), '|', ',') || ',')"
    marks = ("v",) if verified_only else ("", "v")
    return "(" + " OR ".join(f"instr({entries}, ',{int(builder_id)}{mark},') > 0" for mark in marks) + ")"


def suggestions(conn, report_id, builder, policy, limit):
    """Paths with some builds first (fewer builders settle them), then the unbuilt; random within each."""
    rows = open_questions(conn, report_id, builder, policy)
    one_build = [out_path for out_path, builders in rows if builders >= 1]
    no_build = [out_path for out_path, builders in rows if builders == 0]
    # A sample, not a shuffle of all: a large report has tens of thousands of open paths.
    picked = random.sample(one_build, min(limit, len(one_build)))
    return picked + random.sample(no_build, min(limit - len(picked), len(no_build)))


def suggestion_objects(conn, report_id, out_paths):
    """{out_path, drv_path?, output?} for each path, as the SBOM gave them."""
    known = {}
    for start in range(0, len(out_paths), 500):
        chunk = out_paths[start:start + 500]
        known.update((row[0], row) for row in rows_in_one_step(
            conn, "SELECT out_path, drv_path, output FROM report_paths"
            f" WHERE report_paths.report_id = ? AND report_paths.out_path IN ({','.join('?' * len(chunk))})",
            [report_id, *chunk], ("out_path", "drv_path", "output")))
    return [suggestion_object(*known[out_path]) for out_path in out_paths]


def suggestion_limit():
    raw = request.args.get("limit", str(DEFAULT_SUGGEST))
    if not re.fullmatch(r"[0-9]{1,6}", raw):
        raise BadInput(f"limit: expected a positive whole number, got {shorten(raw)!r}")
    return max(1, min(int(raw), MAX_SUGGEST))


def suggestion_object(out_path, drv_path, output):
    suggestion = {"out_path": out_path}
    if drv_path:
        suggestion["drv_path"] = drv_path
    if output:
        suggestion["output"] = output
    return suggestion


# ---------------------------------------------------------------- link patterns

# Link patterns are matched with RE2, not Python's re: RE2 runs in time linear in the
# name's length whatever the pattern, and has no backreferences, lookarounds, atomic
# groups or possessive repeats. Python's re backtracks, and one match holds the GIL,
# so a single hostile pattern could stop the whole server; no check of its parse tree
# can keep up with the constructs each Python release adds.
def re2_options():
    options = re2.Options()
    options.log_errors = False  # a refused pattern is the client's error, answered with 400
    options.max_mem = LINK_PATTERN_MEMORY
    return options


def compiled_link_pattern(pattern):
    """The RE2 form of a pattern, or ValueError saying why RE2 refuses it."""
    try:
        return re2.compile(pattern, re2_options())
    except re2.error as error:
        message = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else str(error)
        raise ValueError(f"not a regular expression RE2 accepts ({message}); RE2 has no backreferences, "
                         "lookarounds, atomic groups or possessive repeats") from None


def check_link_pattern(pattern):
    if not pattern or len(pattern) > MAX_PATTERN_LENGTH:
        raise BadInput(f"pattern: expected 1 to {MAX_PATTERN_LENGTH} characters")
    checked("pattern", compiled_link_pattern, pattern)
    return pattern


def check_link(link):
    if not re.fullmatch(r"https?://[^\s\"'<>]{1,2000}", link or ""):
        raise BadInput(f"link: expected an http:// or https:// URL, got {shorten(link or '')!r}")
    return link


def link_matcher(conn):
    """A function from an out path to its links, within a time budget for the whole page."""
    patterns = []
    for row in conn.execute("SELECT pattern, link FROM link_patterns ORDER BY id"):
        try:
            patterns.append((compiled_link_pattern(row["pattern"]), row["link"]))
        except ValueError:
            continue  # accepted by Python's re before version 2, refused by RE2: it links nothing
    deadline = time.monotonic() + LINK_MATCHING_BUDGET_S

    def links_of(out_path):
        if not patterns or time.monotonic() > deadline:
            return []
        name = name_of(out_path)
        return [link for pattern, link in patterns if pattern.search(name)]

    return links_of


def link_pattern_row(conn, pattern):
    return conn.execute("SELECT id, owner_id FROM link_patterns WHERE pattern = ?", (pattern,)).fetchone()


def find_link_pattern(conn, pattern):
    row = link_pattern_row(conn, pattern)
    if row is None:
        abort(404, f"no link pattern {shorten(pattern)!r}")
    return row


def check_owner_or_admin(row, builder, what):
    """Only the builder who made a link pattern or policy, or an admin, may change it.
    A link pattern made before version 2 has no owner, so only admins may change it."""
    if row["owner_id"] != builder["id"] and not builder["is_admin"]:
        abort(403, f"only the builder that made this {what}, or an admin, may change it")


def check_link_pattern_slots(conn, builder, pattern):
    mine = conn.execute("SELECT COUNT(*) FROM link_patterns WHERE owner_id = ? AND pattern != ?",
                        (builder["id"], pattern)).fetchone()[0]
    if mine >= MAX_LINK_PATTERNS:
        raise BadInput(f"pattern: at most {MAX_LINK_PATTERNS} link patterns per builder; delete one first")


# ---------------------------------------------------------------- narinfo export

def narinfo_text(attestation):
    nar_hash = attestation["output_hash"]
    lines = [
        f"StorePath: {attestation['output_path']}",
        f"URL: nar/{nar_hash.removeprefix('sha256:')}.nar",
        "Compression: none",
        f"NarHash: {nar_hash}",
        f"NarSize: {attestation['nar_size']}",
        "References: " + " ".join(basename_of(path) for path in attestation["references"] or []),
    ]
    if attestation["drv_path"]:
        lines.append(f"Deriver: {basename_of(attestation['drv_path'])}")
    # No CA: line, though the attestation may have one: Nix trusts a content-addressed path with no signature
    # at all, and this export vouches only for what the builder signed.
    # is_signature: a signature stored before version 2 may hold a line break.
    if is_signature(attestation["output_sig"]):
        lines.append(f"Sig: {attestation['output_sig']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- diffs
# What differs between two outputs of one path, as the builder that held both saw it
# (the diff hook's file-level diff and diffoscope's text). Evidence supplied by a builder,
# shown as such and never verified: everything in it is escaped and bounded.

MAX_DIFF_FILES = 10_000
MAX_DIFF_PATH = 4096
MAX_DIFF_NOTE = 500
DIFF_SIDE_TYPES = {"regular", "directory", "symlink", "other", "unreadable"}
SHA256_HEX_RE = re.compile(r"[0-9a-f]{64}")
DIFF_SCREEN_LINES = 40  # diffoscope lines shown before the rest is folded away


def diff_hashes(hash_a, hash_b, for_upload):
    """The URL's two NAR hashes: canonical and in order, else 400 on upload and 404 on reading."""
    for which, nar_hash in (("A", hash_a), ("B", hash_b)):
        if not CANONICAL_SHA256_RE.fullmatch(nar_hash):
            if not for_upload:
                abort(404, f"no diff: hash {which} is not a canonical NAR hash")
            raise BadInput(f"hash {which}: expected the canonical form sha256:<52 nix-base32 characters>, "
                           f"got {shorten(nar_hash)!r}")
    if hash_a >= hash_b:
        if not for_upload:
            abort(404, "no diff: hash A must sort before hash B")
        raise BadInput("hashes: expected hash A < hash B as strings; send the pair in that order")
    return hash_a, hash_b


def short_text(value, where, limit, required=False):
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise BadInput(f"{where}: expected a string, got {type(value).__name__}")
    if not 0 < len(value) <= limit:
        raise BadInput(f"{where}: expected 1 to {limit} characters, got {len(value)}")
    return value


def parse_diff_side(side, where):
    """One side of a differing path: {type, size?, executable?, sha256?, target?, unreadable?}."""
    if side is None:
        return None
    if not isinstance(side, dict):
        raise BadInput(f"{where}: expected an object or null, got {type(side).__name__}")
    kind = side.get("type")
    if type(kind) is not str or kind not in DIFF_SIDE_TYPES:  # a list or object is no set member: TypeError
        raise BadInput(f"{where}.type: expected one of {', '.join(sorted(DIFF_SIDE_TYPES))}, got {shorten(repr(kind))}")
    parsed = {"type": kind}
    size = field(side, "size", where, kind=int, required=False)
    if size is not None and size < 0:
        raise BadInput(f"{where}.size: expected a size in bytes, got {size}")
    sha256 = field(side, "sha256", where, required=False)
    if sha256 is not None and not SHA256_HEX_RE.fullmatch(sha256):
        raise BadInput(f"{where}.sha256: expected 64 lowercase hex digits, got {shorten(sha256)!r}")
    values = {"size": size, "sha256": sha256,
              "executable": field(side, "executable", where, kind=bool, required=False),
              "unreadable": field(side, "unreadable", where, kind=bool, required=False),
              "target": short_text(side.get("target"), f"{where}.target", MAX_DIFF_PATH)}
    parsed.update((key, value) for key, value in values.items() if value is not None)
    return parsed


def parse_diff_entry(entry, where):
    if not isinstance(entry, dict):
        raise BadInput(f"{where}: expected an object, got {type(entry).__name__}")
    path = short_text(entry.get("path"), f"{where}.path", MAX_DIFF_PATH, required=True)
    a, b = parse_diff_side(entry.get("a"), f"{where}.a"), parse_diff_side(entry.get("b"), f"{where}.b")
    if a is None and b is None:
        raise BadInput(f"{where}: a path missing on both sides is no difference")
    return {"path": path, "a": a, "b": b}


def parse_diff_files(files):
    differing = field(files, "differing", "files", kind=list)
    if len(differing) > MAX_DIFF_FILES:
        raise BadInput(f"files.differing: at most {MAX_DIFF_FILES} paths, got {len(differing)}")
    totals = field(files, "totals", "files", kind=dict, required=False) or {}
    if len(totals) > 10 or any(not isinstance(name, str) or len(name) > 40 or type(count) is not int or count < 0
                               for name, count in totals.items()):
        raise BadInput("files.totals: expected at most 10 names of at most 40 characters, each a count")
    cut = field(files, "cut", "files", kind=list, required=False) or []
    if len(cut) > 10:
        raise BadInput(f"files.cut: at most 10 notes, got {len(cut)}")
    entries = [parse_diff_entry(entry, f"files.differing[{position}]") for position, entry in enumerate(differing)]
    return {"differing": sorted(entries, key=lambda entry: entry["path"]), "totals": totals,
            "cut": [short_text(note, f"files.cut[{position}]", MAX_DIFF_NOTE, required=True)
                    for position, note in enumerate(cut)]}


def parse_diff(body):
    """The upload body, checked field by field; only what is checked is kept."""
    if not isinstance(body, dict):
        raise BadInput(f"body: expected a JSON object with files, diffoscope and tool_versions, got {type(body).__name__}")
    files = parse_diff_files(field(body, "files", "body", kind=dict))
    diffoscope = field(body, "diffoscope", "body", required=False)
    tool_versions = field(body, "tool_versions", "body", kind=dict, required=False) or {}
    if len(tool_versions) > 10:
        raise BadInput(f"body.tool_versions: at most 10 tools, got {len(tool_versions)}")
    return {"files": files, "diffoscope": diffoscope or None,
            "diffoscope_note": short_text(body.get("diffoscope_note"), "body.diffoscope_note", MAX_DIFF_NOTE),
            "tool_versions": {short_text(tool, "body.tool_versions", 40, required=True):
                              short_text(version, f"body.tool_versions.{shorten(tool, 40)}", 100)
                              for tool, version in tool_versions.items()}}


def compressed_diff(document):
    try:
        text = json.dumps(document, ensure_ascii=False, separators=(",", ":"))
        return zlib.compress(text.encode(), 6)
    except UnicodeEncodeError:
        raise BadInput("body: a string contains a lone UTF-16 surrogate escape, which is not text") from None


def store_diff(conn, builder, output_path, hash_a, hash_b, document):
    """'stored', or 'known' when this pair of this path already has a diff: the first upload is kept, unless it
    listed no differing path and this one lists some (an empty diff, sent first, would keep the evidence out)."""
    compressed = compressed_diff(document)
    limit = current_app.config["MAX_STORED_DIFF_BYTES"]
    if len(compressed) > limit:
        raise DiffTooLarge(f"diff: {len(compressed)} bytes compressed, more than the {limit} bytes a diff may take;"
                           f" send less diffoscope text")
    with transaction(conn):
        attested = conn.execute("SELECT 1 FROM attestations WHERE " + path_id_condition("path_id") +
                                " AND builder_id = ? AND nar_hash IN (?, ?)",
                                (*path_lookup(output_path), builder["id"], stored_hash(hash_a), stored_hash(hash_b))).fetchone()
        if attested is None:
            abort(403, f"{builder['name']} has attested neither hash for {output_path}; "
                       f"only a builder that built one of them may send their diff")
        inserted = conn.execute(
            "INSERT INTO diffs (output_path, hash_a, hash_b, uploader_id, differing, document, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (output_path, hash_a, hash_b) DO UPDATE SET"
            " uploader_id = excluded.uploader_id, differing = excluded.differing, document = excluded.document,"
            " created_at = excluded.created_at WHERE diffs.differing = 0 AND excluded.differing > 0",
            (output_path, hash_a, hash_b, builder["id"], len(document["files"]["differing"]), compressed, now_iso()))
    return "stored" if inserted.rowcount else "known"


class DiffTooLarge(Exception):
    """A diff whose compressed form exceeds MAX_STORED_DIFF_BYTES: 413 with this message."""


DIFF_COLUMNS = ("SELECT diffs.output_path, diffs.hash_a, diffs.hash_b, builders.name AS uploader, diffs.differing,"
                " diffs.created_at FROM diffs JOIN builders ON builders.id = diffs.uploader_id ")


def diff_summary(row):
    return {"hash_a": row["hash_a"], "hash_b": row["hash_b"], "uploader": row["uploader"],
            "differing": row["differing"], "created_at": row["created_at"],
            "href": diff_href(row["output_path"], row["hash_a"], row["hash_b"])}


def diffs_of_output(conn, output_path):
    rows = conn.execute(DIFF_COLUMNS + "WHERE diffs.output_path = ? ORDER BY diffs.hash_a, diffs.hash_b", (output_path,))
    return [diff_summary(row) for row in rows]


def read_diff(conn, output_path, hash_a, hash_b):
    row = conn.execute(DIFF_COLUMNS.replace(" FROM", ", diffs.document FROM") +
                       "WHERE diffs.output_path = ? AND diffs.hash_a = ? AND diffs.hash_b = ?",
                       (output_path, hash_a, hash_b)).fetchone()
    if row is None:
        abort(404, f"no diff of {shorten(hash_a)} and {shorten(hash_b)} for {output_path}")
    return {"output_path": output_path, **diff_summary(row), **json.loads(zlib.decompress(row["document"]))}


def report_diffs(conn, report_id):
    """{out_path: [[hash A, hash B], …]} for every path of a report that has diffs."""
    pairs = defaultdict(list)
    for out_path, hash_a, hash_b in conn.execute(
            "SELECT diffs.output_path, diffs.hash_a, diffs.hash_b FROM report_paths"
            " JOIN diffs ON diffs.output_path = report_paths.out_path WHERE report_paths.report_id = ?"
            " ORDER BY diffs.output_path, diffs.hash_a, diffs.hash_b", (report_id,)):
        pairs[out_path].append([hash_a, hash_b])
    return dict(pairs)


def paths_diffs(conn, out_paths):
    """{out_path: [[hash A, hash B], …]} like report_diffs, for any store paths."""
    pairs = defaultdict(list)
    for out_path, hash_a, hash_b in conn.execute(
            "SELECT output_path, hash_a, hash_b FROM diffs WHERE output_path IN (SELECT value FROM json_each(?))"
            " ORDER BY output_path, hash_a, hash_b", (json.dumps(out_paths),)):
        pairs[out_path].append([hash_a, hash_b])
    return dict(pairs)


def report_diff_links(conn, report_id):
    return diff_links_of(report_diffs(conn, report_id))


def diff_links_of(diffs):
    """{out_path: where its "diff" link leads}: the one diff, or the list when there are several."""
    return {out_path: diff_href(out_path, *pairs[0]) if len(pairs) == 1 else diff_href(out_path)
            for out_path, pairs in diffs.items()}


def diff_href(out_path, hash_a=None, hash_b=None):
    href = "/diffs/" + url_segment(basename_of(out_path))
    return f"{href}/{hash_a}/{hash_b}" if hash_a else href


def diff_rows(files):
    """The file table: (path, what differs, side A, side B), each side as short text."""
    return [(entry["path"], ", ".join(changed_aspects(entry["a"], entry["b"])), side_text(entry["a"]), side_text(entry["b"]))
            for entry in files["differing"]]


def side_text(side):
    if side is None:
        return "(missing)"
    words = [side["type"]]
    if "size" in side:
        words.append(f"{side['size']} bytes")
    if side.get("executable"):
        words.append("executable")
    if "sha256" in side:
        words.append(f"sha256 {side['sha256'][:12]}…")
    if "target" in side:
        words.append(f"→ {side['target']}")
    if side.get("unreadable"):
        words.append("unreadable")
    return ", ".join(words)


# ---------------------------------------------------------------- transparency log
# Every accepted attestation is appended, in the same transaction, as one entry of an
# RFC 9162 Merkle tree. An entry is rebuilt from its attestation row, never stored twice;
# only when that row changes later (an upgrade to verified) are the old entry's bytes kept.
# The log stores each leaf hash and the hash of every complete subtree of 256^L leaves:
# those are the C2SP tiles, and any proof is built from O(log n) of them.

FULL_TILE_CACHE = "public, max-age=31536000, immutable"
PARTIAL_TILE_CACHE = "public, max-age=5"
TILE_RE = re.compile(r"(0|[1-9][0-9]?|entries)/((?:x[0-9]{3}/)*[0-9]{3})(?:\.p/([1-9][0-9]{0,2}))?")


class LogDamaged(Exception):
    """The stored log lacks hashes it must have: the database was changed behind the server's back."""


def entry_of_attestation(attestation):
    """The log entry of an attestation object."""
    return log_entry(attestation["builder"], attestation["output_path"], attestation["drv_path"],
                     attestation["output_hash"], attestation["nar_size"], attestation["references"],
                     attestation["output_sig"], attestation["verified"], attestation["created_at"])


def log_size(conn):
    last = max(conn.execute("SELECT COALESCE(MAX(id), -1) FROM attestations").fetchone()[0],
               conn.execute("SELECT COALESCE(MAX(idx), -1) FROM log_entries").fetchone()[0])
    return last + 1


def store_complete_subtrees(conn, old_size, new_size):
    """Store the hash of every subtree of 256^L leaves that growing the log from old_size to new_size completed."""
    level = 1
    while True:
        span = TILE_WIDTH ** level
        first, end = old_size // span, new_size // span
        if first == end:
            return
        conn.executemany("INSERT INTO log_subtrees (level, idx, hash) VALUES (?, ?, ?)",
                         [(level, index, tree_hash(full_tile(conn, level - 1, index))) for index in range(first, end)])
        level += 1


def stored_hashes(conn, level, start, end):
    """The stored hashes at tile level `level` (tree height 8·level) with indexes start… up to end-1 or the first missing."""
    if level > 0:
        return [row[0] for row in conn.execute(
            "SELECT hash FROM log_subtrees WHERE level = ? AND idx >= ? AND idx < ? ORDER BY idx", (level, start, end))]
    leaves = dict(conn.execute("SELECT id, leaf_hash FROM attestations WHERE id >= ? AND id < ?", (start, end)))
    leaves.update(conn.execute("SELECT idx, leaf_hash FROM log_entries WHERE idx >= ? AND idx < ?", (start, end)))
    return list(itertools.takewhile(lambda leaf: leaf is not None, (leaves.get(index) for index in range(start, end))))


def full_tile(conn, level, index):
    hashes = stored_hashes(conn, level, index * TILE_WIDTH, (index + 1) * TILE_WIDTH)
    if len(hashes) != TILE_WIDTH:
        raise LogDamaged(f"tile {level}/{index} has {len(hashes)} of {TILE_WIDTH} hashes")
    return hashes


class LogTree:
    """Subtree hashes of the log, computed from its stored tiles, each tile read once per request."""

    def __init__(self, conn):
        self.conn = conn
        self.tiles = {}

    def tile(self, level, index):
        if (level, index) not in self.tiles:
            self.tiles[level, index] = stored_hashes(self.conn, level, index * TILE_WIDTH, (index + 1) * TILE_WIDTH)
        return self.tiles[level, index]

    def complete_subtree(self, height, index):
        """The hash of leaves index·2^height … (index+1)·2^height - 1."""
        level, below = divmod(height, TILE_HEIGHT)
        first = index << below
        offset = first % TILE_WIDTH
        hashes = self.tile(level, first // TILE_WIDTH)[offset:offset + (1 << below)]
        if len(hashes) != 1 << below:
            raise LogDamaged(f"the log lacks the hashes of leaves {first << (level * TILE_HEIGHT)} onwards")
        return tree_hash(hashes)

    def range_hash(self, start, end):
        """RFC 9162's MTH of leaves start … end-1; every range its proofs need starts aligned."""
        size = end - start
        if size == 0:
            return EMPTY_TREE_HASH
        if size & (size - 1) == 0:
            return self.complete_subtree(size.bit_length() - 1, start // size)
        middle = start + split_point(size)
        return node_hash(self.range_hash(start, middle), self.range_hash(middle, end))

    def inclusion_proof(self, index, start, end):
        """RFC 9162 §2.1.3.1 PATH(index, D[start:end])."""
        if end - start == 1:
            return []
        middle = start + split_point(end - start)
        if index < middle:
            return self.inclusion_proof(index, start, middle) + [self.range_hash(middle, end)]
        return self.inclusion_proof(index, middle, end) + [self.range_hash(start, middle)]

    def consistency_proof(self, old_size, start, end, whole=True):
        """RFC 9162 §2.1.4.1 SUBPROOF(old_size, D[start:end], whole)."""
        if old_size == end - start:
            return [] if whole else [self.range_hash(start, end)]
        middle = start + split_point(end - start)
        if old_size <= middle - start:
            return self.consistency_proof(old_size, start, middle, whole) + [self.range_hash(middle, end)]
        return self.consistency_proof(old_size - (middle - start), middle, end, False) + [self.range_hash(start, middle)]


def freeze_entries(conn, attestation_id):
    """Keep the bytes of this attestation's entries: its row is about to change."""
    entry = entry_of_attestation(attestation_object(attestation_row(conn, attestation_id)))
    conn.execute("INSERT OR IGNORE INTO log_entries (idx, attestation_id, leaf_hash)"
                 " SELECT id, id, leaf_hash FROM attestations WHERE id = ?", (attestation_id,))
    conn.execute("UPDATE log_entries SET entry = ? WHERE attestation_id = ? AND entry IS NULL", (entry, attestation_id))


def logged_entries(conn, start, end):
    """The entries of indexes start … end-1; an entry whose attestation row is gone comes back empty."""
    end = min(end, log_size(conn))
    exceptions = {row["idx"]: row for row in conn.execute(
        "SELECT idx, attestation_id, entry FROM log_entries WHERE idx >= ? AND idx < ?", (start, end))}
    rows = {row["id"]: row for row in conn.execute(ATTESTATION_COLUMNS + "WHERE attestations.id >= ? AND attestations.id < ?",
                                                   (start, end))}
    entries = []
    for index in range(start, end):
        exception = exceptions.get(index)
        if exception is not None and exception["entry"] is not None:
            entries.append(exception["entry"])
            continue
        attestation_id = index if exception is None else exception["attestation_id"]
        row = rows.get(attestation_id)
        if row is None and attestation_id is not None:
            row = attestation_row(conn, attestation_id)
        if row is None:
            current_app.logger.error("log entry %d: its attestation row is gone", index)
            entries.append(b"")
        else:
            entries.append(entry_of_attestation(attestation_object(row)))
    return entries


# ---------------------------------------------------------------- checkpoints and witnesses

def log_key_from_env():
    return os.environ.get("HASH_COLLECTION_LOG_KEY_FILE")


def default_log_key_file(database):
    """Next to the database, so a server and its log key move together."""
    return str(Path(database).with_name(Path(database).name + ".log-key"))


def log_signer():
    """The log's signer key, read once per app; created on first use if the file does not exist."""
    if "log_signer" not in current_app.extensions:
        current_app.extensions["log_signer"] = load_or_create_log_key(current_app.config["LOG_KEY_FILE"],
                                                                      current_app.config["LOG_ORIGIN"] or host_name())
    return current_app.extensions["log_signer"]


def log_origin():
    """The origin asked for, else the log key's name: this host's name when the key was made. Not this host's name
    now, which may have changed (or been read differently by an older version): witnesses and auditors take a
    changed origin for another log."""
    return current_app.config["LOG_ORIGIN"] or log_signer().name


def load_or_create_log_key(path, origin):
    path = Path(path)
    if not path.exists():
        signer_text, _verifier = generate_note_key(origin, ED25519_KEY_TYPE)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as key_file:
            key_file.write(signer_text + "\n")
    if path.stat().st_mode & 0o077:
        current_app.logger.warning("log key %s is readable by group or others", path)
    try:
        return parse_signer_key(path.read_text())
    except ValueError as error:
        raise RuntimeError(f"log key {path}: {error}") from None


def log_verifier_key():
    return verifier_key_text(verifier_of_signer(log_signer()))


def current_checkpoint(conn):
    """(size, signed note) of the latest checkpoint; a new one when the log grew and the last is old enough."""
    latest = conn.execute("SELECT size, note, issued_at FROM log_checkpoints ORDER BY size DESC LIMIT 1").fetchone()
    if latest and (latest["size"] == log_size(conn) or
                   time.time() - latest["issued_at"] < current_app.config["CHECKPOINT_INTERVAL"]):
        return latest["size"], latest["note"]
    with transaction(conn):
        size = log_size(conn)
        signed = conn.execute("SELECT note FROM log_checkpoints WHERE size = ?", (size,)).fetchone()
        if signed is not None:  # by a request that got here first; witnesses may have cosigned it since
            return size, signed["note"]
        note = sign_note(checkpoint_text(log_origin(), size, LogTree(conn).range_hash(0, size)),
                         log_signer())
        conn.execute("INSERT INTO log_checkpoints (size, note, issued_at) VALUES (?, ?, ?)", (size, note, time.time()))
    return size, note


def cosigned_note(conn, size, note):
    lines = [row[0] for row in conn.execute("SELECT line FROM log_cosignatures WHERE size = ? ORDER BY witness_key_id",
                                            (size,))]
    return note + "".join(lines)


def store_cosignature(conn, builder, size, line):
    """Check a witness's cosignature line against its registered key and checkpoint `size`, and keep it."""
    checkpoint = conn.execute("SELECT note FROM log_checkpoints WHERE size = ?", (size,)).fetchone()
    if checkpoint is None:
        abort(404, f"no checkpoint of size {size}")
    text, _signatures = split_note(checkpoint["note"])
    line = line.removesuffix("\n")
    try:
        if "\n" in line:  # split_note reads the signatures after the last blank line, and would ignore the rest
            raise ValueError
        ((name, raw),) = split_note(f"{text}\n{line}\n")[1]
    except ValueError:
        raise BadInput("body: expected one cosignature line '\u2014 <name> <base64>'") from None
    for key_id, verifier_key in conn.execute("SELECT id, verifier_key FROM witness_keys WHERE builder_id = ?",
                                             (builder["id"],)):
        witness = parse_verifier_key(verifier_key)
        if cosignature_time(text, witness, name, raw) is not None:
            with transaction(conn):  # the line as checked, made again: nothing else the body held
                conn.execute("INSERT OR REPLACE INTO log_cosignatures (size, witness_key_id, line) VALUES (?, ?, ?)",
                             (size, key_id, signature_line(witness, raw)))
            return
    raise BadInput(f"body: not a valid cosignature of checkpoint {size} by a witness key registered to "
                   f"{builder['name']!r}")


def size_argument(name, upper):
    text = request.args.get(name, "")
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", text):
        raise BadInput(f"{name}: expected a non-negative integer, got {shorten(text)!r}")
    if int(text) > upper:
        raise BadInput(f"{name}: {text} is beyond the log, which has {upper} entries")
    return int(text)


def tile_response(body, width):
    response = Response(body, mimetype="application/octet-stream")
    response.headers["Cache-Control"] = FULL_TILE_CACHE if width == TILE_WIDTH else PARTIAL_TILE_CACHE
    return response


# ---------------------------------------------------------------- content negotiation

def wants_html():
    """HTML only when the client prefers it to JSON, as browsers do; curl's */* gets JSON."""
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


def accepted_types():
    """The types the client's Accept names, but those it refuses (q=0)."""
    return {mimetype for mimetype, quality in request.accept_mimetypes if quality > 0}


def report_format():
    """The first of these that the client names explicitly; anything else gets the text tree."""
    named = accepted_types()
    return next((mimetype for mimetype in (*REPORT_TYPES, "application/json", "text/html") if mimetype in named),
                "text/plain")


def uploaded_document(conn, report, latest, wanted):
    """The report as uploaded, in the format it was uploaded in. A report made from Nix's output has no
    CycloneDX SBOM to give, and a converted one would be ours, not the uploader's: that is a 406."""
    source_type = report["source_type"]
    if source_type not in accepted_types():
        abort(406, f"this report was uploaded as {source_type}, not {wanted}; ask for Accept: {source_type}")
    digest = latest["sbom_sha256"]  # the upload's own: no attestation changes it
    if request.if_none_match.contains(digest):
        response = Response(status=304)
    else:
        response = body_response(uploaded_bytes(conn, report, latest), source_type)
    response.set_etag(digest)
    response.headers["Cache-Control"] = "no-cache"
    return response


# ---------------------------------------------------------------- routes
# Every URL the server answers, and the function that answers it:
#
#   GET    /healthz                                   healthz
#   POST   /attestation/<drv_ident>                   post_attestation
#   POST   /attestations                              post_attestations
#   GET    /attestations/by-output/<basename>         attestations_by_output
#   GET    /derivations/                              list_derivations
#   GET    /derivations/<drv_ident>                   show_derivation
#   GET    /outputs/<basename>                        show_output
#   GET    /builders                                  list_builders
#   GET    /signatures/<builder>/nix-cache-info       cache_info
#   GET    /signatures/<builder>/<digest>.narinfo     builder_narinfo
#   GET    /, /reports                                list_reports
#   PUT    /reports/<name>                            put_report
#   DELETE /reports/<name>                            delete_report
#   GET    /reports/<name>                            show_report
#   GET    /reports/<name>/badge.svg                  report_badge
#   GET    /reports/<name>/suggested                  suggested
#   GET    /reports/<name>/suggest                    suggest
#   GET    /reports/<name>/pending                    pending
#   GET    /reports/<name>/history                    report_history
#   GET    /reports/<name>/changes?from=&to=          report_changes
#   GET    /policies                                  list_policies
#   GET    /policies/<name>                           show_policy
#   PUT    /policies/<name>                           put_policy
#   DELETE /policies/<name>                           delete_policy
#   GET    /link_patterns                             list_link_patterns
#   POST   /link_patterns                             post_link_pattern
#   DELETE /link_patterns?pattern=                    delete_link_pattern
#   GET    /diffs/<basename>                          list_diffs
#   PUT    /diffs/<basename>/<hash A>/<hash B>        put_diff
#   GET    /diffs/<basename>/<hash A>/<hash B>        show_diff
#   GET    /log/checkpoint                            log_checkpoint
#   GET    /log/key                                   log_key
#   GET    /log/tile/<L>/<N>[.p/<W>]                  log_tile
#   GET    /log/tile/entries/<N>[.p/<W>]              log_tile
#   GET    /log/proof/inclusion?index=I&size=N        inclusion_proof
#   GET    /log/proof/consistency?old=M&size=N        consistency_proof
#   POST   /log/cosignature?size=N                    post_cosignature
#
# Views of verdicts (/reports/<name> and its suggest, suggested and pending, /outputs/, /derivations/<drv>) take a
# trust policy: ?policy=NAME or ?trust=a,b&min=N&verified=0|1 (request_policy); without one the server's default applies.
# Errors: BadInput is 400, ReportTooLarge and DiffTooLarge 413, HTTPException keeps its status; a database that
# cannot be written for now, and a report upload while MAX_REPORT_UPLOADS are under way, are 503;
# every error body is JSON {"error": "...", "detail": "..."}.

routes = Blueprint("routes", __name__)


@routes.app_errorhandler(BadInput)
def bad_input(error):
    return error_body(str(error)), 400


@routes.app_errorhandler(DiffTooLarge)
def diff_too_large(error):
    return error_body(str(error)), 413


@routes.app_errorhandler(ReportTooLarge)
def report_too_large(error):
    return error_body(str(error)), 413


@routes.app_errorhandler(LabelTaken)
def label_taken(error):
    return error_body(str(error)), 409


@routes.app_errorhandler(UploadsBusy)
def uploads_busy(error):
    return error_body(str(error)), 503, {"Retry-After": str(UPLOAD_RETRY_AFTER_S)}


@routes.app_errorhandler(ViewsBusy)
def views_busy(error):
    return error_body(f"{error}; retry in {VIEW_RETRY_AFTER_S} seconds"), 503, {"Retry-After": str(VIEW_RETRY_AFTER_S)}


@routes.app_errorhandler(HTTPException)
def http_error(error):
    message = error.description if error.code != 413 else "request body too large"
    return error_body(message), error.code


@routes.app_errorhandler(LogDamaged)
def log_damaged(error):
    current_app.logger.error("the log is damaged: %s", error)
    return error_body(f"the log is damaged: {error}"), 500


@routes.app_errorhandler(sqlite3.OperationalError)
def database_unavailable(error):
    if not database_is_unavailable(error):
        raise error
    # SQLite silently opens a file it cannot write read-only; reconnect once the fault is gone.
    forget_connection()
    current_app.logger.error("database unavailable: %s", error)
    return error_body(f"database unavailable, try again later: {error}"), 503


def database_is_unavailable(error):
    return isinstance(error, sqlite3.OperationalError) and any(symptom in str(error) for symptom in UNAVAILABLE_SYMPTOMS)


def error_body(message):
    # `detail` repeats the message for clients written against lila (FastAPI), which read only that.
    return jsonify(error=message, detail=message)


@routes.get("/healthz")
def healthz():
    get_db().execute("SELECT COUNT(*) FROM builders").fetchone()
    return jsonify(status="ok")


@routes.post("/attestation/<drv_ident>")
def post_attestation(drv_ident):
    builder = require_builder()
    drv_ident = checked("drv_ident", lambda ident: drv_ident_of(store_path(f"{ident}.drv")), drv_ident)
    attestations = parse_attestation_list(json_body("MAX_ATTESTATION_BYTES"), lambda _item, _where: drv_ident)
    return accepted(store_attestations(get_db(), builder, attestations))


@routes.post("/attestations")
def post_attestations():
    builder = require_builder()
    with cyclic_gc_paused():
        attestations = parse_attestation_list(json_body("MAX_ATTESTATION_BYTES"), batch_drv_ident)
        g.large_batch = len(attestations) >= LARGE_BATCH
        log_indexes = store_attestations(get_db(), builder, attestations)
        if g.large_batch:
            wal_grown.set()
        return accepted(log_indexes)


def accepted(log_indexes):
    return jsonify(accepted=len(log_indexes), log_index=log_indexes)


@routes.get("/attestations/by-output/<basename>")
def attestations_by_output(basename):
    return jsonify(attestations_of_output(get_db(), output_path_of_basename(basename)))


@routes.get("/derivations/")
def list_derivations():
    rows = get_db().execute("SELECT id, digest, name FROM derivations ORDER BY id")
    return jsonify([{"id": row["id"], "drv_hash": basename_of(path_text(row["digest"], row["name"])).removesuffix(".drv")}
                    for row in rows])


@routes.get("/derivations/<drv_ident>")
def show_derivation(drv_ident):
    conn = get_db()
    drv_path = store_path(f"{drv_ident}.drv")
    derivation = is_store_path(drv_path) and conn.execute(
        f"SELECT id FROM derivations WHERE {digest_match('derivations', '?')} AND name = ?", path_lookup(drv_path)).fetchone()
    if not derivation:
        abort(404, f"no attestations for derivation {shorten(drv_ident)!r}")
    policy = request_policy(conn)
    if request.args.get("full", "").lower() == "true":
        rows = conn.execute(ATTESTATION_COLUMNS + "WHERE attestations.derivation_id = ? ORDER BY attestations.id",
                            (derivation["id"],))
        return jsonify([attestation_object(row) for row in rows])
    if policy.is_default:
        return jsonify(derivation_summary(conn, derivation["id"]))
    return jsonify(derivation_summary_under(conn, derivation["id"], policy))


def derivation_summary(conn, derivation_id):
    """{output_path: {hash: distinct builders}}, every attestation counted (as before policies)."""
    summary = defaultdict(dict)
    rows = conn.execute(
        "SELECT store_paths.digest, store_paths.name, attestations.nar_hash, COUNT(DISTINCT attestations.builder_id)"
        " FROM attestations JOIN store_paths ON store_paths.id = attestations.path_id WHERE attestations.derivation_id = ?"
        " GROUP BY attestations.path_id, attestations.nar_hash", (derivation_id,))
    for out_path, nar_hash, builders in sorted((path_text(digest, name), hash_text(nar_hash), builders)
                                               for digest, name, nar_hash, builders in rows):
        summary[out_path][nar_hash] = builders
    return summary


def derivation_summary_under(conn, derivation_id, policy):
    """{output_path: {"verdict": ..., "hashes": {hash: distinct trusted builders}}} under a policy."""
    builders_by_path = defaultdict(lambda: defaultdict(set))
    rows = conn.execute(
        "SELECT store_paths.digest, store_paths.name, attestations.nar_hash, attestations.builder_id FROM attestations"
        " JOIN store_paths ON store_paths.id = attestations.path_id WHERE attestations.derivation_id = ?"
        + policy.attestations_clause(), (derivation_id,))
    for out_path, output_hash, builder_id in sorted((path_text(digest, name), hash_text(nar_hash), builder_id)
                                                    for digest, name, nar_hash, builder_id in rows):
        if policy.trusts(builder_id):
            builders_by_path[out_path][output_hash].add(builder_id)
    return {out_path: {"verdict": policy.verdict(by_hash), "hashes": {h: len(b) for h, b in by_hash.items()}}
            for out_path, by_hash in builders_by_path.items()}


@routes.get("/outputs/<basename>")
def show_output(basename):
    output_path = output_path_of_basename(basename)
    policy = request_policy(get_db())
    attestations = attestations_of_output(get_db(), output_path)
    if not wants_html():
        return jsonify(attestations)
    trusted = None if policy.builders is None else set(policy.builders)
    builders_by_hash = defaultdict(set)
    for attestation in attestations:
        if policy.is_counted(attestation):
            builders_by_hash[attestation["output_hash"]].add(attestation["builder"])
    return render_template("output.html", output_path=output_path, attestations=attestations,
                           builders_by_hash=builders_by_hash, verdict=verdict(builders_by_hash, trusted, policy.minimum),
                           diffs=diffs_of_output(get_db(), output_path), policy=policy)


@routes.get("/builders")
def list_builders():
    conn = get_db()
    counts = dict(conn.execute("SELECT builder_id, COUNT(*) FROM attestations GROUP BY builder_id"))
    builders = [{"name": row["name"], "public_keys": [], "attestations": counts.get(row["id"], 0)}
                for row in conn.execute("SELECT id, name FROM builders ORDER BY name")]
    keys = defaultdict(list)
    for row in conn.execute("SELECT builders.name, public_key FROM public_keys JOIN builders"
                            " ON builders.id = public_keys.builder_id ORDER BY public_keys.id"):
        keys[row[0]].append(row[1])
    for builder in builders:
        builder["public_keys"] = keys[builder["name"]]
    if wants_html():
        return render_template("builders.html", builders=builders)
    return jsonify(builders)


def find_builder(name):
    builder = get_db().execute("SELECT id, name FROM builders WHERE name = ?", (name,)).fetchone()
    if builder is None:
        abort(404, f"no builder named {shorten(name)!r}")
    return builder


@routes.get("/signatures/<builder_name>/nix-cache-info")
def cache_info(builder_name):
    find_builder(builder_name)
    return Response(f"StoreDir: {STORE_DIR}\nWantMassQuery: 0\nPriority: 60\n", mimetype="text/x-nix-cache-info")


@routes.get("/signatures/<builder_name>/<digest>.narinfo")
def builder_narinfo(builder_name, digest):
    builder = find_builder(builder_name)
    if not DIGEST_RE.fullmatch(digest):
        raise BadInput(f"hash: expected 32 nix-base32 characters, got {shorten(digest)!r}")
    row = get_db().execute(
        ATTESTATION_COLUMNS + f"WHERE attestations.builder_id = ? AND {digest_match('store_paths', '?')}"
        " AND attestations.nar_size IS NOT NULL AND attestations.refs IS NOT NULL ORDER BY attestations.id DESC LIMIT 1",
        (builder["id"], digest_of(digest), digest_of(digest))).fetchone()
    if row is None:
        abort(404, f"{shorten(builder_name)} has no attestation with size and references for {digest}")
    return Response(narinfo_text(attestation_object(row)), mimetype="text/x-nix-narinfo")


@routes.get("/")
@routes.get("/reports")
def list_reports():
    conn = get_db()
    rows = conn.execute("SELECT id, name, root FROM reports WHERE name NOT LIKE ? ORDER BY name",
                        (UNPUBLISHED_PREFIX + "%",)).fetchall()
    if request.path == "/reports" and not wants_html():
        return jsonify([row["name"] for row in rows])
    counts_of = index_counts(conn, [row["id"] for row in rows])
    reports = []
    for row in rows:
        numbers = headline(counts_of[row["id"]])
        reports.append({"name": row["name"], "root": row["root"], "total": numbers["total"],
                        "reproduced": numbers["reproduced"], "share": (numbers["percent"] or 0) / 100,
                        "fixed_output": numbers["fixed_output"]})
    return render_template("reports.html", reports=reports)


@routes.put("/reports/<name>")
def put_report(name):
    builder = require_builder()
    check_report_name(name)
    label = check_revision_label(request.args.get("revision"))
    conn = get_db()
    check_report_type(request.mimetype)
    with report_upload_slot():
        existing = report_to_replace(conn, name, builder, label)
        remove_abandoned_reports(conn)
        # The bytes are parsed and stored as they came, never as a copy decoded to text.
        body = utf8_checked(body_bytes("MAX_REPORT_BYTES", "a CycloneDX JSON SBOM or Nix's closure output"))
        digest = hashlib.sha256(body).hexdigest()
        unchanged = unchanged_revision(conn, existing, label, digest)
        if unchanged is not None:
            return jsonify(report=name, status="unchanged", revision=unchanged)
        if existing is not None:
            # Views of the revision this one replaces are forgotten once it is published; their memory,
            # tens of MiB for a large report, is wanted now, for the parse.
            current_app.extensions["report_views"].forget_report(existing["id"])
        upload = (request.mimetype, body, request.args.get("root"), current_app.config["MAX_REPORT_PATHS"],
                  current_app.config["MAX_REPORT_EDGES"])
        worker_tree = current_app.extensions["tree_worker"].lay_out(upload) if edges_read_apart(request.mimetype) else None
        with cyclic_gc_paused():
            try:
                number = define_report(conn, name, builder, body, digest, label,
                                       functools.partial(report_contents, *upload, edges=worker_tree is None), worker_tree)
            except UnicodeEncodeError:
                raise BadInput("SBOM: a string contains a lone UTF-16 surrogate escape, which is not text") from None
    return jsonify(report=name, status="defined", revision=number, label=label)


def unchanged_revision(conn, report, label, digest):
    """The latest revision's number when this SBOM is the one it holds and no label is given: nothing to do."""
    latest = latest_revision(conn, report["id"]) if report is not None and label is None else None
    if latest is None or latest["sbom_sha256"] != digest:
        return None
    return latest["number"]


@routes.delete("/reports/<name>")
def delete_report(name):
    builder = require_builder()
    conn = get_db()
    unpublished = current_app.extensions["unpublished_reports"]
    deleted = unpublished_name("deleted")
    with unpublished.using(deleted):
        with transaction(conn):
            report = find_report(conn, name)
            check_may_change_report(report, builder)
            conn.execute("UPDATE reports SET name = ? WHERE id = ?", (deleted, report["id"]))
            # Now, not with the report's row: a pending revision is written from rows removed a chunk at a time.
            conn.execute("DELETE FROM report_revisions WHERE report_id = ?", (report["id"],))
        remove_report(conn, deleted)
    return jsonify(report=name, status="deleted")


@routes.get("/reports/<name>")
def show_report(name):
    conn = get_db()
    wanted = report_format()
    with read_snapshot(conn):
        report = find_report(conn, name)
        policy = request_policy(conn)
        latest = latest_revision(conn, report["id"])
        revision = find_revision(conn, report, request.args["revision"]) if "revision" in request.args else latest
        if wanted in REPORT_TYPES:
            if revision["number"] != latest["number"]:
                abort(410, f"report {report['name']!r} keeps the upload of its latest revision ({latest['number']}) only;"
                           f" revision {revision['number']} keeps its paths and tree")
            return uploaded_document(conn, report, latest, wanted)
        if not request.environ.get(RENDERING):
            return cached_report_view(conn, report, revision, latest, policy, wanted)
        if revision["number"] != latest["number"]:
            return show_older_revision(conn, report, revision, latest, policy, wanted)
        with cyclic_gc_paused():
            verdicts = report_labels(conn, report["id"], policy)
            if wanted == "application/json":
                counts = verdict_counts(verdicts)
                return jsonify(name=report["name"], root=report["root"], counts=counts, headline=headline(counts),
                               paths=verdicts, diffs=report_diffs(conn, report["id"]), revision=revision_object(revision))
            components = report_components(conn, report["id"])
            tree = report_tree(conn, report["id"])
        if wanted == "text/plain":
            return Response(batched(text_tree_lines(tree, components, verdicts)), mimetype="text/plain")
        return report_page(conn, report, components, tree, verdicts, policy, revision, latest,
                           report_diff_links(conn, report["id"]))


def show_older_revision(conn, report, revision, latest, policy, wanted):
    """A revision before the latest, from its shared component rows (its upload is gone: show_report answers 410)."""
    with cyclic_gc_paused():
        (components,) = revision_components(conn, revision["id"])
        out_paths = [out_path for component in components for out_path in component["outputs"]]
        verdicts = as_listed(path_verdicts(conn, out_paths, policy), revision_fixed_output(conn, revision, components))
        diffs = paths_diffs(conn, out_paths)
        if wanted == "application/json":
            counts = verdict_counts(verdicts)
            return jsonify(name=report["name"], root=revision["root"], counts=counts, headline=headline(counts),
                           paths=verdicts, diffs=diffs, revision=revision_object(revision))
        tree = revision_tree(conn, revision["id"])
    if wanted == "text/plain":
        return Response(batched(text_tree_lines(tree, components, verdicts)), mimetype="text/plain")
    report = {"name": report["name"], "root": revision["root"]}
    return report_page(conn, report, components, tree, verdicts, policy, revision, latest, diff_links_of(diffs))


@routes.get("/reports/<name>/history")
def report_history(name):
    conn = get_db()
    if not request.environ.get(RENDERING):
        return cached_revisions_view(conn, name, "history")
    with read_snapshot(conn), cyclic_gc_paused():
        report = find_report(conn, name)
        policy = request_policy(conn)
        revisions = [{**revision_object(revision), "counts": counts}
                     for revision, counts in revision_counts(conn, report_revisions(conn, report["id"]), policy)]
    if not wants_html():
        return jsonify(name=report["name"], revisions=revisions)
    return render_template("history.html", report=report, revisions=revisions, chart=history_chart(revisions),
                           policy=policy, colours=VERDICT_COLOURS)


@routes.get("/reports/<name>/changes")
def report_changes(name):
    conn = get_db()
    if not request.environ.get(RENDERING):
        return cached_revisions_view(conn, name, "changes")
    with read_snapshot(conn), cyclic_gc_paused():
        report = find_report(conn, name)
        policy = request_policy(conn)
        revisions = report_revisions(conn, report["id"])
        old, new = compared_revisions(conn, report, revisions)
        changes = revision_changes(conn, old, new, policy)
    if not wants_html():
        return jsonify(name=report["name"], **changes)
    return render_template("changes.html", report=report, changes=changes, policy=policy)


def cached_revisions_view(conn, name, kind):
    """The response for /history or /changes (kind), from the view cache as a report's views are: each counts the
    attestations of every path of several revisions, which took the request thread half a second a time."""
    with read_snapshot(conn):
        report = find_report(conn, name)
        policy = request_policy(conn)
        revisions = report_revisions(conn, report["id"])
        compared = compared_revisions(conn, report, revisions) if kind == "changes" else ()
        wanted = "text/html" if wants_html() else "application/json"
        return cached_report_view(conn, report, revisions[-1], revisions[-1], policy, wanted,
                                  (kind, *[revision["id"] for revision in compared]))


@routes.get("/reports/<name>/badge.svg")
def report_badge(name):
    conn = get_db()
    report = find_report(conn, name)
    numbers = headline(cached_verdict_counts(conn, report["id"], request_policy(conn)))
    response = Response(render_template("badge.svg", **badge_parts(report["name"], numbers)), mimetype="image/svg+xml")
    # The ETag is the badge's own bytes: it changes exactly when the headline does.
    response.add_etag()
    response.headers["Cache-Control"] = "public, max-age=60"
    return response.make_conditional(request)


@routes.get("/reports/<name>/suggested")
def suggested(name):
    conn = get_db()
    builder = optional_builder()
    with read_snapshot(conn):
        report = find_report(conn, name)
        return jsonify(suggestions(conn, report["id"], builder, request_policy(conn), suggestion_limit()))


@routes.get("/reports/<name>/suggest")
def suggest(name):
    conn = get_db()
    builder = optional_builder()
    with read_snapshot(conn):
        report = find_report(conn, name)
        policy = request_policy(conn)
        out_paths = suggestions(conn, report["id"], builder, policy, suggestion_limit())
        return jsonify(suggestion_objects(conn, report["id"], out_paths))


@routes.get("/reports/<name>/pending")
def pending(name):
    conn = get_db()
    builder = optional_builder()
    after = request.args.get("after") or None
    limit = suggestion_limit() if "limit" in request.args else MAX_SUGGEST
    with read_snapshot(conn):
        report = find_report(conn, name)
        policy = request_policy(conn)
        out_paths = [out_path for out_path, _builders in open_questions(conn, report["id"], builder, policy, after, limit)]
        next_after = out_paths[-1] if len(out_paths) == limit else None
        return jsonify(paths=suggestion_objects(conn, report["id"], out_paths), next=next_after)


@routes.get("/policies")
def list_policies():
    rows = get_db().execute(POLICY_COLUMNS + " ORDER BY policies.name")
    return jsonify([policy_object(row) for row in rows])


@routes.get("/policies/<name>")
def show_policy(name):
    row = get_db().execute(POLICY_COLUMNS + " WHERE policies.name = ?", (name,)).fetchone()
    if row is None:
        abort(404, f"no policy named {shorten(name)!r}")
    return jsonify(policy_object(row))


@routes.put("/policies/<name>")
def put_policy(name):
    builder = require_builder()
    if not POLICY_NAME_RE.fullmatch(name):
        raise BadInput(f"policy name: expected 1 to 128 characters of [A-Za-z0-9._-], not starting with '.', got {shorten(name)!r}")
    conn = get_db()
    builders, minimum, verified = parse_policy_body(conn, json_body("MAX_ATTESTATION_BYTES"))
    verified_only = None if verified is None else int(verified)
    with transaction(conn):
        existing = policy_owner(conn, name)
        if existing is None:
            conn.execute("INSERT INTO policies (name, owner_id, builders, min, verified_only, updated_at)"
                         " VALUES (?, ?, ?, ?, ?, ?)", (name, builder["id"], builders, minimum, verified_only, now_iso()))
        else:
            check_owner_or_admin(existing, builder, "policy")
            conn.execute("UPDATE policies SET builders = ?, min = ?, verified_only = ?, updated_at = ? WHERE id = ?",
                         (builders, minimum, verified_only, now_iso(), existing["id"]))
    return jsonify(policy=name, status="defined")


def policy_owner(conn, name):
    return conn.execute("SELECT id, owner_id FROM policies WHERE name = ?", (name,)).fetchone()


@routes.delete("/policies/<name>")
def delete_policy(name):
    builder = require_builder()
    conn = get_db()
    with transaction(conn):
        existing = policy_owner(conn, name)
        if existing is None:
            abort(404, f"no policy named {shorten(name)!r}")
        check_owner_or_admin(existing, builder, "policy")
        conn.execute("DELETE FROM policies WHERE id = ?", (existing["id"],))
    return jsonify(policy=name, status="deleted")


@routes.get("/link_patterns")
def list_link_patterns():
    rows = get_db().execute("SELECT pattern, link, builders.name AS owner FROM link_patterns"
                            " LEFT JOIN builders ON builders.id = link_patterns.owner_id ORDER BY link_patterns.id")
    return jsonify([{"pattern": row["pattern"], "link": row["link"], "owner": row["owner"]} for row in rows])


@routes.post("/link_patterns")
def post_link_pattern():
    builder = require_builder()
    pattern = check_link_pattern(request.args.get("pattern", ""))
    link = check_link(request.args.get("link", ""))
    conn = get_db()
    with transaction(conn):
        existing = link_pattern_row(conn, pattern)
        if existing is None:
            check_link_pattern_slots(conn, builder, pattern)
            conn.execute("INSERT INTO link_patterns (pattern, link, owner_id) VALUES (?, ?, ?)",
                         (pattern, link, builder["id"]))
        else:
            check_owner_or_admin(existing, builder, "link pattern")
            conn.execute("UPDATE link_patterns SET link = ? WHERE id = ?", (link, existing["id"]))
    return jsonify(pattern=pattern, link=link)


@routes.delete("/link_patterns")
def delete_link_pattern():
    builder = require_builder()
    pattern = request.args.get("pattern", "")
    conn = get_db()
    with transaction(conn):
        existing = find_link_pattern(conn, pattern)
        check_owner_or_admin(existing, builder, "link pattern")
        conn.execute("DELETE FROM link_patterns WHERE id = ?", (existing["id"],))
    return jsonify(pattern=pattern, status="deleted")


@routes.get("/diffs/<basename>")
def list_diffs(basename):
    output_path = output_path_of_basename(basename)
    diffs = diffs_of_output(get_db(), output_path)
    if wants_html():
        return render_template("diffs.html", output_path=output_path, diffs=diffs)
    return jsonify(diffs)


@routes.put("/diffs/<basename>/<hash_a>/<hash_b>")
def put_diff(basename, hash_a, hash_b):
    builder = require_builder()
    output_path = output_path_of_basename(basename)
    hash_a, hash_b = diff_hashes(hash_a, hash_b, for_upload=True)
    document = parse_diff(json_body("MAX_DIFF_BYTES"))
    status = store_diff(get_db(), builder, output_path, hash_a, hash_b, document)
    return jsonify(output_path=output_path, hash_a=hash_a, hash_b=hash_b, status=status)


@routes.get("/diffs/<basename>/<hash_a>/<hash_b>")
def show_diff(basename, hash_a, hash_b):
    output_path = output_path_of_basename(basename)
    diff = read_diff(get_db(), output_path, *diff_hashes(hash_a, hash_b, for_upload=False))
    if not wants_html():
        return jsonify(diff)
    lines = (diff["diffoscope"] or "").splitlines(keepends=True)
    return render_template("diff.html", diff=diff, rows=diff_rows(diff["files"]), line_count=len(lines),
                           first_screen="".join(lines[:DIFF_SCREEN_LINES]), rest="".join(lines[DIFF_SCREEN_LINES:]))


@routes.get("/log/checkpoint")
def log_checkpoint():
    conn = get_db()
    size, note = current_checkpoint(conn)
    response = Response(cosigned_note(conn, size, note), mimetype="text/plain")
    response.headers["Cache-Control"] = "no-cache"
    return response


@routes.get("/log/key")
def log_key():
    return Response(log_verifier_key() + "\n", mimetype="text/plain")


@routes.get("/log/tile/<path:tile>")
def log_tile(tile):
    match = TILE_RE.fullmatch(tile)
    if not match:
        abort(404, f"no tile {shorten(tile)!r}: expected tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>]")
    level, index, width = match.group(1), parse_tile_index(match.group(2)), int(match.group(3) or TILE_WIDTH)
    if width > TILE_WIDTH:
        abort(404, f"no tile {tile!r}: a partial tile has 1 to {TILE_WIDTH - 1} entries")
    conn = get_db()
    start = index * TILE_WIDTH
    # One snapshot: an entry is read from two tables, and an attestation upgraded between the reads gave bytes
    # that do not hash to the entry's leaf, served as immutable.
    with read_snapshot(conn):
        size = log_size(conn)
        if start + width > size:  # also keeps an index of any number of xNNN/ groups out of SQLite's integers
            abort(404, f"no tile {tile!r}: the log has {size} entries")
        if level == "entries":
            return tile_response(entry_bundle(logged_entries(conn, start, start + width)), width)
        hashes = stored_hashes(conn, int(level), start, start + width)
    if len(hashes) != width:
        abort(404, f"no tile {tile!r}: the log is not that large yet")
    return tile_response(b"".join(hashes), width)


@routes.get("/log/proof/inclusion")
def inclusion_proof():
    conn = get_db()
    with read_snapshot(conn):  # as log_tile's
        size = size_argument("size", log_size(conn))
        index = size_argument("index", size)
        if index == size:
            raise BadInput(f"index: {index} is not in a tree of size {size}")
        proof = LogTree(conn).inclusion_proof(index, 0, size)
        (stored_leaf,) = stored_hashes(conn, 0, index, index + 1)
        (entry,) = logged_entries(conn, index, index + 1)
    return jsonify(hashes=[base64.b64encode(hash_).decode() for hash_ in proof],
                   leaf_hash=base64.b64encode(stored_leaf).decode(), entry=base64.b64encode(entry).decode())


@routes.get("/log/proof/consistency")
def consistency_proof():
    conn = get_db()
    size = size_argument("size", log_size(conn))
    old = size_argument("old", size)
    proof = LogTree(conn).consistency_proof(old, 0, size) if old else []
    return jsonify(hashes=[base64.b64encode(hash_).decode() for hash_ in proof])


@routes.post("/log/cosignature")
def post_cosignature():
    builder = require_builder()
    conn = get_db()
    size = size_argument("size", log_size(conn))
    store_cosignature(conn, builder, size, body_text("MAX_ATTESTATION_BYTES", "a cosignature line"))
    return jsonify(stored=True)


# ---------------------------------------------------------------- cached report views
# A view of a large report (HTML, text, JSON) costs up to a second of CPU, and Python runs one thread
# at a time: rendered in the request threads, views made every attestation wait. So views are rendered
# one at a time, in a worker process at low priority when the server runs from main() (in a thread of
# this process otherwise, as in tests), and kept by report, revision, format and trust policy with
# their report's ReportChanges counter. An unchanged report is served from memory (304 to a matching
# If-None-Match); a changed one is served as it was for at most MAX_STALE_S while it is rendered again.
# The index's verdict counts are kept the same way. See "Cached report views" in docs/operating.md.

MAX_STALE_S = 2.0
RENDER_TIMEOUT_S = 300
VIEW_CACHE_BYTES = 48 * MiB
# A larger view is kept apart, one at a time (ReportViews.store): in the cache, it would push every other view out.
LARGEST_CACHED_VIEW_BYTES = VIEW_CACHE_BYTES // 2
RENDER_NICENESS = 10
SWITCH_INTERVAL_S = 0.0005
RENDERING = "hash_collection.rendering"  # in the WSGI environ of a render; no client can set it


# Distinct views being rendered or queued for the render worker, beyond which a view that must be rendered is 503:
# views of many policies or revisions, asked at once, would each hold a request thread while attestations wait.
# Requests for a view under way wait for it, however many: a builder's report page, asked by many, is one render.
MAX_RENDERS = 8
VIEW_RETRY_AFTER_S = 2


class CachedView(NamedTuple):
    counter: tuple  # the report's ReportChanges counter, read before the render began
    started: float  # time.time() when the render began: the view holds every change committed before
    status: int
    mimetype: str
    body: object  # the bytes of a view; the verdict counts of the index
    etag: str


class ReportViews:
    """Rendered views by key, each rendered once per change of its report, one render at a time.

    A view whose report changed is rendered again before it is served, unless a render of it is under
    way already: then the last view is served if it began no more than MAX_STALE_S before the request,
    and if the report changed again, the next render starts when that one is done. A quiet server
    answers with the latest verdicts; a busy one renders its popular views back to back, a core's
    worth at most, and serves each as the last render left it.
    """

    def __init__(self, app):
        self.app = app
        self.lock = threading.RLock()  # a render already done calls back at once, under the lock
        self.views = {}  # key -> CachedView, least recently used first
        self.large = {}  # key -> CachedView: at most one, larger than LARGEST_CACHED_VIEW_BYTES, kept apart
        self.rendering = {}  # key -> (Future of the CachedView being rendered, its counter)
        self.again = {}  # key -> (counter, job) to render once the render under way is done
        self.executor = None

    def view(self, key, counter, job, arrived):
        """A view rendered from at most MAX_STALE_S before `arrived`, or from after its last change."""
        while True:
            with self.lock:
                view = self.looked_up(key)
                if view is not None and view.counter == counter:
                    return view
                if key not in self.rendering:
                    if len(self.rendering) >= MAX_RENDERS:
                        if view is not None and servable(view, counter, arrived):
                            return view
                        raise ViewsBusy(f"{MAX_RENDERS} other views are being rendered")
                    future = self.start_render(key, counter, job)
                else:
                    future, rendering_counter = self.rendering[key]
                    if rendering_counter != counter:
                        self.again[key] = (counter, job)
                    if view is not None and servable(view, counter, arrived):
                        return view
            view = future.result(timeout=RENDER_TIMEOUT_S)
            if servable(view, counter, arrived):
                return view
            # That render began too long before this request: the next one begins after it.

    def start_render(self, key, counter, job):
        if self.executor is None:
            self.executor = render_executor(self.app)
        try:
            rendered = self.executor.submit(*job)
        except concurrent.futures.BrokenExecutor:
            self.executor = None  # the worker died (killed, out of memory): the next view starts another
            raise
        outcome = concurrent.futures.Future()
        self.rendering[key] = (outcome, counter)
        rendered.add_done_callback(lambda done: self.rendered(key, counter, done, outcome))
        return outcome

    def rendered(self, key, counter, done, outcome):
        with self.lock:
            del self.rendering[key]
            again = self.again.pop(key, None)
            if done.exception() is not None:
                if isinstance(done.exception(), concurrent.futures.BrokenExecutor):
                    self.executor = None
                outcome.set_exception(done.exception())
                return
            view = CachedView(counter, *done.result())
            if view.status == 200:
                self.store(key, view)
            if again is not None:
                with contextlib.suppress(concurrent.futures.BrokenExecutor):
                    self.start_render(key, *again)
        outcome.set_result(view)

    def looked_up(self, key):
        """The view kept under key, now the most recently used; None if there is none. Under the lock."""
        view = self.views.pop(key, None)
        if view is not None:
            self.views[key] = view
            return view
        return self.large.get(key)

    def store(self, key, view):
        """Keep the view under key, under the lock. One larger than LARGEST_CACHED_VIEW_BYTES is kept apart, in place of
        the last such: in the cache, it would push every other view out."""
        self.views.pop(key, None)
        self.large.pop(key, None)
        if view_size(view) > LARGEST_CACHED_VIEW_BYTES:
            self.large = {key: view}
            return
        self.views[key] = view
        while len(self.views) > 1 and sum(view_size(view) for view in self.views.values()) > VIEW_CACHE_BYTES:
            del self.views[next(iter(self.views))]

    def kept(self, key):
        """The body kept under key, for what is read, not rendered; None if there is none."""
        with self.lock:
            view = self.looked_up(key)
            return None if view is None else view.body

    def keep(self, key, body):
        with self.lock:
            self.store(key, CachedView(None, time.time(), 200, None, body, None))

    def forget(self):
        with self.lock:
            self.views, self.large = {}, {}

    def rendering_now(self):
        with self.lock:
            return bool(self.rendering)

    def forget_report(self, report_id):
        """Drop a report's views (every key begins with its id) and so their memory."""
        with self.lock:
            self.views = {key: view for key, view in self.views.items() if key[0] != report_id}
            self.large = {key: view for key, view in self.large.items() if key[0] != report_id}

    def start_worker(self):
        """Start the render worker now, so that the first view does not wait for it."""
        with self.lock:
            if self.executor is None:
                self.executor = render_executor(self.app)
            self.executor.submit(os.getpid)


def servable(view, counter, arrived):
    """Nothing changed since the view was rendered, or it began at most MAX_STALE_S before the request."""
    return view.counter == counter or (view.counter[0] == counter[0] and view.started >= arrived - MAX_STALE_S)


def view_size(view):
    return len(view.body) if isinstance(view.body, bytes) else 1024


def cached_report_view(conn, report, revision, latest, policy, wanted, of_revisions=()):
    """The response for a view of a report's verdicts, from the cache. of_revisions names a view of several revisions,
    such as /history ("history") or /changes ("changes", from, to), which older revisions' paths change too."""
    arrived = time.time()
    # Out of the request's snapshot first: the counter reads which reports list the paths attested since it was last
    # read, and a report published since the snapshot began must be among them. The render may take seconds, too.
    leave_snapshot(conn)
    counter = current_app.extensions["report_changes"].counter(
        conn, report["id"], revision["id"] == latest["id"] and not of_revisions)
    key = (report["id"], revision["id"], wanted, policy.cache_key, policy.name, *of_revisions)
    job = (render_view_job, request.path, request.query_string.decode("latin-1"), wanted)
    view = current_app.extensions["report_views"].view(key, counter, job, arrived)
    if view.status == 200 and request.if_none_match.contains_weak(view.etag):
        response = Response(status=304)
    else:
        response = body_response(view.body, view.mimetype, view.status)
    # Weak for a page: one rendered again with the same verdicts keeps its ETag, but says another time (render_view_job).
    response.set_etag(view.etag, weak=view.mimetype == "text/html")
    response.headers["Cache-Control"] = "no-cache"  # keep it, but ask with If-None-Match first
    response.headers["Age"] = str(int(max(0.0, time.time() - view.started)))
    response.last_modified = datetime.fromtimestamp(view.started, timezone.utc)
    return response


def body_response(body, mimetype, status=200):
    """A response of bytes in memory that waitress sends as they are (wsgi.file_wrapper): through its
    output buffer, a body over 1 MiB would be copied to a temporary file and read back first."""
    response = Response(wrap_file(request.environ, BodyReader(body)), status=status, mimetype=mimetype,
                        direct_passthrough=True)
    response.content_length = len(body)
    return response


class BodyReader(io.RawIOBase):
    """A file over bytes whose reads are views, not copies: for each send, waitress reads as much as
    a socket buffer holds, then reads again what was sent; copies of that were most of a view's cost."""

    def __init__(self, body):
        super().__init__()
        self.body = memoryview(body)
        self.position = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def read(self, size=-1):
        end = len(self.body) if size is None or size < 0 else min(len(self.body), self.position + size)
        chunk = self.body[self.position:end]
        self.position = max(self.position, end)
        return chunk

    def seek(self, offset, whence=io.SEEK_SET):
        self.position = offset if whence == io.SEEK_SET else offset + (self.position if whence == io.SEEK_CUR else len(self.body))
        return self.position

    def tell(self):
        return self.position


def uploaded_bytes(conn, report, latest):
    """The latest revision's upload, kept with the views: copying 16 MiB out of SQLite for every
    request held the interpreter longer than anything else an SBOM download does. No render: read here."""
    views = current_app.extensions["report_views"]
    key = (report["id"], latest["id"], "upload")
    body = views.kept(key)
    if body is None:
        body = b"".join(sbom_pieces(conn, report["id"]))
        views.keep(key, body)
    return body


def index_counts(conn, report_ids):
    """{report id: verdict counts under the default policy} of these reports, for the index."""
    policy = default_policy()
    return {report_id: cached_verdict_counts(conn, report_id, policy) for report_id in report_ids}


def cached_verdict_counts(conn, report_id, policy):
    """The report's verdict counts under the policy (the index, the badge), from the view cache: counted once
    per change of the report, by the render worker."""
    arrived = time.time()
    counter = current_app.extensions["report_changes"].counter(conn, report_id)
    key = (report_id, "counts", policy.cache_key)
    return current_app.extensions["report_views"].view(key, counter, (render_counts_job, report_id, policy), arrived).body


def render_executor(app):
    if not app.config["RENDER_WORKER"]:
        # Only a weak reference: the thread ends when the app is thrown away (tests make hundreds).
        return concurrent.futures.ThreadPoolExecutor(max_workers=1, initializer=start_render_thread,
                                                     initargs=(weakref.ref(app),))
    config = {key: value for key, value in app.config.items() if key.isupper()}
    return worker_executor(start_render_worker, config)


def worker_executor(initializer, *initargs):
    """A pool of one process started by initializer(*initargs, server pid).
    spawn, not fork: a fork of this threaded server could inherit a lock held mid-request."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=initializer, initargs=(*initargs, os.getpid()))


def die_with_server(server_pid):
    """A server killed outright cannot stop its workers: the kernel does, when the server dies."""
    libc = glibc()
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != server_pid:
        os._exit(0)


def lower_priority(niceness):
    """os.nice, or a warning where a service manager's system-call filter forbids it (EPERM): the views are then
    rendered at the server's own priority rather than not at all."""
    try:
        os.nice(niceness)
    except OSError as error:
        print(f"web.py: the render worker keeps the server's priority: setpriority failed: {error}",
              file=sys.stderr, flush=True)


render_app = threading.local()  # app(): the app a render thread or worker renders with


def start_render_thread(app_reference):
    render_app.app = app_reference


def start_render_worker(config, server_pid):
    die_with_server(server_pid)
    lower_priority(RENDER_NICENESS)  # the server's threads, which take attestations, come first
    limit_malloc_arenas()
    app = create_app({**config, "RENDER_WORKER": False})
    start_render_thread(lambda: app)


def render_view_job(path, query_string, wanted):
    """(started, status, mimetype, body, etag): the view as the route answers it, rendered whole."""
    app = render_app.app()
    started = time.time()
    # The collector paused for the whole render: a streamed page is built after the view function returns,
    # and each full collection would scan the hundreds of thousands of objects the view holds.
    with cyclic_gc_paused(), app.test_request_context(quote(path), query_string=query_string, headers={"Accept": wanted},
                                                      environ_base={RENDERING: True}):
        g.view_as_of = iso_time(started)
        g.view_max_stale_s = f"{MAX_STALE_S:g}"
        response = app.full_dispatch_request()
        body = response.get_data()
        response.close()
        # The page says when its verdicts are from (report.html): a page rendered again with the same verdicts keeps its ETag.
        compared = body.replace(g.view_as_of.encode(), b"", 2) if response.mimetype == "text/html" else body
    return started, response.status_code, response.mimetype, body, body_etag(compared)


def render_counts_job(report_id, policy):
    app = render_app.app()
    started = time.time()
    with app.app_context():
        conn = get_db()
        with read_snapshot(conn), cyclic_gc_paused():
            counts = verdict_counts(report_labels(conn, report_id, policy))
    return started, 200, None, counts, None


def body_etag(body):
    """From the bytes: a view rendered again with the same verdicts keeps its ETag."""
    return hashlib.blake2b(body, digest_size=16).hexdigest()


# ---------------------------------------------------------------- HTML pages
# The report page is streamed, and the markup of its tree and its lists of paths is built here,
# not in templates/report.html: see rendered_nodes for why.

class PathList(NamedTuple):
    """One of the report page's lists of paths: how many, and its <ul> markup (path_list_markup)."""
    length: int
    markup: Markup


# The report page's lists of paths, by the labels they list; reproduced paths are in the tree only.
PATH_LIST_OF_LABEL = {FIXED_OUTPUT: "fixed_output", NONDETERMINISTIC: "not_reproducible", PARTIALLY: "not_reproducible",
                      NO_BUILDS: "unchecked", ONE_BUILD: "unchecked"}


def report_page(conn, report, components, tree, verdicts, policy, revision, latest, diff_links):
    counts = verdict_counts(verdicts)
    total = sum(counts.values())
    names = {path: component["name"] for component in components for path in component["outputs"]}
    links_of = link_matcher(conn)
    query = policy_query(policy)
    listed_paths = defaultdict(list)  # in one pass over the verdicts, not one per list
    for path, label in verdicts.items():
        listed_paths[PATH_LIST_OF_LABEL.get(label)].append((path, label))

    def listed(list_name):
        entries = [(path, names.get(path), label, links_of(path)) for path, label in listed_paths[list_name]]
        return PathList(len(entries), path_list_markup(entries, query, diff_links))

    numbers = headline(counts)
    return streamed_page("report.html", report=report, counts=counts, total=total,
        headline=numbers, headline_sentence=headline_sentence(numbers),
        bar=verdict_bar(counts, total), fixed_output=listed("fixed_output"),
        not_reproducible=listed("not_reproducible"), unchecked=listed("unchecked"),
        tree_chunks=tree_chunks(tree, components, verdicts, query),
        require_signatures=current_app.config["REQUIRE_SIGNATURES"],
        policy=policy, policy_query=query, revision=revision, latest=latest)


def path_list_markup(entries, query, diff_links):
    """A <ul> of (path, name, label, links): each path's badge, link, verdict, its links and its diff.

    Built here, not as a Jinja macro, for the reason rendered_nodes gives: the "Not yet checked" list
    can hold most of a closure. Values are escaped as rendered_nodes says.
    """
    query = escape_html(query)
    labelled = {label: (f'{badge_markup(label)} <a class="path" href="', f'</a> <span class="note">{escape_html(label)}</span>')
                for label in REPORT_LABELS}
    items = []
    for path, name, label, links in entries:
        before, after = labelled[label]
        items.append(f'\n<li>{before}{output_href(path)}{query}" title="{path}">{escape_html(name) if name else name_of(path)}{after}')
        for link in links:
            items.append(f' · <a href="{escape_html(link)}" rel="nofollow noopener">{escape_html(link)}</a>')
        if path in diff_links:
            items.append(f' · <a class="diff" href="{escape_html(diff_links[path])}">diff</a>')
        items.append("</li>")
    return Markup("\n<ul>" + "".join(items) + "\n</ul>\n")


def streamed_page(template_name, **context):
    """Stream a large page in buffered chunks, so a 20,000-path tree is never one string in memory."""
    stream = current_app.jinja_env.get_template(template_name).stream(**context)
    stream.enable_buffering(8)  # the tree already arrives in large chunks
    return Response(stream_with_context(stream), mimetype="text/html")


def verdict_bar(counts, total):
    """Segments of the SVG share bar: [{label, x, width, colour}] in percent."""
    segments, x = [], 0.0
    for label in REPORT_LABELS:
        width = 100.0 * counts[label] / total if total else 0.0
        if width:
            segments.append({"label": label, "x": x, "width": width, "colour": VERDICT_COLOURS[label],
                             "count": counts[label]})
        x += width
    return segments


def tree_chunks(tree, components, verdicts, query="", rows_per_chunk=4000):
    """The dependency tree as chunks of <li>/<details> markup.

    Built here, not in a template, for the same reason as rendered_nodes: it has a
    row for every component and every repeated reference. Every piece is constant
    markup or a node from rendered_nodes, whose values html.escape has escaped.
    A flat loop, not recursion, because closures can be thousands of levels deep.
    """
    nodes, references = rendered_nodes(components, verdicts, query)
    pieces, depth_open, last = [], 0, len(tree) - 1
    for position, (depth, indices, expanded) in enumerate(tree):
        if depth_open > depth:
            pieces.append(CLOSE_NODE * (depth_open - depth))
            depth_open = depth
        if not expanded:
            pieces.append(f'<li class="shown-above">{", ".join(map(references.__getitem__, indices))} <i>(shown above)</i></li>\n')
        elif position < last and tree[position + 1][0] > depth:
            depth_open = depth + 1
            pieces.append(f"<li><details><summary>{nodes[indices]}</summary><ul>\n")
        else:
            pieces.append(f"<li>{nodes[indices]}</li>\n")
        if len(pieces) >= rows_per_chunk:
            yield Markup("".join(pieces))
            pieces = []
    pieces.append(CLOSE_NODE * depth_open)
    yield Markup("".join(pieces))


def rendered_nodes(components, verdicts, query=""):
    """([each component's node markup], [each component's short in-page reference markup]).

    Not a Jinja macro: a closure has one node per component, 20,000 in a large
    build closure, and Jinja's escaping costs 15 µs a node against 1 µs here.
    Names and the query go through html.escape; the markup around them is constant. Store paths
    need no escaping: every path of a report was checked against Nix's store path syntax on upload,
    and after /nix/store/ that allows only [A-Za-z0-9+._?=-].
    """
    nodes, references, query = [], [], escape_html(query)
    # Each badge's markup after its id, made once per label rather than once per node.
    after_id = {label: badge_markup(label, "n").removeprefix('<span id="n') + " " for label in REPORT_LABELS}
    after_id[""] = '"></span>'
    for index, component in enumerate(components):
        outputs = component["outputs"]
        path = outputs[0] if outputs else None
        name = escape_html(component["name"]) if component["name"] else name_of(path) if path else ""
        badge = f'<span id="n{index}{after_id[verdicts.get(path, "")]}'
        links = "".join([f' <a href="{output_href(other)}{query}">{name_of(other)}</a>' for other in outputs[1:]])
        node = f'{badge}<a href="{output_href(path)}{query}">{name}</a>{links}' if path else f"{badge}{name}"
        nodes.append(node)
        references.append(f'<a href="#n{index}">{name}</a>')
    return nodes, references


def badge_parts(report_name, numbers):
    """What templates/badge.svg draws: shields.io's layout, widths from a rough 7 px per character."""
    percent = numbers["percent"]
    value = "no paths" if percent is None else f"{percent:.2f}%"
    colour = (VERDICT_COLOURS[NO_BUILDS] if percent is None else VERDICT_COLOURS[REPRODUCED] if percent >= 99
              else VERDICT_COLOURS[PARTIALLY] if percent >= 90 else VERDICT_COLOURS[NONDETERMINISTIC])
    label = "reproduced"
    return {"label": label, "value": value, "colour": colour, "label_width": 10 + 7 * len(label),
            "value_width": 10 + 7 * len(value), "title": f"{report_name}: {headline_sentence(numbers)}"}


def policy_query(policy):
    """'?trust=…' that carries the policy on links, or '' for the server's default."""
    args = policy.query_args()
    return "?" + urlencode(args, safe=",") if args else ""


def verdict_badge(label, element_id=None):
    """A verdict's badge: a coloured letter whose accessible name and tooltip are the verdict itself."""
    return Markup(badge_markup(label, element_id))


def badge_markup(label, element_id=None):
    """verdict_badge as a plain string, for markup built in Python (a Markup per node costs more than the node)."""
    css_class, letter = VERDICT_BADGES[label]
    id_attribute = f' id="{element_id}"' if element_id else ""
    return (f'<span{id_attribute} class="badge badge-{css_class}" role="img" aria-label="{label}"'
            f' title="{label}">{letter}</span>')


def output_href(out_path):
    """The /outputs/ link of a store path."""
    return "/outputs/" + url_segment(basename_of(out_path))


def url_segment(basename):
    """A store basename in a URL path: '?' is the only character Nix allows in names that needs quoting there."""
    return basename.replace("?", "%3F")


# ---------------------------------------------------------------- memory

@functools.cache
def glibc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_malloc_arenas():
    """Keep the server's size flat across large reports.

    glibc gives each server thread its own malloc arena, each keeping the memory of
    the largest report it handled; and after the first large buffer is freed it
    raises its mmap threshold, so later SBOM-sized buffers come from (and stay in)
    the heap. Two arenas and a fixed threshold stop both.
    """
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, 2)
        libc.mallopt(M_MMAP_THRESHOLD, 256 * 1024)


def release_freed_memory(response):
    """Give the memory of a large report request or attestation batch back to the system, not to malloc's free lists.

    A batch's page cache (cache_for) is freed in the request thread's malloc arena, where the next batch,
    in another thread, may not reuse it: without this, every arena kept the cache of the largest batch it served.
    """
    large = request.path.startswith("/reports/") and request.method in ("GET", "PUT") or g.get("large_batch", False)
    if large:
        response.call_on_close(trim_malloc)
    return response


def trim_malloc():
    libc = glibc()
    if libc is not None:
        libc.malloc_trim(0)


# ---------------------------------------------------------------- start-up
# What stops the server or create_user from starting is one line naming the path or
# port and exit status 1, not a traceback.

def app_or_exit(config, program="web.py"):
    path = config["DATABASE"]
    problem = database_file_problem(path)
    if problem is None:
        try:
            return create_app(config)
        except sqlite3.Error as error:
            problem = f"cannot use database {path}: {error}"
        except RuntimeError as error:  # init_db's unknown schema version, which names the path
            problem = str(error)
    sys.exit(f"{program}: {problem}")


def database_file_problem(path):
    """What about the file or its directory keeps SQLite from using path, or None.

    Checked before SQLite, whose own message ("unable to open database file") names neither.
    """
    path = Path(path)
    directory = path.parent
    if path.is_dir():
        return f"database {path} is a directory; --db takes a file, e.g. {path / 'hashes.db'}"
    if not directory.is_dir():
        return f"cannot create database {path}: directory {directory} does not exist"
    if path.exists():
        # Only readable: a database that cannot be written still serves reads (writes get 503).
        if not os.access(path, os.R_OK):
            return f"cannot read database {path} ({running_as()}; the file's owner is uid {path.stat().st_uid})"
        return None
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"cannot create database {path}: directory {directory} is not writable ({running_as()})"
    return None


# Waitress reads a request 8 KiB at a time by default: a report upload of tens of MiB took thousands of
# reads, each taking the interpreter from the threads that serve requests, before the upload's request began.
RECV_BYTES = 256 * 1024


def bound_server_or_exit(app, host, port, **options):
    """A waitress server already listening: 'serving on' is only printed once the port is ours."""
    from waitress import create_server
    try:
        return create_server(app, host=host, port=port, recv_bytes=RECV_BYTES, **options)
    except OSError as error:
        sys.exit(f"web.py: cannot listen on {host}:{port}: {error.strerror or error}")


def main(argv=None):
    args = parse_arguments(argv)
    app = app_or_exit({"DATABASE": args.db, "REQUIRE_SIGNATURES": args.require_signatures,
                       "LOG_KEY_FILE": args.log_key or default_log_key_file(args.db), "LOG_ORIGIN": args.log_origin,
                       "CHECKPOINT_INTERVAL": args.checkpoint_interval, "RENDER_WORKER": True, "TREE_WORKER": True,
                       "BACKGROUND_CHECKPOINTS": True,
                       **{key: getattr(args, key.lower()) for key in SERVER_LIMITS}})
    check_file_descriptors(args.connection_limit)
    with app.app_context():
        # No upload is under way in a server that is just starting: whatever is unpublished was abandoned.
        remove_abandoned_reports(get_db())
        app.extensions["pending_revisions"].add(*pending_revision_ids(get_db()))  # left by a process that died
        print(f"transparency log key {app.config['LOG_KEY_FILE']}; give builders its verifier key:"
              f" {log_verifier_key()}", flush=True)
    limit_malloc_arenas()
    server = bound_server_or_exit(app, args.host, args.port, threads=args.threads,
                                  max_request_body_size=app.config["MAX_REPORT_BYTES"] + MiB,
                                  connection_limit=args.connection_limit, channel_timeout=args.channel_timeout)
    app.extensions["report_views"].start_worker()
    app.extensions["tree_worker"].start()
    threading.Thread(target=wal_checkpointer, args=(args.db,), daemon=True, name="WAL checkpoints").start()
    # A thread that wants the interpreter waits up to this long for a CPU-bound one (a batch, a suggestion)
    # to let go: an attestation needs it dozens of times, around each SQLite call.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    print(f"serving on http://{args.host}:{args.port} with database {args.db}", flush=True)
    server.run()


def parse_arguments(argv):
    parser = argparse.ArgumentParser(description="Serve the nix-hash-collection with waitress.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--db", default=database_from_env(),
                        help="SQLite database file (default: $HASH_COLLECTION_DB or ./hashes.db)")
    parser.add_argument("--require-signatures", action="store_true",
                        default=signatures_required_by_env(),
                        help="count only attestations whose signature was verified")
    parser.add_argument("--threads", type=int, default=16,
                        help="request threads; a view being rendered holds one without using the CPU (default: %(default)s)")
    parser.add_argument("--log-key", default=log_key_from_env(),
                        help="the transparency log's signer key, created if missing"
                             " (default: $HASH_COLLECTION_LOG_KEY_FILE or DB.log-key)")
    parser.add_argument("--log-origin", default=log_origin_from_env(),
                        help="the log's origin line (default: $HASH_COLLECTION_LOG_ORIGIN, else the name of the log's"
                             " key, which is this host's name when the key is made)")
    parser.add_argument("--checkpoint-interval", type=float, default=DEFAULT_CHECKPOINT_INTERVAL,
                        help="seconds between checkpoints while entries arrive, the maximum merge delay"
                             " (default: %(default)s)")
    limits = limits_from_env()
    for key, what in (("MAX_REPORT_PATHS", "components and store paths per report; more is refused with 413"),
                      ("MAX_REPORT_EDGES", "distinct dependency edges per report; more is refused with 413"),
                      ("MAX_REPORT_UPLOADS", "report uploads processed at once; the next gets 503 and Retry-After"),
                      ("CONNECTION_LIMIT", "open connections, idle ones included, before waitress stops accepting"),
                      ("CHANNEL_TIMEOUT", "seconds before a connection that sends nothing is closed")):
        parser.add_argument("--" + key.lower().replace("_", "-"), type=positive_whole_number, default=limits[key],
                            help=f"{what} (default: ${SERVER_LIMITS[key][0]} or {SERVER_LIMITS[key][1]})")
    return parser.parse_args(argv)


FILE_DESCRIPTORS_BESIDES_CONNECTIONS = 64  # database, WAL, logs, waitress's own sockets and request bodies


def check_file_descriptors(connection_limit):
    """Raise the open-file limit to what the connection limit needs, or refuse to start:
    out of descriptors, waitress would fail on accept and sqlite on open, for everyone."""
    needed = connection_limit + FILE_DESCRIPTORS_BESIDES_CONNECTIONS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise SystemExit(f"--connection-limit {connection_limit} needs {needed} open files, but the hard limit is"
                             f" {hard}: lower --connection-limit or raise the limit (LimitNOFILE= in systemd, ulimit -n)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


if __name__ == "__main__":
    main()
