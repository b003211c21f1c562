"""Real builds, a real file:// binary cache made by `nix copy`, served over loopback by `python3 -m http.server`,
and report SBOMs derived from the real paths, for the report-filling tests."""
import shutil
import subprocess
import sys
from pathlib import Path

import requests

from support import REPO, bearer, free_port, nix_env, nonce, stop_process, wait_until, write_derivation

DETERMINISTIC = "echo {text} > $out"
NONDETERMINISTIC = "read x < /proc/sys/kernel/random/uuid; echo $x > $out"
CLIENT_VARIABLES = ("HASH_COLLECTION_SERVER", "HASH_COLLECTION_TOKEN", "HASH_COLLECTION_TOKEN_FILE",
                    "HASH_COLLECTION_SECRET_KEY", "HASH_COLLECTION_SECRET_KEY_FILE", "HASH_COLLECTION_SPOOL",
                    "HASH_COLLECTION_TIMEOUT", "HASH_COLLECTION_BUILD_USER_SPOOL", "HASH_COLLECTION_CACHE", "HASH_COLLECTION_CACHE_KEY", "MAX_CORES")


class Derivation:
    """A derivation in the local store: its drv path and {output name: out path}."""

    def __init__(self, drv_path, outputs):
        self.drv_path = drv_path
        self.outputs = outputs

    @property
    def out(self):
        return self.outputs["out"]


def instantiate(nix, nix_file):
    drv_path = subprocess.run(["nix-instantiate", str(nix_file)], env=nix(), capture_output=True, text=True,
                              check=True).stdout.strip()
    shown = subprocess.run(["nix", "show-derivation", drv_path], env=nix(), capture_output=True, text=True,
                           check=True).stdout
    import json
    outputs = json.loads(shown)[drv_path]["outputs"]
    return Derivation(drv_path, {name: output["path"] for name, output in outputs.items()})


def realise(nix, derivation):
    subprocess.run(["nix-store", "--realise", derivation.drv_path], env=nix(), capture_output=True, text=True,
                   check=True)
    return derivation


def depending_on(*nix_files):
    """Attributes that put other derivations' outputs into the build's environment, so References are real."""
    return " ".join(f"dep{position} = import {nix_file};" for position, nix_file in enumerate(nix_files))


def build_closure(nix, directory):
    """{label: Derivation} of a small, fully built tree:

    root -> mid -> leaf, root -> two (outputs out and dev) -> leaf, root -> nondeterministic.
    """
    directory = Path(directory)
    leaf = write_derivation(directory, "leaf", DETERMINISTIC.format(text="leaf"))
    mid = write_derivation(directory, "mid", "echo $dep0 > $out", extra=depending_on(leaf))
    two = write_derivation(directory, "two", "echo $dep0 > $out; echo dev > $dev", outputs=("out", "dev"),
                           extra=depending_on(leaf))
    nondeterministic = write_derivation(directory, "nondeterministic", NONDETERMINISTIC)
    root = write_derivation(directory, "root", "echo $dep0 $dep1 $dep2 > $out",
                            extra=depending_on(mid, two, nondeterministic))
    files = {"leaf": leaf, "mid": mid, "two": two, "nondeterministic": nondeterministic, "root": root}
    closure = {label: instantiate(nix, nix_file) for label, nix_file in files.items()}
    realise(nix, closure["root"])
    return closure


def out_paths_of(derivations):
    return sorted(out_path for derivation in derivations for out_path in derivation.outputs.values())


def query(nix, *args):
    return subprocess.run(["nix-store", "--query", *args], env=nix(), capture_output=True, text=True,
                          check=True).stdout.split()


def nar_hash(nix, out_path):
    return query(nix, "--hash", out_path)[0]


# ---------------------------------------------------------------- keys and the cache

def generate_key(nix, directory, name):
    """(secret key file, public key text) from the real `nix key generate-secret`."""
    secret_file = Path(directory) / f"{name}.secret"
    secret_file.write_text(subprocess.run(["nix", "key", "generate-secret", "--key-name", name], env=nix(),
                                          capture_output=True, text=True, check=True).stdout)
    public = subprocess.run(["nix", "key", "convert-secret-to-public"], input=secret_file.read_text(), env=nix(),
                            capture_output=True, text=True, check=True).stdout.strip()
    return secret_file, public


def copy_to_cache(nix, cache_dir, secret_file, out_paths):
    subprocess.run(["nix", "copy", "--to", f"file://{cache_dir}?secret-key={secret_file}&compression=none",
                    *out_paths], env=nix(), capture_output=True, text=True, check=True)
    return Path(cache_dir)


def narinfo_file(cache_dir, out_path):
    digest = Path(out_path).name[:32]
    return Path(cache_dir) / f"{digest}.narinfo"


def edit_narinfo(cache_dir, out_path, field, value):
    """Replace (or, with value None, drop) one field of a narinfo in the cache."""
    path = narinfo_file(cache_dir, out_path)
    lines = [line for line in path.read_text().splitlines() if not line.startswith(field + ":")]
    if value is not None:
        lines.append(f"{field}: {value}")
    path.write_text("\n".join(lines) + "\n")


class HttpDirectory:
    """`python3 -m http.server` on a free loopback port, serving one directory."""

    def __init__(self, directory):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(self.port), "--directory", str(directory)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.is_serving, what=f"http.server on {self.url}")

    def is_serving(self):
        if self.process.poll() is not None:
            raise RuntimeError("python3 -m http.server exited")
        try:
            return requests.get(self.url + "/nix-cache-info", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def stop(self):
        stop_process(self.process)


def served_copy(cache_dir, directory):
    """A private copy of the cache, so a test may tamper with it, served over HTTP; the caller stops it."""
    copy = Path(directory) / f"cache-{nonce()}"
    shutil.copytree(cache_dir, copy)
    return copy, HttpDirectory(copy)


# ---------------------------------------------------------------- reports

def sbom_of(nix, derivations, root, extra_components=()):
    """A nix-build-sbom shaped CycloneDX SBOM of the real paths: bom-ref = out path, dependencies from references."""
    components = [component(out_path, derivation.drv_path, output)
                  for derivation in derivations for output, out_path in derivation.outputs.items()]
    components += list(extra_components)
    refs = {entry["bom-ref"] for entry in components}
    dependencies = [{"ref": entry["bom-ref"],
                     "dependsOn": [reference for reference in references_if_valid(nix, entry["bom-ref"])
                                   if reference in refs and reference != entry["bom-ref"]]}
                    for entry in components]
    root_component = next(entry for entry in components if entry["bom-ref"] == root)
    return {"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
            "metadata": {"component": root_component},
            "components": [entry for entry in components if entry["bom-ref"] != root],
            "dependencies": dependencies}


def component(out_path, drv_path, output):
    properties = [{"name": "nix:out_path", "value": out_path}, {"name": "nix:output", "value": output}]
    if drv_path:
        properties.append({"name": "nix:drv_path", "value": drv_path})
    return {"type": "application", "bom-ref": out_path, "name": Path(out_path).name[33:], "version": "1",
            "properties": properties}


def references_if_valid(nix, out_path):
    completed = subprocess.run(["nix-store", "--query", "--references", out_path], env=nix(), capture_output=True,
                               text=True)
    return completed.stdout.split() if completed.returncode == 0 else []


def define_report(server, token, name, sbom):
    response = requests.put(f"{server.url}/reports/{name}", json=sbom, headers=bearer(token), timeout=10)
    assert response.status_code == 200, response.text


def report_verdicts(server, name):
    response = requests.get(f"{server.url}/reports/{name}", headers={"Accept": "application/json"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["paths"]


def attestations_of_output(server, out_path):
    response = requests.get(f"{server.url}/attestations/by-output/{Path(out_path).name}", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


# ---------------------------------------------------------------- running the scripts

def run_script(script, args, settings, nix_config=None, timeout=300):
    """A shell wrapper of the client, run as a user would, with only the given settings."""
    env = {name: value for name, value in nix_env().items() if name not in CLIENT_VARIABLES}
    env.update({name: str(value) for name, value in settings.items()})
    env["PYTHON"] = sys.executable
    if nix_config is not None:
        env["NIX_CONFIG"] = nix_config
    return subprocess.run([str(REPO / script), *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def summary_line(stdout):
    return stdout.strip().splitlines()[-1]
