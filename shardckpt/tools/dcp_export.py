"""Export to a stock DCP directory (FileSystemWriter layout) while streaming.

DCP's save wants the whole state; a planner that writes row chunks and reads
each from the source only when DCP asks for it keeps memory near one chunk.
"""

from __future__ import annotations

import os
import shutil
import uuid
from typing import Any

import torch

from ..api import quiet_no_dist
from ..format.keys import KeyMap
from ..io.commit import publish
from .reshard import renamed_entries
from .sources import Entry, Progress, Source

# Tensors above this are exported to DCP as several row chunks, so that neither
# the writer nor a later loader needs one huge buffer.
DCP_CHUNK_BYTES = 16 << 20


def mapping_of(src: Source, key_map: KeyMap | None, old: str, new: str) -> tuple:
    if key_map is None and src.planner_data and old in src.planner_data:
        return tuple(src.planner_data[old])
    return (new,)


# ---------------------------------------------------------------- selection


def to_dcp(src: Source, dst: str, key_map: KeyMap | None,
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
        mappings[nk] = mapping_of(src, key_map, e.key, nk)

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


