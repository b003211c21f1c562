#!/usr/bin/env python3
"""nix-hash-collection server: collects build attestations from builders and
shows, for every store path of a report, whether independent builders agree."""
import argparse
import base64
import gc
import contextlib
import ctypes
import functools
import hashlib
from html import escape as escape_html
import itertools
import json
import os
import random
import re
import sqlite3
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone
from pathlib import Path

from flask import Blueprint, Flask, Response, abort, current_app, g, jsonify, render_template, request, stream_with_context
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

import re2
from post_build_hook import (DIGEST_RE, KEY_NAME_RE, STORE_DIR, drv_ident_of, fingerprint, is_signature, is_store_path,
                             normalize_nar_hash, parse_key, parse_store_basename, parse_store_path, running_as,
                             shorten, verify_signature)

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

NO_BUILDS = "No builds"
ONE_BUILD = "One build"
REPRODUCED = "Successfully reproduced"
PARTIALLY = "Partially reproduced"
NONDETERMINISTIC = "Consistently nondeterministic"
VERDICTS = [REPRODUCED, PARTIALLY, NONDETERMINISTIC, ONE_BUILD, NO_BUILDS]
VERDICT_COLOURS = {REPRODUCED: "#2e9d3a", PARTIALLY: "#e0a000", NONDETERMINISTIC: "#d3302f",
                   ONE_BUILD: "#8fa3b8", NO_BUILDS: "#d9d9d9"}
# Each verdict's badge: a CSS class and one ASCII character. Not emoji, which a machine
# without an emoji font shows as empty boxes; the label itself is the badge's accessible name.
VERDICT_BADGES = {REPRODUCED: ("reproduced", "R"), PARTIALLY: ("partial", "P"), NONDETERMINISTIC: ("nondeterministic", "N"),
                  ONE_BUILD: ("one-build", "1"), NO_BUILDS: ("no-builds", "0")}

M_ARENA_MAX, M_MMAP_THRESHOLD = -8, -3  # from glibc's malloc.h
MAX_BATCH = 10_000
LARGE_BATCH = 1_000
LARGE_BATCH_CACHE_KIB = 32 * 1024
MAX_SUGGEST = 500
DEFAULT_SUGGEST = 50
# An attestation's optional "source": a build, a `--check` rebuild (the diff hook), an import from a binary cache.
ATTESTATION_SOURCES = ("build", "check", "cache")
REPORT_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
MAX_LINK_PATTERNS = 100  # per builder
MAX_PATTERN_LENGTH = 200
LINK_PATTERN_MEMORY = 1 * MiB  # RE2's bound on one compiled pattern and its match cache
LINK_MATCHING_BUDGET_S = 0.2

CYCLONEDX_TYPE = "application/vnd.cyclonedx+json"
# What sqlite says when the database cannot be written for now; anything else is a bug.
UNAVAILABLE_SYMPTOMS = ("locked", "readonly", "read-only", "disk", "full", "I/O", "unable to open", "busy")
CLOSE_NODE = "</ul></details></li>\n"


def database_from_env():
    return os.environ.get("HASH_COLLECTION_DB", "hashes.db")


def signatures_required_by_env():
    return os.environ.get("HASH_COLLECTION_REQUIRE_SIGNATURES", "") not in ("", "0")


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(
        DATABASE=database_from_env(),
        REQUIRE_SIGNATURES=signatures_required_by_env(),
        MAX_ATTESTATION_BYTES=16 * MiB,
        MAX_REPORT_BYTES=64 * MiB,
        JSON_SORT_KEYS=False,
    )
    app.config.update(config or {})
    app.json.sort_keys = False
    app.json.compact = True
    app.teardown_appcontext(close_db)
    app.after_request(release_freed_memory)
    app.jinja_env.filters["output_href"] = output_href
    app.jinja_env.filters["badge"] = verdict_badge
    app.jinja_env.globals["badge_colours"] = [(VERDICT_BADGES[label][0], VERDICT_COLOURS[label]) for label in VERDICTS]
    app.register_blueprint(routes)
    with app.app_context():
        init_db()
    return app


# ---------------------------------------------------------------- database

def connect(path):
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
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
        by_path[path] = connect(path)
    g.db = by_path[path]
    return g.db


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


class transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any error, so a write is all or nothing."""

    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        if not self.conn.in_transaction:
            self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if not self.conn.in_transaction:
            return False
        if exc_type is None:
            self.conn.execute("COMMIT")
        else:
            self.conn.execute("ROLLBACK")
        return False


@contextlib.contextmanager
def cache_for(conn, row_count):
    """A large page cache for the length of a large insert only.

    Large inserts into several indexes thrash SQLite's default 2 MiB cache;
    keeping a large cache on every thread's connection would cost more memory than it saves.
    """
    if row_count < LARGE_BATCH:
        yield
        return
    conn.execute(f"PRAGMA cache_size = -{LARGE_BATCH_CACHE_KIB}")
    try:
        yield
    finally:
        conn.execute("PRAGMA cache_size = -2000")


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


def now_iso():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def migrate_attestation_source(conn):
    """Attestations say where their hash came from; those made before have no source (NULL, shown as unknown)."""
    conn.execute("ALTER TABLE attestations ADD COLUMN source TEXT CHECK (source IN ('build', 'check', 'cache'))")


# (version, function) pairs: the function brings a database from the version before to this one.
# Append, never edit; the last version is the schema this code speaks.
MIGRATIONS = [(2, migrate_to_2), (3, migrate_attestation_source)]
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
    """({key name: public key} of this builder, names of keys registered to other builders)."""
    own, foreign_names = {}, set()
    for owner, key_name, public_key in conn.execute("SELECT builder_id, key_name, public_key FROM public_keys"):
        if owner == builder_id:
            own[key_name] = public_key
        else:
            foreign_names.add(key_name)
    return own, foreign_names


# ---------------------------------------------------------------- request bodies

class BadInput(ValueError):
    """A client error; the message names the field and what was expected."""


def body_text(limit_key, expected):
    """The request body as text; JSON on the wire is UTF-8 (RFC 8259)."""
    request.max_content_length = current_app.config[limit_key]
    raw = request.get_data(cache=False)
    if not raw:
        raise BadInput(f"empty body: expected {expected}")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"body is not JSON: not UTF-8 at byte {error.start}") from None


def parsed_json(text):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise BadInput(f"body is not JSON: {shorten(str(error), 120)}") from None


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
    if output_sig:
        checked(f"{where}.output_sig", lambda sig: parse_key(sig, 64), output_sig)
    nar_size = field(item, "nar_size", where, kind=int, required=False)
    if nar_size is not None and not 0 < nar_size < 1 << 62:
        raise BadInput(f"{where}.nar_size: expected a positive size in bytes, got {nar_size}")
    references = field(item, "references", where, kind=list, required=False)
    if references is not None:
        for position, reference in enumerate(references):
            checked(f"{where}.references[{position}]", parse_store_path, reference)
        references = sorted(set(references))
    return {"drv_ident": drv_ident, "output_path": output_path, "output_hash": output_hash,
            "output_sig": output_sig, "nar_size": nar_size, "references": references,
            "source": attestation_source(item, where)}


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
    return f"{STORE_DIR}/{basename}"


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
    if not verify_signature(public_keys[key_name], message, signature):
        raise BadInput(f"{where}.output_sig: the signature by key {key_name!r} does not verify over "
                       f"the fingerprint of {attestation['output_path']}")
    return True


def store_attestations(conn, builder, attestations):
    public_keys, foreign_key_names = registered_keys(conn, builder["id"])
    created_at = now_iso()
    rows = []
    for position, attestation in enumerate(attestations):
        verified = verify_attestation(attestation, public_keys, foreign_key_names, f"[{position}]")
        references = None if attestation["references"] is None else json.dumps(attestation["references"])
        rows.append((builder["id"], attestation["drv_ident"], attestation["output_path"], attestation["output_hash"],
                     attestation["output_sig"], attestation["nar_size"], references, int(verified), created_at,
                     attestation["source"]))
    rows.sort(key=lambda row: row[2])  # index-friendly order; a batch's order means nothing
    with transaction(conn), cache_for(conn, len(rows)):
        conn.executemany("INSERT OR IGNORE INTO derivations (drv_ident) VALUES (?)",
                         sorted({(row[1],) for row in rows if row[1] is not None}))
        conn.executemany(
            "INSERT INTO attestations (builder_id, derivation_id, output_path, output_hash, output_sig,"
            " nar_size, refs, verified, created_at, source)"
            " VALUES (?, (SELECT id FROM derivations WHERE drv_ident = ?), ?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (output_path, builder_id, output_hash) DO UPDATE SET"
            " output_sig = excluded.output_sig, nar_size = excluded.nar_size, refs = excluded.refs, verified = 1"
            " WHERE excluded.verified = 1 AND attestations.verified = 0", rows)
    return len(rows)


ATTESTATION_COLUMNS = (
    "SELECT builders.name AS builder, derivations.drv_ident, attestations.output_path, attestations.output_hash,"
    " attestations.output_sig, attestations.nar_size, attestations.refs, attestations.verified, attestations.created_at,"
    " attestations.source"
    " FROM attestations JOIN builders ON builders.id = attestations.builder_id"
    " LEFT JOIN derivations ON derivations.id = attestations.derivation_id ")


def attestation_object(row):
    return {
        "builder": row["builder"],
        "drv_path": f"{STORE_DIR}/{row['drv_ident']}.drv" if row["drv_ident"] else None,
        "output_path": row["output_path"],
        "output_hash": row["output_hash"],
        "output_sig": row["output_sig"],
        "nar_size": row["nar_size"],
        "references": json.loads(row["refs"]) if row["refs"] is not None else None,
        "created_at": row["created_at"],
        "verified": bool(row["verified"]),
        "source": row["source"],
    }


def attestations_of_output(conn, output_path):
    rows = conn.execute(ATTESTATION_COLUMNS + "WHERE attestations.output_path = ? ORDER BY attestations.id",
                        (output_path,))
    return [attestation_object(row) for row in rows]


def output_path_of_basename(basename):
    checked("path", parse_store_basename, basename)
    return f"{STORE_DIR}/{basename}"


# ---------------------------------------------------------------- verdicts

def verdict(builders_by_hash):
    """The verdict for one output path, from {hash: set of builder ids}.

    It counts builders, not rows: one builder posting twice is one build, and
    one builder with two hashes is evidence of nondeterminism, never of reproduction.
    """
    if not builders_by_hash:
        return NO_BUILDS
    if len(builders_by_hash) == 1:
        (builders,) = builders_by_hash.values()
        return REPRODUCED if len(builders) >= 2 else ONE_BUILD
    if any(len(builders) >= 2 for builders in builders_by_hash.values()):
        return PARTIALLY
    return NONDETERMINISTIC


def counted_attestations_clause():
    """The SQL side of is_counted, to append to a join condition on attestations."""
    return " AND attestations.verified = 1" if current_app.config["REQUIRE_SIGNATURES"] else ""


def is_counted(attestation):
    """Whether an attestation counts towards verdicts: in verified-only mode, only verified ones do."""
    return attestation["verified"] or not current_app.config["REQUIRE_SIGNATURES"]


def report_verdicts(conn, report_id):
    """{out_path: verdict} for every path of a report, from one query."""
    builders_by_path = {}
    rows = conn.execute(
        "SELECT report_paths.out_path, attestations.output_hash, attestations.builder_id FROM report_paths"
        " LEFT JOIN attestations ON attestations.output_path = report_paths.out_path" + counted_attestations_clause() +
        " WHERE report_paths.report_id = ?", (report_id,))
    for out_path, output_hash, builder_id in rows:
        builders_by_hash = builders_by_path.setdefault(out_path, {})
        if output_hash is not None:
            builders_by_hash.setdefault(output_hash, set()).add(builder_id)
    return {path: verdict(builders_by_hash) for path, builders_by_hash in builders_by_path.items()}


def verdict_counts(verdicts):
    counts = Counter(verdicts.values())
    return {label: counts.get(label, 0) for label in VERDICTS}


# ---------------------------------------------------------------- SBOM parsing

def parse_sbom(sbom):
    """Map a CycloneDX SBOM of any producer's shape to components and a display tree.

    Returns (root, components, tree): components are dicts with name, drv_path
    and outputs [(out_path, output)]; tree holds the rows of display_tree.
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
    index_of_ref, components = {}, []
    for raw in [root_component, *raw_components]:
        if not isinstance(raw, dict) or not isinstance(raw.get("bom-ref"), str):
            continue
        if raw["bom-ref"] in index_of_ref:
            continue
        index_of_ref[raw["bom-ref"]] = len(components)
        components.append(component_of(raw))
    if not any(component["outputs"] for component in components):
        raise BadInput("SBOM yields no store path: no component has a /nix/store output path")
    children = dependency_children(sbom.get("dependencies"), index_of_ref)
    tree = display_tree(len(components), children)
    root = components[0]["outputs"][0][0] if components[0]["outputs"] else root_component["bom-ref"]
    return root, components, tree


def properties_of(raw):
    """{name: [values]} of a component's string properties; a name may repeat (sbomnix)."""
    properties = {}
    listed = raw.get("properties")
    for prop in listed if isinstance(listed, list) else ():
        if isinstance(prop, dict):
            name, value = prop.get("name"), prop.get("value")
            if isinstance(name, str) and isinstance(value, str):
                properties.setdefault(name, []).append(value)
    return properties


def component_of(raw):
    ref = raw["bom-ref"]
    properties = properties_of(raw)
    drv_path = properties.get("nix:drv_path", [None])[0]
    if drv_path is None and ref.endswith(".drv"):
        drv_path = ref if ref.startswith(STORE_DIR + "/") else f"{STORE_DIR}/{ref}"
    if drv_path is not None and not is_store_path(drv_path):
        drv_path = None
    candidates = properties.get("nix:out_path", []) + properties.get("nix:output_path", [])
    if not candidates and not ref.endswith(".drv"):
        candidates = [ref if ref.startswith("/") else f"{STORE_DIR}/{ref}"]
    out_paths = list(dict.fromkeys(path for path in candidates if is_store_path(path)))
    output_names = properties.get("nix:output", [])
    outputs = [(path, output_names[0] if len(out_paths) == 1 and output_names else output_name(path, drv_path))
               for path in out_paths]
    name = raw.get("name") if isinstance(raw.get("name"), str) else None
    return {"name": name, "drv_path": drv_path, "outputs": outputs}


def output_name(out_path, drv_path):
    """'out', 'dev', ... from how Nix names outputs: <drv name> or <drv name>-<output>."""
    if drv_path is None:
        return None
    drv_name = parse_store_path(drv_path)[1].removesuffix(".drv")
    out_name = parse_store_path(out_path)[1]
    if out_name == drv_name:
        return "out"
    if out_name.startswith(drv_name + "-"):
        return out_name[len(drv_name) + 1:]
    return None


def dependency_children(dependencies, index_of_ref):
    """{component index: [child indices]}; refs that match no component are dropped."""
    children = {}
    index_of = index_of_ref.get
    for dependency in dependencies if isinstance(dependencies, list) else ():
        if not isinstance(dependency, dict) or type(dependency.get("ref")) is not str:
            continue
        parent = index_of(dependency["ref"])
        depends_on = dependency.get("dependsOn")
        if parent is None or not isinstance(depends_on, list):
            continue
        # type() rather than isinstance: a ref that is a list or dict cannot be a dict key.
        kids = [child for ref in depends_on
                if type(ref) is str and (child := index_of(ref)) is not None and child != parent]
        children.setdefault(parent, []).extend(kids)
    return children


def display_tree(count, children):
    """Depth-first rows: [depth, index, 1] for a component shown with its subtree, and
    [depth, [indices], 0] for children already shown (or cycles), listed as references.

    Each component is expanded once, so the tree stays linear in the SBOM's size.
    Components that the root does not reach follow it at depth 0.
    """
    expanded, rows = set(), []
    for top in range(count):
        if top in expanded:
            continue
        stack = [(top, 0)]
        while stack:
            index, depth = stack.pop()
            if index in expanded:
                rows.append([depth, [index], 0])
                continue
            expanded.add(index)
            rows.append([depth, index, 1])
            kids = children.get(index)
            if not kids:
                continue
            shown = [child for child in kids if child in expanded]
            if shown:
                rows.append([depth + 1, shown, 0])
            below = depth + 1
            stack.extend([(child, below) for child in reversed(kids) if child not in expanded])
    return rows


# ---------------------------------------------------------------- reports

def find_report(conn, name):
    report = conn.execute("SELECT id, name, owner_id, root, created_at FROM reports WHERE name = ?", (name,)).fetchone()
    if report is None:
        abort(404, f"no report named {shorten(name)!r}")
    return report


def check_report_name(name):
    if not REPORT_NAME_RE.fullmatch(name):
        raise BadInput(f"report name: expected 1 to 128 characters of [A-Za-z0-9._-], not starting with '.', got {shorten(name)!r}")


def replace_report(conn, name, owner, raw_sbom, root, components, tree):
    paths = sorted((out_path, index, output) for index, component in enumerate(components)
                   for out_path, output in component["outputs"])
    with transaction(conn):
        existing = conn.execute("SELECT id, owner_id FROM reports WHERE name = ?", (name,)).fetchone()
        if existing is not None:
            check_may_change_report(existing, owner)
            conn.execute("DELETE FROM reports WHERE id = ?", (existing["id"],))
        report_id = conn.execute(
            "INSERT INTO reports (name, owner_id, root, sbom, tree, created_at) VALUES (?, ?, ?, zeroblob(?), ?, ?)",
            (name, owner["id"], root, len(raw_sbom), json.dumps(tree, separators=(",", ":")), now_iso())).lastrowid
        # Written in place: binding the SBOM as a parameter would make SQLite copy all of it first.
        with conn.blobopen("reports", "sbom", report_id) as blob:
            blob.write(raw_sbom)
        conn.executemany("INSERT INTO report_components (report_id, idx, name, drv_path) VALUES (?, ?, ?, ?)",
                         ((report_id, index, component["name"], component["drv_path"])
                          for index, component in enumerate(components)))
        conn.executemany("INSERT OR IGNORE INTO report_paths (report_id, out_path, component_idx, output) VALUES (?, ?, ?, ?)",
                         ((report_id, out_path, index, output) for out_path, index, output in paths))
    return report_id


def check_may_change_report(report, builder):
    if report["owner_id"] is not None and report["owner_id"] != builder["id"] and not builder["is_admin"]:
        abort(403, "only the builder that defined this report, or an admin, may change it")


def report_components(conn, report_id):
    """[{name, drv_path, outputs: [out_path]}] by component index."""
    components = [{"name": row["name"], "drv_path": row["drv_path"], "outputs": []} for row in conn.execute(
        "SELECT name, drv_path FROM report_components WHERE report_id = ? ORDER BY idx", (report_id,))]
    for out_path, index in conn.execute(
            "SELECT out_path, component_idx FROM report_paths WHERE report_id = ? ORDER BY component_idx, out_path", (report_id,)):
        components[index]["outputs"].append(out_path)
    return components


def report_tree(conn, report_id):
    return json.loads(conn.execute("SELECT tree FROM reports WHERE id = ?", (report_id,)).fetchone()[0])


def text_tree_lines(tree, components, verdicts):
    for depth, indices, expanded in tree:
        indent = "  " * depth
        for index in [indices] if expanded else indices:
            component = components[index]
            for path in component["outputs"] or [component["name"] or "(component without store path)"]:
                suffix = verdicts.get(path, "") if expanded else "(shown above)"
                yield f"{indent}{path} {suffix}\n"


def batched(lines, size=2000):
    """Join lines into larger chunks: the server writes each chunk separately."""
    lines = iter(lines)
    while chunk := "".join(itertools.islice(lines, size)):
        yield chunk


def open_questions(conn, report_id, builder, after=None, limit=None):
    """Report paths that still need builds: not settled, and not attested by the caller.

    Returns rows (out_path, builders), ordered by out_path.
    """
    caller = builder["id"] if builder is not None else -1
    sql = ("SELECT report_paths.out_path, COUNT(DISTINCT attestations.builder_id) AS builders,"
           " COALESCE(MAX(attestations.builder_id = ?), 0) AS mine FROM report_paths"
           " LEFT JOIN attestations ON attestations.output_path = report_paths.out_path" + counted_attestations_clause() +
           " WHERE report_paths.report_id = ?" + (" AND report_paths.out_path > ?" if after else "") +
           " GROUP BY report_paths.out_path HAVING builders < 2 AND mine = 0 ORDER BY report_paths.out_path")
    parameters = [caller, report_id] + ([after] if after else [])
    if limit is not None:
        sql += " LIMIT ?"
        parameters.append(limit)
    return [(out_path, builders) for out_path, builders, _mine in conn.execute(sql, parameters)]


def suggestions(conn, report_id, builder, limit):
    """Paths with one build first (a second builder settles them), then the unbuilt; random within each."""
    rows = open_questions(conn, report_id, builder)
    one_build = [out_path for out_path, builders in rows if builders == 1]
    no_build = [out_path for out_path, builders in rows if builders == 0]
    random.shuffle(one_build)
    random.shuffle(no_build)
    return (one_build + no_build)[:limit]


def suggestion_objects(conn, report_id, out_paths):
    """{out_path, drv_path?, output?} for each path, as the SBOM gave them."""
    known = {}
    for start in range(0, len(out_paths), 500):
        chunk = out_paths[start:start + 500]
        known.update((row[0], row) for row in conn.execute(
            "SELECT report_paths.out_path, report_components.drv_path, report_paths.output FROM report_paths"
            " JOIN report_components ON report_components.report_id = report_paths.report_id"
            " AND report_components.idx = report_paths.component_idx"
            f" WHERE report_paths.report_id = ? AND report_paths.out_path IN ({','.join('?' * len(chunk))})",
            [report_id, *chunk]))
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
        name = out_path[len(STORE_DIR) + 34:]
        return [link for pattern, link in patterns if pattern.search(name)]

    return links_of


def link_pattern_row(conn, pattern):
    return conn.execute("SELECT id, owner_id FROM link_patterns WHERE pattern = ?", (pattern,)).fetchone()


def find_link_pattern(conn, pattern):
    row = link_pattern_row(conn, pattern)
    if row is None:
        abort(404, f"no link pattern {shorten(pattern)!r}")
    return row


def check_may_change_link_pattern(row, builder):
    """Only the builder who made a pattern, or an admin, may change it; nobody owns one made before version 2."""
    if row["owner_id"] != builder["id"] and not builder["is_admin"]:
        abort(403, "only the builder that made this link pattern, or an admin, may change it")


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
        "References: " + " ".join(path[len(STORE_DIR) + 1:] for path in attestation["references"] or []),
    ]
    if attestation["drv_path"]:
        lines.append(f"Deriver: {attestation['drv_path'][len(STORE_DIR) + 1:]}")
    # is_signature: a signature stored before version 2 may hold a line break.
    if is_signature(attestation["output_sig"]):
        lines.append(f"Sig: {attestation['output_sig']}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- content negotiation

def wants_html():
    """HTML only when the client prefers it to JSON, as browsers do; curl's */* gets JSON."""
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


def report_format():
    """The first of these that the client names explicitly; anything else gets the text tree."""
    named = set(request.accept_mimetypes.values())
    return next((mimetype for mimetype in (CYCLONEDX_TYPE, "application/json", "text/html") if mimetype in named),
                "text/plain")


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
#   GET    /reports/<name>/suggested                  suggested
#   GET    /reports/<name>/suggest                    suggest
#   GET    /reports/<name>/pending                    pending
#   GET    /link_patterns                             list_link_patterns
#   POST   /link_patterns                             post_link_pattern
#   DELETE /link_patterns?pattern=                    delete_link_pattern
#
# Errors: BadInput is 400, HTTPException keeps its status, a database that cannot be written for now is 503;
# every error body is JSON {"error": "...", "detail": "..."}.

routes = Blueprint("routes", __name__)


@routes.app_errorhandler(BadInput)
def bad_input(error):
    return error_body(str(error)), 400


@routes.app_errorhandler(HTTPException)
def http_error(error):
    message = error.description if error.code != 413 else "request body too large"
    return error_body(message), error.code


@routes.app_errorhandler(sqlite3.OperationalError)
def database_unavailable(error):
    if not any(symptom in str(error) for symptom in UNAVAILABLE_SYMPTOMS):
        raise error
    # SQLite silently opens a file it cannot write read-only; reconnect once the fault is gone.
    forget_connection()
    current_app.logger.error("database unavailable: %s", error)
    return error_body(f"database unavailable, try again later: {error}"), 503


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
    drv_ident = checked("drv_ident", lambda ident: drv_ident_of(f"{STORE_DIR}/{ident}.drv"), drv_ident)
    attestations = parse_attestation_list(json_body("MAX_ATTESTATION_BYTES"), lambda _item, _where: drv_ident)
    return jsonify(accepted=store_attestations(get_db(), builder, attestations))


@routes.post("/attestations")
def post_attestations():
    builder = require_builder()
    with cyclic_gc_paused():
        attestations = parse_attestation_list(json_body("MAX_ATTESTATION_BYTES"), batch_drv_ident)
        return jsonify(accepted=store_attestations(get_db(), builder, attestations))


@routes.get("/attestations/by-output/<basename>")
def attestations_by_output(basename):
    return jsonify(attestations_of_output(get_db(), output_path_of_basename(basename)))


@routes.get("/derivations/")
def list_derivations():
    rows = get_db().execute("SELECT id, drv_ident FROM derivations ORDER BY id")
    return jsonify([{"id": row["id"], "drv_hash": row["drv_ident"]} for row in rows])


@routes.get("/derivations/<drv_ident>")
def show_derivation(drv_ident):
    conn = get_db()
    derivation = conn.execute("SELECT id FROM derivations WHERE drv_ident = ?", (drv_ident,)).fetchone()
    if derivation is None:
        abort(404, f"no attestations for derivation {shorten(drv_ident)!r}")
    if request.args.get("full", "").lower() == "true":
        rows = conn.execute(ATTESTATION_COLUMNS + "WHERE attestations.derivation_id = ? ORDER BY attestations.id",
                            (derivation["id"],))
        return jsonify([attestation_object(row) for row in rows])
    summary = defaultdict(dict)
    for row in conn.execute(
            "SELECT output_path, output_hash, COUNT(DISTINCT builder_id) AS builders FROM attestations"
            " WHERE derivation_id = ? GROUP BY output_path, output_hash ORDER BY output_path", (derivation["id"],)):
        summary[row["output_path"]][row["output_hash"]] = row["builders"]
    return jsonify(summary)


@routes.get("/outputs/<basename>")
def show_output(basename):
    output_path = output_path_of_basename(basename)
    attestations = attestations_of_output(get_db(), output_path)
    if not wants_html():
        return jsonify(attestations)
    builders_by_hash = defaultdict(set)
    for attestation in attestations:
        if is_counted(attestation):
            builders_by_hash[attestation["output_hash"]].add(attestation["builder"])
    return render_template("output.html", output_path=output_path, attestations=attestations,
                           builders_by_hash=builders_by_hash, verdict=verdict(builders_by_hash))


@routes.get("/builders")
def list_builders():
    conn = get_db()
    builders = [{"name": row["name"], "public_keys": [], "attestations": row["attestations"]} for row in conn.execute(
        "SELECT builders.id, builders.name, (SELECT COUNT(*) FROM attestations WHERE builder_id = builders.id)"
        " AS attestations FROM builders ORDER BY builders.name")]
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
    # '-' sorts just before '.', so this range is exactly the paths with that hash part.
    row = get_db().execute(
        ATTESTATION_COLUMNS + "WHERE attestations.builder_id = ? AND attestations.output_path > ?"
        " AND attestations.output_path < ? AND attestations.nar_size IS NOT NULL AND attestations.refs IS NOT NULL"
        " ORDER BY attestations.id DESC LIMIT 1",
        (builder["id"], f"{STORE_DIR}/{digest}-", f"{STORE_DIR}/{digest}.")).fetchone()
    if row is None:
        abort(404, f"{shorten(builder_name)} has no attestation with size and references for {digest}")
    return Response(narinfo_text(attestation_object(row)), mimetype="text/x-nix-narinfo")


@routes.get("/")
@routes.get("/reports")
def list_reports():
    conn = get_db()
    rows = conn.execute("SELECT id, name, root FROM reports ORDER BY name").fetchall()
    if request.path == "/reports" and not wants_html():
        return jsonify([row["name"] for row in rows])
    reports = []
    for row in rows:
        counts = verdict_counts(report_verdicts(conn, row["id"]))
        total = sum(counts.values())
        reports.append({"name": row["name"], "root": row["root"], "total": total,
                        "reproduced": counts[REPRODUCED], "share": counts[REPRODUCED] / total if total else 0})
    return render_template("reports.html", reports=reports)


@routes.put("/reports/<name>")
def put_report(name):
    builder = require_builder()
    check_report_name(name)
    # Only the text is kept while parsing, not the uploaded bytes too: UTF-8 text
    # encodes back to exactly those bytes, and a large SBOM's peak memory is lower.
    text = body_text("MAX_REPORT_BYTES", "a CycloneDX JSON SBOM")
    with cyclic_gc_paused():
        sbom = parsed_json(text)
        parsed = parse_sbom(sbom)
        del sbom  # the parsed SBOM is the largest object of the request; free it before writing
    raw_sbom = text.encode()
    del text
    try:
        replace_report(get_db(), name, builder, raw_sbom, *parsed)
    except UnicodeEncodeError:
        raise BadInput("SBOM: a string contains a lone UTF-16 surrogate escape, which is not text") from None
    return jsonify(report=name, status="defined")


@routes.delete("/reports/<name>")
def delete_report(name):
    builder = require_builder()
    conn = get_db()
    with transaction(conn):
        report = find_report(conn, name)
        check_may_change_report(report, builder)
        conn.execute("DELETE FROM reports WHERE id = ?", (report["id"],))
    return jsonify(report=name, status="deleted")


@routes.get("/reports/<name>")
def show_report(name):
    conn = get_db()
    report = find_report(conn, name)
    wanted = report_format()
    if wanted == CYCLONEDX_TYPE:
        sbom = conn.execute("SELECT sbom FROM reports WHERE id = ?", (report["id"],)).fetchone()[0]
        return Response(sbom, mimetype=CYCLONEDX_TYPE)
    with cyclic_gc_paused():
        verdicts = report_verdicts(conn, report["id"])
        if wanted == "application/json":
            return jsonify(name=report["name"], root=report["root"], counts=verdict_counts(verdicts), paths=verdicts)
        components = report_components(conn, report["id"])
        tree = report_tree(conn, report["id"])
    if wanted == "text/plain":
        return Response(batched(text_tree_lines(tree, components, verdicts)), mimetype="text/plain")
    return report_page(conn, report, components, tree, verdicts)


@routes.get("/reports/<name>/suggested")
def suggested(name):
    conn = get_db()
    builder = optional_builder()
    report = find_report(conn, name)
    return jsonify(suggestions(conn, report["id"], builder, suggestion_limit()))


@routes.get("/reports/<name>/suggest")
def suggest(name):
    conn = get_db()
    builder = optional_builder()
    report = find_report(conn, name)
    return jsonify(suggestion_objects(conn, report["id"], suggestions(conn, report["id"], builder, suggestion_limit())))


@routes.get("/reports/<name>/pending")
def pending(name):
    conn = get_db()
    builder = optional_builder()
    report = find_report(conn, name)
    after = request.args.get("after") or None
    limit = suggestion_limit() if "limit" in request.args else MAX_SUGGEST
    out_paths = [out_path for out_path, _builders in open_questions(conn, report["id"], builder, after, limit)]
    next_after = out_paths[-1] if len(out_paths) == limit else None
    return jsonify(paths=suggestion_objects(conn, report["id"], out_paths), next=next_after)


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
            check_may_change_link_pattern(existing, builder)
            conn.execute("UPDATE link_patterns SET link = ? WHERE id = ?", (link, existing["id"]))
    return jsonify(pattern=pattern, link=link)


@routes.delete("/link_patterns")
def delete_link_pattern():
    builder = require_builder()
    pattern = request.args.get("pattern", "")
    conn = get_db()
    with transaction(conn):
        existing = find_link_pattern(conn, pattern)
        check_may_change_link_pattern(existing, builder)
        conn.execute("DELETE FROM link_patterns WHERE id = ?", (existing["id"],))
    return jsonify(pattern=pattern, status="deleted")


# ---------------------------------------------------------------- HTML pages
# The report page is streamed and its tree markup is built here, not in templates/report.html:
# see rendered_nodes for why.

def report_page(conn, report, components, tree, verdicts):
    counts = verdict_counts(verdicts)
    total = sum(counts.values())
    names = {path: component["name"] for component in components for path in component["outputs"]}
    links_of = link_matcher(conn)
    listed = lambda labels: [(path, names.get(path), label, links_of(path))
                             for path, label in verdicts.items() if label in labels]
    return streamed_page("report.html", report=report, counts=counts, total=total, verdicts=verdicts,
        bar=verdict_bar(counts, total), colours=VERDICT_COLOURS,
        not_reproducible=listed({NONDETERMINISTIC, PARTIALLY}), unchecked=listed({NO_BUILDS, ONE_BUILD}),
        tree_chunks=tree_chunks(tree, components, verdicts), require_signatures=current_app.config["REQUIRE_SIGNATURES"])


def streamed_page(template_name, **context):
    """Stream a large page in buffered chunks, so a 20,000-path tree is never one string in memory."""
    stream = current_app.jinja_env.get_template(template_name).stream(**context)
    stream.enable_buffering(8)  # the tree already arrives in large chunks
    return Response(stream_with_context(stream), mimetype="text/html")


def verdict_bar(counts, total):
    """Segments of the SVG share bar: [{label, x, width, colour}] in percent."""
    segments, x = [], 0.0
    for label in VERDICTS:
        width = 100.0 * counts[label] / total if total else 0.0
        if width:
            segments.append({"label": label, "x": x, "width": width, "colour": VERDICT_COLOURS[label],
                             "count": counts[label]})
        x += width
    return segments


def tree_chunks(tree, components, verdicts, rows_per_chunk=4000):
    """The dependency tree as chunks of <li>/<details> markup.

    Built here, not in a template, for the same reason as rendered_nodes: it has a
    row for every component and every repeated reference. Every piece is constant
    markup or a node from rendered_nodes, whose values html.escape has escaped.
    A flat loop, not recursion, because closures can be thousands of levels deep.
    """
    nodes = rendered_nodes(components, verdicts)
    pieces, depth_open, last = [], 0, len(tree) - 1
    for position, (depth, indices, expanded) in enumerate(tree):
        if depth_open > depth:
            pieces.append(CLOSE_NODE * (depth_open - depth))
            depth_open = depth
        if not expanded:
            references = ", ".join([nodes[index][1] for index in indices])
            pieces.append(f'<li class="shown-above">{references} <i>(shown above)</i></li>\n')
        elif position < last and tree[position + 1][0] > depth:
            depth_open = depth + 1
            pieces.append(f"<li><details><summary>{nodes[indices][0]}</summary><ul>\n")
        else:
            pieces.append(f"<li>{nodes[indices][0]}</li>\n")
        if len(pieces) >= rows_per_chunk:
            yield Markup("".join(pieces))
            pieces = []
    pieces.append(CLOSE_NODE * depth_open)
    yield Markup("".join(pieces))


def rendered_nodes(components, verdicts):
    """Each component's (node markup, short in-page reference markup).

    Not a Jinja macro: a closure has one node per component, 20,000 in a large
    build closure, and Jinja's escaping costs 15 µs a node against 1 µs here.
    Every value goes through html.escape; the markup around it is constant.
    """
    nodes = []
    for index, component in enumerate(components):
        outputs = component["outputs"]
        path = outputs[0] if outputs else None
        name = escape_html(component["name"] or (path or "")[44:])
        label = verdicts.get(path, "")
        badge = verdict_badge(label, f"n{index}") + " " if label else f'<span id="n{index}"></span>'
        links = "".join(f' <a href="{escape_html(output_href(other))}">{escape_html(other[44:])}</a>' for other in outputs[1:])
        node = f'{badge}<a href="{escape_html(output_href(path))}">{name}</a>{links}' if path else f"{badge}{name}"
        nodes.append((node, f'<a href="#n{index}">{name}</a>'))
    return nodes


def verdict_badge(label, element_id=None):
    """A verdict's badge: a coloured letter whose accessible name and tooltip are the verdict itself."""
    css_class, letter = VERDICT_BADGES[label]
    id_attribute = f' id="{element_id}"' if element_id else ""
    return Markup(f'<span{id_attribute} class="badge badge-{css_class}" role="img" aria-label="{label}"'
                  f' title="{label}">{letter}</span>')


def output_href(out_path):
    """The /outputs/ link of a store path; '?' is the only character Nix allows in names that a URL path needs quoted."""
    return "/outputs/" + out_path[len(STORE_DIR) + 1:].replace("?", "%3F")


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
    """Give the memory of a large report request back to the system, not to malloc's free lists."""
    libc = glibc()
    if libc is not None and request.path.startswith("/reports/") and request.method in ("GET", "PUT"):
        response.call_on_close(lambda: libc.malloc_trim(0))
    return response


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


def bound_server_or_exit(app, host, port, **options):
    """A waitress server already listening: 'serving on' is only printed once the port is ours."""
    from waitress import create_server
    try:
        return create_server(app, host=host, port=port, **options)
    except OSError as error:
        sys.exit(f"web.py: cannot listen on {host}:{port}: {error.strerror or error}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Serve the nix-hash-collection with waitress.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--db", default=database_from_env(),
                        help="SQLite database file (default: $HASH_COLLECTION_DB or ./hashes.db)")
    parser.add_argument("--require-signatures", action="store_true",
                        default=signatures_required_by_env(),
                        help="count only attestations whose signature was verified")
    parser.add_argument("--threads", type=int, default=4, help="worker threads (default: %(default)s)")
    args = parser.parse_args(argv)
    app = app_or_exit({"DATABASE": args.db, "REQUIRE_SIGNATURES": args.require_signatures})
    limit_malloc_arenas()
    server = bound_server_or_exit(app, args.host, args.port, threads=args.threads,
                                  max_request_body_size=app.config["MAX_REPORT_BYTES"] + MiB)
    print(f"serving on http://{args.host}:{args.port} with database {args.db}", flush=True)
    server.run()


if __name__ == "__main__":
    main()
