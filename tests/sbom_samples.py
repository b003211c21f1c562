"""Small hand-written CycloneDX SBOMs in the shapes real producers emit.

Each builder takes a closure as {name: [child names]} with the root first and
returns a Closure: the SBOM plus the store paths the server should derive from it,
so a test can state what it expects in the domain's own words.
"""
import hashlib
from dataclasses import dataclass, field

from post_build_hook import STORE_DIR, basename_of, nix_base32_encode


def digest_of(text):
    """A stable 32-character nix-base32 hash part, so samples never change between runs."""
    return nix_base32_encode(hashlib.sha256(text.encode()).digest()[:20])


def out_path(name, output="out"):
    """The output path Nix would give output `output` of a derivation named `name`."""
    suffix = "" if output == "out" else f"-{output}"
    return f"{STORE_DIR}/{digest_of('out:' + name + suffix)}-{name}{suffix}"


def drv_path(name):
    return f"{STORE_DIR}/{digest_of('drv:' + name)}-{name}.drv"


@dataclass
class Closure:
    sbom: dict
    root: str
    # name -> [out paths], in output order
    outputs: dict = field(default_factory=dict)

    def out(self, name, output_index=0):
        return self.outputs[name][output_index]

    @property
    def all_paths(self):
        return {path for paths in self.outputs.values() for path in paths}


def cyclonedx(root_component, components, dependencies):
    return {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "version": 1,
        "metadata": {"component": root_component},
        "components": components,
        "dependencies": dependencies,
    }


def nix_build_sbom(edges, property_name="nix:out_path", names=None):
    """nix-build-sbom / nix-runtime-tree-to-sbom: bom-ref is the out path, with nix:* properties.

    `names` optionally overrides the component `name` of some nodes (e.g. hostile names).
    """
    names = names or {}
    ref = {name: out_path(name) for name in edges}

    def component(name, kind):
        return {
            "type": kind,
            "bom-ref": ref[name],
            "name": names.get(name, name),
            "version": "1.0",
            "properties": [
                {"name": property_name, "value": ref[name]},
                {"name": "nix:drv_path", "value": drv_path(name)},
                {"name": "nix:output", "value": "out"},
            ],
        }

    root, *rest = edges
    sbom = cyclonedx(component(root, "application"), [component(name, "library") for name in rest],
                     [{"ref": ref[name], "dependsOn": [ref[child] for child in children]}
                      for name, children in edges.items()])
    return Closure(sbom, ref[root], {name: [ref[name]] for name in edges})


def sbomnix_sbom(edges, outputs=None):
    """sbomnix: bom-refs are .drv paths; one nix:output_path property per output."""
    outputs = outputs or {}
    out_paths = {name: [out_path(name, output) for output in outputs.get(name, ["out"])] for name in edges}

    def component(name, kind):
        properties = [{"name": "nix:output_path", "value": path} for path in out_paths[name]]
        properties.append({"name": "nix:drv_path", "value": drv_path(name)})
        return {"type": kind, "bom-ref": drv_path(name), "name": name, "version": "1.0",
                "purl": f"pkg:nix/{name}@1.0", "properties": properties}

    root, *rest = edges
    sbom = cyclonedx(component(root, "application"), [component(name, "library") for name in rest],
                     [{"ref": drv_path(name), "dependsOn": [drv_path(child) for child in children]}
                      for name, children in edges.items()])
    return Closure(sbom, out_paths[root][0], out_paths)


def bombon_sbom(edges):
    """bombon: no nix:* properties, refs are store basenames without /nix/store/."""
    basename = {name: basename_of(out_path(name)) for name in edges}

    def component(name, kind):
        return {"type": kind, "bom-ref": basename[name], "name": name, "version": "1.0",
                "purl": f"pkg:nix/{name}@1.0"}

    root, *rest = edges
    sbom = cyclonedx(component(root, "application"), [component(name, "library") for name in rest],
                     [{"ref": basename[name], "dependsOn": [basename[child] for child in children]}
                      for name, children in edges.items()])
    return Closure(sbom, out_path(root), {name: [out_path(name)] for name in edges})


def odd_sbom():
    """The oddities real nix-build-sbom files contain, all in one closure:

    - "notype" has no `type`;
    - "stringver" has `version` "1";
    - the root depends on a ref that matches no component;
    - "orphan" has no `dependencies` entry at all (and nobody depends on it);
    - "what?" has a '?' in its name and store path.
    """
    names = ["odd-root", "notype", "stringver", "what?", "orphan"]
    ref = {name: out_path(name) for name in names}
    dangling = out_path("not-a-component")

    def component(name):
        return {"type": "library", "bom-ref": ref[name], "name": name, "version": "2.0",
                "properties": [{"name": "nix:out_path", "value": ref[name]},
                               {"name": "nix:drv_path", "value": drv_path(name)},
                               {"name": "nix:output", "value": "out"}]}

    root = component("odd-root")
    root["type"] = "application"
    notype = component("notype")
    del notype["type"]
    stringver = component("stringver")
    stringver["version"] = "1"
    sbom = cyclonedx(root, [notype, stringver, component("what?"), component("orphan")], [
        {"ref": ref["odd-root"], "dependsOn": [ref["notype"], dangling, ref["stringver"]]},
        {"ref": ref["notype"], "dependsOn": [ref["what?"]]},
        {"ref": ref["stringver"], "dependsOn": []},
        {"ref": ref["what?"]},
    ])
    closure = Closure(sbom, ref["odd-root"], {name: [ref[name]] for name in names})
    closure.dangling = dangling
    return closure


# A diamond with a shared subtree: "shared" (and its child "leaf") are reached twice.
DIAMOND = {
    "app": ["left", "right"],
    "left": ["shared"],
    "right": ["shared"],
    "shared": ["leaf"],
    "leaf": [],
}

# A cycle: a -> b -> c -> a (runtime closures can have self-references and cycles).
CYCLE = {
    "cyc-root": ["cyc-a"],
    "cyc-a": ["cyc-b"],
    "cyc-b": ["cyc-a"],
}


def nar_hash(label):
    """A canonical NAR hash standing for build result `label` (same label, same hash)."""
    return "sha256:" + nix_base32_encode(hashlib.sha256(label.encode()).digest())


def attestation(path, result="good", drv=None):
    """One item for POST /attestations: builder output `path` with NAR hash of `result`."""
    return {"drv_path": drv, "output_path": path, "output_hash": nar_hash(result), "output_sig": ""}
