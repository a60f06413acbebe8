"""Keeps the benchmarks from rotting: a --quick run must report every tool."""

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


COMPARE_TOOLS = ["shardckpt (zstd)", "shardckpt (none)", "torch.save", "DCP t=1", "DCP t=2",
                 "DCP t=4", "DCP t=8", "DCP + ZStandard", "dcp.async_save"]


def test_compare_quick(tmp_path: Path) -> None:
    """compare.py on 1 process and 2 gloo ranks: every tool measured, every load checked bitwise
    (a mismatch fails the run), ratios against the DCP thread count it calls best."""
    out, png = tmp_path / "compare.json", tmp_path / "compare.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare.py"), "--quick", "--reps", "1",
         "--worlds", "1", "2", "--out", str(out), "--plot", str(png), "--dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    results = {r["world"]: r for r in doc["results"]}
    assert set(results) == {1, 2}
    assert 0.05e9 < results[1]["logical_bytes"] < 0.08e9  # --quick means 64 MB, not more
    assert results[1]["logical_bytes"] == results[2]["logical_bytes"]  # ranks split one state
    for world, r in results.items():
        tools = r["tools"]
        assert set(COMPARE_TOOLS) <= set(tools), world
        for op in ("save", "load"):
            best = r["dcp_best"][op]
            assert best.startswith("DCP t="), (world, op)
            assert tools[best][f"{op}_vs_dcp_best"]["median"] == 1.0
            dcp_medians = [tools[f"DCP t={t}"][f"{op}_s"]["median"] for t in (1, 2, 4, 8)]
            assert tools[best][f"{op}_s"]["median"] == min(dcp_medians)
        for name in COMPARE_TOOLS:
            t = tools[name]
            ops = ("save",) if name == "dcp.async_save" else ("save", "load")
            for op in ops:
                assert t[f"{op}_s"]["min"] > 0 and t[f"{op}_gbps"]["median"] > 0, (world, name)
                assert t[f"{op}_bound"] in ("CPU", "storage", "latency"), (world, name)
                assert 0 < t[f"{op}_cpu_util"], (world, name)
            assert t["disk_bytes"] > 0, (world, name)
        assert tools["dcp.async_save"]["load_s"] is None
        assert 0 < tools["dcp.async_save"]["blocking_s"]["median"] < \
            tools["dcp.async_save"]["save_s"]["median"]
        assert tools["shardckpt (zstd)"]["disk_bytes"] < 0.98 * r["logical_bytes"]
        assert tools["shardckpt (none)"]["disk_bytes"] >= r["logical_bytes"]
    for k in (1, 2, 4):  # the raw-storage line, from the 1-process run
        raw = results[1]["tools"][f"raw x{k}"]
        assert raw["save_gbps"]["median"] > 0 and raw["load_gbps"]["median"] > 0
    try:
        import matplotlib  # noqa: F401 - the `bench` extra; without it the plot is skipped
    except ImportError:
        return
    assert png.stat().st_size > 10_000
