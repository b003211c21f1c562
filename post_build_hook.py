#!/usr/bin/env python3
"""nix-hash-collection client: Nix post-build-hook, diff-hook and tools.

This file also holds the Nix format rules (store paths, hash encodings,
fingerprints, signatures, NAR) that web.py imports, so each rule has one home.
"""
import base64
import hashlib
import json
import os
import re
import stat
import sys
import time

STORE_DIR = "/nix/store"
NIX_BASE32 = "0123456789abcdfghijklmnpqrsvwxyz"
SHA256_BYTES = 32
SHA256_BASE32_LEN = 52
DIGEST_RE = re.compile(r"[0123456789abcdfghijklmnpqrsvwxyz]{32}")
# Nix's own rule for the name part: this set of characters, no leading dot.
NAME_RE = re.compile(r"[A-Za-z0-9+_?=-][A-Za-z0-9+._?=-]{0,210}")
STORE_BASENAME_RE = re.compile(r"([0123456789abcdfghijklmnpqrsvwxyz]{32})-(" + NAME_RE.pattern + r")")


# ---------------------------------------------------------------- nix base32

# Nix base32 is the little-endian integer of the bytes, printed most significant
# digit first, so Python's big integers do the bit shuffling.
TO_STANDARD_BASE32 = str.maketrans(NIX_BASE32, "0123456789abcdefghijklmnopqrstuv")


def nix_base32_encode(raw):
    length = (len(raw) * 8 - 1) // 5 + 1
    number = int.from_bytes(raw, "little")
    return "".join(NIX_BASE32[(number >> (5 * n)) & 31] for n in range(length - 1, -1, -1))


def nix_base32_decode(text, size):
    bad = set(text) - set(NIX_BASE32)
    if bad or not text:
        raise ValueError(f"invalid nix base32 character {min(bad)!r}" if bad else "empty nix base32 string")
    try:
        return int(text.translate(TO_STANDARD_BASE32), 32).to_bytes(size, "little")
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


# ================================================================ the client
# Everything below runs inside Nix's build loop. A post-build hook that exits
# non-zero makes Nix stop building, so every hook path exits 0, bounds its
# network time, and keeps what it could not deliver in the spool.

DEFAULT_TIMEOUT = 5.0
ROOT_SPOOL = "/var/lib/hash-collection/spool"
NIX_QUERY_TIMEOUT = 60
FINISHING_TIME = 0.1  # of the time budget, kept back to spool the report and exit
PREFIX = "hash-collection:"


def say(message):
    print(f"{PREFIX} {message}", file=sys.stderr, flush=True)


class ConfigError(Exception):
    """Something the user must fix in the environment; shown as one line."""


class StoreQueryError(Exception):
    """A nix command failed; the message is its last line of stderr."""


# ---------------------------------------------------------------- configuration

class Config:
    def __init__(self, server, token, secret_key, key_problem, spool, timeout):
        self.server = server
        self.token = token
        self.secret_key = secret_key
        self.key_problem = key_problem
        self.spool = spool
        self.timeout = timeout


def load_config(env):
    server = env.get("HASH_COLLECTION_SERVER", "").strip().rstrip("/")
    if not server:
        raise ConfigError("HASH_COLLECTION_SERVER is not set, so there is no server to report to")
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        raise ConfigError("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set; the server needs a token")
    secret_key, key_problem = load_secret_key(env)
    return Config(server, token, secret_key, key_problem, spool_directory(env), timeout_of(env))


def read_secret(env, name):
    """The secret from NAME_FILE (recommended) or NAME (the original's interface), or None."""
    path = env.get(name + "_FILE")
    if path:
        try:
            with open(path) as handle:
                return handle.read().strip() or None
        except OSError as error:
            raise ConfigError(f"cannot read {name}_FILE={path}: {error.strerror} ({running_as()})") from None
    return env.get(name, "").strip() or None


def load_secret_key(env):
    """(key text, None) or (None, why there is no usable key): the key is optional."""
    try:
        secret_key = read_secret(env, "HASH_COLLECTION_SECRET_KEY")
    except ConfigError as error:
        return None, str(error)
    if not secret_key:
        return None, "neither HASH_COLLECTION_SECRET_KEY_FILE nor HASH_COLLECTION_SECRET_KEY is set"
    try:
        parse_key(secret_key, 64)
    except ValueError as error:
        return None, f"the secret key is not the output of `nix key generate-secret`: {error}"
    return secret_key, None


def running_as():
    import pwd
    try:
        return "running as " + pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return f"running as uid {os.getuid()}"


def timeout_of(env):
    text = env.get("HASH_COLLECTION_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"HASH_COLLECTION_TIMEOUT must be a positive number of seconds, got {text!r}")
    return seconds


def spool_directory(env):
    """Where undelivered reports wait. Computed without touching the disk: HOME may not exist."""
    if env.get("HASH_COLLECTION_SPOOL"):
        return env["HASH_COLLECTION_SPOOL"]
    if os.getuid() == 0:
        return ROOT_SPOOL
    state_home = env.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):
        home = env.get("HOME") or home_of_current_user()
        state_home = os.path.join(home, ".local", "state")
    return os.path.join(state_home, "hash-collection", "spool")


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
    return run_nix(["nix-store", "--query", "--outputs", drv_path], env).split()


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
    return [path if path.startswith("/") else f"{STORE_DIR}/{path}" for path in paths if path]


class PathInfo:
    def __init__(self, out_path, nar_hash, nar_size, references):
        self.out_path = out_path
        self.nar_hash = nar_hash
        self.nar_size = nar_size
        self.references = references


def path_infos(out_paths, env):
    """NAR hash, size and references of valid store paths, in one nix call."""
    # `--dump-db PATHS` prints Nix's registration format, unchanged since Nix 1.x:
    # path, base16 NAR hash, NAR size, deriver, reference count, references.
    lines = run_nix(["nix-store", "--dump-db", *out_paths], env).splitlines()
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
    return [infos[path] for path in out_paths]


def references_of(out_path, env):
    return run_nix(["nix-store", "--query", "--references", out_path], env).split()


# ---------------------------------------------------------------- reports

def attestation(info, secret_key):
    """One output in lila's field names, plus what a verifier needs to rebuild the fingerprint."""
    digest, name = parse_store_path(info.out_path)
    entry = {"output_digest": digest, "output_name": name, "output_hash": info.nar_hash,
             "output_sig": "", "nar_size": info.nar_size}
    if info.references is None:
        return entry
    entry["references"] = sorted(info.references)
    if secret_key:
        entry["output_sig"] = sign_fingerprint(
            secret_key, fingerprint(info.out_path, info.nar_hash, info.nar_size, info.references))
    return entry


def new_report(drv_path, attestations):
    return {"drv_ident": drv_ident_of(drv_path), "attestations": attestations}


# ---------------------------------------------------------------- the spool

class Spool:
    """Undelivered reports, one JSON file each, oldest first.

    Files appear by rename from tmp/, so a reader never sees half a report, and
    nothing but finished reports ever sits in the spool directory itself.
    """

    def __init__(self, directory):
        self.directory = directory

    def report_files(self):
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        return sorted(os.path.join(self.directory, name) for name in names if name.endswith(".json"))

    def add(self, report):
        return self.write(os.path.join(self.directory, report_file_name(report)), report)

    def add_rejected(self, report, reason):
        """Kept with the server's reason, so it is neither lost nor retried forever."""
        rejected = os.path.join(self.directory, "rejected", report_file_name(report))
        return self.write(rejected, {**report, "rejected": reason})

    def reject(self, report_file, report, reason):
        self.add_rejected(report, reason)
        self.remove(report_file)

    def remove(self, report_file):
        try:
            os.unlink(report_file)
        except FileNotFoundError:
            pass  # another hook run delivered it at the same time

    def write(self, final_path, report):
        import tempfile
        tmp_directory = os.path.join(self.directory, "tmp")
        os.makedirs(tmp_directory, mode=0o700, exist_ok=True)
        os.makedirs(os.path.dirname(final_path), mode=0o700, exist_ok=True)
        descriptor, tmp_path = tempfile.mkstemp(dir=tmp_directory, suffix=".json")
        try:
            with os.fdopen(descriptor, "w") as handle:
                json.dump(report, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(tmp_path, final_path)
        except BaseException:
            os.unlink(tmp_path)
            raise
        return final_path


def report_file_name(report):
    # The time first, so that sorting the names gives the oldest report first.
    return f"{time.time_ns()}-{os.getpid()}-{report.get('drv_ident', 'unknown')}.json"


def read_report(report_file):
    with open(report_file) as handle:
        return json.loads(handle.read())


# ---------------------------------------------------------------- delivery

DELIVERED, REJECTED, KEPT = "delivered", "rejected", "kept"


class Delivery:
    """Posts reports until the server fails once or, for a hook, its time budget is spent."""

    def __init__(self, config, started=None):
        """With started (a time.monotonic()), the whole run from then on gets config.timeout; else each request does."""
        self.config = config
        self.deadline = None if started is None else started + config.timeout - FINISHING_TIME
        self.stopped_because = None
        self.session = None

    def post(self, report):
        """(DELIVERED | REJECTED | KEPT, reason)."""
        import requests  # before measuring what is left: the import alone takes a tenth of a second
        remaining = self.time_left()
        if self.stopped_because is None and remaining <= 0:
            self.stopped_because = f"the {self.config.timeout:g} s time budget is spent"
        if self.stopped_because:
            return KEPT, self.stopped_because
        url = f"{self.config.server}/attestation/{report['drv_ident']}"
        try:
            response = self.http().post(url, json=report["attestations"], timeout=remaining,
                                        headers={"Authorization": f"Bearer {self.config.token}"})
        except requests.RequestException as error:
            self.stopped_because = f"{self.config.server} unreachable: {error.__class__.__name__}"
            return KEPT, self.stopped_because
        if 200 <= response.status_code < 300:
            return DELIVERED, None
        reason = server_reason(response)
        if response.status_code == 400:
            return REJECTED, reason
        # Any other answer (401, 5xx, …) would repeat for every report in this run.
        self.stopped_because = reason
        return KEPT, reason

    def time_left(self):
        if self.deadline is None:
            return self.config.timeout
        return self.deadline - time.monotonic()

    def http(self):
        if self.session is None:
            import requests
            self.session = requests.Session()
        return self.session


def server_reason(response):
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    return f"HTTP {response.status_code}: {error or response.text.strip()[:200] or response.reason}"


def deliver_spool(spool, delivery):
    """Send spooled reports, oldest first, until delivery stops."""
    for report_file in spool.report_files():
        if delivery.stopped_because:
            return
        try:
            report = read_report(report_file)
        except FileNotFoundError:
            continue  # delivered by a concurrent run
        except ValueError as error:
            set_aside(spool, report_file, f"it is not JSON ({error})")
            continue
        outcome, reason = delivery.post(report)
        if outcome == DELIVERED:
            spool.remove(report_file)
        elif outcome == REJECTED:
            spool.reject(report_file, report, reason)
            say(f"server rejected {os.path.basename(report_file)}, moved to {spool.directory}/rejected/: {reason}")


def set_aside(spool, report_file, reason):
    rejected = os.path.join(spool.directory, "rejected")
    os.makedirs(rejected, mode=0o700, exist_ok=True)
    os.replace(report_file, os.path.join(rejected, os.path.basename(report_file)))
    say(f"moved {os.path.basename(report_file)} to {rejected}/: {reason}")


def deliver_report(config, report, delivery):
    """The hooks' delivery: spooled reports first, then this one; spool it if that fails."""
    spool = Spool(config.spool)
    try:
        deliver_spool(spool, delivery)
    except OSError:
        pass  # e.g. the diff hook's build user cannot read the spool; this report still goes out
    outcome, reason = delivery.post(report)
    if outcome == DELIVERED:
        return
    try:
        if outcome == REJECTED:
            kept = spool.add_rejected(report, reason)
            say(f"server rejected the report for {report['drv_ident']}, kept in {kept}: {reason}")
            return
        spool.add(report)
    except OSError as error:
        say(f"report for {report['drv_ident']} lost: not delivered ({reason}) and spool "
            f"{spool.directory} is not writable ({error.strerror}, {running_as()})")
        return
    say(f"report for {report['drv_ident']} spooled in {spool.directory}: {reason}")


# ---------------------------------------------------------------- commands

def post_build_hook(args, env):
    """Nix's post-build-hook: report every output of DRV_PATH."""
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
    deliver_report(config, new_report(drv_path, [attestation(info, config.secret_key) for info in infos]), delivery)
    return 0


def diff_hook(args, env):
    """Nix's diff-hook: report the rebuilt (.check) output's hash under the original output path."""
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
    deliver_report(config, new_report(drv_path, [attestation(info, config.secret_key)]), delivery)
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
    import requests
    digest, name = parse_store_path(out_path)
    try:
        response = delivery.http().get(f"{config.server}/attestations/by-output/{digest}-{name}",
                                       timeout=delivery.time_left())
    except requests.RequestException as error:
        delivery.stopped_because = f"{config.server} unreachable: {error.__class__.__name__}"
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


def is_signed_by(public_key, out_path, attested):
    try:
        message = fingerprint(out_path, attested["output_hash"], attested["nar_size"], attested["references"])
        return verify_signature(public_key, message, attested["output_sig"])
    except (KeyError, TypeError, ValueError):
        return False


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
    """Deliver everything in the spool; exit 1 when reports remain."""
    config = load_config(env)
    spool = Spool(config.spool)
    before = len(spool.report_files())
    # flush runs outside Nix's build loop: bound each request, not the whole run.
    deliver_spool(spool, Delivery(config))
    left = len(spool.report_files())
    print(f"{PREFIX} {before - left} of {before} spooled reports delivered, {left} waiting in {spool.directory}")
    return 1 if left else 0


# Hooks run inside Nix's build loop and must exit 0 whatever happens.
COMMANDS = {
    "diff-hook": (diff_hook, True),
    "flush": (flush, False),
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
            "       post_build_hook.py flush              (deliver the spool)")


if __name__ == "__main__":
    sys.exit(main())
