"""Checkpoints written by format version 1 (the code of stop 9) load bitwise, forever.

The fixtures under tests/fixtures/ were written once by make_fixtures.py and are
never regenerated; if one of these tests fails, a change broke old checkpoints.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import shardckpt

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous().reshape(-1)
    return t.view(torch.uint8) if t.dtype != torch.bool else t


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, key: str) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, key
    assert torch.equal(bits(a), bits(b)), key


def expected(name: str) -> dict:
    return torch.load(os.path.join(FIXTURES, f"{name}.expected.pt"), weights_only=True)


def fixture_copy(name: str, tmp_path) -> str:
    # Tests may migrate or rewrite; the committed fixture stays untouched.
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    return dst


def check_single(name: str, path: str) -> None:
    """A copy of the single-process fixture `name` at `path` loads bitwise."""
    t = expected(name)["tensors"]
    state = {k: torch.zeros_like(v) for k, v in t.items() if "." not in k}
    state["nested"] = {"a": torch.zeros_like(t["nested.a"]),
                       "b": {"c": torch.zeros_like(t["nested.b.c"])}}
    state.update(step=0, name="", cfg={"lr": 0.0, "betas": [], "flags": []})
    shardckpt.load(state, path)
    for k, v in t.items():
        got = state
        for part in k.split("."):
            got = got[part]
        assert_bitwise(got, v, k)
    assert state["step"] == 42 and state["name"] == "fixture-v1"
    assert state["cfg"] == {"lr": 0.001, "betas": [0.9, 0.999], "flags": [True, False, None]}
    assert shardckpt.verify(path).ok


def check_fsdp2(path: str) -> None:
    """A copy of the 2-rank FSDP2 TrainState fixture at `path` restores on one process."""
    t = expected("v1_fsdp2_trainstate_w2")["tensors"]
    torch.manual_seed(123)  # different init: the load must overwrite every value
    model = torch.nn.Sequential(torch.nn.Linear(13, 515), torch.nn.GELU(), torch.nn.Linear(515, 6))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    ts = shardckpt.TrainState(model=model, optimizer=opt, scheduler=sched)
    shardckpt.load({"train": ts}, path)
    for name, p in model.named_parameters():
        assert_bitwise(p, t[f"train.model.{name}"], name)
        for moment in ("exp_avg", "exp_avg_sq"):
            assert_bitwise(opt.state[p][moment], t[f"train.optim.state.{name}.{moment}"], name)
    assert ts.step == 3
    assert sched.last_epoch == 3
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert shardckpt.verify(path).ok


@pytest.mark.parametrize("name", ["v1_single_zstd", "v1_single_none"])
def test_v1_single_process_loads_bitwise(name, tmp_path):
    check_single(name, fixture_copy(name, tmp_path))


def test_v1_fsdp2_trainstate_restores_on_one_process(tmp_path):
    check_fsdp2(fixture_copy("v1_fsdp2_trainstate_w2", tmp_path))
