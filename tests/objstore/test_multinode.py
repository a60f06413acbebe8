"""Two torchrun "nodes" with no shared filesystem save to S3; other world sizes load it back.

Each node is its own `python -m torch.distributed.run` agent (c10d rendezvous on
127.0.0.1) with its own working directory, TMPDIR and HOME; the only thing the
nodes share is the S3 server (moto, 127.0.0.1). The job saves an FSDP2 model +
AdamW state at world size 4, then a 2-process torchrun job and this process
(world size 1, no process group) load it, and every full tensor is compared
bitwise against the reference each node wrote into its own scratch directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt.dcp.join import join
from shardckpt.tools.inspect import inspect_path
from tests.workers import objstore_multinode as MN
from tests.workers import storage as W
from tests.workers.world import free_port, run_world

ROOT = Path(__file__).resolve().parents[2]


def _env(scratch: Path, logs: Path) -> dict[str, str]:
    env = dict(os.environ)  # the s3_server fixture's AWS_* endpoint and credentials
    env.update(PYTHONPATH=str(ROOT), TMPDIR=str(scratch), HOME=str(scratch),
               # torch makes an (empty) compile cache dir under TMPDIR at import, before
               # any save: kept out of the scratch dirs, whose contents are checked.
               TORCHINDUCTOR_CACHE_DIR=str(logs / "inductor"),
               PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1",
               GLOO_SOCKET_IFNAME="lo",  # gloo's pairs on loopback, not the host's interface
               TORCH_CPP_LOG_LEVEL="ERROR")
    env.pop("XDG_CACHE_HOME", None)
    return env


def _torchrun(nnodes: int, node_rank: int, port: int, logs: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes),
            "--nproc-per-node", "2", "--node-rank", str(node_rank),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
            "--rdzv-id", "mn", "--rdzv-conf", f"is_host={int(node_rank == 0)}",
            "--local-addr", "127.0.0.1", "--max-restarts", "0", "--log-dir", str(logs),
            "-m", "tests.workers.objstore_multinode", *args]


def _run(jobs: list[tuple[list[str], Path]], logs: Path, timeout: float = 150) -> None:
    procs = []
    for i, (cmd, scratch) in enumerate(jobs):
        out = open(logs / f"agent{i}.out", "w")
        procs.append((subprocess.Popen(cmd, cwd=scratch, env=_env(scratch, logs), stdout=out,
                                       stderr=subprocess.STDOUT), out))
    try:
        for p, _ in procs:
            p.wait(timeout=timeout)
    finally:
        for p, out in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            out.close()
    for i, (p, _) in enumerate(procs):
        assert p.returncode == 0, (logs / f"agent{i}.out").read_text()[-6000:]


def _keys(s3_server, url: str) -> dict[str, dict]:
    b, _, prefix = url.removeprefix("s3://").partition("/")
    out = s3_server.client().list_objects_v2(Bucket=b, Prefix=prefix).get("Contents", [])
    return {o["Key"]: o for o in out}


def _files(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")}


def test_two_nodes_save_without_shared_fs_then_load_at_2_and_1(bucket, s3_server, tmp_path):
    url = f"{bucket}/run/step_1"
    logs = tmp_path / "logs"
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for d in (logs, *nodes):
        d.mkdir()
    port = free_port()
    _run([(_torchrun(2, n, port, logs / f"save{n}", ["save", url]), nodes[n]) for n in (0, 1)],
         logs)

    # Each node holds only what the job itself wrote there: its reference and one
    # report per local rank. The checkpoint lives in the bucket alone.
    reports = {}
    for n, d in enumerate(nodes):
        files = _files(d)
        assert "ref.pt" in files, files
        mine = files - {"ref.pt"}
        assert len(mine) == 2 and all(f.startswith("rank") and f.endswith(".json")
                                      for f in mine), files
        for f in mine:
            r = json.loads((d / f).read_text())
            assert r["node"] == n and r["world"] == 4 and r["path"] == url
            assert r["writes"] == [], r  # no local file touched by the save, on any thread
            reports[r["rank"]] = r
    assert sorted(reports) == [0, 1, 2, 3]

    keys = _keys(s3_server, url)
    data = sorted(k for k in keys if "/data/" in k)
    assert sorted(keys) == sorted(["run/step_1/manifest.json", *data])
    assert [k.split("/")[-1][:6] for k in data] == ["r00000", "r00001", "r00002", "r00003"]
    # Multipart ETags end in -<parts>: each rank streamed its object in parts.
    assert all(keys[k]["ETag"].strip('"').endswith("-2") for k in data), \
        [keys[k]["ETag"] for k in data]
    assert shardckpt.verify(url).ok
    assert inspect_path(url)["path"] == url  # not a local path made of cwd + "s3:/..."

    refs = [torch.load(d / "ref.pt", weights_only=True) for d in nodes]
    assert W.compare_trees(refs[0], refs[1]) == []  # both nodes gathered the same state

    # World size 2: one agent, two processes, in a fresh scratch directory.
    node2 = tmp_path / "node2"
    node2.mkdir()
    _run([(_torchrun(1, 0, free_port(), logs / "load2", ["load", url, "loaded.pt"]), node2)],
         logs)
    assert _files(node2) == {"loaded.pt"}
    got = torch.load(node2 / "loaded.pt", weights_only=True)
    for ref in refs:
        assert W.compare_trees(ref, got) == []

    # World size 1: this process, no process group, an unsharded model.
    assert not torch.distributed.is_initialized()
    got = MN.load_single(url)
    for ref in refs:
        assert W.compare_trees(ref, got) == []
    # Not vacuous: the model the loads started from differs from the saved one.
    fresh = W.build_model(2, MN.WIDE).state_dict()
    assert not torch.equal(fresh["2.weight"], refs[0]["model"]["2.weight"])


def _join_from_own_cwd(rank: int, world: int, root: str) -> str:
    d = os.path.join(root, f"cwd{rank}")
    os.makedirs(d)
    os.chdir(d)
    join(None, what="save", path="s3://b/run/step_1/", timeout=60)
    return os.getcwd()


def test_join_agrees_on_a_url_across_working_directories(tmp_path):
    # The rendezvous once compared os.path.abspath(url): "<cwd>/s3:/b/...", which
    # differs between nodes, so every multi-node save to a URL failed at once.
    cwds = run_world(2, _join_from_own_cwd, str(tmp_path))
    assert cwds[0] != cwds[1]


@pytest.fixture(autouse=True)
def _no_pg_leak():
    yield
    assert not torch.distributed.is_initialized()
