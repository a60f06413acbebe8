"""The command line as scripts use it: ls, migrate, --json on every command (the schemas of
docs/CLI.md), human units, diff's key mapping, exit status through a closed pipe,
progress bars only on a terminal, and convert's issue-14 flags."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pty
import select
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.format.names import MANIFEST_NAME
from tests.test_fixtures import check_fsdp2, check_single

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def cli(*args: object, check: int | None = 0, timeout: float = 300,
        cwd: Path = ROOT) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "shardckpt.cli", *map(str, args)], cwd=cwd,
                       capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert p.returncode == check, (args, p.returncode, p.stdout[-3000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr
    return p


def many(argvs: list[tuple], check: int | None = 0) -> list[subprocess.CompletedProcess]:
    with ThreadPoolExecutor(4) as ex:
        return list(ex.map(lambda a: cli(*a, check=check), argvs))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manager root: 3 TrainState steps with metrics (latest + best), a leftover, a model."""
    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ts = shardckpt.TrainState(model=model, optimizer=opt)
    mgr = shardckpt.CheckpointManager(str(d / "ckpts"), keep_last=None, keep_best=1,
                                      metric="loss", mode="min")
    for step, loss in ((1, 0.5), (2, 0.25), (3, 0.75)):
        model(torch.randn(4, 8)).square().mean().backward()
        opt.step()
        ts.step = step
        mgr.save(step, {"train": ts}, metrics={"loss": loss})
    mgr.close()
    stale = d / "ckpts" / ".step_00000004.partial-0123456789ab"
    stale.mkdir()
    (stale / "PARTIAL.json").write_text(json.dumps({"pid": 999999999, "host": "elsewhere"}))
    os.utime(stale, (time.time() - 7200,) * 2)
    shardckpt.save({"model": model.state_dict()}, str(d / "weights"))
    torch.save(model.state_dict(), d / "plain.pt")
    return d


def test_help_on_every_argument_and_example_in_every_command() -> None:
    from shardckpt.cli import build_parser

    subs = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"ls", "migrate", "inspect", "verify", "audit", "diff", "reshard", "convert", "gc",
            "bench"} <= set(subs)
    for name, p in subs.items():
        assert f"example:\n  shardckpt {name}" in p.format_help(), name
        assert any("--json" in a.option_strings for a in p._actions), name
        for a in p._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help and a.help.strip(), (name, a.dest)


def test_ls(run: Path) -> None:
    root = run / "ckpts"
    text, js = many([("ls", root), ("ls", root, "--json")])
    lines = text.stdout.splitlines()
    assert lines[0] == f"{root}: 3 checkpoints, 1 leftover"
    assert lines[1].split() == ["STEP", "NAME", "SIZE", "CREATED", "POINTERS", "METRICS",
                                "VALIDITY"]
    rows = {ln.split()[1]: ln for ln in lines[2:5]}
    assert "best" in rows["step_00000002"] and "loss=0.25" in rows["step_00000002"]
    assert "latest" in rows["step_00000003"] and rows["step_00000003"].endswith("OK")
    assert "KiB" in rows["step_00000001"]
    assert "leftover .step_00000004.partial-0123456789ab: interrupted save of step_00000004" \
        in text.stdout
    d = json.loads(js.stdout)
    assert set(d) == {"root", "latest", "pointers", "checkpoints", "leftovers"}
    assert d["latest"] == str(root / "step_00000003")
    assert d["pointers"] == {"latest": "step_00000003", "best": "step_00000002"}
    c = d["checkpoints"][1]
    assert set(c) == {"step", "name", "path", "size_bytes", "created", "created_unix",
                      "pointers", "metrics", "ok", "problem"}
    assert c["step"] == 2 and c["pointers"] == ["best"] and c["metrics"] == {"loss": 0.25}
    assert c["ok"] is True and c["problem"] is None and isinstance(c["size_bytes"], int)
    (x,) = d["leftovers"]
    assert x["kind"] == "partial" and x["checkpoint"] == "step_00000004"
    assert x["age_seconds"] > 3600 and isinstance(x["bytes"], int)


def _keys(p: subprocess.CompletedProcess) -> set[str]:
    return set(json.loads(p.stdout))


def test_json_on_every_command(run: Path, tmp_path: Path) -> None:
    ck = run / "ckpts" / "step_00000003"
    v1 = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1_single_none", v1)
    argvs = {
        "inspect": ("inspect", ck, "--json"),
        "verify": ("verify", ck, "--json"),
        "audit": ("audit", ck, "--json"),
        "diff": ("diff", run / "weights", run / "plain.pt", "--strip-prefix", "model.", "--json"),
        "diff_model": ("diff", run / "weights", "tests.workers.cli:small_model", "--json"),
        "reshard": ("reshard", ck, tmp_path / "ws2", "--world-size", 2, "--json"),
        "convert": ("convert", run / "weights", tmp_path / "w.safetensors", "--to",
                    "safetensors", "--json"),
        "gc": ("gc", run / "ckpts", "--keep-last", 1, "--dry-run", "--json"),
        "bench": ("bench", "--size-mb", 1, "--json"),
        "ls": ("ls", run / "ckpts", "--json"),
        "migrate": ("migrate", v1, "--dry-run", "--json"),
    }
    codes = {"audit": 1, "diff_model": 1}  # no data position / a model that does not match
    with ThreadPoolExecutor(4) as ex:
        res = dict(zip(argvs, ex.map(lambda k: cli(*argvs[k], check=codes.get(k, 0)), argvs)))
    for k, p in res.items():
        assert p.stdout.lstrip().startswith("{") and p.stdout.rstrip().endswith("}"), k
        json.loads(p.stdout)  # strict JSON, one object
    assert _keys(res["inspect"]) == {
        "format", "path", "step", "world_size", "created", "format_version", "versions", "codec",
        "bytes_logical", "bytes_on_disk", "compression_ratio", "n_tensors", "n_objects", "ranks",
        "user_metadata", "keys"}
    assert json.loads(res["inspect"].stdout)["step"] == 3
    assert _keys(res["verify"]) == {"path", "ok", "files", "blocks", "bytes_checked", "deep",
                                    "problems"}
    assert _keys(res["audit"]) == {"path", "prefix", "ok", "present", "findings"}
    a = json.loads(res["audit"].stdout)
    assert a["ok"] is False and {"what", "consequence", "severity"} == set(a["findings"][0])
    d = json.loads(res["diff"].stdout)
    assert set(d) == {"mode", "a", "b", "same", "only_a", "only_b", "changed", "objects_differ",
                      "values_compared", "tensors", "tensors_equal", "strip_prefix", "rename",
                      "hint", "hint_prefix", "hint_side"}
    assert d["same"] is True and d["mode"] == "checkpoints" and d["tensors_equal"] == 4
    assert set(d["tensors"][0]) == {"key", "equal", "max_abs_diff", "frac_equal"}
    assert _keys(res["diff_model"]) == {"mode", "path", "target", "prefix", "ok", "missing",
                                        "unexpected", "mismatched"}
    assert _keys(res["reshard"]) == {"src", "dst", "world_size", "tensors", "objects", "files",
                                     "bytes_on_disk", "seconds"}
    assert {"src", "dst", "source_format", "to", "tensors", "objects", "bytes", "skipped",
            "seconds"} <= _keys(res["convert"])
    g = json.loads(res["gc"].stdout)
    assert set(g) == {"root", "dry_run", "bytes_freed", "removed", "kept"}
    assert {r["name"] for r in g["removed"]} == {"step_00000001",
                                                 ".step_00000004.partial-0123456789ab"}
    assert set(g["removed"][0]) == {"path", "name", "kind", "reason", "bytes"}
    assert set(g["kept"][0]) == {"name", "why"}
    assert {"codec_path", "native_available", "threads", "size_mb", "codec_ratio_f32",
            "encode_MBps", "decode_MBps", "save_MBps", "load_MBps",
            "directory"} <= _keys(res["bench"])
    assert _keys(res["migrate"]) == {"path", "from_version", "to_version", "changed", "dry_run"}


def test_human_units_and_plurals(run: Path) -> None:
    ck = run / "ckpts" / "step_00000003"
    v, i, g = many([("verify", ck), ("inspect", run / "weights"),
                    ("gc", run / "ckpts", "--keep-last", 2, "--dry-run")])
    assert " KiB checked" in v.stdout and "bytes checked" not in v.stdout
    assert ": OK — 1 file, " in v.stdout
    assert "rank    0: 1 file, " in i.stdout and "file(s)" not in i.stdout
    assert "4 tensors, 0 objects" in i.stdout and "  1 shard" in i.stdout
    assert "would remove 2 items, " in g.stdout and "0.0 MiB" not in g.stdout

    from shardckpt.tools.report import human_bytes, parse_size, plural

    assert [human_bytes(n) for n in (0, 40, 1023, 1024, 168448591, 3 << 30)] == [
        "0 B", "40 B", "1023 B", "1.0 KiB", "160.6 MiB", "3.0 GiB"]
    assert plural(1, "object") == "1 object" and plural(2, "object") == "2 objects"
    assert plural(0, "file") == "0 files"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MB") == 500 * 10**6
    assert parse_size("2GiB") == 2 << 30 and parse_size("1024") == 1024
    assert parse_size("2G") == 2 << 30
    for bad in ("", "GB", "5XB", "-1MB", "5iB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_inspect_other_formats(run: Path, tmp_path: Path) -> None:
    dcp_dir = tmp_path / "dcp"
    cli("convert", run / "weights", dcp_dir, "--to", "dcp", "-q")
    pt, dc = many([("inspect", run / "plain.pt", "--json"), ("inspect", dcp_dir)])
    d = json.loads(pt.stdout)
    assert d["format"] == "torch" and d["n_tensors"] == 4 and d["world_size"] is None
    assert {k["key"] for k in d["keys"]} == {"0.weight", "0.bias", "2.weight", "2.bias"}
    w = next(k for k in d["keys"] if k["key"] == "0.weight")
    assert w["shape"] == [16, 8] and w["dtype"] == "float32" and w["bytes"] == 16 * 8 * 4
    assert f"{dcp_dir} (dcp)" in dc.stdout and "4 tensors, 0 objects" in dc.stdout
    assert "model/" in dc.stdout


def test_diff_key_mapping_and_prefix_hint(run: Path) -> None:
    w, pt = run / "weights", run / "plain.pt"
    plain, stripped, renamed, swapped = many([
        ("diff", w, pt), ("diff", w, pt, "--strip-prefix", "model."),
        ("diff", w, pt, "--rename", r"^model\.=", "--keys-only"), ("diff", pt, w)], check=None)
    assert plain.returncode == 1 and "DIFFERENT" in plain.stdout
    assert "hint: keys differ only by the prefix 'model.': try --strip-prefix model." \
        in plain.stdout
    assert stripped.returncode == 0 and "4 of 4 common tensors are bitwise equal" in stripped.stdout
    assert "A's keys mapped by --strip-prefix model." in stripped.stdout
    assert renamed.returncode == 0 and "identical" in renamed.stdout
    assert swapped.returncode == 1 and "on B's side: swap A and B" in swapped.stdout


def _many_keys(path: Path, n: int, value: float) -> None:
    shardckpt.save({f"layer_with_a_long_name_{i:05d}.weight": torch.full((2,), value)
                    for i in range(n)}, str(path))


def test_exit_status_survives_a_closed_pipe(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _many_keys(a, 2000, 1.0)  # the diff prints > 64 KiB: the pipe buffer cannot hide EPIPE
    _many_keys(b, 2000, 2.0)
    cmd = f"{sys.executable} -m shardckpt.cli diff {a} {b}"
    for tail in ("head -2", "true"):
        p = subprocess.run(["bash", "-o", "pipefail", "-c", f"{cmd} | {tail}"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1, (tail, p.returncode, p.stderr[-2000:])
        assert "Traceback" not in p.stderr and "BrokenPipe" not in p.stderr, p.stderr
    # Read one line, close the pipe, and look at the status the process exits with.
    proc = subprocess.Popen([sys.executable, "-m", "shardckpt.cli", "diff", str(a), str(a),
                             "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b"{"
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and b"Traceback" not in err, err  # a == a: equal


def _with_tty_stderr(*args: object) -> tuple[int, str, bytes]:
    """Run the CLI with stderr on a pseudo-terminal; return what reached the terminal."""
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "shardckpt.cli", *map(str, args)], cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=slave, timeout=300)
        chunks = []
        while select.select([master], [], [], 0.5)[0]:
            b = os.read(master, 1 << 16)
            if not b:
                break
            chunks.append(b)
        return p.returncode, p.stdout.decode(), b"".join(chunks)
    finally:
        os.close(slave)
        os.close(master)


def test_progress_only_when_stderr_is_a_terminal(run: Path) -> None:
    ck = run / "ckpts" / "step_00000003"
    rc, out, tty = _with_tty_stderr("diff", ck, ck)
    assert rc == 0 and "identical" in out
    assert b"diff" in tty and b"\r" in tty  # tqdm drew (and cleared) its bar on the terminal
    rc, out, tty = _with_tty_stderr("verify", ck)
    assert rc == 0 and b"verify" in tty and "OK" in out
    rc, out, tty = _with_tty_stderr("verify", ck, "-q")
    assert rc == 0 and tty == b""
    piped = cli("diff", ck, ck)  # stderr is a pipe: nothing but errors would go there
    assert piped.stderr == ""


def test_convert_passes_issue_14_flags_only_when_set(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    from shardckpt import cli as cli_mod
    from shardckpt.tools import convert as conv

    seen: dict = {}

    def new_convert(src, dst, to, *, source_format=None, strip_prefix=(), rename=(),
                    world_size=1, compression=None, overwrite=False, on_progress=None,
                    trust_pickle=False, model_only=False, include=(), exclude=(), dtype=None,
                    max_shard_size=None, train_state=False):
        seen.update(locals())
        return {"source_format": "shardckpt", "to": to, "tensors": 1, "objects": 0,
                "bytes": 4, "skipped": []}

    monkeypatch.setattr(conv, "convert", new_convert)
    rc = cli_mod.main(["convert", "src", str(tmp_path / "o"), "--to", "safetensors",
                       "--model-only", "--include", "model.*", "--include", "x.*", "--exclude",
                       "*.bias", "--dtype", "bfloat16", "--max-shard-size", "500MB",
                       "--train-state", "-q"])
    assert rc == 0
    assert seen["model_only"] is True and seen["include"] == ("model.*", "x.*")
    assert seen["exclude"] == ("*.bias",) and seen["dtype"] == "bfloat16"
    assert seen["max_shard_size"] == 500 * 10**6 and seen["train_state"] is True

    # Without the new flags, none of them is passed: today's convert keeps working.
    ns = cli_mod.build_parser().parse_args(["convert", "a", "b", "--to", "dcp"])
    assert set(cli_mod.convert_kwargs(ns)) == {"source_format", "strip_prefix", "rename",
                                               "world_size", "compression", "overwrite",
                                               "trust_pickle"}


def test_cli_wording() -> None:
    from shardckpt.tools.report import cli_wording, error_message

    assert cli_wording("x: exists; pass overwrite=True or choose another path.") == \
        "x: exists; pass --overwrite or choose another path."
    assert cli_wording("read it with full unpickling: --trust-pickle (CLI) / trust_pickle=True "
                       "(Python).") == "read it with full unpickling: --trust-pickle."
    assert "--strip-prefix / --rename" in cli_wording("adjust strip_prefix / rename")
    assert "raise timeout= if" in cli_wording("raise timeout= if some ranks are slower")
    assert cli_wording("a\n  b\n") == "a; b"
    assert error_message(KeyError("k")).startswith("internal error: KeyError: ")
    assert error_message(PermissionError(13, "Permission denied", "/x")) == \
        "/x: Permission denied"


def _files_digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}


@pytest.mark.parametrize("name", ["v1_single_zstd", "v1_single_none", "v1_fsdp2_trainstate_w2"])
def test_migrate_v1_fixture(name: str, tmp_path: Path) -> None:
    from shardckpt.tools.migrate import migrate

    path = tmp_path / name
    shutil.copytree(FIXTURES / name, path)
    before = (path / MANIFEST_NAME).read_bytes()
    data = _files_digest(path)
    rep = migrate(path, dry_run=True)
    assert (rep.from_version, rep.to_version, rep.changed) == (1, 3, True)
    assert (path / MANIFEST_NAME).read_bytes() == before
    rep = migrate(path)
    assert rep.changed and not rep.dry_run
    m = json.loads((path / MANIFEST_NAME).read_text())
    assert m["format_version"] == 3 and m["checksum"].startswith("sha256:")
    assert _files_digest(path) == data  # data files untouched
    assert sorted(os.listdir(path)) == sorted(os.listdir(FIXTURES / name))  # no temp left
    again = migrate(path)
    assert not again.changed and str(again) == f"{path}: already version 3, nothing to do"
    assert shardckpt.verify(str(path)).ok
    _load_bitwise(name, str(path))


def _load_bitwise(name: str, path: str) -> None:
    """The checks of tests/test_fixtures.py, on the migrated copy."""
    if name.startswith("v1_single"):
        check_single(name, path)
    else:
        check_fsdp2(path)


def test_migrate_cli(tmp_path: Path) -> None:
    path = tmp_path / "v1"
    shutil.copytree(FIXTURES / "v1_single_zstd", path)
    dry = cli("migrate", path, "--dry-run").stdout
    assert dry.strip() == f"{path}: would migrate format version 1 -> 3"
    assert json.loads((path / MANIFEST_NAME).read_text())["format_version"] == 1
    assert cli("migrate", path).stdout.strip() == f"{path}: migrated format version 1 -> 3"
    d = json.loads(cli("migrate", path, "--json").stdout)
    assert d == {"path": str(path), "from_version": 3, "to_version": 3, "changed": False,
                 "dry_run": False}
