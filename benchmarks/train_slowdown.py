"""How much slower training steps run while shardckpt.async_save works in the background.

A small MLP trains on CPU (forward, backward, Adam). Each repetition times a
window of steps with no save, then for each --writer (SHARDCKPT_ASYNC_WRITER: the
writer process, or a thread of this process) a window in which background saves
of a separate ~--size-gb training state run back to back (a new `async_save` as
soon as the previous one is durable). The ratio of the median step times is the
slowdown; windows alternate so drifts of a shared machine hit both alike.

Each window also records, per step, where the training threads' time went
(from /proc/thread-self/schedstat and /proc/<pid>/task/*/schedstat): CPU time
on the main thread, time the training threads waited on the run queue (CPU
contention), and the rest (blocked: the GIL, I/O, locks); and the CPU time the
background threads used. That attributes a slowdown to its cause.

    python benchmarks/train_slowdown.py --torch-threads 1 2 --size-gb 0.5 --reps 5
    python benchmarks/train_slowdown.py --writer thread   # the save's writing in a thread only
    python benchmarks/train_slowdown.py --background python-spin   # control: a GIL hog
    python benchmarks/train_slowdown.py --background write-only    # control: storage only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import shardckpt  # noqa: E402


def _schedstat(tid: int) -> tuple[int, int]:
    """(ns on CPU, ns waiting on a run queue) of one thread; zeros if it is gone."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as f:
            run, wait, _ = f.read().split()
        return int(run), int(wait)
    except (OSError, ValueError):
        return 0, 0


def _tids() -> list[int]:
    return [int(t) for t in os.listdir("/proc/self/task")]


def _dirty_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Dirty:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Trainer:
    """An MLP with Adam; one `step()` is one training step, timed and attributed."""

    def __init__(self, width: int, depth: int, batch: int) -> None:
        g = torch.Generator().manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(depth):
            layers += [torch.nn.Linear(width, width), torch.nn.GELU()]
        self.model = torch.nn.Sequential(*layers)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, width, generator=g)
        self.y = torch.randn(batch, width, generator=g)
        self.training_tids: set[int] = set()

    def step(self) -> dict[str, float]:
        before = {t: _schedstat(t) for t in self.training_tids}
        c0, t0 = time.thread_time(), time.perf_counter()
        loss = torch.nn.functional.mse_loss(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        wall = time.perf_counter() - t0
        cpu = time.thread_time() - c0
        runq = sum(_schedstat(t)[1] - w for t, (_, w) in before.items()) / 1e9
        return {"wall": wall, "main_cpu": cpu, "runq_wait": runq}


class Background:
    """Back-to-back background work of one kind, started and polled from the training loop."""

    def __init__(self, kind: str, state: dict, root: Path, compression: str) -> None:
        self.kind, self.state, self.root, self.compression = kind, state, root, compression
        self.handle: Any = None
        self.n = 0
        self.stalls: list[float] = []
        self.durations: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self.n += 1
        path = self.root / f"bg{self.n % 2}"
        C.remove(path)
        self._t0 = time.perf_counter()
        if self.kind == "shardckpt":
            self.handle = shardckpt.async_save(self.state, path, compression=self.compression)
        else:
            self._stop.clear()
            target = _python_spin if self.kind == "python-spin" else _write_only
            self._thread = threading.Thread(target=target, args=(self._stop, path, self.state),
                                            daemon=True)
            self._thread.start()
        self.stalls.append(time.perf_counter() - self._t0)

    def done(self) -> bool:
        if self.kind == "shardckpt":
            return self.handle.done()
        return not self._thread.is_alive()

    def finish(self) -> None:
        if self.kind == "shardckpt":
            self.handle.wait()
        else:
            self._stop.set()
            self._thread.join()
        self.durations.append(time.perf_counter() - self._t0)


def _python_spin(stop: threading.Event, path: Path, state: dict) -> None:
    # Control: pure-Python work that holds the GIL for its switch interval, ~3 s.
    end = time.perf_counter() + 3.0
    x = 0
    while time.perf_counter() < end and not stop.is_set():
        for i in range(10000):
            x += i * i


def _write_only(stop: threading.Event, path: Path, state: dict) -> None:
    # Control: the save's storage traffic without its CPU work (same byte count,
    # written from the staged tensors, fdatasync every 64 MiB like the data writer).
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "raw.bin", "wb", buffering=0) as f:
        since = 0
        for _, t in C.iter_tensors(state):
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            since += t.numel() * t.element_size()
            if since >= 64 << 20:
                os.fdatasync(f.fileno())
                since = 0
        os.fsync(f.fileno())


def _helper_cpu_s() -> float:
    """CPU seconds the async writer process (io/writer_process.py) has used so far."""
    from shardckpt.io import writer_process

    h = writer_process._helper
    if h is None or not h.alive():
        return 0.0
    total = 0
    try:
        for t in os.listdir(f"/proc/{h.proc.pid}/task"):
            with open(f"/proc/{h.proc.pid}/task/{t}/schedstat") as f:
                total += int(f.read().split()[0])
    except (OSError, ValueError):
        pass
    return total / 1e9


def _window(trainer: Trainer, bg: Background | None, steps: int, saves: int) -> dict:
    rows: list[dict[str, float]] = []
    dirty: list[float] = []
    # Background CPU = the process's CPU time (threads that ended meanwhile included: an
    # async save's threads live for one save) less the training threads', plus the helper's.
    proc0 = time.process_time()
    train0 = sum(_schedstat(t)[0] for t in trainer.training_tids)
    helper0 = _helper_cpu_s()
    wall0 = time.perf_counter()
    if bg is None:
        for _ in range(steps):
            rows.append(trainer.step())
    else:
        started = 0
        bg.start()
        started = 1
        while True:
            rows.append(trainer.step())
            dirty.append(_dirty_mb())
            if bg.done():
                bg.finish()
                if started >= saves:
                    break
                bg.start()
                started += 1
    wall = time.perf_counter() - wall0
    train_cpu = (sum(_schedstat(t)[0] for t in trainer.training_tids) - train0) / 1e9
    bg_cpu = max(0.0, time.process_time() - proc0 - train_cpu)
    bg_cpu += max(0.0, _helper_cpu_s() - helper0)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"steps": len(rows), "wall_s": wall, "step_s": med["wall"],
            "main_cpu_s": med["main_cpu"], "runq_wait_s": med["runq_wait"],
            "blocked_s": max(0.0, med["wall"] - med["main_cpu"] - med["runq_wait"]),
            # cores' worth used by other threads and by the writer process
            "background_cpu_share": bg_cpu / wall,
            "dirty_mb_max": max(dirty) if dirty else None,
            "all_step_s": [round(r["wall"], 5) for r in rows]}


def run_loop(torch_threads: int, args: argparse.Namespace, state: dict, root: Path) -> dict:
    torch.set_num_threads(torch_threads)
    trainer = Trainer(args.width, args.depth, args.batch)
    for _ in range(5):
        trainer.step()
    # Threads alive now (main + intra-op pool) are the training's; anything
    # started later belongs to the background work.
    trainer.training_tids = set(_tids()) - _background_tids
    bg = Background(args.background, state, root, args.compression)
    if args.background == "shardckpt":  # first save allocates the staging arena: not measured
        bg.start()
        bg.finish()
        _background_tids.update(set(_tids()) - trainer.training_tids)
        trainer.training_tids -= _background_tids
    writers = args.writer if args.background == "shardckpt" else [None]
    reps: dict[Any, list[dict]] = {w: [] for w in writers}
    stalls: dict[Any, list[float]] = {w: [] for w in writers}
    durations: dict[Any, list[float]] = {w: [] for w in writers}
    for r in range(args.reps):
        alone = _window(trainer, None, args.steps, 0)
        # Each writer once per repetition, their order alternating, against the same alone window.
        for w in (writers if r % 2 == 0 else writers[::-1]):
            if w is not None:
                os.environ["SHARDCKPT_ASYNC_WRITER"] = w
            n_stall, n_dur = len(bg.stalls), len(bg.durations)
            during = _window(trainer, bg, args.steps, args.saves)
            stalls[w] += bg.stalls[n_stall:]
            durations[w] += bg.durations[n_dur:]
            ratio = during["step_s"] / alone["step_s"]
            reps[w].append({"alone": alone, "during": during, "ratio": ratio})
            print(f"  threads={torch_threads} writer={w or args.background} rep {r + 1}/"
                  f"{args.reps}: step alone {alone['step_s'] * 1e3:6.1f} ms, during saves "
                  f"{during['step_s'] * 1e3:6.1f} ms ({100 * (ratio - 1):+5.1f} %); during: runq "
                  f"{during['runq_wait_s'] * 1e3:.1f} ms, blocked {during['blocked_s'] * 1e3:.1f}"
                  f" ms, main cpu {during['main_cpu_s'] * 1e3:.1f} ms (alone "
                  f"{alone['main_cpu_s'] * 1e3:.1f}), bg {during['background_cpu_share']:.2f} "
                  f"cores, {during['steps']} steps", flush=True)
    keys = ("step_s", "main_cpu_s", "runq_wait_s", "blocked_s", "background_cpu_share")
    out = {}
    for w in writers:
        ratios = [x["ratio"] for x in reps[w]]
        out[w or args.background] = {
            "slowdown_pct_median": 100 * (statistics.median(ratios) - 1),
            "slowdown_pct_all": [round(100 * (x - 1), 2) for x in ratios],
            "alone": {k: statistics.median(x["alone"][k] for x in reps[w]) for k in keys},
            "during": {k: statistics.median(x["during"][k] for x in reps[w]) for k in keys},
            "save_stall_s": C.summarize(stalls[w]),
            "save_duration_s": C.summarize(durations[w]),
            "reps": reps[w],
        }
    return {"torch_threads": torch_threads, "writers": out}


_background_tids: set[int] = set()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torch-threads", type=int, nargs="+", default=[1, 2],
                    help="training loops to measure: torch.set_num_threads values")
    ap.add_argument("--size-gb", type=float, default=0.5, help="state saved in the background")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="steps per no-save window")
    ap.add_argument("--saves", type=int, default=2, help="back-to-back saves per save window")
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compression", default="zstd", choices=["zstd", "none"])
    ap.add_argument("--writer", nargs="+", default=["process", "thread"],
                    choices=["process", "thread", "auto"],
                    help="SHARDCKPT_ASYNC_WRITER values, each measured in every repetition")
    ap.add_argument("--background", default="shardckpt",
                    choices=["shardckpt", "python-spin", "write-only"])
    ap.add_argument("--switch-interval", type=float, default=None,
                    help="sys.setswitchinterval for the whole run (diagnosis of GIL waits)")
    ap.add_argument("--dir", default=None, help="where the background saves go (temp dir)")
    ap.add_argument("--out", default="bench_out/train_slowdown.json")
    args = ap.parse_args(argv)

    _background_tids.clear()
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    state, label = C.build_state(int(args.size_gb * C.GB))
    print(f"background state: {label}; background: {args.background}; worker nice "
          f"{os.environ.get('SHARDCKPT_WORKER_NICE', 'default')}; load average "
          f"{C.load_average()}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="shardckpt_slowdown_", dir=args.dir))
    load_before = C.load_average()
    try:
        loops = [run_loop(n, args, state, root) for n in args.torch_threads]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for lp in loops:
        for w, x in lp["writers"].items():
            a, d = x["alone"], x["during"]
            print(f"torch threads {lp['torch_threads']}, writer {w}: step {a['step_s'] * 1e3:.1f}"
                  f" ms alone, {d['step_s'] * 1e3:.1f} ms during saves: median slowdown "
                  f"{x['slowdown_pct_median']:+.1f} % (reps {x['slowdown_pct_all']}); save "
                  f"{x['save_duration_s']['median']:.2f} s, stall "
                  f"{x['save_stall_s']['median'] * 1e3:.0f} ms, background "
                  f"{d['background_cpu_share']:.2f} cores")
    doc = {"benchmark": "train_slowdown", "machine": C.machine_info(),
           "settings": {k: v for k, v in vars(args).items() if k != "out"},
           "worker_nice": os.environ.get("SHARDCKPT_WORKER_NICE"),
           "state": {"label": label, "logical_bytes": C.state_nbytes(state)},
           "load_average": {"before": load_before, "after": C.load_average()},
           "loops": loops}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
