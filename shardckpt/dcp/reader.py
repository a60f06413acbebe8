"""`ShardReader`: the DCP StorageReader of shardckpt, at any world size.

`dcp.load(state, storage_reader=ShardReader(path))` works directly. Each rank
reads only the blocks that cover the regions it owns now.
"""

from __future__ import annotations

import io
import os
import uuid
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..errors import CorruptCheckpointError, ShapeMismatchError
from ..format.keys import KeyMap
from ..format.names import MANIFEST_NAME
from ..io.reader import CheckpointReader
from .metadata import ItemRef, metadata_from_manifest
from .planner import SafeLoadPlanner
from .safety import safe_torch_load


class ShardReader(StorageReader):
    """Reads a shardckpt checkpoint at any world size, fetching only the blocks it needs."""

    def __init__(self, path: str | os.PathLike | None = None, *, threads: int | None = None,
                 verify: bool = True, key_map: KeyMap | None = None,
                 reader: CheckpointReader | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path) if path is not None else (reader.path if reader else None)
        self.threads = threads
        self.verify = verify
        self.key_map = key_map
        self._reader = reader
        self._owns_reader = reader is None
        self.storage_data: dict[MetadataIndex, ItemRef] = {}
        self.load_id = uuid.uuid4().hex

    @property
    def reader(self) -> CheckpointReader:
        """The open checkpoint (opened on first use: typed errors before any collective)."""
        if self._reader is None:
            self._reader = CheckpointReader(self.path, threads=self.threads, verify=self.verify,
                                            key_map=self.key_map)
        return self._reader

    @property
    def bytes_read(self) -> int:
        return 0 if self._reader is None else self._reader.bytes_read

    # Direct access without DCP or a process group (kept for callers of stop 9).
    def read_region(self, fqn: str, offsets: Any = None, sizes: Any = None) -> torch.Tensor:
        return self.reader.read_region(fqn, offsets, sizes)

    def read_object(self, fqn: str) -> Any:
        return self.reader.read_object(fqn)

    def close(self) -> None:
        if self._reader is not None and self._owns_reader:
            self._reader.close()
            self._reader = None

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and os.fspath(checkpoint_id) != self.path:
            self.close()
            self.path = os.fspath(checkpoint_id)
            self._owns_reader = True
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), MANIFEST_NAME))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = metadata_from_manifest(self.reader.manifest)
        md.storage_meta = StorageMeta(checkpoint_id=self.path, load_id=self.load_id)
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        # Every rank builds its own index from the manifest it validated; the
        # coordinator's Metadata may arrive broadcast (and would be trusted blindly).
        self.storage_data = metadata_from_manifest(self.reader.manifest).storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        fut: Future[None] = Future()
        try:
            self._read_plan(plan, planner)
            fut.set_result(None)
        except BaseException as e:
            fut.set_exception(e)
        return fut

    def _read_plan(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        by_item: dict[MetadataIndex, list[ReadItem]] = {}
        for ri in plan.items:
            by_item.setdefault(ri.storage_index, []).append(ri)
        # SafeLoadPlanner checks objects under weights_only itself; any other
        # planner (plain dcp.load) may unpickle freely, so the reader checks first.
        check_here = not isinstance(planner, SafeLoadPlanner)
        # Every read of the plan is known now: issue them ahead on parallel streams,
        # so reading range k+1 overlaps decoding range k.
        self._targets: dict[MetadataIndex, torch.Tensor] = {}
        dests: dict[Any, memoryview] = {}
        reads = self._plan_reads(by_item, planner, dests)
        self.reader.prefetch(reads, dests=dests)
        try:
            self._read_items(by_item, planner, check_here)
        finally:
            self.reader.stop_prefetch()

    def _plan_reads(self, by_item: dict[MetadataIndex, list[ReadItem]], planner: LoadPlanner,
                    dests: dict[Any, memoryview]) -> list[Any]:
        # DCP's own planners resolve a read item to a view of the state, without side
        # effects: resolved once here, a raw item is read straight into its target.
        resolvable = type(planner).resolve_tensor is DefaultLoadPlanner.resolve_tensor
        reads: list[Any] = []
        for idx, ris in by_item.items():
            ref = self.storage_data.get(idx)
            if ref is None:
                break  # reported by _read_items, after the reads before it
            item = ref.item
            if resolvable and len(ris) == 1 and ris[0].type != LoadItemType.BYTE_IO:
                target = self._in_place_target(ref, ris[0], planner)
                into = None if target is None else self.reader.reads_into(
                    item, target.reshape(-1).view(torch.uint8))
                if into is not None:
                    self._targets[idx] = target
                    dests.update(into)
                    reads.extend(into)
                    continue
            if ris[0].type == LoadItemType.BYTE_IO or ref.dtype is None:
                wanted = item.block_list()
            else:
                wanted = self.reader.region_blocks(
                    item, ref.dtype, [(ri.storage_offsets, ri.lengths) for ri in ris])
            reads.extend(self.reader.item_reads(item, wanted))
        return reads

    def _read_items(self, by_item: dict[MetadataIndex, list[ReadItem]], planner: LoadPlanner,
                    check_here: bool) -> None:
        for idx, ris in by_item.items():
            ref = self.storage_data.get(idx)
            if ref is None:
                raise CorruptCheckpointError(
                    f"{self.path}: manifest has no stored data for {idx.fqn!r} at {idx.offset}",
                    path=self.path, tensor=idx.fqn)
            if ris[0].type == LoadItemType.BYTE_IO:
                data = self.reader.object_bytes(ref.fqn)
                if check_here:
                    safe_torch_load(io.BytesIO(data), path=self.path, key=ref.fqn)
                for ri in ris:
                    planner.load_bytes(ri, io.BytesIO(data))
                continue
            self._read_tensor_item(ref, ris, planner)

    def _read_tensor_item(self, ref: ItemRef, ris: list[ReadItem], planner: LoadPlanner) -> None:
        if len(ris) == 1 and self._read_whole_chunk_in_place(ref, ris[0], planner):
            return
        regions = self.reader.chunk_regions(ref.fqn, ref.item, ref.dtype,
                                            [(ri.storage_offsets, ri.lengths) for ri in ris])
        for ri, src in zip(ris, regions):
            target = planner.resolve_tensor(ri).detach()
            if src is not None:
                if target.shape != src.shape:
                    raise ShapeMismatchError(
                        f"{self.path}: {ref.fqn!r} region {list(src.shape)} does not fit the "
                        f"destination {list(target.shape)}; the state does not match the checkpoint.")
                target.copy_(src)
            planner.commit_tensor(ri, target)

    @staticmethod
    def _in_place_target(ref: ItemRef, ri: ReadItem, planner: LoadPlanner) -> torch.Tensor | None:
        """The target of a read that covers its whole chunk and can be decoded into directly."""
        ch = ref.item
        if any(ri.storage_offsets) or tuple(ri.lengths) != tuple(ch.sizes) or not ch.nbytes:
            return None
        target = planner.resolve_tensor(ri).detach()
        if (target.device.type != "cpu" or not target.is_contiguous()
                or target.dtype != ref.dtype or tuple(target.shape) != tuple(ch.sizes)):
            return None
        return target

    def _read_whole_chunk_in_place(self, ref: ItemRef, ri: ReadItem, planner: LoadPlanner) -> bool:
        """The common case (same sharding as at save): decode straight into the target."""
        target = self._targets.pop(ri.storage_index, None)
        if target is None:
            target = self._in_place_target(ref, ri, planner)
        if target is None:
            return False
        self.reader.read_into(ref.fqn, ref.item, target.reshape(-1).view(torch.uint8))
        planner.commit_tensor(ri, target)
        return True
