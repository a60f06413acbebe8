"""The save planner keeps the write items of plain tensors from one save to the next
(dcp/planner._local_items): the same items while nothing DCP makes them from changed,
new ones the moment anything did, and every checkpoint records what was saved."""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from torch.distributed.checkpoint.planner_helpers import _create_write_items

import shardckpt
from shardckpt.dcp.planner import SafeSavePlanner


def _plan(state: dict):
    p = SafeSavePlanner(path="x")
    p.set_up_planner(state, is_coordinator=True)
    p.create_local_plan()
    return p.plan


def _entry(path, key: str) -> dict:
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)["tensors"][key]


def test_unchanged_tensors_keep_their_items_and_the_items_are_dcps():
    w = nn.Parameter(torch.randn(4, 6))
    state = {"w": w, "b": torch.zeros(6), "step": 3}
    first = _plan(state)
    second = _plan({"w": w, "b": torch.ones(6), "step": 4})  # values differ, structure not
    assert [a is b for a, b in zip(first.items, second.items)] == [True, True, False]
    for item in second.items:
        fresh = _create_write_items(item.index.fqn, state[item.index.fqn])[0]
        assert item == fresh  # what DCP itself makes of the tensor now


def test_any_change_makes_new_items_and_the_checkpoint_says_what_was_saved(tmp_path):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    variants = {
        "same": t.clone(),
        "dtype": t.to(torch.bfloat16),
        "shape": t.reshape(6, 4).clone(),
        "requires_grad": nn.Parameter(t.clone()),
        "plain_again": t.clone(),
    }
    kept = None
    for name, v in variants.items():
        item = _plan({"t": v}).items[0]
        assert item == _create_write_items("t", v)[0], name
        if name != "same":
            assert item is not kept, name
        kept = item
        path = tmp_path / name
        shardckpt.save({"t": v}, str(path))
        e = _entry(path, "t")
        assert e["dtype"] == str(v.dtype).removeprefix("torch.")
        assert e["shape"] == list(v.shape)
        assert e["requires_grad"] == v.requires_grad
        out = {"t": torch.zeros_like(v.detach())}
        shardckpt.load(out, str(path))
        assert torch.equal(out["t"], v.detach())
