"""Keys and signatures have one spelling, NAME:BASE64, and one signer is one builder."""
import base64
import sqlite3

import pytest

import create_user
from attestation_samples import create_user_in_process, drv_ident, nix_key_pair, signed_attestation
from post_build_hook import fingerprint, parse_key, signature_is_good
from support import bearer

ALICE_SECRET, ALICE_PUBLIC = nix_key_pair("alice-1")
BASE64_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def relabelled(key_or_signature, name):
    return f"{name}:{key_or_signature.partition(':')[2]}"


def non_canonical(key_or_signature):
    """The same bytes spelled differently: the unused low bit of the last base64 digit set."""
    name, _sep, encoded = key_or_signature.partition(":")
    digits = encoded.rstrip("=")
    flipped = BASE64_DIGITS[BASE64_DIGITS.index(digits[-1]) ^ 1]
    return f"{name}:{digits[:-1]}{flipped}{encoded[len(digits):]}"


def alice_signature():
    return signed_attestation(ALICE_SECRET)["output_sig"]


MALFORMED = {
    "leading space": lambda sig: " " + sig,
    "trailing newline": lambda sig: sig + "\n",
    "space in name": lambda sig: relabelled(sig, "alice 1"),
    "newline in name": lambda sig: relabelled(sig, "evil\nStorePath"),
    "empty name": lambda sig: relabelled(sig, ""),
    "non-canonical base64": non_canonical,
    "missing padding": lambda sig: sig.rstrip("="),
    "base64 with a line break": lambda sig: sig[:20] + "\n" + sig[20:],
}


# ---------------------------------------------------------------- one spelling

@pytest.mark.parametrize("spoil", MALFORMED.values(), ids=MALFORMED.keys())
def test_parse_key_refuses_every_other_spelling(spoil):
    with pytest.raises(ValueError):
        parse_key(spoil(alice_signature()), 64)


def test_non_canonical_base64_still_decodes_to_the_same_bytes():
    # The check above is not vacuous: these spellings carry the very same signature.
    signature = alice_signature()
    assert base64.b64decode(non_canonical(signature).partition(":")[2]) == base64.b64decode(signature.partition(":")[2])


def test_a_signature_with_a_leading_space_does_not_verify():
    attestation = signed_attestation(ALICE_SECRET)
    message = fingerprint(attestation["output_path"], attestation["output_hash"], attestation["nar_size"], [])
    assert signature_is_good(ALICE_PUBLIC, message, attestation["output_sig"])
    assert not signature_is_good(ALICE_PUBLIC, message, " " + attestation["output_sig"])


@pytest.mark.parametrize("spoil", MALFORMED.values(), ids=MALFORMED.keys())
def test_server_refuses_a_malformed_signature_naming_the_field(client, tokens, spoil):
    attestation = signed_attestation(ALICE_SECRET)
    attestation["output_sig"] = spoil(attestation["output_sig"])
    response = client.post(f"/attestation/{drv_ident()}", json=[attestation], headers=bearer(tokens("bob")))
    assert response.status_code == 400
    assert "[0].output_sig" in response.get_json()["error"]


def test_a_refused_signature_writes_nothing(client, tokens):
    good = signed_attestation(ALICE_SECRET)
    bad = signed_attestation(ALICE_SECRET)
    bad["output_sig"] = " " + bad["output_sig"]
    response = client.post(f"/attestation/{drv_ident()}", json=[good, bad], headers=bearer(tokens("bob")))
    assert response.status_code == 400
    assert "[1].output_sig" in response.get_json()["error"]
    assert client.get(f"/attestations/by-output/{good['output_path'].rpartition('/')[2]}").get_json() == []


# ---------------------------------------------------------------- one signer, one builder

def run_create_user(db, *args, capsys):
    status = create_user.main([*args, "--db", str(db)])
    return status, capsys.readouterr()


def builder_names(db):
    with sqlite3.connect(db) as conn:
        return [name for (name,) in conn.execute("SELECT name FROM builders ORDER BY name")]


def test_key_bytes_registered_to_one_builder_are_refused_for_another(tmp_path, capsys):
    db = tmp_path / "hashes.db"
    assert run_create_user(db, "alice", "--public-key", ALICE_PUBLIC, capsys=capsys)[0] == 0
    status, printed = run_create_user(db, "mallory", "--public-key", relabelled(ALICE_PUBLIC, "mallory-1"), capsys=capsys)
    assert status != 0
    assert "already registered to builder 'alice'" in printed.err
    assert builder_names(db) == ["alice"]  # nothing of mallory was written


def test_the_same_key_bytes_under_a_second_name_are_refused_for_the_same_builder(tmp_path, capsys):
    db = tmp_path / "hashes.db"
    assert run_create_user(db, "alice", "--public-key", ALICE_PUBLIC, capsys=capsys)[0] == 0
    status, printed = run_create_user(db, "alice", "--public-key", relabelled(ALICE_PUBLIC, "alice-2"), capsys=capsys)
    assert status != 0
    assert "already registered" in printed.err


def test_registering_the_same_key_again_to_its_builder_is_harmless(tmp_path, capsys):
    db = tmp_path / "hashes.db"
    assert run_create_user(db, "alice", "--public-key", ALICE_PUBLIC, capsys=capsys)[0] == 0
    assert run_create_user(db, "alice", "--public-key", ALICE_PUBLIC, capsys=capsys)[0] == 0


def test_a_relabelled_signature_never_makes_a_second_verified_builder(app, client, tokens):
    db = app.config["DATABASE"]
    alice = create_user_in_process(db, "alice", "--public-key", ALICE_PUBLIC)
    status = create_user.main(["mallory", "--public-key", relabelled(ALICE_PUBLIC, "mallory-1"), "--db", str(db)])
    assert status != 0
    mallory = tokens("mallory")
    attestation = signed_attestation(ALICE_SECRET)
    ident = drv_ident()
    assert client.post(f"/attestation/{ident}", json=[attestation], headers=bearer(alice)).status_code == 200
    copied = {**attestation, "output_sig": relabelled(attestation["output_sig"], "mallory-1")}
    client.post(f"/attestation/{ident}", json=[copied], headers=bearer(mallory))
    stored = client.get(f"/attestations/by-output/{attestation['output_path'].rpartition('/')[2]}").get_json()
    assert [row["builder"] for row in stored if row["verified"]] == ["alice"]
