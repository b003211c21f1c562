#!/usr/bin/env python3
"""Manage builders and their tokens: ./create_user NAME [TOKEN], --revoke TOKEN, --list.

The last word printed by `create_user NAME` is the new token, so scripts can capture it.
"""
import argparse
import secrets
import sys

import web
from post_build_hook import COSIGNATURE_KEY_TYPE, parse_key, parse_verifier_key


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


def create_builder_token(conn, name, token, admin, public_keys, witness_keys=()):
    """All or nothing: a key whose bytes another builder holds leaves the database as it was."""
    with web.transaction(conn):
        conn.execute("INSERT OR IGNORE INTO builders (name) VALUES (?)", (name,))
        builder_id = conn.execute("SELECT id FROM builders WHERE name = ?", (name,)).fetchone()[0]
        if admin:
            conn.execute("UPDATE builders SET is_admin = 1 WHERE id = ?", (builder_id,))
        for key in public_keys:
            web.register_public_key(conn, builder_id, key.strip())
        conn.executemany("INSERT OR IGNORE INTO witness_keys (builder_id, verifier_key) VALUES (?, ?)",
                         [(builder_id, key.strip()) for key in witness_keys])
        conn.execute("INSERT INTO tokens (builder_id, token_sha256) VALUES (?, ?)", (builder_id, web.token_digest(token)))


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
        admin = " admin" if row["is_admin"] else ""
        print(f"{row['name']}{admin}: {row['tokens']} active token(s); keys: {', '.join(keys) or 'none'}")


def main(argv=None):
    args = parse_arguments(argv)
    app = web.create_app({"DATABASE": args.db})
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
            token = args.token or secrets.token_urlsafe(32)
            try:
                create_builder_token(conn, args.name, token, args.admin, args.public_key, args.witness_key)
            except web.sqlite3.IntegrityError:
                print("create_user: that token is already in use", file=sys.stderr)
                return 1
            except web.BadInput as error:
                print(f"create_user: {error}", file=sys.stderr)
                return 1
            print(f"builder {args.name}: new token {token}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
