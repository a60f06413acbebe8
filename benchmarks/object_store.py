"""Checkpoints in object storage: shardckpt against DCP + s3fs and s3torchconnector, one run.

    python benchmarks/object_store.py                       # 1 GB, 1 process and 4 ranks, 3 reps
    python benchmarks/object_store.py --quick --worlds 1    # 64 MB, 1 rep (smoke test)
    python benchmarks/object_store.py --endpoint http://127.0.0.1:9000 --bucket b  # external store

Tools, every one saving to and loading from s3:// on the same server:

- shardckpt.save / shardckpt.load (zstd, the default, and compression="none");
- DCP `FsspecWriter` / `FsspecReader` with s3fs (sync_files=False: an object is
  durable once its upload completes; a local fsync or os.sync would only cost time);
- s3torchconnector's DCP `S3StorageWriter` / `S3StorageReader` (its CRT client,
  path-style addressing, the endpoint given explicitly);

the two competitors at DCP `thread_count` 1 and 4 (`--threads`).

Server: by default moto's S3 server started by this script on 127.0.0.1 (the kind
the tests use); `--endpoint URL` uses an external one with the AWS_* credentials of
the environment. moto is a single Python process that keeps objects in memory, so
its figures measure the client's protocol (part sizes, requests in flight,
request count) against a CPU-bound server on the same cores, not a network.

Method, as benchmarks/compare.py: each world runs in freshly spawned processes
(gloo on 127.0.0.1 for 4 ranks; every rank builds and saves only its own
parameters: disjoint keys, the same bytes for every tool). Tools run in a
different order in every repetition (rotated, reversed on odd ones). Save =
barrier to barrier until every rank's objects are complete (and, for shardckpt,
committed); load = into preallocated zeroed tensors, barrier to barrier; every
load is checked bitwise (torch.equal, dtype, shape) and a mismatch fails the run.
Each save goes to a fresh prefix, deleted (untimed) after its load. A competitor
that cannot run here (not installed, fails a tiny round trip) is reported with the
reason, in the output and in the JSON, and left out.

Ratios = tool time / best competitor's time (the competitor row with the lowest
median, per world and per operation): below 1, faster than the best competitor.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import shardckpt  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")
# fsspec warns on every s3fs import that 0.4.2 is old; the version is in the output header.
warnings.filterwarnings("ignore", message=".*installed version of s3fs is very old.*")

REGION = "us-east-1"
SHARDCKPT = ("shardckpt (zstd)", "shardckpt (none)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- the server


class MotoServer:
    """moto's S3 server in its own process on 127.0.0.1."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError("moto server did not start (pip install 'moto[server]')") \
                        from None
                time.sleep(0.1)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


def _client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name=REGION)


def _delete_prefix(client: Any, bucket: str, prefix: str) -> int:
    """Delete every object under prefix; returns the bytes they held."""
    total, keys = 0, []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            total += o["Size"]
            keys.append({"Key": o["Key"]})
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[i:i + 1000]})
    return total


# ---------------------------------------------------------------- the tools


Save = Callable[[dict, str], None]
Load = Callable[[dict, str], None]


def _shardckpt(compression: str) -> tuple[Save, Load]:
    def save(state: dict, url: str) -> None:
        shardckpt.save(state, url, compression=compression)

    def load(dest: dict, url: str) -> None:
        shardckpt.load(dest, url)
    return save, load


def _fsspec_classes() -> tuple[Any, Any]:
    try:
        from torch.distributed.checkpoint import FsspecReader, FsspecWriter
    except ImportError:  # older torch: only the private module has them
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    return FsspecWriter, FsspecReader


def _s3fs(endpoint: str, threads: int) -> tuple[Save, Load]:
    import s3fs  # noqa: F401 - fsspec resolves s3:// to it; fail here if it is missing

    writer_cls, reader_cls = _fsspec_classes()
    opts: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint, "region_name": REGION},
                            # fsspec caches instances (and their listings) by arguments: a
                            # fresh one per call, so no save sees another's cached listing.
                            "skip_instance_cache": True}
    for env, key in (("AWS_ACCESS_KEY_ID", "key"), ("AWS_SECRET_ACCESS_KEY", "secret"),
                     ("AWS_SESSION_TOKEN", "token")):
        if os.environ.get(env):
            opts[key] = os.environ[env]

    def save(state: dict, url: str) -> None:
        dcp.save(state, storage_writer=writer_cls(url, sync_files=False, thread_count=threads,
                                                  **opts))

    def load(dest: dict, url: str) -> None:
        dcp.load(dest, storage_reader=reader_cls(url, **opts))
    return save, load


def _s3torchconnector(endpoint: str, threads: int) -> tuple[Save, Load]:
    from s3torchconnector import S3ClientConfig
    from s3torchconnector._s3client import S3Client
    from s3torchconnector.dcp import S3FileSystem, S3StorageReader, S3StorageWriter

    cfg = S3ClientConfig(force_path_style=True)

    def fs(reader_constructor: Any = None) -> Any:
        # The writer and reader take no endpoint; their file system takes a client that does.
        client = S3Client(REGION, endpoint=endpoint, s3client_config=cfg)
        return S3FileSystem(REGION, s3_client=client, reader_constructor=reader_constructor)

    def save(state: dict, url: str) -> None:
        w = S3StorageWriter(REGION, url, s3client_config=cfg, thread_count=threads)
        w.fs = fs()
        dcp.save(state, storage_writer=w)

    def load(dest: dict, url: str) -> None:
        r = S3StorageReader(REGION, url, s3client_config=cfg)
        r.fs = fs(r._reader_constructor)
        dcp.load(dest, storage_reader=r)
    return save, load


def all_tools(endpoint: str, threads: list[int]) -> dict[str, Callable[[], tuple[Save, Load]]]:
    """name -> factory (imports happen in the factory, so a missing package is one tool's
    problem)."""
    out: dict[str, Callable[[], tuple[Save, Load]]] = {
        "shardckpt (zstd)": lambda: _shardckpt("zstd"),
        "shardckpt (none)": lambda: _shardckpt("none"),
    }
    for t in threads:
        out[f"DCP+s3fs t={t}"] = lambda t=t: _s3fs(endpoint, t)
    for t in threads:
        out[f"s3torchconnector t={t}"] = lambda t=t: _s3torchconnector(endpoint, t)
    return out


def probe(tools: dict[str, Callable[[], tuple[Save, Load]]], endpoint: str,
          bucket: str) -> dict[str, str]:
    """A tiny round trip per competitor in this process; returns name -> why it cannot run."""
    client = _client(endpoint)
    skipped: dict[str, str] = {}
    g = torch.Generator().manual_seed(0)
    src = {"w": torch.randn(1000, generator=g).to(torch.bfloat16), "m": torch.randn(77, 3)}
    for name, factory in tools.items():
        if name in SHARDCKPT:
            continue
        prefix = f"probe-{uuid.uuid4().hex[:8]}"
        try:
            save, load = factory()
            save(src, f"s3://{bucket}/{prefix}")
            dest = C.empty_like_state(src)
            load(dest, f"s3://{bucket}/{prefix}")
            C.assert_equal(dest, src, name)
        except BaseException as e:  # a competitor's failure is reported, not fatal
            if isinstance(e, KeyboardInterrupt):
                raise
            msg = str(e).strip().splitlines()
            skipped[name] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
        finally:
            _delete_prefix(client, bucket, prefix)
    return skipped


def versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for pkg in ("boto3", "botocore", "fsspec", "s3fs", "s3torchconnector",
                "s3torchconnectorclient", "moto"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ---------------------------------------------------------------- one world


def _worker(rank: int, world: int, port: int, cfg: dict) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run(rank, world, cfg)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(rank: int, world: int, cfg: dict) -> None:
    state, label = C.build_state(cfg["bytes"], rank=rank, world=world)
    dest = C.empty_like_state(state)
    logical = C.state_nbytes(state)
    if world > 1:
        t = torch.tensor([logical], dtype=torch.int64)
        dist.all_reduce(t)
        logical = int(t.item())
    factories = all_tools(cfg["endpoint"], cfg["threads"])
    table = {n: factories[n]() for n in cfg["tools"]}
    client = _client(cfg["endpoint"]) if rank == 0 else None
    rec: dict[str, dict[str, list]] = {n: {"save": [], "load": [], "stored": []} for n in table}
    for rep in range(cfg["reps"]):
        for name in C.order(list(table), rep):
            save, load = table[name]
            prefix = f"{cfg['run']}/w{world}/{name.replace(' ', '_')}/rep{rep}"
            url = f"s3://{cfg['bucket']}/{prefix}"
            C.zero_state(dest)
            C.barrier(world)
            t0 = time.perf_counter()
            save(state, url)
            C.barrier(world)
            t_save = time.perf_counter() - t0
            t0 = time.perf_counter()
            load(dest, url)
            C.barrier(world)
            t_load = time.perf_counter() - t0
            C.assert_equal(dest, state, f"{name} (rank {rank}, repetition {rep + 1})")
            if rank == 0:
                rec[name]["stored"].append(_delete_prefix(client, cfg["bucket"], prefix))
                rec[name]["save"].append(t_save)
                rec[name]["load"].append(t_load)
                print(f"  [{cfg['bytes'] / C.GB:g} GB, world {world}, rep {rep + 1}/"
                      f"{cfg['reps']}] {name:<22} save {t_save:7.2f}s  load {t_load:7.2f}s",
                      flush=True)
            C.barrier(world)
    if rank == 0:
        Path(cfg["result"]).write_text(json.dumps({"label": label, "logical_bytes": logical,
                                                   "raw": rec}))


def run_world(world: int, cfg: dict, workdir: Path) -> dict:
    result = workdir / f"object_store_w{world}.json"
    cfg = {**cfg, "result": str(result)}
    # Spawned even for one process: a fresh heap per world, and the parent holds no state.
    mp.spawn(_worker, args=(world, _free_port(), cfg), nprocs=world, join=True)
    doc = json.loads(result.read_text())
    result.unlink()
    return doc


# ---------------------------------------------------------------- summaries


def _stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "all": [round(x, 4) for x in xs]}


def summarize(doc: dict, world: int) -> dict:
    logical = doc["logical_bytes"]
    rows: dict[str, dict] = {}
    for name, r in doc["raw"].items():
        row: dict[str, Any] = {"stored_bytes": r["stored"][-1],
                               "stored_ratio": r["stored"][-1] / logical}
        for op in ("save", "load"):
            st = _stats(r[op])
            row[f"{op}_s"] = st
            row[f"{op}_gbps"] = {"median": logical / C.GB / st["median"],
                                 "min_time": logical / C.GB / st["min"]}
        rows[name] = row
    competitors = [n for n in rows if n not in SHARDCKPT]
    best: dict[str, str | None] = {}
    for op in ("save", "load"):
        if not competitors:
            best[op] = None
            continue
        best[op] = min(competitors, key=lambda n: rows[n][f"{op}_s"]["median"])
        ref = rows[best[op]][f"{op}_s"]
        for row in rows.values():
            st = row[f"{op}_s"]
            row[f"{op}_vs_best_competitor"] = {"median": st["median"] / ref["median"],
                                               "min": st["min"] / ref["min"]}
    return {"world": world, "logical_bytes": logical, "label": doc["label"],
            "best_competitor": best, "tools": rows}


def print_table(s: dict, skipped: dict[str, str]) -> None:
    b = s["best_competitor"]
    print(f"\n{s['logical_bytes'] / C.GB:.3f} GB, world {s['world']}; ratios = time / best "
          f"competitor's (save: {b['save']}, load: {b['load']}), median | min")
    hdr = (f"{'tool':<22} {'save s med/min':>15} {'GB/s':>6} {'x best':>11} "
           f"{'load s med/min':>15} {'GB/s':>6} {'x best':>11} {'stored/log':>10}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in s["tools"].items():
        cells = [f"{name:<22}"]
        for op in ("save", "load"):
            st, v = r[f"{op}_s"], r.get(f"{op}_vs_best_competitor")
            cells.append(f"{st['median']:7.2f}/{st['min']:<7.2f} {r[f'{op}_gbps']['median']:6.3f} "
                         + (f"{v['median']:5.2f}|{v['min']:<5.2f}" if v else f"{'-':>11}"))
        cells.append(f"{r['stored_ratio']:10.3f}")
        print(" ".join(cells))
    for name, why in skipped.items():
        print(f"{name:<22} not run: {why}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=None,
                    help="logical state size, 1e9 bytes (default 1; 0.064 with --quick)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 4],
                    help="DCP thread_count values for the competitors")
    ap.add_argument("--quick", action="store_true", help="64 MB, 1 repetition (smoke test)")
    ap.add_argument("--endpoint", default=None,
                    help="an external S3-compatible endpoint (credentials from AWS_*); default: "
                         "start moto's server on 127.0.0.1")
    ap.add_argument("--bucket", default="shardckpt-bench", help="created if missing")
    ap.add_argument("--tools", nargs="+", default=None, help="run only these (names as printed)")
    ap.add_argument("--out", default="bench_out/object_store.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.reps = 1
    if args.size_gb is None:
        args.size_gb = 0.064 if args.quick else 1.0
    # gloo's pairs on loopback (it would otherwise take the address the hostname resolves to).
    if os.path.exists("/sys/class/net/lo"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

    server = None
    if args.endpoint:
        endpoint = args.endpoint
    else:
        server = MotoServer()
        endpoint = server.url
        # moto accepts any credentials; these keep real ones from the environment away from it.
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
        os.environ.pop("AWS_SESSION_TOKEN", None)
    # shardckpt (in the spawned workers too) takes the endpoint from the environment.
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION=REGION)
    machine = C.machine_info()
    load_before = C.load_average()
    vers = versions()
    print(f"machine: {machine['cpu_model']}, {machine['cores_usable']} cores, torch "
          f"{machine['torch']}, codec {machine['shardckpt_codec_path']}; load average "
          f"{load_before}", flush=True)
    print(f"server: {'moto ' + str(vers['moto']) + ' on ' + endpoint if server else endpoint}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items() if k != "moto"), flush=True)
    summaries = []
    workdir = Path(args.out).resolve().parent
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        client = _client(endpoint)
        try:
            client.create_bucket(Bucket=args.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        tools = all_tools(endpoint, args.threads)
        if args.tools:
            unknown = set(args.tools) - set(tools)
            if unknown:
                ap.error(f"unknown tools {sorted(unknown)}; known: {list(tools)}")
            tools = {n: f for n, f in tools.items() if n in args.tools}
        skipped = probe(tools, endpoint, args.bucket)
        for name, why in skipped.items():
            print(f"NOT RUN: {name}: {why}", flush=True)
        names = [n for n in tools if n not in skipped]
        cfg = {"bytes": int(args.size_gb * C.GB), "reps": args.reps, "endpoint": endpoint,
               "bucket": args.bucket, "threads": args.threads, "tools": names,
               "run": f"bench-{uuid.uuid4().hex[:8]}"}
        for world in args.worlds:
            s = summarize(run_world(world, cfg, workdir), world)
            print_table(s, skipped)
            summaries.append(s)
    finally:
        if server is not None:
            server.stop()
    doc = {"benchmark": "object_store", "machine": machine,
           "server": {"kind": "external" if args.endpoint else "moto server on 127.0.0.1",
                      "endpoint": endpoint},
           "versions": vers,
           "settings": {"size_gb": args.size_gb, "worlds": args.worlds, "reps": args.reps,
                        "threads": args.threads, "quick": args.quick,
                        "sharding": "per-rank distinct keys (parameter i on rank i % world)",
                        "ratios": "tool time / the best competitor's time (by median)"},
           "skipped": skipped,
           "load_average": {"before": load_before, "after": C.load_average()},
           "results": summaries}
    out = Path(args.out)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
