"""`diff` on values at their edges: NaN in objects, int64 extremes, NaN against a number."""

from __future__ import annotations

import math

import torch

import shardckpt
from shardckpt.tools.diff import diff_checkpoints


def _save(path, **over):
    state = {"w": torch.tensor([1.0, 2.0, 3.0]), "ids": torch.tensor([0, 5], dtype=torch.int64),
             "cfg": {"dropout": math.nan, "betas": [0.9, math.nan], "name": "run"}}
    state.update(over)
    shardckpt.save(state, path)
    return path


def test_a_checkpoint_with_nan_in_an_object_is_the_same_as_itself(tmp_path):
    a = _save(tmp_path / "a")
    rep = diff_checkpoints(a, a)
    assert rep.same and rep.objects_differ == []
    b = _save(tmp_path / "b", cfg={"dropout": math.nan, "betas": [0.9, 0.1], "name": "run"})
    assert diff_checkpoints(a, b).objects_differ == ["cfg.betas"]


def test_max_difference_does_not_wrap_or_hide_nan(tmp_path):
    lo = torch.tensor([-(2 ** 63), 0], dtype=torch.int64)
    hi = torch.tensor([2 ** 63 - 1, 0], dtype=torch.int64)
    a = _save(tmp_path / "a", ids=lo)
    b = _save(tmp_path / "b", ids=hi, w=torch.tensor([math.nan, 2.0, 3.0]))
    rep = {t.key: t for t in diff_checkpoints(a, b).tensors}
    assert not rep["ids"].equal and rep["ids"].max_abs_diff > 1.8e19  # wrapped to 1 before
    assert not rep["w"].equal and rep["w"].max_abs_diff == math.inf  # NaN vs 1.0 read as 0
