"""Async save: snapshot semantics, pool reuse, error surfacing, multi-rank, exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import shardckpt
from shardckpt.async_save import staging_stats

from tests.workers import async_ as W
from tests.workers.world import run_world


def test_snapshot_is_taken_at_call_time(tmp_path):
    w = torch.randn(1000, 100)
    b = torch.randn(7).bfloat16()
    snap_w, snap_b = w.clone(), b.clone()
    h = shardckpt.async_save({"w": w, "b": b, "meta": {"step": 3}}, tmp_path / "ck")
    w.mul_(0).add_(5)  # training mutates right after the call returns
    b.zero_()
    h.wait()
    assert h.done() and h.total_s >= h.stall_s
    t = {"w": torch.zeros(1000, 100), "b": torch.zeros(7).bfloat16(), "meta": {"step": 0}}
    shardckpt.load(t, tmp_path / "ck")
    assert torch.equal(t["w"], snap_w) and torch.equal(t["b"], snap_b)
    assert t["meta"]["step"] == 3


def test_pool_is_reused_across_saves(tmp_path):
    w = torch.randn(300, 300)
    shardckpt.async_save({"w": w}, tmp_path / "a").wait()
    before = staging_stats()
    for i in range(3):
        w.add_(1)
        shardckpt.async_save({"w": w}, tmp_path / f"b{i}").wait()
    after = staging_stats()
    assert after["allocations"] == before["allocations"]
    assert after["bytes"] == before["bytes"]
    t = {"w": torch.zeros(300, 300)}
    shardckpt.load(t, tmp_path / "b2")
    assert torch.equal(t["w"], w)


def test_state_over_the_cap_still_saves_exactly(tmp_path):
    cap = 4096
    tree = {"a": torch.arange(512, dtype=torch.float32), "b": torch.arange(2000.0)}
    before = staging_stats()["allocations"]
    with pytest.warns(UserWarning, match="exceeds staging_cap_bytes"):
        h = shardckpt.async_save(tree, tmp_path / "big", staging_cap_bytes=cap)
    assert h.done() and h.stall_s == h.total_s  # streamed while the caller waited
    tree["a"].zero_()
    h.wait()
    t = {"a": torch.zeros(512), "b": torch.zeros(2000)}
    shardckpt.load(t, tmp_path / "big")
    assert torch.equal(t["a"], torch.arange(512, dtype=torch.float32))
    assert torch.equal(t["b"], torch.arange(2000.0))
    assert staging_stats()["allocations"] == before  # no host memory taken for it


def test_background_error_surfaces_at_wait_and_next_save(tmp_path):
    bad = tmp_path / "notackpt"  # a regular file: no checkpoint can be published there
    bad.write_text("x")
    h = shardckpt.async_save({"w": torch.ones(3)}, bad)
    with pytest.raises(shardckpt.CheckpointExistsError):
        h.wait()
    h2 = shardckpt.async_save({"w": torch.ones(3)}, bad)
    # not waited on: the next save raises it before starting
    h2._done.wait()
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.async_save({"w": torch.ones(3)}, tmp_path / "ok")
    assert bad.read_text() == "x"


def test_multi_rank_async_save_with_training_collectives(tmp_path):
    out = run_world(2, W.train_while_saving, str(tmp_path))
    for r in out:
        assert r["ok"] == [True, True, True]
        assert r["stats"]["allocations"] == 1


def test_interpreter_exit_finishes_the_inflight_save(tmp_path):
    code = textwrap.dedent(f"""
        import torch, shardckpt
        h = shardckpt.async_save({{"w": torch.arange(3_000_000, dtype=torch.float32)}},
                                 {str(tmp_path / "ck")!r})
        print("returned", h.done(), flush=True)
    """)
    env = dict(os.environ, SHARDCKPT_CODEC="python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    t = {"w": torch.zeros(3_000_000)}
    shardckpt.load(t, tmp_path / "ck")
    assert torch.equal(t["w"], torch.arange(3_000_000, dtype=torch.float32))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling policy")
@pytest.mark.parametrize("sched", ["idle", None])
def test_background_encoding_sched_idle_is_opt_in(tmp_path, sched):
    """With SHARDCKPT_WORKER_SCHED=idle an async save's codec work runs SCHED_IDLE (it must
    not compete with training threads); a blocking save's never does, nor the default's."""
    script = textwrap.dedent(f"""
        import json, os, torch, shardckpt
        from shardckpt import codec
        seen, real = [], codec.encode_buffer
        def spy(*a, **kw):
            seen.append(os.sched_getscheduler(0))
            return real(*a, **kw)
        codec.encode_buffer = spy
        state = {{f"t{{i}}": torch.randn(64, 1024) for i in range(8)}}
        shardckpt.async_save(state, {str(tmp_path / "bg")!r}).wait()
        bg = list(seen); seen.clear()
        shardckpt.save(state, {str(tmp_path / "fg")!r})
        print(json.dumps({{"bg": bg, "fg": seen, "caller": os.sched_getscheduler(0),
                          "idle": os.SCHED_IDLE}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCKPT_")}
    if sched:
        env["SHARDCKPT_WORKER_SCHED"] = sched
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(r["bg"]) == 8 and len(r["fg"]) == 8
    assert all((p == r["idle"]) == (sched == "idle") for p in r["bg"]), r
    assert all(p != r["idle"] for p in r["fg"]), r
    assert r["caller"] != r["idle"]  # the caller's thread is never changed
