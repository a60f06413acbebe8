"""Reading an incremental checkpoint: blocks that its base checkpoints hold.

A base is a sibling directory (`../NAME`, validated by the format layer); it is
opened by file descriptor on first use and held open, so retention deleting it
later cannot pull it from under a reader. It is never followed through a
symlink (that could lead out of the root), and only its data files are read:
the referencing manifest carries every record, checksum and size it needs, so a
retired base (no manifest any more) reads the same. On an object store a base is
a sibling prefix (`PREFIX/NAME`), and its data objects are immutable and named
uniquely per save, so what a manifest references cannot change under it.
"""

from __future__ import annotations

import os
import stat
from typing import Any

import torch

from .. import codec
from ..errors import BaseCheckpointError, CorruptCheckpointError, ReferencedCheckpointError
from ..format import Block, Manifest, StoredItem, parse_manifest
from ..format.names import MANIFEST_NAME
from ..format.refs import BASE_PREFIX, RefBlock, base_name
from .storage import OpenCheckpoint, is_url, join, split_path, storage_for

_EAGER_BASE_FILES = 256


class BaseFiles:
    """The bases of one open checkpoint."""

    def __init__(self, path: str, manifest: Manifest) -> None:
        self.path = path
        self.bases = manifest.bases
        self._open: dict[str, OpenCheckpoint] = {}
        opened = 0
        for ref, files in sorted(self.bases.items()):
            for rel in sorted(files):
                if opened >= _EAGER_BASE_FILES:
                    return
                try:
                    self.open_data(ref, rel, None)
                    opened += 1
                except (OSError, CorruptCheckpointError):
                    pass  # reported when a block is read, naming the tensor

    def dir_of(self, ref: str) -> str:
        return join(split_path(self.path)[0], base_name(ref))

    def _missing(self, ref: str, rel: str, fqn: str | None, what: str) -> BaseCheckpointError:
        d = self.dir_of(ref)
        fe = self.bases.get(ref, {}).get(rel)
        return BaseCheckpointError(
            f"{self.path}: {'it' if fqn is None else repr(fqn)} is stored partly in base "
            f"checkpoint {d}, whose {rel} {what}; "
            f"this incremental checkpoint cannot be loaded without it. Load a full checkpoint "
            f"or one whose base is intact.", path=join(d, rel), tensor=fqn, base=d,
            rank=None if fe is None else fe.rank)

    def open_data(self, ref: str, rel: str, fqn: str | None) -> Any:
        ck = self._open.get(ref)
        if ck is None:
            d = self.dir_of(ref)
            try:
                if not is_url(d) and stat.S_ISLNK(os.lstat(d).st_mode):
                    raise self._missing(ref, rel, fqn, "directory is a symlink (never followed: "
                                                       "it could lead out of the root)")
                ck = self._open[ref] = storage_for(d).open_checkpoint(d)
            except FileNotFoundError:
                raise self._missing(ref, rel, fqn, "is missing (the base was deleted)") from None
            except OSError as e:
                raise self._missing(ref, rel, fqn, f"cannot be opened ({e.strerror})") from None
        try:
            return ck.open_data(rel)
        except FileNotFoundError:
            raise self._missing(ref, rel, fqn, "is missing") from None
        except CorruptCheckpointError as e:
            raise self._missing(ref, rel, fqn, f"is unusable ({e})") from None
        except OSError as e:
            raise self._missing(ref, rel, fqn, f"cannot be read ({e.strerror})") from None

    def precheck(self) -> BaseCheckpointError | None:
        """Cheap check before a load: every base file is there, at least its recorded size."""
        for ref, files in sorted(self.bases.items()):
            for rel, fe in sorted(files.items()):
                try:
                    size = self.open_data(ref, rel, None).size
                except BaseCheckpointError as e:
                    return e
                if size < fe.size:
                    return self._missing(ref, rel, None, f"has {size} bytes, {fe.size} were "
                                                         f"recorded (truncated)")
        return None

    def close(self) -> None:
        for ck in self._open.values():
            ck.close()
        self._open.clear()

    def read_blocks(self, reader: Any, fqn: str, item: StoredItem, blocks: list[Block],
                    wanted: list[Block], out: torch.Tensor | None = None,
                    lo: int = 0) -> tuple[torch.Tensor, int]:
        """`CheckpointReader.read_blocks` for an item with references: each block from the
        file that holds it (the item's own or a base's), each file's runs coalesced."""
        chosen = sorted(wanted, key=lambda b: b.raw_start)
        if not chosen:
            return torch.empty(0, dtype=torch.uint8), lo
        from .reader import decode_target  # reader imports this module

        out, start, outmv = decode_target(chosen, out)
        index_of = {b.raw_start: i for i, b in enumerate(blocks)}
        groups: dict[tuple[str, str], list[Block]] = {}
        for b in chosen:
            key = (b.base, b.file) if isinstance(b, RefBlock) else ("", item.file)
            groups.setdefault(key, []).append(b)
        for (ref, rel), group in groups.items():
            if not ref:
                f = reader.data_file_for(fqn, rel)
                path, rank = join(reader.path, rel), reader.manifest.file_rank(rel)
            else:
                f = self.open_data(ref, rel, fqn)
                path, rank = join(self.dir_of(ref), rel), self.bases[ref][rel].rank
            for off, length, run in _runs(group):
                data = f.pread(max(0, min(length, f.size - off)), off)
                reader.bytes_read += len(data)
                first = run[0]
                raw_end = run[-1].raw_start + run[-1].raw_len
                try:
                    codec.decode_item_blocks(
                        memoryview(data), [b.record for b in run],
                        outmv[first.raw_start - start: raw_end - start], reader.threads,
                        reader.verify, path=path, rank=rank, tensor=fqn,
                        first_index=index_of[first.raw_start])
                except CorruptCheckpointError as e:
                    if not ref:
                        raise
                    d = self.dir_of(ref)
                    raise BaseCheckpointError(
                        f"{self.path}: {fqn!r} is stored partly in base checkpoint {d}, which is "
                        f"damaged: {e}", path=path, rank=rank, tensor=fqn, base=d) from None
        return out, start


def _runs(blocks: list[Block]) -> list[tuple[int, int, list[Block]]]:
    """Single reads of blocks adjacent both in the file and in the item: with references
    the two orders differ (a base may hold an item's blocks in any order)."""
    runs: list[tuple[int, int, list[Block]]] = []
    for b in sorted(blocks, key=lambda b: b.raw_start):
        if runs:
            off, ln, bl = runs[-1]
            if off + ln == b.offset and bl[-1].raw_start + bl[-1].raw_len == b.raw_start:
                runs[-1] = (off, ln + b.stored_len, bl + [b])
                continue
        runs.append((b.offset, b.stored_len, [b]))
    return runs


def sibling_users(path: str) -> list[str]:
    """Committed checkpoints in the same directory (or object-store prefix) whose manifest
    references `path`. A manifest that does not contain the reference's text is not
    parsed: an overwrite asks this of every sibling."""

    parent, name = split_path(path)
    st = storage_for(parent)
    needle = f'"{BASE_PREFIX}{name}"'.encode()
    users = []
    for e, is_dir in sorted(st.children(parent)):
        p = join(parent, e)
        if e == name or e.startswith(".") or not is_dir or not st.is_committed(p):
            continue
        try:
            ck = st.open_checkpoint(p)
            try:
                data = ck.read_manifest()
            finally:
                ck.close()
            if needle in data and name in {base_name(b) for b in
                                           parse_manifest(data, join(p, MANIFEST_NAME)).bases}:
                users.append(p)
        except Exception:  # noqa: BLE001 - an unreadable sibling references nothing we can tell
            continue
    return users


def refuse_overwrite_of_base(path: str) -> None:
    """Before a save replaces the committed checkpoint at `path`: a typed error if another
    checkpoint references it (its blocks would go with it), so nothing is written."""
    if not storage_for(path).is_committed(path):
        return
    users = sibling_users(path)
    if users:
        raise ReferencedCheckpointError(
            f"{path}: is a base of {', '.join(users)}; overwriting it would break them, so "
            f"nothing was written. Rewrite those standalone first (`shardckpt materialize "
            f"PATH`), or save under another name.")
