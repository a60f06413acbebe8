"""Convert between shardckpt, stock DCP directories, torch.save files and safetensors.

Every source is read tensor by tensor (row slabs where the format allows), and
every target but `torch` is written as it is read, so a checkpoint larger than
RAM converts. `torch` (one torch.save file) must hold the whole state in memory:
that is how torch.save works.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..api import quiet_no_dist
from ..format.keys import KeyMap, key_mapper
from ..io.commit import publish
from ..io.data_writer import tensor_bytes
from ..io.fsutil import fsync_dir, fsync_file
from .reshard import renamed_entries, write_checkpoint
from .safetensors_io import write_safetensors
from .sources import (
    DEFAULT_SLAB_BYTES,
    ST_OBJECTS,
    ST_PLANNER,
    ST_USER,
    Entry,
    Progress,
    Source,
    detect,
    iter_slabs,
    open_source,
)

TARGETS = ("shardckpt", "dcp", "torch", "safetensors")
# Tensors above this are exported to DCP as several row chunks, so that neither
# the writer nor a later loader needs one huge buffer.
DCP_CHUNK_BYTES = 16 << 20


# ---------------------------------------------------------------- key remapping


def _mapping(src: Source, key_map: KeyMap | None, old: str, new: str) -> tuple:
    if key_map is None and src.planner_data and old in src.planner_data:
        return tuple(src.planner_data[old])
    return (new,)


# ---------------------------------------------------------------- targets


def _to_torch(src: Source, dst: str, key_map: KeyMap | None,
              on_progress: Progress) -> None:
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    flat: dict[str, Any] = {}
    mappings: dict[str, tuple] = {}
    for nk, e in renamed_entries(src, key_map):
        if e.kind == "tensor":
            t = src.read_rows(e.key).clone()
            flat[nk] = t
            if on_progress:
                on_progress(t.numel() * t.element_size())
        else:
            flat[nk] = src.read_object(e.key)
        mappings[nk] = _mapping(src, key_map, e.key, nk)
    state = unflatten_state_dict(flat, mappings)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        fsync_file(tmp)
        os.replace(tmp, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_safetensors(src: Source, dst: str, key_map: KeyMap | None,
                    slab_bytes: int, on_progress: Progress) -> list[str]:
    """Returns the keys of objects that could not be stored (not JSON values)."""
    specs, objects, skipped = [], {}, []
    by_new: dict[str, Entry] = {}
    planner: dict[str, list] = {}
    for nk, e in renamed_entries(src, key_map):
        planner[nk] = list(_mapping(src, key_map, e.key, nk))
        if e.kind == "tensor":
            specs.append((nk, e.dtype, e.shape))
            by_new[nk] = e
            continue
        value = src.read_object(e.key)
        try:
            json.dumps(value)
            objects[nk] = value
        except TypeError:
            skipped.append(nk)
    metadata = {"format": "pt", ST_OBJECTS: json.dumps(objects),
                ST_PLANNER: json.dumps(planner),
                ST_USER: json.dumps(src.user_metadata or {}, default=str)}

    def produce(name: str) -> Iterator[memoryview]:
        e = by_new[name]
        stop = e.shape[0] if e.shape else None
        for slab in iter_slabs(src, e, 0, stop or 0, slab_bytes):
            if on_progress:
                on_progress(slab.numel() * slab.element_size())
            yield tensor_bytes(slab)

    write_safetensors(dst, specs, produce, metadata)
    return skipped


def _to_dcp(src: Source, dst: str, key_map: KeyMap | None,
            on_progress: Progress, chunk_bytes: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    flat: dict[str, Any] = {}
    mappings: dict[str, tuple] = {}
    entries: dict[str, Entry] = {}
    for nk, e in renamed_entries(src, key_map):
        entries[nk] = e
        # Tensors are meta placeholders: only shapes and dtypes until DCP asks.
        flat[nk] = (torch.empty(e.shape, dtype=e.dtype, device="meta") if e.kind == "tensor"
                    else src.read_object(e.key))
        mappings[nk] = _mapping(src, key_map, e.key, nk)

    class StreamingSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items: list[WriteItem] = []
            for fqn, obj in self.state_dict.items():
                e = entries[fqn]
                if e.kind != "tensor":
                    items += _create_write_items(fqn, obj)
                    continue
                props = TensorProperties(dtype=e.dtype, requires_grad=e.requires_grad)
                n = e.shape[0] if e.shape else 0
                rb = max(1, e.nbytes // max(1, n)) if e.shape else e.nbytes
                step = max(1, chunk_bytes // rb) if e.shape else 1
                starts = range(0, n, step) if e.shape and n > 0 else [0]
                for a in starts:
                    sizes = list(e.shape)
                    offsets = [0] * len(sizes)
                    if e.shape and n > 0:
                        offsets[0], sizes[0] = a, min(n, a + step) - a
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, torch.Size(offsets)),
                        type=WriteItemType.SHARD if len(starts) > 1 else WriteItemType.TENSOR,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                       sizes=torch.Size(sizes)),
                            properties=props, size=torch.Size(e.shape))))
            plan = SavePlan(items, planner_data=self.mappings)
            self.plan = plan
            return plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            fqn = write_item.index.fqn
            e = entries[fqn]
            ch = write_item.tensor_data.chunk
            if e.shape and e.shape[0] > 0:
                a = ch.offsets[0]
                t = src.read_rows(e.key, a, a + ch.sizes[0])
            else:
                t = src.read_rows(e.key)
            if on_progress:
                on_progress(t.numel() * t.element_size())
            return t

    parent, name = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        # One file per write item: FileSystemWriter keeps every tensor of a file
        # referenced until the file closes, which would defeat streaming.
        writer = FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1,
                                  sync_files=True)
        with quiet_no_dist():
            dcp.save(unflatten_state_dict(flat, mappings), storage_writer=writer,
                     planner=StreamingSavePlanner())
        publish_tree(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_tree(tmp: str, dst: str) -> None:
    """Put a finished export in place atomically (the old one swapped out, then removed)."""
    if os.path.isdir(dst) and not os.path.islink(dst):
        publish(tmp, dst, overwrite=True, replace_any=True)
    else:
        if os.path.lexists(dst):
            os.unlink(dst)
        os.rename(tmp, dst)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, strip_prefix: Sequence[str] = (),
            rename: Sequence[str] = (), world_size: int = 1, compression: str | None = None,
            overwrite: bool = False, slab_bytes: int = DEFAULT_SLAB_BYTES,
            dcp_chunk_bytes: int = DCP_CHUNK_BYTES,
            on_progress: Progress = None, trust_pickle: bool = False) -> dict[str, Any]:
    """Convert `src` (any supported format, detected) to `dst` in format `to`.

    Returns a summary: {"source_format", "to", "tensors", "objects", "bytes", "skipped"}.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert needs a destination different from the source")
    if to != "shardckpt" and os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite or choose another path")
    key_map = key_mapper(strip_prefix, rename)
    kind = source_format or detect(src)
    skipped: list[str] = []
    with open_source(src, kind, trust_pickle=trust_pickle) as s:
        if to == "shardckpt":
            write_checkpoint(s, dst, world_size=world_size, compression=compression,
                             key_map=key_map, slab_bytes=slab_bytes, overwrite=overwrite,
                             on_progress=on_progress)
        elif to == "torch":
            _to_torch(s, dst, key_map, on_progress)
        elif to == "safetensors":
            skipped = _to_safetensors(s, dst, key_map, slab_bytes, on_progress)
        else:
            _to_dcp(s, dst, key_map, on_progress, dcp_chunk_bytes)
        ents = list(s.entries.values())
        return {"source_format": kind, "to": to,
                "tensors": sum(e.kind == "tensor" for e in ents),
                "objects": sum(e.kind == "object" for e in ents),
                "bytes": sum(e.nbytes for e in ents), "skipped": skipped}
