"""The review's repro: `shardckpt convert` / `diff` on a stock DCP directory whose
`.metadata` was replaced by a payload must not run it (issue 17, defect 1)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

import shardckpt


class _Payload:
    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __reduce__(self):
        return (os.system, (f"touch {self.flag}",))


def _planted(tmp_path: Path) -> tuple[Path, Path]:
    d = tmp_path / "stock"
    dcp.save({"w": torch.arange(6.0)}, storage_writer=dcp.FileSystemWriter(str(d)))
    flag = tmp_path / "PWNED"
    (d / ".metadata").write_bytes(pickle.dumps(_Payload(str(flag))))
    return d, flag


def _cli(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shardckpt.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_convert_and_diff_of_a_planted_metadata_run_nothing(tmp_path: Path) -> None:
    d, flag = _planted(tmp_path)
    good = tmp_path / "good"
    shardckpt.save({"w": torch.arange(6.0)}, str(good))
    for args in (("convert", d, tmp_path / "out", "--to", "shardckpt"),
                 ("convert", d, tmp_path / "out.pt", "--to", "torch"),
                 ("diff", d, good), ("diff", good, d)):
        r = _cli(*args)
        assert not flag.exists(), args
        assert r.returncode == 1, (args, r.returncode, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        assert "--trust-pickle" in r.stderr and "posix.system" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.pt").exists()
    # The test would notice: with the flag, the payload does run.
    _cli("convert", d, tmp_path / "out2", "--to", "shardckpt", "--trust-pickle")
    assert flag.exists()


def test_stock_dcp_still_converts_and_diffs(tmp_path: Path) -> None:
    d = tmp_path / "stock"
    sd = {"w": torch.randn(5, 3), "n": 7, "nested": {"b": torch.arange(4)}}
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(d)))
    r = _cli("convert", d, tmp_path / "ck", "--to", "shardckpt")
    assert r.returncode == 0, r.stderr
    st = {"w": torch.zeros(5, 3), "n": 0, "nested": {"b": torch.zeros(4, dtype=torch.int64)}}
    shardckpt.load(st, str(tmp_path / "ck"))
    assert torch.equal(st["w"], sd["w"]) and st["n"] == 7
    assert torch.equal(st["nested"]["b"], sd["nested"]["b"])
    assert _cli("diff", d, tmp_path / "ck").returncode == 0
