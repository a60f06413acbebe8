"""Issue 17, item 7: restore falls back past a hostile manifest; FIFOs, read-only roots and
huge declared sizes neither hang nor exhaust memory."""

from __future__ import annotations

import json
import os
import shutil
import warnings

import pytest

import shardckpt
from shardckpt.errors import CorruptCheckpointError, ShardckptError
from shardckpt.tools.gc import gc

from ._util import (
    equal,
    fifo_unblocker,
    load_fresh,
    make_state,
    read_manifest_json,
    remount,
    save_ckpt,
    tmpfs,
    within,
    write_manifest_json,
)


def _root(root: str, steps: int = 2) -> None:
    mgr = shardckpt.CheckpointManager(root, keep_last=None)
    for s in range(1, steps + 1):
        mgr.save(s, make_state(s))
    mgr.close()


def _wrong_type(ck: str) -> None:
    m = read_manifest_json(ck)
    m["tensors"]["w"]["shape"] = "64x32"
    write_manifest_json(ck, m)


def _deeply_nested(ck: str) -> None:
    p = os.path.join(ck, "manifest.json")
    text = open(p).read()
    nested = "[" * 100000 + "]" * 100000
    open(p, "w").write(text.replace('"user_metadata":{', f'"user_metadata":{{"x":{nested},', 1))


def _huge(ck: str) -> None:
    m = read_manifest_json(ck)
    m["tensors"]["w"]["chunks"][0]["nbytes"] = 10**15
    write_manifest_json(ck, m)


@pytest.mark.parametrize("damage", [_wrong_type, _deeply_nested, _huge])
def test_restore_falls_back_past_a_hostile_newest_manifest(tmp_path, damage):
    root = str(tmp_path / "root")
    _root(root)
    newest = os.path.join(root, "step_00000002")
    damage(newest)
    mgr = shardckpt.CheckpointManager(root)
    out = make_state(0)
    with pytest.warns(RuntimeWarning, match="skipping .*step_00000002"):
        assert within(60, lambda: mgr.restore(out)) == 1
    assert equal(out, make_state(1))
    with pytest.raises(CorruptCheckpointError) as ei:
        mgr.restore(make_state(0), step=2)
    assert newest in str(ei.value)
    mgr.close()
    infos = shardckpt.list_checkpoints(root)
    assert infos[-1].problem is not None and newest in infos[-1].problem
    assert shardckpt.latest(root) == os.path.join(root, "step_00000001")


@pytest.mark.parametrize("field,value", [
    (("tensors", "w", "shape"), [10**13, 32]), (("tensors", "w", "chunks", 0, "sizes"), [10**14, 32]),
    (("tensors", "w", "chunks", 0, "nbytes"), 10**12), (("tensors", "w", "chunks", 0, "length"), 10**15),
    (("tensors", "w", "chunks", 0, "offset"), 10**14), (("codec", "block_size"), 10**13),
    (("tensors", "w", "chunks", 0, "blocks", 0, 1), 10**12), (("files", "data/r00000.bin", "size"), 10**15),
])
def test_huge_declared_sizes_are_refused_before_allocation(tmp_path, field, value):
    ck = str(tmp_path / "ck")
    like = save_ckpt(ck)
    m = read_manifest_json(ck)
    node = m
    for k in field[:-1]:
        node = node[k]
    node[field[-1]] = value
    write_manifest_json(ck, m)
    def verify_fn() -> object:
        return shardckpt.verify(ck, deep=True)

    for fn in (lambda: load_fresh(ck, like), lambda: load_fresh(ck, like, verify=False),
               verify_fn):
        try:
            within(30, fn)
        except ShardckptError as e:
            assert ck in str(e)
        else:  # only a file size larger than the data is harmless, for a load
            assert field[0] == "files" and fn is not verify_fn


def test_fifo_latest_pointer_hangs_neither_restore_save_nor_gc(tmp_path):
    root = str(tmp_path / "root")
    _root(root)
    ptr = os.path.join(root, "latest.json")
    os.unlink(ptr)
    os.mkfifo(ptr)
    unblock = fifo_unblocker(ptr)
    mgr = shardckpt.CheckpointManager(root, keep_last=2)
    out = make_state(0)
    assert within(60, lambda: mgr.restore(out), unblock=unblock) == 2
    assert equal(out, make_state(2))
    assert os.path.isfile(ptr)  # restore repaired it: a regular file again
    for fn in (lambda: gc(root, keep_last=2, older_than=0), lambda: mgr.save(3, make_state(3))):
        os.unlink(ptr)
        os.mkfifo(ptr)
        within(60, fn, unblock=unblock)
    mgr.close()
    assert json.load(open(ptr))["name"] == "step_00000003"  # replaced by a regular file


def test_restore_on_a_read_only_root(tmp_path):
    mnt = str(tmp_path / "ro")
    with tmpfs(mnt, "size=32m"):
        root = os.path.join(mnt, "root")
        _root(root)
        os.unlink(os.path.join(root, "latest.json"))  # a pointer to repair, which it cannot
        shutil.rmtree(os.path.join(root, ".readers"), ignore_errors=True)
        remount(mnt, "ro")
        with pytest.raises(OSError):
            open(os.path.join(root, "x"), "w")
        mgr = shardckpt.CheckpointManager(root)
        out = make_state(0)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert mgr.restore(out) == 2
        assert equal(out, make_state(2))
        assert equal(load_fresh(os.path.join(root, "step_00000001"), make_state(1)),
                     make_state(1))
        shardckpt.verify(os.path.join(root, "step_00000001"))
        assert shardckpt.latest(root) == os.path.join(root, "step_00000002")
        mgr.close()
