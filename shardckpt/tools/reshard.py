"""Offline resharding: rewrite a checkpoint as M balanced, contiguous per-rank files.

Every tensor with ndim >= 1 is split along dim 0 the way FSDP2 / torch.chunk
split it (ceil(n/M) rows per rank, the last ranks possibly short or empty), and
chunk i goes into rank i's file, so M readers each read one contiguous region.
Scalars, tiny tensors and objects go whole to the least-loaded file.

Streaming: the source is read in row slabs of at most `slab_bytes`, each slab is
encoded and written before the next is read; memory stays near one slab whatever
the checkpoint size. The writer here is shared with `convert` (any `Source`).
"""

from __future__ import annotations

import os
import uuid

from .. import codec
from .. import format as fmt
from ..format import Chunk, FileEntry, Manifest, ObjectEntry, StoredItem, TensorEntry
from ..format.keys import KeyMap
from ..io.commit import Commit
from ..io.data_writer import DataFileWriter
from ..io.storage import is_url
from ..io.tensor_bytes import tensor_bytes
from .sources import (
    DEFAULT_SLAB_BYTES,
    Entry,
    Progress,
    ShardSource,
    Source,
    iter_slabs,
    row_bytes,
)

# Tensors smaller than this are not worth splitting across readers.
DEFAULT_MIN_SPLIT_BYTES = 4096

def row_split(n: int, m: int) -> list[tuple[int, int]]:
    """The FSDP2 / torch.chunk split of n rows over m ranks: ceil(n/m) each, tail short."""
    per = -(-n // m) if n else 0
    return [(min(n, i * per), min(n, (i + 1) * per)) for i in range(m)]


class _ItemWriter:
    """Writes one item from several pieces; block boundaries match a one-shot append.

    Pieces are buffered until whole blocks are available, so every append but the
    last is a multiple of block_size, and the concatenated block records are
    exactly those one append of the whole item would produce.
    """

    def __init__(self, out: DataFileWriter, group: int) -> None:
        self.out = out
        self.group = group
        self.buf = bytearray()
        self.records: list[StoredItem] = []

    def add(self, raw: memoryview) -> None:
        self.buf += raw
        bs = self.out.cfg.block_size
        whole = len(self.buf) // bs * bs
        if whole:
            self.records.append(self.out.append(memoryview(self.buf)[:whole], self.group))
            del self.buf[:whole]

    def finish(self) -> StoredItem:
        if self.buf or not self.records:
            self.records.append(self.out.append(memoryview(self.buf), self.group))
            self.buf = bytearray()
        first = self.records[0]
        return StoredItem(file=first.file, offset=first.offset,
                          length=sum(r.length for r in self.records),
                          nbytes=sum(r.nbytes for r in self.records),
                          blocks=tuple(b for r in self.records for b in r.blocks))


def _plan(entries: list[Entry], world_size: int,
          min_split_bytes: int) -> dict[str, list[tuple[int, tuple[int, int] | None]]]:
    """key -> [(target rank, row range or None for the whole value)]."""
    load = [0] * world_size
    plan: dict[str, list[tuple[int, tuple[int, int] | None]]] = {}
    whole: list[tuple[int, str]] = []
    for e in entries:
        if e.kind == "tensor" and e.shape and e.nbytes >= min_split_bytes and e.shape[0] > 0:
            parts = []
            for r, (a, b) in enumerate(row_split(e.shape[0], world_size)):
                if b > a:
                    parts.append((r, (a, b)))
                    load[r] += (b - a) * row_bytes(e)
            plan[e.key] = parts
        else:
            # Object sizes are unknown until read; count them as small.
            whole.append((e.nbytes if e.kind == "tensor" else 64, e.key))
    # Largest first into the least-loaded file: the classic greedy balance.
    for size, key in sorted(whole, key=lambda x: -x[0]):
        r = min(range(world_size), key=lambda i: (load[i], i))
        load[r] += size
        plan[key] = [(r, None)]
    return plan


def refuse_url_destination(dst: str) -> None:
    """The tools write local (or mounted) paths only; an object-store URL given as one would
    otherwise become a local directory named like it ("./s3:/bucket/...")."""
    if is_url(dst):
        raise ValueError(f"{dst}: the tools write to a local or mounted path, not to object "
                         f"storage; write it locally, then load it and shardckpt.save() it to "
                         f"the URL (sources may be URLs)")


def write_checkpoint(src: Source, dst: str, *, world_size: int = 1,
                     compression: str | None = None, level: int | None = None,
                     block_size: int | None = None, key_map: KeyMap | None = None,
                     min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES,
                     slab_bytes: int = DEFAULT_SLAB_BYTES, overwrite: bool = False,
                     threads: int | None = None, user_metadata: dict | None = None,
                     on_progress: Progress = None) -> Manifest:
    """Write `src` as a shardckpt checkpoint at `dst` with one data file per target rank.

    Codec settings default to the source's. `key_map` renames keys (a key mapped
    to None or "" is dropped). Published through the commit protocol: `dst`
    appears only when complete. Returns the manifest.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, not {world_size}")
    refuse_url_destination(dst)
    sc = src.codec or {}
    cfg = codec.CodecConfig(
        compression=compression or sc.get("compression", "zstd"),
        level=level if level is not None else sc.get("level", 1),
        block_size=block_size or sc.get("block_size", fmt.DEFAULT_BLOCK_SIZE))
    pairs = renamed_entries(src, key_map)
    renamed = {nk: Entry(nk, e.kind, e.dtype, e.shape, e.requires_grad) for nk, e in pairs}
    origin = {nk: e.key for nk, e in pairs}
    plan = _plan(list(renamed.values()), world_size, min_split_bytes)

    commit = Commit.create(dst, overwrite=overwrite, save_id=uuid.uuid4().hex,
                           world_size=world_size)
    staging = commit.staging
    try:
        writers = [DataFileWriter(os.path.join(staging, fmt.data_file_name(r)),
                                  fmt.data_file_name(r), cfg, threads, rank=r)
                   for r in range(world_size)]
        tensors: dict[str, TensorEntry] = {}
        objects: dict[str, ObjectEntry] = {}
        try:
            for nk, e in renamed.items():
                ok = origin[nk]
                if e.kind == "object":
                    (r, _), = plan[nk]
                    data = src.object_bytes(ok)
                    rec = writers[r].append(memoryview(data), 1)
                    objects[nk] = ObjectEntry(rec.file, rec.offset, rec.length, rec.nbytes,
                                              rec.blocks)
                    if on_progress:
                        on_progress(len(data))
                    continue
                group = fmt.group_size(e.dtype)
                chunks = []
                for r, rows in plan[nk]:
                    a, b = rows if rows is not None else (0, e.shape[0] if e.shape else 1)
                    iw = _ItemWriter(writers[r], group)
                    for slab in iter_slabs(src, Entry(ok, e.kind, e.dtype, e.shape), a, b,
                                           slab_bytes):
                        iw.add(tensor_bytes(slab))
                        if on_progress:
                            on_progress(slab.numel() * slab.element_size())
                        del slab
                    offsets = [0] * len(e.shape)
                    sizes = list(e.shape)
                    if rows is not None:
                        offsets[0], sizes[0] = a, b - a
                    it = iw.finish()
                    chunks.append(Chunk(it.file, it.offset, it.length, it.nbytes, it.blocks,
                                        offsets=tuple(offsets), sizes=tuple(sizes)))
                tensors[nk] = TensorEntry(dtype=fmt.dtype_name(e.dtype), shape=tuple(e.shape),
                                          requires_grad=e.requires_grad, chunks=tuple(chunks))
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.__exit__(RuntimeError, None, None)
            raise
        files = {fmt.data_file_name(r): FileEntry(rank=r, size=w.size, crc32=w.crc)
                 for r, w in enumerate(writers)}
        if src.planner_data and key_map is None:
            planner_data = {k: list(src.planner_data.get(k, (k,))) for k in renamed}
        else:
            # Renamed keys lose their nesting: a flat mapping is the honest one.
            planner_data = {k: [k] for k in renamed}
        um = dict(src.user_metadata or {})
        um.update(user_metadata or {})
        manifest = Manifest.new(world_size=world_size, files=files, tensors=tensors,
                                objects=objects, planner_data=planner_data, codec=cfg.to_json(),
                                user_metadata=um, versions=fmt.runtime_versions())
        commit.finalize(manifest)
        return manifest
    except BaseException:
        commit.abort()
        raise


def renamed_entries(src: Source, key_map: KeyMap | None) -> list[tuple[str, Entry]]:
    """(new key, source entry) pairs after key mapping; collisions are an error."""
    out, seen = [], {}
    for k, e in src.entries.items():
        nk = key_map(k) if key_map else k
        if not nk:
            continue
        if nk in seen:
            raise ValueError(f"keys {seen[nk]!r} and {k!r} both map to {nk!r}; "
                             f"fix --rename / --strip-prefix")
        seen[nk] = k
        out.append((nk, e))
    return out


def reshard(src: str | os.PathLike, dst: str | os.PathLike, world_size: int, *,
            compression: str | None = None, level: int | None = None,
            min_split_bytes: int = DEFAULT_MIN_SPLIT_BYTES, overwrite: bool = False,
            slab_bytes: int = DEFAULT_SLAB_BYTES, threads: int | None = None,
            on_progress: Progress = None) -> Manifest:
    """Rewrite checkpoint `src` at `dst` for `world_size` readers (values bitwise identical)."""
    src, dst = os.fspath(src), os.fspath(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("reshard needs a different destination than the source")
    with ShardSource(src) as s:
        return write_checkpoint(s, dst, world_size=world_size, compression=compression,
                                level=level, min_split_bytes=min_split_bytes,
                                slab_bytes=slab_bytes, overwrite=overwrite, threads=threads,
                                on_progress=on_progress)


def total_bytes(src: Source) -> int:
    return sum(e.nbytes for e in src.entries.values())
