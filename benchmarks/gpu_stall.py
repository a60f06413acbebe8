"""GPU stall benchmark: shardckpt's GPU path vs the pinned-copy floor and dcp.async_save.

One run measures, on ~8 GB of bf16 + fp32 state resident on the GPU:
  floor     a raw pinned device-to-host copy of the same bytes (and a pageable one)
  shardckpt async_save stall (until the snapshot is on the host), time until
            durable, and the storage write time of the same compressed bytes
  dcp-*     torch.distributed.checkpoint.async_save, THREAD and PROCESS modes,
            DefaultStager with pinned memory and async staging
  train     a small bf16-autocast transformer's step time, alone and while a
            background save of its model + optimizer runs
  memory    host RSS and pinned bytes across 20 consecutive saves

Targets: stall <= 1.25x the floor; durable <= storage write + 10 %; training
slowdown <= 5 %; no memory growth. It runs unattended on a machine it cannot
be debugged on: each part is a child process with its own timeout, results are
printed and written as soon as each part ends, and nothing waits forever.

    python benchmarks/gpu_stall.py [--gb 8] [--budget 330] [--out results/x.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback

import torch

MB = 1 << 20
TENSOR_BYTES = 256 * MB
# (part, timeout in s): the order is the order of importance.
PARTS = (("floor", 90), ("shardckpt", 150), ("dcp-thread", 120), ("train", 150),
         ("memory", 180), ("dcp-process", 120))


def make_state(gb: float) -> dict[str, torch.Tensor]:
    """A quarter of the bytes bf16 (weights), the rest fp32 (master weights, moments)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    total = int(gb * (1 << 30))
    state: dict[str, torch.Tensor] = {}
    i = 0
    while sum(t.numel() * t.element_size() for t in state.values()) < total:
        bf16 = i % 4 == 0
        n = TENSOR_BYTES // (2 if bf16 else 4)
        t = torch.randn(n, generator=g, device="cuda").mul_(0.02)
        state[f"t{i:03d}"] = t.to(torch.bfloat16) if bf16 else t
        i += 1
    torch.cuda.synchronize()
    return state


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def write_time(path: str, n: int) -> float:
    """Seconds to write and fsync `n` bytes to `path`'s filesystem, like a data file."""
    buf = os.urandom(16 * MB)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = n
        while left > 0:
            left -= os.write(fd, memoryview(buf)[:min(left, len(buf))])
        os.fsync(fd)
    finally:
        os.close(fd)
    dt = time.perf_counter() - t0
    os.unlink(path)
    return dt


_RESULT: str | None = None  # a child's result file, rewritten as figures come in


def flush(out: dict) -> None:
    """Write what a part has so far: a part killed by its time box still reports it."""
    if _RESULT is not None:
        with open(_RESULT + ".tmp", "w") as f:
            json.dump(out, f, indent=1, default=str)
        os.replace(_RESULT + ".tmp", _RESULT)


def rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- parts (each runs in its own child process)

def part_floor(args: argparse.Namespace, out: dict) -> None:
    state = make_state(args.gb)
    out["bytes"] = nbytes(state)
    t0 = time.perf_counter()
    host = [torch.empty(t.shape, dtype=t.dtype).pin_memory() for t in state.values()]
    out["pin_alloc_s"] = time.perf_counter() - t0
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for h, t in zip(host, state.values()):
            h.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out["floor_s"] = min(times)
    out["floor_gbps"] = out["bytes"] / out["floor_s"] / 1e9
    del host
    page = [torch.empty(t.shape, dtype=t.dtype) for t in state.values()]
    for h, t in zip(page, state.values()):  # first touch outside the timing
        h.copy_(t)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for h, t in zip(page, state.values()):
        h.copy_(t)
    torch.cuda.synchronize()
    out["pageable_s"] = time.perf_counter() - t0


def part_shardckpt(args: argparse.Namespace, out: dict) -> None:
    import shardckpt
    from shardckpt.gpu import staging

    out["gpu_path"] = staging.unavailable_reason() or "shardckpt._cuda"
    state = make_state(args.gb)
    out["bytes"] = nbytes(state)
    runs = []
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = shardckpt.async_save(state, os.path.join(args.dir, f"s{i % 2}"))
        stall = time.perf_counter() - t0
        first = next(iter(state.values()))
        first.add_(1)  # training goes on in place at once
        h.wait(timeout=120)
        runs.append({"stall_s": stall, "durable_s": time.perf_counter() - t0,
                     "bytes_written": du(os.path.join(args.dir, f"s{i % 2}"))})
        out["runs"] = runs
        flush(out)
        print(f"  shardckpt save {i}: {runs[-1]}", flush=True)
    steady = runs[1:] or runs
    out["stall_first_s"] = runs[0]["stall_s"]
    out["stall_s"] = min(r["stall_s"] for r in steady)
    out["durable_s"] = min(r["durable_s"] for r in steady)
    out["bytes_written"] = steady[-1]["bytes_written"]
    out["storage_write_s"] = write_time(os.path.join(args.dir, "probe.bin"), out["bytes_written"])
    out["staging"] = staging.stats()


def _init_pg() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                      LOCAL_RANK="0")
    dist.init_process_group("gloo", rank=0, world_size=1)


def _dcp(args: argparse.Namespace, out: dict, mode_name: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict_saver import (
        AsyncCheckpointerType,
        AsyncSaveResponse,
    )

    _init_pg()
    mode = AsyncCheckpointerType.PROCESS if mode_name == "process" else AsyncCheckpointerType.THREAD
    state = make_state(args.gb)
    out["bytes"] = nbytes(state)
    opts = StagingOptions(use_pinned_memory=True, use_shared_memory=mode_name == "process",
                          use_async_staging=True, use_non_blocking_copy=True)
    out["options"] = str(opts)
    stager = DefaultStager(opts)
    runs = []
    try:
        for i in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            resp = dcp.async_save(state, checkpoint_id=os.path.join(args.dir, f"d{i}"),
                                  async_checkpointer_type=mode, async_stager=stager)
            returned = time.perf_counter() - t0
            if isinstance(resp, AsyncSaveResponse):
                resp.staging_completion.result(timeout=120)
                stall = time.perf_counter() - t0
                done = resp.upload_completion
            else:
                stall, done = returned, resp
            next(iter(state.values())).add_(1)
            done.result(timeout=120)
            runs.append({"returned_s": returned, "stall_s": stall,
                         "durable_s": time.perf_counter() - t0})
            out["runs"] = runs
            flush(out)
            print(f"  dcp {mode_name} save {i}: {runs[-1]}", flush=True)
    finally:
        stager.close()
    steady = runs[1:] or runs
    out["stall_first_s"] = runs[0]["stall_s"]
    out["stall_s"] = min(r["stall_s"] for r in steady)
    out["durable_s"] = min(r["durable_s"] for r in steady)


def part_dcp_thread(args: argparse.Namespace, out: dict) -> None:
    _dcp(args, out, "thread")


def part_dcp_process(args: argparse.Namespace, out: dict) -> None:
    _dcp(args, out, "process")


def part_train(args: argparse.Namespace, out: dict) -> None:
    import torch.nn as nn

    import shardckpt

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=1024, nhead=16, dim_feedforward=4096,
                                       batch_first=True)
    model = nn.TransformerEncoder(layer, num_layers=12).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(16, 512, 1024, device="cuda")

    def step() -> float:
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(10):
        step()
    params = list(model.parameters())

    def state() -> dict:
        st = {f"p{i}.{k}": v for i, p in enumerate(params) for k, v in opt.state[p].items()}
        return {"model": model.state_dict(), "optim": st}

    out["state_bytes"] = sum(t.numel() * t.element_size() for d in state().values()
                             for t in d.values() if torch.is_tensor(t))
    # Warm the staging pool once: its one-time pinned allocation is not a per-save cost.
    shardckpt.async_save(state(), os.path.join(args.dir, "warm")).wait(timeout=120)
    base = [step() for _ in range(40)]
    during, deadline = [], time.monotonic() + 60
    t0 = time.perf_counter()
    h = shardckpt.async_save(state(), os.path.join(args.dir, "t"))
    out["stall_s"] = time.perf_counter() - t0
    while (not h.done() or len(during) < 10) and time.monotonic() < deadline:
        during.append(step())
    h.wait(timeout=120)
    out["save_s"] = time.perf_counter() - t0
    after = [step() for _ in range(20)]
    b = sorted(base)[len(base) // 2]
    out.update(base_step_s=b, during_step_s=sum(during) / len(during), steps_during=len(during),
               after_step_s=sorted(after)[len(after) // 2])
    out["slowdown_pct"] = 100 * (out["during_step_s"] / b - 1)
    # The stall spread over the steps of the save window, as a trainer sees it.
    out["slowdown_with_stall_pct"] = 100 * ((sum(during) + out["stall_s"]) / len(during) / b - 1)


def part_memory(args: argparse.Namespace, out: dict) -> None:
    import shardckpt
    from shardckpt.gpu import staging

    state = make_state(args.gb)
    out["bytes"] = nbytes(state)
    samples = []
    deadline = time.monotonic() + args.memory_s
    for i in range(20):
        if time.monotonic() > deadline:
            out["stopped_early"] = f"time box of {args.memory_s}s reached after {i} saves"
            break
        shardckpt.async_save(state, os.path.join(args.dir, f"m{i % 2}")).wait(timeout=120)
        st = staging.stats()
        samples.append({"rss": rss(), "pinned": st["pinned_bytes"],
                        "pinned_allocations": st["pinned_allocations"]})
        out["samples"] = samples
        flush(out)
    first, last = samples[0], samples[-1]
    out["saves"] = len(samples)
    out["rss_growth"] = last["rss"] - first["rss"]
    out["pinned_growth"] = last["pinned"] - first["pinned"]
    out["pinned_allocations"] = last["pinned_allocations"]


# -- the orchestrator

def run_part(name: str, timeout: float, args: argparse.Namespace) -> dict:
    res_file = tempfile.mktemp(prefix=f"gpu_stall-{name}-", suffix=".json")
    work = tempfile.mkdtemp(prefix=f"gpu_stall-{name}-", dir=args.dir)
    # The memory part stops itself well inside its time box, with what it measured.
    memory_s = max(10.0, min(args.memory_s, timeout - 45))
    cmd = [sys.executable, os.path.abspath(__file__), "--part", name, "--result", res_file,
           "--gb", str(args.gb), "--dir", work, "--memory-s", str(memory_s)]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True)
        tail = (p.stdout + p.stderr)[-3000:]
        status = "ok" if p.returncode == 0 else f"exit {p.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout or b""
        tail = (out.decode() if isinstance(out, bytes) else out)[-3000:]
        status = f"timed out after {timeout}s"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res: dict = {}
    if os.path.exists(res_file):
        with open(res_file) as f:
            res = json.load(f)
        os.unlink(res_file)
    if status != "ok" and res:
        res["partial"] = True
    if status != "ok" or "error" in res:
        res["log_tail"] = tail
    res["status"] = res.get("status", status) if status == "ok" else status
    res["wall_s"] = time.perf_counter() - t0
    return res


def _f(v: object, unit: str = "s") -> str:
    return f"{v:.3f} {unit}" if isinstance(v, int | float) else "-"


def table(r: dict) -> str:
    fl = r.get("floor", {})
    sc = r.get("shardckpt", {})
    floor = fl.get("floor_s")
    rows = [("part", "figure", "target", "met")]

    def ratio(a: object, b: object) -> float | None:
        return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None

    def met(x: float | None, limit: float) -> str:
        return "-" if x is None else ("yes" if x <= limit else "NO")

    rows.append(("pinned D2H floor", f"{_f(floor)} ({fl.get('floor_gbps', 0):.1f} GB/s); "
                 f"pageable {_f(fl.get('pageable_s'))}; pinning {_f(fl.get('pin_alloc_s'))}",
                 "", ""))
    s = ratio(sc.get("stall_s"), floor)
    rows.append(("shardckpt stall", f"{_f(sc.get('stall_s'))} = {s or 0:.2f}x floor "
                 f"(first save {_f(sc.get('stall_first_s'))})", "<= 1.25x", met(s, 1.25)))
    d = ratio(sc.get("durable_s"), sc.get("storage_write_s"))
    rows.append(("shardckpt durable", f"{_f(sc.get('durable_s'))} vs write "
                 f"{_f(sc.get('storage_write_s'))} of {sc.get('bytes_written', 0) / 1e9:.2f} GB "
                 f"= {d or 0:.2f}x", "<= 1.10x", met(d, 1.10)))
    for k in ("dcp-thread", "dcp-process"):
        x = r.get(k, {})
        rows.append((k, f"stall {_f(x.get('stall_s'))} (first {_f(x.get('stall_first_s'))}), "
                     f"durable {_f(x.get('durable_s'))}" if "stall_s" in x else x.get("status", "-"),
                     "", ""))
    tr = r.get("train", {})
    sd = tr.get("slowdown_pct")
    rows.append(("training slowdown", f"{sd:.1f} % ({tr.get('steps_during')} steps during a "
                 f"{_f(tr.get('save_s'))} save; with stall {tr.get('slowdown_with_stall_pct', 0):.1f}"
                 " %)" if sd is not None else tr.get("status", "-"), "<= 5 %",
                 met(sd, 5.0)))
    m = r.get("memory", {})
    if "saves" in m:
        rows.append(("memory, 20 saves", f"{m['saves']} saves: RSS +{m['rss_growth'] / MB:.0f} MiB, "
                     f"pinned +{m['pinned_growth'] / MB:.0f} MiB, "
                     f"{m['pinned_allocations']} pinned allocations", "no growth",
                     "yes" if m["pinned_growth"] == 0 and m["rss_growth"] < 256 * MB else "NO"))
    else:
        rows.append(("memory, 20 saves", m.get("status", "-"), "no growth", "-"))
    for k in ("floor", "shardckpt", "dcp-thread", "dcp-process", "train", "memory"):
        if r.get(k, {}).get("status", "ok") != "ok":
            rows.append((k, f"status: {r[k]['status']}", "", ""))
    w = [max(len(str(row[i])) for row in rows) for i in range(4)]
    return "\n".join("  ".join(str(c).ljust(w[i]) for i, c in enumerate(row)) for row in rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0)
    ap.add_argument("--budget", type=float, default=330, help="seconds for all parts together")
    ap.add_argument("--parts", default=",".join(p for p, _ in PARTS))
    ap.add_argument("--memory-s", type=float, default=150)
    ap.add_argument("--dir", default=os.environ.get("SHARDCKPT_BENCH_DIR", tempfile.gettempdir()))
    ap.add_argument("--out", default=None)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.part:  # a child: one part, its result in --result whatever happens
        global _RESULT
        _RESULT = args.result
        out: dict = {"part": args.part}
        try:
            globals()["part_" + args.part.replace("-", "_")](args, out)
            out["status"] = "ok"
        except BaseException as e:  # noqa: BLE001 - reported to the orchestrator
            out["status"] = f"error: {type(e).__name__}: {e}"
            out["error"] = traceback.format_exc()[-3000:]
        with open(args.result, "w") as f:
            json.dump(out, f, indent=1, default=str)
        return 0

    if not torch.cuda.is_available():
        print("gpu_stall: torch sees no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    out_path = args.out or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results",
        f"gpu_stall-{socket.gethostname()}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    results: dict = {"gb": args.gb, "device": torch.cuda.get_device_name(0),
                     "torch": torch.__version__, "cuda": torch.version.cuda,
                     "cpus": os.cpu_count()}
    wanted = set(args.parts.split(","))
    start = time.monotonic()
    for name, timeout in PARTS:
        if name not in wanted:
            continue
        left = args.budget - (time.monotonic() - start)
        if left < 20:
            results[name] = {"status": f"skipped: {left:.0f}s of the budget left"}
            continue
        print(f"gpu_stall: {name} (time box {min(timeout, left):.0f}s) ...", flush=True)
        results[name] = run_part(name, min(timeout, left), args)
        print(f"gpu_stall: {name}: {results[name].get('status')} in "
              f"{results[name]['wall_s']:.1f}s", flush=True)
        if "log_tail" in results[name]:
            print(results[name]["log_tail"][-1500:], flush=True)
        with open(out_path, "w") as f:  # partial results survive a later hang or kill
            json.dump(results, f, indent=1, default=str)
    print(table(results))
    print(f"gpu_stall: results in {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
