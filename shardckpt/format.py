"""The on-disk format: names, block records, manifest schema, versions.

This is the only module that knows file names and byte offsets; docs/FORMAT.md
is its specification. Everything else asks this module where bytes are.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
    UnsupportedFormatError,
)

FORMAT_NAME = "shardckpt"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DATA_DIR = "data"
PARTIAL_MARKER = "PARTIAL.json"
# A save in progress lives in a hidden sibling directory; the name says which
# checkpoint it was going to become, so leftovers are identifiable for cleanup.
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<token>[0-9a-f]{12})$")
_TRASH_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<token>[0-9a-f]{12})$")

DEFAULT_BLOCK_SIZE = 4 << 20  # measured: the smallest size that meets every ratio target (benchmarks/codec.py)
# A plane whose first SAMPLE_SIZE bytes shrink by less than 5 % is stored raw:
# low mantissa bytes are noise, and compressing noise only burns CPU.
SAMPLE_SIZE = 4096

# Block modes, the 4th field of a block record.
MODE_RAW = "r"  # stored bytes are the raw bytes
MODE_ZSTD = "z"  # stored bytes are one zstd frame of the raw bytes
MODE_GROUPED = "g"  # byte planes, highest byte first, each a zstd frame or raw

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "complex64": torch.complex64, "complex128": torch.complex128,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "uint16", "uint32", "uint64", "complex32"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

# Only these are byte-grouped: their high bytes (sign + exponent) are highly
# redundant in trained weights and optimizer moments.
_GROUPED = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by shardckpt format v{FORMAT_VERSION}") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise UnsupportedFormatError(f"unknown dtype {name!r} in manifest") from None


def group_size(dtype: torch.dtype) -> int:
    """Bytes per element that are split into planes (1 means no byte-grouping)."""
    return _GROUPED.get(dtype, 1)


def data_file_name(rank: int) -> str:
    return f"{DATA_DIR}/r{rank:05d}.bin"


def staging_name(final_name: str, token: str) -> str:
    return f".{final_name}.partial-{token}"


def trash_name(final_name: str, token: str) -> str:
    return f".{final_name}.old-{token}"


def parse_leftover(name: str) -> tuple[str, str] | None:
    """For a leftover of an uncommitted save or a replaced checkpoint: (final name, kind)."""
    m = _STAGING_RE.match(name)
    if m:
        return m.group("name"), "partial"
    m = _TRASH_RE.match(name)
    if m:
        return m.group("name"), "old"
    return None


# ---------------------------------------------------------------- block records
#
# A block record is a JSON list:
#   [stored_len, raw_len, crc32, "r"]                       raw
#   [stored_len, raw_len, crc32, "z"]                       one zstd frame
#   [stored_len, raw_len, crc32, "g", "zzrr", [l0, ..]]     byte planes
# crc32 (zlib polynomial) covers the stored bytes of the block.


@dataclass(frozen=True)
class Block:
    offset: int  # absolute offset in the data file
    stored_len: int
    raw_len: int
    raw_start: int  # offset of the block's first raw byte within the item
    crc: int
    record: list


def item_blocks(item: dict) -> list[Block]:
    """Blocks of one stored item (a tensor chunk or a bytes object), with file offsets."""
    out = []
    off = item["offset"]
    raw = 0
    for rec in item["blocks"]:
        out.append(Block(off, rec[0], rec[1], raw, rec[2], rec))
        off += rec[0]
        raw += rec[1]
    return out


def blocks_for_range(blocks: list[Block], start: int, end: int) -> list[Block]:
    """The blocks that cover raw bytes [start, end) of an item."""
    if end <= start:
        return []
    return [b for b in blocks if b.raw_start < end and b.raw_start + b.raw_len > start]


def box_runs(offsets: list[int], lengths: list[int], sizes: list[int]) -> tuple[np.ndarray, int]:
    """Element offsets of the contiguous runs of a box inside a row-major chunk, and
    the run length. A box cut along an inner dimension is many short runs; reading
    only the blocks under them keeps such reads from fetching the rows in between."""
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
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


_MAX_RUNS = 1 << 20


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


# ---------------------------------------------------------------- manifest


def make_manifest(
    *,
    world_size: int,
    files: dict[str, dict],
    tensors: dict[str, dict],
    objects: dict[str, dict],
    planner_data: Any,
    codec: dict,
    user_metadata: dict | None,
    versions: dict,
) -> dict:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_unix": time.time(),
        "world_size": world_size,
        "versions": versions,
        "codec": codec,
        "files": files,
        "tensors": tensors,
        "objects": objects,
        "planner_data": _encode_planner_data(planner_data),
        "user_metadata": user_metadata or {},
    }


def _encode_planner_data(pd: Any) -> Any:
    # DCP's default planner maps flattened keys to their original path, a tuple
    # of str/int; JSON keeps that as a list.
    if isinstance(pd, dict):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in pd.items()}
    return pd


def decode_planner_data(pd: Any) -> Any:
    if isinstance(pd, dict):
        return {k: tuple(v) if isinstance(v, list) else v for k, v in pd.items()}
    return pd


def checkpoint_state(path: str) -> str:
    """'committed', 'partial', 'empty', 'other' or 'missing' for a directory path."""
    if not os.path.exists(path):
        return "missing"
    if not os.path.isdir(path):
        return "other"
    if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
        return "committed"
    if os.path.isfile(os.path.join(path, PARTIAL_MARKER)):
        return "partial"
    return "empty" if not os.listdir(path) else "other"


def find_partials(path: str) -> list[str]:
    parent, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries
                  if (p := parse_leftover(e)) and p == (name, "partial"))


def read_manifest(path: str) -> dict:
    """Read and validate the manifest of a committed checkpoint, or raise a typed error."""
    state = checkpoint_state(path)
    if state == "missing":
        partials = find_partials(path)
        if partials:
            raise IncompleteCheckpointError(
                f"{path}: this checkpoint was never committed (its save was interrupted or failed); "
                f"leftovers: {', '.join(partials)}. Load an earlier checkpoint; "
                f"remove the leftovers with `shardckpt gc`.")
        raise CheckpointNotFoundError(f"{path}: no such checkpoint. Check the path.")
    if state == "partial":
        raise IncompleteCheckpointError(
            f"{path}: this save was never committed; load an earlier checkpoint.")
    if state != "committed":
        raise NotACheckpointError(
            f"{path}: not a shardckpt checkpoint (no {MANIFEST_NAME}). "
            f"For a stock DCP directory use `shardckpt convert`.")
    mpath = os.path.join(path, MANIFEST_NAME)
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpointError(
            f"{mpath}: manifest is not valid JSON ({e}); the checkpoint is damaged, "
            f"load an earlier one.", path=mpath) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise NotACheckpointError(f"{mpath}: not a shardckpt manifest.")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{mpath}: format version {version} is newer than this shardckpt "
            f"(reads up to {FORMAT_VERSION}); upgrade shardckpt.")
    for key in ("world_size", "files", "tensors", "objects", "codec"):
        if key not in manifest:
            raise CorruptCheckpointError(f"{mpath}: manifest lacks {key!r}; the checkpoint is damaged.",
                                         path=mpath)
    return manifest


def file_rank(manifest: dict, file: str) -> int | None:
    return manifest["files"].get(file, {}).get("rank")
