"""PyTorch's own DCP behaviour holds with ShardWriter / ShardReader in place of
FileSystemWriter / FileSystemReader (issue 14: the three differences, and DCP's
documented uses), one process; multi-rank DTensor resharding is in tests/dist."""

from __future__ import annotations

import io
import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner

import shardckpt
from shardckpt import ShardReader, ShardWriter


def _both(tmp_path, name):
    return ((FileSystemPair(tmp_path / f"{name}_fs")), (PluginPair(tmp_path / f"{name}_sc")))


class FileSystemPair:
    def __init__(self, path):
        self.path = path

    def writer(self, **kw):
        return dcp.FileSystemWriter(str(self.path), **kw)

    def reader(self):
        return dcp.FileSystemReader(str(self.path))


class PluginPair(FileSystemPair):
    def writer(self, **kw):
        return ShardWriter(self.path, **kw)

    def reader(self):
        return ShardReader(self.path)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_bytesio_value_loads_back_as_its_bytes(tmp_path):
    for pair in _both(tmp_path, "b"):
        dcp.save({"blob": io.BytesIO(b"raw \x00 bytes"), "x": torch.ones(2)},
                 storage_writer=pair.writer())
        st = {"blob": io.BytesIO(), "x": torch.zeros(2)}
        dcp.load(st, storage_reader=pair.reader())
        assert st["blob"].getvalue() == b"raw \x00 bytes", type(pair).__name__
        assert torch.equal(st["x"], torch.ones(2))
    # and through shardckpt's own save/load
    shardckpt.save({"blob": io.BytesIO(b"abc")}, tmp_path / "own")
    st = {"blob": io.BytesIO()}
    shardckpt.load(st, tmp_path / "own")
    assert st["blob"].getvalue() == b"abc"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_saving_into_a_directory_and_overwriting_keep_other_files(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    dcp.save({"x": torch.ones(4)}, storage_writer=ShardWriter(d))
    # a torch.save export written next to the checkpoint (dcp_to_torch_save's habit)
    torch.save({"x": torch.ones(4)}, d / "export.pt")
    (d / "sub").mkdir()
    (d / "sub" / "more.txt").write_text("also mine")
    inode = os.stat(d / "export.pt").st_ino
    for i in range(2):
        dcp.save({"x": torch.full((4,), float(i))}, storage_writer=ShardWriter(d))
        st = {"x": torch.zeros(4)}
        dcp.load(st, storage_reader=ShardReader(d))
        assert torch.equal(st["x"], torch.full((4,), float(i)))
    assert (d / "notes.txt").read_text() == "mine"
    assert (d / "sub" / "more.txt").read_text() == "also mine"
    assert os.stat(d / "export.pt").st_ino == inode
    assert torch.equal(torch.load(d / "export.pt")["x"], torch.ones(4))
    assert shardckpt.verify(str(d)).ok
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no leftover beside it


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_overwrite_false_says_checkpoint_already_exists(tmp_path):
    for pair in _both(tmp_path, "o"):
        dcp.save({"x": torch.ones(2)}, storage_writer=pair.writer())
        with pytest.raises(BaseException, match="Checkpoint already exists"):
            dcp.save({"x": torch.ones(2)}, storage_writer=pair.writer(overwrite=False))
    with pytest.raises(shardckpt.CheckpointExistsError, match="Checkpoint already exists"):
        shardckpt.save({"x": torch.ones(2)}, tmp_path / "o_sc", overwrite=False)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_nested_state_modules_and_optimizers_without_a_process_group(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    sd = {"model": m.state_dict(), "optim": opt.state_dict(), "extra": {"k": [1, 2], "s": "x"}}
    for pair in _both(tmp_path, "n"):
        dcp.save(sd, storage_writer=pair.writer())
    m2 = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.5, momentum=0.9)
    m2(torch.randn(4, 3)).sum().backward()
    opt2.step()
    st = {"model": m2.state_dict(), "optim": opt2.state_dict(), "extra": {"k": [], "s": ""}}
    dcp.load(st, storage_reader=PluginPair(tmp_path / "n_sc").reader())
    m2.load_state_dict(st["model"])
    opt2.load_state_dict(st["optim"])
    for a, b in zip(m.parameters(), m2.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["momentum_buffer"], opt2.state[b]["momentum_buffer"])
    assert opt2.param_groups[0]["lr"] == 0.1 and st["extra"] == {"k": [1, 2], "s": "x"}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_load_everything_into_an_empty_dict_as_format_utils_does(tmp_path):
    # What format_utils.dcp_to_torch_save does, with the plugin as the reader.
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    sd = {"a": torch.arange(6.0).reshape(2, 3), "n": {"b": torch.ones(2, dtype=torch.int32)},
          "step": 11}
    outs = []
    for pair in _both(tmp_path, "e"):
        dcp.save(sd, storage_writer=pair.writer())
        out: dict = {}
        _load_state_dict(out, storage_reader=pair.reader(), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
        outs.append(out)
    for out in outs:
        assert torch.equal(out["a"], sd["a"]) and torch.equal(out["n"]["b"], sd["n"]["b"])
        assert out["step"] == 11


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_async_save_with_the_plugin(tmp_path):
    x = torch.randn(64, 8)
    fut = dcp.async_save({"x": x}, storage_writer=ShardWriter(tmp_path / "ck"))
    fut.result()
    st = {"x": torch.zeros(64, 8)}
    dcp.load(st, storage_reader=ShardReader(tmp_path / "ck"))
    assert torch.equal(st["x"], x)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_checkpoint_id_form(tmp_path):
    dcp.save({"x": torch.ones(3)}, checkpoint_id=tmp_path / "ck", storage_writer=ShardWriter())
    st = {"x": torch.zeros(3)}
    dcp.load(st, checkpoint_id=tmp_path / "ck", storage_reader=ShardReader())
    assert torch.equal(st["x"], torch.ones(3))
