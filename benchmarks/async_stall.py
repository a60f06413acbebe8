"""Training-loop stall of async checkpointing: shardckpt.async_save against dcp.async_save.

For each tool, on the same state in one run: time from the call until control
returns (the stall) and until the checkpoint is durable, first save and steady
state separately; the raw copy of the state into a preallocated host buffer is
the floor. Also: how much slower training steps run while a background save is
in flight. Prints a table and writes JSON.

    python benchmarks/async_stall.py --size-gb 1 --out bench_out/async_stall.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import shardckpt  # noqa: E402
from shardckpt import codec  # noqa: E402
from shardckpt.async_save import staging_stats  # noqa: E402


def make_state(size_gb: float, device: str) -> dict[str, torch.Tensor]:
    """Transformer-like fp32 weights and Adam moments, about size_gb in total."""
    g = torch.Generator().manual_seed(0)
    n_layers = 8
    per = int(size_gb * (1 << 30) / 4 / 3 / n_layers)
    state = {}
    for i in range(n_layers):
        w = torch.randn(per, generator=g) * 0.02
        state[f"layers.{i}.weight"] = w.to(device)
        state[f"layers.{i}.exp_avg"] = (torch.randn(per, generator=g) * 1e-3).to(device)
        state[f"layers.{i}.exp_avg_sq"] = (torch.randn(per, generator=g) * 1e-3).square().to(device)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def raw_copy_floor(state: dict[str, torch.Tensor], repeats: int) -> float:
    pin = torch.cuda.is_available()
    bufs = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in state.items()}
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for k, v in state.items():
            bufs[k].copy_(v, non_blocking=pin)
        if pin:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def _touch(state: dict[str, torch.Tensor]) -> None:
    # A training step happens between saves: the data changes.
    for v in state.values():
        v.add_(1e-6)


def run_tool(name: str, save_fn: Any, state: dict, root: str, saves: int) -> dict:
    stalls, totals = [], []
    for i in range(saves):
        path = os.path.join(root, f"{name}-{i}")
        os.sync()
        t0 = time.perf_counter()
        waiter = save_fn(state, path)
        stalls.append(time.perf_counter() - t0)
        _touch(state)
        waiter()
        totals.append(time.perf_counter() - t0)
        shutil.rmtree(path, ignore_errors=True)
    steady = stalls[1:] or stalls
    return {"tool": name, "stall_first_s": stalls[0], "stall_steady_s": statistics.median(steady),
            "total_first_s": totals[0], "total_steady_s": statistics.median(totals[1:] or totals),
            "stalls": stalls, "totals": totals}


def shardckpt_async(state: dict, path: str) -> Any:
    h = shardckpt.async_save(state, path)
    return h.wait


def shardckpt_sync(state: dict, path: str) -> Any:
    shardckpt.save(state, path)
    return lambda: None


def dcp_async(kind: str, pinned: bool) -> Any:
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    def fn(state: dict, path: str) -> Any:
        kwargs: dict[str, Any] = {}
        if kind == "process":
            kwargs["async_checkpointer_type"] = AsyncCheckpointerType.PROCESS
        if pinned:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            kwargs["async_stager"] = DefaultStager(StagingOptions(True, False, False, True))
        fut = dcp.async_save(state, checkpoint_id=path, **kwargs)
        stage = getattr(fut, "staging_completion", None)
        if stage is not None:  # newer DCP returns staging and upload futures separately
            stage.result()
            return fut.upload_completion.result
        return fut.result

    return fn


def step_slowdown(state: dict, root: str, steps: int, rounds: int = 3) -> dict:
    """Training-like CPU steps alone and while an async save runs, interleaved.

    Each round times `steps` steps alone, then steps until a background save
    finishes; alternating keeps slow drifts of a shared machine out of the ratio.
    """
    a = torch.randn(768, 768)

    def step() -> float:
        t0 = time.perf_counter()
        for _ in range(8):
            a.copy_(torch.tanh(a @ a * 1e-3))
        return time.perf_counter() - t0

    for _ in range(3):
        step()
    alone_all, during_all, ratios = [], [], []
    for r in range(rounds):
        alone = [step() for _ in range(steps)]
        path = os.path.join(root, f"slowdown{r}")
        h = shardckpt.async_save(state, path)
        during = []
        while not h.done():
            during.append(step())
        h.wait()
        shutil.rmtree(path, ignore_errors=True)
        if during:
            ratios.append(statistics.median(during) / statistics.median(alone))
        alone_all += alone
        during_all += during
    ratio = statistics.median(ratios) if ratios else 1.0
    return {"step_alone_s": statistics.median(alone_all),
            "step_during_save_s": statistics.median(during_all or alone_all),
            "steps_during_save": len(during_all), "rounds": rounds,
            "ratios": ratios, "slowdown_pct": 100.0 * (ratio - 1.0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--saves", type=int, default=3, help="saves per tool (first + steady)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default="bench_out/async_stall.json")
    ap.add_argument("--skip-process", action="store_true", help="skip DCP's process executor")
    args = ap.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    root = tempfile.mkdtemp(prefix="shardckpt-async-", dir=args.dir)
    state = make_state(args.size_gb, device)
    size = nbytes(state)
    floor = raw_copy_floor(state, 3)
    tools: list[tuple[str, Any]] = [
        ("shardckpt.async_save", shardckpt_async),
        ("shardckpt.save (sync)", shardckpt_sync),
        ("dcp.async_save thread", dcp_async("thread", False)),
    ]
    if torch.cuda.is_available():
        tools.append(("dcp.async_save thread+pinned", dcp_async("thread", True)))
    if not args.skip_process:
        tools.append(("dcp.async_save process", dcp_async("process", False)))
    rows = []
    for name, fn in tools:
        try:
            rows.append(run_tool(name.replace(" ", "_"), fn, state, root, args.saves))
            rows[-1]["tool"] = name
        except Exception as e:  # a tool missing in this torch is reported, not fatal
            rows.append({"tool": name, "error": f"{type(e).__name__}: {e}"})
        print(f"  done: {name}", file=sys.stderr, flush=True)
    slow = step_slowdown(state, root, 15)
    pool = staging_stats()
    shutil.rmtree(root, ignore_errors=True)

    print(f"\nstate: {size / 1e9:.2f} GB on {device}; codec path: {codec.active_path()}; "
          f"raw copy into host buffer (floor): {floor:.3f} s")
    hdr = f"{'tool':32s} {'stall 1st':>10s} {'stall steady':>13s} {'x floor':>8s} " \
          f"{'durable 1st':>12s} {'durable steady':>15s}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['tool']:32s} {r['error']}")
            continue
        print(f"{r['tool']:32s} {r['stall_first_s']:10.3f} {r['stall_steady_s']:13.3f} "
              f"{r['stall_steady_s'] / floor:8.2f} {r['total_first_s']:12.3f} "
              f"{r['total_steady_s']:15.3f}")
    ours = next(r for r in rows if r["tool"] == "shardckpt.async_save")
    for r in rows:
        if "error" not in r and r is not ours:
            print(f"  {r['tool']} stall / shardckpt.async_save stall = "
                  f"{r['stall_steady_s'] / ours['stall_steady_s']:.1f}x")
    print(f"training step alone {slow['step_alone_s'] * 1e3:.1f} ms, during a background save "
          f"{slow['step_during_save_s'] * 1e3:.1f} ms (median of {slow['rounds']} interleaved "
          f"rounds: {slow['slowdown_pct']:+.1f} %)")
    print(f"staging pool: {pool['bytes'] / 1e9:.2f} GB held, allocated {pool['allocations']} "
          f"time(s) over all saves")
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "device": device},
           "codec_path": codec.active_path(), "state_bytes": size, "raw_copy_floor_s": floor,
           "tools": rows, "step_slowdown": slow, "staging_pool": pool}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
