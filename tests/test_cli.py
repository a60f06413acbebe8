"""The `shardckpt` command line, run as a real subprocess on multi-process checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import format as fmt
from shardckpt.io.reader import read_manifest
from shardckpt.tools.safetensors_io import SafetensorsFile
from tests.workers.storage import compare_trees, fsdp_load, fsdp_save
from tests.workers.world import run_world

ROOT = Path(__file__).resolve().parents[1]
WIDE = 101


def cli(*args: str, check: int | None = 0, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "shardckpt.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, env=env, timeout=300)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture(scope="module")
def fsdp3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An FSDP2 model + AdamW state saved by 3 ranks, and its full state for reference."""
    d = tmp_path_factory.mktemp("fsdp3")
    path, ref = d / "ckpt", d / "ref.pt"
    run_world(3, fsdp_save, str(path), str(ref), WIDE, 1 << 14, "zstd")
    return path, ref


@pytest.fixture(scope="module")
def trainstate2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.workers.cli import trainstate_save

    path = tmp_path_factory.mktemp("ts") / "ckpt"
    run_world(2, trainstate_save, str(path))
    return path


def test_entry_point_and_help() -> None:
    exe = Path(sys.executable).parent / "shardckpt"
    assert exe.exists(), "run `pip install -e . --no-build-isolation` to create the script"
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "reshard" in p.stdout
    from shardckpt.cli import build_parser

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    for cmd in ("inspect", "verify", "audit", "diff", "reshard", "convert", "gc", "bench"):
        assert f"example:\n  shardckpt {cmd}" in subs[cmd].format_help(), cmd
    bad = cli("reshard", "x", check=2)
    assert "--world-size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_errors_are_one_line(tmp_path: Path) -> None:
    p = cli("inspect", tmp_path / "missing", check=1)
    assert p.stderr.count("\n") == 1 and "no such checkpoint" in p.stderr
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    p = cli("verify", tmp_path / "junk", check=1)
    assert "not a shardckpt checkpoint" in p.stderr


def test_inspect(fsdp3: tuple[Path, Path]) -> None:
    path, _ = fsdp3
    info = json.loads(cli("inspect", path, "--json").stdout)
    assert info["world_size"] == 3 and len(info["ranks"]) == 3
    keys = {k["key"]: k for k in info["keys"]}
    w = keys["model.2.weight"]
    assert w["shape"] == [WIDE, WIDE] and w["dtype"] == "float32" and w["shards"] == 3
    assert info["bytes_on_disk"] == sum(r["bytes"] for r in info["ranks"])
    assert info["bytes_logical"] >= 3 * WIDE * WIDE * 4  # weight + two Adam moments
    text = cli("inspect", path).stdout
    assert "world size   3" in text and "model/" in text and "3 shards" in text


def test_reshard_3_to_2_loads_bitwise(fsdp3: tuple[Path, Path], tmp_path: Path) -> None:
    path, ref = fsdp3
    dst = tmp_path / "ws2"
    out = cli("reshard", path, dst, "--world-size", 2).stdout
    assert "2 files" in out
    m = read_manifest(str(dst)).to_json()
    assert sorted(m["files"]) == [fmt.data_file_name(0), fmt.data_file_name(1)]
    w = m["tensors"]["model.2.weight"]["chunks"]
    # The FSDP2 split: ceil(101/2) = 51 rows, then 50; chunk i in rank i's file.
    assert [(c["offsets"], c["sizes"], c["file"]) for c in w] == [
        ([0, 0], [51, WIDE], fmt.data_file_name(0)), ([51, 0], [50, WIDE], fmt.data_file_name(1))]
    src_m = read_manifest(str(path)).to_json()
    settings = ("compression", "level", "block_size", "checksum")  # not a save's own counts
    assert m["planner_data"] == src_m["planner_data"]
    assert {k: m["codec"][k] for k in settings} == {k: src_m["codec"][k] for k in settings}
    res = run_world(2, fsdp_load, str(dst), str(ref), WIDE)
    assert res[0]["mismatches"] == []
    # Each rank reads (about) only what it owns: contiguous, balanced files.
    for r in res:
        assert r["bytes_read"] <= 1.5 * r["owned"]


def test_convert_round_trips(fsdp3: tuple[Path, Path], tmp_path: Path) -> None:
    path, ref = fsdp3
    expect = torch.load(ref, weights_only=True)
    dcp_dir, back = tmp_path / "dcp", tmp_path / "back"
    cli("convert", path, dcp_dir, "--to", "dcp")
    assert (dcp_dir / ".metadata").is_file()
    # Stock DCP reads it with no shardckpt code involved.
    import torch.distributed.checkpoint as dcp

    state = {"model": {k: torch.zeros_like(v) for k, v in expect["model"].items()}}
    dcp.load(state, checkpoint_id=str(dcp_dir))
    assert compare_trees(expect["model"], state["model"]) == []
    cli("convert", dcp_dir, back, "--to", "shardckpt")
    assert "identical" in cli("diff", path, back).stdout

    pt = tmp_path / "full.pt"
    cli("convert", path, pt, "--to", "torch")
    full = torch.load(pt, weights_only=True)
    assert compare_trees(expect["model"], full["model"]) == []

    st = tmp_path / "model.safetensors"
    cli("convert", path, st, "--to", "safetensors", "--strip-prefix", "model.")
    f = SafetensorsFile(str(st))
    for k, v in expect["model"].items():
        assert torch.equal(f.read(k), v), k
    st_back = tmp_path / "st_back"
    cli("convert", st, st_back, "--to", "shardckpt")
    r = shardckpt.ShardReader(str(st_back))
    assert torch.equal(r.read_region("2.weight"), expect["model"]["2.weight"])


def test_verify_names_damaged_tensor(fsdp3: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = fsdp3
    assert "OK" in cli("verify", path, "--deep").stdout
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    m = read_manifest(str(bad)).to_json()
    ch = m["tensors"]["model.2.weight"]["chunks"][1]
    with open(bad / ch["file"], "r+b") as f:
        f.seek(ch["offset"] + 3)
        b = f.read(1)
        f.seek(ch["offset"] + 3)
        f.write(bytes([b[0] ^ 0xFF]))
    p = cli("verify", bad, check=1)
    assert "model.2.weight" in p.stdout and "block 0" in p.stdout
    assert f"rank {m['files'][ch['file']]['rank']}" in p.stdout


def test_diff(fsdp3: tuple[Path, Path], tmp_path: Path) -> None:
    path, _ = fsdp3
    other = tmp_path / "other"
    state = {"model.2.weight": shardckpt.ShardReader(str(path)).read_region("model.2.weight"),
             "extra": torch.ones(3)}
    state["model.2.weight"][0, 0] += 1.0
    shardckpt.save(state, str(other))
    p = cli("diff", path, other, check=1)
    assert "only in B: extra" in p.stdout and "only in A: model.0.weight" in p.stdout
    line = next(x for x in p.stdout.splitlines() if x.startswith("values differ: model.2.weight"))
    assert "max |A-B| = 1" in line and "99.99%" in line
    # Checkpoint against a model built by code: will it load?
    ok = cli("diff", path, "tests.workers.cli:small_model").stdout
    assert "keys under 'model.'" in ok and "will load" in ok
    bad = cli("diff", path, "tests.workers.cli:wrong_model", check=1).stdout
    assert "mismatch: 2.weight" in bad


def test_audit(trainstate2: Path) -> None:
    p = cli("audit", trainstate2, check=1)
    out = p.stdout
    assert "no scheduler state" in out and "learning rate restarts" in out
    assert "no data loader position" in out
    assert "RNG for all 2 ranks" in out and "step 11" in out
    assert "optimizer: state for 4 parameters" in out
    # A rank's RNG lost (e.g. a checkpoint filtered by hand) is named.
    m = read_manifest(str(trainstate2)).to_json()
    assert any("__rank1__" in k for k in m["tensors"])


def _mini(path: Path, step: int) -> None:
    shardckpt.save({"w": torch.full((10,), float(step))}, str(path))


def test_gc(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for s in (1, 2, 3, 4):
        _mini(root / f"step_{s:08d}", s)
    (root / "latest.json").write_text(json.dumps({"name": "step_00000001", "step": 1}))
    stale = root / ".step_00000005.partial-0123456789ab"
    stale.mkdir()
    (stale / "PARTIAL.json").write_text(json.dumps({"pid": 999999999, "host": "elsewhere"}))
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh = root / ".step_00000006.partial-0123456789ac"
    fresh.mkdir()
    out = cli("gc", root, "--keep-last", 2, "--older-than", "1h", "--dry-run").stdout
    assert "would remove 2 items" in out
    assert "step_00000002" in out and stale.name in out
    assert "kept step_00000001" in out and f"kept {fresh.name}" in out
    assert (root / "step_00000002").exists() and stale.exists()  # dry run
    cli("gc", root, "--keep-last", 2)
    left = sorted(os.listdir(root))
    assert left == [fresh.name, "latest.json", "step_00000001", "step_00000003", "step_00000004"]


def test_bench_prints_codec_path() -> None:
    out = cli("bench", "--size-mb", 4).stdout
    assert ("codec path   native" in out) or ("codec path   python" in out)
    assert "MB/s" in out


_LIMITED = textwrap.dedent("""
    import os, resource, sys, warnings
    warnings.simplefilter("ignore")
    import torch
    from shardckpt.cli import main
    # Warm up with the same command on a small checkpoint: thread pools, writer
    # threads and lazy imports exist before the baseline is measured, so the
    # limit bounds only what the data needs.
    argv = sys.argv[3].split("|")
    assert main([argv[0], sys.argv[1], sys.argv[2]] + argv[3:]) == 0
    def status(key):
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status")
                    if l.startswith(key))
    vm, rss = status("VmSize"), status("VmRSS")
    headroom = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_AS, (vm + headroom, vm + headroom))
    try:
        torch.empty(int(sys.argv[5]), dtype=torch.uint8)
        print("BIG_ALLOC_SUCCEEDED")
    except (MemoryError, RuntimeError):
        print("big allocation refused")
    rc = main(argv)
    print("RC", rc)
    # The high-water mark of resident memory (the warm-up's was far lower) over the
    # baseline; VmHWM, not ru_maxrss: that one keeps the parent's across fork and exec.
    print("RSS_GROWTH", status("VmHWM") - rss)
""")


def test_large_checkpoint_under_memory_limit(tmp_path: Path) -> None:
    """A ~300 MB checkpoint reshards and converts in a process whose resident memory
    grows by < 180 MiB (under 2/3 of the data), with an address-space limit below the
    data's size.

    The address space also counts what no byte of data is in: glibc reserves 64 MiB
    for a second malloc arena the first time another thread allocates, 8 MiB of stack
    per thread. The dcp export's (stock DCP's writer thread) measured 174-202 MiB
    above its baseline in three quiet runs while its resident growth was 93-123 MiB,
    so it gets 240 MiB of address space (still below the data) and the same resident
    bound as the others."""
    big = tmp_path / "big"
    tiny = tmp_path / "tiny"
    g = torch.Generator().manual_seed(0)
    state = {f"layer{i}.w": torch.randn(1000, 7500, generator=g) for i in range(10)}
    total = sum(t.numel() * t.element_size() for t in state.values())
    assert total > 290e6
    shardckpt.save(state, str(big), compression="none")
    del state
    # 12 MiB: above what a sink writes from the calling thread at close (4 MiB) and
    # more than one writer job, so the warm-up starts the stream and writer threads
    # (their stacks and malloc arenas count against the address-space limit).
    shardckpt.save({"t": torch.ones(3 << 20)}, str(tiny), compression="none")
    env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", SHARDCKPT_THREADS="2")
    resident = 180 << 20
    jobs = {"reshard": (f"reshard|{big}|{tmp_path / 'rs'}|--world-size|2|-q", 180 << 20),
            "safetensors": (f"convert|{big}|{tmp_path / 'big.safetensors'}|--to|safetensors|-q",
                            180 << 20),
            "dcp": (f"convert|{big}|{tmp_path / 'dcp'}|--to|dcp|-q", 240 << 20)}
    for name, (argv, headroom) in jobs.items():
        assert headroom < total
        p = subprocess.run([sys.executable, "-c", _LIMITED, str(tiny),
                            str(tmp_path / f"warm_{name}"), argv, str(headroom), str(total)],
                           capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert "big allocation refused" in p.stdout, (name, p.stdout, p.stderr)
        assert "RC 0" in p.stdout, (name, p.stdout, p.stderr[-3000:])
        growth = int(p.stdout.split("RSS_GROWTH")[1].split()[0])
        assert growth < resident, (name, growth >> 20)
    r = shardckpt.ShardReader(str(big))
    rs = shardckpt.ShardReader(str(tmp_path / "rs"))
    st = SafetensorsFile(str(tmp_path / "big.safetensors"))
    for k in ("layer0.w", "layer9.w"):
        ref = r.read_region(k)
        assert torch.equal(rs.read_region(k), ref) and torch.equal(st.read(k), ref)
    assert shardckpt.verify(str(tmp_path / "rs")).ok
