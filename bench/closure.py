"""A synthetic Nix closure as a CycloneDX SBOM, for benchmarks and load tests.

The shape is what nix-build-sbom and nix-runtime-tree-to-sbom write: the root in
metadata.component, every component with nix:out_path, nix:drv_path and nix:output
properties, and dependencies listing each path's references by bom-ref. Package
names repeat with version suffixes and some paths are extra outputs (lib, dev, man),
as in a real closure. The same seed always gives the same closure.
usage: python bench/closure.py PATHS [--seed S] > sbom.json
"""
import argparse
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from post_build_hook import NIX_BASE32, STORE_DIR  # noqa: E402

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
