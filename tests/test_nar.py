"""Our NAR serialiser and hash encodings agree with real Nix, byte for byte."""
import base64
import hashlib
import subprocess

import pytest

from support import write_derivation
from post_build_hook import (nar_chunks, nar_hash_and_size, nix_base32_decode, nix_base32_encode,
                             normalize_nar_hash, parse_store_path)

# One output per kind of NAR node; `out` is a tree holding all of them, nested.
NODE_KINDS = ("out", "file", "exe", "link", "empty")
TREE_SCRIPT = """
set -e
printf 'hello\\n' > $file
printf '#!/bin/sh\\necho hi\\n' > $exe; chmod +x $exe
ln -s /nix/store/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee-missing/bin/x $link
: > $empty
mkdir -p $out/a/b/c $out/empty-dir
printf 'twelve bytes' > $out/a/b/c/deep
printf 'exactly 16 bytes' > $out/a/sixteen
printf '#!/bin/sh\\n' > $out/a/b/run; chmod 755 $out/a/b/run
: > $out/a/empty
ln -s a/b/c/deep $out/relative-link
ln -s ../../missing $out/a/b/dangling
for name in B a.b a-b _x Z0 'with space'; do echo "$name" > "$out/$name"; done
"""


@pytest.fixture(scope="module")
def built_nodes(nix, tmp_path_factory):
    """{output name: store path} of one real build with every kind of node."""
    nix_file = write_derivation(tmp_path_factory.mktemp("nar"), "nar-kinds", TREE_SCRIPT, outputs=NODE_KINDS)
    env = nix()
    drv_path = nix_output(["nix-instantiate", str(nix_file)], env).strip()
    nix_output(["nix-store", "--realise", drv_path], env)
    paths = {parse_store_path(path)[1]: path
             for path in nix_output(["nix-store", "--query", "--outputs", drv_path], env).split()}
    # Nix names an output path <name>-<output>, except `out`, which is plain <name>.
    return {kind: paths["nar-kinds" if kind == "out" else f"nar-kinds-{kind}"] for kind in NODE_KINDS}


def nix_output(args, env, binary=False):
    return subprocess.run(args, env=env, capture_output=True, check=True, text=not binary).stdout


@pytest.mark.parametrize("kind", NODE_KINDS)
def test_serialisation_equals_nix_store_dump(built_nodes, nix, kind):
    dumped = nix_output(["nix-store", "--dump", built_nodes[kind]], nix(), binary=True)
    assert b"".join(nar_chunks(built_nodes[kind])) == dumped


@pytest.mark.parametrize("kind", NODE_KINDS)
def test_hash_and_size_equal_nix_store_query(built_nodes, nix, kind):
    path = built_nodes[kind]
    expected_hash = nix_output(["nix-store", "-q", "--hash", path], nix()).strip()
    expected_size = int(nix_output(["nix-store", "-q", "--size", path], nix()))
    assert nar_hash_and_size(path) == (expected_hash, expected_size)


def test_tree_output_really_holds_every_kind(built_nodes):
    dumped = b"".join(nar_chunks(built_nodes["out"]))
    for marker in (b"executable", b"symlink", b"directory", b"regular", b"with space"):
        assert marker in dumped


DEEP_SCRIPT = """
mkdir $out; cd $out; i=0
while [ $i -lt 1200 ]; do mkdir a; cd a; i=$((i + 1)); done
printf deep > f
"""


def test_an_output_nested_deeper_than_pythons_recursion_limit_is_hashed_as_nix_does(nix, tmp_path):
    """Reviewed: the serialiser recursed, and an output 1,000 directories deep ended the diff hook in a RecursionError."""
    env = nix()
    drv_path = nix_output(["nix-instantiate", str(write_derivation(tmp_path, "nar-deep", DEEP_SCRIPT))], env).strip()
    path = nix_output(["nix-store", "--realise", drv_path], env).strip()
    expected_hash = nix_output(["nix-store", "-q", "--hash", path], env).strip()
    expected_size = int(nix_output(["nix-store", "-q", "--size", path], env))
    assert nar_hash_and_size(path) == (expected_hash, expected_size)


# ---------------------------------------------------------------- hash encodings

SAMPLE_DIGESTS = [hashlib.sha256(text).digest() for text in (b"", b"nix", b"hash-collection" * 99)] + [
    bytes(32), b"\xff" * 32, bytes(range(32))]


@pytest.mark.parametrize("raw", SAMPLE_DIGESTS, ids=lambda raw: raw.hex()[:8])
def test_base32_matches_nix_hash(nix, raw):
    expected = nix_output(["nix-hash", "--type", "sha256", "--to-base32", raw.hex()], nix()).strip()
    assert nix_base32_encode(raw) == expected
    assert nix_base32_decode(expected, 32) == raw


def test_base32_of_empty_string_sha256():
    assert nix_base32_encode(hashlib.sha256(b"").digest()) == "0mdqa9w1p6cmli6976v4wi0sw9r4p5prkj7lzfd1877wk11c9c73"


@pytest.mark.parametrize("raw", SAMPLE_DIGESTS, ids=lambda raw: raw.hex()[:8])
def test_every_spelling_normalises_to_the_same_hash(raw):
    canonical = "sha256:" + nix_base32_encode(raw)
    spellings = [canonical, "sha256:" + raw.hex(), "sha256:" + raw.hex().upper(),
                 "sha256-" + base64.b64encode(raw).decode()]
    assert {normalize_nar_hash(spelling) for spelling in spellings} == {canonical}


def test_sri_spelling_from_nix_path_info_normalises_to_nix_store_hash(built_nodes, nix):
    import json
    info = json.loads(nix_output(["nix", "path-info", "--json", built_nodes["file"]], nix()))[0]
    expected = nix_output(["nix-store", "-q", "--hash", built_nodes["file"]], nix()).strip()
    assert normalize_nar_hash(info["narHash"]) == expected


@pytest.mark.parametrize("spelling", [
    "md5:" + "0" * 32,
    "sha512:" + "0" * 128,
    "sha256:" + "0" * 63,
    "sha256:" + "e" * 52,           # 'e' is not in nix base32
    "sha256:" + "z" * 52,           # decodes to more than 32 bytes
    "sha256-" + base64.b64encode(bytes(31)).decode(),
    "sha256-not base64!",
    "0" * 64,
    "",
    None,
])
def test_wrong_algorithms_and_lengths_are_rejected(spelling):
    with pytest.raises(ValueError):
        normalize_nar_hash(spelling)
