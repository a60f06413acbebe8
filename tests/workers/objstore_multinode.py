"""Per-rank body of tests/objstore/test_multinode.py, started by torchrun on each "node".

    python -m torch.distributed.run ... -m tests.workers.objstore_multinode save URL
    python -m torch.distributed.run ... -m tests.workers.objstore_multinode load URL OUT

The S3 endpoint and credentials come from the AWS_* variables the test sets. The
working directory is the node's own scratch directory: `save` leaves there, per
node, `ref.pt` (the full model + optimizer state, gathered, written by the node's
local rank 0) and `rank<R>.json` per rank (the filesystem writes the save made,
seen by an audit hook). Nothing else may appear there.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

import shardckpt
from tests.workers import storage as W

# Wide enough that each rank's data object spans two 5 MiB parts (a real
# multipart upload per rank), small enough for 2 cores.
WIDE = 1600
OPTS = {"part_size": 5 << 20}

_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink",
                 "os.truncate", "os.chmod", "shutil.copyfile", "shutil.move", "shutil.rmtree")
_recording: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    # Python-level filesystem writes made while _recording is set, from any thread
    # (the upload pool included). A save to s3:// must make none: a spool file,
    # a local marker or a rank-0 gather through a path would show up here.
    if _recording is None:
        return
    if event == "open":
        path, mode, flags = args
        if isinstance(path, int):
            return  # an already-open descriptor
        writing = (any(c in mode for c in "wax+") if isinstance(mode, str)
                   else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC)))
        if writing:
            _recording.append(f"open {path!r} {mode or flags}")
    elif event in _WRITE_EVENTS:
        _recording.append(f"{event} {args[0]!r}")


def _full(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    # cpu_offload=False: every rank gets the full tensors (the gather is collective).
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=False))
    return {"model": msd, "optim": osd}


def save(url: str) -> None:
    global _recording
    rank, ws = dist.get_rank(), dist.get_world_size()
    model = W._fsdp(W.build_model(0, WIDE), ws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    W._train(model, opt, rank)
    msd, osd = get_state_dict(model, opt)
    sys.addaudithook(_audit)
    _recording = []
    try:
        res = shardckpt.save({"model": msd, "optim": osd}, url, storage_options=OPTS)
    finally:
        writes, _recording = _recording, None
    full = _full(model, opt)
    if int(os.environ["LOCAL_RANK"]) == 0:
        torch.save(full, "ref.pt")
    with open(f"rank{rank}.json", "w") as f:
        json.dump({"rank": rank, "world": ws, "node": int(os.environ["GROUP_RANK"]),
                   "path": res.path, "writes": writes}, f)


def load(url: str, out: str) -> None:
    rank, ws = dist.get_rank(), dist.get_world_size()
    model = W._fsdp(W.build_model(1, WIDE), ws)  # other values, so a no-op load cannot pass
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    W._train(model, opt, rank, steps=1)
    msd, osd = get_state_dict(model, opt)
    shardckpt.load({"model": msd, "optim": osd}, url)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, out)


def load_single(url: str) -> dict[str, Any]:
    """World size 1, no process group: an unsharded model loads the sharded checkpoint."""
    model = W.build_model(2, WIDE)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    W._train(model, opt, 0, steps=1)
    msd, osd = get_state_dict(model, opt)
    shardckpt.load({"model": msd, "optim": osd}, url)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        if argv[0] == "save":
            save(argv[1])
        else:
            load(argv[1], argv[2])
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
