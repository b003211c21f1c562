#!/usr/bin/env python3
"""How long one post-build-hook run holds up Nix's build loop.

usage: python3 bench/hook.py [RUNS]

Starts its own server (`python web.py`) on a free port with a fresh database,
builds one one-output derivation with /bin/sh, then times:
  - the hook reporting it (with OUT_PATHS given, and empty as in Nix 2.8), run as install-hook.sh
    installs it (nix/run-client.py, from bytecode compiled at install),
    against `python3 -c "import requests, nacl.signing"` in the same run
    (target: at most 2x, so interpreter start-up dominates); and, for comparison,
    the client run as a script, which Python compiles at every run;
  - the hook with the server unreachable (connection refused, and a socket
    that accepts but never answers), against its timeout (target: within it).
Needs nix-build, nix-store and nix on PATH, and Flask for the server.
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from served import REPO, create_builder, free_port, start_server
CLIENT = REPO / "post_build_hook.py"
NIX_CONFIG = "experimental-features = nix-command\nsubstituters =\nsandbox = false"
UNREACHABLE_TIMEOUT = 2.0


def installed_client(directory):
    """The hook's command as install-hook.sh installs it: nix/run-client.py running post_build_hook.py from the
    bytecode compiled at install, in a directory of its own rather than the checkout's __pycache__."""
    prefix = Path(directory) / "client"
    prefix.mkdir()
    for source in (CLIENT, REPO / "nix" / "run-client.py"):
        shutil.copy2(source, prefix / source.name)
    subprocess.run([sys.executable, "-m", "py_compile", str(prefix / CLIENT.name)], check=True)
    return [sys.executable, str(prefix / "run-client.py"), str(prefix / CLIENT.name)]


def nix(*args):
    return subprocess.run(args, env={**os.environ, "NIX_CONFIG": NIX_CONFIG}, capture_output=True, text=True,
                          check=True).stdout.strip()


def build_one_output(directory):
    nix_file = Path(directory) / "bench.nix"
    nix_file.write_text(
        'derivation { name = "hook-bench"; system = builtins.currentSystem; builder = "/bin/sh";\n'
        f'  nonce = "{uuid.uuid4().hex}"; args = [ "-c" "echo bench > $out" ]; }}\n')
    drv_path = nix("nix-instantiate", str(nix_file))
    return drv_path, nix("nix-store", "--realise", drv_path)


def seconds_of(command, env=None, runs=1):
    """Median wall-clock seconds of running command `runs` times."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        completed = subprocess.run(command, env=env, capture_output=True, text=True)
        timings.append(time.perf_counter() - started)
        if completed.returncode != 0:
            raise SystemExit(f"bench: {command} exited {completed.returncode}: {completed.stderr}")
    return statistics.median(timings)


def hook_env(settings, drv_path, out_paths):
    env = {name: value for name, value in os.environ.items() if not name.startswith("HASH_COLLECTION_")}
    return {**env, **settings, "NIX_CONFIG": NIX_CONFIG, "DRV_PATH": drv_path, "OUT_PATHS": out_paths}


def main():
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    directory = tempfile.mkdtemp(prefix="hook-bench-")
    server = None
    try:
        drv_path, out_path = build_one_output(directory)
        key_file = Path(directory) / "secret.key"
        key_file.write_text(nix("nix", "key", "generate-secret", "--key-name", "bench-1"))
        db = Path(directory) / "hashes.db"
        server, url = start_server(db)
        settings = {"HASH_COLLECTION_SERVER": url, "HASH_COLLECTION_TOKEN": create_builder(db, "bench"),
                    "HASH_COLLECTION_SECRET_KEY_FILE": str(key_file),
                    "HASH_COLLECTION_SPOOL": str(Path(directory) / "spool")}
        hook = installed_client(directory)
        print(f"{runs} runs each, median, {sys.executable}")
        # Interleaved, so that load from elsewhere on the machine hits all alike.
        timings = {"imports": [], "given": [], "recovered": [], "script": []}
        for _ in range(runs):
            timings["imports"].append(seconds_of([sys.executable, "-c", "import requests, nacl.signing"]))
            timings["given"].append(seconds_of(hook, hook_env(settings, drv_path, out_path)))
            timings["recovered"].append(seconds_of(hook, hook_env(settings, drv_path, "")))
            timings["script"].append(seconds_of([sys.executable, str(CLIENT)], hook_env(settings, drv_path, out_path)))
        imports, given, recovered, script = (statistics.median(timings[kind])
                                             for kind in ("imports", "given", "recovered", "script"))
        print(f"import requests, nacl.signing:        {imports * 1000:7.1f} ms")
        print(f"hook, OUT_PATHS given:                {given * 1000:7.1f} ms  ratio {given / imports:.2f} (target <= 2)")
        print(f"hook, OUT_PATHS empty (Nix 2.8):      {recovered * 1000:7.1f} ms  "
              f"ratio {recovered / imports:.2f} (target <= 2)")
        print(f"the same, run as a script:            {script * 1000:7.1f} ms  ratio {script / imports:.2f}"
              " (compiled at every run; no target)")

        offline = {**settings, "HASH_COLLECTION_TIMEOUT": str(UNREACHABLE_TIMEOUT)}
        refused = seconds_of(hook, hook_env({**offline, "HASH_COLLECTION_SERVER": f"http://127.0.0.1:{free_port()}"},
                                            drv_path, out_path), runs=3)
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen(16)
            silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
            unanswered = seconds_of(hook, hook_env({**offline, "HASH_COLLECTION_SERVER": silent_url},
                                                   drv_path, out_path))
        print(f"hook, server refuses connections:     {refused * 1000:7.1f} ms  (timeout {UNREACHABLE_TIMEOUT:g} s)")
        print(f"hook, server accepts, never answers:  {unanswered * 1000:7.1f} ms  (timeout {UNREACHABLE_TIMEOUT:g} s)")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
