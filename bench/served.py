"""What every benchmark needs: `python web.py` on a free loopback port, its builders, and its memory."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_python():
    """The project's venv when there is one (it has Flask), else this Python."""
    venv_python = REPO / ".venv" / "bin" / "python"
    return str(venv_python) if venv_python.exists() else sys.executable


def start_server(db, stderr=subprocess.DEVNULL):
    """Starts web.py on a free loopback port with `db`; returns (process, url) once /healthz answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen([server_python(), str(REPO / "web.py"), "--host", "127.0.0.1", "--port", str(port),
                                "--db", str(db)], cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"bench: web.py exited with status {process.returncode}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        time.sleep(0.1)
    process.kill()
    sys.exit("bench: web.py did not become healthy within 20 s")


def create_builder(db, name):
    """Runs ./create_user as a user does; returns the new token."""
    completed = subprocess.run([str(REPO / "create_user"), name, "--db", str(db)], cwd=REPO,
                               env={**os.environ, "PYTHON": server_python()},
                               capture_output=True, text=True, check=True)
    return completed.stdout.split()[-1]


def memory_kib(pid, field):
    """VmRSS or VmHWM (peak RSS) of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))


def child_pids(pid):
    """The processes a process started (web.py's render and tree workers), from /proc."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return children


def cpu_seconds(pid):
    """User and system CPU time a process has used, from /proc/<pid>/stat: on a shared machine, what its work cost."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(pid, quiet_s=0.5, timeout_s=30):
    """Until the server and its workers have used almost no CPU for quiet_s (or timeout_s has passed): work it
    does after answering, such as removing a replaced report, would otherwise slow what is timed next."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pids = [pid, *child_pids(pid)]
        before = sum(map(cpu_seconds, pids))
        time.sleep(quiet_s)
        if sum(map(cpu_seconds, pids)) - before < 0.05 * quiet_s:
            return
