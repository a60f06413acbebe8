"""The pure-Python reference codec (numpy + zstandard); csrc/ is its native twin.

Its encoder is the native one's legacy strategy, byte for byte; the native
default writes other (Huffman-only) zstd frames for skewed planes, which this
decoder reads like any zstd frame (docs/FORMAT.md, "Choosing raw or zstd").
"""

from __future__ import annotations

import threading
import zlib

import numpy as np
import zstandard

from ..format import blocks as fmt
from .config import CodecConfig

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


def _unzstd(seg: memoryview, expected: int) -> bytes:
    """One zstd frame that fills `seg` and declares exactly `expected` bytes, decoded.

    The declared size is checked before anything is allocated, and trailing
    bytes or a second frame are damage, as in the native twin.
    """
    try:
        declared = zstandard.frame_content_size(seg)
    except zstandard.ZstdError as e:
        raise ValueError(f"not a zstd frame ({e})") from None
    if declared != expected:
        raise ValueError(f"the zstd frame declares {declared} bytes, the block {expected}")
    dobj = _dctx().decompressobj()
    data = dobj.decompress(seg)
    if len(data) != expected or dobj.unused_data or not dobj.eof:
        raise ValueError("the zstd frame does not fill its block exactly")
    return data


def py_decode_block(stored: memoryview, rec: list, out: memoryview) -> None:
    """Decode one block (already checksum-verified) into `out` (len == raw_len)."""
    problem = fmt.record_problem(rec, len(stored), len(out))
    if problem is not None:
        raise ValueError(problem[1])
    n = rec[1]
    mode = rec[3]
    if mode == fmt.MODE_RAW:
        out[:] = stored
    elif mode == fmt.MODE_ZSTD:
        out[:] = _unzstd(stored, n)
    else:
        kinds, lens = rec[4], rec[5]
        group = len(kinds)
        dst = np.frombuffer(out, dtype=np.uint8).reshape(-1, group)
        off = 0
        for k in range(group):
            seg = stored[off:off + lens[k]]
            off += lens[k]
            plane = _unzstd(seg, n // group) if kinds[k] == fmt.MODE_ZSTD else seg
            dst[:, group - 1 - k] = np.frombuffer(plane, dtype=np.uint8)
