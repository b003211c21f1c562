#!/usr/bin/env python3
"""nix-hash-collection client: Nix post-build-hook, diff-hook and tools.

This file also holds the Nix format rules (store paths, hash encodings,
fingerprints, signatures, NAR) and the transparency-log formats that web.py
and create_user.py import, so each rule has one home.
"""
import base64
import contextlib
import hashlib
import json
import os
import re
import stat
import sys
import time
from typing import NamedTuple

# ================================================================ shared Nix formats
# Imported by web.py and create_user.py as well as used by the client below. This part and the
# transparency-log formats need only the standard library at import time: pynacl and requests
# are imported inside the functions that use them, because the hook runs after every build and
# importing them costs a tenth of a second that a run which does not sign or send should not pay.

STORE_DIR = "/nix/store"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
SHA256_BYTES = 32
SHA256_BASE32_LEN = 52
DIGEST_RE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")
# Nix's own rule for the name part: this set of characters, no leading dot.
NAME_RE = re.compile(r"[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}")
STORE_BASENAME_RE = re.compile(r"([0123456789abcdfghijklmnpqrsvwxyz]{32})-(" + NAME_RE.pattern + r")")
STORE_PATH_RE = re.compile(re.escape(STORE_DIR) + "/" + STORE_BASENAME_RE.pattern)


# ---------------------------------------------------------------- messages

def shorten(value, limit=80):
    """A value for an error message, cut to a readable length: it may come from anyone."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- nix base32

# Nix base32 is the little-endian integer of the bytes, printed most significant
# digit first, so Python's big integers do the bit shuffling.
TO_STANDARD_BASE32 = str.maketrans(NIX_BASE32, "0123456789abcdefghijklmnopqrstuv")


def nix_base32_encode(raw):
    length = (len(raw) * 8 - 1) // 5 + 1
    number = int.from_bytes(raw, "little")
    return "".join(NIX_BASE32[(number >> (5 * n)) & 31] for n in range(length - 1, -1, -1))


def nix_base32_number(text):
    """The number nix base32 text spells; the caller has checked its characters."""
    return int(text.translate(TO_STANDARD_BASE32), 32)


def nix_base32_decode(text, size):
    bad = set(text) - set(NIX_BASE32)
    if bad or not text:
        raise ValueError(f"invalid nix base32 character {min(bad)!r}" if bad else "empty nix base32 string")
    try:
        return nix_base32_number(text).to_bytes(size, "little")
    except OverflowError:
        raise ValueError(f"invalid base-32 hash: it does not decode to exactly {size} bytes") from None


# ---------------------------------------------------------------- store paths

def parse_store_basename(basename):
    """Split '<32 chars>-<name>' into (digest, name), or raise ValueError."""
    if not isinstance(basename, str):
        raise ValueError(f"expected a string, got {type(basename).__name__}")
    match = STORE_BASENAME_RE.fullmatch(basename)
    if not match:
        raise ValueError(
            f"expected <32 nix-base32 chars>-<name of [A-Za-z0-9+._?=-], not starting with '.'>, got {shorten(basename)!r}")
    return match.group(1), match.group(2)


def is_store_path(path):
    return isinstance(path, str) and STORE_PATH_RE.fullmatch(path) is not None


STORE_PATH_LINES_RE = re.compile(f"(?:{STORE_PATH_RE.pattern}\n)*")


def are_store_paths(paths):
    """Whether every one of these is a store path, as is_store_path says: one match over them all, in C.
    The count of lines matters: a string with a newline could hold two paths."""
    if not paths:
        return True
    try:
        lines = "\n".join(paths) + "\n"
    except TypeError:  # not all strings
        return False
    return lines.count("\n") == len(paths) and STORE_PATH_LINES_RE.fullmatch(lines) is not None


def parse_store_path(path):
    """Split '/nix/store/<32 chars>-<name>' into (digest, name), or raise ValueError."""
    if not isinstance(path, str) or not path.startswith(STORE_DIR + "/"):
        raise ValueError(f"expected a store path /nix/store/<32 nix-base32 chars>-<name>, got {shorten(path)!r}")
    try:
        return parse_store_basename(basename_of(path))
    except ValueError:
        raise ValueError(f"expected a store path /nix/store/<32 nix-base32 chars>-<name>, got {shorten(path)!r}") from None


def store_path(basename):
    """'<hash>-<name>' -> '/nix/store/<hash>-<name>'."""
    return f"{STORE_DIR}/{basename}"


def basename_of(path):
    """'/nix/store/<hash>-<name>' -> '<hash>-<name>'."""
    return path[len(STORE_DIR) + 1:]


def name_of(path):
    """'/nix/store/<hash>-<name>' -> '<name>': what a person reads."""
    return path[len(STORE_DIR) + 1 + 32 + 1:]


def drv_ident_of(drv_path):
    """'/nix/store/<h>-foo.drv' -> '<h>-foo', the form the attestation URL uses."""
    parse_store_path(drv_path)
    if not drv_path.endswith(".drv"):
        raise ValueError(f"expected a .drv store path, got {shorten(drv_path)!r}")
    return basename_of(drv_path)[:-len(".drv")]


# ---------------------------------------------------------------- fixed-output content addresses
# A fixed-output path (a source fetched by hash) has `ca` "fixed:[r:]<algo>:<nix base32 hash>", and its
# store path is computed from that hash: checking the path against the ca means nobody can call an
# ordinary build output fixed-output, and so take it out of a report's reproducibility count.

FIXED_CA_RE = re.compile(r"fixed:(r:)?(md5|sha1|sha256|sha512):([0123456789abcdfghijklmnpqrsvwxyz]+)")
CA_HASH_BYTES = {"md5": 16, "sha1": 20, "sha256": 32, "sha512": 64}


def make_store_path(path_type, inner_hash_hex, name):
    """Nix's makeStorePath: the digest is sha256 of '<type>:sha256:<hex>:<store>:<name>' folded to 20 bytes."""
    full = hashlib.sha256(f"{path_type}:sha256:{inner_hash_hex}:{STORE_DIR}:{name}".encode()).digest()
    # Byte i is XORed into byte i % 20: as little-endian numbers, the last 12 bytes onto the first 12.
    folded = int.from_bytes(full[:20], "little") ^ int.from_bytes(full[20:], "little")
    return f"{STORE_DIR}/{nix_base32_encode(folded.to_bytes(20, 'little'))}-{name}"


def fixed_output_path(ca, name, references=(), self_reference=False):
    """The store path Nix gives a path named `name` with content address `ca` and these references (other store paths)
    or none, or ValueError. A fixed-output path has none; the output of a content-addressed derivation (fixed:r:sha256)
    may have some: its type is "source", each reference, and ":self" if it refers to itself."""
    match = FIXED_CA_RE.fullmatch(ca) if isinstance(ca, str) else None
    if not match:
        raise ValueError(f"expected a fixed-output content address fixed:[r:]<sha256|sha512|sha1|md5>:<nix base32>,"
                         f" got {shorten(ca)!r}")
    recursive, algorithm, encoded = match.groups()
    hex_hash = nix_base32_decode(encoded, CA_HASH_BYTES[algorithm]).hex()
    if recursive and algorithm == "sha256":
        path_type = "source" + "".join(f":{reference}" for reference in sorted(references)) + (":self" if self_reference else "")
        return make_store_path(path_type, hex_hash, name)
    if references or self_reference:
        raise ValueError(f"expected fixed:r:sha256:<nix base32>, the only content address of a path with references,"
                         f" got {shorten(ca)!r}")
    inner = hashlib.sha256(f"fixed:out:{recursive or ''}{algorithm}:{hex_hash}:".encode()).hexdigest()
    return make_store_path("output:out", inner, name)


def fixed_content_address(ca):
    """A path-info `ca` as "fixed:…" text when it marks a fixed-output path, else None (text:…, absent).

    Nix before 2.33 writes ca as text; later versions as {"method": "flat"|"nar"|"text"|"git", "hash": SRI}.
    """
    if isinstance(ca, str):
        return ca if ca.startswith("fixed:") else None
    if not isinstance(ca, dict) or ca.get("method") not in ("flat", "nar"):
        return None
    algorithm, raw = sri_hash(ca.get("hash"))
    return f"fixed:{'r:' if ca['method'] == 'nar' else ''}{algorithm}:{nix_base32_encode(raw)}"


def sri_hash(text):
    """(algorithm, bytes) of an SRI hash as newer Nix writes a ca's: <md5|sha1|sha256|sha512>-<base64>; else ValueError."""
    algorithm, _dash, encoded = str(text).partition("-")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raw = b""
    if CA_HASH_BYTES.get(algorithm) != len(raw):
        raise ValueError(f"ca.hash: expected an SRI hash such as sha256-<base64>, got {shorten(text)!r}")
    return algorithm, raw


def check_fixed_output(out_path, ca, references=()):
    """ca itself when out_path is the path Nix makes of ca and these references (store paths; out_path among them if it
    refers to itself), as fixed_output_path; else ValueError saying why not."""
    _digest, name = parse_store_path(out_path)
    if fixed_output_path(ca, name, set(references) - {out_path}, out_path in references) != out_path:
        raise ValueError(f"{shorten(ca)!r} is not the content address of {shorten(out_path)}"
                         f"{' with its references' if references else ''}: the store path differs")
    return ca


def fixed_output_mark(out_path, ca, references):
    """ca when out_path is the fixed-output path of it; None when out_path is a content-addressed derivation's output
    (it has references: its path is checked the same way, but whether it reproduces is still worth knowing);
    else ValueError, as check_fixed_output."""
    check_fixed_output(out_path, ca, references)
    return None if references else ca


# ---------------------------------------------------------------- NAR hashes

CANONICAL_SHA256_RE = re.compile(r"sha256:[01][0123456789abcdfghijklmnpqrsvwxyz]{51}")


def normalize_nar_hash(text):
    """Any of Nix's sha256 spellings -> 'sha256:<nix base32>', or raise ValueError."""
    # A leading 0 or 1 is exactly the rule that 52 digits decode to 32 bytes.
    if isinstance(text, str) and CANONICAL_SHA256_RE.fullmatch(text):
        return text
    raw = decode_sha256(text)
    return "sha256:" + nix_base32_encode(raw)


def decode_sha256(text):
    expected = "expected sha256 in base16, nix base32 or SRI form"
    if not isinstance(text, str):
        raise ValueError(f"{expected}, got {type(text).__name__}")
    if text.startswith("sha256-"):
        try:
            raw = base64.b64decode(text[7:], validate=True)
        except ValueError:
            raw = b""
        if len(raw) == SHA256_BYTES:
            return raw
        raise ValueError(f"{expected}, got an SRI hash that is not 32 bytes of base64: {shorten(text)!r}")
    if not text.startswith("sha256:"):
        raise ValueError(f"{expected}, got {shorten(text)!r}")
    digest = text[7:]
    if len(digest) == 64 and re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        return bytes.fromhex(digest)
    if len(digest) == SHA256_BASE32_LEN:
        return nix_base32_decode(digest, SHA256_BYTES)
    raise ValueError(f"{expected}, got {len(digest)} characters after 'sha256:': {shorten(text)!r}")


# ---------------------------------------------------------------- signatures

def fingerprint(out_path, nar_hash, nar_size, references):
    """The exact message Nix signs for a store path."""
    return "1;{};{};{};{}".format(out_path, normalize_nar_hash(nar_hash), nar_size, ",".join(sorted(references)))


# Nix writes keys and signatures as NAME:BASE64. Only one spelling of each is accepted, so that
# a key or signature has exactly one text: no spaces or newlines around it, a name that cannot
# carry a line break into a narinfo, and the canonical base64 of the bytes (which re-encodes to itself).
KEY_NAME_RE = re.compile(r"[A-Za-z0-9._+-]+")


def parse_key(text, size):
    """'name:base64' -> (name, raw bytes of the given size), or raise ValueError."""
    if not isinstance(text, str):
        raise ValueError(f"expected a Nix key or signature NAME:BASE64, got {type(text).__name__}")
    name, sep, encoded = text.partition(":")
    if not sep or not KEY_NAME_RE.fullmatch(name):
        raise ValueError(f"expected NAME:BASE64 with a NAME of [A-Za-z0-9._+-] and nothing around it, got {shorten(text)!r}")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError(f"key {name!r}: the part after ':' is not base64") from None
    if len(raw) != size:
        raise ValueError(f"key {name!r}: expected {size} bytes, got {len(raw)}")
    if base64.b64encode(raw).decode() != encoded:
        raise ValueError(f"key {name!r}: the part after ':' is not the canonical base64 of its bytes")
    return name, raw


def is_public_key(text):
    """Whether text is a public key in the one spelling parse_key accepts."""
    try:
        parse_key(text, 32)
    except ValueError:
        return False
    return True


def is_signature(text):
    """Whether text is a signature in the one spelling parse_key accepts."""
    try:
        parse_key(text, 64)
    except ValueError:
        return False
    return True


def ed25519_sign(seed, message):
    from nacl.signing import SigningKey
    return SigningKey(seed).sign(message).signature


def ed25519_verifies(public, message, signature):
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey
    try:
        VerifyKey(public).verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def sign_fingerprint(secret_key_text, message):
    name, raw = parse_key(secret_key_text, 64)
    return f"{name}:{base64.b64encode(ed25519_sign(raw[:32], message.encode())).decode()}"


def verify_signature(public_key_text, message, signature):
    """True when signature ('name:base64') is by that public key over message."""
    key_name, raw_key = parse_key(public_key_text, 32)
    sig_name, raw_sig = parse_key(signature, 64)
    return key_name == sig_name and ed25519_verifies(raw_key, message.encode(), raw_sig)


def signature_is_good(public_key, message, signature):
    """verify_signature for signatures from elsewhere: a malformed one vouches for nothing."""
    try:
        return verify_signature(public_key, message, signature)
    except ValueError:
        return False


# ---------------------------------------------------------------- narinfo
# The server writes narinfos (web.py narinfo_text, from the same fingerprint fields); the cache importer reads them.

def parse_narinfo(text):
    """{field: value} of a narinfo, with every Sig line in 'Sig' as a list."""
    fields = {"Sig": []}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        if key == "Sig":
            fields["Sig"].append(value.strip())
        else:
            fields[key] = value.strip()
    return fields


# ---------------------------------------------------------------- NAR serialisation

def nar_string(raw):
    return len(raw).to_bytes(8, "little") + raw + b"\0" * (-len(raw) % 8)


def nar_chunks(path):
    """Yield the NAR serialisation of path, as `nix-store --dump` writes it."""
    yield nar_string(b"nix-archive-1")
    yield from nar_node(os.fsencode(path))


def nar_node(root):
    """The NAR serialisation of the file at root, in chunks. With a stack of what is left to do, not recursion:
    an output may be nested deeper than Python's recursion limit (a thousand levels)."""
    pending = [(NAR_PATH, root)]  # popped from the end: (NAR_PATH, a path to serialise) or (NAR_BYTES, bytes)
    while pending:
        kind, value = pending.pop()
        if kind is NAR_BYTES:
            yield value
            continue
        info = os.lstat(value)
        yield nar_string(b"(") + nar_string(b"type")
        if stat.S_ISLNK(info.st_mode):
            yield nar_string(b"symlink") + nar_string(b"target") + nar_string(os.readlink(value)) + nar_string(b")")
        elif stat.S_ISDIR(info.st_mode):
            yield nar_string(b"directory")
            pending.append((NAR_BYTES, nar_string(b")")))
            for entry in sorted(os.listdir(value), reverse=True):
                pending += [(NAR_BYTES, nar_string(b")")), (NAR_PATH, os.path.join(value, entry)),
                            (NAR_BYTES, nar_string(b"entry") + nar_string(b"(") + nar_string(b"name")
                             + nar_string(entry) + nar_string(b"node"))]
        elif stat.S_ISREG(info.st_mode):
            yield nar_string(b"regular")
            if info.st_mode & stat.S_IXUSR:
                yield nar_string(b"executable") + nar_string(b"")
            yield from nar_file_contents(value, info.st_size)
            yield nar_string(b")")
        else:
            raise ValueError(f"{os.fsdecode(value)}: cannot serialise a file of this type into a NAR")


NAR_PATH, NAR_BYTES = "path", "bytes"


def nar_file_contents(path, size):
    yield nar_string(b"contents") + size.to_bytes(8, "little")
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            yield chunk
    yield b"\0" * (-size % 8)


def nar_hash_and_size(path):
    """('sha256:<nix base32>', size) of path's NAR, like `nix-store -q --hash --size`."""
    digest = hashlib.sha256()
    size = 0
    for chunk in nar_chunks(path):
        digest.update(chunk)
        size += len(chunk)
    return "sha256:" + nix_base32_encode(digest.digest()), size


# ================================================================ shared transparency-log formats
# The log's formats, used by the server to build the log and by audit, witness
# and monitor to check it: RFC 9162 Merkle trees and the C2SP signed-note,
# tlog-checkpoint, tlog-tiles and tlog-cosignature specifications.

LOG_ENTRY_HEADER = "hash-collection-attestation v1"
TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_LOG_ENTRY = 65535  # an entry bundle prefixes each entry with a uint16 length
NOTE_SIGNATURE_PREFIX = "\u2014 "
ED25519_KEY_TYPE = 0x01
COSIGNATURE_KEY_TYPE = 0x04
COSIGNATURE_HEADER = "cosignature/v1\n"

# The verdict labels and rule live here so that `monitor` recomputes verdicts exactly as the server does.
NO_BUILDS = "No builds"
ONE_BUILD = "One build"
REPRODUCED = "Successfully reproduced"
PARTIALLY = "Partially reproduced"
NONDETERMINISTIC = "Consistently nondeterministic"


def verdict(builders_by_hash, trusted=None, minimum=2):
    """The verdict for one output path, from {hash: set of builders}, under a trust policy:
    only the `trusted` builders count (None: every builder), and a hash is reproduced once
    `minimum` distinct ones have it. The server's views and `challenge --trust` both call this.

    It counts builders, not rows: one builder posting twice is one build, and
    one builder with two hashes is evidence of nondeterminism, never of reproduction.
    """
    if trusted is not None:
        builders_by_hash = {nar_hash: builders & trusted for nar_hash, builders in builders_by_hash.items()
                            if not builders.isdisjoint(trusted)}
    return verdict_of_counts([len(builders) for builders in builders_by_hash.values()], minimum)


def verdict_of_counts(builder_counts, minimum=2):
    """The verdict from how many distinct counted builders have each hash: all that `verdict` looks at."""
    if not builder_counts:
        return NO_BUILDS
    if len(builder_counts) == 1:
        return REPRODUCED if builder_counts[0] >= minimum else ONE_BUILD
    if any(count >= minimum for count in builder_counts):
        return PARTIALLY
    return NONDETERMINISTIC


def settled_hashes(builders_by_hash, trusted=None, minimum=2):
    """The hashes that `minimum` distinct trusted builders have: the ones `verdict` calls reproduced."""
    return {nar_hash for nar_hash, builders in builders_by_hash.items()
            if len(builders if trusted is None else builders & trusted) >= minimum}


# ---------------------------------------------------------------- log entries

def references_summary(references):
    """'<count> <base64 SHA-256 of the sorted basenames, each followed by \\n>', or '-' when unknown."""
    if references is None:
        return "-"
    if not references:
        return NO_REFERENCES
    basenames = sorted(os.path.basename(reference) for reference in references)
    digest = hashlib.sha256("".join(basename + "\n" for basename in basenames).encode()).digest()
    return f"{len(basenames)} {base64.b64encode(digest).decode()}"


NO_REFERENCES = "0 " + base64.b64encode(hashlib.sha256(b"").digest()).decode()


def log_entry(builder, output_path, drv_path, nar_hash, nar_size, references, signature, verified, time_utc):
    """The bytes of one log entry; references is the list of store paths, or None."""
    # One f-string: this runs for every attestation a batch stores.
    return (f"{LOG_ENTRY_HEADER}\nbuilder {builder}\noutput {output_path}\nderiver {drv_path or '-'}\n"
            f"nar-hash {nar_hash}\nnar-size {'-' if nar_size is None else nar_size}\n"
            f"references {references_summary(references)}\nsignature {signature or '-'}\n"
            f"verified {1 if verified else 0}\ntime {time_utc}\n").encode()


def parse_log_entry(entry):
    """{key: value} of an entry's lines, or raise ValueError."""
    try:
        lines = entry.decode().split("\n")
    except UnicodeDecodeError:
        raise ValueError("the entry is not UTF-8") from None
    if len(lines) < 2 or lines[0] != LOG_ENTRY_HEADER or lines[-1] != "":
        raise ValueError(f"the entry does not start with {LOG_ENTRY_HEADER!r} or does not end in a newline")
    fields = dict(line.partition(" ")[::2] for line in lines[1:-1])
    missing = {"builder", "output", "nar-hash", "verified"} - set(fields)
    if missing:
        raise ValueError(f"the entry has no {', '.join(sorted(missing))} line")
    return fields


# ---------------------------------------------------------------- Merkle trees (RFC 9162 §2.1)

EMPTY_TREE_HASH = hashlib.sha256(b"").digest()


def leaf_hash(entry):
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left, right):
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(size):
    """The largest power of two smaller than size (size >= 2): where RFC 9162 splits a tree."""
    return 1 << ((size - 1).bit_length() - 1)


def tree_hash(leaf_hashes):
    """The root of the tree over these leaf hashes, by merging complete subtrees as they fill."""
    subtrees = []  # (size, hash), sizes strictly decreasing
    for hash_ in leaf_hashes:
        size = 1
        while subtrees and subtrees[-1][0] == size:
            hash_ = node_hash(subtrees.pop()[1], hash_)
            size *= 2
        subtrees.append((size, hash_))
    if not subtrees:
        return EMPTY_TREE_HASH
    root = subtrees[-1][1]
    for _size, hash_ in reversed(subtrees[:-1]):
        root = node_hash(hash_, root)
    return root


def shift_while(condition, first, second):
    while condition(first):
        first, second = first >> 1, second >> 1
    return first, second


def root_from_inclusion_proof(index, size, leaf, proof):
    """The root that proof makes of leaf at index in a tree of size (RFC 9162 §2.1.3.2); ValueError if malformed."""
    if not 0 <= index < size:
        raise ValueError(f"index {index} is outside a tree of size {size}")
    fn, sn, root = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise ValueError("the inclusion proof is too long")
        if fn & 1 or fn == sn:
            root = node_hash(sibling, root)
            fn, sn = shift_while(lambda f: not f & 1 and f != 0, fn, sn)
        else:
            root = node_hash(root, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ValueError("the inclusion proof is too short")
    return root


def consistency_holds(old_size, new_size, old_root, new_root, proof):
    """Whether proof shows the tree of old_size is a prefix of the tree of new_size (RFC 9162 §2.1.4.2)."""
    if old_size > new_size:
        return False
    if old_size == new_size:
        return not proof and old_root == new_root
    if old_size == 0:
        return not proof
    path = ([old_root] if old_size & (old_size - 1) == 0 else []) + list(proof)
    if not path:
        return False
    fn, sn = shift_while(lambda f: f & 1, old_size - 1, new_size - 1)
    first = second = path[0]
    for hash_ in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first, second = node_hash(hash_, first), node_hash(hash_, second)
            fn, sn = shift_while(lambda f: not f & 1 and f != 0, fn, sn)
        else:
            second = node_hash(second, hash_)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and first == old_root and second == new_root


# ---------------------------------------------------------------- tiles (C2SP tlog-tiles)

def tile_index_path(index):
    """1234067 -> 'x001/x234/067'."""
    digits = f"{index:d}"
    digits = "0" * (-len(digits) % 3) + digits
    groups = [digits[start:start + 3] for start in range(0, len(digits), 3)]
    return "/".join([f"x{group}" for group in groups[:-1]] + [groups[-1]])


def tile_path(level, index, width=TILE_WIDTH):
    """'tile/<L>/<N>[.p/<W>]'; level 'entries' for an entry bundle."""
    partial = "" if width == TILE_WIDTH else f".p/{width}"
    return f"tile/{level}/{tile_index_path(index)}{partial}"


def parse_tile_index(text):
    """'x001/x234/067' -> 1234067, or raise ValueError for anything else."""
    groups = text.split("/")
    if not all(re.fullmatch(r"x[0-9]{3}", group) for group in groups[:-1]) or not re.fullmatch(r"[0-9]{3}", groups[-1]):
        raise ValueError(f"expected a tile index like x001/x234/067, got {shorten(text)!r}")
    return int("".join(group.lstrip("x") for group in groups))


def entry_bundle(entries):
    return b"".join(len(entry).to_bytes(2, "big") + entry for entry in entries)


def split_entry_bundle(bundle):
    """The entries of a bundle, or raise ValueError if it is cut short."""
    entries, offset = [], 0
    while offset < len(bundle):
        length = int.from_bytes(bundle[offset:offset + 2], "big")
        if offset + 2 + length > len(bundle):
            raise ValueError(f"the entry bundle is cut short after {len(entries)} entries")
        entries.append(bundle[offset + 2:offset + 2 + length])
        offset += 2 + length
    return entries


# ---------------------------------------------------------------- signed notes (C2SP signed-note, tlog-checkpoint)

class NoteKey:
    """A signed-note key: name, 4-byte key ID, type byte and 32-byte Ed25519 key (public, or the seed)."""

    def __init__(self, name, key_type, raw):
        if not name or any(character in name for character in "+ \n\t") or len(raw) != 32:
            raise ValueError(f"a note key needs a name without '+' or spaces and 32 bytes, got {shorten(name)!r}")
        self.name, self.key_type, self.raw = name, key_type, raw

    def key_id(self, public):
        return hashlib.sha256(self.name.encode() + b"\n" + bytes([self.key_type]) + public).digest()[:4]


def parse_verifier_key(text):
    """'<name>+<hex id>+<base64(type || public key)>' -> (NoteKey, key id), or raise ValueError."""
    name, hex_id, encoded = note_key_parts(text.strip(), 3, "verifier key <name>+<hex id>+<base64 key>")
    key = note_key_of(name, encoded)
    if key.key_id(key.raw).hex() != hex_id.lower():
        raise ValueError(f"verifier key {name!r}: the key ID {hex_id} does not match the key")
    return key


def parse_signer_key(text):
    """'PRIVATE+KEY+<name>+<hex id>+<base64(type || seed)>' -> NoteKey holding the seed."""
    words = note_key_parts(text.strip(), 5, "signer key PRIVATE+KEY+<name>+<hex id>+<base64 seed>")
    if words[:2] != ["PRIVATE", "KEY"]:
        raise ValueError("a signer key starts with PRIVATE+KEY+")
    key = note_key_of(words[2], words[4])
    if key.key_id(public_key_of_seed(key.raw)).hex() != words[3].lower():
        raise ValueError(f"signer key {words[2]!r}: the key ID {words[3]} does not match the key")
    return key


def note_key_parts(text, count, expected):
    words = text.split("+", count - 1)
    if len(words) != count or not all(words):
        raise ValueError(f"expected a {expected}, got {shorten(text)!r}")
    return words


def note_key_of(name, encoded):
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError(f"note key {name!r}: the key is not base64") from None
    if len(raw) != 33 or raw[0] not in (ED25519_KEY_TYPE, COSIGNATURE_KEY_TYPE):
        raise ValueError(f"note key {name!r}: expected a type byte 0x01 or 0x04 and 32 bytes of Ed25519 key")
    return NoteKey(name, raw[0], raw[1:])


def public_key_of_seed(seed):
    from nacl.signing import SigningKey
    return bytes(SigningKey(seed).verify_key)


def generate_note_key(name, key_type):
    """(signer key text, verifier key text) of a new Ed25519 note key."""
    seed = os.urandom(32)
    key = NoteKey(name, key_type, seed)
    public = public_key_of_seed(seed)
    hex_id = key.key_id(public).hex()
    return (f"PRIVATE+KEY+{name}+{hex_id}+{base64.b64encode(bytes([key_type]) + seed).decode()}",
            verifier_key_text(NoteKey(name, key_type, public)))


def verifier_key_text(public_key):
    encoded = base64.b64encode(bytes([public_key.key_type]) + public_key.raw).decode()
    return f"{public_key.name}+{public_key.key_id(public_key.raw).hex()}+{encoded}"


def verifier_of_signer(signer):
    return NoteKey(signer.name, signer.key_type, public_key_of_seed(signer.raw))


def signature_line(key, signature_bytes):
    return f"{NOTE_SIGNATURE_PREFIX}{key.name} {base64.b64encode(signature_bytes).decode()}\n"


def sign_note(text, signer):
    """The signed note: text, a blank line and one signature line by signer (an Ed25519 NoteKey with its seed)."""
    key_id = signer.key_id(public_key_of_seed(signer.raw))
    return text + "\n" + signature_line(signer, key_id + ed25519_sign(signer.raw, text.encode()))


def split_note(note):
    """(text, [(key name, signature bytes)]) of a signed note, or raise ValueError."""
    text, separator, signatures = note.rpartition("\n\n")
    if not separator or not signatures.endswith("\n"):
        raise ValueError("not a signed note: no blank line before the signatures, or no final newline")
    parsed = []
    for line in signatures[:-1].split("\n"):
        name, _, encoded = line.removeprefix(NOTE_SIGNATURE_PREFIX).partition(" ")
        try:
            raw = base64.b64decode(encoded, validate=True)
        except ValueError:
            raw = b""
        if not line.startswith(NOTE_SIGNATURE_PREFIX) or len(raw) < 5:
            raise ValueError(f"malformed signature line {shorten(line)!r}")
        parsed.append((name, raw))
    return text + "\n", parsed


def verify_note(note, verifier):
    """The note's text when it carries a good signature by verifier, else raise ValueError."""
    text, signatures = split_note(note)
    key_id = verifier.key_id(verifier.raw)
    for name, raw in signatures:
        if name == verifier.name and raw[:4] == key_id and ed25519_verifies(verifier.raw, text.encode(), raw[4:]):
            return text
    raise ValueError(f"the note carries no valid signature by {verifier.name}")


def checkpoint_text(origin, size, root):
    return f"{origin}\n{size}\n{base64.b64encode(root).decode()}\n"


def parse_checkpoint(text):
    """(origin, size, root hash) of a checkpoint's note text, or raise ValueError."""
    lines = text.split("\n")
    if len(lines) < 4 or not lines[0] or not re.fullmatch(r"0|[1-9][0-9]{0,18}", lines[1]):
        raise ValueError("not a checkpoint: expected origin, tree size and root hash lines")
    try:
        root = base64.b64decode(lines[2], validate=True)
    except ValueError:
        root = b""
    if len(root) != 32:
        raise ValueError("not a checkpoint: the root hash is not 32 bytes of base64")
    return lines[0], int(lines[1]), root


def cosignature_message(text, timestamp):
    return f"{COSIGNATURE_HEADER}time {timestamp}\n".encode() + text.encode()


def cosign(text, witness, timestamp):
    """The C2SP cosignature line by witness (a NoteKey of type 0x04 with its seed) over a checkpoint's text."""
    key_id = witness.key_id(public_key_of_seed(witness.raw))
    signature = ed25519_sign(witness.raw, cosignature_message(text, timestamp))
    return signature_line(witness, key_id + timestamp.to_bytes(8, "big") + signature)


def cosignature_time(text, witness, name, raw):
    """The timestamp of a valid cosignature (name, raw) by witness over text, else None."""
    if name != witness.name or len(raw) != 76 or raw[:4] != witness.key_id(witness.raw):
        return None
    timestamp = int.from_bytes(raw[4:12], "big")
    return timestamp if ed25519_verifies(witness.raw, cosignature_message(text, timestamp), raw[12:]) else None


# ================================================================ the client
# Everything below runs inside Nix's build loop. A post-build hook that exits
# non-zero makes Nix stop building, so every hook path exits 0, bounds its
# network time, and keeps what it could not deliver in the spool.

DEFAULT_TIMEOUT = 5.0
ROOT_SPOOL = "/var/lib/hash-collection/spool"  # root-owned 0700: nobody else may write where root writes
BUILD_USER_SPOOL = "/var/lib/hash-collection/build-user-spool"  # the diff hook's, root:nixbld 2770; root only reads it
DEFAULT_BUILD_USERS_GROUP = "nixbld"
NIX_QUERY_TIMEOUT = 60
FINISHING_TIME = 0.1  # of the time budget, kept back to spool the submission and exit
PREFIX = "hash-collection:"
SECRET_FILE_CAP = 64 << 10  # bytes; a token or a Nix secret key is about a hundred


def say(message):
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


class ConfigError(Exception):
    """Something the user must fix in the environment; shown as one line."""


class StoreQueryError(Exception):
    """A nix command failed; the message is its last line of stderr."""


# ---------------------------------------------------------------- configuration

class Config:
    def __init__(self, server, token, secret_key, key_problem, spool, timeout, build_user_spool=None,
                 build_users_group=DEFAULT_BUILD_USERS_GROUP):
        self.server = server
        self.token = token
        self.secret_key = secret_key
        self.key_problem = key_problem
        self.spool = spool
        self.timeout = timeout
        self.build_user_spool = build_user_spool
        self.build_users_group = build_users_group


def server_setting(env):
    """HASH_COLLECTION_SERVER without a trailing slash, or '' when unset."""
    return env.get("HASH_COLLECTION_SERVER", "").strip().rstrip("/")


def load_config(env):
    server = server_setting(env)
    if not server:
        raise ConfigError("HASH_COLLECTION_SERVER is not set, so there is no server to send submissions to")
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        raise ConfigError("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set; the server needs a token")
    secret_key, key_problem = load_secret_key(env)
    return Config(server, token, secret_key, key_problem, spool_directory(env), timeout_of(env),
                  build_user_spool_directory(env),
                  env.get("HASH_COLLECTION_BUILD_USERS_GROUP", "").strip() or DEFAULT_BUILD_USERS_GROUP)


def read_secret(env, name):
    """The secret from NAME_FILE (recommended) or NAME (the original's interface), or None when neither is set."""
    path = env.get(name + "_FILE")
    if path:
        return one_word_secret(f"{name}_FILE={path}", read_secret_file(f"{name}_FILE={path}", path))
    return one_word_secret(name, env.get(name, "").strip()) or None


def one_word_secret(setting, secret):
    """Tokens and keys are one word (a note key's name may be any text without spaces). Anything else (two lines of
    a command's output, say) would fail at every request, and the HTTP library's error would print the secret:
    refused here, not shown."""
    if secret and not SECRET_WORD_RE.fullmatch(secret):
        raise ConfigError(f"{setting} is not one word: a token or key has no spaces, line breaks or control"
                          " characters; did the command that wrote it print more than the token or key?")
    return secret


SECRET_WORD_RE = re.compile(r"[^\s\x00-\x1f\x7f]+")


def read_secret_file(setting, path):
    """The file's text; a file that is set but unusable is a ConfigError naming it, never 'not set'."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(SECRET_FILE_CAP + 1)
    except OSError as error:
        raise ConfigError(f"cannot read {setting}: {error.strerror} ({running_as()})") from None
    if len(raw) > SECRET_FILE_CAP:
        raise ConfigError(f"{setting} is larger than {SECRET_FILE_CAP} bytes: not a token or key file")
    try:
        text = raw.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{setting} is not text: not a token or key file") from None
    if not text:
        # What a shell leaves behind when the command redirected into the file failed.
        raise ConfigError(f"{setting} is empty; did the command that wrote it fail?")
    return text


def load_secret_key(env):
    """(key text, None) or (None, why there is no usable key): the key is optional."""
    try:
        secret_key = read_secret(env, "HASH_COLLECTION_SECRET_KEY")
    except ConfigError as error:
        return None, str(error)
    if not secret_key:
        return None, "neither HASH_COLLECTION_SECRET_KEY_FILE nor HASH_COLLECTION_SECRET_KEY is set"
    try:
        require_nacl()
    except ConfigError as error:
        return None, f"the key cannot sign: {error}"
    return secret_key_problem(env, secret_key)


def require_nacl():
    """ConfigError naming the package, unless PyNaCl (Ed25519 signatures) can be imported."""
    try:
        import nacl.signing  # noqa: F401
    except ImportError:
        raise ConfigError(f"{sys.executable} has no PyNaCl, which signs and checks Ed25519 signatures:"
                          " pip install pynacl, or apt-get install python3-nacl") from None


def secret_key_problem(env, secret_key):
    """(key, None) when it is a Nix secret key, else (None, what is wrong and where the key came from).

    The problem never quotes the text: it may be a secret that only looks wrong."""
    path = env.get("HASH_COLLECTION_SECRET_KEY_FILE")
    setting = f"HASH_COLLECTION_SECRET_KEY_FILE={path}" if path else "HASH_COLLECTION_SECRET_KEY"
    name, sep, _encoded = secret_key.partition(":")
    if not sep or not KEY_NAME_RE.fullmatch(name):
        problem = "expected NAME:BASE64 on one line"
    else:
        try:
            parse_key(secret_key, 64)
            return secret_key, None
        except ValueError as error:
            problem = str(error)
        if is_public_key(secret_key):
            problem = f"key {name!r} is a public key; the hook needs the secret key it was made from"
    return None, f"{setting} is not a secret key from `nix key generate-secret`: {problem}"


def running_as():
    import pwd
    try:
        return "running as " + pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"running as uid {os.getuid()}"


def timeout_of(env):
    return positive_setting(env, "HASH_COLLECTION_TIMEOUT", DEFAULT_TIMEOUT, "seconds")


def spool_directory(env):
    """Where this process's undelivered submissions wait. Computed without touching the disk: HOME may not exist."""
    if env.get("HASH_COLLECTION_SPOOL"):
        return env["HASH_COLLECTION_SPOOL"]
    if os.getuid() == 0:
        return ROOT_SPOOL
    state_home = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):
        home = env.get("HOME") or home_of_current_user()
        state_home = os.path.join(home, ".local", "state")
    return os.path.join(state_home, "hash-collection", "spool")


def build_user_spool_directory(env):
    """The diff hook's spool, which root delivers from; None for anyone else or when set empty."""
    if os.geteuid() != 0:
        return None  # the diff hook itself: its spool is HASH_COLLECTION_SPOOL
    if "HASH_COLLECTION_BUILD_USER_SPOOL" in env:
        return env["HASH_COLLECTION_BUILD_USER_SPOOL"].strip() or None
    return BUILD_USER_SPOOL


def home_of_current_user():
    import pwd
    try:
        return pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        return "/nonexistent"


# ---------------------------------------------------------------- reading the store

def run_nix(args, env):
    import subprocess
    try:
        completed = subprocess.run(args, env=nix_subprocess_env(env), capture_output=True, text=True,
                                   timeout=NIX_QUERY_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise StoreQueryError(f"{args[0]}: {error}") from None
    if completed.returncode != 0:
        lines = completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"]
        raise StoreQueryError(f"`{' '.join(args[:3])} …` failed: {lines[-1]}")
    return completed.stdout


def nix_subprocess_env(env):
    # The diff hook runs as the build user but inherits the caller's HOME
    # (/root), and nix aborts when it cannot stat ~/.nix-defexpr there.
    home = env.get("HOME", "")
    if home and os.access(home, os.R_OK | os.X_OK):
        return dict(env)
    return {**env, "HOME": "/"}


def derivation_outputs(drv_path, env):
    """The output paths of drv_path, read from the derivation itself."""
    # `nix show-derivation` is spelled `nix derivation show` in newer Nix, which
    # keeps the old name as a deprecated alias only for a while.
    for command in (["nix", "show-derivation"], ["nix", "derivation", "show"]):
        try:
            shown = json.loads(run_nix([*command, "--extra-experimental-features", "nix-command", drv_path], env))
            out_paths = output_paths_in(shown, drv_path)
        except (StoreQueryError, ValueError, KeyError, TypeError, AttributeError):
            continue
        if out_paths:
            return out_paths
    return run_nix(["nix-store", "--query", "--outputs", "--", drv_path], env).split()


def output_paths_in(shown, drv_path):
    """Output paths from any shape of `nix show-derivation` / `nix derivation show` JSON."""
    # Nix 2.34 wraps the map in {"version", "derivations"}; 2.32 keys it by basename
    # and writes output paths as basenames.
    derivations = shown.get("derivations", shown)
    basename = os.path.basename(drv_path)
    derivation = derivations.get(drv_path) or derivations.get(basename)
    if derivation is None and len(derivations) == 1:
        derivation = next(iter(derivations.values()))
    paths = [output.get("path") for output in derivation["outputs"].values()]
    return [path if path.startswith("/") else store_path(path) for path in paths if path]


class PathInfo:
    def __init__(self, out_path, nar_hash, nar_size, references, ca=None):
        self.out_path = out_path
        self.nar_hash = nar_hash
        self.nar_size = nar_size
        self.references = references
        self.ca = ca  # "fixed:…" for a fixed-output path


def path_infos(out_paths, env):
    """NAR hash, size and references of valid store paths, in one nix call."""
    # `--dump-db PATHS` prints Nix's registration format, unchanged since Nix 1.x:
    # path, base16 NAR hash, NAR size, deriver, reference count, references.
    lines = run_nix(["nix-store", "--dump-db", "--", *out_paths], env).splitlines()
    infos = {}
    position = 0
    while position + 5 <= len(lines):
        out_path, nar_hash, nar_size, _deriver, count = lines[position:position + 5]
        references = lines[position + 5:position + 5 + int(count)]
        infos[out_path] = PathInfo(out_path, normalize_nar_hash("sha256:" + nar_hash), int(nar_size), references)
        position += 5 + int(count)
    missing = [path for path in out_paths if path not in infos]
    if missing:
        raise StoreQueryError(f"nix-store --dump-db did not describe {missing[0]}")
    for out_path, ca in fixed_content_addresses(out_paths, env).items():
        infos[out_path].ca = ca
    return [infos[path] for path in out_paths]


def fixed_content_addresses(out_paths, env):
    """{out_path: "fixed:…"} of the fixed-output paths among out_paths. --dump-db has no ca, so this asks
    `nix path-info --json`; without it (a Nix that lacks the command) the outputs are simply not marked."""
    try:
        shown = json.loads(run_nix(["nix", "--extra-experimental-features", "nix-command", "path-info", "--json",
                                    "--", *out_paths], env))
    except (StoreQueryError, ValueError):
        return {}
    entries = shown.items() if isinstance(shown, dict) else ((info.get("path"), info) for info in shown
                                                              if isinstance(info, dict))
    addresses = {}
    for path, info in entries:
        path = path if isinstance(path, str) and path.startswith("/") else f"{STORE_DIR}/{path}"
        try:
            ca = fixed_content_address(info.get("ca")) if isinstance(info, dict) else None
            if ca is not None and path in out_paths:
                addresses[path] = check_fixed_output(path, ca)
        except ValueError:
            continue
    return addresses


def references_of(out_path, env):
    return run_nix(["nix-store", "--query", "--references", "--", out_path], env).split()


# ---------------------------------------------------------------- diffs
# What differs between an output and its `--check` rebuild: always a file-level
# diff (pure Python, one read of both trees), and diffoscope's text when it is
# installed. Both are builder-supplied evidence; the server shows, never verifies, them.
# Every part is bounded, because Nix waits for the diff hook.

DIFF_TIMEOUT = 60.0
DIFF_MEMORY_MIB = 2048
DIFF_OUTPUT_MIB = 4
DIFF_READ_BYTES = 4 << 30  # file contents hashed across both trees, at most
MAX_DIFF_FILES = 1000  # differing entries listed; the totals count them all
DIFF_FORMAT = "1"
KILLED_CHILD_WAIT = 5.0


class DiffLimits:
    def __init__(self, timeout=DIFF_TIMEOUT, memory_bytes=DIFF_MEMORY_MIB << 20, output_bytes=DIFF_OUTPUT_MIB << 20,
                 read_bytes=DIFF_READ_BYTES, max_files=MAX_DIFF_FILES, diffoscope=None):
        self.timeout = timeout
        self.memory_bytes = memory_bytes
        self.output_bytes = output_bytes
        self.read_bytes = read_bytes
        self.max_files = max_files
        self.diffoscope = diffoscope  # the program, or None to run none


def diff_limits_of(env):
    return DiffLimits(timeout=positive_setting(env, "HASH_COLLECTION_DIFF_TIMEOUT", DIFF_TIMEOUT, "seconds"),
                      memory_bytes=int(positive_setting(env, "HASH_COLLECTION_DIFF_MEMORY_MIB", DIFF_MEMORY_MIB, "MiB")) << 20,
                      output_bytes=int(positive_setting(env, "HASH_COLLECTION_DIFF_OUTPUT_MIB", DIFF_OUTPUT_MIB, "MiB")) << 20,
                      diffoscope=diffoscope_program(env))


def positive_setting(env, name, default, unit):
    """A positive number from the environment, the default when unset; ConfigError naming it otherwise."""
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive number of {unit}, got {text!r}")
    return value


def diffoscope_program(env):
    """HASH_COLLECTION_DIFFOSCOPE (a program, or 'none'), else diffoscope on the PATH, else None."""
    import shutil
    chosen = env.get("HASH_COLLECTION_DIFFOSCOPE", "").strip()
    if chosen.lower() in ("none", "off", "0"):
        return None
    return shutil.which(chosen or "diffoscope", path=env.get("PATH", os.defpath))


def tree_entries(root):
    """(name components, description, path) of root and all below it, in NAR order; symlinks are not followed."""
    # Pre-order with sorted children is the order of the component tuples, so two walks merge.
    stack = [((), os.fsencode(root))]
    while stack:
        parts, path = stack.pop()
        description, children = describe_node(path)
        yield parts, description, path
        stack.extend((parts + (name,), os.path.join(path, name)) for name in reversed(children))


def describe_node(path):
    """({type, size, executable, target} of one node, its sorted children), as the NAR walk sees it."""
    try:
        info = os.lstat(path)
    except OSError:
        return {"type": "unreadable"}, []
    if stat.S_ISLNK(info.st_mode):
        try:
            return {"type": "symlink", "target": shown_name(os.readlink(path))}, []
        except OSError:
            return {"type": "symlink", "unreadable": True}, []
    if stat.S_ISDIR(info.st_mode):
        try:
            return {"type": "directory"}, sorted(os.listdir(path))
        except OSError:
            return {"type": "directory", "unreadable": True}, []
    if stat.S_ISREG(info.st_mode):
        return {"type": "regular", "size": info.st_size, "executable": bool(info.st_mode & stat.S_IXUSR)}, []
    return {"type": "other"}, []


def shown_name(raw):
    """File names are bytes; the diff shows them as text, undecodable bytes as \\xNN."""
    return raw.decode("utf-8", "backslashreplace")


def merged_trees(root_a, root_b):
    """(components, entry of A or None, entry of B or None) over both trees at once."""
    walk_a, walk_b = tree_entries(root_a), tree_entries(root_b)
    a, b = next(walk_a, None), next(walk_b, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            yield a[0], a, None
            a = next(walk_a, None)
        elif a is None or b[0] < a[0]:
            yield b[0], None, b
            b = next(walk_b, None)
        else:
            yield a[0], a, b
            a, b = next(walk_a, None), next(walk_b, None)


def changed_aspects(a, b):
    """What differs between two sides of one path: ['only in A'], ['type'], ['size', 'contents'], ….

    A side is None when the path is missing there. Also used by web.py to label the file table.
    """
    if a is None or b is None:
        return ["only in B" if a is None else "only in A"]
    if a.get("type") != b.get("type"):
        return ["type"]
    aspects = [aspect for key, aspect in (("size", "size"), ("executable", "executable bit"), ("target", "target"))
               if a.get(key) != b.get(key)]
    if a.get("sha256") and b.get("sha256") and a["sha256"] != b["sha256"]:
        aspects.append("contents")
    if a.get("unreadable") or b.get("unreadable"):
        aspects.append("unreadable")
    return aspects


class ReadBudget:
    """Bytes left to hash and the time to do it in."""

    def __init__(self, read_bytes, deadline):
        self.bytes_left = read_bytes
        self.deadline = deadline
        self.bytes_read = 0

    def time_is_up(self):
        return time.monotonic() > self.deadline


def file_sha256(path, budget):
    """Hex SHA-256 of a regular file, or None when it cannot be read or the budget runs out."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    digest = hashlib.sha256()
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        while chunk := handle.read(max(min(1 << 20, budget.bytes_left), 0)):
            digest.update(chunk)
            budget.bytes_left -= len(chunk)
            budget.bytes_read += len(chunk)
            if budget.time_is_up():
                return None
        if budget.bytes_left <= 0 and handle.read(1):
            return None
    return digest.hexdigest()


def hash_if_sizes_match(entry_a, entry_b, budget):
    """Hash both files only when nothing cheaper tells them apart."""
    a, b = entry_a[1], entry_b[1]
    if not (a["type"] == b["type"] == "regular" and a["size"] == b["size"]):
        return True
    a["sha256"] = file_sha256(entry_a[2], budget)
    b["sha256"] = file_sha256(entry_b[2], budget)
    return a["sha256"] is not None and b["sha256"] is not None


def file_diff(root_a, root_b, limits, deadline):
    """{differing: [{path, a, b}], totals, cut}: only what differs, plus totals; cut says what was left out."""
    budget = ReadBudget(limits.read_bytes, deadline)
    differing, cut = [], []
    totals = dict.fromkeys(("paths_a", "paths_b", "differing", "not_compared", "bytes_read"), 0)
    for parts, entry_a, entry_b in merged_trees(root_a, root_b):
        if budget.time_is_up():
            cut.append(f"the walk stopped after {limits.timeout:g} s; later paths are not listed")
            break
        totals["paths_a"] += entry_a is not None
        totals["paths_b"] += entry_b is not None
        if entry_a and entry_b and not hash_if_sizes_match(entry_a, entry_b, budget):
            totals["not_compared"] += 1
        aspects = changed_aspects(entry_a and entry_a[1], entry_b and entry_b[1])
        if not aspects:
            continue
        totals["differing"] += 1
        if len(differing) < limits.max_files:
            differing.append({"path": "/".join(map(shown_name, parts)) or ".",
                              "a": entry_a and entry_a[1], "b": entry_b and entry_b[1]})
    totals["bytes_read"] = budget.bytes_read
    if totals["differing"] > len(differing):
        cut.append(f"only the first {len(differing)} of {totals['differing']} differing paths are listed")
    if totals["not_compared"]:
        cut.append(f"{totals['not_compared']} files of equal size were not compared: unreadable, "
                   f"or past the {limits.read_bytes >> 20} MiB read budget")
    return {"differing": differing, "totals": totals, "cut": cut}


def run_bounded(command, limits, deadline):
    """(stdout, exit status or None, why it was cut or None) of a command held to the diff limits.

    Its own process group, so a timeout or overflow kills whatever it started too;
    an address-space cap, so a runaway allocation fails inside it instead of on the builder.
    """
    import resource  # noqa: F401 - imported before the fork; the child only calls it
    import selectors
    import subprocess
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True, preexec_fn=address_space_limit(limits.memory_bytes))
    output, errors, cut = bytearray(), bytearray(), None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        selector.register(process.stderr, selectors.EVENT_READ)
        while selector.get_map() and cut is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                cut = f"stopped after {limits.timeout:g} s"
                break
            for key, _events in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    selector.unregister(key.fileobj)
                elif key.fileobj is process.stdout:
                    output += chunk
                    if len(output) > limits.output_bytes:
                        del output[limits.output_bytes:]
                        cut = f"output cut at {limits.output_bytes >> 20} MiB"
                else:
                    errors = (errors + chunk)[-4096:]
    status = finish_process_group(process, None if cut else deadline)
    process.stdout.close()
    process.stderr.close()
    if status is None and cut is None:
        cut = f"stopped after {limits.timeout:g} s"
    return bytes(output), status, cut or last_line(errors)


def address_space_limit(limit_bytes):
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))
    return limit


def finish_process_group(process, deadline):
    """The exit status, or None when it had to be killed; nothing of its group survives."""
    import signal
    import subprocess
    status = None
    if deadline is not None:
        try:
            status = process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if status is None:
        process.wait(timeout=KILLED_CHILD_WAIT)
    return status


def last_line(errors):
    lines = bytes(errors).decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else None


def diffoscope_of(path_a, path_b, limits, deadline):
    """(diffoscope's text or None, a note on what happened or None, its version or None)."""
    if limits.diffoscope is None:
        return None, "diffoscope is not installed", None
    version, _status, _problem = run_bounded([limits.diffoscope, "--version"], limits,
                                             min(deadline, time.monotonic() + 10))
    command = [limits.diffoscope, "--text", "-", "--no-progress", "--max-text-report-size", str(limits.output_bytes),
               os.fsdecode(path_a), os.fsdecode(path_b)]
    output, status, problem = run_bounded(command, limits, deadline)
    text = output.decode("utf-8", "replace") or None
    # Status 1 means "differences found", which diffoscope always prints; without text it is a crash.
    if status not in (0, 1) or (status == 1 and text is None):
        note = f"diffoscope {'exited with status ' + str(status) if status is not None else 'was stopped'}"
        return text, f"{note}: {problem}" if problem else note, version_of(version)
    return text, None, version_of(version)


def version_of(output):
    words = output.decode("utf-8", "replace").split()
    return shorten(words[-1], 40) if words else None


def diff_document(path_a, path_b, limits):
    """The upload body of PUT /diffs/…: the file-level diff of A and B, and diffoscope's text when there is one."""
    deadline = time.monotonic() + limits.timeout
    files = file_diff(path_a, path_b, limits, deadline)
    text, note, version = diffoscope_of(path_a, path_b, limits, deadline)
    return {"files": files, "diffoscope": text, "diffoscope_note": note,
            "tool_versions": {"hash-collection-diff": DIFF_FORMAT, "diffoscope": version}}


def deliver_diff(config, env, delivery, out_path, check_path, check_hash, started):
    """The diff hook's second task, after the attestation: diff out_path and its rebuild, and send it.

    The local work has its own budget (HASH_COLLECTION_DIFF_TIMEOUT); the upload gets what is left
    of the network budget, so the hook ends within the two together. Undelivered, it is spooled
    like any submission.
    """
    limits = diff_limits_of(env)
    diff_started = time.monotonic()
    original_hash, _size = nar_hash_and_size(out_path)
    if original_hash == check_hash:
        return
    (hash_a, path_a), (hash_b, path_b) = sorted([(original_hash, out_path), (check_hash, check_path)])
    submission = new_diff_submission(out_path, hash_a, hash_b, diff_document(path_a, path_b, limits))
    upload = Delivery(config, started + (time.monotonic() - diff_started))
    upload.stopped_because = delivery.stopped_because
    # The attestation's delivery, just before, went through the spools already.
    deliver_submission(config, submission, upload, with_spools=False)


def new_diff_submission(out_path, hash_a, hash_b, document):
    """A diff as a submission; diffoscope's text is left out when the whole would not fit a spooled file."""
    submission = {"out_path": out_path, "hash_a": hash_a, "hash_b": hash_b, "diff": document}
    if len(json.dumps(submission).encode()) > DIFF_SUBMISSION_CAP:
        submission["diff"] = {**document, "diffoscope": None,
                              "diffoscope_note": "diffoscope's text was left out to fit the spool"}
    return submission


# ---------------------------------------------------------------- HTTP with a deadline

class HttpError(Exception):
    """No usable answer: the connection failed, the deadline passed or the answer was too large."""


def parsed_json(text):
    """json.loads of text from elsewhere (a server, a spool, a state file): ValueError for anything that is not
    JSON, which includes NaN and Infinity (no JSON encoder takes them back: a spooled one could never be sent) and
    nesting too deep for the parser, whose RecursionError nothing would catch."""
    try:
        return json.loads(text, parse_constant=refuse_json_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def refuse_json_constant(name):
    raise ValueError(f"{name} is not a JSON number")


class Answer:
    """A complete HTTP answer, read within its deadline and size cap."""

    def __init__(self, status_code, reason, headers, body):
        self.status_code = status_code
        self.reason = reason
        self.headers = headers
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return parsed_json(self.body)


def http_request(method, url, seconds, max_bytes, **kwargs):
    """One HTTP exchange that ends within `seconds` whatever the peer does, with at most max_bytes of body.

    requests' timeouts bound each read, so a peer sending a byte now and then could hold
    a call forever; a watchdog shuts the socket down at the deadline instead. Redirects
    are never followed: a write must reach the server it was meant for, and a redirect
    loop must not spend the budget.
    """
    import requests
    import urllib3
    if seconds <= 0:
        raise HttpError(f"no time left for {url}")
    watchdog = Watchdog(seconds)
    try:
        with watchdog:
            response = http_session().request(method, url, stream=True, allow_redirects=False,
                                              timeout=(seconds, seconds), **kwargs)
            with response:
                body = capped_body(response, max_bytes, watchdog)
    # urllib3's own errors too: capped_body reads the body from urllib3, below requests, which translated them.
    except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
        if watchdog.expired:
            raise HttpError(f"no complete answer from {url} within {seconds:g} s") from None
        raise HttpError(f"cannot reach {url}: {failure_in_words(error)}") from None
    return Answer(response.status_code, response.reason, response.headers, body)


def failure_in_words(error):
    """'connection refused', 'name or service not known': the operating system's reason at the
    bottom of requests' and urllib3's exception chain, else requests' own message."""
    for cause in exception_chain(error):
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror[:1].lower() + cause.strerror[1:]
    return shorten(str(error), 200)


def exception_chain(error):
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        reason = getattr(error, "reason", None)
        wrapped = error.args[0] if error.args and isinstance(error.args[0], BaseException) else None
        error = error.__cause__ or error.__context__ or (reason if isinstance(reason, BaseException) else wrapped)


def capped_body(response, max_bytes, watchdog):
    """At most max_bytes of the answer's body, decoded: the cap holds for what a compressed body decodes to, not
    for the bytes sent (4 MB of gzip are 4 GiB of zeros), so a body is decoded here, a bounded piece at a time."""
    body, decode = bytearray(), body_decoder(response)
    for chunk in response.raw.stream(64 << 10, decode_content=False):
        body += decode(chunk, max_bytes + 1 - len(body))
        if len(body) > max_bytes:
            raise HttpError(f"the answer from {response.url} is larger than {max_bytes} bytes")
        if watchdog.expired:
            break
    if watchdog.expired:
        raise HttpError(f"no complete answer from {response.url} within {watchdog.seconds:g} s")
    return bytes(body)


def body_decoder(response):
    """decode(chunk, at most) of the answer's Content-Encoding: gzip, deflate or none. At most `at most` bytes come
    of one chunk (and zlib keeps the rest), which capped_body makes one more than the cap allows."""
    import zlib
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding in ("", "identity"):
        return lambda chunk, _at_most: chunk
    if encoding not in ("gzip", "x-gzip", "deflate"):
        raise HttpError(f"the answer from {response.url} is in Content-Encoding {shorten(encoding)!r}, which this client"
                        " neither asked for nor reads")
    decompressor = zlib.decompressobj(zlib.MAX_WBITS | 32 if "gzip" in encoding else zlib.MAX_WBITS)

    def decode(chunk, at_most):
        try:
            return decompressor.decompress(chunk, max(at_most, 1))
        except zlib.error as error:
            raise HttpError(f"the answer from {response.url} is not valid {encoding}: {error}") from None
    return decode


WATCHED = None  # per thread: the Watchdog of the request running in it


class Watchdog:
    """Shuts down the connection of this thread's request when its time is up, waking any blocked read."""

    def __init__(self, seconds):
        import threading
        self.seconds = seconds
        self.ends = time.monotonic() + seconds
        self.expired = False
        self.sockets = []
        self.timer = threading.Timer(seconds, self.expire)
        self.timer.daemon = True

    def __enter__(self):
        watched().watchdog = self
        self.timer.start()
        return self

    def __exit__(self, *exc_info):
        self.timer.cancel()
        watched().watchdog = None

    def watch(self, connection):
        # The socket itself, not the connection: http.client lets go of it when the
        # answer ends the connection, and the body is then read through the answer.
        sock = getattr(connection, "sock", None)
        if sock is not None and sock not in self.sockets:
            self.sockets.append(sock)
        if self.expired:
            self.expire()

    def expire(self):
        import socket
        self.expired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed


def watched():
    global WATCHED
    import threading
    if WATCHED is None:
        WATCHED = threading.local()
    return WATCHED


def addresses_within_deadline(host, port):
    """The addresses of host, in getaddrinfo's order, or OSError; an address is itself. Resolved in a thread
    of its own and waited for until the thread's Watchdog ends: a resolver that never answers held the hook
    for ten seconds or more past its budget."""
    import ipaddress
    import socket
    import threading
    with contextlib.suppress(ValueError):
        return [str(ipaddress.ip_address(host.strip("[]")))]
    found = {}

    def resolve():
        try:
            found["addresses"] = list(dict.fromkeys(
                info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError as error:
            found["error"] = error
    resolver = threading.Thread(target=resolve, daemon=True)
    resolver.start()
    watchdog = getattr(watched(), "watchdog", None)
    resolver.join(None if watchdog is None else max(0.0, watchdog.ends - time.monotonic()))
    if resolver.is_alive():
        raise socket.timeout(f"no address for {host} within the deadline")
    if "error" in found:
        raise found["error"]
    return found["addresses"] or [host]


def watched_connection_classes():
    """urllib3 connection pools whose connections show themselves to the thread's Watchdog."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
    from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

    def show(connection):
        watchdog = getattr(watched(), "watchdog", None)
        if watchdog is not None:
            watchdog.watch(connection)

    class WatchedHTTPConnection(HTTPConnection):
        def connect(self):
            show(self)
            super().connect()
            show(self)

        def _new_conn(self):
            """The socket, to each address of the host in turn once they are known within the deadline: name
            resolution comes before any socket that the Watchdog could shut down. urllib3 connects to _dns_host,
            which is also the host it names in Host: and checks TLS certificates against, so it holds an address
            only while the socket is made."""
            host, failure = self._dns_host, None
            for address in addresses_within_deadline(host, self.port):
                self._dns_host = address
                try:
                    return super()._new_conn()
                except (NewConnectionError, ConnectTimeoutError) as error:
                    failure = error
                finally:
                    self._dns_host = host
            raise failure

        def request(self, *args, **kwargs):
            show(self)
            return super().request(*args, **kwargs)

    class WatchedHTTPSConnection(WatchedHTTPConnection, HTTPSConnection):
        pass

    class WatchedHTTPPool(HTTPConnectionPool):
        ConnectionCls = WatchedHTTPConnection

    class WatchedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = WatchedHTTPSConnection

    return {"http": WatchedHTTPPool, "https": WatchedHTTPSPool}


def watched_session():
    import requests
    pools = watched_connection_classes()

    class WatchedAdapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, *args, **kwargs):
            manager = super().proxy_manager_for(*args, **kwargs)
            manager.pool_classes_by_scheme = pools
            return manager

    session = requests.Session()
    for scheme in ("http://", "https://"):
        session.mount(scheme, WatchedAdapter())
    session.headers["Accept-Encoding"] = "identity"  # a compressed answer is decoded under the cap (capped_body)
    return session


def http_session():
    """One session per thread (sessions are not safe to share), each request watched by its deadline."""
    local = watched()
    if getattr(local, "session", None) is None:
        local.session = watched_session()
    return local.session


# ---------------------------------------------------------------- submissions

# A submission is what the hooks send in one request: the attestations of one
# derivation's outputs (POST /attestation/<drv_ident>), or the diff hook's diff of an
# output and its rebuild (PUT /diffs/...). ("Report" is the server's SBOM report.)
SUBMISSION_CAP = 1 << 20  # bytes of one spooled file of attestations
DIFF_SUBMISSION_CAP = 8 << 20  # bytes of one spooled diff
SUBMISSION_FIELDS = ("drv_ident", "attestations")


def attestation(info, secret_key, source):
    """One output in lila's field names, plus what a verifier needs to rebuild the fingerprint,
    and where the hash came from ("build" or "check"; older servers ignore it)."""
    digest, name = parse_store_path(info.out_path)
    entry = {"output_digest": digest, "output_name": name, "output_hash": info.nar_hash,
             "output_sig": "", "nar_size": info.nar_size, "source": source}
    if info.references is None:
        return entry
    entry["references"] = sorted(info.references)
    if info.ca:
        entry["ca"] = info.ca
    if secret_key:
        entry["output_sig"] = sign_fingerprint(
            secret_key, fingerprint(info.out_path, info.nar_hash, info.nar_size, info.references))
    return entry


def new_submission(drv_path, attestations):
    return {"drv_ident": drv_ident_of(drv_path), "attestations": attestations}


def parse_submission(raw):
    """The submission in a spooled file's bytes, or ValueError saying why the file is set aside."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"it is not UTF-8 ({error.reason} at byte {error.start})") from None
    try:
        submission = parsed_json(text)
    except ValueError as error:
        raise ValueError(f"it is not JSON ({error})") from None
    if not isinstance(submission, dict):
        raise ValueError(f"expected a JSON object with {' and '.join(SUBMISSION_FIELDS)}, "
                         f"got a JSON {type(submission).__name__}")
    if "diff" in submission:
        return parse_diff_submission(submission)
    if len(raw) > SUBMISSION_CAP:
        raise ValueError(f"it is larger than {SUBMISSION_CAP} bytes")
    try:
        parse_store_basename(submission.get("drv_ident"))
    except ValueError as error:
        raise ValueError(f"drv_ident: {error}") from None
    attestations = submission.get("attestations")
    if not isinstance(attestations, list) or not attestations \
            or not all(isinstance(entry, dict) for entry in attestations):
        raise ValueError("attestations: expected a non-empty JSON list of objects")
    return {"drv_ident": submission["drv_ident"], "attestations": attestations}


def parse_diff_submission(submission):
    try:
        parse_store_path(submission.get("out_path"))
        hashes = [normalize_nar_hash(submission.get(field)) for field in ("hash_a", "hash_b")]
    except (ValueError, TypeError) as error:
        raise ValueError(f"diff: {error}") from None
    if not isinstance(submission["diff"], dict):
        raise ValueError("diff: expected a JSON object")
    return {"out_path": submission["out_path"], "hash_a": hashes[0], "hash_b": hashes[1], "diff": submission["diff"]}


def described(submission):
    """How messages name a submission."""
    if "diff" in submission:
        return f"diff of {submission['out_path']}"
    return f"submission for {submission['drv_ident']}"


# ---------------------------------------------------------------- reading spooled files

SPOOLED_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class SpooledFile:
    """One entry of a spool directory: its submission, or the problem that sets it aside."""

    def __init__(self, name, identity, submission=None, problem=None):
        self.name = name
        self.identity = identity  # name, inode, size and mtime: tells a rewritten file from the one seen before
        self.submission = submission
        self.problem = problem


def read_spooled_file(directory_fd, name, may_own):
    """The only way a spool entry is read. None when it has gone (a concurrent run delivered it).

    A spool may hold anything a build user put there: the entry is opened relative to
    the directory, without following a symbolic link and without waiting on a FIFO,
    and read only if it is a regular file of an allowed owner and at most DIFF_SUBMISSION_CAP bytes
    (SUBMISSION_CAP unless it is a diff).
    """
    try:
        seen = os.stat(name, dir_fd=directory_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    try:
        descriptor = os.open(name, SPOOLED_FILE_FLAGS, dir_fd=directory_fd)
    except FileNotFoundError:
        return None
    except OSError as error:
        return SpooledFile(name, identity_of(name, seen), problem=f"cannot open it as a plain file ({error.strerror})")
    with os.fdopen(descriptor, "rb") as handle:
        opened = os.fstat(descriptor)
        spooled = SpooledFile(name, identity_of(name, opened))
        if not stat.S_ISREG(opened.st_mode):
            spooled.problem = "it is not a regular file"
        elif not may_own(opened.st_uid):
            spooled.problem = f"it belongs to uid {opened.st_uid}, who may not submit through this spool"
        else:
            raw = handle.read(DIFF_SUBMISSION_CAP + 1)
            spooled.problem = f"it is larger than {DIFF_SUBMISSION_CAP} bytes" if len(raw) > DIFF_SUBMISSION_CAP else None
    if spooled.problem is None:
        try:
            spooled.submission = parse_submission(raw)
        except ValueError as error:
            spooled.problem = str(error)
    return spooled


def identity_of(name, info):
    return f"{name}/{info.st_ino}/{info.st_size}/{info.st_mtime_ns}"


def open_directory(path):
    """A descriptor of the directory at path, not of a symbolic link's target."""
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def submission_names(directory_fd, limit=None):
    """Names of spooled submissions, oldest first (the names begin with the time); with a limit, at most that many,
    from at most ENTRIES_SCANNED_PER_NAME times as many entries of any name."""
    names = []
    with os.scandir(directory_fd) as entries:
        for scanned, entry in enumerate(entries, 1):
            if entry.name.endswith(".json"):
                names.append(entry.name)
            if limit is not None and (len(names) >= limit or scanned >= limit * ENTRIES_SCANNED_PER_NAME):
                break
    return sorted(names)


ENTRIES_SCANNED_PER_NAME = 10  # in the build users' spool, where a build may leave a million other names


# ---------------------------------------------------------------- the spool

class UnsafeSpool(ConfigError):
    """The spool could be changed by someone else: this process neither writes nor reads it."""


class Spool:
    """This process's own undelivered submissions, one JSON file each, oldest first.

    File names are made here (time and random digits), never from a submission,
    so they stay short and inside the spool. Files appear by rename from tmp/, so a
    reader never sees half a submission. rejected/ keeps what will never be delivered.
    """

    def __init__(self, directory):
        self.directory = directory

    def check(self):
        """Raise UnsafeSpool unless only this user (or root) can change the spool; create it if missing."""
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
        except OSError as error:
            raise UnsafeSpool(f"spool {self.directory} is not writable ({error.strerror}, {running_as()})") from None
        problem = spool_problem(self.directory)
        if problem:
            raise UnsafeSpool(f"refusing to use the spool {self.directory}: {problem}")

    def submission_files(self):
        try:
            descriptor = open_directory(self.directory)
        except FileNotFoundError:
            return []
        try:
            return [os.path.join(self.directory, name) for name in submission_names(descriptor)]
        finally:
            os.close(descriptor)

    def add(self, submission):
        return self.write(new_spool_name(), submission)

    def add_rejected(self, submission, reason):
        """Kept with the server's reason, so it is neither lost nor retried forever."""
        return self.write(new_spool_name(), {**submission, "rejected": reason}, subdirectory="rejected")

    def reject(self, name, submission, reason):
        self.add_rejected(submission, reason)
        self.remove(name)

    def set_aside(self, name, reason):
        """Move an entry that is not a submission to rejected/, under the same (existing, so valid) name."""
        rejected = self.subdirectory("rejected")
        os.replace(os.path.join(self.directory, name), os.path.join(rejected, name))
        say(f"moved {name} to {rejected}/: {reason}")

    def remove(self, name):
        try:
            os.unlink(os.path.join(self.directory, name))
        except FileNotFoundError:
            pass  # another hook run delivered it at the same time

    def subdirectory(self, name):
        path = os.path.join(self.directory, name)
        if self.is_shared():
            # Every build user's diff hook writes here: one's own 0700 directory (versions before made them so)
            # would shut the others out.
            with contextlib.suppress(FileExistsError):
                os.mkdir(path)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o2770:
                os.chmod(path, 0o2770)
        else:
            os.makedirs(path, mode=0o700, exist_ok=True)
        return path

    def is_shared(self):
        try:
            return is_shared_spool(os.lstat(self.directory))
        except FileNotFoundError:
            return False  # made by os.makedirs, as this user's own

    def write(self, name, content, subdirectory=None):
        import tempfile
        final_path = os.path.join(self.subdirectory(subdirectory) if subdirectory else self.directory, name)
        descriptor, tmp_path = tempfile.mkstemp(dir=self.subdirectory("tmp"), suffix=".json")
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(content, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(tmp_path, final_path)
        except BaseException:
            os.unlink(tmp_path)
            raise
        return final_path


def new_spool_name():
    # The time first, so that sorting the names gives the oldest submission first.
    return f"{time.time_ns()}-{os.urandom(8).hex()}.json"


SPOOL_SUBDIRECTORIES = ("tmp", "rejected", "log")


def spool_problem(directory):
    """Why someone other than this user could change the spool, or None."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a directory (a symbolic link?)"
    if info.st_uid not in (os.geteuid(), 0):
        return f"it belongs to uid {info.st_uid}"
    writable_by_others = 0o022 if os.geteuid() == 0 else 0o002
    if info.st_mode & writable_by_others:
        return (f"others can write it (mode {stat.filemode(info.st_mode)}); "
                f"make it {'root-owned 0700' if os.geteuid() == 0 else 'not world-writable'}")
    # Left from the shared spool of old versions, a symbolic link here, or a directory of a build
    # user's with links in it, would let a build user steer root's writes. In the build users' spool, which
    # a build user's diff hook shares with the others (is_shared_spool), a directory another one made is
    # as trusted as the spool itself.
    for name in SPOOL_SUBDIRECTORIES:
        try:
            inner = os.lstat(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        if not stat.S_ISDIR(inner.st_mode):
            return f"{name} in it is not a directory (a symbolic link?); move it away"
        if inner.st_uid != info.st_uid and not is_shared_spool(info):
            return f"{name} in it belongs to uid {inner.st_uid}, not to the spool's owner; move it away"
    return None


def is_shared_spool(info):
    """Whether a spool directory (its lstat) is the build users' one as a build user sees it: another's (root's)
    that this user may write as a member of its group. Never root's own: root refuses a spool others can write."""
    return info.st_uid != os.geteuid() and bool(info.st_mode & stat.S_IWGRP)


# ---------------------------------------------------------------- delivery

DELIVERED, REJECTED, KEPT = "delivered", "rejected", "kept"
# Answers that mean "never": anything else (a 404 from a mistyped URL, 401, 5xx) may heal.
REJECTING_STATUSES = (400, 413, 422)
SUBMISSION_ANSWER_CAP = 64 << 10
ATTESTATIONS_ANSWER_CAP = 1 << 20  # every builder's attestations of one output


class Delivery:
    """Posts submissions one by one until the server is unreachable or, for a hook, the time budget is spent."""

    def __init__(self, config, started=None):
        """With started (a time.monotonic()), the whole run from then on gets config.timeout; else each request does."""
        self.config = config
        self.deadline = None if started is None else started + config.timeout - FINISHING_TIME
        self.stopped_because = None

    def post(self, submission):
        """(DELIVERED | REJECTED | KEPT, reason) of one submission; a bad answer for one does not stop the next."""
        import requests  # noqa: F401 - before measuring what is left: the import alone takes a tenth of a second
        if self.out_of_time():
            return KEPT, self.stopped_because
        remaining = self.time_left()
        method, url, body = submission_request(self.config.server, submission)
        try:
            answer = http_request(method, url, remaining, SUBMISSION_ANSWER_CAP, json=body,
                                  headers={"Authorization": f"Bearer {self.config.token}"})
        except HttpError as error:
            self.stopped_because = f"{self.config.server} unreachable: {error}"
            return KEPT, self.stopped_because
        if 200 <= answer.status_code < 300:
            if "attestations" in submission:
                record_log_indexes(self.config.spool, submission["attestations"], answer)
            return DELIVERED, None
        if 300 <= answer.status_code < 400:
            return KEPT, redirect_reason(answer)
        reason = server_reason(answer)
        return (REJECTED if answer.status_code in REJECTING_STATUSES else KEPT), reason

    def out_of_time(self):
        """Whether delivery has stopped: the server is unreachable or the run's time budget is spent. Asked before
        each spooled file too, as reading one that is never posted (set aside) also takes time."""
        if self.stopped_because is None and self.deadline is not None and self.time_left() <= 0:
            self.stopped_because = f"the {self.config.timeout:g} s time budget is spent"
        return self.stopped_because is not None

    def time_left(self):
        if self.deadline is None:
            return self.config.timeout
        return self.deadline - time.monotonic()


def submission_request(server, submission):
    """(method, URL, JSON body) that delivers a submission."""
    # A diff answered 403 is kept, not set aside: the attestation that allows it may still wait in a spool.
    if "diff" in submission:
        segments = (basename_of(submission["out_path"]), submission["hash_a"], submission["hash_b"])
        return "PUT", "/".join([server, "diffs", *map(quoted, segments)]), submission["diff"]
    return "POST", attestation_url(server, submission["drv_ident"]), submission["attestations"]


def quoted(segment):
    from urllib.parse import quote
    return quote(segment, safe="")


def attestation_url(server, drv_ident):
    return f"{server}/attestation/{quoted(drv_ident)}"


def redirect_reason(answer):
    # A POST that follows a redirect may land somewhere that answers 200 without storing anything.
    return (f"HTTP {answer.status_code}: redirected to {shorten(answer.headers.get('Location', '?'))}, which a "
            f"submission does not follow; set HASH_COLLECTION_SERVER to the address that answers")


def server_reason(response):
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return f"HTTP {response.status_code}: {error or response.text.strip()[:200] or response.reason}"


def deliver_spool(spool, delivery):
    """Send this process's spooled submissions, oldest first, until delivery stops."""
    descriptor = open_directory(spool.directory)
    try:
        for name in submission_names(descriptor):
            if delivery.out_of_time():
                return
            # Not owned by us: left from the shared spool of old versions. Read like anything else, with care.
            spooled = read_spooled_file(descriptor, name, may_own=lambda uid: True)
            if spooled is None:
                continue
            if spooled.problem:
                spool.set_aside(name, spooled.problem)
                continue
            outcome, reason = delivery.post(spooled.submission)
            if outcome == DELIVERED:
                spool.remove(name)
            elif outcome == REJECTED:
                spool.reject(name, spooled.submission, reason)
                say(f"server rejected {name}, moved to {spool.directory}/rejected/: {reason}")
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------- root reading the build users' spool

BUILD_USER_FILES_PER_RUN = 1000
LEDGER_CAP = 16 << 20  # bytes: BUILD_USER_FILES_PER_RUN entries are far less
LEDGER_NAME = "build-user-spool.ledger"  # in root's own spool; not *.json, so never taken for a submission


class BuildUserSpool:
    """The diff hook's spool, seen by root: read through read_spooled_file only, never written, renamed or deleted.

    What root delivers or sets aside is remembered in a ledger in root's own spool,
    so root sends each file once; what the server does not take stays for the build users' own retries.
    """

    def __init__(self, directory, group, own_spool):
        self.directory = directory
        self.group = group
        self.ledger_path = os.path.join(own_spool.directory, LEDGER_NAME)
        self.own_spool = own_spool
        self.counts = dict.fromkeys((DELIVERED, REJECTED, KEPT), 0)

    def deliver(self, delivery):
        try:
            descriptor = open_directory(self.directory)
        except FileNotFoundError:
            return
        may_own = build_user_ids(self.group).__contains__
        ledger, kept_ledger = self.read_ledger(), {}
        try:
            for name in submission_names(descriptor, limit=BUILD_USER_FILES_PER_RUN):
                if delivery.out_of_time():
                    break
                self.deliver_one(descriptor, name, may_own, delivery, ledger, kept_ledger)
        finally:
            os.close(descriptor)
        if kept_ledger != ledger:
            self.write_ledger(kept_ledger)

    def deliver_one(self, descriptor, name, may_own, delivery, ledger, kept_ledger):
        try:
            identity = identity_of(name, os.stat(name, dir_fd=descriptor, follow_symlinks=False))
        except FileNotFoundError:
            return
        if identity in ledger:
            kept_ledger[identity] = ledger[identity]
            return
        spooled = read_spooled_file(descriptor, name, may_own)
        if spooled is None:
            return
        if spooled.problem:
            outcome, reason = REJECTED, spooled.problem
        else:
            outcome, reason = delivery.post(spooled.submission)
        self.counts[outcome] += 1
        if outcome != KEPT:
            kept_ledger[spooled.identity] = outcome if reason is None else f"{outcome}: {reason}"
        if outcome == REJECTED:
            say(f"skipped {self.directory}/{name}, left for the build users: {reason}")

    def read_ledger(self):
        # Not a plain open(): a link or FIFO left under this name in the old shared spool must not hang root.
        try:
            descriptor = os.open(self.ledger_path, SPOOLED_FILE_FLAGS)
        except OSError:
            return {}
        with os.fdopen(descriptor, "rb") as handle:
            opened = os.fstat(descriptor)
            if not stat.S_ISREG(opened.st_mode) or opened.st_uid != os.geteuid():
                return {}
            raw = handle.read(LEDGER_CAP + 1)
        try:
            ledger = parsed_json(raw) if len(raw) <= LEDGER_CAP else {}
        except ValueError:
            return {}
        return ledger if isinstance(ledger, dict) else {}

    def write_ledger(self, ledger):
        # Only files still present are remembered, so the ledger stays as small as the build users' spool.
        self.own_spool.write(LEDGER_NAME, ledger)


def build_user_ids(group_name):
    """The uids of the build users: the members of the group and the users whose primary group it is."""
    import grp
    import pwd
    try:
        group = grp.getgrnam(group_name)
    except KeyError:
        raise ConfigError(f"HASH_COLLECTION_BUILD_USERS_GROUP: there is no group {group_name!r}") from None
    uids = {user.pw_uid for user in pwd.getpwall() if user.pw_gid == group.gr_gid or user.pw_name in group.gr_mem}
    uids.discard(0)  # root is never a build user, whatever the group file says
    return uids


def deliver_spools(config, delivery):
    """Deliver what waits in this process's spool and, for root, in the build users' spool."""
    spool = Spool(config.spool)
    reads_build_users = bool(config.build_user_spool) and \
        os.path.abspath(config.build_user_spool) != os.path.abspath(spool.directory)
    if not reads_build_users and not os.path.lexists(spool.directory):
        return None  # nothing waits, and the spool is made only when something must wait
    spool.check()
    deliver_spool(spool, delivery)
    if not reads_build_users:
        return None
    build_user_spool = BuildUserSpool(config.build_user_spool, config.build_users_group, spool)
    build_user_spool.deliver(delivery)
    return build_user_spool


def deliver_submission(config, submission, delivery, with_spools=True):
    """The hooks' delivery: this submission first, then what waits; spool it if it was not delivered."""
    outcome, reason = delivery.post(submission)
    try:
        if with_spools:
            deliver_spools(config, delivery)
    except Exception as error:  # whatever a spool holds, this build's own submission is kept below
        say(f"spooled submissions not delivered this time: {error if isinstance(error, (OSError, ConfigError)) else repr(error)}")
    if outcome == DELIVERED:
        return
    spool = Spool(config.spool)
    try:
        spool.check()
        if outcome == REJECTED:
            kept = spool.add_rejected(submission, reason)
            say(f"server rejected the {described(submission)}, kept in {kept}: {reason}")
            return
        spool.add(submission)
    except (OSError, UnsafeSpool) as error:
        say(f"{described(submission)} lost: not delivered ({reason}) and {error}")
        return
    say(f"{described(submission)} spooled in {spool.directory}: {reason}")


# ---------------------------------------------------------------- commands

def post_build_hook(args, env):
    """Nix's post-build-hook: attest every output of DRV_PATH."""
    started = process_started()
    drv_path = env.get("DRV_PATH", "")
    if not drv_path:
        raise ConfigError("DRV_PATH is not set: this runs as Nix's post-build-hook (or give a subcommand)")
    config = load_config(env)
    delivery = Delivery(config, started)
    # OUT_PATHS is empty for every build in Nix 2.8 (NixOS/nix#6446) and unset
    # for --check in 2.30/2.31 (NixOS/nix#14287), so fall back to the derivation.
    out_paths = env.get("OUT_PATHS", "").split() or derivation_outputs(drv_path, env)
    infos = path_infos(out_paths, env)
    warn_if_unsigned(config)
    # "build" also for a `nix-build --check` whose output matched: Nix tells the post-build hook
    # only DRV_PATH and OUT_PATHS, nothing that tells a check from a build. A check that
    # differs reaches the diff hook, which says "check".
    attestations = [attestation(info, config.secret_key, "build") for info in infos]
    deliver_submission(config, new_submission(drv_path, attestations), delivery)
    return 0


def diff_hook(args, env):
    """Nix's diff-hook: attest the rebuilt (.check) output's hash under the original output path."""
    started = process_started()
    if len(args) not in (3, 4):
        raise ConfigError(f"usage: post_build_hook.py diff-hook OUT CHECK DRV [BUILD_DIR], got {len(args)} arguments")
    out_path, check_path, drv_path = args[:3]
    parse_store_path(out_path)
    config = load_config(env)
    delivery = Delivery(config, started)
    # The .check path is not valid in the store, so hash it ourselves. Nix has
    # rewritten its self-references to out_path, so the hashes are comparable.
    nar_hash, nar_size = nar_hash_and_size(check_path)
    # The reference set is the original's: both were scanned against the same inputs.
    references, problem = known_references(config, out_path, env, delivery)
    config.key_problem = config.key_problem or problem
    warn_if_unsigned(config)
    info = PathInfo(out_path, nar_hash, nar_size, references)
    deliver_submission(config, new_submission(drv_path, [attestation(info, config.secret_key, "check")]), delivery)
    deliver_diff(config, env, delivery, out_path, check_path, nar_hash, started)
    return 0


def known_references(config, out_path, env, delivery):
    """(references of out_path, None) or (None, why they are unknown)."""
    try:
        return references_of(out_path, env), None
    except StoreQueryError as error:
        problem = f"cannot read the references of {out_path} ({running_as()}): {error}"
    # The build user often cannot reach the store's database or daemon, but our
    # own earlier attestation of out_path, signed by our key, states them.
    references = references_we_attested(config, out_path, delivery)
    return (references, None) if references is not None else (None, problem)


def references_we_attested(config, out_path, delivery):
    if not config.secret_key or delivery.time_left() <= 0:
        return None
    try:
        response = http_request("GET", by_output_url(config.server, out_path), delivery.time_left(),
                                ATTESTATIONS_ANSWER_CAP)
    except HttpError as error:
        delivery.stopped_because = f"{config.server} unreachable: {error}"
        return None
    try:
        attestations = response.json() if response.status_code == 200 else []
    except ValueError:
        return None
    public_key = public_key_of(config.secret_key)
    for attested in attestations if isinstance(attestations, list) else []:
        if is_signed_by(public_key, out_path, attested):
            return attested["references"]
    return None


def by_output_url(server, out_path):
    digest, name = parse_store_path(out_path)
    return f"{server}/attestations/by-output/{quoted(f'{digest}-{name}')}"


def is_signed_by(public_key, out_path, attested):
    try:
        message = fingerprint(out_path, attested["output_hash"], attested["nar_size"], attested["references"])
    except (KeyError, TypeError, ValueError):
        return False
    signature = attested.get("output_sig")
    return isinstance(signature, str) and signature_is_good(public_key, message, signature)


def public_key_of(secret_key):
    name, raw = parse_key(secret_key, 64)
    return f"{name}:{base64.b64encode(raw[32:]).decode()}"


def process_started():
    """time.monotonic() when this process began: Nix waits for all of it, interpreter start-up included."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as handle:
            ticks_after_boot = int(handle.read().rpartition(")")[2].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks_after_boot / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return now  # not Linux: count from here
    return now - age if 0 <= age < 60 else now


def warn_if_unsigned(config):
    if config.secret_key and not config.key_problem:
        return
    say(f"sending unsigned (output_sig \"\"): {config.key_problem}")


def flush(args, env):
    """Deliver everything in the spool (and, for root, the build users' spool); exit 1 when submissions remain."""
    config = load_config(env)
    spool = Spool(config.spool)
    before = len(spool.submission_files())
    # flush runs outside Nix's build loop: bound each request, not the whole run.
    build_user_spool = deliver_spools(config, Delivery(config))
    left = len(spool.submission_files())
    print(f"{PREFIX} {before - left} of {before} spooled submissions delivered, {left} waiting in {spool.directory}")
    if build_user_spool is None:
        return 1 if left else 0
    counts = build_user_spool.counts
    print(f"{PREFIX} from the build users' spool {build_user_spool.directory}: {counts[DELIVERED]} delivered, "
          f"{counts[REJECTED]} set aside, {counts[KEPT]} not delivered")
    return 1 if left or counts[KEPT] else 0


# ================================================================ filling reports
# fetch-from-cache, rebuild and challenge are run by hand, outside Nix's build
# loop. They may take their time, but each must finish, try every path at most
# once, and say what happened to it.

DEFAULT_SERVER = "http://localhost:8000"
DEFAULT_CACHE = "https://cache.nixos.org"
DEFAULT_CACHE_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="
DEFAULT_FETCH_JOBS = 8
PENDING_PAGE = 500  # the server's maximum page
IMPORT_BATCH = 500
TRANSIENT_TRIES = 3
BACKOFF_SECONDS = 0.5  # doubled after every failed try
NOT_DETERMINISTIC_STATUS = 104  # Nix's exit status when --check finds a different output


class TransientError(Exception):
    """A request kept failing with 5xx, timeouts or connection errors through every retry."""


def server_url(env):
    return server_setting(env) or DEFAULT_SERVER


def parse_report_arguments(command, args, default_jobs):
    """'REPORT [-j N]', with -j before or after REPORT -> (report, jobs)."""
    usage_line = f"usage: {command} REPORT [-j N]"
    report, jobs, words = None, default_jobs, list(args)
    while words:
        word = words.pop(0)
        if word in ("-j", "--jobs"):
            if not words:
                raise ConfigError(f"{usage_line}: -j needs a number")
            jobs = positive_jobs(words.pop(0), usage_line)
        elif word.startswith("-j") and len(word) > 2:
            jobs = positive_jobs(word[2:], usage_line)
        elif word.startswith("-") or report is not None:
            raise ConfigError(f"{usage_line}: unexpected argument {word!r}")
        else:
            report = word
    if not report:
        raise ConfigError(f"{usage_line}: the report name is missing")
    return report, jobs


def positive_jobs(text, usage_line):
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{usage_line}: -j expects a positive number of jobs, got {text!r}")
    return int(text)


def counted(count, noun):
    """'1 path', '2 paths'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


REPORT_COMMAND_HELP = {
    "fetch-from-cache": f"""usage: {{program}} REPORT [-j N]

Fetches <cache>/<hash>.narinfo for every open path of REPORT, verifies the
cache's signature and imports the verified hashes as the token's builder.

  -j N   fetch N narinfos at a time (default {DEFAULT_FETCH_JOBS})

Exits 1 when paths were open and none was imported, or when any path failed
or had a bad signature; "not in cache" alone is not a failure.

Environment:
  HASH_COLLECTION_TOKEN_FILE or HASH_COLLECTION_TOKEN   token of the builder that stands for the cache
  HASH_COLLECTION_SERVER      default {DEFAULT_SERVER}
  HASH_COLLECTION_CACHE       default {DEFAULT_CACHE}
  HASH_COLLECTION_CACHE_KEY   default {DEFAULT_CACHE_KEY}
""",
    "rebuild": f"""usage: {{program}} REPORT [-j N]

For every open path of REPORT: needs its .drv in the local store (nix-instantiate
the closure first), builds it if the output is missing, then runs
`nix-store --realise --check`. Refuses to start unless post-build-hook,
diff-hook and run-diff-hook = true are configured (see `nix show-config`).

  -j N   rebuild N derivations at a time (default: MAX_CORES, else the number of CPUs)

Environment:
  HASH_COLLECTION_TOKEN_FILE or HASH_COLLECTION_TOKEN   your builder's token (leaves out what you attested)
  HASH_COLLECTION_SERVER      default {DEFAULT_SERVER}
  MAX_CORES                   default for -j
""",
}


def wants_help(args):
    return any(argument in ("-h", "--help") for argument in args)


def report_command_help(env, command):
    """The usage of fetch-from-cache or rebuild, with the defaults this file uses."""
    return REPORT_COMMAND_HELP[command].format(program=program_name(env, command))


def program_name(env, command):
    """What the user typed: the wrapper's name (fetch-from-cache.sh, rebuilder.sh) when run through one."""
    return env.get("HASH_COLLECTION_PROGRAM", "").strip() or f"post_build_hook.py {command}"


def short_path(out_path):
    """'5mz92n6…-glibc-2.40': enough of the hash to tell paths apart, and the name."""
    digest, name = parse_store_path(out_path)
    return f"{digest[:7]}…-{name}"


# ---------------------------------------------------------------- HTTP with bounded retries

# Caps on answers, each well above what the call can legitimately need.
NARINFO_CAP = 64 << 10
PENDING_PAGE_CAP = 16 << 20  # PENDING_PAGE paths with their drv paths
REPORT_PATHS_CAP = 256 << 20  # every path of a report, up to the server's limit on paths
SMALL_ANSWER_CAP = 1 << 20


def request_with_retries(method, url, timeout, max_bytes, **kwargs):
    """The first answer that is not transient; TransientError after TRANSIENT_TRIES transient failures.

    Each try ends within timeout (http_request). 5xx, 429, timeouts and connection errors
    are retried with backoff; nothing is retried without bound, so a dead cache or server
    cannot hold a run forever. Retrying a POST of attestations is safe: re-posting one is
    a no-op on the server.
    """
    problem = None
    for attempt in range(TRANSIENT_TRIES):
        if attempt:
            time.sleep(BACKOFF_SECONDS * 2 ** (attempt - 1))
        try:
            response = http_request(method, url, timeout, max_bytes, **kwargs)
        except HttpError as error:
            problem = str(error)
            continue
        if response.status_code < 500 and response.status_code != 429:
            return response
        problem = f"HTTP {response.status_code} from {url}"
    raise TransientError(f"{problem}, {TRANSIENT_TRIES} tries")


class Server:
    """The hash-collection server, as the report-filling commands talk to it."""

    def __init__(self, url, token, timeout):
        self.url = url
        self.token = token
        self.timeout = timeout

    def request(self, method, path, max_bytes=SMALL_ANSWER_CAP, headers=None, **kwargs):
        headers = {**(headers or {}), **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        try:
            response = request_with_retries(method, self.url + path, self.timeout, max_bytes, headers=headers,
                                            **kwargs)
        except TransientError as error:
            raise ConfigError(f"cannot reach the server: {error}") from None
        if response.status_code == 401:
            raise ConfigError(f"{self.url} refused the token ({server_reason(response)}); "
                              f"check HASH_COLLECTION_TOKEN_FILE or HASH_COLLECTION_TOKEN")
        return response

    def pending(self, report):
        """Every open path of the report that the caller has not attested, each once, via the paged /pending."""
        after = None
        while True:
            params = {"limit": PENDING_PAGE, **({"after": after} if after else {})}
            response = self.request("GET", f"/reports/{quoted(report)}/pending", PENDING_PAGE_CAP,
                                    params=params)
            if response.status_code == 404:
                raise ConfigError(f"{self.url} has no report named {report!r} ({server_reason(response)})")
            if response.status_code != 200:
                raise ConfigError(f"cannot list the open paths of {report!r}: {server_reason(response)}")
            try:
                page = response.json()
            except ValueError as error:
                raise ConfigError(f"the open paths of {report!r}: the server's answer is not JSON ({error})") from None
            if not isinstance(page, dict) or not isinstance(page.get("paths"), list):
                raise ConfigError(f"the open paths of {report!r}: the server's answer is not an object with a list"
                                  " of paths; is HASH_COLLECTION_SERVER this collection's address?")
            yield from checked_pending(page["paths"])
            after = page.get("next")
            if not after:
                return

    def report_verdicts(self, report):
        """{out_path: verdict} of the report's JSON summary, as the server sends it."""
        response = self.request("GET", f"/reports/{quoted(report)}", REPORT_PATHS_CAP,
                                headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise ConfigError(f"cannot read report {report!r}: {server_reason(response)}")
        return response.json()["paths"]

    def report_paths(self, report):
        """The report's store paths; anything else the server sends is named and left out."""
        paths = self.report_verdicts(report)
        if not isinstance(paths, (dict, list)):
            raise ConfigError(f"report {report!r}: the server sent paths that are neither an object nor a list")
        for path in paths:
            if not is_store_path(path):
                say(f"report {report!r}: the server sent {shorten(path)!r}, which is not a store path; left out")
        return sorted({path for path in paths if is_store_path(path)})

    def attestations_of(self, out_path):
        response = self.request("GET", by_output_url("", out_path), ATTESTATIONS_ANSWER_CAP)
        if response.status_code != 200:
            raise ConfigError(f"cannot read the attestations of {out_path}: {server_reason(response)}")
        return response.json()

    def post_attestations(self, attestations):
        """None when stored, else the server's reason."""
        response = self.request("POST", "/attestations", json=attestations)
        return None if response.status_code == 200 else server_reason(response)


def checked_pending(paths):
    """The server's open paths that name real store paths (and .drv paths): they become arguments to Nix."""
    for pending in paths:
        out_path = pending.get("out_path") if isinstance(pending, dict) else None
        drv_path = pending.get("drv_path") if isinstance(pending, dict) else None
        if not is_store_path(out_path) or not (drv_path is None or is_store_path(drv_path) and drv_path.endswith(".drv")):
            say(f"the server sent an open path that is not a store path, left out: {shorten(pending)!r}")
            continue
        yield pending


class Progress:
    """'[37/1334] imported 5mz92n6…-glibc-2.40' lines on stdout, and the counts for the summary."""

    def __init__(self, total, outcomes):
        self.total = total
        self.done = 0
        self.counts = dict.fromkeys(outcomes, 0)

    def record(self, outcome, out_path, detail=None):
        self.done += 1
        self.counts[outcome] += 1
        line = f"[{self.done}/{self.total}] {outcome} {short_path(out_path)}"
        print(f"{line}: {detail}" if detail else line, flush=True)

    def summary(self):
        return f"{counted(self.total, 'path')}: " + ", ".join(f"{count} {outcome}" for outcome, count in self.counts.items())


# ---------------------------------------------------------------- fetch-from-cache

# What fetch-from-cache found for a path, and what rebuild got: each outcome named by what produced it.
CACHE_IMPORTED, CACHE_NOT_FOUND = "imported", "not in cache"
CACHE_BAD_SIGNATURE, CACHE_FAILED = "bad signature", "failed"
CACHE_VERIFIED = "verified"  # a narinfo whose signature checks out, not yet imported


class Cache:
    def __init__(self, url, trusted_keys, timeout):
        self.url = url
        self.trusted_keys = trusted_keys
        self.timeout = timeout


def load_cache(env):
    url = env.get("HASH_COLLECTION_CACHE", "").strip().rstrip("/") or DEFAULT_CACHE
    keys_text = env.get("HASH_COLLECTION_CACHE_KEY", "").strip() or DEFAULT_CACHE_KEY
    trusted_keys = {}
    for key_text in keys_text.split():
        try:
            name, _raw = parse_key(key_text, 32)
        except ValueError as error:
            raise ConfigError(f"HASH_COLLECTION_CACHE_KEY: {error}; expected the cache's public key, "
                              f"e.g. {DEFAULT_CACHE_KEY}") from None
        trusted_keys[name] = key_text
    return Cache(url, trusted_keys, timeout_of(env))


def cache_outcome(cache, pending):
    """(CACHE_VERIFIED, attestation) or (CACHE_NOT_FOUND | CACHE_BAD_SIGNATURE | CACHE_FAILED, why) for one path."""
    out_path = pending["out_path"]
    digest, _name = parse_store_path(out_path)
    try:
        response = request_with_retries("GET", f"{cache.url}/{digest}.narinfo", cache.timeout, NARINFO_CAP)
    except TransientError as error:
        return CACHE_FAILED, str(error)
    if response.status_code in (404, 410):
        return CACHE_NOT_FOUND, None
    if response.status_code != 200:
        return CACHE_FAILED, f"HTTP {response.status_code} from {cache.url}/{digest}.narinfo"
    try:
        return narinfo_attestation(cache, pending, parse_narinfo(response.text))
    except (KeyError, ValueError) as error:
        return CACHE_FAILED, f"unusable narinfo: {error}"


def narinfo_attestation(cache, pending, narinfo):
    out_path = pending["out_path"]
    if narinfo["StorePath"] != out_path:
        return CACHE_BAD_SIGNATURE, f"the narinfo is for {narinfo['StorePath']}"
    nar_hash = normalize_nar_hash(narinfo["NarHash"])
    nar_size = int(narinfo["NarSize"])
    references = [store_path(reference) for reference in narinfo.get("References", "").split()]
    for reference in references:
        parse_store_path(reference)
    ca = fixed_content_address(narinfo.get("CA"))
    if ca is not None:
        ca = fixed_output_mark(out_path, ca, references)
    message = fingerprint(out_path, nar_hash, nar_size, references)
    trusted = [sig for sig in narinfo["Sig"] if sig.partition(":")[0] in cache.trusted_keys]
    if not trusted:
        return CACHE_BAD_SIGNATURE, "no signature by " + ", ".join(sorted(cache.trusted_keys))
    for sig in trusted:
        if signature_is_good(cache.trusted_keys[sig.partition(":")[0]], message, sig):
            return CACHE_VERIFIED, {"drv_path": deriver_of(narinfo, pending), "output_path": out_path,
                              "output_hash": nar_hash, "output_sig": sig, "nar_size": nar_size,
                              "references": references, "source": "cache", **({"ca": ca} if ca else {})}
    return CACHE_BAD_SIGNATURE, f"the signature by {trusted[0].partition(':')[0]} does not match NarHash, NarSize and References"


def deriver_of(narinfo, pending):
    """The narinfo's Deriver, else the report's drv path: cache.nixos.org often leaves Deriver out."""
    deriver = narinfo.get("Deriver", "")
    candidates = [] if deriver in ("", "unknown-deriver") else [store_path(deriver)]
    for drv_path in candidates + [pending.get("drv_path")]:
        try:
            drv_ident_of(drv_path)
            return drv_path
        except ValueError:
            continue
    return None


def safe_cache_outcome(cache, pending):
    try:
        return cache_outcome(cache, pending)
    except Exception as error:  # noqa: BLE001 - one odd path must not end the run
        return CACHE_FAILED, f"{error.__class__.__name__}: {error}"


class Importer:
    """Posts verified attestations in batches; a rejected batch is retried item by item to find the culprit."""

    def __init__(self, server, progress):
        self.server = server
        self.progress = progress
        self.waiting = []

    def add(self, attestation):
        self.waiting.append(attestation)
        if len(self.waiting) >= IMPORT_BATCH:
            self.flush()

    def flush(self):
        batch, self.waiting = self.waiting, []
        if batch:
            self.post(batch)

    def post(self, batch):
        reason = self.server.post_attestations(batch)
        if reason is None:
            for attestation in batch:
                self.progress.record(CACHE_IMPORTED, attestation["output_path"])
        elif len(batch) > 1:
            for attestation in batch:
                self.post([attestation])
        else:
            self.progress.record(CACHE_FAILED, batch[0]["output_path"], f"the server refused it: {reason}")


def fetch_from_cache(args, env):
    """Import what a binary cache vouches for, with its signatures, for every open path of a report."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    if wants_help(args):
        print(report_command_help(env, "fetch-from-cache"), end="")
        return 0
    require_nacl()
    report, jobs = parse_report_arguments(program_name(env, "fetch-from-cache"), args, DEFAULT_FETCH_JOBS)
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        raise ConfigError("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set; "
                          "imports need the token of the builder that stands for the cache")
    cache = load_cache(env)
    server = Server(server_url(env), token, timeout_of(env))
    open_paths = list(server.pending(report))
    progress = Progress(len(open_paths), (CACHE_IMPORTED, CACHE_NOT_FOUND, CACHE_BAD_SIGNATURE, CACHE_FAILED))
    importer = Importer(server, progress)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        lookups = {pool.submit(safe_cache_outcome, cache, pending): pending for pending in open_paths}
        for lookup in as_completed(lookups):
            outcome, detail = lookup.result()
            if outcome == CACHE_VERIFIED:
                importer.add(detail)
            else:
                progress.record(outcome, lookups[lookup]["out_path"], detail)
    importer.flush()
    print(progress.summary(), flush=True)
    return fetch_exit_status(progress)


def fetch_exit_status(progress):
    """1 when there was something to import and nothing was, or when any path failed for a reason
    other than not being in the cache; the lines above say which and why."""
    counts = progress.counts
    if counts[CACHE_FAILED] or counts[CACHE_BAD_SIGNATURE] or (progress.total and not counts[CACHE_IMPORTED]):
        return 1
    return 0


# ---------------------------------------------------------------- rebuild

REBUILD_REPRODUCED, REBUILD_DIFFERS = "reproduced", "differs"
REBUILD_FAILED, REBUILD_DRV_MISSING = "build failed", "drv missing"


def default_rebuild_jobs(env):
    text = env.get("MAX_CORES", "").strip()
    if text:
        return positive_jobs(text, "MAX_CORES")
    return os.cpu_count() or 1


def effective_nix_settings(env):
    """Nix's settings as `nix show-config` prints them, which includes NIX_CONFIG."""
    # Newer Nix spells it `nix config show` and keeps the old name only for a while.
    problem = None
    for command in (["nix", "show-config"], ["nix", "config", "show"]):
        try:
            shown = run_nix([*command, "--extra-experimental-features", "nix-command"], env)
        except StoreQueryError as error:
            problem = error
            continue
        settings = {}
        for line in shown.splitlines():
            name, sep, value = line.partition(" = ")
            if sep:
                settings[name.strip()] = value.strip()
        return settings
    raise ConfigError(f"cannot read Nix's settings: {problem}")


def require_hooks(env):
    """Refuse to rebuild when the server would never hear of the rebuilds."""
    settings = effective_nix_settings(env)
    missing = [name for name in ("post-build-hook", "diff-hook") if not settings.get(name)]
    if settings.get("run-diff-hook") != "true":
        missing.append("run-diff-hook = true")
    if missing:
        raise ConfigError(
            f"refusing to rebuild: {', '.join(missing)} not configured according to `nix show-config`, so the "
            f"server would never hear of these rebuilds. Set post-build-hook, diff-hook and run-diff-hook = true "
            f"in nix.conf or NIX_CONFIG: ./install-hook.sh does (docs/builder.md).")


def store_path_is_valid(path, env):
    import subprocess
    return subprocess.run(["nix-store", "--check-validity", "--", path], env=nix_subprocess_env(env),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode == 0


def deriver_in_store(out_path, env):
    """`nix-store -q --deriver`, for SBOMs without drv paths; None when the store does not know it."""
    try:
        deriver = run_nix(["nix-store", "--query", "--deriver", "--", out_path], env).strip()
    except StoreQueryError:
        return None
    return deriver if deriver.endswith(".drv") else None


def run_build(args, env):
    """(exit status, last line of stderr) of a build; builds take as long as they take."""
    import subprocess
    completed = subprocess.run(args, env=nix_subprocess_env(env), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, errors="replace")
    lines = completed.stderr.strip().splitlines()
    return completed.returncode, lines[-1] if lines else ""


def rebuild_derivation(drv_path, out_paths, env):
    """(outcome, detail) of building drv_path if needed, then checking it once."""
    if drv_path is None or not store_path_is_valid(drv_path, env):
        return REBUILD_DRV_MISSING, f"{drv_path} is not in the local store (nix-instantiate it first)" if drv_path \
            else "no drv path in the report and the store knows no deriver"
    if not all(store_path_is_valid(out_path, env) for out_path in out_paths):
        status, last_line = run_build(["nix-store", "--realise", "--", drv_path], env)
        if status != 0:
            return REBUILD_FAILED, last_line
    status, last_line = run_build(["nix-store", "--realise", "--check", "--", drv_path], env)
    if status == 0:
        return REBUILD_REPRODUCED, None
    if status == NOT_DETERMINISTIC_STATUS:
        return REBUILD_DIFFERS, None
    return REBUILD_FAILED, f"--check: {last_line}"


def safe_rebuild(drv_path, out_paths, env):
    try:
        return rebuild_derivation(drv_path, out_paths, env)
    except Exception as error:  # noqa: BLE001 - one odd derivation must not end the run
        return REBUILD_FAILED, f"{error.__class__.__name__}: {error}"


def paths_by_derivation(open_paths, env):
    """{drv_path or None: [out_path]}: one check covers every output of a derivation."""
    groups = {}
    for pending in open_paths:
        drv_path = pending.get("drv_path") or deriver_in_store(pending["out_path"], env)
        groups.setdefault(drv_path, []).append(pending["out_path"])
    return groups


def rebuild(args, env):
    """Rebuild every open path of a report once, with `--check`; the hooks report the results."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    if wants_help(args):
        print(report_command_help(env, "rebuild"), end="")
        return 0
    report, jobs = parse_report_arguments(program_name(env, "rebuild"), args, default_rebuild_jobs(env))
    require_hooks(env)
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        say("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set: "
            "paths you attested before are rebuilt again")
    server = Server(server_url(env), token, timeout_of(env))
    groups = paths_by_derivation(list(server.pending(report)), env)
    progress = Progress(sum(map(len, groups.values())),
                        (REBUILD_REPRODUCED, REBUILD_DIFFERS, REBUILD_FAILED, REBUILD_DRV_MISSING))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        checks = {pool.submit(safe_rebuild, drv_path, out_paths, env): out_paths
                  for drv_path, out_paths in groups.items()}
        for check in as_completed(checks):
            outcome, detail = check.result()
            for out_path in checks[check]:
                progress.record(outcome, out_path, detail)
    print(progress.summary(), flush=True)
    return 0


# ---------------------------------------------------------------- challenge

CHALLENGE_IDENTICAL, CHALLENGE_DIFFERS, CHALLENGE_NO_DATA = "identical", "differs", "without data"


class TrustPolicy(NamedTuple):
    """challenge --trust: only these builders count, `minimum` of them must agree, maybe verified only."""
    trusted: frozenset
    minimum: int
    verified_only: bool


CHALLENGE_USAGE = "usage: challenge [PATH...] [--report NAME] [--trust NAME,NAME... [--min N] [--verified]]"


def parse_challenge_arguments(args):
    """(paths, reports, TrustPolicy or None)."""
    paths, reports, options, words = [], [], {}, list(args)
    while words:
        word = words.pop(0)
        name, has_value, value = word.partition("=")
        if name in ("--report", "--trust", "--min"):
            if not has_value and not words:
                raise ConfigError(f"{CHALLENGE_USAGE}: {name} needs a value")
            value = value if has_value else words.pop(0)
            if name == "--report":
                reports.append(value)
            else:
                options[name] = value
        elif word == "--verified":
            options[word] = True
        elif word.startswith("-"):
            raise ConfigError(f"{CHALLENGE_USAGE}: unexpected argument {word!r}")
        else:
            paths.append(word)
    if not paths and not reports:
        raise ConfigError(f"{CHALLENGE_USAGE}: give store paths, a report, or both")
    return paths, reports, trust_policy_of(options)


def trust_policy_of(options):
    if "--trust" not in options:
        if options:
            raise ConfigError(f"{CHALLENGE_USAGE}: --min and --verified need --trust")
        return None
    trusted = frozenset(filter(None, options["--trust"].split(",")))
    minimum = options.get("--min", "2")
    if not re.fullmatch(r"[0-9]{1,4}", minimum) or not 2 <= int(minimum) <= len(trusted):
        raise ConfigError(f"{CHALLENGE_USAGE}: --min: expected 2 to {len(trusted)} (the builders in --trust),"
                          f" got {minimum!r}")
    return TrustPolicy(trusted, int(minimum), bool(options.get("--verified")))


def store_path_of_argument(argument):
    """A store path as given, or where a link such as ./result points."""
    try:
        parse_store_path(argument)
        return argument
    except ValueError:
        pass
    resolved = os.path.realpath(argument)
    parse_store_path(resolved)
    return resolved


def local_nar_hashes(out_paths, env):
    """{out_path: NAR hash} of the paths that are valid in the local store."""
    if not out_paths:
        return {}
    invalid = set(run_nix(["nix-store", "--check-validity", "--print-invalid", "--", *out_paths], env).split())
    valid = [out_path for out_path in out_paths if out_path not in invalid]
    return {info.out_path: info.nar_hash for info in path_infos(valid, env)} if valid else {}


def comparison(local_hash, attestations):
    """(CHALLENGE_IDENTICAL | CHALLENGE_DIFFERS | CHALLENGE_NO_DATA, {hash: [builders]})."""
    builders_by_hash = {}
    for attested in attestations:
        builders = builders_by_hash.setdefault(attested["output_hash"], [])
        if attested["builder"] not in builders:
            builders.append(attested["builder"])
    if not builders_by_hash:
        return CHALLENGE_NO_DATA, builders_by_hash
    return (CHALLENGE_IDENTICAL if set(builders_by_hash) == {local_hash} else CHALLENGE_DIFFERS), builders_by_hash


def comparison_lines(out_path, local_hash, outcome, builders_by_hash):
    if outcome == CHALLENGE_NO_DATA:
        return [f"{out_path}: no data"]
    if outcome == CHALLENGE_IDENTICAL:
        return [f"{out_path}: identical ({', '.join(builders_by_hash[local_hash])})"]
    lines = [f"{out_path}: differs", f"  local hash: {local_hash}"]
    for nar_hash, builders in builders_by_hash.items():
        same = " (same as local)" if nar_hash == local_hash else ""
        lines.append(f"  {', '.join(builders)}: {nar_hash}{same}")
    return lines


def challenge(args, env):
    """Compare local store paths with every builder's attestations; exit 0 identical, 2 differs, 1 errors/no data."""
    from concurrent.futures import ThreadPoolExecutor
    arguments, reports, policy = parse_challenge_arguments(args)
    server = Server(server_url(env), None, timeout_of(env))
    errors = 0
    wanted = []
    for argument in arguments:
        try:
            wanted.append(store_path_of_argument(argument))
        except ValueError as error:
            say(f"{argument}: {error}")
            errors += 1
    report_paths = [out_path for report in reports for out_path in server.report_paths(report)]
    local_hashes = local_nar_hashes(list(dict.fromkeys(wanted + report_paths)), env)
    for out_path in wanted:
        if out_path not in local_hashes:
            say(f"{out_path}: not in the local store")
            errors += 1
    if reports:
        present = len({path for path in report_paths if path in local_hashes})
        say(f"{present} of {counted(len(set(report_paths)), 'report path')} in the local store")
    counts = dict.fromkeys((CHALLENGE_IDENTICAL, CHALLENGE_DIFFERS, CHALLENGE_NO_DATA), 0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        lookups = pool.map(lambda out_path: attestations_or_none(server, out_path), local_hashes)
        for out_path, attestations in zip(local_hashes, lookups):
            if attestations is None:
                errors += 1
                continue
            if policy is None:
                outcome, builders_by_hash = comparison(local_hashes[out_path], attestations)
                lines = comparison_lines(out_path, local_hashes[out_path], outcome, builders_by_hash)
            else:
                outcome, lines = policy_comparison(out_path, local_hashes[out_path], attestations, policy)
            print("\n".join(lines), flush=True)
            counts[outcome] += 1
    print(f"{counted(sum(counts.values()), 'path')}: {counts[CHALLENGE_IDENTICAL]} identical, "
          f"{counts[CHALLENGE_DIFFERS]} differ, {counts[CHALLENGE_NO_DATA]} without data", flush=True)
    if counts[CHALLENGE_DIFFERS]:
        return 2
    if policy is not None and counts[CHALLENGE_NO_DATA]:
        return 1  # under a policy, a path no hash settled is not a match
    return 1 if errors or not counts[CHALLENGE_IDENTICAL] else 0


def policy_comparison(out_path, local_hash, attestations, policy):
    """(CHALLENGE_IDENTICAL | CHALLENGE_DIFFERS | CHALLENGE_NO_DATA, lines): the verdict under the policy, by the server's own rule, and whether
    the local hash is the one `minimum` trusted builders agree on (CHALLENGE_IDENTICAL), differs from one (CHALLENGE_DIFFERS), or neither."""
    builders_by_hash = {}
    for attested in attestations:
        if attested.get("verified") or not policy.verified_only:
            builders_by_hash.setdefault(attested["output_hash"], set()).add(attested["builder"])
    label = verdict(builders_by_hash, policy.trusted, policy.minimum)
    settled = settled_hashes(builders_by_hash, policy.trusted, policy.minimum)
    if settled - {local_hash}:
        outcome, said = CHALLENGE_DIFFERS, "the local hash differs from one the policy settled"
    elif settled:
        outcome, said = CHALLENGE_IDENTICAL, "the local hash is the one the policy settled"
    else:
        outcome, said = CHALLENGE_NO_DATA, "no hash is settled under the policy"
    lines = [f"{out_path}: {label}; {said}", f"  local hash: {local_hash}"]
    for nar_hash, builders in sorted(builders_by_hash.items()):
        trusted = sorted(builders & policy.trusted)
        if trusted:
            same = " (same as local)" if nar_hash == local_hash else ""
            lines.append(f"  {', '.join(trusted)}: {nar_hash}{same}")
    return outcome, lines


def attestations_or_none(server, out_path):
    try:
        return server.attestations_of(out_path)
    except ConfigError as error:
        say(f"{out_path}: {error}")
        return None


# ================================================================ the transparency log: audit, witness, monitor
# A builder checks that the server keeps what it was sent and shows everyone the same,
# only-growing history (docs/transparency-log.md). Exit 0 when all holds, 2 when the log
# broke a promise, 1 when the check could not be made.

LOG_RECORDS = "log-indexes"
MAX_NOTE_BYTES = 64 * 1024
MAX_PROOF_BYTES = 64 * 1024
MAX_BUNDLE_BYTES = TILE_WIDTH * (MAX_LOG_ENTRY + 2)
DEFAULT_MERGE_WAIT = 3600  # seconds after which an entry must be in a checkpoint
DEFAULT_RECHECK = 100  # earlier entries each audit checks again
LOG_PROBLEM_STATUS = 2


class LogProblem(Exception):
    """The log broke a promise: a bad signature, an inconsistent history, a missing or changed entry."""


class Checkpoint:
    def __init__(self, note, text):
        self.note, self.text = note, text
        self.origin, self.size, self.root = parse_checkpoint(text)


def log_state_directory(spool):
    """Where the log commands keep their state: under the spool, which every hook and timer may already write."""
    return os.path.join(spool, "log")


def record_log_indexes(spool, attestations, response):
    """Note the log index the server gave each delivered attestation, for `audit` to check later.

    Not in a spool its group shares (the build users' spool of the diff hook): every build user
    writes there, and `audit` runs as the owner of the post-build hook's own spool.
    """
    try:
        Spool(spool).check()  # never through a link planted in a spool shared by old versions
        if os.stat(spool).st_mode & stat.S_IWGRP:
            return
        indexes = response.json().get("log_index") or []
        lines = "".join(f"{index} {attested_path(item)} {normalize_nar_hash(item['output_hash'])} {int(time.time())}\n"
                        for index, item in zip(indexes, attestations) if isinstance(index, int))
        os.makedirs(log_state_directory(spool), mode=0o700, exist_ok=True)
        with open(os.path.join(log_state_directory(spool), LOG_RECORDS), "a") as records:
            records.write(lines)
    except (ValueError, KeyError, AttributeError, OSError, UnsafeSpool) as error:
        say(f"could not record the log indexes for audit: {error}")


def attested_path(attestation):
    """The output path of an attestation in either generation of field names."""
    return attestation.get("output_path") or store_path(f"{attestation['output_digest']}-{attestation['output_name']}")


def log_verifier(env):
    text = env.get("HASH_COLLECTION_LOG_KEY", "").strip()
    if not text:
        raise ConfigError("HASH_COLLECTION_LOG_KEY is not set: give the log's verifier key (the server prints it)")
    try:
        return parse_verifier_key(text)
    except ValueError as error:
        raise ConfigError(f"HASH_COLLECTION_LOG_KEY: {error}") from None


def parse_log_arguments(command, args, options):
    """--witness VKEY (repeatable), --min-witnesses K and the command's own {option: default}."""
    import argparse
    parser = argparse.ArgumentParser(prog=f"post_build_hook.py {command}", add_help=False)
    parser.add_argument("--witness", action="append", default=[], type=witness_verifier)
    parser.add_argument("--min-witnesses", type=int, default=0)
    for option, default in options.items():
        if isinstance(default, bool):
            parser.add_argument(option, action="store_true")
        else:
            parser.add_argument(option, default=default, type=type(default) if default is not None else str)
    try:
        parsed, unknown = parser.parse_known_args(args)
    except SystemExit:
        raise ConfigError(f"usage: post_build_hook.py {command} [--witness VKEY]... [--min-witnesses K]") from None
    if unknown:
        raise ConfigError(f"{command}: unexpected argument {unknown[0]!r}")
    if parsed.min_witnesses > len(parsed.witness):
        raise ConfigError(f"--min-witnesses {parsed.min_witnesses} needs at least that many --witness keys")
    return parsed


def witness_verifier(text):
    import argparse
    try:
        return parse_verifier_key(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def fetch_log(server, path, limit):
    """The body of GET /log/<path>, at most limit bytes; ConfigError for any answer but 200."""
    response = server.request("GET", "/log/" + path, limit)
    if response.status_code != 200:
        raise ConfigError(f"GET /log/{path}: {server_reason(response)}")
    return response.body


def fetch_proof(server, path):
    try:
        answer = parsed_json(fetch_log(server, path, MAX_PROOF_BYTES))
        return [base64.b64decode(hash_, validate=True) for hash_ in answer["hashes"]], answer
    except (ValueError, KeyError, TypeError) as error:
        raise LogProblem(f"GET /log/{path}: not a proof: {error}") from None


def verified_checkpoint(server, log_key, witnesses, min_witnesses):
    note = fetch_log(server, "checkpoint", MAX_NOTE_BYTES).decode(errors="replace")
    try:
        checkpoint = Checkpoint(note, verify_note(note, log_key))
    except ValueError as error:
        raise LogProblem(f"bad signature: the server's checkpoint does not verify: {error}") from None
    _text, signatures = split_note(note)
    cosigned = {witness.name for witness in witnesses for name, raw in signatures
                if cosignature_time(checkpoint.text, witness, name, raw) is not None}
    if len(cosigned) < min_witnesses:
        raise LogProblem(f"checkpoint {checkpoint.size} is cosigned by {len(cosigned)} of the {min_witnesses} "
                         f"witnesses required ({', '.join(sorted(cosigned)) or 'none'})")
    return checkpoint


def kept_checkpoint(state_file, log_key):
    try:
        with open(state_file) as kept:
            note = kept.read()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint(note, verify_note(note, log_key))
    except ValueError as error:
        raise ConfigError(f"{state_file}: not a checkpoint by {log_key.name}: {error}") from None


def keep_checkpoint(state_file, checkpoint):
    os.makedirs(os.path.dirname(state_file), mode=0o700, exist_ok=True)
    with open(state_file + ".new", "w") as kept:
        kept.write(checkpoint.note)
    os.replace(state_file + ".new", state_file)


def check_consistency(server, old, new):
    """That new only appends to old, the last checkpoint this builder verified."""
    if old is None:
        return
    if old.origin != new.origin:
        raise LogProblem(f"inconsistent: the log's origin changed from {old.origin!r} to {new.origin!r}")
    if new.size < old.size:
        raise LogProblem(f"inconsistent: the log shrank from {old.size} entries (a checkpoint we verified) "
                         f"to {new.size}")
    proof, _answer = fetch_proof(server, f"proof/consistency?old={old.size}&size={new.size}")
    if not consistency_holds(old.size, new.size, old.root, new.root, proof):
        raise LogProblem(f"inconsistent: checkpoint {new.size} does not extend checkpoint {old.size} that we "
                         f"verified: the server rewrote history or shows a fork")


def check_included(server, checkpoint, index, output_path, nar_hash):
    """That entry `index` is in the checkpoint and is the attestation we posted."""
    what = f"entry {index} ({output_path} {nar_hash})"
    try:
        proof, answer = fetch_proof(server, f"proof/inclusion?index={index}&size={checkpoint.size}")
        entry = base64.b64decode(answer["entry"], validate=True)
    except ConfigError as error:
        raise LogProblem(f"missing entry: {what}: {error}") from None
    except (ValueError, KeyError) as error:
        raise LogProblem(f"changed entry: {what}: the server's answer is malformed: {error}") from None
    if not entry:
        raise LogProblem(f"missing entry: {what}: the server no longer has it")
    try:
        fields = parse_log_entry(entry)
    except ValueError as error:
        raise LogProblem(f"changed entry: {what}: {error}") from None
    if (fields["output"], fields["nar-hash"]) != (output_path, nar_hash):
        raise LogProblem(f"changed entry: {what}: the log now says {fields['output']} {fields['nar-hash']}")
    try:
        included = root_from_inclusion_proof(index, checkpoint.size, leaf_hash(entry), proof) == checkpoint.root
    except ValueError:
        included = False
    if not included:
        raise LogProblem(f"changed entry: {what}: it is not the entry checkpoint {checkpoint.size} holds")


def audit(args, env):
    """Verify the checkpoint, its consistency with the last one verified, and our entries in it."""
    require_nacl()
    options = parse_log_arguments("audit", args, {"--merge-wait": float(DEFAULT_MERGE_WAIT),
                                                  "--recheck": DEFAULT_RECHECK})
    log_key = log_verifier(env)
    server = Server(server_url(env), None, DEFAULT_TIMEOUT)
    state = log_state_directory(spool_directory(env))
    try:
        checkpoint = verified_checkpoint(server, log_key, options.witness, options.min_witnesses)
        check_consistency(server, kept_checkpoint(os.path.join(state, "audit-checkpoint"), log_key), checkpoint)
        checked, waiting = audit_records(server, checkpoint, state, options.merge_wait, options.recheck)
    except LogProblem as error:
        say(f"audit failed: {error}")
        return LOG_PROBLEM_STATUS
    keep_checkpoint(os.path.join(state, "audit-checkpoint"), checkpoint)
    print(f"{PREFIX} log {checkpoint.origin} at {checkpoint.size} entries: consistent; "
          f"{checked} of our entries included, {waiting} not yet in a checkpoint")
    return 0


def audit_records(server, checkpoint, state, merge_wait, recheck):
    """Check every new recorded entry the checkpoint covers, and `recheck` earlier ones at random.

    Earlier entries are checked again because a row can vanish after it was first seen;
    entries not yet in a checkpoint wait for the next audit. Returns (checked, waiting).
    """
    os.makedirs(state, mode=0o700, exist_ok=True)
    auditing, records = take_records(state)
    for record in earlier_records(state, recheck):
        check_included(server, checkpoint, int(record[0]), record[1], record[2])
    waiting, checked = [], []
    for record in records:
        index, output_path, nar_hash, recorded = int(record[0]), record[1], record[2], float(record[3])
        if index < checkpoint.size:
            check_included(server, checkpoint, index, output_path, nar_hash)
            checked.append(" ".join(record) + "\n")
        elif time.time() - recorded > merge_wait:
            raise LogProblem(f"missing entry: entry {index} ({output_path}) is still not in a checkpoint "
                             f"({checkpoint.size} entries) {merge_wait:g} s after the server accepted it")
        else:
            waiting.append(" ".join(record) + "\n")
    with open(os.path.join(state, LOG_RECORDS + ".checked"), "a") as done:
        done.write("".join(checked))
    with open(os.path.join(state, LOG_RECORDS), "a") as fresh:
        fresh.write("".join(waiting))
    with contextlib.suppress(FileNotFoundError):
        os.remove(auditing)
    return len(checked), len(waiting)


def earlier_records(state, count):
    import random
    try:
        with open(os.path.join(state, LOG_RECORDS + ".checked")) as done:
            records = [line.split() for line in done if line.strip()]
    except FileNotFoundError:
        return []
    return random.sample(records, min(count, len(records)))


def take_records(state):
    """(file, records) to audit. Hooks append to a fresh file meantime; a failed audit leaves its records for the next."""
    records_file = os.path.join(state, LOG_RECORDS)
    auditing, taken = records_file + ".auditing", records_file + ".taken"
    with contextlib.suppress(FileNotFoundError):
        os.replace(records_file, taken)
    with contextlib.suppress(FileNotFoundError):
        with open(taken) as taken_records, open(auditing, "a") as pending:
            pending.write(taken_records.read())
        os.remove(taken)
    try:
        with open(auditing) as pending:
            return auditing, [line.split() for line in pending if line.strip()]
    except FileNotFoundError:
        return auditing, []


def witness(args, env):
    """Cosign the server's checkpoint once it is consistent with the last one this witness cosigned."""
    require_nacl()
    if args[:1] == ["--generate-key"]:
        return generate_witness_key(args[1:], env)
    options = parse_log_arguments("witness", args, {})
    log_key, witness_key = log_verifier(env), witness_signer(env)
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    server = Server(server_url(env), token, DEFAULT_TIMEOUT)
    state_file = os.path.join(log_state_directory(spool_directory(env)), "witness-checkpoint")
    try:
        checkpoint = verified_checkpoint(server, log_key, options.witness, options.min_witnesses)
        check_consistency(server, kept_checkpoint(state_file, log_key), checkpoint)
    except LogProblem as error:
        say(f"witness refuses to cosign: {error}")
        return LOG_PROBLEM_STATUS
    line = cosign(checkpoint.text, witness_key, int(time.time()))
    response = server.request("POST", f"/log/cosignature?size={checkpoint.size}", data=line.encode(),
                              headers={"Content-Type": "text/plain"})
    if response.status_code != 200:
        raise ConfigError(f"the server refused the cosignature: {server_reason(response)}")
    keep_checkpoint(state_file, checkpoint)
    print(f"{PREFIX} cosigned {checkpoint.origin} at {checkpoint.size} entries as {witness_key.name}")
    return 0


def witness_signer(env):
    text = read_secret(env, "HASH_COLLECTION_WITNESS_KEY")
    if not text:
        raise ConfigError("neither HASH_COLLECTION_WITNESS_KEY_FILE nor HASH_COLLECTION_WITNESS_KEY is set; "
                          "make a key with `post_build_hook.py witness --generate-key NAME`")
    try:
        key = parse_signer_key(text)
    except ValueError as error:
        raise ConfigError(f"the witness key: {error}") from None
    if key.key_type != COSIGNATURE_KEY_TYPE:
        raise ConfigError("the witness key is not a cosignature/v1 key (type 0x04)")
    return key


def generate_witness_key(args, env):
    """Write a new witness key to HASH_COLLECTION_WITNESS_KEY_FILE and print its verifier key."""
    path = env.get("HASH_COLLECTION_WITNESS_KEY_FILE")
    if len(args) != 1 or not path:
        raise ConfigError("usage: HASH_COLLECTION_WITNESS_KEY_FILE=FILE post_build_hook.py witness --generate-key NAME")
    try:
        signer, verifier = generate_note_key(args[0], COSIGNATURE_KEY_TYPE)
    except ValueError as error:
        raise ConfigError(f"witness key name: {error}") from None
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as key_file:
        key_file.write(signer + "\n")
    print(verifier)
    return 0


def monitor(args, env):
    """Download the whole log, verify it against the checkpoint, and recompute a report's verdicts from it."""
    require_nacl()
    options = parse_log_arguments("monitor", args, {"--report": None, "--verified-only": False})
    log_key = log_verifier(env)
    server = Server(server_url(env), None, DEFAULT_TIMEOUT)
    state_file = os.path.join(log_state_directory(spool_directory(env)), "monitor-checkpoint")
    try:
        checkpoint = verified_checkpoint(server, log_key, options.witness, options.min_witnesses)
        check_consistency(server, kept_checkpoint(state_file, log_key), checkpoint)
        entries, problems = downloaded_log(server, checkpoint)
    except LogProblem as error:
        say(f"monitor: {error}")
        return LOG_PROBLEM_STATUS
    if options.report:
        problems += verdict_differences(server, options.report, entries, options.verified_only)
    for problem in problems:
        say(f"monitor: {problem}")
    if problems:
        return LOG_PROBLEM_STATUS
    keep_checkpoint(state_file, checkpoint)
    print(f"{PREFIX} log {checkpoint.origin}: all {checkpoint.size} entries verified"
          + (f", report {options.report!r} agrees with them" if options.report else ""))
    return 0


def downloaded_log(server, checkpoint):
    """(entries, problems) of the log up to the checkpoint, read through the tiles."""
    leaf_hashes, entries = [], []
    for start in range(0, checkpoint.size, TILE_WIDTH):
        width = min(TILE_WIDTH, checkpoint.size - start)
        tile = fetch_log(server, tile_path(0, start // TILE_WIDTH, width), width * 32)
        leaf_hashes += [tile[offset:offset + 32] for offset in range(0, len(tile), 32)]
        try:
            entries += split_entry_bundle(fetch_log(server, tile_path("entries", start // TILE_WIDTH, width),
                                                    MAX_BUNDLE_BYTES))
        except ValueError as error:
            raise LogProblem(f"entries {start} onwards: {error}") from None
    if len(leaf_hashes) != checkpoint.size or tree_hash(leaf_hashes) != checkpoint.root:
        raise LogProblem(f"the log's tiles do not make the root of checkpoint {checkpoint.size}")
    if len(entries) != checkpoint.size:
        raise LogProblem(f"the server sent {len(entries)} entries for a log of {checkpoint.size}")
    return entries, [problem for index, entry in enumerate(entries)
                     if (problem := entry_problem(index, entry, leaf_hashes[index]))]


def entry_problem(index, entry, expected_leaf_hash):
    if not entry:
        return f"missing entry {index}: the server serves nothing in its place"
    if leaf_hash(entry) == expected_leaf_hash:
        return None
    try:
        fields = parse_log_entry(entry)
        return f"changed entry {index}: {fields['output']} by {fields['builder']} is not what the log holds"
    except ValueError as error:
        return f"changed entry {index}: {error}"


def verdict_differences(server, report, entries, verified_only):
    """Every path whose verdict on the server differs from the one the log gives."""
    builders_by_path = {}
    for entry in entries:
        with contextlib.suppress(ValueError):
            fields = parse_log_entry(entry)
            if fields["verified"] == "1" or not verified_only:
                builders_by_path.setdefault(fields["output"], {}).setdefault(fields["nar-hash"], set()).add(
                    fields["builder"])
    return [f"{path}: the server's report says {shown!r}, the log says {verdict(builders_by_path.get(path, {}))!r}"
            for path, shown in sorted(server.report_verdicts(report).items())
            if shown != verdict(builders_by_path.get(path, {}))]


# Hooks run inside Nix's build loop and must exit 0 whatever happens.
COMMANDS = {
    "challenge": (challenge, False),
    "fetch-from-cache": (fetch_from_cache, False),
    "rebuild": (rebuild, False),
    "diff-hook": (diff_hook, True),
    "flush": (flush, False),
    "audit": (audit, False),
    "witness": (witness, False),
    "monitor": (monitor, False),
}


def main(argv=None, env=None):
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    if not argv:
        return run(post_build_hook, [], env, is_hook=True)
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    command, is_hook = COMMANDS[argv[0]]
    if wants_help(argv[1:]) and command not in (fetch_from_cache, rebuild):  # those two print their own
        print(usage())
        return 0
    return run(command, argv[1:], env, is_hook)


def run(command, args, env, is_hook):
    try:
        return command(args, env)
    except (ConfigError, StoreQueryError, ValueError, OSError) as error:
        say(str(error))
    except BaseException as error:  # noqa: BLE001 - a hook must never stop Nix
        if not is_hook:
            raise
        say(f"unexpected {error.__class__.__name__}: {error}")
    return 0 if is_hook else 1


def usage():
    return ("usage: post_build_hook.py                    (as Nix's post-build-hook: reads DRV_PATH, OUT_PATHS)\n"
            "       post_build_hook.py diff-hook OUT CHECK DRV [BUILD_DIR]   (as Nix's diff-hook)\n"
            "       post_build_hook.py flush              (deliver the spooled submissions)\n"
            "       post_build_hook.py fetch-from-cache REPORT [-j N]   (import what a binary cache signed)\n"
            "       post_build_hook.py rebuild REPORT [-j N]            (rebuild and --check open paths)\n"
            "       post_build_hook.py challenge [PATH...] [--report NAME]   (compare the local store with the server)\n"
            "       post_build_hook.py audit [--witness VKEY]... [--min-witnesses K]   (check the log and our entries in it)\n"
            "       post_build_hook.py witness [--generate-key NAME]   (cosign the log's checkpoint)\n"
            "       post_build_hook.py monitor [--report NAME] [--witness VKEY]...   (verify the whole log)")


if __name__ == "__main__":
    sys.exit(main())
