"""Issue 17, item 3: nothing a checkpoint names is read from outside it.

Hostile file names in a (re-summed) manifest, FIFOs where files are expected,
symlinked data/, data files and step directories, and hostile pointers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointNotFoundError, CorruptCheckpointError, ShardckptError
from shardckpt.tools.convert import convert
from shardckpt.tools.reshard import reshard

from ._util import (
    cli,
    equal,
    fifo_unblocker,
    load_fresh,
    make_state,
    read_manifest_json,
    rename_data_file,
    save_ckpt,
    within,
    write_manifest_json,
)

HOSTILE_NAMES = ["../../../etc/passwd", "/etc/passwd", "/dev/zero", "data/../../outside.bin",
                 "data/../manifest.json", "data/sub/../../../etc/passwd", "../outside.bin",
                 "data/", "data/.hidden", "data\\..\\x", "data/r00000.bin\x00x"]


def _all_refusals(ckpt: str, dst: str) -> list[tuple[str, BaseException]]:
    like = make_state(0)
    calls = {
        "load": lambda: load_fresh(ckpt, like),
        "load(verify=False)": lambda: load_fresh(ckpt, like, verify=False),
        "verify": lambda: shardckpt.verify(ckpt),
        "verify(deep)": lambda: shardckpt.verify(ckpt, deep=True),
        "reshard": lambda: reshard(ckpt, dst + "-r", 2),
        "convert": lambda: convert(ckpt, dst + "-c.pt", "torch"),
    }
    out = []
    for what, fn in calls.items():
        with pytest.raises(ShardckptError) as ei:
            within(30, fn)
        out.append((what, ei.value))
    return out


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_file_names_are_refused_everywhere(tmp_path, name):
    ckpt = str(tmp_path / "ck")
    save_ckpt(ckpt)
    outside = tmp_path / "outside.bin"
    shutil.copy(os.path.join(ckpt, "data", "r00000.bin"), outside)
    m = read_manifest_json(ckpt)
    rename_data_file(m, "data/r00000.bin", name)
    write_manifest_json(ckpt, m)  # re-summed: the validation itself is tested
    for what, err in _all_refusals(ckpt, str(tmp_path / "dst")):
        assert isinstance(err, CorruptCheckpointError), (what, err)
        assert os.path.join(ckpt, "manifest.json") in str(err), (what, err)
        assert "inside the checkpoint" in str(err), (what, err)
    assert not os.path.exists(tmp_path / "dst-r") and not os.path.exists(tmp_path / "dst-c.pt")


def test_hostile_name_refused_by_cli(tmp_path):
    ckpt = str(tmp_path / "ck")
    save_ckpt(ckpt)
    m = read_manifest_json(ckpt)
    rename_data_file(m, "data/r00000.bin", "../../../etc/passwd")
    write_manifest_json(ckpt, m)
    for args in (["verify", ckpt], ["reshard", ckpt, str(tmp_path / "r"), "--world-size", "2"]):
        r = cli(*args)
        assert r.returncode != 0 and "Traceback" not in r.stderr, (args, r.stderr)
        assert "manifest.json" in r.stderr + r.stdout


def _fifo_instead_of(path: str) -> None:
    os.unlink(path)
    os.mkfifo(path)


def test_fifo_data_file_does_not_hang(tmp_path):
    ckpt = str(tmp_path / "ck")
    like = save_ckpt(ckpt)
    data = os.path.join(ckpt, "data", "r00000.bin")
    _fifo_instead_of(data)
    unblock = fifo_unblocker(data)
    for fn in (lambda: load_fresh(ckpt, like), lambda: load_fresh(ckpt, like, verify=False),
               lambda: shardckpt.verify(ckpt), lambda: reshard(ckpt, str(tmp_path / "r"), 2)):
        with pytest.raises(CorruptCheckpointError) as ei:
            within(20, fn, unblock=unblock)
        assert data in str(ei.value) and "not a regular file" in str(ei.value)
    r = cli("verify", ckpt, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert data in r.stdout + r.stderr


def test_fifo_manifest_does_not_hang(tmp_path):
    ckpt = str(tmp_path / "ck")
    like = save_ckpt(ckpt)
    man = os.path.join(ckpt, "manifest.json")
    _fifo_instead_of(man)
    unblock = fifo_unblocker(man)
    for fn in (lambda: load_fresh(ckpt, like), lambda: shardckpt.verify(ckpt),
               lambda: reshard(ckpt, str(tmp_path / "r"), 2)):
        with pytest.raises(ShardckptError) as ei:
            within(20, fn, unblock=unblock)
        assert ckpt in str(ei.value)
    r = cli("verify", ckpt, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr and ckpt in r.stdout + r.stderr


def test_symlinked_data_dir_is_not_followed(tmp_path):
    ckpt = str(tmp_path / "ck")
    like = save_ckpt(ckpt)
    elsewhere = str(tmp_path / "elsewhere")
    shutil.move(os.path.join(ckpt, "data"), elsewhere)
    os.symlink(elsewhere, os.path.join(ckpt, "data"))
    where = os.path.join(ckpt, "data")
    for fn in (lambda: load_fresh(ckpt, like), lambda: load_fresh(ckpt, like, verify=False),
               lambda: reshard(ckpt, str(tmp_path / "r"), 2)):
        with pytest.raises(CorruptCheckpointError) as ei:
            within(20, fn)
        assert where in str(ei.value) and "symlink" in str(ei.value)
    with pytest.raises(CorruptCheckpointError) as ei:
        shardckpt.verify(ckpt)
    assert where in str(ei.value)


def test_symlinked_data_file_is_not_followed(tmp_path):
    ckpt = str(tmp_path / "ck")
    like = save_ckpt(ckpt)
    data = os.path.join(ckpt, "data", "r00000.bin")
    other = str(tmp_path / "copy.bin")
    shutil.move(data, other)
    os.symlink(other, data)
    for fn in (lambda: load_fresh(ckpt, like), lambda: load_fresh(ckpt, like, verify=False),
               lambda: reshard(ckpt, str(tmp_path / "r"), 2)):
        with pytest.raises(CorruptCheckpointError) as ei:
            within(20, fn)
        assert data in str(ei.value) and "symlink" in str(ei.value)
    with pytest.raises(CorruptCheckpointError) as ei:
        shardckpt.verify(ckpt)
    assert data in str(ei.value)


def _manager_root(tmp_path) -> tuple[str, dict, dict]:
    """root with step 1 (seed 1); outside it a newer checkpoint (seed 9) at ../step_00000009."""
    root = str(tmp_path / "root")
    mgr = shardckpt.CheckpointManager(root, keep_last=3)
    s1 = make_state(1)
    mgr.save(1, s1)
    mgr.close()
    s9 = save_ckpt(str(tmp_path / "step_00000009"), 9)
    return root, s1, s9


@pytest.mark.parametrize("name", ["../step_00000009", "../elsewhere", "/abs/step_00000009",
                                  "step_00000009/../../step_00000009", ".."])
def test_hostile_latest_pointer_is_ignored_and_not_written_back(tmp_path, name):
    root, s1, _ = _manager_root(tmp_path)
    shardckpt.save(make_state(7), str(tmp_path / "elsewhere"))
    with open(os.path.join(root, "latest.json"), "w") as f:
        json.dump({"name": name, "step": 9}, f)
    mgr = shardckpt.CheckpointManager(root)
    with pytest.raises(CheckpointNotFoundError) as ei:
        mgr.restore(make_state(0), which="latest")
    assert root in str(ei.value)
    out = make_state(0)
    assert mgr.restore(out) == 1
    assert equal(out, s1)
    assert shardckpt.latest(root) == os.path.join(root, "step_00000001")
    mgr.close()
    assert _read_name(root) == "step_00000001"  # repaired, the hostile name not kept
    mgr = shardckpt.CheckpointManager(root)
    mgr.save(2, make_state(2))
    mgr.close()
    assert _read_name(root) == "step_00000002"


def _read_name(root: str) -> str:
    with open(os.path.join(root, "latest.json")) as f:
        return str(json.load(f).get("name"))


def test_symlinked_step_dir_is_not_restored_listed_or_deleted(tmp_path):
    root, s1, s9 = _manager_root(tmp_path)
    target = str(tmp_path / "step_00000009")
    os.symlink(target, os.path.join(root, "step_00000009"))
    mgr = shardckpt.CheckpointManager(root, keep_last=1)
    out = make_state(0)
    assert mgr.restore(out) == 1
    assert equal(out, s1)
    assert [i.name for i in shardckpt.list_checkpoints(root)] == ["step_00000001"]
    assert shardckpt.latest(root) == os.path.join(root, "step_00000001")
    # explicit choices refuse the link instead of reading outside the root
    with open(os.path.join(root, "latest.json"), "w") as f:
        json.dump({"name": "step_00000009", "step": 9}, f)
    for kw in ({"step": 9}, {"which": "latest"}):
        with pytest.raises(ShardckptError) as ei:
            mgr.restore(make_state(0), **kw)
        assert os.path.join(root, "step_00000009") in str(ei.value), kw
    # retention and gc leave the target alone
    mgr.save(2, make_state(2))
    mgr.save(3, make_state(3))
    mgr.close()
    from shardckpt.tools.gc import gc
    gc(root, keep_last=1, older_than=0)
    assert equal(load_fresh(target, s9), s9)


# ------------------------------------------------------------ safetensors index (tools/sources.py)

def _write_safetensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    header, blobs, off = {}, [], 0
    for k, t in tensors.items():
        b = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("escape", ["../outside/model.safetensors", "ABS"])
def test_safetensors_index_weight_map_cannot_escape(tmp_path, escape):
    outside = tmp_path / "outside"
    outside.mkdir()
    _write_safetensors(str(outside / "model.safetensors"), {"w": torch.ones(4)})
    src = tmp_path / "src"
    src.mkdir()
    target = str(outside / "model.safetensors") if escape == "ABS" else escape
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {"w": target}}))
    with pytest.raises(ShardckptError):
        convert(str(src), str(tmp_path / "dst"), "shardckpt")
