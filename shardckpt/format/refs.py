"""References of an incremental checkpoint to blocks another checkpoint of the same root holds.

An item (tensor chunk or object) of an incremental checkpoint keeps one block
record per block, in order, as every item does. Runs of its blocks may lie in a
*base*: a sibling checkpoint (`../NAME`, one path component, never hidden, so it
cannot leave the directory that holds both) that physically stores those bytes.
A writer always references the checkpoint that holds the bytes, never one that
references them in turn, so a reference is one hop deep and a chain never grows.

Per-block content hashes (XXH3-128 of the raw bytes) identify blocks across
checkpoints, whatever the world size or layout that wrote them. No I/O here.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .blocks import Block

BASE_PREFIX = "../"
HASH_HEX_LEN = 32  # XXH3-128, canonical (big-endian) bytes as lowercase hex
_HASH_RE = re.compile(r"[0-9a-f]{32}")
_MAX_BASE_NAME = 233  # format.names.MAX_NAME_LEN: every checkpoint name fits it


class RefProblem(ValueError):
    """A reference field is malformed: (field suffix, message), wrapped by the manifest."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where
        self.what = what


def is_base_name(ref: Any) -> bool:
    """`../NAME` with NAME one visible path component: a sibling in the same directory."""
    if not isinstance(ref, str) or not ref.startswith(BASE_PREFIX):
        return False
    name = ref[len(BASE_PREFIX):]
    return (0 < len(name.encode("utf-8", "surrogatepass")) <= _MAX_BASE_NAME
            and not name.startswith(".") and not any(c in name for c in "/\\\0")
            and posixpath.normpath(ref) == ref)


def base_ref(name: str) -> str:
    """The reference to sibling checkpoint `name`."""
    ref = BASE_PREFIX + name
    if not is_base_name(ref):
        raise ValueError(f"{name!r} cannot be referenced as a base (a visible name with no "
                         f"separators, at most {_MAX_BASE_NAME} bytes)")
    return ref


def base_name(ref: str) -> str:
    return ref[len(BASE_PREFIX):]


@dataclass(frozen=True)
class Ref:
    """Blocks first..first+count-1 of an item are stored back to back in `file` of
    base `base` from `offset`."""

    first: int
    count: int
    base: str
    file: str
    offset: int

    def to_json(self) -> list:
        return [self.first, self.count, self.base, self.file, self.offset]


@dataclass(frozen=True)
class RefBlock(Block):
    """A block stored by a base checkpoint: `offset` is in that checkpoint's `file`."""

    base: str = ""
    file: str = ""


def blocks_with_refs(offset: int, records: Sequence[list], refs: Sequence[Ref]) -> list[Block]:
    """Blocks of an item whose `refs` runs live in bases; the others are stored back to
    back in the item's own file from `offset`."""
    where: dict[int, tuple[Ref, int]] = {}
    for r in refs:
        pos = r.offset
        for i in range(r.first, r.first + r.count):
            where[i] = (r, pos)
            pos += records[i][0]
    out: list[Block] = []
    raw = 0
    for i, rec in enumerate(records):
        hit = where.get(i)
        if hit is None:
            out.append(Block(offset, rec[0], rec[1], raw, rec[2], rec))
            offset += rec[0]
        else:
            out.append(RefBlock(hit[1], rec[0], rec[1], raw, rec[2], rec, base=hit[0].base,
                                file=hit[0].file))
        raw += rec[1]
    return out


def own_stored(records: Sequence[list], refs: Sequence[Ref]) -> int:
    """Stored bytes of the blocks an item keeps in its own file."""
    referenced = {i for r in refs for i in range(r.first, r.first + r.count)}
    return sum(rec[0] for i, rec in enumerate(records) if i not in referenced)


def parse_hashes(v: Any, nblocks: int) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise RefProblem(".hashes", f"expected a list, got {type(v).__name__}")
    if len(v) != nblocks:
        raise RefProblem(".hashes", f"{len(v)} hashes for {nblocks} blocks")
    for i, h in enumerate(v):
        if not isinstance(h, str) or not _HASH_RE.fullmatch(h):
            raise RefProblem(f".hashes[{i}]", f"{h!r:.40} is not {HASH_HEX_LEN} lowercase hex "
                                              f"digits")
    return tuple(v)


def parse_refs(v: Any, records: Sequence[list],
               bases: Mapping[str, Mapping[str, Any]], max_int: int) -> tuple[Ref, ...]:
    """Validate an item's `refs` against its block records and the manifest's `bases`
    (base -> {file: FileEntry}); every referenced byte lies inside its base file."""
    if not isinstance(v, list):
        raise RefProblem(".refs", f"expected a list, got {type(v).__name__}")
    out: list[Ref] = []
    nxt = 0
    for i, r in enumerate(v):
        w = f".refs[{i}]"
        if not isinstance(r, list) or len(r) != 5:
            raise RefProblem(w, "a reference is [first, count, base, file, offset]")
        first, count, base, rel, off = r
        for name, x in (("first", first), ("count", count), ("offset", off)):
            if type(x) is not int or not 0 <= x <= max_int:
                raise RefProblem(w, f"{name} {x!r:.40} is not an integer in [0, {max_int}]")
        if count < 1 or first < nxt or first + count > len(records):
            raise RefProblem(w, f"blocks [{first}, {first + count}) are empty, out of order, "
                                f"overlap an earlier reference or exceed the item's "
                                f"{len(records)} blocks")
        nxt = first + count
        if not is_base_name(base):
            raise RefProblem(w + "[2]", f"{base!r:.80} is not a sibling checkpoint (../NAME): "
                                        f"a reference never leaves the directory of its "
                                        f"checkpoint")
        files = bases.get(base)
        if files is None:
            raise RefProblem(w + "[2]", f"{base!r:.80} is not one of the manifest's bases")
        fe = files.get(rel)
        if fe is None:
            raise RefProblem(w + "[3]", f"{rel!r:.80} is not a file of base {base!r:.80}")
        end = off + sum(records[j][0] for j in range(first, first + count))
        if end > fe.size:
            raise RefProblem(w, f"bytes [{off}, {end}) lie outside {base}/{rel} "
                                f"({fe.size} bytes)")
        out.append(Ref(first, count, base, rel, off))
    return tuple(out)


def runs_of(locs: Sequence[tuple[str, str, int] | None], records: Sequence[list]) -> list[Ref]:
    """Per-block locations (base, file, offset) or None (own) as the fewest `Ref` runs:
    consecutive blocks merge when they lie back to back in one base file."""
    runs: list[list] = []  # [first, count, base, file, offset], made Refs at the end
    end = -1  # file offset just past the last run's blocks
    for i, loc in enumerate(locs):
        if loc is None:
            continue
        base, rel, off = loc
        last = runs[-1] if runs else None
        if (last is not None and last[0] + last[1] == i and last[2] == base
                and last[3] == rel and end == off):
            last[1] += 1
        else:
            runs.append([i, 1, base, rel, off])
        end = off + records[i][0]
    return [Ref(*r) for r in runs]
