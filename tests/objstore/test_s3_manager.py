"""CheckpointManager, gloo ranks and the CLI on s3:// (real moto server on 127.0.0.1)."""

from __future__ import annotations

import json

import torch

import shardckpt
from shardckpt.cli import main
from tests.workers.world import run_world


def test_manager_retention_pointers_restore(bucket, capsys):
    root = f"{bucket}/run"
    with shardckpt.CheckpointManager(root, keep_last=2, keep_best=1, metric="loss",
                                     preemption_signals=()) as m:
        for step, loss in ((1, 0.1), (2, 0.5), (3, 0.4), (4, 0.3)):
            m.save(step, {"w": torch.full((64,), float(step))}, metrics={"loss": loss})
        assert [i.step for i in m.list()] == [1, 3, 4]  # last 2, plus the best (step 1)
        assert m.best_step == 1 and m.latest_step == 4
        out = {"w": torch.zeros(64)}
        assert m.restore(out) == 4 and torch.equal(out["w"], torch.full((64,), 4.0))
        assert m.restore(out, which="best") == 1 and torch.equal(out["w"], torch.ones(64))
    assert shardckpt.latest(root) == f"{root}/step_00000004"
    assert main(["ls", root, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [c["step"] for c in rep["checkpoints"]] == [1, 3, 4]
    assert rep["pointers"] == {"best": "step_00000001", "latest": "step_00000004"}
    assert main(["inspect", f"{root}/step_00000003"]) == 0
    assert main(["verify", f"{root}/step_00000003"]) == 0
    capsys.readouterr()
    assert main(["gc", root, "--keep-last", "1", "--json"]) == 0
    gone = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in gone["removed"]] == ["step_00000003"]
    assert [i.step for i in shardckpt.list_checkpoints(root)] == [1, 4]  # best is protected
    assert main(["verify", f"{root}/step_00000002"]) == 1  # deleted: a typed one-line error


def _save_world(rank: int, world: int, url: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    full = torch.arange(30 * 7, dtype=torch.float32).reshape(30, 7)
    state = {"m": distribute_tensor(full, mesh, [Shard(0)]), "r": torch.tensor([rank])}
    shardckpt.save(state, url, process_group=dist.group.WORLD)


def _load_world(rank: int, world: int, url: str) -> torch.Tensor:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    state = {"m": distribute_tensor(torch.zeros(30, 7), mesh, [Shard(0)])}
    shardckpt.load(state, url, process_group=dist.group.WORLD, strict=False)
    return state["m"].full_tensor()


def test_two_ranks_save_load_at_one_and_three(bucket):
    url = f"{bucket}/dist/step_1"
    run_world(2, _save_world, url)
    full = torch.arange(30 * 7, dtype=torch.float32).reshape(30, 7)
    m = shardckpt.io.reader.read_manifest(url)
    assert [f.split(".")[0] for f in sorted(m.files)] == ["data/r00000", "data/r00001"]
    out = {"m": torch.zeros(30, 7)}
    shardckpt.load(out, url, strict=False)
    assert torch.equal(out["m"], full)
    for t in run_world(3, _load_world, url):
        assert torch.equal(t, full)
