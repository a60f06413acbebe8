"""The block index of a base checkpoint, and which base an incremental save uses.

`BaseIndex` maps the XXH3-128 of every block a base stores (its own, or its own
base's: references stay one hop deep) to where it lies, and every base item by its
place in the state; `choose_base` keeps a base only while the state's keys, shapes
and dtypes are the base's. The skip decision itself is io/dedupe.py's.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from ..errors import InvalidBaseError
from ..format import FileEntry, Manifest, StoredItem
from ..format.blocks import MODE_GROUPED
from ..format.refs import base_name, base_ref, runs_of
from .storage import is_url, norm_path, split_path

log = logging.getLogger("shardckpt")


class Hit(NamedTuple):
    """Where a base stores a block with the wanted content, and its record. (A tuple:
    an index is built for every incremental save, one per block of its base.)"""

    base: str
    file: str
    offset: int
    record: list


def _layout(rec: list) -> int:
    # A byte-plane block decodes only into an item of the same group size; a plain
    # one ("r"/"z") is bytes and fits any.
    return len(rec[4]) if rec[3] == MODE_GROUPED else 0


def _fits(records: tuple[list, ...], group: int) -> bool:
    """Whether blocks of these records decode into an item of byte-group size `group`."""
    for rec in records:
        if rec[3] == MODE_GROUPED and len(rec[4]) != group:
            return False
    return True


def _places(item: StoredItem, own: str) -> list[tuple[str, str, int]]:
    """(holder, file, offset) of each block of `item`: what item.block_list() says, without
    building the blocks (an index is built for every incremental save)."""
    recs = item.blocks
    at: dict[int, tuple[str, str, int]] = {}
    for r in item.refs:
        pos = r.offset
        for i in range(r.first, r.first + r.count):
            at[i] = (r.base, r.file, pos)
            pos += recs[i][0]
    out = []
    off = item.offset
    for i, rec in enumerate(recs):
        p = at.get(i)
        if p is None:
            p = (own, item.file, off)
            off += rec[0]
        out.append(p)
    return out


class BaseIndex:
    """The blocks of a base checkpoint by content, for a save to `target` (a sibling)."""

    def __init__(self, base: str | os.PathLike, target: str | os.PathLike,
                 manifest: Manifest | None = None) -> None:
        from .committed import read_committed

        self.base, target = _sibling_pair(base, target)
        self.target_ref = base_ref(os.path.basename(target))
        self.manifest: Manifest = read_committed(self.base) if manifest is None else manifest
        self.holders: dict[str, dict[str, FileEntry]] = {
            base_ref(os.path.basename(self.base)): dict(self.manifest.files)}
        for ref, files in self.manifest.bases.items():
            self.holders.setdefault(ref, dict(files))
        # The target would be replaced by this save: nothing of it may be referenced.
        self.holders.pop(self.target_ref, None)
        self._by_hash: dict[tuple[bytes, int, int], Hit] = {}
        # Whole base items by where they are in the state ((key, chunk offsets); (key,
        # None) for an object), with their blocks' hashes: a tensor that did not change
        # is settled in one lookup (reuse), with the base's own record where that is all
        # references already (then every later save shares the same objects, and the
        # manifest's text of it is kept: format/manifest.py). Anything else is matched
        # block by block (hits).
        self._at: dict[tuple[str, tuple | None], tuple[tuple[bytes, ...], StoredItem,
                                                        list]] = {}
        self._reused: dict[tuple[int, str, int], StoredItem | None] = {}
        own = base_ref(os.path.basename(self.base))
        for where, item in _keyed_items(self.manifest):
            if not item.hashes:
                continue  # written before format 3: nothing to match it by
            places = _places(item, own)
            digests = []
            for (holder, rel, offset), rec, h in zip(places, item.blocks, item.hashes):
                d = bytes.fromhex(h)
                digests.append(d)
                if holder not in self.holders:
                    continue
                key = (d, rec[1], _layout(rec))
                if key not in self._by_hash:
                    self._by_hash[key] = Hit(holder, rel, offset, rec)
            self._at[where] = (tuple(digests), item, places)

    @classmethod
    def open(cls, base: str | os.PathLike, target: str | os.PathLike) -> BaseIndex:
        """The index of `base` for a save to `target`, built once for both the coordinator's
        structure check and its own rank's writer. Reused only while the base's manifest
        is the same object: `read_committed` returns the same one for the same file
        (identity of the file this process wrote, or the parse cache's digest of its
        bytes), so a base rewritten on disk is indexed afresh."""
        from .committed import read_committed

        key = _sibling_pair(base, target)
        manifest = read_committed(key[0])
        with _INDEX_LOCK:
            for k, m, index in _INDEXES:
                if k == key and m is manifest:
                    return index
        index = cls(base, target, manifest)
        with _INDEX_LOCK:
            _INDEXES.insert(0, (key, manifest, index))
            del _INDEXES[2:]  # the save in flight and, at most, a background one
        return index

    def __len__(self) -> int:
        return len(self._by_hash)

    def lookup(self, digest: bytes, raw_len: int, group: int) -> Hit | None:
        hit = self._by_hash.get((digest, raw_len, group)) if group > 1 else None
        return hit or self._by_hash.get((digest, raw_len, 0))

    def hits(self, digests: list[bytes], nbytes: int, block_size: int,
             group: int) -> list[Hit | None]:
        """lookup() of every block of an item of `nbytes` raw bytes (all but the last
        block are `block_size` long)."""
        last = len(digests) - 1
        return [self.lookup(d, block_size if i < last else nbytes - i * block_size, group)
                for i, d in enumerate(digests)]

    def reuse(self, digests: list[bytes], nbytes: int, group: int, file: str,
              where: tuple[str, tuple | None]) -> StoredItem | None:
        """The record of the item at `where` (key, chunk offsets) if the base's item there
        has these blocks (the same hashes and size: a tensor that did not change), as
        references to where the base has them; None when it differs, or does not fit (a
        block of another byte-plane layout, a holder this save may not reference).
        `file`: the data file the record names (this rank's, as for every item it
        settles)."""
        at = self._at.get(where)
        if at is None or not digests or at[1].nbytes != nbytes or at[0] != tuple(digests):
            return None
        item, places = at[1], at[2]
        key = (id(item), file, group)
        if key in self._reused:
            return self._reused[key]
        out: StoredItem | None = None
        if _fits(item.blocks, group):
            if item.length == 0 and sum(r.count for r in item.refs) == len(item.blocks):
                refs = item.refs  # all references already (runs as the base has them)
                ok = all(r.base in self.holders for r in refs)
            else:
                refs = tuple(runs_of(places, item.blocks))
                ok = all(p[0] in self.holders for p in places)
            if ok and item.refs is refs and item.file == file and item.offset == 0:
                out = item  # the base's own record
            elif ok:
                out = StoredItem(file, 0, 0, nbytes, item.blocks, item.hashes, refs)
        self._reused[key] = out
        return out

    def same_structure(self, tensors: Mapping[str, tuple[str, tuple[int, ...]]],
                       objects: Iterable[str]) -> bool:
        """Whether a state of these tensors (key -> (dtype name, global shape)) and
        objects has the base's structure."""
        mine = {k: (t.dtype, tuple(t.shape)) for k, t in self.manifest.tensors.items()}
        return mine == dict(tensors) and set(self.manifest.objects) == set(objects)

    def bases_for(self, manifest: Manifest) -> dict[str, dict[str, FileEntry]]:
        """The `bases` table of a manifest whose items reference this index's holders."""
        used: dict[str, set[str]] = {}
        for item in manifest_items(manifest):
            for r in item.refs:
                used.setdefault(r.base, set()).add(r.file)
        return {b: {rel: self.holders[b][rel] for rel in sorted(rels)}
                for b, rels in sorted(used.items())}


def _sibling_pair(base: str | os.PathLike, target: str | os.PathLike) -> tuple[str, str]:
    """(base, target) as absolute paths or URLs, or InvalidBaseError before anything is read.

    Siblings in one directory, or under one prefix of one bucket: a reference is
    `../NAME`, so both must share the parent, textually (a URL is never resolved)."""
    base, target = norm_path(base), norm_path(target)
    if is_url(base) != is_url(target) or split_path(base)[0] != split_path(target)[0]:
        raise InvalidBaseError(
            f"{target}: base {base} is not in the same directory (or object-store prefix); "
            f"an incremental checkpoint references only siblings (save both under one root).")
    if base == target:
        raise InvalidBaseError(f"{target}: a checkpoint cannot be its own base; pass the "
                               f"previous checkpoint as base=.")
    return base, target


_INDEX_LOCK = threading.Lock()
_INDEXES: list[tuple[tuple[str, str], Manifest, BaseIndex]] = []


def _keyed_items(m: Manifest) -> Iterable[tuple[tuple[str, tuple | None], StoredItem]]:
    for k, t in m.tensors.items():
        for c in t.chunks:
            yield (k, c.offsets), c
    for k, o in m.objects.items():
        yield (k, None), o


def manifest_items(m: Manifest) -> Iterable[StoredItem]:
    for t in m.tensors.values():
        yield from t.chunks
    yield from m.objects.values()



def index_for(base: str | os.PathLike | None, target: str) -> BaseIndex | None:
    return None if base is None else BaseIndex.open(base, target)


def plan_structure(plans: Iterable[Any]) -> tuple[dict[str, tuple[str, tuple[int, ...]]],
                                                   set[str]]:
    """(tensors, objects) of DCP save plans: what `BaseIndex.same_structure` compares."""
    from torch.distributed.checkpoint.planner import WriteItemType

    from ..format import dtype_name

    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    objects: set[str] = set()
    for plan in plans:
        if not plan.usable:  # DCP's plan cache: the full plan rides along (dcp/planner.py)
            plan = getattr(plan.planner_data, "full", None) or plan
        for it in plan.items:
            if it.type == WriteItemType.BYTE_IO:
                objects.add(it.index.fqn)
            else:
                td = it.tensor_data
                tensors[it.index.fqn] = (dtype_name(td.properties.dtype), tuple(td.size))
    return tensors, objects


def choose_base(base: str | os.PathLike | None, target: str,
                plans: list[Any]) -> BaseIndex | None:
    """Coordinator: the index of the base every rank dedupes against, or None for a full
    save (no base asked for, or the state's structure differs from the base's)."""
    if base is None:
        return None
    index = BaseIndex.open(base, target)
    tensors, objects = plan_structure(plans)
    if not index.same_structure(tensors, objects):
        log.info("shardckpt: %s: the state's keys, shapes or dtypes differ from base %s; "
                 "writing a full checkpoint", target, index.base)
        return None
    return index


def holder_names(m: Manifest) -> set[str]:
    """Names of the sibling checkpoints a manifest references."""
    return {base_name(b) for b in m.bases}
