"""The caches of incremental saves are never stale: the manifests this process committed
(io/committed.read_committed) and the base index (io/base_index.BaseIndex.open)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import shardckpt
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format import MANIFEST_NAME
from shardckpt.io import base_index, committed
from shardckpt.io.reader import read_manifest
from tests.workers import incremental as W

BS = 1024


def _state(a: int, b: int) -> dict:
    """Two tensors of several blocks each, from seeds `a` and `b`."""
    return {"a": torch.randn(2048, generator=torch.Generator().manual_seed(a)),
            "b": torch.randn(2048, generator=torch.Generator().manual_seed(b))}


def _loads_as(path: str, want: dict) -> None:
    got = {k: torch.zeros_like(v) for k, v in want.items()}
    shardckpt.load(got, path)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    assert shardckpt.verify(path, deep=True).ok


def _swap_in(path: str, other: str) -> None:
    """Replace checkpoint `path` by `other` on disk, behind this process's back."""
    trash = path + "-trash"
    os.rename(path, trash)
    os.rename(other, path)
    shutil.rmtree(trash)


def test_read_committed_returns_what_was_committed_and_nothing_stale(tmp_path):
    p = str(tmp_path / "ck")
    shardckpt.save(_state(1, 2), p, block_size=BS)
    m = committed.read_committed(p)
    assert m is committed._RECENT[os.path.abspath(p)][1]
    assert m == read_manifest(p)  # the object the parser would have built
    # damaged in place, same length: read afresh, so the damage is reported
    mp = os.path.join(p, MANIFEST_NAME)
    data = bytearray(open(mp, "rb").read())
    i = data.index(b'"created_unix"') + 1
    data[i] = ord("C")
    with open(mp, "r+b") as f:
        f.write(data)
    with pytest.raises(CorruptCheckpointError):
        committed.read_committed(p)
    # replaced by another checkpoint: that one is read
    q = str(tmp_path / "other")
    shardckpt.save(_state(3, 4), q, block_size=BS)
    _swap_in(p, q)
    assert committed.read_committed(p) == read_manifest(p)
    assert committed.read_committed(p).tensors["a"].chunks[0].hashes != m.tensors["a"].chunks[0].hashes
    # gone (retired, deleted): the reader's typed error, not the remembered manifest
    os.rename(mp, os.path.join(p, "manifest.retired.json"))
    with pytest.raises(shardckpt.ShardckptError):
        committed.read_committed(p)


def test_base_index_is_reused_only_for_the_same_base_manifest(tmp_path):
    base, target = str(tmp_path / "s1"), str(tmp_path / "s2")
    shardckpt.save(_state(1, 2), base, block_size=BS)
    first = base_index.BaseIndex.open(base, target)
    assert base_index.BaseIndex.open(base, target) is first
    assert base_index.BaseIndex.open(base, str(tmp_path / "s3")) is not first
    shardckpt.save(_state(1, 2), base, block_size=BS)  # rewritten: a new manifest
    assert base_index.BaseIndex.open(base, target) is not first


def test_a_base_replaced_on_disk_between_saves_is_indexed_afresh(tmp_path):
    s1, s2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    shardckpt.save(_state(1, 2), s1, block_size=BS)
    shardckpt.save(_state(1, 5), s2, block_size=BS, base=s1)  # index of s1 now cached
    # s1 replaced by a checkpoint holding `a` from another seed: a stale index would
    # reference blocks of `a` at offsets that now hold other bytes
    other = str(tmp_path / "x")
    shardckpt.save(_state(9, 2), other, block_size=BS)
    _swap_in(s1, other)
    want = _state(1, 2)
    r = shardckpt.save(want, s2, block_size=BS, base=s1)
    _loads_as(s2, want)
    m = read_manifest(s2)
    assert m.tensors["a"].chunks[0].refs == ()  # `a` is not in the new s1: written
    assert m.tensors["b"].chunks[0].refs  # `b` is: referenced
    assert r.bytes_written < sum(v.numel() * 4 for v in want.values())


def test_manager_base_replaced_on_disk_between_saves(tmp_path):
    root = str(tmp_path / "root")
    mgr = W.manager(root, full_every=10, keep_last=None)
    mgr.save(1, W.state_at(1))
    mgr.save(2, W.state_at(2))  # references step 1; its manifest remembered in memory
    # step 2 replaced behind the manager's back by a standalone checkpoint of another state
    other = str(tmp_path / "root" / "elsewhere")
    shardckpt.save(W.state_at(7), other, block_size=1024)
    _swap_in(os.path.join(root, "step_00000002"), other)
    mgr.save(3, W.state_at(3))  # base: the step 2 now on disk
    for i in shardckpt.list_checkpoints(root):
        st = W.empty_state()
        shardckpt.load(st, i.path)
        assert W.matches(st, {1: 1, 2: 7, 3: 3}[i.step]), i.name
        assert shardckpt.verify(i.path, deep=True).ok
    m = read_manifest(os.path.join(root, "step_00000003"))
    assert set(m.bases) <= {"../step_00000001", "../step_00000002"}
    # what the new step 2 holds is referenced where it lies: in step 2 itself
    assert "../step_00000002" in m.bases


def _changing(step: int) -> dict:
    """Everything trained: no block is the same from one step to the next."""
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4096, generator=g), "v": torch.randn(2048, generator=g)}


def test_manager_stops_paying_for_incremental_saves_that_reference_nothing(tmp_path):
    root = str(tmp_path / "root")
    mgr = shardckpt.CheckpointManager(root, keep_last=None, incremental=True, full_every=8,
                                      preemption_signals=(), save_options={"block_size": BS})
    with_base = {}
    for step in range(1, 15):
        mgr.save(step, _changing(min(step, 10)))  # from step 11 on, everything frozen
        m = read_manifest(os.path.join(root, f"step_{step:08d}"))
        with_base[step] = "chain" in m.user_metadata["manager"]
    # 1 full; 2 probes (nothing matches); then 1, 2, 4 full saves between the probes
    assert [s for s in range(1, 11) if with_base[s]] == [2, 4, 7]
    # the probe after the gap finds the frozen state and incremental saves resume
    probe = next(s for s in range(11, 15) if with_base[s])
    assert all(with_base[s] for s in range(probe, 15))
    for i in shardckpt.list_checkpoints(root):
        got = {k: torch.zeros_like(v) for k, v in _changing(1).items()}
        shardckpt.load(got, i.path)
        want = _changing(min(i.step, 10))
        assert all(torch.equal(got[k], want[k]) for k in want)


class _Unsafe:
    pass


def test_objects_checked_once_by_their_bytes_and_others_still_refused(tmp_path, monkeypatch):
    from shardckpt.dcp import saved_objects as planner

    # Fresh caches: other tests of this process saved some of these values already.
    monkeypatch.setattr(planner, "_LOADS_BACK", type(planner._LOADS_BACK)())
    monkeypatch.setattr(planner, "_SERIALIZED", type(planner._SERIALIZED)())
    loads = []
    real = planner.weights_only_load
    monkeypatch.setattr(planner, "weights_only_load", lambda b: loads.append(1) or real(b))
    groups = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0, 1, 2]}
    shardckpt.save({"t": torch.ones(4), "g": groups}, str(tmp_path / "a"))
    assert any(len(k) < 4096 for k in planner._LOADS_BACK)
    first = len(loads)
    assert first >= 4  # one per object DCP flattens out of the group
    for name in ("b", "b2", "b3"):  # cached by their bytes: nothing is loaded again
        shardckpt.save({"t": torch.ones(4), "g": groups}, str(tmp_path / name))
    assert len(loads) == first
    with pytest.raises(shardckpt.errors.UnsafeObjectError):
        shardckpt.save({"t": torch.ones(4), "g": _Unsafe()}, str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c")
