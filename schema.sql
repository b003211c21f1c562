-- The whole schema at its current version (web.SCHEMA_VERSION, which web.py records
-- in PRAGMA user_version). web.py runs it on an empty database and runs MIGRATIONS on
-- older ones; never drop tables here. tests/test_migrations.py checks that a migrated
-- database has exactly this schema.

CREATE TABLE builders (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    is_admin INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- Only the SHA-256 of a token is stored, so a leaked database leaks no token.
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    token_sha256 TEXT NOT NULL UNIQUE,
    revoked INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);
CREATE INDEX tokens_by_builder ON tokens(builder_id);

-- public_key is NAME:BASE64 in its one canonical spelling; key_bytes are its 32 bytes,
-- registered to at most one builder (see web.register_public_key).
CREATE TABLE public_keys (
    id INTEGER PRIMARY KEY,
    builder_id INTEGER NOT NULL REFERENCES builders(id),
    key_name TEXT NOT NULL,
    public_key TEXT NOT NULL,
    key_bytes BLOB,
    UNIQUE (builder_id, public_key)
);
CREATE UNIQUE INDEX public_keys_by_bytes ON public_keys(key_bytes);

-- Store paths are kept as their name and their 32-character hash part's number in 20 big-endian bytes, which
-- sort as the text does (so a report's paths, read in order, meet the index in order). Several names may share a digest.
-- The index holds only the digest's first 4 bytes (web.DIGEST_INDEX_BYTES; queries also compare the whole):
-- new paths land all over it, and a batch of them rewrites fewer pages of a smaller index.
CREATE TABLE store_paths (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    name TEXT NOT NULL
);
CREATE INDEX store_paths_by_digest ON store_paths(substr(digest, 1, 4));

-- Derivation paths, kept as store_paths are (their names end in .drv).
CREATE TABLE derivations (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    name TEXT NOT NULL
);
CREATE INDEX derivations_by_digest ON derivations(substr(digest, 1, 4));

-- The names of the keys that signed attestations, whoever registered them.
CREATE TABLE key_names (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);

-- One row per (builder, output path, hash): re-posting is a no-op, and verdicts count distinct
-- builders, never rows. web.py keeps that unique, through attestations_by_path.
-- id is the index of the attestation's first transparency-log entry, leaf_hash that entry's leaf hash.
-- nar_hash is the 32 bytes of the sha256; sig the 64 bytes of the signature by key sig_key_id
-- (NULL: no signature). A row migrated from version 8 whose hash, signature or time was not in the
-- one spelling web.py writes keeps it as TEXT in nar_hash, sig or created_at (UNIX seconds otherwise).
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
    -- Where the hash came from: 'build', 'check' (a --check rebuild), 'cache' (a binary cache's
    -- signed narinfo); NULL when the client did not say (clients before schema version 6).
    source TEXT CHECK (source IN ('build', 'check', 'cache')),
    -- "fixed:…" when the output is fixed-output; web.py has checked that the path is made from it.
    ca TEXT,
    leaf_hash BLOB NOT NULL
);
-- Covers the verdict queries and the check for an attestation already stored.
CREATE INDEX attestations_by_path ON attestations(path_id, builder_id, nar_hash, verified);
-- Few rows: which paths an attestation calls fixed-output, without reading the attestations.
CREATE INDEX attestations_fixed_output ON attestations(path_id) WHERE ca IS NOT NULL;
CREATE INDEX attestations_by_derivation ON attestations(derivation_id);

CREATE TABLE reports (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER REFERENCES builders(id),
    root TEXT NOT NULL,
    -- The dependency tree in display order, as compact JSON rows, so views never re-parse the SBOM.
    tree TEXT NOT NULL,
    created_at TEXT NOT NULL,
    -- The Content-Type of the upload kept in report_sbom_pieces: CycloneDX, or Nix's own closure output.
    source_type TEXT NOT NULL DEFAULT 'application/vnd.cyclonedx+json'
);

-- The SBOM's components in index order, each [name, drv_path], as a JSON list per piece of up to
-- 10,000 (web.COMPONENTS_PER_PIECE); a component may have several output paths. Not a row per component:
-- writing those rows took a tenth of a report upload's time.
CREATE TABLE report_component_pieces (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    piece TEXT NOT NULL,
    PRIMARY KEY (report_id, seq)
);

CREATE TABLE report_paths (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    out_path TEXT NOT NULL,
    component_idx INTEGER NOT NULL,
    output TEXT,
    ca TEXT,  -- "fixed:…" when the upload marks the path fixed-output (path-info's ca)
    digest BLOB,  -- out_path's digest as store_paths keeps it (web.path_digest), so views join store_paths by index
    drv_path TEXT,  -- its component's, for suggestions
    PRIMARY KEY (report_id, out_path)
) WITHOUT ROWID;

-- What the attestations say of each store path a report lists, one row per path however many reports and
-- revisions list it: who attested which hash, as web.attested_column writes it ('1v,2|3': builder ids by hash,
-- 'v' for verified), 2 when a verified attestation says it is fixed-output (1 when only unverified ones do), how many
-- distinct builders (with a verified attestation) attested it. Written when a report first lists the path, and
-- brought up to date in the transaction of every attestation of it (web.refresh_reported_paths), so report views
-- and suggestions read a row per path rather than search its attestations.
-- Like revision_components, rows stay when no report lists the path any more.
CREATE TABLE reported_paths (
    digest BLOB NOT NULL,  -- as store_paths keeps it
    name TEXT NOT NULL,
    attested TEXT,
    attested_fixed INTEGER NOT NULL DEFAULT 0,
    builders INTEGER NOT NULL DEFAULT 0,
    verified_builders INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (digest, name)
) WITHOUT ROWID;

-- The SBOM as uploaded, in pieces of a few MiB: each piece is written in its own
-- transaction, so storing a large SBOM never holds the write lock for long.
CREATE TABLE report_sbom_pieces (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    piece BLOB NOT NULL,
    PRIMARY KEY (report_id, seq)
);

-- Every revision of a report, the latest too (whose components, paths and SBOM are the report's own rows).
-- A revision lists its components as revision_components ids in index order, delta-coded 8-byte integers
-- compressed with zlib; tree_id its display tree. Labels are aliases such as a git revision.
-- An empty component_ids is pending: written after the PUT has answered (web.PendingRevisions, when the PUT
-- found many new components), and only ever the report's latest revision's, whose components are its own rows.
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
    -- The components whose paths the upload marks fixed-output (path-info's ca), which views of the revision count
    -- apart once the upload is gone: their indices, packed as component_ids; NULL: none. Revisions older than their
    -- report's latest at schema version 15 have none.
    fixed_output BLOB,
    UNIQUE (report_id, number),
    UNIQUE (report_id, label)
);

-- Components as revisions list them, one row shared by every revision of any report that lists the same
-- one: digest is the first 16 bytes of the SHA-256 of its name, drv_path and outputs ([[out_path, output]]).
-- Display trees of revisions, zlib-compressed JSON, shared by the revisions whose tree is the same: a version
-- bump changes paths, rarely the closure's shape. digest is the first 16 bytes of the SHA-256 of the JSON.
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

-- Named trust policies (?policy=NAME): builders is a JSON list of names; verified_only NULL means the server's mode.
CREATE TABLE policies (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    owner_id INTEGER NOT NULL REFERENCES builders(id),
    builders TEXT NOT NULL,
    min INTEGER NOT NULL,
    verified_only INTEGER,
    updated_at TEXT NOT NULL
);

-- owner_id is the builder who made the pattern; NULL for patterns made before
-- version 2, which only admins may change.
CREATE TABLE link_patterns (
    id INTEGER PRIMARY KEY,
    pattern TEXT NOT NULL UNIQUE,
    link TEXT NOT NULL,
    owner_id INTEGER REFERENCES builders(id)
);
CREATE INDEX link_patterns_by_owner ON link_patterns(owner_id);

-- Builder-supplied diffs between two outputs of one path (hash_a < hash_b as strings), as
-- zlib-compressed JSON. The first upload of a pair is kept, with its uploader.
CREATE TABLE diffs (
    id INTEGER PRIMARY KEY,
    output_path TEXT NOT NULL,
    hash_a TEXT NOT NULL,
    hash_b TEXT NOT NULL,
    uploader_id INTEGER NOT NULL REFERENCES builders(id),
    differing INTEGER NOT NULL,
    document BLOB NOT NULL,
    created_at TEXT NOT NULL,
    UNIQUE (output_path, hash_a, hash_b)
);

-- The transparency log (docs/transparency-log.md). Entry idx is rebuilt from the attestation whose id
-- is idx, unless a row here says otherwise: an entry whose bytes were kept (`entry`) because its row has
-- changed since (an upgrade to verified), or a later entry of attestation_id (the upgrade's own entry,
-- rebuilt from that row). attestation_id is NULL when the row is gone.
CREATE TABLE log_entries (
    idx INTEGER PRIMARY KEY,
    attestation_id INTEGER,
    leaf_hash BLOB NOT NULL,
    entry BLOB
);
CREATE INDEX log_entries_by_attestation ON log_entries(attestation_id);

-- The hash of every complete subtree of 256^level leaves, level >= 1: the C2SP tiles above level 0.
CREATE TABLE log_subtrees (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

-- Signed checkpoints (C2SP tlog-checkpoint), and the cosignatures witnesses sent for them.
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
