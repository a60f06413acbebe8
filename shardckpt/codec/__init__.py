"""The block codec: byte-grouping + zstd + crc32, native (csrc/) or pure Python.

Either path reads what the other wrote, bitwise: every compressed plane is one
standard zstd frame. They do not write the same bytes: the native encoder
codes skewed planes (exponent bytes) as Huffman-only zstd frames, several
times faster than zstd's match finder for the same ratio, which the Python
reference (zstandard) cannot make. The pure-Python path is always available;
the native one is used when the extension was built. This module dispatches
between them. Both can also hash blocks (XXH3-128 of the raw bytes).
"""

from __future__ import annotations

import logging
import os
import warnings
import zlib

import xxhash
import zstandard

from ..errors import CorruptCheckpointError
from ..format import blocks as fmt
from .config import CodecConfig
from .reference import py_decode_block, py_encode_block
from .threads import (
    blocking_threads,
    default_threads,
    item_pool,
    lower_thread_priority,
    pool,
    writer_cpus,
)

log = logging.getLogger("shardckpt")

# The native encoder's plane strategy (csrc/codec.h): 1 picks, per plane, a
# Huffman-only or a regular zstd frame; 0 writes the Python reference's bytes.
_STRATEGY_AUTO = 1

try:  # the accelerator is optional by design
    from .. import _native  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _native = None

_warned = False

__all__ = [
    "CodecConfig", "active_path", "native_available", "encode_block", "decode_block",
    "py_encode_block", "py_decode_block", "check_block", "encode_buffer", "decode_item_blocks",
    "hash_buffer", "hash_buffers", "HASH_SIZE", "crc32",
    "default_threads", "blocking_threads", "pool", "item_pool", "lower_thread_priority",
    "writer_cpus",
]

# Bytes of a block digest: XXH3-128 in canonical (big-endian) form, i.e.
# xxhash.xxh3_128_digest(raw block).
HASH_SIZE = 16


def native_available() -> bool:
    return _native is not None


def active_path() -> str:
    """'native' or 'python': which codec implementation runs."""
    if os.environ.get("SHARDCKPT_CODEC", "").lower() == "python":
        return "python"
    return "native" if _native is not None else "python"


def crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """zlib.crc32(data, value), by the extension's carry-less multiply folding when it is
    built (several times zlib's speed); any contiguous buffer, like zlib.crc32."""
    if active_path() == "native":
        return _native.crc32(data, value)
    return zlib.crc32(data, value)


def _warn_python_once() -> None:
    global _warned
    if not _warned and _native is None:
        _warned = True
        warnings.warn("shardckpt: native codec extension not built; using the pure-Python codec "
                      "(same format, slower).", stacklevel=3)




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
    if crc32(stored) != rec[2]:
        raise CorruptCheckpointError(
            f"{path} (rank {rank}): checksum mismatch in block {index} of {tensor!r}; "
            f"the file is corrupt, load an earlier checkpoint.",
            path=path, rank=rank, tensor=tensor)


def encode_buffer(raw: memoryview, group: int, cfg: CodecConfig, threads: int | None = None,
                  hashes: list[bytes] | None = None) -> list[tuple[bytes, list]]:
    """Cut raw bytes into blocks and encode them in parallel, in order.

    With a `hashes` list, one HASH_SIZE-byte digest of each block's raw bytes is
    appended to it, in block order (computed on the thread that encodes the block).
    """
    if active_path() == "native":
        # One call for the whole buffer: the extension cuts the blocks and
        # encodes them on its own thread pool without taking the GIL back.
        return _native.encode_blocks(raw, group, cfg.compression == "zstd", cfg.level,
                                     cfg.block_size, fmt.SAMPLE_SIZE, threads or default_threads(),
                                     _STRATEGY_AUTO, hashes)
    n = len(raw)
    bs = cfg.block_size
    spans = [raw[i:i + bs] for i in range(0, n, bs)]

    def one(s: memoryview) -> tuple[tuple[bytes, list], bytes | None]:
        return encode_block(s, group, cfg), (None if hashes is None else xxhash.xxh3_128_digest(s))

    done = [one(s) for s in spans] if len(spans) <= 1 else list(pool(threads).map(one, spans))
    if hashes is not None:
        hashes.extend(h for _, h in done)
    return [b for b, _ in done]


def hash_buffer(raw: memoryview, block_size: int, threads: int | None = None) -> list[bytes]:
    """HASH_SIZE-byte digests of raw[0:bs], raw[bs:2 bs], ... without encoding them."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, not {block_size}")
    if active_path() == "native":
        return _native.hash_buffer(raw, block_size, threads or default_threads())
    mv = memoryview(raw).cast("B")
    spans = [mv[i:i + block_size] for i in range(0, len(mv), block_size)]
    if len(spans) <= 1:
        return [xxhash.xxh3_128_digest(s) for s in spans]
    # xxhash releases the GIL for large inputs, so threads help.
    return list(pool(threads).map(xxhash.xxh3_128_digest, spans))


def hash_buffers(raws: list[memoryview], block_size: int,
                 threads: int | None = None) -> list[list[bytes]]:
    """hash_buffer of each of several buffers, in one pass: every block of every buffer
    is hashed in parallel (one GIL release for all of them, not one per buffer)."""
    if block_size <= 0:
        raise ValueError(f"block_size must be > 0, not {block_size}")
    native = active_path() == "native" and getattr(_native, "hash_buffers", None)
    if not native:
        return [hash_buffer(r, block_size, threads) for r in raws]
    flat = native(raws, block_size, threads or default_threads())
    out, pos = [], 0
    for r in raws:
        end = pos + -(-len(r) // block_size) * HASH_SIZE
        out.append([flat[i:i + HASH_SIZE] for i in range(pos, end, HASH_SIZE)])
        pos = end
    return out


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
    for i, rec in enumerate(recs):
        problem = fmt.record_problem(rec)
        if problem is not None:
            raise _corrupt(path, rank, tensor, first_index + i,
                           f"does not decode (malformed record: {problem[1]})")
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
        except (ValueError, IndexError, TypeError, KeyError, OverflowError, MemoryError,
                zstandard.ZstdError) as e:
            raise _corrupt(path, rank, tensor, index, f"does not decode ({e})") from e

    if len(jobs) > 1:
        list(pool(threads).map(work, jobs))
    else:
        for j in jobs:
            work(j)
