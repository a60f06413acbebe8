"""Per-rank body of the plan-cache test: count the collectives and store operations of
repeated saves (importable by spawned children)."""

from __future__ import annotations

import inspect
import json
import os
import pickle
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

import shardckpt
from shardckpt.dcp import join

_OBJECT_OPS = ("gather_object", "scatter_object_list", "broadcast_object_list",
               "all_gather_object")
_LOW_OPS = ("all_gather", "gather", "scatter", "broadcast", "barrier", "all_reduce",
            "all_to_all", "reduce_scatter_tensor", "all_gather_into_tensor")


_PAYLOAD_ARG = {"gather_object": "obj", "all_gather_object": "obj",
                "scatter_object_list": "scatter_object_input_list",
                "broadcast_object_list": "object_list"}


def _payload(real: Any, name: str, args: tuple, kwargs: dict) -> int:
    """Pickled bytes this rank contributes to an object collective."""
    obj = inspect.signature(real).bind(*args, **kwargs).arguments.get(_PAYLOAD_ARG[name])
    if obj is None:  # not the source of a scatter
        return 0
    if name == "scatter_object_list":
        return sum(len(pickle.dumps(o)) for o in obj)
    return len(pickle.dumps(obj))


class _CountingStore:
    def __init__(self, store: Any, counts: Counter) -> None:
        self._store = store
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def call(*a: Any, **k: Any) -> Any:
            self._counts["store." + name] += 1
            return attr(*a, **k)
        return call


def install(counts: Counter) -> None:
    for name in _OBJECT_OPS:
        real = getattr(c10d, name)

        def wrapped(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
            counts["object_ops"] += 1
            counts["object_bytes"] += _payload(_real, _name, a, k)
            return _real(*a, **k)
        setattr(c10d, name, wrapped)
        setattr(dist, name, wrapped)
    for name in _LOW_OPS:
        real = getattr(c10d, name)

        def low(*a: Any, _real: Any = real, **k: Any) -> Any:
            counts["collectives"] += 1
            return _real(*a, **k)
        setattr(c10d, name, low)
        setattr(dist, name, low)
    real_store = join._store
    join._store = lambda group: _CountingStore(real_store(group), counts)


def _state(rank: int, step: int, dtype: torch.dtype = torch.float32) -> dict:
    # Keys every rank has are replicated (DCP saves one copy): equal on every rank.
    g = torch.Generator().manual_seed(step)
    model = {f"layer{i}.w": torch.randn(64, 32, generator=g).to(dtype) for i in range(40)}
    return {"model": model, "extra": {"step": step, "note": "x" * step},
            f"rank{rank}_private": torch.full((3,), float(step + 1000 * rank))}


def repeated_saves(rank: int, ws: int, root: str, n: int) -> dict:
    counts: Counter = Counter()
    install(counts)
    per_save = []
    for step in range(1, n + 1):
        counts.clear()
        shardckpt.save(_state(rank, step), os.path.join(root, f"s{step}"))
        per_save.append(dict(counts))
    # The last checkpoint holds the last step's values, bitwise.
    want = _state(rank, n)
    dest = _state(rank, 0)
    shardckpt.load(dest, os.path.join(root, f"s{n}"))
    checks = {"model": all(torch.equal(dest["model"][k], v) for k, v in want["model"].items()),
              "private": torch.equal(dest[f"rank{rank}_private"], want[f"rank{rank}_private"]),
              "objects": dest["extra"] == want["extra"]}
    # Same shapes, another dtype: a cached plan must not keep the old dtype.
    bf = _state(rank, n + 1, torch.bfloat16)
    shardckpt.save(bf, os.path.join(root, "bf16"))
    dest = _state(rank, 0, torch.bfloat16)
    shardckpt.load(dest, os.path.join(root, "bf16"))
    checks["bf16"] = all(torch.equal(dest["model"][k], v) for k, v in bf["model"].items())
    if rank == 0:
        with open(os.path.join(root, "bf16", "manifest.json")) as f:
            dtypes = {t["dtype"] for k, t in json.load(f)["tensors"].items() if "layer" in k}
        checks["bf16 manifest"] = dtypes == {"bfloat16"}
    # A changed structure (a new key) after cached saves.
    grown = _state(rank, n + 2)
    grown["model"]["new.w"] = torch.arange(7.0)
    shardckpt.save(grown, os.path.join(root, "grown"))
    dest = _state(rank, 0)
    dest["model"]["new.w"] = torch.zeros(7)
    shardckpt.load(dest, os.path.join(root, "grown"))
    checks["grown"] = torch.equal(dest["model"]["new.w"], torch.arange(7.0))
    return {"per_save": per_save, "checks": checks}
