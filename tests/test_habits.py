"""Habits users bring from torch.save and other frameworks (issue 15), one process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import shardckpt
from shardckpt.tools.gc import gc


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_a_module_is_a_whole_state_and_its_key_is_model(tmp_path):
    m = _model(0)
    res = shardckpt.save(m, tmp_path / "ck")
    assert isinstance(res, shardckpt.api.SaveResult)
    assert res.path == str(tmp_path / "ck") and res.seconds > 0
    assert res.bytes_logical == sum(p.numel() * 4 for p in m.state_dict().values())
    on_disk = sum(f.stat().st_size for f in (tmp_path / "ck").rglob("*") if f.is_file())
    assert res.bytes_written == on_disk
    m2 = _model(1)
    shardckpt.load(m2, tmp_path / "ck")
    assert _same(m, m2)
    m3 = _model(2)
    shardckpt.load({"model": m3}, tmp_path / "ck")  # the documented key
    assert _same(m, m3)


def test_train_state_saved_either_way_restores_either_way(tmp_path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(3, 4)).sum().backward()
    opt.step()
    ts = shardckpt.TrainState(model=m, optimizer=opt)
    ts.step = 7
    shardckpt.save(ts, tmp_path / "alone")
    shardckpt.save({"train": ts}, tmp_path / "dict")
    for src, wrap in (("alone", True), ("dict", False), ("alone", False), ("dict", True)):
        m2 = _model(3)
        opt2 = torch.optim.AdamW(m2.parameters())
        ts2 = shardckpt.TrainState(model=m2, optimizer=opt2)
        shardckpt.load({"train": ts2} if wrap else ts2, tmp_path / src)
        assert ts2.step == 7 and _same(m, m2), (src, wrap)
        assert torch.equal(opt2.state[m2[0].weight]["exp_avg"], opt.state[m[0].weight]["exp_avg"])


def test_manager_takes_a_train_state(tmp_path):
    m = _model(0)
    ts = shardckpt.TrainState(model=m)
    with shardckpt.CheckpointManager(tmp_path, preemption_signals=()) as mgr:
        ts.step = 3
        res = mgr.save(3, ts)
        assert not res and not res.preempted and res.committed and res.step == 3
        assert res.bytes_written > 0 and res.path == str(tmp_path / "step_00000003")
    ts2 = shardckpt.TrainState(model=_model(4))
    with shardckpt.CheckpointManager(tmp_path, preemption_signals=()) as mgr:
        assert mgr.restore(ts2) == 3
    assert ts2.step == 3 and _same(m, ts2.model)


def test_an_object_that_cannot_load_back_fails_at_save(tmp_path):
    class Custom:
        pass

    with pytest.raises(shardckpt.UnsafeObjectError) as ei:
        shardckpt.save({"w": torch.ones(2), "cfg": {"thing": Custom()}}, tmp_path / "ck")
    msg = str(ei.value)
    assert "'cfg.thing'" in msg and "Custom" in msg and "Nothing was written" in msg
    assert "\n" not in msg and "\x1b" not in msg
    assert os.listdir(tmp_path) == []  # no checkpoint, no staging leftover


def test_manager_warns_once_when_metrics_lack_the_metric(tmp_path):
    with shardckpt.CheckpointManager(tmp_path, metric="val_loss", preemption_signals=()) as mgr:
        with pytest.warns(RuntimeWarning, match="lack the configured metric 'val_loss'"):
            mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": 0.5})
        assert mgr.best_step is None
        mgr.save(2, {"w": torch.ones(2)}, metrics={"val_loss": 0.5})
        assert mgr.best_step == 2


def test_callbacks_see_every_save_and_restore(tmp_path):
    saves, restores = [], []

    def bad(_res):
        raise RuntimeError("tracker down")

    with shardckpt.CheckpointManager(tmp_path, preemption_signals=(), on_save=saves.append,
                                     on_restore=lambda s, p: restores.append((s, p))) as mgr:
        mgr.save(1, {"w": torch.ones(2)}, metrics={"loss": 1.0})
        mgr.save(2, {"w": torch.ones(2)})
        assert mgr.restore({"w": torch.zeros(2)}) == 2
    assert [r.step for r in saves] == [1, 2] and saves[0].metrics == {"loss": 1.0}
    assert all(r.committed and r.bytes_written > 0 for r in saves)
    assert restores == [(2, str(tmp_path / "step_00000002"))]
    with shardckpt.CheckpointManager(tmp_path, preemption_signals=(), on_save=bad) as mgr:
        with pytest.warns(RuntimeWarning, match="tracker down"):
            mgr.save(3, {"w": torch.ones(2)})
    assert shardckpt.verify(str(tmp_path / "step_00000003")).ok


def test_listing_needs_no_process_group_and_touches_no_signal(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    for s in (5, 12, 7):
        shardckpt.save({"w": torch.full((3,), float(s))}, tmp_path / f"step{s}")
    (tmp_path / "notes").mkdir()
    infos = shardckpt.list_checkpoints(tmp_path)
    assert [i.step for i in infos] == [5, 7, 12] and infos[0].size_bytes > 0
    assert shardckpt.latest(tmp_path) == str(tmp_path / "step12")
    assert signal.getsignal(signal.SIGTERM) is before
    import torch.distributed as dist

    assert not dist.is_initialized()


def test_gc_recognises_the_names_users_write(tmp_path):
    for s in range(1, 8):
        shardckpt.save({"w": torch.ones(2)}, tmp_path / f"step{s}")
    rep = gc(tmp_path, keep_last=2, dry_run=True)
    assert sorted(os.path.basename(a.path) for a in rep.removed) == [f"step{s}" for s in range(1, 6)]


_SIGTERM_SCRIPT = textwrap.dedent("""
    import logging, os, signal, sys, time
    logging.basicConfig(level=logging.WARNING)
    import torch, shardckpt
    mgr = shardckpt.CheckpointManager(sys.argv[1], preemption_grace_s=float(sys.argv[2]))
    print("ready", flush=True)
    for _ in range(600):   # a loop that never reaches a step boundary
        time.sleep(0.05)
    print("not ended", flush=True)
""")


def _start(tmp_path, grace: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _SIGTERM_SCRIPT, str(tmp_path), str(grace)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def test_second_sigterm_falls_through(tmp_path):
    p = _start(tmp_path, 600)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert p.poll() is None  # the first one only sets the flag
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == -signal.SIGTERM, (p.returncode, err)
    assert "SIGTERM received" in err and "second SIGTERM" in err and "not ended" not in out


def test_sigterm_without_a_step_boundary_ends_after_the_grace_time(tmp_path):
    p = _start(tmp_path, 1.0)
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 128 + signal.SIGTERM and time.monotonic() - t0 < 20, (p.returncode, err)
    assert "no step boundary within 1 s" in err and "not ended" not in out



def test_gc_removes_temp_files_of_dead_writers_only(tmp_path):
    shardckpt.save({"w": torch.ones(2)}, tmp_path / "step_00000001")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".latest.json.tmp-{dead.pid}-abc123"
    live = tmp_path / f".latest.json.tmp-{os.getpid()}-abc124"
    stale.write_text("{}")
    live.write_text("{}")
    rep = gc(tmp_path, older_than=0)
    assert not stale.exists() and live.exists()
    assert [a.kind for a in rep.removed] == ["temp"]


def test_gc_and_a_save_killed_while_creating_its_staging_directory(tmp_path):
    shardckpt.save({"w": torch.ones(2)}, tmp_path / "step_00000001")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    unmarked = tmp_path / ".step_00000002.partial-0123456789ab"   # killed after mkdir
    (unmarked / "data").mkdir(parents=True)
    half = tmp_path / ".step_00000003.partial-0123456789ac"       # killed writing the marker
    (half / "data").mkdir(parents=True)
    (half / f".PARTIAL.json.tmp-{dead.pid}-abc123").write_text("{")
    gc(tmp_path, older_than=0)
    assert not half.exists()  # its creator is dead: no waiting
    assert unmarked.exists()  # maybe a creator about to write its marker
    old = time.time() - 120
    os.utime(unmarked, (old, old))
    gc(tmp_path, older_than=0)
    assert not unmarked.exists()
    assert shardckpt.verify(str(tmp_path / "step_00000001")).ok
