"""Per-rank bodies of the async save tests."""

from __future__ import annotations

import torch
import torch.distributed as dist

import shardckpt
from shardckpt.async_save import staging_stats


def train_while_saving(rank: int, ws: int, root: str) -> dict:
    g = torch.Generator().manual_seed(rank)
    w = torch.randn(512, 257, generator=g)
    snapshots = []
    handles = []
    for i in range(3):
        snap = w.clone()
        h = shardckpt.async_save({"w": w, "step": i}, f"{root}/s{i}")
        # Training goes on at once, with collectives on the default group.
        for _ in range(3):
            w.add_(1.0)
            dist.all_reduce(w)
            w.div_(ws)
        snapshots.append(snap)
        handles.append(h)
    for h in handles:
        h.wait()
    ok = []
    for i, snap in enumerate(snapshots):
        t = {"w": torch.zeros_like(w), "step": -1}
        shardckpt.load(t, f"{root}/s{i}")
        # DCP saves a non-DTensor under one key; every rank holds its own value, and
        # the planner keeps one copy, so compare against rank 0's snapshot.
        ref = snap.clone()
        dist.broadcast(ref, 0)
        ok.append(bool(torch.equal(t["w"], ref)) and t["step"] == i)
    return {"ok": ok, "stats": staging_stats(), "stall": [h.stall_s for h in handles]}


def train_while_saving_in_writer_processes(rank: int, ws: int, root: str) -> dict:
    import os

    from shardckpt.io import writer_process

    # What the ranks' helpers do, not how they yield the CPU (tests/test_writer_process.py)
    os.environ.update(SHARDCKPT_ASYNC_WRITER="process", SHARDCKPT_WRITER_NICE="0",
                      SHARDCKPT_WRITER_CPUS="all")
    out = train_while_saving(rank, ws, root)
    h = writer_process._helper
    out["helper"] = h.proc.pid if h is not None and h.alive() else None
    return out
