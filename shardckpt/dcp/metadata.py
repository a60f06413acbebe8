"""Translation between the manifest and DCP's `Metadata` (both directions)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.storage import WriteResult

from ..errors import SaveFailedError
from ..format import (
    Chunk,
    FileEntry,
    Manifest,
    ObjectEntry,
    StoredItem,
    TensorEntry,
    dtype_from_name,
    dtype_name,
)


@dataclass(frozen=True)
class ItemRef:
    """What a reader needs for one stored item: its key, dtype (tensors) and place."""

    fqn: str
    item: StoredItem
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class RankFile:
    """A rank's data file, reported to the coordinator with its write results."""

    file: str
    rank: int
    size: int
    crc32: int


def _planner_data_to_json(pd: Any) -> dict | None:
    # DCP's default planner maps flattened keys to their original path, a tuple
    # of str/int; JSON keeps that as a list.
    if not isinstance(pd, dict):
        return None
    return {k: list(v) if isinstance(v, tuple) else v for k, v in pd.items()}


def planner_data_from_json(pd: dict | None) -> Any:
    if pd is None:
        return None
    return {k: tuple(v) if isinstance(v, list) else v for k, v in pd.items()}


def manifest_from_results(metadata: Metadata, results: list[list[WriteResult]],
                          expected: dict[int, int], *, final: str, codec: dict,
                          user_metadata: dict, versions: dict,
                          like: Manifest | None = None) -> Manifest:
    """Assemble the manifest from every rank's write results (coordinator only).

    `like`: the base of an incremental save. A chunk a rank settled with the base's own
    record (io/base_index.BaseIndex.reuse) is that record, and a tensor all of whose chunks
    are is the base's entry: the same objects, whose manifest text is kept."""
    if len(results) != len(expected):
        raise SaveFailedError(
            f"{final}: {len(results)} of {len(expected)} ranks reported write results; "
            f"nothing was committed. Retry the save.")
    files: dict[str, FileEntry] = {}
    # Keyed (fqn, offsets) rather than by MetadataIndex: the same identity (a torch.Size
    # hashes and compares as the tuple it is) without building one key per item per save.
    by_index: dict[tuple[str, tuple[int, ...] | None], StoredItem] = {}
    for rank, res in enumerate(results):
        if len(res) != expected[rank]:
            raise SaveFailedError(
                f"{final}: rank {rank} reported {len(res)} of {expected[rank]} items; "
                f"nothing was committed. Retry the save.")
        for r in res:
            item, rf = r.storage_data
            files[rf.file] = FileEntry(rank=rf.rank, size=rf.size, crc32=rf.crc32)
            by_index[(r.index.fqn, r.index.offset)] = item
    tensors: dict[str, TensorEntry] = {}
    objects: dict[str, ObjectEntry] = {}
    old = {} if like is None else like.tensors
    for fqn, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata):
            chunks = []
            for ch in md.chunks:
                it = by_index.get((fqn, ch.offsets))
                if it is None:
                    raise SaveFailedError(f"{final}: no rank wrote chunk {list(ch.offsets)} "
                                          f"of {fqn!r}; nothing was committed.")
                offsets, sizes = tuple(ch.offsets), tuple(ch.sizes)
                if not (type(it) is Chunk and it.offsets == offsets and it.sizes == sizes):
                    it = Chunk(offsets=offsets, sizes=sizes, **it.stored_fields())
                chunks.append(it)
            dtype, shape = dtype_name(md.properties.dtype), tuple(md.size)
            grad = bool(md.properties.requires_grad)
            prev = old.get(fqn)
            if (prev is not None and len(prev.chunks) == len(chunks)
                    and all(a is b for a, b in zip(prev.chunks, chunks))
                    and prev.dtype == dtype and prev.shape == shape
                    and prev.requires_grad == grad):
                tensors[fqn] = prev  # the base's entry: its kept text too
            else:
                tensors[fqn] = TensorEntry(dtype=dtype, shape=shape, requires_grad=grad,
                                           chunks=tuple(chunks))
        else:
            it = by_index.get((fqn, None))
            if it is None:
                raise SaveFailedError(f"{final}: no rank wrote object {fqn!r}; "
                                      f"nothing was committed.")
            objects[fqn] = it if type(it) is ObjectEntry else ObjectEntry(**it.stored_fields())
    return Manifest.new(world_size=len(results), files=files, tensors=tensors, objects=objects,
                        codec=codec, planner_data=_planner_data_to_json(metadata.planner_data),
                        user_metadata=user_metadata, versions=versions)


def metadata_from_manifest(manifest: Manifest) -> Metadata:
    sdm: dict[str, Any] = {}
    storage: dict[MetadataIndex, ItemRef] = {}
    for fqn, t in manifest.tensors.items():
        dtype = dtype_from_name(t.dtype)
        props = TensorProperties(dtype=dtype, requires_grad=t.requires_grad)
        chunks = []
        for ch in t.chunks:
            off = torch.Size(ch.offsets)
            chunks.append(ChunkStorageMetadata(offsets=off, sizes=torch.Size(ch.sizes)))
            storage[MetadataIndex(fqn, off)] = ItemRef(fqn, ch, dtype)
        sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t.shape), chunks=chunks)
    for fqn, o in manifest.objects.items():
        sdm[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = ItemRef(fqn, o)
    return Metadata(state_dict_metadata=sdm,
                    planner_data=planner_data_from_json(manifest.planner_data),
                    storage_data=storage)
