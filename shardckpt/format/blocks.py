"""Block geometry: where an item's blocks lie in its file and which cover a region.

Pure functions over block records; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_BLOCK_SIZE = 4 << 20  # measured: the smallest size that meets every ratio target (benchmarks/codec.py)
MAX_BLOCK_SIZE = 1 << 30
# A plane whose sample of SAMPLE_SIZE bytes (its head in the Python encoder,
# pieces spread over it in the native one) shrinks by less than 5 % is stored
# raw: low mantissa bytes are noise, and compressing noise only burns CPU.
SAMPLE_SIZE = 4096

# Block modes, the 4th field of a block record:
#   [stored_len, raw_len, crc32, "r"]                       raw
#   [stored_len, raw_len, crc32, "z"]                       one zstd frame (declaring its size)
#   [stored_len, raw_len, crc32, "g", "zzrr", [l0, ..]]     byte planes
# crc32 (zlib polynomial) covers the stored bytes of the block.
MODE_RAW = "r"
MODE_ZSTD = "z"
MODE_GROUPED = "g"

_MAX_RUNS = 1 << 20
_MAX_LEN = 1 << 62
_MAX_PLANES = 16


def record_problem(rec: object, stored_len: int | None = None,
                   raw_len: int | None = None) -> tuple[str, str] | None:
    """What is wrong with a block record as (field suffix, message), or None if it is well
    formed; the suffix ("[5][2]") names the field inside the record.

    With `stored_len` / `raw_len` (the real sizes of the stored bytes and of the
    output), the record must also agree with them. Both codecs and the manifest
    check records here, so none of them can be laxer than another.
    """
    if not isinstance(rec, (list, tuple)) or len(rec) < 4:
        return "", "a block record is a list of at least 4 fields"
    s, r, c, mode = rec[0], rec[1], rec[2], rec[3]
    for i, (name, v, hi) in enumerate((("stored_len", s, _MAX_LEN), ("raw_len", r, _MAX_LEN),
                                       ("crc32", c, 0xFFFFFFFF))):
        if type(v) is not int or not 0 <= v <= hi:
            return f"[{i}]", f"{name} {v!r:.40} is not an integer in [0, {hi}]"
    if stored_len is not None and s != stored_len:
        return "[0]", f"the record says {s} stored bytes, the block has {stored_len}"
    if raw_len is not None and r != raw_len:
        return "[1]", f"the record says {r} raw bytes, the output has {raw_len}"
    if mode == MODE_RAW or mode == MODE_ZSTD:
        if len(rec) != 4:
            return "", f"a {mode!r} record has 4 fields, not {len(rec)}"
        if mode == MODE_RAW and s != r:
            return "[0]", f"a raw block stores {s} bytes for {r}"
        if mode == MODE_ZSTD and s == 0:
            return "[0]", "an empty zstd frame"
        return None
    if mode != MODE_GROUPED:
        return "[3]", f"unknown block mode {mode!r:.20}"
    if len(rec) != 6:
        return "", f"a byte-plane record has 6 fields, not {len(rec)}"
    kinds, lens = rec[4], rec[5]
    if (not isinstance(kinds, str) or not 2 <= len(kinds) <= _MAX_PLANES
            or set(kinds) - {MODE_RAW, MODE_ZSTD}):
        return "[4]", f"plane kinds {kinds!r:.40} are not 2..{_MAX_PLANES} of 'z'/'r'"
    group = len(kinds)
    if not isinstance(lens, (list, tuple)) or len(lens) != group:
        return "[5]", f"{group} plane kinds need {group} plane lengths"
    if r % group:
        return "[1]", f"{r} raw bytes do not split into {group} planes"
    for i, n in enumerate(lens):
        if type(n) is not int or not 0 <= n <= s:
            return f"[5][{i}]", f"plane {i} length {n!r:.40} is not an integer in [0, {s}]"
    if sum(lens) != s:
        return "[5]", f"plane lengths sum to {sum(lens)}, the block stores {s}"
    for i, (k, n) in enumerate(zip(kinds, lens)):
        if k == MODE_RAW and n != r // group:
            return f"[5][{i}]", f"raw plane {i} has {n} bytes, not {r // group}"
        if k == MODE_ZSTD and n == 0:
            return f"[5][{i}]", f"plane {i} is an empty zstd frame"
    return None


@dataclass(frozen=True)
class Block:
    offset: int  # absolute offset in the data file
    stored_len: int
    raw_len: int
    raw_start: int  # offset of the block's first raw byte within the item
    crc: int
    record: list


def item_blocks(offset: int, records: Sequence[list]) -> list[Block]:
    """Blocks of one stored item (a tensor chunk or a bytes object), with file offsets."""
    out = []
    raw = 0
    for rec in records:
        out.append(Block(offset, rec[0], rec[1], raw, rec[2], rec))
        offset += rec[0]
        raw += rec[1]
    return out


def blocks_for_range(blocks: list[Block], start: int, end: int) -> list[Block]:
    """The blocks that cover raw bytes [start, end) of an item."""
    if end <= start:
        return []
    return [b for b in blocks if b.raw_start < end and b.raw_start + b.raw_len > start]


def row_major_strides(sizes: Sequence[int]) -> list[int]:
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    return strides


def box_runs(offsets: list[int], lengths: list[int], sizes: list[int]) -> tuple[np.ndarray, int]:
    """Element offsets of the contiguous runs of a box inside a row-major chunk, and
    the run length. A box cut along an inner dimension is many short runs; reading
    only the blocks under them keeps such reads from fetching the rows in between."""
    strides = row_major_strides(sizes)
    k = len(sizes) - 1
    while k >= 0 and lengths[k] == sizes[k]:
        k -= 1
    base = sum(o * s for o, s in zip(offsets, strides))
    n_runs = int(np.prod(lengths[:k])) if k > 0 else 1
    if k <= 0 or n_runs > _MAX_RUNS:
        # One contiguous span (or too many runs to list: take the span).
        last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides))
        return np.array([base], dtype=np.int64), last + 1 - base
    grid = np.zeros(1, dtype=np.int64)
    for d in range(k):
        grid = (grid[:, None] + np.arange(lengths[d], dtype=np.int64) * strides[d]).ravel()
    return grid + base, lengths[k] * strides[k]


def blocks_for_runs(blocks: list[Block], starts: np.ndarray, length: int) -> list[Block]:
    """The blocks that cover raw bytes [s, s + length) for every s in `starts`."""
    if not blocks or length <= 0 or not len(starts):
        return []
    raw_starts = np.fromiter((b.raw_start for b in blocks), dtype=np.int64, count=len(blocks))
    first = np.searchsorted(raw_starts, starts, side="right") - 1
    last = np.searchsorted(raw_starts, starts + (length - 1), side="right") - 1
    mark = np.zeros(len(blocks) + 1, dtype=np.int64)
    np.add.at(mark, first, 1)
    np.add.at(mark, last + 1, -1)
    return [blocks[i] for i in np.flatnonzero(np.cumsum(mark)[:-1] > 0)]


def coalesce(blocks: list[Block]) -> list[tuple[int, int, list[Block]]]:
    """Group blocks adjacent in the file into single reads: (offset, length, blocks)."""
    runs: list[tuple[int, int, list[Block]]] = []
    for b in sorted(blocks, key=lambda b: b.offset):
        if runs and runs[-1][0] + runs[-1][1] == b.offset:
            off, ln, bl = runs[-1]
            runs[-1] = (off, ln + b.stored_len, bl + [b])
        else:
            runs.append((b.offset, b.stored_len, [b]))
    return runs


def box_span_bytes(offsets: Sequence[int], lengths: Sequence[int], sizes: Sequence[int],
                   esize: int) -> tuple[int, int] | None:
    """Raw byte range [first, last + 1) a box occupies in a row-major chunk, or None if empty."""
    if any(n == 0 for n in lengths):
        return None
    strides = row_major_strides(sizes)
    first = sum(o * s for o, s in zip(offsets, strides))
    last = sum((o + n - 1) * s for o, n, s in zip(offsets, lengths, strides))
    return first * esize, (last + 1) * esize
