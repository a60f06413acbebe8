"""Incremental checkpoints on an object store (real moto S3 server on 127.0.0.1).

References are `../NAME` between sibling prefixes of one bucket; the data objects
they point at are immutable, so retention retires a referenced checkpoint (its
manifest becomes `manifest.retired.json`) and gc keeps its data until nothing
references it.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest
import torch

import shardckpt
from shardckpt.cli import main
from shardckpt.errors import (
    BaseCheckpointError,
    CorruptCheckpointError,
    InvalidBaseError,
    ReferencedCheckpointError,
)
from shardckpt.format import DirState
from shardckpt.format.names import MANIFEST_NAME, RETIRED_MANIFEST
from shardckpt.io.reader import read_manifest
from shardckpt.io.storage import storage_for
from shardckpt.manager import refcount
from shardckpt.tools.gc import gc
from shardckpt.tools.materialize import materialize
from tests.workers import incremental as W
from tests.workers.world import run_world

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _keys(s3, url: str) -> list[str]:
    b, _, prefix = url.removeprefix("s3://").partition("/")
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=prefix + "/")
    return sorted(o["Key"] for p in pages for o in p.get("Contents", ()))


def _copy_prefix(s3, src: str, dst: str) -> None:
    b, _, sp = src.removeprefix("s3://").partition("/")
    dp = dst.removeprefix(f"s3://{b}/")
    cl = s3.client()
    for k in _keys(s3, src):
        cl.copy_object(Bucket=b, Key=dp + k[len(sp):], CopySource={"Bucket": b, "Key": k})


def _flip(s3, url: str, offset: int) -> None:
    b, _, key = url.removeprefix("s3://").partition("/")
    cl = s3.client()
    data = bytearray(cl.get_object(Bucket=b, Key=key)["Body"].read())
    data[offset] ^= 0x01
    cl.put_object(Bucket=b, Key=key, Body=bytes(data))


def _new_bucket(s3) -> str:
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return f"s3://{name}"


def _state(changed: float) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"frozen": torch.randn(1 << 18, generator=g),  # 1 MiB: 16 blocks of 64 KiB
            "adapter": torch.full((4096,), changed)}


def _empty() -> dict:
    return {"frozen": torch.zeros(1 << 18), "adapter": torch.zeros(4096)}


def test_save_with_base_references_the_sibling_and_loads_bitwise(bucket, s3_server, capsys):
    root = f"{bucket}/run"
    full = shardckpt.save(_state(1.0), f"{root}/step_1", block_size=1 << 16)
    inc = shardckpt.save(_state(2.0), f"{root}/step_2", base=f"{root}/step_1",
                         block_size=1 << 16)
    assert inc.bytes_written < 0.1 * full.bytes_written, (inc, full)
    m = read_manifest(f"{root}/step_2")
    assert list(m.bases) == ["../step_1"]
    out = _empty()
    shardckpt.load(out, f"{root}/step_2")
    assert torch.equal(out["frozen"], _state(2.0)["frozen"])
    assert torch.equal(out["adapter"], _state(2.0)["adapter"])
    assert shardckpt.verify(f"{root}/step_2", deep=True).ok
    assert main(["inspect", f"{root}/step_2", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bases"] == [f"{root}/step_1"] and info["bytes_referenced"] > 0.7 * (1 << 20)
    # step_3 references step_2's adapter block: step_2 may not be rewritten in place
    shardckpt.save(_state(2.0), f"{root}/step_3", base=f"{root}/step_2", block_size=1 << 16)
    assert set(read_manifest(f"{root}/step_3").bases) == {"../step_1", "../step_2"}
    with pytest.raises(ReferencedCheckpointError, match="step_3"):
        materialize(f"{root}/step_2")
    keys = _keys(s3_server, root)
    with pytest.raises(ReferencedCheckpointError, match="step_3"):  # nor saved over
        shardckpt.save(_state(5.0), f"{root}/step_2")
    assert _keys(s3_server, root) == keys
    shardckpt.save(_state(4.0), f"{root}/step_3")  # step_3 standalone: nothing uses step_2
    # Materialized in place, step_2 is standalone, and loads with its base gone.
    rep = materialize(f"{root}/step_2")
    assert rep.changed and rep.bytes_copied > 0.7 * (1 << 20)
    assert not read_manifest(f"{root}/step_2").bases
    assert storage_for(root).delete_checkpoint(root, "step_1")
    assert not _keys(s3_server, f"{root}/step_1")
    out = _empty()
    shardckpt.load(out, f"{root}/step_2")
    assert torch.equal(out["frozen"], _state(2.0)["frozen"])
    # only the materialized checkpoint's own objects remain: the old data object is gone
    assert len(_keys(s3_server, f"{root}/step_2")) == 2


def test_a_base_outside_the_prefix_is_a_typed_error_and_writes_nothing(bucket, tmp_path):
    root = f"{bucket}/run"
    shardckpt.save(_state(1.0), f"{root}/step_1")
    for bad in (f"{bucket}/other/step_1", str(tmp_path / "step_1")):
        with pytest.raises(InvalidBaseError, match="same directory"):
            shardckpt.save(_state(2.0), f"{root}/step_2", base=bad)
        assert storage_for(f"{root}/step_2").state(f"{root}/step_2") == DirState.MISSING


def test_incremental_save_with_storage_options_reaches_the_base_the_same_way(
        bucket, s3_server, monkeypatch):
    root = f"{bucket}/run"
    shardckpt.save(_state(1.0), f"{root}/step_1", block_size=1 << 16)  # endpoint from env
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    opts = {"endpoint_url": s3_server.url}
    inc = shardckpt.save(_state(2.0), f"{root}/step_2", base=f"{root}/step_1",
                         block_size=1 << 16, storage_options=opts)
    assert inc.bytes_written < 100_000
    out = _empty()
    shardckpt.load(out, f"{root}/step_2", storage_options=opts)
    assert torch.equal(out["frozen"], _state(2.0)["frozen"])


def test_fsspec_store_incremental(tmp_path):
    pytest.importorskip("fsspec")
    root = f"memory://shardckpt-{tmp_path.name}/run"
    shardckpt.save(_state(1.0), f"{root}/step_1", block_size=1 << 16)
    inc = shardckpt.save(_state(3.0), f"{root}/step_2", base=f"{root}/step_1",
                         block_size=1 << 16)
    assert inc.bytes_written < 100_000
    out = _empty()
    shardckpt.load(out, f"{root}/step_2")
    assert torch.equal(out["adapter"], _state(3.0)["adapter"])


def test_manager_on_s3_overwriting_a_base_rewrites_its_users_first(bucket, s3_server):
    root = f"{bucket}/run"
    mgr = W.manager(root, keep_last=None, full_every=10)
    for s in (1, 2, 3):
        mgr.save(s, W.state_at(s))
    assert read_manifest(f"{root}/step_00000003").bases
    st = W.empty_state()
    assert mgr.restore(st, step=1) == 1
    mgr.save(1, W.state_at(7))  # a new step 1: steps 2 and 3 must not lose their blocks
    mgr.close()
    for s, want in ((1, 7), (2, 2), (3, 3)):
        st = W.empty_state()
        shardckpt.load(st, f"{root}/step_{s:08d}")
        assert W.matches(st, want), s
    assert not read_manifest(f"{root}/step_00000002").bases  # rewritten standalone


# ------------------------------------------------------------------ manager, 2 FSDP2 ranks


@pytest.fixture(scope="module")
def s3_trained(s3_server, tmp_path_factory):
    root = f"{_new_bucket(s3_server)}/run"
    ref = str(tmp_path_factory.mktemp("s3inc") / "ref.pt")
    out = run_world(2, W.train_with_manager, root, ref, 10)
    return root, ref, out


def test_manager_on_s3_writes_only_what_changed_and_retires_the_full_save(s3_trained, s3_server):
    root, _, out = s3_trained
    by_step = {r["step"]: r for r in out[0]}
    for s in range(2, 11):
        assert by_step[s]["own"] < 0.35 * by_step[1]["own"], (s, by_step[s])
        assert by_step[s]["listed"] == [max(1, s - 1), s]
    assert [i.step for i in shardckpt.list_checkpoints(root)] == [9, 10]
    assert refcount.retired_names(root) == ["step_00000001"]
    assert refcount.references(root).users_of("step_00000001") == {"step_00000009",
                                                                      "step_00000010"}
    keys = _keys(s3_server, f"{root}/step_00000001")
    assert f"run/step_00000001/{RETIRED_MANIFEST}" in keys
    assert f"run/step_00000001/{MANIFEST_NAME}" not in keys
    # steps 2..8 were dropped and nothing references them: every object of theirs is gone
    assert not any(_keys(s3_server, f"{root}/step_0000000{s}") for s in range(2, 9))


@pytest.mark.parametrize("ws", [1, 3])
def test_newest_on_s3_loads_bitwise_at_other_world_sizes(s3_trained, ws):
    root, ref, _ = s3_trained
    newest = f"{root}/step_00000010"
    if ws == 1:
        assert W.load_fsdp(0, None, newest, ref) == []
    else:
        assert run_world(ws, W.load_fsdp, newest, ref)[0] == []
    assert shardckpt.verify(newest, deep=True).ok


def test_flipped_byte_in_a_referenced_object_names_the_base(s3_trained, s3_server):
    root, ref, _ = s3_trained
    copy = root + "-flipped"
    _copy_prefix(s3_server, root, copy)
    m = read_manifest(f"{copy}/step_00000010")
    r = next(r for t in m.tensors.values() for c in t.chunks for r in c.refs
             if r.base == "../step_00000001")
    _flip(s3_server, f"{copy}/step_00000001/{r.file}", r.offset + 3)
    with pytest.raises(BaseCheckpointError) as ei:
        W.load_fsdp(0, None, f"{copy}/step_00000010", ref)
    assert f"{copy}/step_00000001" in str(ei.value) and "step_00000010" in str(ei.value)
    with pytest.raises(CorruptCheckpointError, match="in base checkpoint .*step_00000001"):
        shardckpt.verify(f"{copy}/step_00000010", deep=True)


def test_gc_on_s3_agrees_with_retention(s3_trained, s3_server):
    root, ref, _ = s3_trained
    copy = root + "-gc"
    _copy_prefix(s3_server, root, copy)
    before = _keys(s3_server, f"{copy}/step_00000001")
    rep = gc(copy, keep_last=2, older_than=0)
    # the retired base's data is named by its retired manifest: not an orphan
    assert not [a for a in rep.removed if "step_00000001" in a.path], rep
    assert _keys(s3_server, f"{copy}/step_00000001") == before
    # keep-last 1 drops step 9; the base stays while step 10 references it
    rep = gc(copy, keep_last=1, older_than=0)
    assert [i.step for i in shardckpt.list_checkpoints(copy)] == [10]
    assert W.load_fsdp(0, None, f"{copy}/step_00000010", ref) == []
    assert refcount.retired_names(copy) == ["step_00000001"]
    # once step 10 is standalone, nothing references the base: the next gc sweeps it
    materialize(f"{copy}/step_00000010")
    rep = gc(copy, keep_last=1, older_than=0)
    assert [a.kind for a in rep.removed if "step_00000001" in a.path] == ["retired"]
    assert not _keys(s3_server, f"{copy}/step_00000001")
    assert W.load_fsdp(0, None, f"{copy}/step_00000010", ref) == []


# ------------------------------------------------------------------ kill -9


@pytest.mark.parametrize("point,listed", [("store-data", [3, 4]), ("retire", [5, 6]),
                                          ("store-retire", [5, 6]), ("store-sweep", [4, 5])])
def test_kill9_on_s3_leaves_every_committed_checkpoint_loadable(s3_server, tmp_path, point,
                                                                listed):
    root, flag = f"{_new_bucket(s3_server)}/run", str(tmp_path / "flag")
    W.run_until_parked(point, root, flag)
    by_name: dict[str, set[str]] = {}
    for k in _keys(s3_server, root):
        parts = k.split("/")
        if len(parts) >= 3:  # run/NAME/...: not a marker or pointer beside the checkpoints
            by_name.setdefault(parts[1], set()).add(parts[2])
    if point == "store-retire":  # killed between the retired copy and the manifest's delete
        assert [n for n, f in by_name.items() if {MANIFEST_NAME, RETIRED_MANIFEST} <= f]
    if point == "store-sweep":  # killed with the data deleted, the retired manifest not yet
        assert [n for n, f in by_name.items() if f == {RETIRED_MANIFEST}]
    steps = W.every_committed_checkpoint_loads(root)
    assert steps[-2:] == listed, steps
    # the next run of the manager (and gc) finish what the killed one left
    W.resume_after_kill(root, steps[-1])
    assert not [k for k in _keys(s3_server, root) if ".partial-" in k]
    # nothing is kept that no committed checkpoint needs: only live or referenced names
    refs = refcount.references(root)
    live = {i.name for i in shardckpt.list_checkpoints(root)}
    names = {k.split("/")[1] for k in _keys(s3_server, root) if k.count("/") >= 2}
    assert names <= live | set(refs.users) | {".readers"}, (names, live, refs.users)
