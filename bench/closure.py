"""A synthetic Nix closure as a CycloneDX SBOM, for benchmarks and load tests.

The shape is what nix-build-sbom and nix-runtime-tree-to-sbom write: the root in
metadata.component, every component with nix:out_path, nix:drv_path and nix:output
properties, and dependencies listing each path's references by bom-ref. Package
names repeat with version suffixes and some paths are extra outputs (lib, dev, man),
as in a real closure. The same seed always gives the same closure.
usage: python bench/closure.py PATHS [--seed S] > sbom.json
"""
import argparse
import base64
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from post_build_hook import NIX_BASE32, STORE_DIR, fixed_output_path, nix_base32_encode  # noqa: E402

PACKAGES = ("glibc", "bash", "coreutils", "zlib", "openssl", "python3", "perl", "systemd", "glib", "gtk+3",
            "mesa", "libffi", "ncurses", "sqlite", "curl", "expat", "freetype", "harfbuzz", "icu", "llvm")
EXTRA_OUTPUTS = ("lib", "dev", "man")


def generate_sbom(paths, seed=1, edges=6):
    """`paths` components; each depends on up to 2*edges later ones, the root on 3*edges."""
    rng = random.Random(seed)
    nodes = [closure_node(rng, number) for number in range(paths)]
    dependencies = []
    for number, node in enumerate(nodes):
        later = range(number + 1, paths)
        count = min(len(later), rng.randint(0, 2 * edges) if number else 3 * edges)
        dependencies.append({"ref": node["out"],
                             "dependsOn": [nodes[other]["out"] for other in sorted(rng.sample(later, count))]})
    return {"bomFormat": "CycloneDX", "specVersion": "1.5", "version": 1,
            "metadata": {"component": sbom_component(nodes[0], "application")},
            "components": [sbom_component(node, "library") for node in nodes[1:]], "dependencies": dependencies}


def generate_path_info(paths, seed=1, edges=6, fixed_share=0.05):
    """The same shape of closure as `nix path-info --json -r` prints it in Nix 2.8: a list of objects with
    path, narHash, narSize, references, deriver, and ca for the fixed-output share of them."""
    rng = random.Random(seed)
    nodes = [closure_node(rng, number) for number in range(paths)]
    for node in nodes[1:]:
        if rng.random() < fixed_share:
            node["ca"] = "fixed:r:sha256:" + nix_base32_encode(rng.randbytes(32))
            node["out"] = fixed_output_path(node["ca"], node["out"].partition("-")[2])
    infos = []
    for number, node in enumerate(nodes):
        later = range(number + 1, paths)
        count = min(len(later), rng.randint(0, 2 * edges) if number else 3 * edges)
        references = [nodes[other]["out"] for other in sorted(rng.sample(later, count))]
        info = {"path": node["out"], "narHash": "sha256-" + base64.b64encode(rng.randbytes(32)).decode(),
                "narSize": rng.randint(100, 10**8), "references": [] if "ca" in node else references,  # as Nix requires
                "deriver": node["drv"], "registrationTime": 1700000000, "ultimate": True}
        if "ca" in node:
            info["ca"] = node["ca"]
        infos.append(info)
    return infos


def closure_node(rng, number):
    package = f"{PACKAGES[number % len(PACKAGES)]}-{number // len(PACKAGES)}.{rng.randint(0, 9)}"
    output = rng.choice(EXTRA_OUTPUTS) if rng.random() < 0.2 else "out"
    suffix = "" if output == "out" else f"-{output}"
    return {"name": package, "output": output,
            "out": f"{STORE_DIR}/{random_digest(rng)}-{package}{suffix}",
            "drv": f"{STORE_DIR}/{random_digest(rng)}-{package}.drv"}


def random_digest(rng):
    return "".join(rng.choice(NIX_BASE32) for _ in range(32))


def sbom_component(node, kind):
    return {"type": kind, "bom-ref": node["out"], "name": node["name"],
            "properties": [{"name": "nix:out_path", "value": node["out"]},
                           {"name": "nix:drv_path", "value": node["drv"]},
                           {"name": "nix:output", "value": node["output"]}]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", type=int)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    json.dump(generate_sbom(args.paths, args.seed), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
