"""The block codec: byte-grouping + zstd + crc32, native (csrc/) or pure Python.

Both paths produce byte-identical blocks for the same input and settings (they
use the same zstd release, 1.5.7, with the same parameters), so either reads what
the other wrote. The pure-Python path is always available; the native one is
used when the extension was built.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import zstandard

from . import format as fmt
from .errors import CorruptCheckpointError

log = logging.getLogger("shardckpt")

try:  # the accelerator is optional by design
    from . import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _native = None

_warned = False


def native_available() -> bool:
    return _native is not None


def active_path() -> str:
    """'native' or 'python': which codec implementation runs."""
    if os.environ.get("SHARDCKPT_CODEC", "").lower() == "python":
        return "python"
    return "native" if _native is not None else "python"


def _warn_python_once() -> None:
    global _warned
    if not _warned and _native is None:
        _warned = True
        warnings.warn("shardckpt: native codec extension not built; using the pure-Python codec "
                      "(same format, slower).", stacklevel=3)


def _usable_cpus() -> int:
    """CPUs this process may use, shared with the other ranks torchrun put on this node."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1 and n >= os.cpu_count():
        # Affinity not set per rank: every rank sees all CPUs; split them.
        n //= local
    return max(1, n)


def default_threads() -> int:
    """Codec threads for work beside a running training loop (async save, loads).

    Half the CPUs this process may use, at least 1, at most 8, so the training
    loop and data loader workers keep theirs. SHARDCKPT_THREADS overrides.
    """
    env = os.environ.get("SHARDCKPT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, _usable_cpus() // 2 or 1))


def blocking_threads() -> int:
    """Codec threads for a blocking save: the training loop waits, so use every CPU."""
    env = os.environ.get("SHARDCKPT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(16, _usable_cpus()))


@dataclass(frozen=True)
class CodecConfig:
    compression: str = "zstd"  # "zstd" or "none"
    level: int = 1
    block_size: int = fmt.DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.compression not in ("zstd", "none"):
            raise ValueError(f"compression must be 'zstd' or 'none', not {self.compression!r}")
        if self.block_size <= 0 or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, not {self.block_size}")

    def to_json(self) -> dict:
        return {"compression": self.compression, "level": self.level,
                "block_size": self.block_size, "checksum": "crc32"}


# ---------------------------------------------------------------- pure Python

_tls = threading.local()


def _cctx(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_tls, "cctx", None)
    if cache is None:
        cache = _tls.cctx = {}
    c = cache.get(level)
    if c is None:
        c = cache[level] = zstandard.ZstdCompressor(level=level)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d = getattr(_tls, "dctx", None)
    if d is None:
        d = _tls.dctx = zstandard.ZstdDecompressor()
    return d


def _encode_plane(plane: memoryview, level: int) -> tuple[bytes | memoryview, str]:
    n = len(plane)
    c = _cctx(level)
    if n >= 2 * fmt.SAMPLE_SIZE:
        s = c.compress(plane[: fmt.SAMPLE_SIZE])
        if len(s) * 20 > fmt.SAMPLE_SIZE * 19:
            return plane, fmt.MODE_RAW
    z = c.compress(plane)
    if len(z) >= n:
        return plane, fmt.MODE_RAW
    return z, fmt.MODE_ZSTD


def py_encode_block(raw: memoryview, group: int, cfg: CodecConfig) -> tuple[bytes, list]:
    """Encode one block; returns (stored bytes, block record)."""
    n = len(raw)
    if cfg.compression == "none" or n == 0:
        stored = bytes(raw)
        return stored, [n, n, zlib.crc32(stored), fmt.MODE_RAW]
    if group == 1:
        data, mode = _encode_plane(raw, cfg.level)
        stored = bytes(data)
        return stored, [len(stored), n, zlib.crc32(stored), mode]
    arr = np.frombuffer(raw, dtype=np.uint8).reshape(-1, group)
    parts = []
    kinds = []
    lens = []
    for k in range(group):
        plane = np.ascontiguousarray(arr[:, group - 1 - k])
        data, mode = _encode_plane(memoryview(plane).cast("B"), cfg.level)
        parts.append(data)
        kinds.append(mode)
        lens.append(len(data))
    stored = b"".join(parts)
    return stored, [len(stored), n, zlib.crc32(stored), fmt.MODE_GROUPED, "".join(kinds), lens]


def py_decode_block(stored: memoryview, rec: list, out: memoryview) -> None:
    """Decode one block (already checksum-verified) into `out` (len == raw_len)."""
    n = rec[1]
    mode = rec[3]
    if mode == fmt.MODE_RAW:
        out[:] = stored
    elif mode == fmt.MODE_ZSTD:
        out[:] = _dctx().decompress(stored, max_output_size=n)
    elif mode == fmt.MODE_GROUPED:
        kinds, lens = rec[4], rec[5]
        group = len(kinds)
        dst = np.frombuffer(out, dtype=np.uint8).reshape(-1, group)
        off = 0
        for k in range(group):
            seg = stored[off:off + lens[k]]
            off += lens[k]
            if kinds[k] == fmt.MODE_ZSTD:
                plane = _dctx().decompress(seg, max_output_size=n // group)
            else:
                plane = seg
            dst[:, group - 1 - k] = np.frombuffer(plane, dtype=np.uint8)
    else:
        raise ValueError(f"unknown block mode {mode!r}")


# ---------------------------------------------------------------- dispatch


def encode_block(raw: memoryview, group: int, cfg: CodecConfig) -> tuple[bytes, list]:
    if active_path() == "native":
        return _native.encode_block(raw, group, cfg.compression == "zstd", cfg.level,
                                    fmt.SAMPLE_SIZE)
    _warn_python_once()
    return py_encode_block(raw, group, cfg)


def decode_block(stored: memoryview, rec: list, out: memoryview) -> None:
    if active_path() == "native":
        _native.decode_block(stored, rec, out)
    else:
        py_decode_block(stored, rec, out)


def check_block(stored: memoryview, rec: list, *, path: str, rank: int | None, tensor: str,
                index: int) -> None:
    if len(stored) != rec[0]:
        raise CorruptCheckpointError(
            f"{path} (rank {rank}): block {index} of {tensor!r} is truncated "
            f"({len(stored)} of {rec[0]} bytes); the checkpoint is damaged, load an earlier one.",
            path=path, rank=rank, tensor=tensor)
    if zlib.crc32(stored) != rec[2]:
        raise CorruptCheckpointError(
            f"{path} (rank {rank}): checksum mismatch in block {index} of {tensor!r}; "
            f"the file is corrupt, load an earlier checkpoint.",
            path=path, rank=rank, tensor=tensor)


def lower_thread_priority() -> None:
    """Raise this thread's nice value (SHARDCKPT_WORKER_NICE, default 10).

    Checkpoint threads run beside the training loop: under contention the
    training threads should win; with no contention it costs nothing.
    """
    nice = int(os.environ.get("SHARDCKPT_WORKER_NICE", "10"))
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:  # not permitted in some sandboxes; priority is an optimisation
        pass


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def pool(threads: int | None = None) -> ThreadPoolExecutor:
    """A process-wide codec thread pool (created once; threads persist across saves)."""
    n = threads or default_threads()
    with _pool_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardckpt-codec",
                                               initializer=lower_thread_priority)
        return p


_item_pools: dict[int, ThreadPoolExecutor] = {}


def item_pool(threads: int) -> ThreadPoolExecutor:
    """Workers that encode whole items concurrently (separate from `pool`, which the
    Python path uses inside one item, so nested waits cannot deadlock)."""
    with _pool_lock:
        p = _item_pools.get(threads)
        if p is None:
            p = _item_pools[threads] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="shardckpt-items",
                initializer=lower_thread_priority)
        return p


def encode_buffer(raw: memoryview, group: int, cfg: CodecConfig,
                  threads: int | None = None) -> list[tuple[bytes, list]]:
    """Cut raw bytes into blocks and encode them in parallel, in order."""
    if active_path() == "native":
        # One call for the whole buffer: the extension cuts the blocks and
        # encodes them on its own thread pool without taking the GIL back.
        return _native.encode_blocks(raw, group, cfg.compression == "zstd", cfg.level,
                                     cfg.block_size, fmt.SAMPLE_SIZE, threads or default_threads())
    n = len(raw)
    bs = cfg.block_size
    spans = [raw[i:i + bs] for i in range(0, n, bs)]
    if len(spans) <= 1:
        return [encode_block(s, group, cfg) for s in spans]
    return list(pool(threads).map(lambda s: encode_block(s, group, cfg), spans))


def _corrupt(path: str, rank: int | None, tensor: str, index: int, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} (rank {rank}): block {index} of {tensor!r} {what}; the file is corrupt, "
        f"load an earlier checkpoint.", path=path, rank=rank, tensor=tensor)


def decode_item_blocks(stored: memoryview, recs: list[list], out: memoryview,
                       threads: int | None = None, verify: bool = True, *, path: str = "?",
                       rank: int | None = None, tensor: str = "?", first_index: int = 0) -> None:
    """Decode consecutive blocks of one item: stored back to back into raw back to back.

    `stored` may be shorter than the records say (a short read of a truncated
    file); that is reported as truncation of the first block that runs past
    its end. With `verify`, every block's crc32 is checked before it is
    decoded. Errors are CorruptCheckpointError naming the file, rank, tensor and
    block (`first_index` + position in `recs`). `out` must be exactly the sum
    of the blocks' raw lengths.
    """
    if active_path() == "native":
        try:
            _native.decode_blocks(stored, recs, out, threads or default_threads(), verify)
        except ValueError as e:
            i = getattr(e, "block_index", None)
            if i is None:
                raise
            index = first_index + i
            reason = getattr(e, "reason", "")
            if reason in ("truncated", "checksum"):
                # Same wording as check_block, whichever path ran.
                stop = sum(r[0] for r in recs[:i])
                check_block(stored[stop:stop + recs[i][0]], recs[i], path=path, rank=rank,
                            tensor=tensor, index=index)
            raise _corrupt(path, rank, tensor, index, f"does not decode ({e})") from e
        return
    _warn_python_once()
    total = sum(r[1] for r in recs)
    if len(out) != total:
        raise ValueError(f"output buffer is {len(out)} bytes, the blocks hold {total}")
    jobs = []
    soff = roff = 0
    for i, rec in enumerate(recs):
        jobs.append((first_index + i, rec, stored[soff:soff + rec[0]], out[roff:roff + rec[1]]))
        soff += rec[0]
        roff += rec[1]
    if soff < len(stored):
        raise ValueError(f"stored buffer is {len(stored)} bytes, the blocks hold {soff}")

    def work(job: tuple[int, list, memoryview, memoryview]) -> None:
        index, rec, data, dst = job
        if verify or len(data) != rec[0]:
            check_block(data, rec, path=path, rank=rank, tensor=tensor, index=index)
        try:
            py_decode_block(data, rec, dst)
        except (ValueError, IndexError, TypeError, zstandard.ZstdError) as e:
            raise _corrupt(path, rank, tensor, index, f"does not decode ({e})") from e

    if len(jobs) > 1:
        list(pool(threads).map(work, jobs))
    else:
        for j in jobs:
            work(j)
