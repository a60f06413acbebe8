"""Integrity check of a committed checkpoint: presence, sizes, file and block checksums."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import codec
from ..errors import CorruptCheckpointError, ShardckptError
from ..format import StoredItem
from ..format.refs import RefBlock
from ..io.reader import CheckpointReader

_READ_CHUNK = 8 << 20


@dataclass
class Problem:
    file: str
    rank: int | None
    tensor: str | None
    block: int | None
    what: str

    def __str__(self) -> str:
        where = f"{self.file} (rank {self.rank})"
        if self.tensor is not None:
            where += f", {self.tensor!r}"
        if self.block is not None:
            where += f", block {self.block}"
        return f"{where}: {self.what}"


@dataclass
class VerifyReport:
    path: str
    files: int = 0
    blocks: int = 0
    bytes_checked: int = 0
    deep: bool = False
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def error(self) -> CorruptCheckpointError | None:
        """The exception `verify` raises for this report, or None when it is OK."""
        if self.ok:
            return None
        first = self.problems[0]
        return CorruptCheckpointError(
            f"{self.path}: checkpoint is damaged ({len(self.problems)} problem(s)):\n"
            + "\n".join(f"  {p}" for p in self.problems)
            + "\nLoad an earlier checkpoint; this one cannot be trusted.",
            path=os.path.join(self.path, first.file), rank=first.rank, tensor=first.tensor)

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "files": self.files, "blocks": self.blocks,
                "bytes_checked": self.bytes_checked, "deep": self.deep,
                "problems": [vars(p) for p in self.problems]}

    def __str__(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'DAMAGED'} — "
                f"{self.files} file{'' if self.files == 1 else 's'}, "
                f"{self.blocks} block{'' if self.blocks == 1 else 's'}, "
                f"{self.bytes_checked} bytes checked"
                f"{' (deep: every block decoded)' if self.deep else ''}")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def _items_by_file(reader: CheckpointReader) -> dict[str, list[tuple[str, StoredItem]]]:
    m = reader.manifest
    out: dict[str, list[tuple[str, StoredItem]]] = {}
    for fqn, t in m.tensors.items():
        for ch in t.chunks:
            out.setdefault(ch.file, []).append((fqn, ch))
    for fqn, o in m.objects.items():
        out.setdefault(o.file, []).append((fqn, o))
    return out


def _check_file(reader: CheckpointReader, rel: str, items: list[tuple[str, StoredItem]],
                deep: bool) -> tuple[list[Problem], int, int]:
    info = reader.manifest.files[rel]
    rank = info.rank
    problems: list[Problem] = []
    try:
        size = reader.file_size(rel)
    except ShardckptError as e:
        return [Problem(rel, rank, None, None, str(e))], 0, 0
    except OSError:
        return [Problem(rel, rank, None, None, "data file is missing")], 0, 0
    if size != info.size:
        problems.append(Problem(rel, rank, None, None,
                                f"size {size} bytes, manifest says {info.size} (truncated or "
                                f"overwritten)"))
    blocks = []
    for fqn, item in items:
        for i, b in enumerate(item.block_list()):
            if not isinstance(b, RefBlock):  # referenced blocks: checked in their base
                blocks.append((b.offset, i, fqn, b))
    blocks.sort(key=lambda x: x[0])
    f = reader.open_file(rel)
    crc = 0
    nblocks = 0
    pos = 0
    for off, i, fqn, b in blocks:
        if off > pos:  # gaps never occur in files shardckpt writes; hash them anyway
            gap = _read(f, pos, off - pos)
            crc = codec.crc32(gap, crc)
            pos += len(gap)
        data = _read(f, off, b.stored_len)
        pos = off + len(data)
        crc = codec.crc32(data, crc)
        nblocks += 1
        if len(data) != b.stored_len:
            problems.append(Problem(rel, rank, fqn, i, "block is truncated"))
            continue
        if codec.crc32(data) != b.crc:
            problems.append(Problem(rel, rank, fqn, i, "checksum mismatch"))
            continue
        if deep:
            out = bytearray(b.raw_len)
            try:
                codec.decode_block(memoryview(data), b.record, memoryview(out))
            except Exception as e:  # any decode failure is damage to report
                problems.append(Problem(rel, rank, fqn, i, f"does not decode: {e}"))
    if pos < f.size:
        crc = codec.crc32(_read(f, pos, f.size - pos), crc)
    if not problems and crc != info.crc32:
        problems.append(Problem(rel, rank, None, None, "file checksum mismatch"))
    return problems, nblocks, size


def _read(f, offset: int, length: int) -> bytes:
    length = max(0, min(length, f.size - offset))
    parts = []
    while length > 0:
        b = f.pread(min(length, _READ_CHUNK), offset)
        if not b:
            break
        parts.append(b)
        offset += len(b)
        length -= len(b)
    return b"".join(parts)


def verify_reader(reader: CheckpointReader, *, deep: bool = False, threads: int | None = None,
                  raise_on_error: bool = True,
                  on_progress: Callable[[int], None] | None = None) -> VerifyReport:
    """`verify` of an open checkpoint (its manifest is already checksummed and validated)."""
    report = VerifyReport(path=reader.path, deep=deep)
    items = _items_by_file(reader)
    files = reader.manifest.files
    jobs = [(rel, items.get(rel, [])) for rel in sorted(files)]
    for probs, nblocks, nbytes in codec.pool(threads).map(lambda j: _check_file(reader, *j, deep),
                                                          jobs):
        if on_progress is not None:
            on_progress(nbytes)
        report.problems.extend(probs)
        report.blocks += nblocks
        report.bytes_checked += nbytes
        report.files += 1
    if reader.manifest.bases:
        from .refcheck import check_references

        probs, nblocks, nbytes = check_references(reader, deep, Problem)
        report.problems.extend(probs)
        report.blocks += nblocks
        report.bytes_checked += nbytes
    err = report.error()
    if err is not None and raise_on_error:
        raise err
    return report


def verify(path: str | os.PathLike, *, deep: bool = False, threads: int | None = None,
           raise_on_error: bool = True,
           on_progress: Callable[[int], None] | None = None,
           storage_options: dict | None = None) -> VerifyReport:
    """Check the manifest's checksum and structure, every file's size and checksum and every
    block's checksum (files in parallel); `deep` also decodes every block.

    Raises CorruptCheckpointError listing each damaged file, block, rank and
    tensor, unless raise_on_error=False (then inspect `report.problems`). A
    manifest that cannot be trusted at all raises in either case.
    """
    with CheckpointReader(os.fspath(path), threads=threads,
                          storage_options=storage_options) as reader:
        return verify_reader(reader, deep=deep, threads=threads, raise_on_error=raise_on_error,
                             on_progress=on_progress)
