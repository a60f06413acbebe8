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
