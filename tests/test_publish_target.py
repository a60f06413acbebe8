"""Where a save may publish: the directory at the checkpoint's path is replaced by the new
one, so it keeps that directory's permissions, and paths it could never replace (the
working directory, a mount point) are refused before anything is written."""

from __future__ import annotations

import os
import stat
import subprocess

import pytest
import torch

import shardckpt
from shardckpt.errors import CheckpointExistsError


def _state() -> dict:
    return {"w": torch.arange(12.0).reshape(3, 4), "step": 3}


@pytest.mark.parametrize("how", ["", ".", "cwd", "parent"])
def test_the_working_directory_is_refused_and_left_alone(tmp_path, monkeypatch, how):
    work = tmp_path / "job"
    work.mkdir()
    (work / "train.py").write_text("x")
    monkeypatch.chdir(work)
    before = os.stat(work).st_ino
    path = {"": "", ".": ".", "cwd": str(work), "parent": str(tmp_path)}[how]
    with pytest.raises(CheckpointExistsError, match="working directory"):
        shardckpt.save(_state(), path)
    assert os.getcwd() == str(work) and os.stat(work).st_ino == before
    assert sorted(os.listdir(work)) == ["train.py"]
    assert not [n for n in os.listdir(tmp_path) if n != "job"]  # no staging left either


@pytest.mark.parametrize("mode", [0o1777, 0o750, 0o2770])
def test_a_directory_made_for_the_checkpoint_keeps_its_permissions(tmp_path, mode):
    target = tmp_path / "ck"
    target.mkdir()
    os.chmod(target, mode)
    shardckpt.save(_state(), target)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode
    (target / "notes.txt").write_text("mine")
    shardckpt.save({**_state(), "step": 4}, target, overwrite=True)
    assert stat.S_IMODE(os.stat(target).st_mode) == mode
    assert (target / "notes.txt").read_text() == "mine"
    out = {"w": torch.zeros(3, 4), "step": 0}
    shardckpt.load(out, target)
    assert out["step"] == 4 and torch.equal(out["w"], _state()["w"])


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode:
        pytest.skip("needs root and tmpfs to make a mount point")
    try:
        with pytest.raises(CheckpointExistsError, match="mount point") as ei:
            shardckpt.save(_state(), mnt)
        assert str(mnt) in str(ei.value)
        assert os.listdir(mnt) == [] and os.listdir(tmp_path) == ["mnt"]
        shardckpt.save(_state(), mnt / "step_1")  # inside it, as the message says
        out = {"w": torch.zeros(3, 4), "step": 0}
        shardckpt.load(out, mnt / "step_1")
        assert torch.equal(out["w"], _state()["w"])
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_failure_after_the_commit_says_the_checkpoint_was_committed(tmp_path, monkeypatch):
    # DCP's last collective runs after rank 0 committed: a rank dying then failed the save
    # with "nothing was committed" for a checkpoint that is listed, latest and loadable.
    from shardckpt.dcp.writer import ShardWriter
    from shardckpt.errors import SaveFailedError

    finish = ShardWriter.finish

    def finish_then_peer_dies(self, *a, **kw):
        finish(self, *a, **kw)
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(ShardWriter, "finish", finish_then_peer_dies)
    with pytest.raises(SaveFailedError, match="WAS committed") as ei:
        shardckpt.save(_state(), tmp_path / "ck")
    assert "Connection closed by peer" in str(ei.value) and "nothing was committed" not in str(
        ei.value)
    monkeypatch.undo()
    out = {"w": torch.zeros(3, 4), "step": 0}
    shardckpt.load(out, tmp_path / "ck")
    assert out["step"] == 3 and torch.equal(out["w"], _state()["w"])
