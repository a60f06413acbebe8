"""The shared heartbeat thread: every save in flight is touched, a finished or vanished
one no longer is, and a forked child keeps its own saves alive, not its parent's."""

from __future__ import annotations

import os
import time

from shardckpt.io.heartbeat import Heartbeat


def _age(path) -> float:  # noqa: ANN001
    return time.time() - os.stat(path).st_mtime


def _old(path) -> None:  # noqa: ANN001
    t = time.time() - 1000
    os.utime(path, (t, t))


def test_every_registered_directory_is_touched_until_it_is_removed(tmp_path):
    a, b, gone = tmp_path / "a", tmp_path / "b", tmp_path / "gone"
    for d in (a, b, gone):
        d.mkdir()
        _old(d)
    hb = Heartbeat(0.05)
    for d in (a, b, gone):
        hb.add(str(d))
    gone.rmdir()
    deadline = time.time() + 10
    while (_age(a) > 100 or _age(b) > 100) and time.time() < deadline:
        time.sleep(0.02)
    assert _age(a) < 100 and _age(b) < 100
    assert str(gone) not in hb._paths  # a vanished directory is dropped, not retried
    hb.remove(str(a))
    _old(a)
    time.sleep(0.3)
    assert _age(a) > 100 and _age(b) < 100


def test_a_forked_child_beats_for_its_own_saves_only(tmp_path):
    parent_dir, child_dir = tmp_path / "p", tmp_path / "c"
    parent_dir.mkdir()
    child_dir.mkdir()
    hb = Heartbeat(0.05)
    hb.add(str(parent_dir))
    pid = os.fork()
    if pid == 0:  # the child: a thread of its own, and not the parent's directory
        code = 1
        try:
            hb.add(str(child_dir))
            _old(child_dir)
            time.sleep(0.4)
            code = 0 if hb._paths == {str(child_dir)} and _age(child_dir) < 100 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_fork_while_the_lock_is_held_leaves_the_child_a_free_one(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    hb = Heartbeat(0.05)
    hb.add(str(tmp_path))
    with hb._lock:  # as if the parent's thread were in beat() at the fork
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                hb.add(str(d))  # would wait forever on the copied, held lock
                code = 0 if hb._paths == {str(d)} else 2
            finally:
                os._exit(code)
    deadline = time.time() + 20
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        raise AssertionError("the child hung on the heartbeat's lock")
    assert os.waitstatus_to_exitcode(status) == 0
