"""Bodies of the CheckpointManager tests that run in other processes.

`python -m tests.workers.manager kill POINT ROOT FLAG` saves steps 1 and 2, then
starts step 3 and parks at POINT (touching FLAG) so the test can SIGKILL it.
The gloo workers are called through tests/workers/world.py.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import torch
from torch import nn

import shardckpt
from shardckpt.io import commit
from shardckpt.io import data_writer as storage
from shardckpt.manager import names as manager_mod
from shardckpt.manager import pointers as pointers_mod


class Box:
    """A minimal DCP Stateful: the manager must work with any state, not only TrainState."""

    def __init__(self, t: torch.Tensor, n: int) -> None:
        self.t, self.n = t, n

    def state_dict(self) -> dict[str, Any]:
        return {"t": self.t, "n": self.n}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.t.copy_(sd["t"])
        self.n = sd["n"]


def make_state(step: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 + step)
    return {"w": torch.randn(3000, generator=g),
            "h": torch.randn(257, generator=g).to(torch.bfloat16),
            "nested": {"i": torch.arange(100, dtype=torch.int64) * step},
            "box": Box(torch.randn(33, generator=g), step)}


def empty_state() -> dict[str, Any]:
    return {"w": torch.zeros(3000), "h": torch.zeros(257, dtype=torch.bfloat16),
            "nested": {"i": torch.zeros(100, dtype=torch.int64)},
            "box": Box(torch.zeros(33), -1)}


def state_matches(state: dict[str, Any], step: int) -> bool:
    """Bitwise equality with make_state(step)."""
    ref = make_state(step)

    def eq(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))

    return (eq(state["w"], ref["w"]) and eq(state["h"], ref["h"])
            and eq(state["nested"]["i"], ref["nested"]["i"])
            and eq(state["box"].t, ref["box"].t) and state["box"].n == step)


def _park(flag: str) -> None:
    open(flag, "w").close()
    time.sleep(600)


def kill_main(point: str, root: str, flag: str) -> None:
    mgr = shardckpt.CheckpointManager(root, keep_last=2, metric="loss")
    for step in (1, 2):
        mgr.save(step, make_state(step), metrics={"loss": 1.0 / step})
    if point == "data":  # in the middle of encoding / writing the data file
        real = storage.codec.encode_buffer
        calls = {"n": 0}

        def slow(*a: Any, **k: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 2:
                _park(flag)
            return real(*a, **k)

        storage.codec.encode_buffer = slow
    elif point == "manifest":  # manifest durable in staging, rename not done
        def publish(*a: Any, **k: Any) -> None:
            assert os.path.isfile(os.path.join(a[0], "manifest.json"))
            _park(flag)

        commit.publish = publish
    elif point == "pointer":  # renamed (committed) but `latest` still names step 2
        real_wp = pointers_mod.write_pointer

        def wp(path: str, payload: dict, **kw: Any) -> None:
            if path.endswith(manager_mod.LATEST_POINTER) and payload.get("step") == 3:
                _park(flag)
            real_wp(path, payload, **kw)

        pointers_mod.write_pointer = wp
    elif point == "retention":  # step 1 renamed to its trash name, rmtree under way
        real_rm = shutil.rmtree

        def rm(path: str, *a: Any, **k: Any) -> None:
            if ".old-" in os.path.basename(path):
                _park(flag)
            real_rm(path, *a, **k)

        shutil.rmtree = rm
    else:
        raise SystemExit(f"unknown point {point}")
    mgr.save(3, make_state(3), metrics={"loss": 1.0 / 3})
    raise SystemExit("the save finished without reaching the kill point")


# ---------------------------------------------------------------- gloo workers


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def train_until_preempted(rank: int, ws: int, root: str, ready: str) -> dict:
    """A small DDP training loop that calls step_boundary every step."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    state = {"model": model.module}
    mgr = shardckpt.CheckpointManager(root, keep_last=2)
    assert mgr.restore(state) is None
    step = 0
    while True:
        step += 1
        g = torch.Generator().manual_seed(step * 10 + rank)
        loss = model(torch.randn(4, 8, generator=g)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 3 and rank == 0:
            open(ready, "w").close()
        if mgr.step_boundary(step, state):
            break
        if step % 4 == 0:
            mgr.save(step, state)
        assert step < 3000, "no preemption arrived"
        time.sleep(0.02)
    mgr.close()
    out = {"step": step, "sd": {k: v.clone() for k, v in model.module.state_dict().items()}}
    # A restart of the job, minus the process start-up: a fresh manager and model.
    out["resumed"] = resume(rank, ws, root)
    return out


def resume(rank: int, ws: int, root: str) -> dict:
    torch.manual_seed(123)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))  # different init
    mgr = shardckpt.CheckpointManager(root, keep_last=2, preemption_signals=())
    step = mgr.restore({"model": model})
    mgr.close()
    return {"step": step, "sd": {k: v.clone() for k, v in model.state_dict().items()}}


if __name__ == "__main__":
    if sys.argv[1] == "kill":
        kill_main(*sys.argv[2:5])
