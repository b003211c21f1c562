"""The README's quick start, read from README.md itself and run as written.

Only the server start is replaced: `./serve.sh &` becomes `python web.py` on a free port with a
temporary database, which the other commands reach through HASH_COLLECTION_DB and the port.
"""
import os
import re
import subprocess
import sys

import requests

from support import REPO
from web import NO_BUILDS, ONE_BUILD

SERVER_START = "./serve.sh &"


def quick_start_commands():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def test_quick_start_defines_the_example_report_with_alice_build(server):
    commands = quick_start_commands()
    assert SERVER_START in commands, "the quick start no longer starts the server as this test expects"
    script = commands.replace(SERVER_START, "").replace("http://127.0.0.1:8000", server.url)
    completed = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "HASH_COLLECTION_DB": str(server.db), "PYTHON": sys.executable},
                               timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = re.search(r"/reports/([A-Za-z0-9._-]+)", commands).group(1)
    summary = requests.get(f"{server.url}/reports/{report}", headers={"Accept": "application/json"}, timeout=10).json()
    htop = "/nix/store/5mz92n6yrn38ypfv7irxbk609p8214rd-htop-3.3.0"
    assert summary["paths"][htop] == ONE_BUILD
    assert summary["counts"][NO_BUILDS] == len(summary["paths"]) - 1 >= 3
