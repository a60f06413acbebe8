"""Validation primitives of the manifest: typed fields, exact tiling, disjoint items.

Split from manifest.py so that the schema there reads as the schema.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import CorruptCheckpointError
from .blocks import MODE_GROUPED, record_problem

_MAX_INT = 1 << 62  # no size, offset or shape in a real checkpoint comes near this


class ManifestError(CorruptCheckpointError):
    """A manifest field is malformed; the message names the field."""


def _bad(where: str, what: str) -> ManifestError:
    return ManifestError(f"manifest field {where}: {what}")


def _int(v: Any, where: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"expected an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _bad(where, f"expected a string, got {type(v).__name__}")
    return v


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(where, f"expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _bad(where, f"expected a list, got {type(v).__name__}")
    return v



def _check_tiling(shape: tuple[int, ...], chunks: list[Any], where: str) -> None:
    """The chunks cover every element of the tensor exactly once."""
    total = math.prod(shape)
    if not chunks:
        if total:
            raise _bad(where, "a non-empty tensor has no chunks")
        return
    if sum(math.prod(c.sizes) for c in chunks) != total:
        raise _bad(where, f"chunks hold {sum(math.prod(c.sizes) for c in chunks)} elements, "
                          f"the tensor {total}: chunks missing or overlapping")
    if not shape or len(chunks) == 1:
        return
    # Equal volume plus no overlap is exact tiling. Sweep along dim 0 so that the
    # usual row-sharded layouts compare each chunk with its neighbours only.
    live = sorted((c for c in chunks if math.prod(c.sizes)), key=lambda c: c.offsets[0])
    active: list[Any] = []
    for c in live:
        active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        for a in active:
            if all(ao < co + cs and co < ao + as_ for ao, as_, co, cs
                   in zip(a.offsets, a.sizes, c.offsets, c.sizes)):
                raise _bad(where, f"chunks at {list(a.offsets)} and {list(c.offsets)} overlap")
        active.append(c)


def _check_disjoint(tensors: Mapping[str, Any], objects: Mapping[str, Any]) -> None:
    """No two items share stored bytes: a writer appends items back to back, so an
    offset that moved (damage the block checksums alone would catch only when
    verifying) lands on a neighbour and is refused here."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for k, t in tensors.items():
        for i, c in enumerate(t.chunks):
            if c.length:
                spans.setdefault(c.file, []).append((c.offset, c.length,
                                                     f"tensors[{k!r:.80}].chunks[{i}]"))
    for k, o in objects.items():
        if o.length:
            spans.setdefault(o.file, []).append((o.offset, o.length, f"objects[{k!r:.80}]"))
    for rel, items in spans.items():
        items.sort()
        for (a_off, a_len, a_where), (b_off, _, b_where) in zip(items, items[1:]):
            if b_off < a_off + a_len:
                raise _bad(b_where, f"bytes at {b_off} of {rel} overlap those of {a_where} "
                                    f"[{a_off}, {a_off + a_len})")


def check_block_record(rec: Any, where: str, group: int, block_size: int) -> list:
    """Validate one block record; returns it (a JSON list, as the codecs take it)."""
    if isinstance(rec, list) and len(rec) >= 5 and rec[3] == MODE_GROUPED:
        if group < 2:
            raise _bad(where, "byte planes in a dtype that is not byte-grouped")
        if isinstance(rec[4], str) and len(rec[4]) != group:
            raise _bad(f"{where}[4]", f"{len(rec[4])} byte planes for a dtype of {group}")
    problem = record_problem(rec)
    if problem is not None:
        raise _bad(where + problem[0], problem[1])
    if rec[1] > block_size:
        raise _bad(f"{where}[1]", f"{rec[1]} raw bytes in a block of at most {block_size}")
    return rec
