"""`ShardWriter`: the DCP StorageWriter of shardckpt.

`dcp.save(state, storage_writer=ShardWriter(path))` works directly. Each rank
writes one data file of its own into a hidden staging directory (through a
sink: io/sinks.open_sink, with parallel streams); the coordinator assembles the
manifest and commits it (io/commit.py). Repeated saves of one structure work
with DCP's plan caching (dcp/planner.SafeSavePlanner): a rank whose plan did
not change gets an empty plan back, still carrying this save's staging dir.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .. import codec
from ..errors import SaveFailedError
from ..format import DEFAULT_BLOCK_SIZE, data_file_name, group_size, runtime_versions
from ..io import base_index, writer_process
from ..io.bases import refuse_overwrite_of_base
from ..io.data_writer import DataFileWriter
from ..io.storage import CheckpointWrite, is_url, join, norm_path, storage_for
from ..io.tensor_bytes import tensor_bytes
from .metadata import RankFile, manifest_from_results

log = logging.getLogger("shardckpt")


@dataclasses.dataclass(frozen=True)
class _RankPlan:
    """What the coordinator tells each rank: where to write."""

    staging: str
    rank: int
    rel: str = ""  # the data file's name (object stores: unique per save)
    base: str | None = None  # incremental: the base every rank dedupes against


@dataclasses.dataclass(frozen=True)
class _RankFileStats(RankFile):
    """A RankFile plus what this rank's compression policy did (summed into the manifest)."""

    items_compressed: int = 0
    items_raw: int = 0


def _resolved(plan: SavePlan, planner: SavePlanner) -> Iterator[tuple[Any, int]]:
    """Each item's data (a tensor, or the bytes of a BYTE_IO item) and its byte group."""
    for item in plan.items:
        data = planner.resolve_data(item)
        if item.type == WriteItemType.BYTE_IO:
            yield memoryview(data.getbuffer()).cast("B"), 1
        else:
            yield data, group_size(data.dtype)


class ShardWriter(StorageWriter):
    """Writes a shardckpt checkpoint; one data file per rank, atomic commit by the coordinator."""

    committed = False  # rank 0, once the manifest is published

    def __init__(self, path: str | os.PathLike | None = None, *, compression: str = "zstd",
                 level: int = 1, block_size: int = DEFAULT_BLOCK_SIZE,
                 threads: int | None = None, overwrite: bool = True,
                 user_metadata: dict | None = None,
                 storage_options: dict | None = None,
                 base: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.base = None if base is None else os.fspath(base)
        self._base_used: str | None = None
        self.path = os.fspath(path) if path is not None else None
        self.cfg = codec.CodecConfig(compression=compression, level=level, block_size=block_size)
        self.threads = threads
        self.overwrite = overwrite
        self.user_metadata = dict(user_metadata or {})
        self.storage_options = storage_options
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._plans: list[SavePlan] = []
        self._expected: dict[int, int | None] = {}
        self._commit: CheckpointWrite | None = None
        self._base_index: base_index.BaseIndex | None = None  # the coordinator's choice

    # -- StorageWriter protocol
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self._commit = None
        self.committed = False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.path, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if self.path is None:
            raise ValueError("ShardWriter needs a path (or dcp.save(checkpoint_id=...))")
        # Bound to the bucket first: the base index and the overwrite check reach the
        # store through the same options as the commit.
        storage_for(self.path, self.storage_options)
        self._base_index = base_index.choose_base(self.base, self.path, plans)
        self._base_used = None if self._base_index is None else self._base_index.base
        if self.overwrite:
            refuse_overwrite_of_base(norm_path(self.path))
        self._commit = storage_for(self.path, self.storage_options).begin_commit(
            self.path, overwrite=self.overwrite, save_id=self.save_id, world_size=len(plans))
        c = self._commit
        # An unusable plan is DCP's plan cache saying "as last time": the planner tells
        # how many items that is; every plan (empty ones too) carries the staging dir.
        self._expected = {i: len(p.items) if p.usable else getattr(p.planner_data, "items", None)
                          for i, p in enumerate(plans)}
        self._plans = [dataclasses.replace(p, storage_data=_RankPlan(c.staging, i, c.data_name(i),
                                                                     self._base_used))
                       for i, p in enumerate(plans)]
        return self._plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        info: _RankPlan = plan.storage_data
        fut: Future[list[WriteResult]] = Future()
        try:
            fut.set_result(self._write_rank_file(plan, planner, info))
        except BaseException as e:  # surfaced by DCP on every rank
            fut.set_exception(e)
        return fut

    def _write_rank_file(self, plan: SavePlan, planner: SavePlanner,
                         info: _RankPlan) -> list[WriteResult]:
        if not plan.items:
            return []
        rel = info.rel or data_file_name(info.rank)
        t0 = time.perf_counter()

        path = join(info.staging, rel)
        # The coordinator's own rank dedupes with the index it chose the base by.
        chosen = self._base_index
        index = self._index = (chosen if chosen is not None and chosen.base == info.base
                               else base_index.index_for(info.base, self.path))
        items: Iterable[tuple[Any, int]] = _resolved(plan, planner)
        arena = writer_process.current_arena()
        if (arena is not None and index is None and not is_url(path)
                and writer_process.mode() != "thread"):
            # Resolved once for both writers: resolve_data hands out an object's serialized
            # bytes only once (SafeSavePlanner), and the thread writes what the helper declines.
            items = list(items)
            done = self._write_in_helper(plan, info, rel, path, arena, items)
            if done is not None:
                return done

        def payloads() -> Iterator[tuple[memoryview, int]]:
            for data, group in items:
                yield (data if isinstance(data, memoryview) else tensor_bytes(data)), group
        sink = storage_for(path, self.storage_options).open_sink(path, info.rank)
        # borrow: the state (or an async save's staging copy) outlives this call and DCP
        # does not touch it meanwhile, so raw blocks are written from it without a copy.
        with DataFileWriter(sink, rel, self.cfg, self.threads, rank=info.rank,
                            adaptive=True, base_index=index, borrow=True) as out:
            # Each item's place, for the base's item there (BaseIndex.reuse): only when
            # there is a base.
            where = None if index is None else [
                (it.index.fqn, None if it.index.offset is None else tuple(it.index.offset))
                for it in plan.items]
            records = out.append_many(payloads(), where)
        return self._results(plan, info, rel, records, out.size, out.crc, out.codec_summary(),
                             out.raw_bytes, t0)

    def _results(self, plan: SavePlan, info: _RankPlan, rel: str, records: list, size: int,
                 crc: int, stats: dict, raw_bytes: int, t0: float) -> list[WriteResult]:
        rf = _RankFileStats(file=rel, rank=info.rank, size=size, crc32=crc,
                            items_compressed=stats.get("items_compressed", 0),
                            items_raw=stats.get("items_raw", 0))
        log.debug("rank %d wrote %s: %d -> %d bytes in %.3fs", info.rank, rel, raw_bytes,
                  size, time.perf_counter() - t0)
        return [WriteResult(index=item.index, size_in_bytes=rec.length, storage_data=(rec, rf))
                for item, rec in zip(plan.items, records)]

    def _write_in_helper(self, plan: SavePlan, info: _RankPlan, rel: str, path: str,
                         arena: writer_process.SharedArena,
                         items: list[tuple[Any, int]]) -> list[WriteResult] | None:
        """An async save's data file written by the helper process (io/writer_process.py), or
        None when this thread should write it: the file is small (auto mode), an item is not
        in the staging arena, or no helper can be started here."""
        t0 = time.perf_counter()
        pieces = writer_process.pieces_for(
            arena, items, writer_process.AUTO_MIN_BYTES if writer_process.mode() == "auto" else 0)
        if pieces is None:
            return None
        try:
            proc = writer_process.helper()
            r = proc.write_file(arena, path=path, rel=rel, rank=info.rank, cfg=self.cfg,
                                threads=self.threads, pieces=pieces)
        except writer_process.HelperUnavailable as e:
            writer_process.give_up(str(e))
            return None
        return self._results(plan, info, rel, r["records"], r["size"], r["crc"], r["stats"],
                             r["raw_bytes"], t0)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        final = norm_path(self.path)
        if self._commit is None:
            raise SaveFailedError(f"{final}: finish() without a prepared plan")
        # A count unknown (another planner's cache) is checked by the manifest's
        # completeness check: every chunk of the metadata must have been written.
        expected = {i: n if n is not None else len(results[i]) if i < len(results) else 0
                    for i, n in self._expected.items()}
        index = None
        if self._base_used is not None:
            index = getattr(self, "_index", None) or base_index.BaseIndex.open(self._base_used, final)
        manifest = manifest_from_results(
            metadata, results, expected, final=final, codec=self._codec_json(results),
            user_metadata=self.user_metadata, versions=runtime_versions(),
            like=None if index is None else index.manifest)
        if index is not None:
            manifest = dataclasses.replace(manifest, bases=index.bases_for(manifest))
        staging = self._commit.staging
        for rel, fi in manifest.files.items():
            if is_url(staging):
                break  # an object store's commit checks every size itself (objstore/commit.py)
            p = os.path.join(staging, rel)
            try:
                size = os.path.getsize(p)
            except OSError:
                size = -1
            if size != fi.size:
                raise SaveFailedError(
                    f"{p} (rank {fi.rank}): on disk {size} bytes, reported {fi.size}; "
                    f"nothing was committed. Check the filesystem and retry.")
        commit = self._commit
        commit.finalize(manifest)
        self._commit = None
        self.committed = True  # a failure from here on (DCP's last collective) is after it
        # DCP broadcasts this Metadata to every rank as dcp.save's return value:
        # the totals reach ranks that never saw the manifest.
        metadata.storage_data = {
            "bytes_written": sum(f.size for f in manifest.files.values()) + commit.manifest_bytes,
            "bytes_logical": sum(c.nbytes for t in manifest.tensors.values() for c in t.chunks)
            + sum(o.nbytes for o in manifest.objects.values())}

    def _codec_json(self, results: list[list[WriteResult]]) -> dict:
        out = self.cfg.to_json()
        if self.cfg.compression != "zstd":
            return out
        done = {0: 0, 1: 0}
        for res in results:
            rf = res[0].storage_data[1] if res else None
            if isinstance(rf, _RankFileStats):
                done[0] += rf.items_compressed
                done[1] += rf.items_raw
        # Readers ignore these fields: each block record says how it was stored.
        out.update(adaptive=True, items_compressed=done[0], items_raw=done[1])
        return out

    def abort(self) -> None:
        """Remove this save's staging directory (called by shardckpt.save on failure)."""
        if self._commit is not None:
            self._commit.abort()
        self._commit = None
