"""Every checkpoint tool on the same state in one run, against DCP's best thread count and the disk.

    python benchmarks/compare.py                          # 1 GB and 4 GB, 1 process and 4 ranks
    python benchmarks/compare.py --sizes 1 --worlds 1 --reps 5
    python benchmarks/compare.py --quick --reps 1 --worlds 1 2   # 64 MB smoke test

Tools: shardckpt.save/load (zstd, the default, and compression="none"),
torch.save/torch.load, DCP FileSystemWriter/FileSystemReader with thread_count
1, 2, 4 and 8, DCP + its ZStandard extension, and dcp.async_save (time until
durable, and the part that blocks the caller). A raw-storage line (fdatasync'd
sequential write and cold read of the same byte count with 1, 2 and 4 streams
of pwrite/pread into separate files, and an O_DIRECT write with 2 streams: the
page cache costs CPU that direct I/O does not) gives the physical limit.

Method: each (size, world) runs in freshly spawned processes. With 4 ranks
(gloo) every rank builds and saves only its own shard: disjoint keys (parameter
i belongs to rank i % world), no DTensor, so every tool writes the same bytes.
Tools run in a different order in every repetition (rotated, reversed on odd
ones). Every save is timed until durable: after the call every written file and
directory is fsynced (free for tools that already did), then the barrier. The
page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, root only;
a warning otherwise) before every load, and every load is checked bitwise
(torch.equal, dtype and shape of every tensor). Loads go into preallocated
tensors (torch.load allocates its own; they are freed after the check).

Ratios are tool time / DCP time (below 1: faster than DCP), for the median and
the minimum over repetitions, against the DCP thread count with the lowest
median, picked per size and world, for save and for load separately. "bound"
says what limited a run: CPU when the processes' CPU time (getrusage, every
thread) reached 75 % of wall time x cores, storage when the bytes moved per
second reached 75 % of the best raw line, else "latency" (neither saturated).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ZStandard

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import shardckpt  # noqa: E402

warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torch.distributed")

DCP_THREADS = (1, 2, 4, 8)
RAW_STREAMS = (1, 2, 4)
CPU_BOUND, STORAGE_BOUND = 0.75, 0.75


# ---------------------------------------------------------------- the tools (run on every rank)


def _dcp_writer(threads: int, zstd: bool = False) -> Any:
    def save(state: dict, path: Path, rank: int) -> dict:
        kw: dict[str, Any] = {"thread_count": threads}
        if zstd:
            kw["_extensions"] = [ZStandard()]
        dcp.save(state, storage_writer=FileSystemWriter(path, **kw))
        return {}
    return save


def _dcp_load(dest: dict, path: Path, rank: int) -> dict:
    # FileSystemReader has no thread count; its default ExtensionRegistry knows ZStandard.
    dcp.load(dest, storage_reader=FileSystemReader(path))
    return dest


def _dcp_async(state: dict, path: Path, rank: int) -> dict:
    t0 = time.perf_counter()
    fut = dcp.async_save(state, storage_writer=FileSystemWriter(path))
    stage = getattr(fut, "staging_completion", None)
    if stage is not None:  # newer DCP: staging and upload are separate futures
        stage.result()
        fut = fut.upload_completion
    blocking = time.perf_counter() - t0
    fut.result()
    return {"blocking_s": blocking}


def _shard_save(compression: str) -> Any:
    def save(state: dict, path: Path, rank: int) -> dict:
        shardckpt.save(state, path, compression=compression)
        return {}
    return save


def _shard_load(dest: dict, path: Path, rank: int) -> dict:
    shardckpt.load(dest, path)
    return dest


def _torch_save(state: dict, path: Path, rank: int) -> dict:
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / f"rank{rank}.pt")
    return {}


def _torch_load(dest: dict, path: Path, rank: int) -> dict:
    return torch.load(path / f"rank{rank}.pt", weights_only=True, map_location="cpu")


def tools() -> dict[str, tuple[Any, Any]]:
    """name -> (save(state, path, rank) -> extras, load(dest, path, rank) -> loaded or None)."""
    out: dict[str, tuple[Any, Any]] = {
        "shardckpt (zstd)": (_shard_save("zstd"), _shard_load),
        "shardckpt (none)": (_shard_save("none"), _shard_load),
        "torch.save": (_torch_save, _torch_load),
    }
    for t in DCP_THREADS:
        out[f"DCP t={t}"] = (_dcp_writer(t), _dcp_load)
    out["DCP + ZStandard"] = (_dcp_writer(1, zstd=True), _dcp_load)
    # Same files as DCP t=1: its load is that row's.
    out["dcp.async_save"] = (_dcp_async, None)
    return out


# ---------------------------------------------------------------- one (size, world) run


def _sum(x: float, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def _worker(rank: int, world: int, port: int, cfg: dict) -> None:
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _run_config(rank, world, cfg)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run_config(rank: int, world: int, cfg: dict) -> None:
    root = Path(cfg["dir"])
    state, label = C.build_state(cfg["bytes"], rank=rank, world=world)
    dest = C.empty_like_state(state)
    logical = int(_sum(C.state_nbytes(state), world))
    table = tools()
    names = list(table) + ([f"raw x{n}" for n in RAW_STREAMS] + ["raw direct x2"]
                           if world == 1 else [])
    rec: dict[str, dict[str, list]] = {n: {"save": [], "load": [], "save_cpu": [], "load_cpu": [],
                                           "disk": [], "blocking": []} for n in names}
    cold = True
    for rep in range(cfg["reps"]):
        for name in C.order(names, rep):
            r = rec[name]
            if name.startswith("raw"):
                streams = int(name.rsplit("x", 1)[1])
                c0 = C.process_cpu_s()
                raw = C.raw_write_read(root / "raw", logical, streams, drop=cfg["drop"],
                                       direct="direct" in name)
                if raw is None:  # the filesystem refuses O_DIRECT
                    continue
                r["save"].append(raw["write_s"])
                r["load"].append(raw["read_s"])
                r["save_cpu"].append(C.process_cpu_s() - c0)
                r["disk"].append(logical)
                continue
            save, load = table[name]
            out = root / name.replace(" ", "_").replace("=", "").replace("+", "p").replace(
                "(", "").replace(")", "")
            if rank == 0:
                C.remove(out)
                os.sync()  # earlier tools' dirty pages are not flushed on this tool's clock
            C.barrier(world)
            c0, t0 = C.process_cpu_s(), time.perf_counter()
            extra = save(state, out, rank)
            C.barrier(world)
            if rank == 0:
                C.fsync_tree(out)
            C.barrier(world)
            r["save"].append(time.perf_counter() - t0)
            r["save_cpu"].append(_sum(C.process_cpu_s() - c0, world))
            r["blocking"].append(_sum(extra.get("blocking_s", 0.0), world) / world)
            if rank == 0:
                r["disk"].append(C.disk_bytes(out))
            if load is not None:
                C.zero_state(dest)
                if rank == 0 and cfg["drop"]:
                    cold &= C.drop_page_cache()
                C.barrier(world)
                c0, t0 = C.process_cpu_s(), time.perf_counter()
                loaded = load(dest, out, rank)
                C.barrier(world)
                r["load"].append(time.perf_counter() - t0)
                r["load_cpu"].append(_sum(C.process_cpu_s() - c0, world))
                C.assert_equal(loaded, state, f"{name} (rank {rank}, repetition {rep + 1})")
                del loaded  # torch.load's own copy goes before the next tool runs
            C.barrier(world)
            if rank == 0:
                C.remove(out)
                print(f"  [{cfg['bytes'] / C.GB:g} GB, world {world}, rep {rep + 1}/"
                      f"{cfg['reps']}] {name:<18} save {r['save'][-1]:7.2f}s"
                      + (f"  load {r['load'][-1]:7.2f}s" if r["load"] else ""), flush=True)
    if rank == 0:
        doc = {"label": label, "logical_bytes": logical, "cold_loads": cold and cfg["drop"],
               "raw": rec}
        Path(cfg["result"]).write_text(json.dumps(doc))


def run_config(size_bytes: int, world: int, reps: int, workdir: Path, drop: bool) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = workdir / f"result_{size_bytes}_{world}.json"
    cfg = {"bytes": size_bytes, "reps": reps, "dir": str(workdir), "drop": drop,
           "result": str(result)}
    # Spawned even for one process: every configuration starts with a fresh heap,
    # and the parent never holds a state.
    mp.spawn(_worker, args=(world, port, cfg), nprocs=world, join=True)
    doc = json.loads(result.read_text())
    result.unlink()
    return doc


# ---------------------------------------------------------------- summaries


def _stats(xs: list[float]) -> dict | None:
    return {"median": statistics.median(xs), "min": min(xs), "all": [round(x, 4) for x in xs]} \
        if xs else None


def summarize(doc: dict, world: int, raw_best: dict[str, float], cores: int) -> dict:
    logical = doc["logical_bytes"]
    rows: dict[str, dict] = {}
    for name, r in doc["raw"].items():
        row: dict[str, Any] = {"save_s": _stats(r["save"]), "load_s": _stats(r["load"]),
                               "disk_bytes": r["disk"][-1] if r["disk"] else None}
        if any(r["blocking"]):
            row["blocking_s"] = _stats(r["blocking"])
        for op in ("save", "load"):
            st = row[f"{op}_s"]
            if st is None:
                continue
            row[f"{op}_gbps"] = {"median": logical / C.GB / st["median"],
                                 "min_time": logical / C.GB / st["min"]}
            if name.startswith("raw"):
                continue
            cpu = statistics.median(r[f"{op}_cpu"]) / st["median"] / cores
            storage = row["disk_bytes"] / st["median"] / raw_best[op]  # bytes the disk moved
            row[f"{op}_cpu_util"] = cpu
            row[f"{op}_storage_frac"] = storage
            row[f"{op}_bound"] = ("CPU" if cpu >= CPU_BOUND else
                                  "storage" if storage >= STORAGE_BOUND else "latency")
        rows[name] = row
    best = {}
    for op in ("save", "load"):
        cands = [f"DCP t={t}" for t in DCP_THREADS]
        best[op] = min(cands, key=lambda n: rows[n][f"{op}_s"]["median"])
        ref = rows[best[op]][f"{op}_s"]
        for row in rows.values():
            st = row[f"{op}_s"]
            if st is not None:
                row[f"{op}_vs_dcp_best"] = {"median": st["median"] / ref["median"],
                                            "min": st["min"] / ref["min"]}
    return {"world": world, "logical_bytes": logical, "label": doc["label"],
            "cold_loads": doc["cold_loads"], "dcp_best": best, "tools": rows}


def print_table(s: dict) -> None:
    print(f"\n{s['logical_bytes'] / C.GB:.2f} GB, world {s['world']} "
          f"({'cold' if s['cold_loads'] else 'WARM'} loads); ratios = time / DCP best "
          f"(save: {s['dcp_best']['save']}, load: {s['dcp_best']['load']}), median | min")
    hdr = (f"{'tool':<18} {'save s med/min':>15} {'GB/s':>6} {'x DCP':>11} {'bound':>8} "
           f"{'load s med/min':>15} {'GB/s':>6} {'x DCP':>11} {'bound':>8} {'disk/log':>8}")
    print(hdr)
    print("-" * len(hdr))
    for name, r in s["tools"].items():
        cells = [f"{name:<18}"]
        for op in ("save", "load"):
            st = r[f"{op}_s"]
            if st is None:
                cells.append(f"{'-':>15} {'-':>6} {'-':>11} {'-':>8}")
                continue
            v = r.get(f"{op}_vs_dcp_best")
            cells.append(f"{st['median']:7.2f}/{st['min']:<7.2f} {r[f'{op}_gbps']['median']:6.2f} "
                         + (f"{v['median']:5.2f}|{v['min']:<5.2f}" if v else f"{'':11}")
                         + f" {r.get(f'{op}_bound', 'limit'):>8}")
        disk = r["disk_bytes"] / s["logical_bytes"] if r["disk_bytes"] else 0
        cells.append(f"{disk:8.3f}")
        print(" ".join(cells))
        if "blocking_s" in r:
            print(f"{'':<18} blocking part of {name}: {r['blocking_s']['median']:.2f} s median")


def plot(summaries: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("WARNING: matplotlib missing (pip install -e '.[bench]'); no plot written")
        return
    worlds = sorted({s["world"] for s in summaries})
    fig, axes = plt.subplots(2, len(worlds), figsize=(6 * len(worlds), 8), squeeze=False)
    for col, world in enumerate(worlds):
        rows = sorted((s for s in summaries if s["world"] == world), key=lambda s: s["logical_bytes"])
        raw_rows = sorted((s for s in summaries if s["world"] == 1), key=lambda s: s["logical_bytes"])
        for row_i, op in enumerate(("save", "load")):
            ax = axes[row_i][col]
            names = [n for n in rows[0]["tools"] if not n.startswith("raw")
                     and rows[0]["tools"][n][f"{op}_s"] is not None]
            for n in names:
                xs = [s["logical_bytes"] / C.GB for s in rows]
                ax.plot(xs, [s["tools"][n][f"{op}_gbps"]["median"] for s in rows], marker="o",
                        label=n)
            raw_names = [f"raw x{k}" for k in RAW_STREAMS] + ["raw direct x2"]
            for i, n in enumerate(raw_names):
                if (raw_rows and n in raw_rows[0]["tools"]
                        and f"{op}_gbps" in raw_rows[0]["tools"][n]):
                    # Horizontal: the disk's speed does not depend on the state's size.
                    v = statistics.median(s["tools"][n][f"{op}_gbps"]["median"] for s in raw_rows)
                    ax.axhline(v, linestyle=":" if "direct" in n else "--", color="black",
                               alpha=0.3 + 0.2 * min(i, 2),
                               label=f"{n.replace('raw', 'raw storage')}: {v:.2f}")
            ax.set_title(f"{op}, {'1 process' if world == 1 else f'{world} ranks'}")
            ax.set_xlabel("logical state size (GB)")
            ax.set_ylim(bottom=0)
            ax.set_ylabel("GB/s (logical bytes, median)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0], help="GB (1e9 bytes)")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="64 MB only (smoke test)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir in /tmp)")
    ap.add_argument("--out", default="bench_out/compare.json")
    ap.add_argument("--plot", default="bench_out/compare.png")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes = [0.064]
    worlds = sorted(set(args.worlds) | {1})  # the raw-storage line comes from the 1-process run
    machine = C.machine_info()
    cores = machine["cores_usable"]
    load_before = C.load_average()
    print(f"machine: {machine['cpu_model']}, {cores} cores, torch {machine['torch']}, "
          f"codec {machine['shardckpt_codec_path']}; load average {load_before}", flush=True)
    tmp = tempfile.TemporaryDirectory(prefix="shardckpt_compare_", dir=args.dir or "/tmp")
    drop = C.page_cache_dropper()
    summaries = []
    try:
        for size in args.sizes:
            raw_best: dict[str, float] = {}
            for world in worlds:
                doc = run_config(int(size * C.GB), world, args.reps, Path(tmp.name), drop)
                if world == 1:
                    logical = doc["logical_bytes"]
                    raw_best = {op: max(logical / min(r[op]) for n, r in doc["raw"].items()
                                        if n.startswith("raw") and r[op])
                                for op in ("save", "load")}
                s = summarize(doc, world, raw_best, cores)
                s["size_gb_requested"] = size
                print_table(s)
                summaries.append(s)
    finally:
        tmp.cleanup()
    doc = {"benchmark": "compare", "machine": machine,
           "settings": {"sizes_gb": args.sizes, "worlds": worlds, "reps": args.reps,
                        "quick": args.quick, "page_cache_dropped": drop,
                        "sharding": "per-rank distinct keys (parameter i on rank i % world)",
                        "ratios": "tool time / time of DCP's best thread count (by median)",
                        "bound": f"CPU if cpu time >= {CPU_BOUND} x wall x cores; storage if "
                                 f"bytes/s >= {STORAGE_BOUND} x best raw line; else latency"},
           "load_average": {"before": load_before, "after": C.load_average()},
           "results": summaries}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    if args.plot:
        plot(summaries, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
