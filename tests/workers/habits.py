"""Workers for the habit tests: calls that not every rank makes."""

from __future__ import annotations

import os
import time
from typing import Any

import torch

import shardckpt


def rank0_only(rank: int, world: int, path: str, what: str) -> dict[str, Any]:
    """Rank 0 alone saves (or loads), as with `if rank == 0: torch.save(...)`."""
    out: dict[str, Any] = {"rank": rank}
    if rank != 0:
        return out
    t0 = time.monotonic()
    try:
        if what == "save":
            shardckpt.save({"w": torch.ones(3)}, path, timeout=3)
        elif what == "async_save":
            shardckpt.async_save({"w": torch.ones(3)}, path, timeout=3).wait()
        else:
            shardckpt.load({"w": torch.zeros(3)}, path, timeout=3)
        out["result"] = "returned"
    except shardckpt.CollectiveTimeoutError as e:
        out.update(result="timeout", message=str(e))
    out["seconds"] = time.monotonic() - t0
    out["leftovers"] = sorted(os.listdir(os.path.dirname(path)))
    return out


def save_vs_load(rank: int, world: int, path: str) -> dict[str, Any]:
    """Rank 0 saves while rank 1 loads the same path: both are told at once."""
    try:
        if rank == 0:
            shardckpt.save({"w": torch.ones(3)}, path, timeout=30)
        else:
            shardckpt.load({"w": torch.zeros(3)}, path, timeout=30)
        return {"rank": rank, "result": "returned"}
    except shardckpt.CollectiveTimeoutError as e:
        return {"rank": rank, "result": "mismatch", "message": str(e)}


def everyone_then_rank0(rank: int, world: int, root: str) -> dict[str, Any]:
    """Two saves by every rank, then one by rank 0 only: the rounds stay aligned."""
    for i in range(2):
        shardckpt.save({"w": torch.full((4,), float(i))}, os.path.join(root, f"ok{i}"), timeout=30)
    if rank != 0:
        return {"rank": rank}
    try:
        shardckpt.save({"w": torch.ones(4)}, os.path.join(root, "alone"), timeout=2)
        return {"rank": rank, "result": "returned"}
    except shardckpt.CollectiveTimeoutError as e:
        return {"rank": rank, "result": "timeout", "message": str(e)}


def one_rank_cannot_open(rank: int, world: int, path: str) -> dict[str, Any]:
    """Rank 1 behaves as a node that does not see the checkpoint (node-local disks)."""
    import shardckpt.api as api

    if rank == 1:
        def missing(p: Any, **kw: Any) -> Any:
            raise shardckpt.CheckpointNotFoundError(f"{p}: no such checkpoint. Check the path.")
        api.CheckpointReader = missing  # type: ignore[assignment]
    t0 = time.monotonic()
    try:
        shardckpt.load({"w": torch.zeros(3)}, path, timeout=30)
        return {"rank": rank, "result": "returned"}
    except shardckpt.ShardckptError as e:
        return {"rank": rank, "result": type(e).__name__, "message": str(e),
                "seconds": time.monotonic() - t0}


def joins_from_two_threads(rank: int, ws: int, root: str) -> dict:
    """A training thread's join (default group) and a background save's join (a group of
    its own) at once on each rank, entered in opposite orders on the two ranks."""
    import threading
    import time

    import torch.distributed as dist

    from shardckpt.dcp.join import join

    ckpt = dist.new_group(backend="gloo")
    order = [ckpt, None] if rank == 0 else [None, ckpt]
    done: dict[str, float] = {}
    errors: list[str] = []
    t0 = time.monotonic()

    def run(group) -> None:
        name = "train" if group is None else "ckpt"
        try:
            join(group, what="save", path=f"{root}/{name}", timeout=20)
            done[name] = time.monotonic() - t0
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{name}: {type(e).__name__}: {e}")

    first = threading.Thread(target=run, args=(order[0],))
    first.start()
    time.sleep(0.5)  # the first join waits on the store when the second one starts
    second = threading.Thread(target=run, args=(order[1],))
    second.start()
    first.join(60)
    second.join(60)
    return {"done": done, "errors": errors}
