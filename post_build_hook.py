#!/usr/bin/env python3
"""nix-hash-collection client: Nix post-build-hook, diff-hook and tools.

This file also holds the Nix format rules (store paths, hash encodings,
fingerprints, signatures, NAR) that web.py imports, so each rule has one home.
"""
import base64
import hashlib
import os
import re
import stat

STORE_DIR = "/nix/store"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
SHA256_BYTES = 32
SHA256_BASE32_LEN = 52
DIGEST_RE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")
# Nix's own rule for the name part: this set of characters, no leading dot.
NAME_RE = re.compile(r"[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}")
STORE_BASENAME_RE = re.compile(r"([0123456789abcdfghijklmnpqrsvwxyz]{32})-(" + NAME_RE.pattern + r")")


# ---------------------------------------------------------------- nix base32

def nix_base32_encode(raw):
    length = (len(raw) * 8 - 1) // 5 + 1
    chars = []
    for n in range(length - 1, -1, -1):
        bit = n * 5
        i, j = divmod(bit, 8)
        value = raw[i] >> j
        if i + 1 < len(raw):
            value |= raw[i + 1] << (8 - j)
        chars.append(NIX_BASE32[value & 0x1F])
    return "".join(chars)


def nix_base32_decode(text, size):
    raw = bytearray(size)
    for n, char in enumerate(reversed(text)):
        digit = NIX_BASE32.find(char)
        if digit < 0:
            raise ValueError(f"invalid nix base32 character {char!r}")
        bit = n * 5
        i, j = divmod(bit, 8)
        raw[i] |= (digit << j) & 0xFF
        overflow = digit >> (8 - j)
        if i + 1 < size:
            raw[i + 1] |= overflow
        elif overflow:
            raise ValueError("invalid base-32 hash: it does not decode to exactly 32 bytes")
    return bytes(raw)


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


def parse_store_path(path):
    """Split '/nix/store/<32 chars>-<name>' into (digest, name), or raise ValueError."""
    if not isinstance(path, str) or not path.startswith(STORE_DIR + "/"):
        raise ValueError(f"expected a store path /nix/store/<32 nix-base32 chars>-<name>, got {shorten(path)!r}")
    try:
        return parse_store_basename(path[len(STORE_DIR) + 1:])
    except ValueError:
        raise ValueError(f"expected a store path /nix/store/<32 nix-base32 chars>-<name>, got {shorten(path)!r}") from None


def drv_ident_of(drv_path):
    """'/nix/store/<h>-foo.drv' -> '<h>-foo', the form the attestation URL uses."""
    parse_store_path(drv_path)
    if not drv_path.endswith(".drv"):
        raise ValueError(f"expected a .drv store path, got {shorten(drv_path)!r}")
    return drv_path[len(STORE_DIR) + 1:-len(".drv")]


def shorten(value, limit=80):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


# ---------------------------------------------------------------- NAR hashes

def normalize_nar_hash(text):
    """Any of Nix's sha256 spellings -> 'sha256:<nix base32>', or raise ValueError."""
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


def parse_key(text, size):
    """'name:base64' -> (name, raw bytes of the given size), or raise ValueError."""
    name, sep, encoded = text.strip().partition(":")
    if not sep or not name:
        raise ValueError("expected a Nix key of the form NAME:BASE64")
    try:
        raw = base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ValueError(f"key {name!r}: the part after ':' is not base64") from None
    if len(raw) != size:
        raise ValueError(f"key {name!r}: expected {size} bytes, got {len(raw)}")
    return name, raw


def sign_fingerprint(secret_key_text, message):
    from nacl.signing import SigningKey
    name, raw = parse_key(secret_key_text, 64)
    signature = SigningKey(raw[:32]).sign(message.encode()).signature
    return f"{name}:{base64.b64encode(signature).decode()}"


def verify_signature(public_key_text, message, signature):
    """True when signature ('name:base64') is by that public key over message."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey
    key_name, raw_key = parse_key(public_key_text, 32)
    sig_name, raw_sig = parse_key(signature, 64)
    if key_name != sig_name:
        return False
    try:
        VerifyKey(raw_key).verify(message.encode(), raw_sig)
    except BadSignatureError:
        return False
    return True


# ---------------------------------------------------------------- NAR serialisation

def nar_string(raw):
    return len(raw).to_bytes(8, "little") + raw + b"\0" * (-len(raw) % 8)


def nar_chunks(path):
    """Yield the NAR serialisation of path, as `nix-store --dump` writes it."""
    yield nar_string(b"nix-archive-1")
    yield from nar_node(os.fsencode(path))


def nar_node(path):
    info = os.lstat(path)
    yield nar_string(b"(") + nar_string(b"type")
    if stat.S_ISLNK(info.st_mode):
        yield nar_string(b"symlink") + nar_string(b"target") + nar_string(os.readlink(path))
    elif stat.S_ISDIR(info.st_mode):
        yield nar_string(b"directory")
        for entry in sorted(os.listdir(path)):
            yield nar_string(b"entry") + nar_string(b"(") + nar_string(b"name") + nar_string(entry) + nar_string(b"node")
            yield from nar_node(os.path.join(path, entry))
            yield nar_string(b")")
    elif stat.S_ISREG(info.st_mode):
        yield nar_string(b"regular")
        if info.st_mode & stat.S_IXUSR:
            yield nar_string(b"executable") + nar_string(b"")
        yield from nar_file_contents(path, info.st_size)
    else:
        raise ValueError(f"{os.fsdecode(path)}: cannot serialise a file of this type into a NAR")
    yield nar_string(b")")


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
