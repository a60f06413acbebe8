"""Hostile input through the real console script: never a traceback, never a hang.

Every failure is one line on stderr (`shardckpt CMD: message`) and exit status 1;
2 is only for usage errors (argparse, bad flag values). A small hypothesis fuzz
of manifest.json runs `inspect` / `verify` in-process through `cli.main`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardckpt
from shardckpt.format.names import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
CMDS_ON_PATH = ("inspect", "verify", "audit", "migrate")
CMDS_ON_ROOT = ("ls", "gc")


def cli(*args: object, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "shardckpt.cli", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return p


def many(argvs: list[tuple], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Several CLI runs at once (each is a fresh interpreter: the import dominates)."""
    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(lambda a: cli(*a, timeout=timeout), argvs))


def assert_fails(p: subprocess.CompletedProcess, code: int = 1, cmd: str | None = None) -> str:
    where = (p.args, p.returncode, p.stdout[-2000:], p.stderr[-4000:])
    assert p.returncode == code, where
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, where
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, where
    if cmd is not None:
        assert lines[0].startswith(f"shardckpt {cmd}: "), where
    assert "internal error" not in lines[0], where
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("good")
    shardckpt.save({"w": torch.arange(12.0).reshape(3, 4), "step": 3}, str(d / "ckpt"))
    return d / "ckpt"


def _v1_manifest_dir(base: Path, name: str, data: bytes) -> Path:
    d = base / name
    (d / "data").mkdir(parents=True)
    (d / MANIFEST_NAME).write_bytes(data)
    return d


def test_nonexistent_paths_every_command(tmp_path: Path) -> None:
    gone = tmp_path / "nonexistent"
    argvs = [("inspect", gone), ("ls", gone)]
    argvs += [(c, gone, "--json") for c in CMDS_ON_PATH + CMDS_ON_ROOT]
    argvs += [("diff", gone, gone, "--json"),
              ("reshard", gone, tmp_path / "out", "--world-size", 2, "--json"),
              ("convert", gone, tmp_path / "out", "--to", "dcp", "--json")]
    for a, p in zip(argvs, many(argvs)):
        line = assert_fails(p, 1, a[0])
        assert p.stdout == "", a  # --json prints nothing on stdout on failure
        assert "nonexistent" in line, (a, line)


def test_file_where_a_directory_is_expected(tmp_path: Path, good: Path) -> None:
    f = tmp_path / "plain.txt"
    f.write_text("not a checkpoint\n")
    argvs = [("verify", f, "--json"), ("migrate", f), ("ls", f, "--json"), ("gc", f),
             ("inspect", f, "--json"), ("reshard", f, tmp_path / "o", "--world-size", 1),
             ("bench", "--dir", f, "--size-mb", 1, "--json"), ("ls", good)]
    res = many(argvs)
    for a, p in zip(argvs, res):
        assert_fails(p, 1, a[0])
    assert "--dir" in res[6].stderr and "not a directory" in res[6].stderr
    assert "shardckpt inspect" in res[7].stderr  # ls of one checkpoint says what to use


def test_names_longer_than_name_max(tmp_path: Path, good: Path) -> None:
    long = tmp_path / ("x" * 300)
    argvs = [("inspect", long, "--json"), ("migrate", long), ("ls", long), ("gc", long, "--json"),
             ("reshard", good, long, "--world-size", 1),
             ("convert", good, long, "--to", "safetensors", "--json"), ("diff", good, long)]
    for a, p in zip(argvs, many(argvs)):
        assert_fails(p, 1, a[0])


def _manifest_cases(base: Path) -> dict[str, Path]:
    v1 = json.loads((FIXTURES / "v1_single_zstd" / MANIFEST_NAME).read_text())
    cases = {
        "files_list": {**v1, "files": []},
        "tensors_list": {**v1, "tensors": [1, 2]},
        "bad_version": {**v1, "format_version": "one"},
        "future_version": {**v1, "format_version": 99},
        "v2_no_checksum": {**v1, "format_version": 2},
        "not_ours": {"format": "other"},
    }
    out = {k: _v1_manifest_dir(base, k, json.dumps(v).encode()) for k, v in cases.items()}
    out["damaged_json"] = _v1_manifest_dir(base, "damaged_json",
                                           json.dumps(v1).encode()[:-40])
    out["random_bytes"] = _v1_manifest_dir(base, "random_bytes", os.urandom(4096))
    out["deep_nesting"] = _v1_manifest_dir(base, "deep_nesting", b"[" * 100000)
    return out


def test_damaged_manifests(tmp_path: Path) -> None:
    cases = _manifest_cases(tmp_path)
    argvs = []
    for name, d in cases.items():
        cmds = {"files_list": ("inspect", "verify"), "random_bytes": ("verify", "migrate"),
                "damaged_json": ("audit",), "v2_no_checksum": ("migrate",)}.get(name, ("inspect",))
        argvs += [(c, d, "--json") for c in cmds]
    argvs.append(("ls", tmp_path))  # a root of damaged step-less directories: fine, empty
    res = many(argvs)
    for a, p in zip(argvs[:-1], res[:-1]):
        line = assert_fails(p, 1, a[0])
        assert str(a[1].name) in line, (a, line)
    assert res[-1].returncode == 0, res[-1].stderr
    # a version this shardckpt does not know says to upgrade
    fut = next(p for a, p in zip(argvs, res) if a[1].name == "future_version")
    assert "upgrade" in fut.stderr


def test_damaged_manifest_in_manager_root_is_listed(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for s in (1, 2):
        shardckpt.save({"w": torch.ones(2) * s}, str(root / f"step_{s:08d}"))
    (root / "step_00000002" / MANIFEST_NAME).write_bytes(b"{garbage")
    p = cli("ls", root, "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)["checkpoints"]
    assert [r["ok"] for r in rows] == [True, False] and "not valid JSON" in rows[1]["problem"]


def test_fifo_as_manifest_and_as_path_does_not_hang(tmp_path: Path) -> None:
    d = tmp_path / "fifo_ckpt"
    (d / "data").mkdir(parents=True)
    os.mkfifo(d / MANIFEST_NAME)
    fifo = tmp_path / "plain_fifo"
    os.mkfifo(fifo)
    argvs = [(c, d) for c in ("inspect", "verify", "audit", "migrate")]
    argvs += [("inspect", fifo), ("diff", fifo, fifo), ("convert", fifo, tmp_path / "o", "--to",
                                                          "dcp"), ("ls", tmp_path)]
    res = many(argvs, timeout=60)
    for a, p in zip(argvs[:-1], res[:-1]):
        assert_fails(p, 1, a[0])
    assert res[-1].returncode == 0, res[-1].stderr


def test_usage_errors_exit_2(tmp_path: Path, good: Path) -> None:
    argvs = [("reshard", good, tmp_path / "o", "--world-size", 0),
             ("reshard", good, tmp_path / "o"),
             ("gc", tmp_path, "--older-than", "soon"),
             ("gc", tmp_path, "--keep-last", "-1"),
             ("diff", good, good, "--rename", "no-equals-sign"),
             ("diff", good, good, "--rename", "[unclosed=x"),
             ("convert", good, tmp_path / "o", "--to", "dcp", "--max-shard-size", "lots"),
             ("bench", "--size-mb", 0), ("inspect", good, "--max-keys", "many"),
             ("diff", good, "tests.workers.cli:small_model", "--strip-prefix", "model."),
             ("nosuchcommand",), ()]
    for a, p in zip(argvs, many(argvs)):
        assert p.returncode == 2, (a, p.returncode, p.stderr)
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, (a, p.stderr)


def test_cli_wording_names_flags(tmp_path: Path, good: Path) -> None:
    dst = tmp_path / "dst"
    shutil.copytree(good, dst)
    res = many([("reshard", good, dst, "--world-size", 1),
                ("convert", good, tmp_path, "--to", "dcp")])
    for p in res:
        line = assert_fails(p, 1)
        assert "--overwrite" in line and "overwrite=True" not in line, line


def _mount_ok() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a tmpfs"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


def test_gc_on_read_only_root(tmp_path: Path) -> None:
    why = _mount_ok()
    if why:
        pytest.skip(why)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    try:
        for s in (1, 2, 3):
            shardckpt.save({"w": torch.ones(4) * s}, str(mnt / f"step_{s:08d}"))
        stale = mnt / f".step_00000004.partial-{uuid.uuid4().hex[:12]}"
        stale.mkdir()
        (stale / "PARTIAL.json").write_text(json.dumps({"pid": 999999999, "host": "elsewhere"}))
        os.utime(stale, (0, 0))
        r = subprocess.run(["mount", "-o", "remount,ro", str(mnt)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"remount read-only is not permitted here: {r.stderr.strip()}")
        res = many([("gc", mnt, "--keep-last", 1), ("gc", mnt, "--keep-last", 1, "--json"),
                    ("gc", mnt, "--keep-last", 1, "--dry-run"), ("ls", mnt)])
        for p in res[:2]:
            line = assert_fails(p, 1, "gc")
            assert "read-only" in line.lower(), line
        assert res[2].returncode == 0 and "would remove 3 items" in res[2].stdout, res[2]
        assert res[3].returncode == 0 and "step_00000003" in res[3].stdout, res[3]
        assert sorted(os.listdir(mnt))[-3:] == [f"step_{s:08d}" for s in (1, 2, 3)]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_migrate_read_only_checkpoint_fails_cleanly(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    d = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1_single_none", d)
    os.chmod(d, 0o555)
    try:
        line = assert_fails(cli("migrate", d), 1, "migrate")
        assert "Permission denied" in line
    finally:
        os.chmod(d, 0o755)


# ---------------------------------------------------------------- fuzz (in-process)


def _run_main(argv: list[str]) -> tuple[int, str, str]:
    from shardckpt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


_BASE = json.loads((FIXTURES / "v1_single_zstd" / MANIFEST_NAME).read_text())
_json = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70)
                     | st.floats(allow_nan=False) | st.text(max_size=12),
                     lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                          max_size=4),
                     max_leaves=12)


@st.composite
def _manifests(draw: st.DrawFn) -> bytes:
    how = draw(st.sampled_from(["field", "drop", "bytes", "nested"]))
    d = json.loads(json.dumps(_BASE))
    if how == "bytes":
        return draw(st.binary(max_size=300))
    if how == "drop":
        key = draw(st.sampled_from(sorted(d)))
        d.pop(key)
    elif how == "field":
        d[draw(st.sampled_from(sorted(d)))] = draw(_json)
    else:
        t = d["tensors"][draw(st.sampled_from(sorted(d["tensors"])))]
        sub = draw(st.sampled_from(["shape", "dtype", "chunks"]))
        if sub == "chunks" and t["chunks"]:
            c = t["chunks"][0]
            c[draw(st.sampled_from(sorted(c)))] = draw(_json)
        else:
            t[sub] = draw(_json)
    return json.dumps(d).encode()


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=_manifests(), cmd=st.sampled_from(["inspect", "verify"]))
def test_fuzz_manifest_through_inspect_and_verify(tmp_path: Path, data: bytes, cmd: str) -> None:
    d = tmp_path / f"fz_{uuid.uuid4().hex[:8]}"
    shutil.copytree(FIXTURES / "v1_single_zstd", d)
    (d / MANIFEST_NAME).write_bytes(data)
    try:
        rc, out, err = _run_main([cmd, str(d), "--json"])
    finally:
        shutil.rmtree(d, ignore_errors=True)
    assert rc in (0, 1), (rc, err)
    assert "Traceback" not in err and "internal error" not in err, err
    if rc == 1 and not out:
        assert len(err.strip().splitlines()) == 1 and err.startswith(f"shardckpt {cmd}: "), err
    else:
        json.loads(out)  # a result: strict JSON


def test_tools_refuse_an_object_store_destination(tmp_path: Path, good: Path) -> None:
    # The tools write local paths; a URL destination became a local "s3:/..." directory.
    argvs = [("reshard", good, "s3://bucket/resharded", "--world-size", 2),
             ("convert", good, "s3://bucket/conv", "--to", "shardckpt"),
             ("convert", good, "memory://x/conv.safetensors", "--to", "safetensors")]
    for a, p in zip(argvs, many(argvs, timeout=180)):
        line = assert_fails(p, 1, a[0])
        assert "object storage" in line, (a, line)
    assert not (ROOT / "s3:").exists() and not (ROOT / "memory:").exists()
