"""Bodies of the incremental-checkpoint tests: a frozen model with trained adapters.

`python -m tests.workers.incremental park POINT ROOT FLAG` runs manager saves
(incremental, keep_last=2, full_every=3) and parks at POINT, touching FLAG, so
that the test can SIGKILL it there. Per-rank FSDP2 bodies are run through
tests/workers/world.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)

import shardckpt
from shardckpt.io import commit
from shardckpt.manager import leases, refcount

# ------------------------------------------------------------ single-process states


def frozen(n: int = 64, d: int = 48) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


def state_at(step: int) -> dict[str, Any]:
    """The state a run has at `step`: a frozen base, adapters and a counter that change."""
    g = torch.Generator().manual_seed(1000 + step)
    return {"base": frozen(), "bias": torch.arange(48, dtype=torch.float32),
            "lora_a": torch.randn(4, 48, generator=g), "lora_b": torch.randn(48, 4, generator=g),
            "step": step}


def empty_state() -> dict[str, Any]:
    return {"base": torch.zeros(64, 48), "bias": torch.zeros(48), "lora_a": torch.zeros(4, 48),
            "lora_b": torch.zeros(48, 4), "step": -1}


def matches(state: dict[str, Any], step: int) -> bool:
    want = state_at(step)
    return state["step"] == step and all(
        torch.equal(state[k], want[k]) for k in want if k != "step")


def manager(root: str, **kw: Any) -> shardckpt.CheckpointManager:
    kw.setdefault("keep_last", 2)
    kw.setdefault("full_every", 3)
    return shardckpt.CheckpointManager(root, incremental=True, preemption_signals=(),
                                       save_options={"block_size": 1024}, **kw)


def _park(flag: str) -> None:
    with open(flag, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def park_main(point: str, root: str, flag: str) -> None:
    mgr = manager(root)
    for step in (1, 2, 3, 4):
        mgr.save(step, state_at(step))
    if point == "data":  # step 5 writing its data file
        real = commit.Commit.finalize

        def finalize(self: Any, manifest: Any) -> None:
            _park(flag)
            real(self, manifest)

        commit.Commit.finalize = finalize
    elif point == "published":  # step 5 renamed into place; marker, pointers, retention not
        real_remember = commit.remember_committed

        def remember(final: str, *a: Any) -> None:
            _park(flag)
            real_remember(final, *a)

        commit.remember_committed = remember
    elif point == "lease":  # step 5's base leased (a file written without fsync)
        real_take = leases.Leases.take

        def take(self: Any, name: str) -> Any:
            out = real_take(self, name)
            _park(flag)
            return out

        leases.Leases.take = take
    elif point == "retire":  # retention renaming a referenced checkpoint's manifest
        real_retire = refcount.retire

        def retire(r: str, name: str) -> None:
            _park(flag)
            real_retire(r, name)

        refcount.retire = retire
    elif point == "sweep":  # deleting a retired checkpoint nothing references any more
        real_rmtree = shutil.rmtree

        def rmtree(path: str, *a: Any, **k: Any) -> None:
            if os.path.basename(path).startswith(".step_00000001.old-"):
                _park(flag)
            real_rmtree(path, *a, **k)

        shutil.rmtree = rmtree
    elif point == "store-data":  # object store: step 5's data uploaded, no manifest yet
        from shardckpt.io.objstore.commit import RemoteCommit

        real_remote = RemoteCommit.finalize

        def remote_finalize(self: Any, manifest: Any) -> None:
            _park(flag)
            real_remote(self, manifest)

        RemoteCommit.finalize = remote_finalize
    elif point in ("store-retire", "store-sweep"):
        _park_in_store_delete(point, flag)
    for step in range(5, 12):
        mgr.save(step, state_at(step))
    raise SystemExit(f"never parked at {point}")


def _park_in_store_delete(point: str, flag: str) -> None:
    """Object stores (no renames): park halfway through retiring a checkpoint (its
    retired copy written, the manifest not yet deleted) or through sweeping one (its
    data deleted, its retired manifest not yet)."""
    from shardckpt.format.names import MANIFEST_NAME, RETIRED_MANIFEST
    from shardckpt.io.objstore.s3 import S3Store

    real_delete = S3Store.delete

    def delete(self: Any, urls: list[str]) -> None:
        if point == "store-retire" and any(
                u.endswith("/" + MANIFEST_NAME) and self.head(
                    u[:-len(MANIFEST_NAME)] + RETIRED_MANIFEST) is not None for u in urls):
            _park(flag)
        if point == "store-sweep" and any(u.endswith("/" + RETIRED_MANIFEST) for u in urls):
            _park(flag)
        real_delete(self, urls)

    S3Store.delete = delete


def run_until_parked(point: str, root: str, flag: str) -> None:
    """`park_main` in a child process, SIGKILLed where it parks."""
    from tests.fault._util import kill9_when_parked

    kill9_when_parked(["tests.workers.incremental", "park", point, root, flag], flag)


def every_committed_checkpoint_loads(root: str) -> list[int]:
    """Steps of the committed checkpoints of a root `park_main` wrote, each loaded and
    verified; and nothing a committed checkpoint references is gone."""
    from shardckpt.format import DirState
    from shardckpt.io.storage import join, storage_for

    steps = []
    for i in shardckpt.list_checkpoints(root):
        st = empty_state()
        shardckpt.load(st, i.path)
        assert matches(st, i.step), i.name
        assert shardckpt.verify(i.path, deep=True).ok
        steps.append(i.step)
    for name, users in refcount.references(root).users.items():
        path = join(root, name)
        assert storage_for(path).state(path) != DirState.MISSING, (name, users)
    return steps


def resume_after_kill(root: str, newest: int) -> None:
    """The next run of the manager (and gc) after a kill: it restores `newest`, saves the
    step after it and collects what the killed run left."""
    from shardckpt.tools.gc import gc

    mgr = manager(root)
    st = empty_state()
    assert mgr.restore(st) == newest and matches(st, newest)
    mgr.save(newest + 1, state_at(newest + 1))
    mgr.close()
    gc(root, older_than=0)
    assert every_committed_checkpoint_loads(root)[-2:] == [newest, newest + 1]


# ------------------------------------------------------------ FSDP2 with adapters


class LoraLinear(nn.Module):
    def __init__(self, i: int, o: int, r: int = 4) -> None:
        super().__init__()
        self.base = nn.Linear(i, o)
        self.base.requires_grad_(False)
        self.lora_a = nn.Parameter(torch.randn(r, i) * 0.1)
        self.lora_b = nn.Parameter(torch.zeros(o, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def build(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    # 24 / 96 / 8: row blocks of 384 bytes line up with the shards of 1, 2 and 3 ranks
    return nn.Sequential(LoraLinear(24, 96), nn.ReLU(), LoraLinear(96, 96), nn.ReLU(),
                         LoraLinear(96, 8))


def _fsdp(model: nn.Module, ws: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (ws,))
    for m in model:
        if isinstance(m, LoraLinear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)
    model(torch.randn(6, 24, generator=g)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _full(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))
    return {"model": msd, "optim": osd}


def _model(ws: int | None, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build(seed)
    if ws is not None:
        model = _fsdp(model, ws)
    return model, _optimizer(model)


def train_with_manager(rank: int, ws: int, root: str, ref: str, saves: int) -> list[dict]:
    model, opt = _model(ws, 0)
    mgr = shardckpt.CheckpointManager(root, keep_last=2, incremental=True,
                                      preemption_signals=(), save_options={"block_size": 384})
    out = []
    for step in range(1, saves + 1):
        _train_step(model, opt, rank, step)
        msd, osd = get_state_dict(model, opt)
        r = mgr.save(step, {"model": msd, "optim": osd})
        m = shardckpt.read_manifest(r.path) if hasattr(shardckpt, "read_manifest") else None
        if m is None:
            from shardckpt.io.reader import read_manifest

            m = read_manifest(r.path)
        out.append({"step": step, "bytes_written": r.bytes_written,
                    "own": sum(f.size for f in m.files.values()),
                    "listed": [i.step for i in shardckpt.list_checkpoints(root)]})
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, ref)
    mgr.close()
    return out


def save_fsdp(rank: int, ws: int, path: str, ref: str | None, base: str | None,
              train_steps: int) -> dict:
    model, opt = _model(ws, 0)
    for s in range(1, train_steps + 1):
        _train_step(model, opt, rank, s)
    msd, osd = get_state_dict(model, opt)
    r = shardckpt.save({"model": msd, "optim": osd}, path, base=base, block_size=384)
    full = _full(model, opt)
    if rank == 0 and ref is not None:
        torch.save(full, ref)
    return {"bytes_written": r.bytes_written}


def resume_and_save(rank: int, ws: int, base: str, path: str, ref: str) -> None:
    """Resume from `base` at this world size, train the adapters one step, save against it."""
    model, opt = _model(ws, 5)
    _train_step(model, opt, rank, 98)
    msd, osd = get_state_dict(model, opt)
    shardckpt.load({"model": msd, "optim": osd}, base)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    _train_step(model, opt, rank, 4)
    msd, osd = get_state_dict(model, opt)
    shardckpt.save({"model": msd, "optim": osd}, path, base=base, block_size=384)
    full = _full(model, opt)
    if rank == 0:
        torch.save(full, ref)


def load_fsdp(rank: int, ws: int | None, path: str, ref: str) -> list[str]:
    """Load `path` into a fresh model on `ws` ranks (None: one process, no group)."""
    from tests.workers.storage import compare_trees

    model, opt = _model(ws, 5)
    _train_step(model, opt, rank, 99)  # the optimizer has state to overwrite
    msd, osd = get_state_dict(model, opt)
    shardckpt.load({"model": msd, "optim": osd}, path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    full = _full(model, opt)
    return compare_trees(torch.load(ref, weights_only=True), full) if rank == 0 else []


if __name__ == "__main__":
    if sys.argv[1] == "park":
        park_main(*sys.argv[2:5])
