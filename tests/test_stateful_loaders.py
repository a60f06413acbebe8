"""TrainState takes loaders that carry their own state (issue 14): an IterableDataset
with state_dict/load_state_dict, any object with that protocol, and torchdata's
StatefulDataLoader when it is installed."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

import shardckpt


class CountingStream(IterableDataset):
    """An endless stream that knows its position."""

    def __init__(self) -> None:
        self.pos = 0

    def __iter__(self):
        while True:
            yield torch.tensor([float(self.pos)])
            self.pos += 1

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.pos = int(sd["pos"])


def _ts(loader) -> shardckpt.TrainState:
    return shardckpt.TrainState(model=torch.nn.Linear(1, 1), dataloader=loader)


def test_iterable_dataset_with_its_own_state_resumes(tmp_path):
    ds = CountingStream()
    ts = _ts(DataLoader(ds, batch_size=None))
    seen = [float(x) for x in itertools.islice(iter(ts.dataloader), 5)]
    assert seen == [0, 1, 2, 3, 4]
    shardckpt.save(ts, tmp_path / "ck")
    ds2 = CountingStream()
    ts2 = _ts(DataLoader(ds2, batch_size=None))
    shardckpt.load(ts2, tmp_path / "ck")
    assert ds2.pos == 4  # the generator advances after yielding
    assert [float(x) for x in itertools.islice(iter(ts2.dataloader), 2)] == [4, 5]


def test_any_object_with_the_protocol_is_a_loader(tmp_path):
    class Loader:
        def __init__(self):
            self.state = {"epoch": 0, "offsets": [0, 0], "rng": torch.arange(3)}

        def state_dict(self):
            return self.state

        def load_state_dict(self, sd):
            self.state = sd

    a = Loader()
    a.state = {"epoch": 3, "offsets": [7, 9], "rng": torch.tensor([5, 6, 7])}
    shardckpt.save(_ts(a), tmp_path / "ck")
    b = Loader()
    ts2 = _ts(b)
    shardckpt.load(ts2, tmp_path / "ck")
    assert b.state["epoch"] == 3 and b.state["offsets"] == [7, 9]
    assert torch.equal(b.state["rng"], torch.tensor([5, 6, 7]))
    assert ts2.dataloader is b


def test_torchdata_stateful_dataloader(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    data = list(range(40))

    def make():
        return sdl.StatefulDataLoader(data, batch_size=4, shuffle=True,
                                      generator=torch.Generator().manual_seed(3))

    ref = [b.tolist() for b in make()]
    ts = _ts(make())
    it = iter(ts.dataloader)
    first = [next(it).tolist() for _ in range(4)]
    shardckpt.save(ts, tmp_path / "ck")
    ts2 = _ts(make())
    shardckpt.load(ts2, tmp_path / "ck")
    rest = [b.tolist() for b in ts2.dataloader]
    assert first + rest == ref
