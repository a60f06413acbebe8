"""Per-rank bodies and helpers of the CLI tests (importable by spawned children)."""

from __future__ import annotations

import torch
from torch import nn

import shardckpt


def trainstate_save(rank: int, ws: int, path: str) -> None:
    """A TrainState checkpoint without scheduler or data loader: audit must flag both."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).square().mean().backward()
    opt.step()
    ts = shardckpt.TrainState(model, opt)
    ts.step = 11
    shardckpt.save({"train": ts}, path)


def small_model() -> nn.Module:
    """Target of `shardckpt diff CKPT workers.cli:small_model` (matches build_model(wide=101))."""
    from tests.workers.storage import build_model

    return build_model(0, 101)


def wrong_model() -> nn.Module:
    from tests.workers.storage import build_model

    return build_model(0, 100)
