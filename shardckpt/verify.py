"""Integrity check of a committed checkpoint: presence, sizes, file and block checksums."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field

from . import codec
from . import format as fmt
from .errors import CorruptCheckpointError

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

    def __str__(self) -> str:
        head = (f"{self.path}: {'OK' if self.ok else 'DAMAGED'} — {self.files} files, "
                f"{self.blocks} blocks, {self.bytes_checked} bytes checked"
                f"{' (deep: every block decoded)' if self.deep else ''}")
        return "\n".join([head, *(f"  {p}" for p in self.problems)])


def _items_by_file(manifest: dict) -> dict[str, list[tuple[str, dict]]]:
    out: dict[str, list[tuple[str, dict]]] = {}
    for fqn, t in manifest["tensors"].items():
        for ch in t["chunks"]:
            out.setdefault(ch["file"], []).append((fqn, ch))
    for fqn, o in manifest["objects"].items():
        out.setdefault(o["file"], []).append((fqn, o))
    return out


def _check_file(root: str, rel: str, info: dict, items: list[tuple[str, dict]],
                deep: bool) -> tuple[list[Problem], int, int]:
    path = os.path.join(root, rel)
    rank = info.get("rank")
    problems: list[Problem] = []
    try:
        size = os.path.getsize(path)
    except OSError:
        return [Problem(rel, rank, None, None, "data file is missing")], 0, 0
    if size != info["size"]:
        problems.append(Problem(rel, rank, None, None,
                                f"size {size} bytes, manifest says {info['size']} (truncated or "
                                f"overwritten)"))
    blocks = []
    for fqn, item in items:
        for i, b in enumerate(fmt.item_blocks(item)):
            blocks.append((b.offset, i, fqn, b))
    blocks.sort(key=lambda x: x[0])
    crc = 0
    nblocks = 0
    with open(path, "rb") as f:
        pos = 0
        for off, i, fqn, b in blocks:
            if off != pos:  # gaps never occur in files shardckpt writes; hash them anyway
                gap = f.read(off - pos)
                crc = zlib.crc32(gap, crc)
                pos += len(gap)
            data = f.read(b.stored_len)
            pos += len(data)
            crc = zlib.crc32(data, crc)
            nblocks += 1
            if len(data) != b.stored_len:
                problems.append(Problem(rel, rank, fqn, i, "block is truncated"))
                continue
            if zlib.crc32(data) != b.crc:
                problems.append(Problem(rel, rank, fqn, i, "checksum mismatch"))
                continue
            if deep:
                out = bytearray(b.raw_len)
                try:
                    codec.decode_block(memoryview(data), b.record, memoryview(out))
                except Exception as e:  # any decode failure is damage to report
                    problems.append(Problem(rel, rank, fqn, i, f"does not decode: {e}"))
        rest = f.read()
        crc = zlib.crc32(rest, crc)
    if not problems and crc != info.get("crc32", crc):
        problems.append(Problem(rel, rank, None, None, "file checksum mismatch"))
    return problems, nblocks, size


def verify(path: str | os.PathLike, *, deep: bool = False, threads: int | None = None,
           raise_on_error: bool = True) -> VerifyReport:
    """Check every file and block checksum of a checkpoint (files in parallel).

    Raises CorruptCheckpointError listing each damaged file, block, rank and
    tensor, unless raise_on_error=False (then inspect `report.problems`).
    """
    root = os.fspath(path)
    manifest = fmt.read_manifest(root)
    report = VerifyReport(path=root, deep=deep)
    items = _items_by_file(manifest)
    files = manifest["files"]
    for rel in items:
        if rel not in files:
            report.problems.append(Problem(rel, None, None, None, "not listed in the manifest"))
    jobs = [(rel, files[rel], items.get(rel, [])) for rel in sorted(files)]
    results = list(codec.pool(threads).map(lambda j: _check_file(root, *j, deep), jobs))
    for probs, nblocks, nbytes in results:
        report.problems.extend(probs)
        report.blocks += nblocks
        report.bytes_checked += nbytes
        report.files += 1
    if report.problems and raise_on_error:
        first = report.problems[0]
        raise CorruptCheckpointError(
            f"{root}: checkpoint is damaged ({len(report.problems)} problem(s)):\n"
            + "\n".join(f"  {p}" for p in report.problems)
            + "\nLoad an earlier checkpoint; this one cannot be trusted.",
            path=os.path.join(root, first.file), rank=first.rank, tensor=first.tensor)
    return report
