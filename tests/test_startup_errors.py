"""What keeps `python web.py` or ./create_user from starting is one line naming the port or path, and exit status 1."""
import os
import pwd
import subprocess
import sys

from support import REPO, free_port

# Started as root, so the interpreter and the modules under root's home are loaded,
# then the rest runs as nobody: the database checks meet a real other user.
AS_NOBODY = f"""
import os, sys
sys.path.insert(0, {str(REPO)!r})
import encodings.idna, pwd, waitress, web  # idna: the log origin is the host name
nobody = pwd.getpwnam("nobody")
os.setgroups([]); os.setgid(nobody.pw_gid); os.setuid(nobody.pw_uid)
sys.exit(web.main(sys.argv[1:]))
"""


def start_web(*args, as_nobody=False):
    command = [sys.executable, "-c", AS_NOBODY] if as_nobody else [sys.executable, str(REPO / "web.py")]
    return subprocess.run([*command, "--host", "127.0.0.1", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=30)


def one_line_failure(completed):
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1, completed.stderr
    assert "serving on" not in completed.stdout
    return completed.stderr.strip()


def test_a_second_server_on_the_same_port_says_the_port_is_taken(server, tmp_path):
    line = one_line_failure(start_web("--port", server.port, "--db", tmp_path / "second.db"))
    assert line.startswith("web.py: ") and f"127.0.0.1:{server.port}" in line and "in use" in line


def test_db_that_is_a_directory_is_named(tmp_path):
    line = one_line_failure(start_web("--port", free_port(), "--db", tmp_path))
    assert f"database {tmp_path} is a directory" in line


def test_db_in_a_missing_directory_is_named(tmp_path):
    line = one_line_failure(start_web("--port", free_port(), "--db", tmp_path / "missing" / "hashes.db"))
    assert f"directory {tmp_path / 'missing'} does not exist" in line


def test_db_that_is_not_a_database_is_named(tmp_path):
    db = tmp_path / "hashes.db"
    db.write_bytes(b"not sqlite " * 1000)
    line = one_line_failure(start_web("--port", free_port(), "--db", db))
    assert f"database {db}" in line and "not a database" in line


def test_db_in_a_directory_the_user_cannot_write_is_named(shared_directory):
    db = shared_directory / "hashes.db"
    line = one_line_failure(start_web("--port", free_port(), "--db", db, as_nobody=True))
    assert f"cannot create database {db}: directory {shared_directory} is not writable (running as nobody)" in line
    assert not db.exists()


def test_db_owned_by_another_user_is_named(shared_directory):
    db = shared_directory / "hashes.db"
    db.touch(mode=0o600)  # root's
    os.chown(shared_directory, pwd.getpwnam("nobody").pw_uid, -1)
    line = one_line_failure(start_web("--port", free_port(), "--db", db, as_nobody=True))
    assert f"cannot read database {db} (running as nobody; the file's owner is uid 0)" in line


def test_create_user_with_a_directory_as_db_says_so(tmp_path):
    completed = subprocess.run([str(REPO / "create_user"), "alice", "--db", str(tmp_path)], cwd=REPO,
                               capture_output=True, text=True, env={**os.environ, "PYTHON": sys.executable})
    assert completed.returncode == 1 and "Traceback" not in completed.stderr
    assert completed.stderr.strip() == f"create_user: database {tmp_path} is a directory; --db takes a file, " \
                                       f"e.g. {tmp_path / 'hashes.db'}"
