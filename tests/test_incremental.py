"""Incremental checkpoints in one process: references, retention, gc, tools, damage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import shardckpt
from shardckpt.errors import (
    BaseCheckpointError,
    CorruptCheckpointError,
    InvalidBaseError,
    ReferencedCheckpointError,
)
from shardckpt.format import MANIFEST_NAME, parse_manifest
from shardckpt.format.manifest import content_checksum
from shardckpt.manager import refcount
from shardckpt.tools.gc import gc
from shardckpt.tools.inspect import inspect_checkpoint
from shardckpt.tools.materialize import materialize
from shardckpt.tools.reshard import reshard
from tests.workers import incremental as W

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BS = 1024


def _manifest(path) -> dict:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


def _own_bytes(path) -> int:
    return sum(f["size"] for f in _manifest(path)["files"].values())


def _loaded(path) -> dict:
    st = W.empty_state()
    shardckpt.load(st, path)
    return st


def _chain(tmp_path, n: int = 3) -> list[str]:
    paths = []
    for s in range(1, n + 1):
        p = str(tmp_path / f"step_{s}")
        shardckpt.save(W.state_at(s), p, block_size=BS, base=paths[-1] if paths else None)
        paths.append(p)
    return paths


def test_unchanged_blocks_are_referenced_not_written(tmp_path):
    p1, p2, p3 = _chain(tmp_path)
    full, inc = _own_bytes(p1), _own_bytes(p3)
    # What is left is the adapters and the step object, compressed or not (the policy
    # decides from the rates earlier saves of this process measured).
    assert inc < 0.2 * full, (inc, full)
    m = _manifest(p3)
    assert m["tensors"]["base"]["chunks"][0]["length"] == 0  # not a byte of it written
    # Depth one: the frozen base is referenced where it lies (step_1), never through step_2.
    base_refs = {r[2] for r in m["tensors"]["base"]["chunks"][0]["refs"]}
    assert base_refs == {"../step_1"}
    assert "refs" not in m["tensors"]["lora_a"]["chunks"][0]
    assert all(len(h) == 32 for h in m["tensors"]["base"]["chunks"][0]["hashes"])
    for s, p in enumerate((p1, p2, p3), 1):
        assert W.matches(_loaded(p), s)
    info = inspect_checkpoint(p3)
    assert info["bytes_referenced"] > 4 * info["bytes_own"]
    assert info["bases"] == [os.path.abspath(p1)]
    assert shardckpt.verify(p3, deep=True).ok


def test_overwriting_a_referenced_base_by_hand_is_refused_and_writes_nothing(tmp_path):
    p1, p2, p3 = _chain(tmp_path)
    before = _manifest(p1)
    with pytest.raises(ReferencedCheckpointError, match="step_2.*step_3|step_3"):
        shardckpt.save(W.state_at(9), p1, block_size=BS)
    assert _manifest(p1) == before and W.matches(_loaded(p3), 3)
    assert not [e for e in os.listdir(tmp_path) if e.startswith(".")]  # no staging left
    # once nothing references it, the overwrite goes through
    materialize(p3)
    materialize(p2)
    shardckpt.save(W.state_at(9), p1, block_size=BS)
    assert W.matches(_loaded(p1), 9) and W.matches(_loaded(p3), 3)


def test_blocks_match_by_content_not_position(tmp_path):
    a = {"x": torch.arange(1024, dtype=torch.float32), "y": torch.ones(256)}
    shardckpt.save(a, str(tmp_path / "a"), block_size=BS)
    # Same bytes under other keys and at other offsets of a larger tensor.
    b = {"y2": a["x"][256:512].clone(), "z": torch.cat([a["x"][:512], torch.zeros(256)])}
    r = shardckpt.save(b, str(tmp_path / "b"), block_size=BS, base=str(tmp_path / "a"))
    assert r is not None
    m = _manifest(tmp_path / "b")
    # Different structure: a full save (the manager's rule), bitwise all the same.
    assert m["bases"] == {}
    out = {"y2": torch.zeros(256), "z": torch.zeros(768)}
    shardckpt.load(out, str(tmp_path / "b"))
    assert torch.equal(out["y2"], b["y2"]) and torch.equal(out["z"], b["z"])
    # Same structure, rows permuted: every block found at its new place.
    c = {"x": torch.cat([a["x"][768:], a["x"][:768]]), "y": a["y"]}
    shardckpt.save(c, str(tmp_path / "c"), block_size=BS, base=str(tmp_path / "a"))
    mc = _manifest(tmp_path / "c")
    assert [r[0] for r in mc["tensors"]["x"]["chunks"][0]["refs"]] == [0, 1]
    assert mc["tensors"]["x"]["chunks"][0]["length"] == 0
    out = {"x": torch.zeros(1024), "y": torch.zeros(256)}
    shardckpt.load(out, str(tmp_path / "c"))
    assert torch.equal(out["x"], c["x"])


def test_structure_change_is_a_full_save(tmp_path):
    p1 = str(tmp_path / "step_1")
    shardckpt.save(W.state_at(1), p1, block_size=BS)
    st = W.state_at(2)
    st["extra"] = torch.ones(3)
    shardckpt.save(st, str(tmp_path / "step_2"), block_size=BS, base=p1)
    assert _manifest(tmp_path / "step_2")["bases"] == {}


def test_base_must_be_a_committed_sibling(tmp_path):
    p1 = str(tmp_path / "a" / "step_1")
    shardckpt.save(W.state_at(1), p1, block_size=BS)
    with pytest.raises(InvalidBaseError, match="same directory"):
        shardckpt.save(W.state_at(2), str(tmp_path / "b" / "step_2"), base=p1)
    with pytest.raises(InvalidBaseError, match="its own base"):
        shardckpt.save(W.state_at(2), p1, base=p1)
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        shardckpt.save(W.state_at(2), str(tmp_path / "a" / "s2"), base=str(tmp_path / "a" / "x"))
    assert not [e for e in os.listdir(tmp_path / "a") if ".partial-" in e]


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def test_damaged_or_missing_base_is_a_typed_error_naming_both(tmp_path):
    p1, _, p3 = _chain(tmp_path)
    ref = _manifest(p3)["tensors"]["base"]["chunks"][0]["refs"][0]
    _flip(os.path.join(p1, ref[3]), ref[4] + 10)
    with pytest.raises(BaseCheckpointError) as ei:
        _loaded(p3)
    msg = str(ei.value)
    assert p3 in msg and p1 in msg and "'base'" in msg
    assert ei.value.base == p1 and ei.value.tensor == "base"
    rep = shardckpt.verify(p3, raise_on_error=False)
    assert not rep.ok and any(p.tensor == "base" and p1 in p.what for p in rep.problems)
    with pytest.raises(CorruptCheckpointError, match="step_1"):
        shardckpt.verify(p3)
    shutil.rmtree(p1)
    with pytest.raises(BaseCheckpointError, match="missing") as ei:
        _loaded(p3)
    assert p1 in str(ei.value) and p3 in str(ei.value)


@pytest.mark.parametrize("bad", ["../../x", "../", "..", "../.step_1.old-0123456789ab",
                                 "/abs/step_1", "step_1", "../a/b", "../a\\b", "../x/../step_1"])
def test_reference_escaping_the_root_is_rejected(tmp_path, bad):
    _, _, p3 = _chain(tmp_path)
    d = _manifest(p3)
    for key in ("bases",):
        d[key] = {bad if k == "../step_1" else k: v for k, v in d[key].items()}
    for t in d["tensors"].values():
        for c in t["chunks"]:
            for r in c.get("refs", []):
                if r[2] == "../step_1":
                    r[2] = bad
    d["checksum"] = content_checksum(d)
    with pytest.raises(CorruptCheckpointError, match="bases|refs"):
        parse_manifest(json.dumps(d).encode(), "m")


def test_reference_outside_its_base_file_is_rejected(tmp_path):
    _, _, p3 = _chain(tmp_path)
    d = _manifest(p3)
    d["tensors"]["base"]["chunks"][0]["refs"][0][4] += 1 << 30
    d["checksum"] = content_checksum(d)
    with pytest.raises(CorruptCheckpointError, match="outside"):
        parse_manifest(json.dumps(d).encode(), "m")


def test_manager_retires_referenced_checkpoints_and_sweeps_them(tmp_path):
    root = str(tmp_path / "root")
    mgr = W.manager(root)  # keep_last=2, full_every=3
    seen_retired = False
    for s in range(1, 11):
        mgr.save(s, W.state_at(s))
        listed = [i.step for i in shardckpt.list_checkpoints(root)]
        assert listed == list(range(max(1, s - 1), s + 1))
        retired = refcount.retired_names(root)
        seen_retired |= bool(retired)
        refs = refcount.references(root)
        # Only what a listed checkpoint references stays, retired.
        assert all(refs.users_of(n) for n in retired), (s, retired)
        for i in shardckpt.list_checkpoints(root):
            assert W.matches(_loaded(i.path), i.step)
        assert shardckpt.latest(root).endswith(f"step_{s:08d}")
    assert seen_retired
    # Full saves every third save: 1, 4, 7, 10; step 10 references nothing.
    assert _manifest(os.path.join(root, "step_00000010"))["bases"] == {}
    assert _manifest(os.path.join(root, "step_00000009"))["bases"]
    state = W.empty_state()
    assert mgr.restore(state) == 10 and W.matches(state, 10)
    mgr.save(11, W.state_at(11))  # step 9 dropped; step 7 (retired) unreferenced: gone
    assert not os.path.exists(os.path.join(root, "step_00000007"))
    assert refcount.retired_names(root) == []


def test_gc_agrees_with_retention(tmp_path):
    root = str(tmp_path / "root")
    mgr = W.manager(root, keep_last=None, full_every=10)
    for s in range(1, 6):
        mgr.save(s, W.state_at(s))
    rep = gc(root, keep_last=1, older_than=0)
    assert [i.step for i in shardckpt.list_checkpoints(root)] == [5]
    assert W.matches(_loaded(os.path.join(root, "step_00000005")), 5)
    assert "step_00000001" in refcount.retired_names(root)
    assert any(n == "step_00000001" and "retired" in why for n, why in rep.kept)
    mgr.save(6, W.state_at(6))  # retention (keep_last=None) drops nothing; 5 still referenced
    assert W.matches(_loaded(os.path.join(root, "step_00000006")), 6)
    for s in (6, 5):  # standalone: nothing references step 1 any more
        materialize(os.path.join(root, f"step_{s:08d}"))
    dry = gc(root, older_than=0, dry_run=True)  # says what the real run then does
    assert [(a.kind, a.path) for a in dry.removed] == [
        ("retired", os.path.join(root, "step_00000001"))] and dry.removed[0].bytes > 0
    assert os.path.exists(os.path.join(root, "step_00000001"))
    rep = gc(root, older_than=0)  # leftovers only, and retired checkpoints nobody uses
    assert [a.kind for a in rep.removed] == ["retired"]
    assert rep.removed[0].bytes == dry.removed[0].bytes
    assert not os.path.exists(os.path.join(root, "step_00000001"))
    assert W.matches(_loaded(os.path.join(root, "step_00000005")), 5)


def test_materialize_makes_a_standalone_checkpoint(tmp_path):
    p1, p2, p3 = _chain(tmp_path)
    p4 = str(tmp_path / "step_4")
    shardckpt.save(W.state_at(3), p4, block_size=BS, base=p3)  # uses step_3's own blocks
    with pytest.raises(ReferencedCheckpointError, match="step_4"):
        materialize(p3)  # in place it would move blocks that step_4 references
    shutil.rmtree(p4)
    out = str(tmp_path / "exported")
    rep = materialize(p3, out)
    assert rep.changed and rep.bytes_copied > 0
    assert _manifest(out)["bases"] == {}
    rep = materialize(p3)  # in place: nothing references step_3
    assert _manifest(p3)["bases"] == {}
    shutil.rmtree(p1)
    assert W.matches(_loaded(p3), 3) and W.matches(_loaded(out), 3)
    assert shardckpt.verify(p3, deep=True).ok
    assert not materialize(p3).changed
    cli = subprocess.run([sys.executable, "-m", "shardckpt.cli", "materialize", p2, "--out",
                          str(tmp_path / "x"), "--json"], cwd=REPO, capture_output=True,
                         text=True)
    # step_2 references step_1, which is gone: a one-line typed error, exit status 1
    assert cli.returncode == 1 and "step_1" in cli.stderr and "Traceback" not in cli.stderr


def test_reshard_and_convert_write_standalone_checkpoints(tmp_path):
    from shardckpt.tools.convert import convert

    p1, _, p3 = _chain(tmp_path)
    reshard(p3, str(tmp_path / "r3"), 3, min_split_bytes=0)
    convert(p3, str(tmp_path / "c"), "shardckpt")
    shutil.rmtree(p1)
    for p in (tmp_path / "r3", tmp_path / "c"):
        assert _manifest(p)["bases"] == {}
        assert W.matches(_loaded(str(p)), 3)


def test_manager_overwriting_a_base_rewrites_its_users_first(tmp_path):
    root = str(tmp_path / "root")
    mgr = W.manager(root, keep_last=None, full_every=10)
    for s in (1, 2, 3):
        mgr.save(s, W.state_at(s))
    st = W.empty_state()
    assert mgr.restore(st, step=1) == 1
    mgr.save(1, W.state_at(7))  # a new step 1: steps 2 and 3 must not lose their blocks
    for s in (2, 3):
        assert W.matches(_loaded(os.path.join(root, f"step_{s:08d}")), s)
    assert W.matches(_loaded(os.path.join(root, "step_00000001")), 7)


def test_cli_inspect_and_materialize_json(tmp_path):
    _, _, p3 = _chain(tmp_path)
    r = subprocess.run([sys.executable, "-m", "shardckpt.cli", "inspect", p3, "--json"],
                       cwd=REPO, capture_output=True, text=True, check=True)
    info = json.loads(r.stdout)
    assert info["bytes_referenced"] > 0 and info["bases"]
    r = subprocess.run([sys.executable, "-m", "shardckpt.cli", "inspect", p3], cwd=REPO,
                       capture_output=True, text=True, check=True)
    assert "incremental" in r.stdout and "referenced" in r.stdout
    r = subprocess.run([sys.executable, "-m", "shardckpt.cli", "materialize", p3, "--out",
                        str(tmp_path / "m"), "--json"], cwd=REPO, capture_output=True,
                       text=True, check=True)
    out = json.loads(r.stdout)
    assert out["changed"] and out["out"] == str(tmp_path / "m") and out["bytes_copied"] > 0


def test_async_incremental_saves_and_a_restore_that_skips_a_broken_base(tmp_path):
    root = str(tmp_path / "root")
    mgr = W.manager(root, keep_last=None, full_every=10, async_save=True)
    for s in range(1, 5):
        mgr.save(s, W.state_at(s))
    mgr.wait()
    assert _manifest(os.path.join(root, "step_00000004"))["bases"]
    st = W.empty_state()
    assert mgr.restore(st) == 4 and W.matches(st, 4)
    mgr.close()
    # The full step 1 lost by hand: restore skips what references it, with the reason.
    shutil.rmtree(os.path.join(root, "step_00000001"))
    mgr = W.manager(root, keep_last=None)
    # Every checkpoint references it: none loads, which is an error, not "a fresh run".
    with pytest.raises(CorruptCheckpointError, match="none of its 3 committed") as ei:
        mgr.restore(W.empty_state())
    assert "step_00000001" in str(ei.value)


@pytest.mark.parametrize("damage", ["delete", "truncate", "base_of_base"])
def test_manager_does_not_build_on_a_damaged_base(tmp_path, damage):
    # An incremental save onto a base whose data is gone commits fine and never loads.
    root = str(tmp_path / "root")
    mgr = W.manager(root)  # keep_last=2, full_every=3
    mgr.save(1, W.state_at(1))
    mgr.save(2, W.state_at(2))  # references step 1
    victim = os.path.join(root, "step_00000002" if damage != "base_of_base" else "step_00000001",
                          "data", "r00000.bin")
    if damage == "delete":
        os.unlink(victim)
    else:
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
    with pytest.warns(RuntimeWarning, match="written in full"):
        mgr.save(3, W.state_at(3))
    step3 = os.path.join(root, "step_00000003")
    assert _manifest(step3)["bases"] == {}
    assert W.matches(_loaded(step3), 3)
    state = W.empty_state()
    assert mgr.restore(state) == 3 and W.matches(state, 3)
