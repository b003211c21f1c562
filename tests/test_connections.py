"""Idle connections do not stop the server: waitress's connection limit and idle timeout are settings."""
import resource
import socket
import subprocess
import sys

import requests

from support import REPO, free_port

IDLE_CONNECTIONS = 150


def test_150_idle_connections_do_not_stop_healthz_with_the_defaults(server):
    idle = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
        assert requests.get(f"{server.url}/healthz", timeout=10).status_code == 200
    finally:
        for connection in idle:
            connection.close()


def test_server_refuses_to_start_when_the_open_file_limit_cannot_hold_the_connection_limit(tmp_path):
    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    completed = subprocess.run([sys.executable, str(REPO / "web.py"), "--port", str(free_port()),
                                "--db", str(tmp_path / "hashes.db"), "--connection-limit", "1000"],
                               cwd=REPO, preexec_fn=low_limit, capture_output=True, text=True, timeout=60)
    assert completed.returncode != 0
    assert "--connection-limit 1000" in completed.stderr and "256" in completed.stderr
