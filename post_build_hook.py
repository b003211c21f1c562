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
STORE_PATH_RE = re.compile(re.escape(STORE_DIR) + "/" + STORE_BASENAME_RE.pattern)


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


def is_store_path(path):
    return isinstance(path, str) and STORE_PATH_RE.fullmatch(path) is not None


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


def signature_is_good(public_key, message, signature):
    """verify_signature for signatures from elsewhere: a malformed one vouches for nothing."""
    try:
        return verify_signature(public_key, message, signature)
    except ValueError:
        return False


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
        return read_secret_file(f"{name}_FILE={path}", path)
    return env.get(name, "").strip() or None


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
    return secret_key_problem(env, secret_key)


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
    return [infos[path] for path in out_paths]


def references_of(out_path, env):
    return run_nix(["nix-store", "--query", "--references", "--", out_path], env).split()


# ---------------------------------------------------------------- HTTP with a deadline

class HttpError(Exception):
    """No usable answer: the connection failed, the deadline passed or the answer was too large."""


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
        return json.loads(self.body)


def http_request(method, url, seconds, max_bytes, **kwargs):
    """One HTTP exchange that ends within `seconds` whatever the peer does, with at most max_bytes of body.

    requests' timeouts bound each read, so a peer sending a byte now and then could hold
    a call forever; a watchdog shuts the socket down at the deadline instead. Redirects
    are never followed: a write must reach the server it was meant for, and a redirect
    loop must not spend the budget.
    """
    import requests
    if seconds <= 0:
        raise HttpError(f"no time left for {url}")
    watchdog = Watchdog(seconds)
    try:
        with watchdog:
            response = http_session().request(method, url, stream=True, allow_redirects=False,
                                              timeout=(seconds, seconds), **kwargs)
            with response:
                body = capped_body(response, max_bytes, watchdog)
    except requests.RequestException as error:
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
    body = bytearray()
    for chunk in response.iter_content(chunk_size=64 << 10):
        body += chunk
        if len(body) > max_bytes:
            raise HttpError(f"the answer from {response.url} is larger than {max_bytes} bytes")
        if watchdog.expired:
            break
    if watchdog.expired:
        raise HttpError(f"no complete answer from {response.url} within {watchdog.seconds:g} s")
    return bytes(body)


WATCHED = None  # per thread: the Watchdog of the request running in it


class Watchdog:
    """Shuts down the connection of this thread's request when its time is up, waking any blocked read."""

    def __init__(self, seconds):
        import threading
        self.seconds = seconds
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


def watched_connection_classes():
    """urllib3 connection pools whose connections show themselves to the thread's Watchdog."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def show(connection):
        watchdog = getattr(watched(), "watchdog", None)
        if watchdog is not None:
            watchdog.watch(connection)

    class WatchedHTTPConnection(HTTPConnection):
        def connect(self):
            show(self)
            super().connect()
            show(self)

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
    return session


def http_session():
    """One session per thread (sessions are not safe to share), each request watched by its deadline."""
    local = watched()
    if getattr(local, "session", None) is None:
        local.session = watched_session()
    return local.session


# ---------------------------------------------------------------- submissions

# A submission is what the hooks send in one POST /attestation/<drv_ident>: the
# attestations of one derivation's outputs. ("Report" is the server's SBOM report.)
SUBMISSION_CAP = 1 << 20  # bytes of one spooled submission file
SUBMISSION_FIELDS = ("drv_ident", "attestations")


def attestation(info, secret_key, source):
    """One output in lila's field names, plus what a verifier needs to rebuild the fingerprint,
    and where the hash came from ("build" or "check"; servers before schema version 3 ignore it)."""
    digest, name = parse_store_path(info.out_path)
    entry = {"output_digest": digest, "output_name": name, "output_hash": info.nar_hash,
             "output_sig": "", "nar_size": info.nar_size, "source": source}
    if info.references is None:
        return entry
    entry["references"] = sorted(info.references)
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
        submission = json.loads(text)
    except ValueError as error:
        raise ValueError(f"it is not JSON ({error})") from None
    if not isinstance(submission, dict):
        raise ValueError(f"expected a JSON object with {' and '.join(SUBMISSION_FIELDS)}, "
                         f"got a JSON {type(submission).__name__}")
    try:
        parse_store_basename(submission.get("drv_ident"))
    except ValueError as error:
        raise ValueError(f"drv_ident: {error}") from None
    attestations = submission.get("attestations")
    if not isinstance(attestations, list) or not attestations \
            or not all(isinstance(entry, dict) for entry in attestations):
        raise ValueError("attestations: expected a non-empty JSON list of objects")
    return {"drv_ident": submission["drv_ident"], "attestations": attestations}


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
    and read only if it is a regular file of an allowed owner and at most SUBMISSION_CAP bytes.
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
            raw = handle.read(SUBMISSION_CAP + 1)
            spooled.problem = f"it is larger than {SUBMISSION_CAP} bytes" if len(raw) > SUBMISSION_CAP else None
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
    """Names of spooled submissions, oldest first (the names begin with the time)."""
    names = []
    with os.scandir(directory_fd) as entries:
        for entry in entries:
            if entry.name.endswith(".json"):
                names.append(entry.name)
            if limit is not None and len(names) >= limit:
                break
    return sorted(names)


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
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path

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
    for name in ("tmp", "rejected"):
        try:
            if not stat.S_ISDIR(os.lstat(os.path.join(directory, name)).st_mode):
                return f"{name} in it is not a directory (a symbolic link?); move it away"
        except FileNotFoundError:
            continue
    return None


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
        remaining = self.time_left()
        if self.stopped_because is None and remaining <= 0:
            self.stopped_because = f"the {self.config.timeout:g} s time budget is spent"
        if self.stopped_because:
            return KEPT, self.stopped_because
        try:
            answer = http_request("POST", attestation_url(self.config.server, submission["drv_ident"]), remaining,
                                  SUBMISSION_ANSWER_CAP, json=submission["attestations"],
                                  headers={"Authorization": f"Bearer {self.config.token}"})
        except HttpError as error:
            self.stopped_because = f"{self.config.server} unreachable: {error}"
            return KEPT, self.stopped_because
        if 200 <= answer.status_code < 300:
            return DELIVERED, None
        if 300 <= answer.status_code < 400:
            return KEPT, redirect_reason(answer)
        reason = server_reason(answer)
        return (REJECTED if answer.status_code in REJECTING_STATUSES else KEPT), reason

    def time_left(self):
        if self.deadline is None:
            return self.config.timeout
        return self.deadline - time.monotonic()


def attestation_url(server, drv_ident):
    from urllib.parse import quote
    return f"{server}/attestation/{quote(drv_ident, safe='')}"


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
            if delivery.stopped_because:
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
                if delivery.stopped_because:
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
        try:
            with open(self.ledger_path) as handle:
                ledger = json.load(handle)
        except (OSError, ValueError):
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


def deliver_submission(config, submission, delivery):
    """The hooks' delivery: this submission first, then what waits; spool it if it was not delivered."""
    outcome, reason = delivery.post(submission)
    try:
        deliver_spools(config, delivery)
    except (OSError, ConfigError) as error:
        say(f"spooled submissions not delivered this time: {error}")
    if outcome == DELIVERED:
        return
    spool = Spool(config.spool)
    try:
        spool.check()
        if outcome == REJECTED:
            kept = spool.add_rejected(submission, reason)
            say(f"server rejected the submission for {submission['drv_ident']}, kept in {kept}: {reason}")
            return
        spool.add(submission)
    except (OSError, UnsafeSpool) as error:
        say(f"submission for {submission['drv_ident']} lost: not delivered ({reason}) and {error}")
        return
    say(f"submission for {submission['drv_ident']} spooled in {spool.directory}: {reason}")


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
    from urllib.parse import quote
    digest, name = parse_store_path(out_path)
    return f"{server}/attestations/by-output/{quote(f'{digest}-{name}', safe='')}"


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
        from urllib.parse import quote
        after = None
        while True:
            params = {"limit": PENDING_PAGE, **({"after": after} if after else {})}
            response = self.request("GET", f"/reports/{quote(report, safe='')}/pending", PENDING_PAGE_CAP,
                                    params=params)
            if response.status_code == 404:
                raise ConfigError(f"{self.url} has no report named {report!r} ({server_reason(response)})")
            if response.status_code != 200:
                raise ConfigError(f"cannot list the open paths of {report!r}: {server_reason(response)}")
            page = response.json()
            yield from checked_pending(page["paths"])
            after = page.get("next")
            if not after:
                return

    def report_paths(self, report):
        """The report's store paths; anything else the server sends is named and left out."""
        from urllib.parse import quote
        response = self.request("GET", f"/reports/{quote(report, safe='')}", REPORT_PATHS_CAP,
                                headers={"Accept": "application/json"})
        if response.status_code != 200:
            raise ConfigError(f"cannot read report {report!r}: {server_reason(response)}")
        paths = response.json()["paths"]  # {out_path: verdict}
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

IMPORTED, NOT_IN_CACHE, BAD_SIGNATURE, FAILED = "imported", "not in cache", "bad signature", "failed"
VERIFIED = "verified"  # a narinfo whose signature checks out, not yet imported


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


def cache_outcome(cache, pending):
    """(VERIFIED, attestation) or (NOT_IN_CACHE | BAD_SIGNATURE | FAILED, why) for one open path."""
    out_path = pending["out_path"]
    digest, _name = parse_store_path(out_path)
    try:
        response = request_with_retries("GET", f"{cache.url}/{digest}.narinfo", cache.timeout, NARINFO_CAP)
    except TransientError as error:
        return FAILED, str(error)
    if response.status_code in (404, 410):
        return NOT_IN_CACHE, None
    if response.status_code != 200:
        return FAILED, f"HTTP {response.status_code} from {cache.url}/{digest}.narinfo"
    try:
        return narinfo_attestation(cache, pending, parse_narinfo(response.text))
    except (KeyError, ValueError) as error:
        return FAILED, f"unusable narinfo: {error}"


def narinfo_attestation(cache, pending, narinfo):
    out_path = pending["out_path"]
    if narinfo["StorePath"] != out_path:
        return BAD_SIGNATURE, f"the narinfo is for {narinfo['StorePath']}"
    nar_hash = normalize_nar_hash(narinfo["NarHash"])
    nar_size = int(narinfo["NarSize"])
    references = [STORE_DIR + "/" + reference for reference in narinfo.get("References", "").split()]
    for reference in references:
        parse_store_path(reference)
    message = fingerprint(out_path, nar_hash, nar_size, references)
    trusted = [sig for sig in narinfo["Sig"] if sig.partition(":")[0] in cache.trusted_keys]
    if not trusted:
        return BAD_SIGNATURE, "no signature by " + ", ".join(sorted(cache.trusted_keys))
    for sig in trusted:
        if signature_is_good(cache.trusted_keys[sig.partition(":")[0]], message, sig):
            return VERIFIED, {"drv_path": deriver_of(narinfo, pending), "output_path": out_path,
                              "output_hash": nar_hash, "output_sig": sig, "nar_size": nar_size,
                              "references": references, "source": "cache"}
    return BAD_SIGNATURE, f"the signature by {trusted[0].partition(':')[0]} does not match NarHash, NarSize and References"


def deriver_of(narinfo, pending):
    """The narinfo's Deriver, else the report's drv path: cache.nixos.org often leaves Deriver out."""
    deriver = narinfo.get("Deriver", "")
    candidates = [] if deriver in ("", "unknown-deriver") else [f"{STORE_DIR}/{deriver}"]
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
        return FAILED, f"{error.__class__.__name__}: {error}"


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
                self.progress.record(IMPORTED, attestation["output_path"])
        elif len(batch) > 1:
            for attestation in batch:
                self.post([attestation])
        else:
            self.progress.record(FAILED, batch[0]["output_path"], f"the server refused it: {reason}")


def fetch_from_cache(args, env):
    """Import what a binary cache vouches for, with its signatures, for every open path of a report."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    report, jobs = parse_report_arguments(program_name(env, "fetch-from-cache"), args, DEFAULT_FETCH_JOBS)
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        raise ConfigError("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set; "
                          "imports need the token of the builder that stands for the cache")
    cache = load_cache(env)
    server = Server(server_url(env), token, timeout_of(env))
    open_paths = list(server.pending(report))
    progress = Progress(len(open_paths), (IMPORTED, NOT_IN_CACHE, BAD_SIGNATURE, FAILED))
    importer = Importer(server, progress)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        lookups = {pool.submit(safe_cache_outcome, cache, pending): pending for pending in open_paths}
        for lookup in as_completed(lookups):
            outcome, detail = lookup.result()
            if outcome == VERIFIED:
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
    if counts[FAILED] or counts[BAD_SIGNATURE] or (progress.total and not counts[IMPORTED]):
        return 1
    return 0


# ---------------------------------------------------------------- rebuild

REPRODUCED, DIFFERS, BUILD_FAILED, DRV_MISSING = "reproduced", "differs", "build failed", "drv missing"


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
            f"in nix.conf or NIX_CONFIG (see the README).")


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
        return DRV_MISSING, f"{drv_path} is not in the local store (nix-instantiate it first)" if drv_path \
            else "no drv path in the report and the store knows no deriver"
    if not all(store_path_is_valid(out_path, env) for out_path in out_paths):
        status, last_line = run_build(["nix-store", "--realise", "--", drv_path], env)
        if status != 0:
            return BUILD_FAILED, last_line
    status, last_line = run_build(["nix-store", "--realise", "--check", "--", drv_path], env)
    if status == 0:
        return REPRODUCED, None
    if status == NOT_DETERMINISTIC_STATUS:
        return DIFFERS, None
    return BUILD_FAILED, f"--check: {last_line}"


def safe_rebuild(drv_path, out_paths, env):
    try:
        return rebuild_derivation(drv_path, out_paths, env)
    except Exception as error:  # noqa: BLE001 - one odd derivation must not end the run
        return BUILD_FAILED, f"{error.__class__.__name__}: {error}"


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
    report, jobs = parse_report_arguments(program_name(env, "rebuild"), args, default_rebuild_jobs(env))
    require_hooks(env)
    token = read_secret(env, "HASH_COLLECTION_TOKEN")
    if not token:
        say("neither HASH_COLLECTION_TOKEN_FILE nor HASH_COLLECTION_TOKEN is set: "
            "paths you attested before are rebuilt again")
    server = Server(server_url(env), token, timeout_of(env))
    groups = paths_by_derivation(list(server.pending(report)), env)
    progress = Progress(sum(map(len, groups.values())), (REPRODUCED, DIFFERS, BUILD_FAILED, DRV_MISSING))
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

IDENTICAL, DIFFER, NO_DATA = "identical", "differ", "without data"


def parse_challenge_arguments(args):
    usage_line = "usage: challenge [PATH...] [--report NAME]"
    paths, reports, words = [], [], list(args)
    while words:
        word = words.pop(0)
        if word == "--report":
            if not words:
                raise ConfigError(f"{usage_line}: --report needs a report name")
            reports.append(words.pop(0))
        elif word.startswith("--report="):
            reports.append(word.partition("=")[2])
        elif word.startswith("-"):
            raise ConfigError(f"{usage_line}: unexpected argument {word!r}")
        else:
            paths.append(word)
    if not paths and not reports:
        raise ConfigError(f"{usage_line}: give store paths, a report, or both")
    return paths, reports


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
    """(IDENTICAL | DIFFER | NO_DATA, {hash: [builders]})."""
    builders_by_hash = {}
    for attested in attestations:
        builders = builders_by_hash.setdefault(attested["output_hash"], [])
        if attested["builder"] not in builders:
            builders.append(attested["builder"])
    if not builders_by_hash:
        return NO_DATA, builders_by_hash
    return (IDENTICAL if set(builders_by_hash) == {local_hash} else DIFFER), builders_by_hash


def comparison_lines(out_path, local_hash, outcome, builders_by_hash):
    if outcome == NO_DATA:
        return [f"{out_path}: no data"]
    if outcome == IDENTICAL:
        return [f"{out_path}: identical ({', '.join(builders_by_hash[local_hash])})"]
    lines = [f"{out_path}: differs", f"  local hash: {local_hash}"]
    for nar_hash, builders in builders_by_hash.items():
        same = " (same as local)" if nar_hash == local_hash else ""
        lines.append(f"  {', '.join(builders)}: {nar_hash}{same}")
    return lines


def challenge(args, env):
    """Compare local store paths with every builder's attestations; exit 0 identical, 2 differs, 1 errors/no data."""
    from concurrent.futures import ThreadPoolExecutor
    arguments, reports = parse_challenge_arguments(args)
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
    counts = dict.fromkeys((IDENTICAL, DIFFER, NO_DATA), 0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        lookups = pool.map(lambda out_path: attestations_or_none(server, out_path), local_hashes)
        for out_path, attestations in zip(local_hashes, lookups):
            if attestations is None:
                errors += 1
                continue
            outcome, builders_by_hash = comparison(local_hashes[out_path], attestations)
            print("\n".join(comparison_lines(out_path, local_hashes[out_path], outcome, builders_by_hash)), flush=True)
            counts[outcome] += 1
    print(f"{counted(sum(counts.values()), 'path')}: {counts[IDENTICAL]} identical, {counts[DIFFER]} differ, "
          f"{counts[NO_DATA]} without data", flush=True)
    if counts[DIFFER]:
        return 2
    return 1 if errors or not counts[IDENTICAL] else 0


def attestations_or_none(server, out_path):
    try:
        return server.attestations_of(out_path)
    except ConfigError as error:
        say(f"{out_path}: {error}")
        return None


# Hooks run inside Nix's build loop and must exit 0 whatever happens.
COMMANDS = {
    "challenge": (challenge, False),
    "fetch-from-cache": (fetch_from_cache, False),
    "rebuild": (rebuild, False),
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
            "       post_build_hook.py flush              (deliver the spooled submissions)\n"
            "       post_build_hook.py fetch-from-cache REPORT [-j N]   (import what a binary cache signed)\n"
            "       post_build_hook.py rebuild REPORT [-j N]            (rebuild and --check open paths)\n"
            "       post_build_hook.py challenge [PATH...] [--report NAME]   (compare the local store with the server)")


if __name__ == "__main__":
    sys.exit(main())
