"""Incremental saves: the decision to skip a block, and the blocks' hashes.

Every block's identity is the XXH3-128 of its raw bytes. A block whose hash
(and length, and byte-plane layout) matches a block the base index knows
(io/base_index.py) is not encoded or written again: the item records a reference
to the checkpoint that physically holds it (format/refs.py), so references stay one
hop deep. Blocks match by content, not position, so the base may come from any
world size.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from .. import codec
from ..format import StoredItem
from ..format.blocks import MODE_RAW
from ..format.refs import Ref, runs_of
from .base_index import BaseIndex, Hit


def _native_hash_buffer() -> Any:
    return getattr(codec, "hash_buffer", None)


_FUSED: dict[Any, bool] = {}


def _fused_encode() -> bool:
    """Whether codec.encode_buffer hashes while it encodes (looked up per function: tests
    replace it)."""
    fn = codec.encode_buffer
    fused = _FUSED.get(fn)
    if fused is None:
        try:
            fused = "hashes" in inspect.signature(fn).parameters
        except (TypeError, ValueError):
            fused = False
        _FUSED[fn] = fused
    return fused


def block_hashes(raw: memoryview, block_size: int, threads: int | None = None) -> list[bytes]:
    """XXH3-128 (canonical bytes) of each `block_size` block of `raw`.

    The native codec computes them when it has `hash_buffer`; until then the
    `xxhash` package (the reference implementation's bindings) does, block by block.
    """
    fn = _native_hash_buffer()
    if fn is not None:
        return list(fn(raw, block_size, threads))
    import xxhash

    return [xxhash.xxh3_128_digest(raw[i:i + block_size]) for i in range(0, len(raw), block_size)]


def encode_and_hash(raw: memoryview, group: int, cfg: codec.CodecConfig,
                    threads: int | None) -> tuple[list[tuple[bytes, list]], list[bytes]]:
    """Encoded blocks and their hashes, in one pass over the bytes where the codec can."""
    if _fused_encode():
        hashes: list[bytes] = []
        return codec.encode_buffer(raw, group, cfg, threads, hashes=hashes), hashes
    return codec.encode_buffer(raw, group, cfg, threads), block_hashes(raw, cfg.block_size,
                                                                       threads)


@dataclass(frozen=True)
class Encoded:
    """One item after the skip decision: the blocks to write, and every block's record."""

    own: list[tuple[Any, list]]  # (stored bytes or a view of the caller's, record)
    records: list[list]
    hashes: list[str]
    refs: list[Ref]

    def stored_item(self, file: str, offset: int, length: int, nbytes: int) -> StoredItem:
        """The item record: its own blocks, `length` bytes from `offset` of `file`, and the
        references."""
        return StoredItem(file, offset, length, nbytes, tuple(self.records), tuple(self.hashes),
                          tuple(self.refs))


def borrowed_blocks(raw: memoryview, block_size: int) -> list[tuple[memoryview, list]]:
    """Raw blocks as views of `raw` with their records: no copy. Only for a caller whose
    buffer stays alive and unchanged until the data file is closed (ShardWriter: the
    state being saved, or an async save's staging buffers, held until the save ends)."""
    mv = memoryview(raw).cast("B")
    out = []
    for i in range(0, len(mv), block_size):
        s = mv[i:i + block_size]
        out.append((s, [len(s), len(s), codec.crc32(s), MODE_RAW]))
    return out


def _encode(raw: memoryview, group: int, cfg: codec.CodecConfig, threads: int | None,
            borrow: bool) -> list[tuple[Any, list]]:
    if borrow and cfg.compression == "none":
        return borrowed_blocks(raw, cfg.block_size)
    return codec.encode_buffer(raw, group, cfg, threads)


def encode_item(raw: memoryview, group: int, cfg: codec.CodecConfig, threads: int | None,
                index: BaseIndex | None, *, borrow: bool = False,
                digests: list[bytes] | None = None,
                hits: list[Hit | None] | None = None) -> Encoded:
    """Hash every block; encode only those the base does not hold. With `borrow`, raw
    blocks are views of `raw` (see borrowed_blocks), not copies. `digests` (the blocks'
    hashes) and `hits` (index.hits of them) when the caller has them already."""
    if index is None:
        if borrow and cfg.compression == "none":
            own: list[tuple[Any, list]] = borrowed_blocks(raw, cfg.block_size)
            if digests is None:
                digests = block_hashes(raw, cfg.block_size, threads)
        elif digests is None:
            own, digests = encode_and_hash(raw, group, cfg, threads)
        else:
            own = _encode(raw, group, cfg, threads, borrow)
        return Encoded(own, [r for _, r in own], [d.hex() for d in digests], [])
    bs = cfg.block_size
    n = len(raw)
    if digests is None:
        digests = block_hashes(raw, bs, threads)
    if hits is None:
        hits = index.hits(digests, n, bs, group)
    if None not in hits:
        return referenced(digests, hits)
    records: list[list] = [h.record if h is not None else [] for h in hits]
    own = []
    i = 0
    while i < len(hits):
        if hits[i] is not None:
            i += 1
            continue
        j = i
        while j < len(hits) and hits[j] is None:
            j += 1
        # Block boundaries are multiples of block_size, so encoding the span alone
        # yields exactly the blocks a whole-item encode would.
        for k, (stored, rec) in enumerate(_encode(raw[i * bs:min(n, j * bs)], group, cfg,
                                                  threads, borrow)):
            records[i + k] = rec
            own.append((stored, rec))
        i = j
    locs = [None if h is None else (h.base, h.file, h.offset) for h in hits]
    return Encoded(own, records, [d.hex() for d in digests], runs_of(locs, records))


def referenced(digests: list[bytes], hits: list[Hit]) -> Encoded:
    """An item whose every block the base holds (each proven by its content hash):
    nothing to encode or write, only references, as few as the blocks' places allow."""
    records = [h.record for h in hits]
    locs = [(h.base, h.file, h.offset) for h in hits]
    return Encoded([], records, [d.hex() for d in digests], runs_of(locs, records))
