"""kill -9 of an incremental run: during a save, while retiring, while sweeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import shardckpt
from shardckpt.manager import refcount
from shardckpt.tools.gc import gc
from tests.workers import incremental as W

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_until_parked(point: str, root: str, flag: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.workers.incremental", "park", point,
                             root, flag], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while not os.path.exists(flag):
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stdout.read().decode()}")
            assert time.time() < deadline, "child never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def _every_committed_checkpoint_loads(root: str) -> list[int]:
    steps = []
    for i in shardckpt.list_checkpoints(root):
        st = W.empty_state()
        shardckpt.load(st, i.path)
        assert W.matches(st, i.step), i.name
        assert shardckpt.verify(i.path, deep=True).ok
        steps.append(i.step)
    # and nothing a committed checkpoint references is gone
    refs = refcount.references(root)
    for name, users in refs.users.items():
        assert os.path.isdir(os.path.join(root, name)), (name, users)
    return steps


@pytest.mark.parametrize("point,listed", [("data", [3, 4]), ("published", [4, 5]),
                                          ("lease", [3, 4]), ("retire", [5, 6]),
                                          ("sweep", [4, 5])])
def test_kill9_leaves_every_committed_checkpoint_loadable(tmp_path, point, listed):
    root, flag = str(tmp_path / "root"), str(tmp_path / "flag")
    _run_until_parked(point, root, flag)
    steps = _every_committed_checkpoint_loads(root)
    # "retire" parks after step 6 committed, before step 4 (still listed) is retired
    assert steps[-2:] == listed, steps
    # the next run of the manager (and gc) finish what the killed one left
    mgr = W.manager(root)
    st = W.empty_state()
    newest = mgr.restore(st)
    assert newest == steps[-1] and W.matches(st, newest)
    mgr.save(newest + 1, W.state_at(newest + 1))
    gc(root, older_than=0)
    assert not [e for e in os.listdir(root) if ".partial-" in e or ".old-" in e]
    # the killed run's lease (its process is dead) protects nothing and is gone
    assert not os.listdir(os.path.join(root, ".readers"))
    assert _every_committed_checkpoint_loads(root)[-2:] == [newest, newest + 1]
