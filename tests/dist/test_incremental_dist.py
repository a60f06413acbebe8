"""Incremental checkpoints under FSDP2 on real gloo ranks: frozen base, trained adapters."""

from __future__ import annotations

import json
import os

import pytest

import shardckpt
from shardckpt.errors import BaseCheckpointError
from shardckpt.format import MANIFEST_NAME
from shardckpt.manager import refcount
from tests.workers import incremental as W
from tests.workers.world import run_world


def _own(path: str) -> int:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return sum(x["size"] for x in json.load(f)["files"].values())


@pytest.fixture(scope="module")
def trained_root(tmp_path_factory):
    d = tmp_path_factory.mktemp("inc")
    root, ref = str(d / "root"), str(d / "ref.pt")
    out = run_world(2, W.train_with_manager, root, ref, 10)
    return root, ref, out


def test_ten_saves_with_a_frozen_base_write_only_what_changed(trained_root):
    root, _, out = trained_root
    by_step = {r["step"]: r for r in out[0]}
    full = by_step[1]["own"]
    for s in range(2, 11):
        # adapters and their AdamW moments only: the frozen base is 85 % of the state
        assert by_step[s]["own"] < 0.35 * full, (s, by_step[s], full)
        assert by_step[s]["bytes_written"] < by_step[1]["bytes_written"]
        assert by_step[s]["listed"] == [max(1, s - 1), s]
    assert [i.step for i in shardckpt.list_checkpoints(root)] == [9, 10]
    assert shardckpt.latest(root).endswith("step_00000010")
    # Retention dropped the first (full) checkpoint: not listed, kept only as a base.
    assert refcount.retired_names(root) == ["step_00000001"]
    assert refcount.references(root).users_of("step_00000001") == {"step_00000009",
                                                                      "step_00000010"}


@pytest.mark.parametrize("ws", [1, 3])
def test_newest_loads_bitwise_at_other_world_sizes(trained_root, ws):
    root, ref, _ = trained_root
    newest = os.path.join(root, "step_00000010")
    if ws == 1:
        assert W.load_fsdp(0, None, newest, ref) == []
    else:
        assert run_world(ws, W.load_fsdp, newest, ref)[0] == []
    assert shardckpt.verify(newest, deep=True).ok


def test_flipped_byte_in_a_referenced_block_names_the_base(trained_root, tmp_path):
    import shutil

    root, ref, _ = trained_root
    copy = str(tmp_path / "root")
    shutil.copytree(root, copy)
    base = os.path.join(copy, "step_00000001")
    with open(os.path.join(copy, "step_00000010", MANIFEST_NAME)) as f:
        m = json.load(f)
    r = next(r for t in m["tensors"].values() for c in t["chunks"] for r in c.get("refs", ()))
    with open(os.path.join(base, r[3]), "r+b") as f:
        f.seek(r[4] + 3)
        b = f.read(1)
        f.seek(r[4] + 3)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(BaseCheckpointError) as ei:
        W.load_fsdp(0, None, os.path.join(copy, "step_00000010"), ref)
    assert base in str(ei.value) and "step_00000010" in str(ei.value)


def test_base_at_two_ranks_incremental_at_three(tmp_path):
    base, inc = str(tmp_path / "step_1"), str(tmp_path / "step_2")
    ref = str(tmp_path / "ref.pt")
    run_world(2, W.save_fsdp, base, None, None, 3)
    # Resumed by 3 ranks: every shard boundary differs from the base's; the frozen
    # weights' blocks (rows of 384 bytes) are found by content, wherever they lie.
    run_world(3, W.resume_and_save, base, inc, ref)
    with open(os.path.join(inc, MANIFEST_NAME)) as f:
        m = json.load(f)
    assert list(m["bases"]) == ["../step_1"]
    frozen = [k for k in m["tensors"] if k.endswith(".base.weight")]
    assert len(frozen) == 3
    for k in frozen:
        assert all(c["length"] == 0 and c["refs"] for c in m["tensors"][k]["chunks"]), k
    assert _own(inc) < 0.45 * _own(base), (_own(inc), _own(base))
    assert W.load_fsdp(0, None, inc, ref) == []
    assert run_world(2, W.load_fsdp, inc, ref)[0] == []
