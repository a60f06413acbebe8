"""Issue 17, item 4 (+ kill -9 during gc / retention): deletes never leave the root."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import shardckpt
from shardckpt.io.fsutil import HOST
from shardckpt.tools.gc import gc

from ._util import PY, REPO, cli, dead_pid, equal, load_fresh, make_state


def _lease_looking_files(d: str, pid: int) -> list[str]:
    os.makedirs(d, exist_ok=True)
    out = []
    for i in range(3):
        p = os.path.join(d, f"{pid}-{HOST}-{i:08x}.json")
        with open(p, "w") as f:
            json.dump({"name": "step_00000001", "pid": pid, "host": HOST, "time": time.time()}, f)
        out.append(p)
    return out


def test_symlinked_readers_dir_is_never_cleaned(tmp_path):
    root = str(tmp_path / "root")
    victim = str(tmp_path / "victim")
    files = _lease_looking_files(victim, dead_pid())
    os.makedirs(root)
    os.symlink(victim, os.path.join(root, ".readers"))
    mgr = shardckpt.CheckpointManager(root, keep_last=1)
    for s in range(1, 4):  # retention runs after each save and reads leases
        mgr.save(s, make_state(s))
    out = make_state(0)
    assert mgr.restore(out) == 3  # restore takes (and would clean) leases too
    mgr.close()
    gc(root, keep_last=1, older_than=0)
    r = cli("gc", root, "--keep-last", "1", "--older-than", "0")
    assert r.returncode == 0, r.stderr
    assert all(os.path.exists(p) for p in files), os.listdir(victim)
    assert os.path.islink(os.path.join(root, ".readers"))


def test_symlinked_lease_file_target_is_not_deleted(tmp_path):
    root = str(tmp_path / "root")
    mgr = shardckpt.CheckpointManager(root, keep_last=1)
    mgr.save(1, make_state(1))
    victim = str(tmp_path / "victim.json")
    with open(victim, "w") as f:
        json.dump({"name": "step_00000001", "pid": dead_pid(), "host": HOST,
                   "time": time.time()}, f)
    os.makedirs(os.path.join(root, ".readers"), exist_ok=True)
    os.symlink(victim, os.path.join(root, ".readers", f"1-{HOST}-deadbeef.json"))
    mgr.save(2, make_state(2))
    mgr.close()
    gc(root, keep_last=1, older_than=0)
    assert os.path.exists(victim)


_GC_WORKER = """
import sys, time
from shardckpt.tools.gc import gc
print("ready", flush=True)
while True:
    gc(sys.argv[1], keep_last=1, older_than=0)
"""

_RETENTION_WORKER = """
import sys, torch, shardckpt
from tests.fault._util import make_state
mgr = shardckpt.CheckpointManager(sys.argv[1], keep_last=1)
print("ready", flush=True)
s = 100
while True:
    s += 1
    mgr.save(s, make_state(s % 7))
"""


def _kill_during(worker: str, root: str, delay: float) -> None:
    p = subprocess.Popen([PY, "-c", worker, root], stdout=subprocess.PIPE, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
    assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
    time.sleep(delay)
    p.send_signal(signal.SIGKILL)
    p.wait()


def _check_root(root: str) -> None:
    """Every committed checkpoint loads bitwise; leftovers are only hidden names gc removes."""
    infos = shardckpt.list_checkpoints(root)
    assert infos, os.listdir(root)
    for i in infos:
        assert i.problem is None, i
        seed = i.step % 7 if i.step > 100 else i.step
        like = make_state(seed)
        assert equal(load_fresh(i.path, like), like), i.path
    for e in os.listdir(root):
        assert e.startswith((".", "step_")) or e in ("latest.json", "best.json"), e
    latest = shardckpt.latest(root)
    assert latest is not None and os.path.isdir(latest)


def test_kill9_during_gc_and_retention(tmp_path):
    for n, (worker, delays) in enumerate(((_GC_WORKER, (0.05, 0.4)),
                                          (_RETENTION_WORKER, (0.3, 1.5)))):
        for d in delays:
            root = str(tmp_path / f"root{n}-{d}")
            mgr = shardckpt.CheckpointManager(root, keep_last=None)
            for s in range(1, 9):
                mgr.save(s, make_state(s))
            mgr.close()
            _kill_during(worker, root, d)
            _check_root(root)
            gc(root, older_than=0)  # the killed process is dead: its leftovers go now
            assert not [e for e in os.listdir(root) if ".partial-" in e or ".old-" in e]
            _check_root(root)
