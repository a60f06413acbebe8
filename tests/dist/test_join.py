"""A save or load that not every rank calls fails within its timeout, naming the absent
ranks, instead of hanging (issue 15): real 2-process gloo worlds."""

from __future__ import annotations

import pytest
import torch

import shardckpt
from tests.workers import habits as H
from tests.workers.world import run_world


@pytest.mark.parametrize("what", ["save", "async_save", "load"])
def test_rank0_only_call_raises_within_timeout(tmp_path, what):
    path = tmp_path / "ck"
    if what == "load":
        shardckpt.save({"w": torch.ones(3)}, str(path))
    r0, r1 = run_world(2, H.rank0_only, str(path), what, timeout=120)
    assert r0["result"] == "timeout", r0
    assert 2.5 < r0["seconds"] < 30, r0
    msg = r0["message"]
    assert "[1]" in msg and str(path) in msg and f"shardckpt.{what}" in msg, msg
    assert "not only rank 0" in msg
    if what != "load":  # nothing was written: no checkpoint, no staging leftover
        assert r0["leftovers"] == [], r0["leftovers"]


def test_ranks_in_different_calls_are_told_at_once(tmp_path):
    out = run_world(2, H.save_vs_load, str(tmp_path / "ck"), timeout=120)
    assert [o["result"] for o in out] == ["mismatch", "mismatch"], out
    assert "save" in out[0]["message"] and "load" in out[0]["message"]
    assert not (tmp_path / "ck").exists()


def test_rounds_stay_aligned_after_collective_saves(tmp_path):
    r0, _ = run_world(2, H.everyone_then_rank0, str(tmp_path), timeout=120)
    assert r0["result"] == "timeout" and "[1]" in r0["message"], r0
    for i in range(2):
        assert shardckpt.verify(str(tmp_path / f"ok{i}")).ok



def test_a_rank_that_cannot_open_fails_every_rank_at_once(tmp_path):
    path = tmp_path / "ck"
    shardckpt.save({"w": torch.ones(3)}, str(path))
    r0, r1 = run_world(2, H.one_rank_cannot_open, str(path), timeout=120)
    assert r1["result"] == "CheckpointNotFoundError", r1
    assert r0["result"] == "LoadFailedError" and "rank 1 could not open" in r0["message"], r0
    assert r0["seconds"] < 20


def test_two_threads_joining_at_once_on_two_ranks_do_not_deadlock(tmp_path):
    """An async save's join (its own group) and the next save's join (the training
    thread's group) run at once; a TCPStore client serves one request at a time, so a
    join blocked in store.wait() kept the other thread's join from posting: with the two
    ranks entering in opposite orders, each waited for a key the other could not post."""
    out = run_world(2, H.joins_from_two_threads, str(tmp_path), timeout=120)
    for r in out:
        assert r["errors"] == [], r
        assert set(r["done"]) == {"train", "ckpt"} and max(r["done"].values()) < 10, r

