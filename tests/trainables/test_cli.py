"""The shared command-line plumbing: a local Ray that the network cannot reach."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

LISTENERS = r'''
import json, os, ray
from pathlib import Path
from trainables.cli import start_ray

start_ray(None, 1)
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too

def tree(root):
    parent = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                parent[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = {root}, [root]
    while todo:
        me = todo.pop()
        kids = [c for c, pp in parent.items() if pp == me and c not in out]
        out.update(kids)
        todo.extend(kids)
    return out

def inodes(pid):
    found = set()
    for fd in Path(f"/proc/{pid}/fd").glob("*"):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found

owners = {i: pid for pid in tree(os.getpid()) for i in inodes(pid)}
listening = []
for table in ("tcp", "tcp6"):
    for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "0A" and cols[9] in owners:  # LISTEN, owned by this Ray
            listening.append([table, cols[1].split(":")[0], owners[cols[9]]])
print(json.dumps(listening))
ray.shutdown()
'''
# 127.0.0.1, ::1 and ::ffff:127.0.0.1 (an IPv4 loopback address on an IPv6 socket), as
# /proc/net/tcp{,6} write them
LOOPBACK = {"0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F"}


@pytest.mark.skipif(not os.path.isdir("/proc/net"), reason="reads /proc (Linux)")
def test_a_local_ray_listens_on_loopback_only(tmp_path):
    """Ray has no authentication: a search on a laptop must not open ports to its network."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    proc = subprocess.run([sys.executable, "-c", LISTENERS], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**env, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(listening) >= 3, listening  # GCS, raylet, object manager at least
    open_to_network = [x for x in listening if x[1] not in LOOPBACK]
    assert not open_to_network, open_to_network


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="reads Linux's /proc")
def test_a_budget_counts_from_the_command_start_not_from_after_its_imports():
    """`--time-budget` counts the start-up too: the start of a process 2 s old reads 2 s ago
    (to /proc's second), not now."""
    code = ("import time; time.sleep(2); from trainables.cli import process_start; "
            "print(time.time() - process_start())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}, check=True).stdout
    assert 1.0 <= float(out) < 60


EXIT_NOW = """
import atexit, sys, threading, time
from pathlib import Path
from trainables.cli import exit_now
out = Path(sys.argv[1])
atexit.register(lambda: (out / "atexit").write_text("ran"))
threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("done"))).start()
sys.stdout.write("said before the exit")  # no newline: left in the buffer
exit_now(3)
(out / "after").write_text("must not run")
"""


def test_exit_now_keeps_what_a_normal_exit_does_and_the_code(tmp_path):
    # what the entry points' __main__ blocks end with: threads waited for, atexit handlers run,
    # buffered output flushed, the exit code kept; only the interpreter's teardown is skipped
    done = subprocess.run([sys.executable, "-c", EXIT_NOW, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "said before the exit"
    assert (tmp_path / "thread").read_text() == "done"
    assert (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "after").exists()
