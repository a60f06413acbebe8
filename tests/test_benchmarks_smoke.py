"""Keeps benchmarks/save_load.py from rotting: a --quick run must report every tool."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_TOOLS = {
    "shardckpt (zstd)": True,  # name -> has a load measurement
    "shardckpt (none)": True,
    "torch.save": True,
    "DCP FileSystemWriter": True,
    "DCP FileSystemWriter t=2": True,
    "DCP + ZStandard ext": True,
    "DCP async_save": False,
}


def test_save_load_quick(tmp_path: Path) -> None:
    out = tmp_path / "bench" / "save_load.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "save_load.py"), "--quick",
         "--out", str(out), "--dir", str(tmp_path / "ckpt")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())

    assert doc["machine"]["shardckpt_codec_path"] in ("native", "python")
    assert doc["machine"]["torch"]
    assert doc["state"]["logical_bytes"] > 0
    results = doc["results"]
    assert set(EXPECTED_TOOLS) <= set(results)
    for name, has_load in EXPECTED_TOOLS.items():
        r = results[name]
        assert r["save_s"]["best"] > 0 and r["save_gbps"] > 0, name
        assert r["disk_bytes"] > 0 and r["disk_ratio"] > 0, name
        assert r["save_time_vs_shardckpt"] > 0, name
        if has_load:
            assert r["load_s"]["best"] > 0 and r["load_gbps"] > 0, name
            assert r["load_time_vs_shardckpt"] > 0, name
    assert results["DCP async_save"]["async_return_s"]["best"] > 0
    # Compression must actually compress these weights (guards against saving zeros).
    assert results["shardckpt (zstd)"]["disk_ratio"] < 0.98
    assert results["shardckpt (none)"]["disk_ratio"] >= 0.99
