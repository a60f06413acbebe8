"""`shardckpt materialize`: an incremental checkpoint rewritten as a standalone one.

Stored blocks are copied verbatim (no decode, no re-encode: the records, crc32s
and hashes stay valid), each checked against its crc32 on the way, from
whichever checkpoint holds them; every rank's file keeps its items in their
order. The result is published with the commit protocol, in place or at `out`.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

from .. import codec
from ..errors import BaseCheckpointError, CorruptCheckpointError, ReferencedCheckpointError
from ..format import FileEntry, Manifest, StoredItem
from ..format.refs import RefBlock
from ..io.bases import sibling_users
from ..io.reader import CheckpointReader
from ..io.storage import CheckpointWrite, is_url, join, norm_path, storage_for
from .report import human_bytes


@dataclass
class MaterializeReport:
    path: str
    out: str
    changed: bool
    bytes_copied: int = 0  # stored bytes fetched from base checkpoints
    bytes_written: int = 0
    seconds: float = 0.0
    bases: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "out": self.out, "changed": self.changed,
                "bytes_copied": self.bytes_copied, "bytes_written": self.bytes_written,
                "seconds": self.seconds, "bases": list(self.bases or [])}

    def __str__(self) -> str:
        if not self.changed:
            return f"{self.path}: already standalone; nothing to do"
        return (f"{self.out}: standalone ({human_bytes(self.bytes_written)} written, "
                f"{human_bytes(self.bytes_copied)} of them from {', '.join(self.bases or [])}) "
                f"in {self.seconds:.2f}s")


def _items(m: Manifest) -> list[tuple[str, str, int | None, StoredItem]]:
    out: list[tuple[str, str, int | None, StoredItem]] = []
    for k, t in m.tensors.items():
        out += [(c.file, k, i, c) for i, c in enumerate(t.chunks)]
    out += [(o.file, k, None, o) for k, o in m.objects.items()]
    out.sort(key=lambda x: (x[0], x[3].offset))
    return out


def _block_bytes(reader: CheckpointReader, fqn: str, item: StoredItem, i: int, b: Any) -> bytes:
    if isinstance(b, RefBlock):
        f = reader.bases.open_data(b.base, b.file, fqn)
        where = join(reader.bases.dir_of(b.base), b.file)
    else:
        f = reader.open_file(item.file)
        where = join(reader.path, item.file)
    data = f.pread(b.stored_len, b.offset)
    if len(data) != b.stored_len or codec.crc32(data) != b.crc:
        what = "truncated" if len(data) != b.stored_len else "checksum mismatch"
        msg = f"{reader.path}: block {i} of {fqn!r} in {where}: {what}; nothing was written."
        if isinstance(b, RefBlock):
            raise BaseCheckpointError(msg, path=where, tensor=fqn,
                                      base=reader.bases.dir_of(b.base))
        raise CorruptCheckpointError(msg, path=where, tensor=fqn)
    return data


def materialize(path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                overwrite: bool = False, force: bool = False) -> MaterializeReport:
    """Rewrite checkpoint `path` standalone at `out` (default: in place).

    In place, a checkpoint that others in its directory reference is refused
    (rewriting it would move the blocks they reference) unless `force`.
    """
    t0 = time.perf_counter()
    src = norm_path(path)
    dst = norm_path(out) if out is not None else src
    with CheckpointReader(src) as reader:
        m = reader.stored_manifest
        report = MaterializeReport(path=src, out=dst, changed=bool(m.bases) or dst != src,
                                   bases=[reader.bases.dir_of(b) for b in sorted(m.bases)])
        if not report.changed:
            return report
        if dst == src and not force:
            users = sibling_users(src)
            if users:
                raise ReferencedCheckpointError(
                    f"{src}: is a base of {', '.join(users)}; rewriting it in place would break "
                    f"them. Materialize those first, or write this one elsewhere with --out.")
        commit = storage_for(dst).begin_commit(dst, overwrite=overwrite or dst == src,
                                               save_id=uuid.uuid4().hex, world_size=m.world_size)
        try:
            files, items = _copy(reader, m, commit, report)
            tensors = {k: replace(t, chunks=tuple(items[(k, i)] for i in range(len(t.chunks))))
                       for k, t in m.tensors.items()}
            objects = {k: items[(k, None)] for k in m.objects}
            commit.finalize(replace(m, files=files, tensors=tensors, objects=objects, bases={}))
        except BaseException:
            commit.abort()
            raise
    report.seconds = time.perf_counter() - t0
    return report


def _copy(reader: CheckpointReader, m: Manifest, commit: CheckpointWrite,
          report: MaterializeReport,
          ) -> tuple[dict[str, FileEntry], dict[tuple[str, int | None], Any]]:
    by_file: dict[str, list] = {rel: [] for rel in m.files}
    for rel, k, i, item in _items(m):
        by_file[rel].append((k, i, item))
    files: dict[str, FileEntry] = {}
    items: dict[tuple[str, int | None], Any] = {}
    remote = is_url(commit.staging)
    for n, (rel, entries) in enumerate(sorted(by_file.items())):
        # An object store's data names are unique per save (the commit's token); a
        # file's rank stays in its FileEntry, `n` only keeps the names apart.
        out_rel = commit.data_name(n) if remote else rel
        p = join(commit.staging, out_rel)
        sink = storage_for(p).open_sink(p, m.files[rel].rank)
        size = crc = 0
        try:
            for k, i, item in entries:
                start = size
                for j, b in enumerate(item.block_list()):
                    data = _block_bytes(reader, k, item, j, b)
                    sink.write(memoryview(data))
                    crc = codec.crc32(data, crc)
                    size += len(data)
                    if isinstance(b, RefBlock):
                        report.bytes_copied += len(data)
                items[(k, i)] = replace(item, file=out_rel, offset=start, length=size - start,
                                        refs=())
            sink.close()
        except BaseException:
            sink.abort()
            raise
        files[out_rel] = FileEntry(rank=m.files[rel].rank, size=size, crc32=crc)
        report.bytes_written += size
    return files, items
