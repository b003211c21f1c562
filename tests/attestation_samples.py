"""Sample store paths, hashes and attestations for the attestation tests.

Every value is valid as Nix defines it and unique within a test run, so tests
never collide with each other, and none depends on randomness.
"""
import base64
import contextlib
import hashlib
import io
import itertools

from post_build_hook import STORE_DIR, basename_of, nix_base32_encode

_serial = itertools.count()


def nar_hash_bytes():
    """Fresh raw bytes of a sha256 NAR hash."""
    return hashlib.sha256(f"nar {next(_serial)}".encode()).digest()


def base32_form(raw):
    return "sha256:" + nix_base32_encode(raw)


def hex_form(raw):
    return "sha256:" + raw.hex()


def sri_form(raw):
    return "sha256-" + base64.b64encode(raw).decode()


def store_digest():
    """32 nix-base32 characters, the hash part of a store path."""
    return nix_base32_encode(hashlib.sha256(f"path {next(_serial)}".encode()).digest())[-32:]


def out_path(name="hello-2.12"):
    return f"{STORE_DIR}/{store_digest()}-{name}"


def drv_ident(name="hello-2.12"):
    return f"{store_digest()}-{name}"


def drv_path_of(ident):
    return f"{STORE_DIR}/{ident}.drv"


def first_generation(path, nar_hash, sig="", **optional):
    return {"output_path": path, "output_hash": nar_hash, "output_sig": sig, **optional}


def lila_generation(path, nar_hash, sig="", **optional):
    digest, _, name = basename_of(path).partition("-")
    return {"output_digest": digest, "output_name": name, "output_hash": nar_hash, "output_sig": sig, **optional}


def batch_item(path, nar_hash, drv_path=None, sig="", **optional):
    return {"drv_path": drv_path, "output_path": path, "output_hash": nar_hash, "output_sig": sig, **optional}


def create_user_in_process(db, *args):
    """Runs create_user's command line in this process (no interpreter start-up); returns the last word."""
    import create_user
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = create_user.main([*args, "--db", str(db)])
    assert status == 0, printed.getvalue()
    return printed.getvalue().split()[-1]


def nix_key_pair(name):
    """(secret key, public key) as `nix key generate-secret` and `convert-secret-to-public` spell them."""
    from nacl.signing import SigningKey
    signing_key = SigningKey(hashlib.sha256(f"key {name} {next(_serial)}".encode()).digest())
    public = bytes(signing_key.verify_key)
    return (f"{name}:{base64.b64encode(bytes(signing_key) + public).decode()}",
            f"{name}:{base64.b64encode(public).decode()}")


def signed_attestation(secret_key, nar_size=1024, references=()):
    """A first-generation attestation with size, references and a good signature by secret_key."""
    from post_build_hook import fingerprint, sign_fingerprint
    path, nar_hash = out_path(), base32_form(nar_hash_bytes())
    signature = sign_fingerprint(secret_key, fingerprint(path, nar_hash, nar_size, list(references)))
    return first_generation(path, nar_hash, signature, nar_size=nar_size, references=list(references))
