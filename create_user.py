#!/usr/bin/env python3
"""Manage builders and their tokens: ./create_user NAME [TOKEN], --revoke TOKEN, --list.

A new token is made when the builder is new, when TOKEN or --new-token is given, or when
nothing else is asked (no --public-key, no --admin); it is printed last, so the last word
printed is the token and scripts can capture it. A builder's name is letters, digits and
+ . _ - (not starting with '.'), so it can appear in a URL as it is.
"""
import argparse
import re
import secrets
import sys

import web
from post_build_hook import COSIGNATURE_KEY_TYPE, parse_key, parse_verifier_key

# Nix's store-name characters without '?' and '=': a name that is safe in /signatures/<builder>/ as it is.
BUILDER_NAME_RE = re.compile(r"[A-Za-z0-9+_-][A-Za-z0-9+._-]{0,99}")

def parse_arguments(argv):
    parser = argparse.ArgumentParser(prog="create_user", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("name", nargs="?", help="builder name; created if new")
    parser.add_argument("token", nargs="?",
                        help="use this token instead of a generated one (generated tokens are safer)")
    parser.add_argument("--db", default=web.database_from_env(),
                        help="SQLite database (default: $HASH_COLLECTION_DB or ./hashes.db)")
    parser.add_argument("--admin", action="store_true", help="may replace or delete anyone's report")
    parser.add_argument("--public-key", action="append", default=[], metavar="KEYNAME:BASE64",
                        help="register a Nix public key for the builder (repeatable)")
    parser.add_argument("--witness-key", action="append", default=[], metavar="VKEY",
                        help="register a transparency-log witness key (C2SP verifier key) for the builder (repeatable)")
    parser.add_argument("--new-token", action="store_true",
                        help="also make a new token for a builder that exists (with --public-key, --witness-key or --admin)")
    parser.add_argument("--revoke", metavar="TOKEN", help="revoke this token")
    parser.add_argument("--list", action="store_true", help="list builders, their keys and token counts")
    args = parser.parse_args(argv)
    if sum([bool(args.name), bool(args.revoke), args.list]) != 1:
        parser.error("give exactly one of NAME, --revoke TOKEN or --list")
    for key in args.public_key:
        try:
            parse_key(key.strip(), 32)
        except ValueError as error:
            parser.error(f"--public-key {key!r}: {error}")
    for key in args.witness_key:
        try:
            if parse_verifier_key(key).key_type != COSIGNATURE_KEY_TYPE:
                parser.error(f"--witness-key {key!r}: not a cosignature/v1 key (type 0x04)")
        except ValueError as error:
            parser.error(f"--witness-key {key!r}: {error}")
    return args


def check_new_builder_name(name):
    if not BUILDER_NAME_RE.fullmatch(name):
        raise web.BadInput(f"builder name {name!r}: use 1 to 100 of A-Z a-z 0-9 + . _ -, not starting with '.'"
                           " (builders made before this rule keep their names)")


def new_token():
    """256 random bits, URL-safe; never starting with '-', which a command line would read as an option."""
    token = secrets.token_urlsafe(32)
    return token if not token.startswith("-") else new_token()


def wants_token(args, is_new):
    return is_new or args.new_token or bool(args.token) or not (args.public_key or args.witness_key or args.admin)


def update_builder(conn, args, token):
    """All or nothing: a key whose bytes another builder holds leaves the database as it was.

    Returns what to print: a line per key, then the token's line when one was made.
    """
    lines = []
    with web.transaction(conn):
        row = conn.execute("SELECT id FROM builders WHERE name = ?", (args.name,)).fetchone()
        if row is None:
            check_new_builder_name(args.name)
        builder_id = row[0] if row else conn.execute("INSERT INTO builders (name) VALUES (?)", (args.name,)).lastrowid
        if args.admin:
            conn.execute("UPDATE builders SET is_admin = 1 WHERE id = ?", (builder_id,))
            lines.append(f"{args.name} is an admin: may replace or delete anyone's report")
        for key in args.public_key:
            lines.append(add_key(conn, builder_id, args.name, key.strip()))
        for key in args.witness_key:
            added = conn.execute("INSERT OR IGNORE INTO witness_keys (builder_id, verifier_key) VALUES (?, ?)",
                                 (builder_id, key.strip())).rowcount
            lines.append(f"{'added witness key' if added else 'already has witness key'} {key.strip()}"
                         f" {'to' if added else 'for'} {args.name}")
        if wants_token(args, is_new=row is None):
            conn.execute("INSERT INTO tokens (builder_id, token_sha256) VALUES (?, ?)", (builder_id, web.token_digest(token)))
            lines.append(f"builder {args.name}: new token {token}")
    return lines


def add_key(conn, builder_id, name, key):
    if conn.execute("SELECT 1 FROM public_keys WHERE builder_id = ? AND public_key = ?", (builder_id, key)).fetchone():
        return f"{name} already has key {key}"
    web.register_public_key(conn, builder_id, key)
    return f"added key {key} to {name}"


def revoke_token(conn, token):
    with web.transaction(conn):
        return conn.execute("UPDATE tokens SET revoked = 1 WHERE token_sha256 = ?", (web.token_digest(token),)).rowcount


def list_builders(conn):
    rows = conn.execute(
        "SELECT builders.id, builders.name, builders.is_admin,"
        " (SELECT COUNT(*) FROM tokens WHERE builder_id = builders.id AND revoked = 0) AS tokens"
        " FROM builders ORDER BY name").fetchall()
    for row in rows:
        keys = [key for (key,) in conn.execute("SELECT public_key FROM public_keys WHERE builder_id = ?", (row["id"],))]
        witness_keys = [key for (key,) in conn.execute("SELECT verifier_key FROM witness_keys WHERE builder_id = ?",
                                                       (row["id"],))]
        admin = " admin" if row["is_admin"] else ""
        witnessing = f"; witness keys: {', '.join(witness_keys)}" if witness_keys else ""
        print(f"{row['name']}{admin}: {row['tokens']} active token(s); keys: {', '.join(keys) or 'none'}{witnessing}")


def main(argv=None):
    args = parse_arguments(argv)
    app = web.app_or_exit({"DATABASE": args.db}, program="create_user")
    with app.app_context():
        conn = web.get_db()
        if args.list:
            list_builders(conn)
        elif args.revoke:
            if not revoke_token(conn, args.revoke):
                print("create_user: no such token", file=sys.stderr)
                return 1
            print("token revoked")
        else:
            token = args.token or new_token()
            try:
                lines = update_builder(conn, args, token)
            except web.sqlite3.IntegrityError:
                print("create_user: that token is already in use", file=sys.stderr)
                return 1
            except web.BadInput as error:
                print(f"create_user: {error}", file=sys.stderr)
                return 1
            print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
