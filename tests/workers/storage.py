"""Per-rank bodies of the multi-process storage tests (importable by spawned children)."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

import shardckpt
from shardckpt.dcp.planner import SafeLoadPlanner
from shardckpt.training.zero import ZeroOptimizerState


def build_model(seed: int = 0, wide: int = 37) -> nn.Module:
    # Sizes chosen not to divide by 2, 3 or 4: resharding must cope.
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, wide), nn.ReLU(), nn.Linear(wide, wide), nn.ReLU(),
                         nn.Linear(wide, 7), nn.LayerNorm(7))


def _train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: int = 2) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(5, 13, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _fsdp(model: nn.Module, ws: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    return {"model": msd, "optim": osd}


def _local_bytes(tree: Any) -> int:
    from torch.distributed.tensor import DTensor

    total = 0
    if isinstance(tree, dict):
        return sum(_local_bytes(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return sum(_local_bytes(v) for v in tree)
    if isinstance(tree, DTensor):
        t = tree.to_local()
        return t.numel() * t.element_size()
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    return total


def fsdp_save(rank: int, ws: int, path: str, ref: str, wide: int, block_size: int,
              compression: str) -> None:
    model = _fsdp(build_model(0, wide), ws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, rank)
    msd, osd = get_state_dict(model, opt)
    shardckpt.save({"model": msd, "optim": osd}, path, block_size=block_size,
                   compression=compression)
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, ref)


def fsdp_load(rank: int, ws: int, path: str, ref: str, wide: int) -> dict:
    model = _fsdp(build_model(1, wide), ws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, rank, steps=1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    reader = shardckpt.ShardReader(path)
    dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path=path))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    full = _full(model, opt)
    mismatches = []
    if rank == 0:
        expect = torch.load(ref, weights_only=True)
        mismatches = compare_trees(expect, full)
    return {"bytes_read": reader.bytes_read, "owned": _local_bytes(state),
            "mismatches": mismatches}


def compare_trees(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Bitwise comparison; returns the paths that differ."""
    out = []
    if isinstance(a, dict):
        if set(a) != set(b):
            return [f"{prefix}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"]
        for k in a:
            out += compare_trees(a[k], b[k], f"{prefix}.{k}")
    elif isinstance(a, list | tuple):
        if len(a) != len(b):
            return [f"{prefix}: len {len(a)} != {len(b)}"]
        for i, (x, y) in enumerate(zip(a, b)):
            out += compare_trees(x, y, f"{prefix}[{i}]")
    elif torch.is_tensor(a):
        if not (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(-1).view(torch.uint8) if a.numel() else a,
                                b.view(-1).view(torch.uint8) if b.numel() else b)):
            out.append(prefix)
    elif a != b:
        out.append(f"{prefix}: {a!r} != {b!r}")
    return out


def ddp_save(rank: int, ws: int, path: str) -> int:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build_model(0, 301))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, rank)
    msd, osd = get_state_dict(model, opt)
    assert not any(k.startswith("module.") for k in msd)
    shardckpt.save({"model": msd, "optim": osd}, path, compression="none")
    return sum(t.numel() * t.element_size() for t in msd.values())


def zero_save(rank: int, ws: int, path: str) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build_model(0, 101))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    _train(model, opt, rank)
    zs = ZeroOptimizerState(opt, model)
    shardckpt.save({"optim": zs}, path, compression="none")
    return {k: {n: v.clone() for n, v in st.items()} for k, st in zs.state_dict()["state"].items()}


def zero_load(rank: int, ws: int, path: str) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build_model(3, 101))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=5.0)
    zs = ZeroOptimizerState(opt, model)
    shardckpt.load({"optim": zs}, path)
    assert opt.param_groups[0]["lr"] == 1e-2
    _train(model, opt, rank, steps=1)  # the restored optimizer keeps working
    return {"lr": opt.param_groups[0]["lr"]}


def zero_owned(rank: int, ws: int, path: str) -> dict:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(build_model(3, 101))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=5.0)
    zs = ZeroOptimizerState(opt, model)
    shardckpt.load({"optim": zs}, path)
    return {k: {n: v.clone() for n, v in st.items()} for k, st in zs.state_dict()["state"].items()}


def zero_save_leaves_optimizer_alone(rank: int, ws: int, path: str) -> dict:
    """A ZeRO save with a parameter that has no state yet (never used in forward) and
    gradients still on the others: the optimizer must come out of the save unchanged."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4),
                                torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model[2](model[0](torch.randn(3, 4))).sum().backward()  # 1 and 3: no gradient, no state
        opt.step()
    local = opt.optim
    before = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in st.items()}
              for p, st in local.state.items()}
    shardckpt.save({"optim": ZeroOptimizerState(opt, model)}, path, compression="none")
    after = {id(p): st for p, st in local.state.items()}
    same = before.keys() == after.keys() and all(
        torch.equal(torch.as_tensor(v), torch.as_tensor(after[i][k]))
        for i, st in before.items() for k, v in st.items())
    return {"same": same, "with_state": len(after)}


def zero_train_state(rank: int, ws: int, path: str, save: bool) -> dict:
    """TrainState over a ZeroRedundancyOptimizer: save after two steps, or load; the state
    each rank owns, by parameter name."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = build_model(0 if save else 3, 101)
    opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                  lr=1e-2 if save else 5.0)
    ts = shardckpt.TrainState(model, opt)
    if save:
        _train(model, opt, rank)
        shardckpt.save(ts, path, compression="none")
    else:
        shardckpt.load(ts, path)
        assert opt.param_groups[0]["lr"] == 1e-2
    st = ZeroOptimizerState(opt, model).state_dict()["state"]
    return {k: {n: v.clone() for n, v in s.items()} for k, s in st.items()}


def save_then_hang(rank: int, ws: int, good: str, bad: str, flag: str) -> None:
    """Commit `good`, then start `bad` and stall rank 1 in the middle of its writes."""
    state = {"w": torch.arange(5000, dtype=torch.float32) + rank * 0,
             "r": torch.full((300,), float(rank))}
    state["v"] = torch.randn(4096, generator=torch.Generator().manual_seed(rank))
    shardckpt.save(state, good)
    from shardckpt import codec

    real = codec.encode_buffer
    calls = {"n": 0}

    def slow(*a: Any, **k: Any) -> Any:
        calls["n"] += 1
        if rank == 1 and calls["n"] == 2:
            open(flag, "w").close()
            time.sleep(600)
        return real(*a, **k)

    codec.encode_buffer = slow
    state2 = {k: v + 1 for k, v in state.items()}
    shardckpt.save(state2, bad)


def rank_pid(rank: int, ws: int) -> int:
    dist.barrier()
    return os.getpid()


def plain_dcp_save(rank: int, ws: int, path: str, ref: str, wide: int) -> None:
    """Stock `dcp.save` with the plugin in place of FileSystemWriter (DTensors, FSDP2)."""
    model = _fsdp(build_model(0, wide), ws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, rank)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, storage_writer=shardckpt.ShardWriter(path))
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, ref)


def plain_dcp_load(rank: int, ws: int, path: str, ref: str, wide: int) -> list[str]:
    """Stock `dcp.load` (its default planner) with the plugin, at another world size."""
    model = _fsdp(build_model(1, wide), ws)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train(model, opt, rank, steps=1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, storage_reader=shardckpt.ShardReader(path))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    full = _full(model, opt)
    return compare_trees(torch.load(ref, weights_only=True), full) if rank == 0 else []


def load_model_fsdp(rank: int, ws: int, path: str, ref: str, wide: int) -> list[str]:
    """`shardckpt.load_model` into an FSDP2 model at another world size."""
    model = _fsdp(build_model(1, wide), ws)
    shardckpt.load_model(model, path)
    full = _full(model, torch.optim.AdamW(model.parameters()))
    if rank != 0:
        return []
    return compare_trees(torch.load(ref, weights_only=True)["model"], full["model"])
