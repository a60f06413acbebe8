"""DCP storage layer: `ShardWriter` / `ShardReader`.

`dcp.save(state, storage_writer=ShardWriter(path))` and
`dcp.load(state, storage_reader=ShardReader(path))` work directly. Each rank
writes one data file of its own into a hidden staging directory; the
coordinator commits the manifest and publishes the directory atomically.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import queue
import re
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future as Future_
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    ReadItem,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from . import codec
from . import format as fmt
from .commit import abort_staging, begin_staging, commit_staging
from .errors import (
    CorruptCheckpointError,
    SaveFailedError,
    ShapeMismatchError,
    UnsafeObjectError,
)

log = logging.getLogger("shardckpt")

# How many encoded bytes may wait for the writer thread before encoding pauses.
_WRITE_QUEUE_BYTES = 256 << 20
# Bytes written between background fdatasync calls of a data file.
_SYNC_EVERY = 64 << 20


def _versions() -> dict:
    from . import __version__

    return {"shardckpt": __version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "codec_path": codec.active_path()}


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The row-major bytes of a tensor as a zero-copy view where possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


@dataclass
class _RankPlan:
    """What the coordinator tells each rank: where to write."""

    staging: str
    rank: int


class DataFileWriter:
    """Appends encoded items to one data file and fsyncs it on close.

    Encoding (on the codec pool) overlaps with writing (on a writer thread); the
    whole-file crc32 is computed on the write pass, so no byte is read twice.
    """

    def __init__(self, path: str, cfg: codec.CodecConfig, threads: int | None = None) -> None:
        self.cfg = cfg
        self.threads = threads
        self.size = 0
        self._synced = 0
        self.crc = 0
        self.raw_bytes = 0
        self._queued = 0
        self._f = open(path, "wb", buffering=0)
        self._q: queue.Queue = queue.Queue()
        self._budget = threading.Semaphore(max(1, _WRITE_QUEUE_BYTES // cfg.block_size))
        self._err: list[BaseException] = []
        self._th = threading.Thread(target=self._drain, name="shardckpt-writer", daemon=True)
        self._th.start()

    def _drain(self) -> None:
        while True:
            blob = self._q.get()
            if blob is None:
                return
            try:
                if not self._err:
                    # An unbuffered write may be short (disk filling up); the retry
                    # then raises ENOSPC instead of leaving a silently short file.
                    view = memoryview(blob)
                    while view:
                        n = self._f.write(view)
                        if not n:
                            raise OSError(f"write to {self._f.name} made no progress")
                        view = view[n:]
                    self.crc = zlib.crc32(blob, self.crc)
                    self.size += len(blob)
                    if self.size - self._synced >= _SYNC_EVERY:
                        # Flush while the encoder keeps going, so the final fsync
                        # only waits for the tail instead of the whole file.
                        os.fdatasync(self._f.fileno())
                        self._synced = self.size
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                self._err.append(e)
            finally:
                self._budget.release()

    def append(self, raw: memoryview, group: int) -> dict[str, Any]:
        """Encode and queue one item; returns its storage record (offset, blocks, ...)."""
        return self._queue(codec.encode_buffer(raw, group, self.cfg, self.threads), len(raw))

    def append_many(self, items: Iterable[tuple[memoryview, int]]) -> list[dict[str, Any]]:
        """Encode several items at once (small ones in parallel), write them in order.

        A model has many tensors smaller than a block; encoded one after another
        they would use one core. `items` is consumed lazily, a bounded window ahead.
        """
        threads = self.threads or codec.default_threads()
        ex = codec.item_pool(threads)
        window: deque[tuple[int, Future_]] = deque()
        ahead = 0
        out: list[dict[str, Any]] = []
        for raw, group in items:
            inner = 1 if len(raw) <= self.cfg.block_size else threads
            window.append((len(raw), ex.submit(codec.encode_buffer, raw, group, self.cfg, inner)))
            ahead += len(raw)
            while len(window) > 2 * threads or ahead > _WRITE_QUEUE_BYTES:
                n, fut = window.popleft()
                ahead -= n
                out.append(self._queue(fut.result(), n))
        while window:
            n, fut = window.popleft()
            out.append(self._queue(fut.result(), n))
        return out

    def _queue(self, blocks: list[tuple[bytes, list]], nbytes: int) -> dict[str, Any]:
        offset = self._queued
        recs = []
        for stored, rec in blocks:
            self._budget.acquire()
            if self._err:
                raise self._err[0]
            self._q.put(stored)
            self._queued += len(stored)
            recs.append(rec)
        self.raw_bytes += nbytes
        return {"offset": offset, "length": self._queued - offset, "nbytes": nbytes,
                "blocks": recs}

    def close(self) -> None:
        if self._f.closed:
            return
        self._q.put(None)
        self._th.join()
        try:
            if not self._err:
                os.fsync(self._f.fileno())
        finally:
            self._f.close()
        if self._err:
            raise self._err[0]

    def __enter__(self) -> DataFileWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error wins; stop the writer without masking it
            self._q.put(None)
            self._th.join()
            self._f.close()


class ShardWriter(StorageWriter):
    """Writes a shardckpt checkpoint; one data file per rank, atomic commit by the coordinator."""

    def __init__(self, path: str | os.PathLike | None = None, *, compression: str = "zstd",
                 level: int = 1, block_size: int = fmt.DEFAULT_BLOCK_SIZE,
                 threads: int | None = None, overwrite: bool = True,
                 user_metadata: dict | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path) if path is not None else None
        self.cfg = codec.CodecConfig(compression=compression, level=level, block_size=block_size)
        self.threads = threads
        self.overwrite = overwrite
        self.user_metadata = dict(user_metadata or {})
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._plans: list[SavePlan] = []
        self._staging: str | None = None

    # -- StorageWriter protocol
    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.save_id = uuid.uuid4().hex
        self._staging = None

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
        staging = begin_staging(self.path, overwrite=self.overwrite, save_id=self.save_id,
                                world_size=len(plans))
        self._staging = staging
        self._plans = [dataclasses.replace(p, storage_data=_RankPlan(staging, i))
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
        rel = fmt.data_file_name(info.rank)
        t0 = time.perf_counter()
        if not plan.items:
            return []
        results: list[WriteResult] = []
        file_info: dict[str, Any] = {"file": rel, "rank": info.rank}
        def payloads() -> Iterator[tuple[memoryview, int]]:
            for item in plan.items:
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    yield memoryview(data.getbuffer()).cast("B"), 1
                else:
                    yield tensor_bytes(data), fmt.group_size(data.dtype)

        with DataFileWriter(os.path.join(info.staging, rel), self.cfg, self.threads) as out:
            records = out.append_many(payloads())
        for item, sd in zip(plan.items, records):
            sd.update(file=rel, fileinfo=file_info)
            results.append(WriteResult(index=item.index, size_in_bytes=sd["length"],
                                       storage_data=sd))
        file_info["size"], file_info["crc32"] = out.size, out.crc
        dt = time.perf_counter() - t0
        log.debug("rank %d wrote %s: %d -> %d bytes in %.3fs", info.rank, rel, out.raw_bytes,
                  out.size, dt)
        return results

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        final = os.path.abspath(self.path)
        staging = self._staging
        if staging is None:
            raise SaveFailedError(f"{final}: finish() without a prepared plan")
        expected = {i: len(p.items) for i, p in enumerate(self._plans)}
        if len(results) != len(expected):
            raise SaveFailedError(
                f"{final}: {len(results)} of {len(expected)} ranks reported write results; "
                f"nothing was committed. Retry the save.")
        files: dict[str, dict] = {}
        by_index: dict[MetadataIndex, dict] = {}
        for rank, res in enumerate(results):
            if len(res) != expected[rank]:
                raise SaveFailedError(
                    f"{final}: rank {rank} reported {len(res)} of {expected[rank]} items; "
                    f"nothing was committed. Retry the save.")
            for r in res:
                sd = dict(r.storage_data)
                fi = sd.pop("fileinfo")
                files[fi["file"]] = {"rank": fi["rank"], "size": fi["size"], "crc32": fi["crc32"]}
                by_index[r.index] = sd
        for rel, fi in files.items():
            p = os.path.join(staging, rel)
            try:
                size = os.path.getsize(p)
            except OSError:
                size = -1
            if size != fi["size"]:
                raise SaveFailedError(
                    f"{p} (rank {fi['rank']}): on disk {size} bytes, reported {fi['size']}; "
                    f"nothing was committed. Check the filesystem and retry.")
        tensors: dict[str, dict] = {}
        objects: dict[str, dict] = {}
        for fqn, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                chunks = []
                for ch in md.chunks:
                    sd = by_index.get(MetadataIndex(fqn, ch.offsets))
                    if sd is None:
                        raise SaveFailedError(f"{final}: no rank wrote chunk {list(ch.offsets)} "
                                              f"of {fqn!r}; nothing was committed.")
                    chunks.append({"offsets": list(ch.offsets), "sizes": list(ch.sizes), **sd})
                tensors[fqn] = {"dtype": fmt.dtype_name(md.properties.dtype),
                                "shape": list(md.size),
                                "requires_grad": bool(md.properties.requires_grad),
                                "chunks": chunks}
            else:
                sd = by_index.get(MetadataIndex(fqn))
                if sd is None:
                    raise SaveFailedError(f"{final}: no rank wrote object {fqn!r}; "
                                          f"nothing was committed.")
                objects[fqn] = sd
        manifest = fmt.make_manifest(
            world_size=len(results), files=files, tensors=tensors, objects=objects,
            planner_data=metadata.planner_data, codec=self.cfg.to_json(),
            user_metadata=self.user_metadata, versions=_versions())
        commit_staging(staging, final, manifest)
        self._staging = None

    def abort(self) -> None:
        """Remove this save's staging directory (called by shardckpt.save on failure)."""
        abort_staging(self._staging)
        self._staging = None


# ---------------------------------------------------------------- reading


def key_mapper(strip_prefix: str | Sequence[str] | None = None,
               rename: dict[str, str] | Sequence[tuple[str, str]] | None = None,
               ) -> Callable[[str], str] | None:
    """Checkpoint key -> state key: strip prefixes (`module.`), then regex renames in order."""
    prefixes = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or ())
    rules = list(rename.items()) if isinstance(rename, dict) else list(rename or ())
    compiled = [(re.compile(p), r) for p, r in rules]
    if not prefixes and not compiled:
        return None

    def fn(key: str) -> str:
        for p in prefixes:
            # Strip at any depth: "model.module.w" -> "model.w", as wrappers nest.
            key = key[len(p):] if key.startswith(p) else key.replace("." + p, ".")
        for pat, repl in compiled:
            key = pat.sub(repl, key)
        return key

    return fn


def rename_manifest(manifest: dict, key_map: Callable[[str], str]) -> dict:
    """A copy of the manifest with every key mapped; collisions are an error."""
    out = dict(manifest)
    for section in ("tensors", "objects"):
        renamed: dict[str, Any] = {}
        for k, v in manifest[section].items():
            nk = key_map(k)
            if nk in renamed:
                raise ValueError(f"key mapping sends two checkpoint keys to {nk!r}; "
                                 f"adjust strip_prefix/rename")
            renamed[nk] = v
        out[section] = renamed
    pd = manifest.get("planner_data")
    if isinstance(pd, dict):
        out["planner_data"] = {key_map(k): v for k, v in pd.items()}
    return out


def metadata_from_manifest(manifest: dict) -> Metadata:
    sdm: dict[str, Any] = {}
    storage: dict[MetadataIndex, dict] = {}
    for fqn, t in manifest["tensors"].items():
        props = TensorProperties(dtype=fmt.dtype_from_name(t["dtype"]),
                                 requires_grad=t.get("requires_grad", False))
        chunks = []
        for ch in t["chunks"]:
            off = torch.Size(ch["offsets"])
            chunks.append(ChunkStorageMetadata(offsets=off, sizes=torch.Size(ch["sizes"])))
            storage[MetadataIndex(fqn, off)] = {**ch, "fqn": fqn, "dtype": t["dtype"]}
        sdm[fqn] = TensorStorageMetadata(properties=props, size=torch.Size(t["shape"]),
                                         chunks=chunks)
    for fqn, o in manifest["objects"].items():
        sdm[fqn] = BytesStorageMetadata()
        storage[MetadataIndex(fqn)] = {**o, "fqn": fqn}
    return Metadata(state_dict_metadata=sdm,
                    planner_data=fmt.decode_planner_data(manifest.get("planner_data")),
                    storage_data=storage)


def _row_major_strides(sizes: list[int]) -> list[int]:
    strides = [1] * len(sizes)
    for i in range(len(sizes) - 2, -1, -1):
        strides[i] = strides[i + 1] * sizes[i + 1]
    return strides


def safe_torch_load(buf: io.BytesIO, *, path: str, key: str) -> Any:
    """torch.load under weights_only rules: a checkpoint can never run code on load."""
    try:
        return torch.load(buf, weights_only=True)
    except Exception as e:
        raise UnsafeObjectError(
            f"{path}: object {key!r} cannot be loaded under weights_only rules ({e}). "
            f"shardckpt never unpickles arbitrary objects; store plain types or tensors.") from e


class ShardReader(StorageReader):
    """Reads a shardckpt checkpoint at any world size, fetching only the blocks it needs."""

    def __init__(self, path: str | os.PathLike | None = None, *, threads: int | None = None,
                 verify: bool = True, key_map: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.path = os.fspath(path) if path is not None else None
        self.threads = threads
        self.verify = verify
        self.key_map = key_map
        self.manifest: dict | None = None
        self.storage_data: dict[MetadataIndex, dict] = {}
        self.load_id = uuid.uuid4().hex
        self.bytes_read = 0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None:
            self.path = os.fspath(checkpoint_id)
        self.manifest = None
        self.bytes_read = 0
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return os.path.isfile(os.path.join(os.fspath(checkpoint_id), fmt.MANIFEST_NAME))

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = metadata_from_manifest(self._ensure_manifest())
        md.storage_meta = StorageMeta(checkpoint_id=self.path, load_id=self.load_id)
        return md

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kwargs: Any) -> None:
        self._ensure_manifest()
        self.storage_data = metadata.storage_data

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

    # -- reading internals
    def _read_plan(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        by_item: dict[MetadataIndex, list[ReadItem]] = {}
        for ri in plan.items:
            by_item.setdefault(ri.storage_index, []).append(ri)
        for idx, ris in by_item.items():
            sd = self.storage_data.get(idx)
            if sd is None:
                raise CorruptCheckpointError(
                    f"{self.path}: manifest has no stored data for {idx.fqn!r} at {idx.offset}",
                    path=self.path, tensor=idx.fqn)
            if ris[0].type == torch.distributed.checkpoint.planner.LoadItemType.BYTE_IO:
                data = self._read_range(sd, 0, sd["nbytes"]).numpy().tobytes()
                # Checked here under weights_only, so that a planner with laxer rules
                # (plain dcp.load) never unpickles anything arbitrary.
                safe_torch_load(io.BytesIO(data), path=self.path, key=idx.fqn)
                for ri in ris:
                    planner.load_bytes(ri, io.BytesIO(data))
                continue
            self._read_tensor_item(sd, ris, planner)

    def _read_tensor_item(self, sd: dict, ris: list[ReadItem], planner: LoadPlanner) -> None:
        if len(ris) == 1 and self._read_whole_chunk_in_place(sd, ris[0], planner):
            return
        regions = self._chunk_regions(sd, [(ri.storage_offsets, ri.lengths) for ri in ris])
        for ri, src in zip(ris, regions):
            target = planner.resolve_tensor(ri).detach()
            if src is not None:
                if target.shape != src.shape:
                    raise ShapeMismatchError(
                        f"{self.path}: {sd['fqn']!r} region {list(src.shape)} does not fit the "
                        f"destination {list(target.shape)}; the state does not match the checkpoint.")
                target.copy_(src)
            planner.commit_tensor(ri, target)

    def _read_whole_chunk_in_place(self, sd: dict, ri: ReadItem, planner: LoadPlanner) -> bool:
        """The common case (same sharding as at save): decode straight into the target."""
        if any(ri.storage_offsets) or list(ri.lengths) != list(sd["sizes"]) or not sd["nbytes"]:
            return False
        target = planner.resolve_tensor(ri).detach()
        if (target.device.type != "cpu" or not target.is_contiguous()
                or target.dtype != fmt.dtype_from_name(sd["dtype"])
                or list(target.shape) != list(sd["sizes"])):
            return False
        raw = target.reshape(-1).view(torch.uint8)
        self._read_span(sd, 0, sd["nbytes"], out=raw)
        planner.commit_tensor(ri, target)
        return True

    def _chunk_regions(self, sd: dict, boxes: list[tuple[Any, Any]]) -> list[torch.Tensor | None]:
        """Views of the boxes (offsets, lengths within one stored chunk), from one read."""
        dtype = fmt.dtype_from_name(sd["dtype"])
        esize = torch.empty((), dtype=dtype).element_size()
        strides = _row_major_strides(list(sd["sizes"]))
        spans: list[tuple[int, int] | None] = []
        for so, ln in boxes:
            if any(x == 0 for x in ln):
                spans.append(None)
                continue
            first = sum(o * s for o, s in zip(so, strides))
            last = sum((o + n - 1) * s for o, n, s in zip(so, ln, strides))
            spans.append((first * esize, (last + 1) * esize))
        live = [s for s in spans if s is not None]
        if not live:
            return [None] * len(boxes)
        blocks = fmt.item_blocks(sd)
        need: dict[int, fmt.Block] = {}
        for (so, ln), span in zip(boxes, spans):
            if span is not None:
                starts, run = fmt.box_runs(list(so), list(ln), list(sd["sizes"]))
                for b in fmt.blocks_for_runs(blocks, starts * esize, run * esize):
                    need[b.offset] = b
        buf, base = self._read_blocks(sd, blocks, list(need.values()))
        out: list[torch.Tensor | None] = []
        for (_, ln), span in zip(boxes, spans):
            if span is None:
                out.append(None)
                continue
            src = buf[span[0] - base: span[1] - base].view(dtype)
            # as_strided's offset is absolute in the storage, not relative to the view
            out.append(src.as_strided(list(ln), strides, src.storage_offset()))
        return out

    # -- direct access for tools (inspect, diff, reshard, convert): no DCP, no process group
    def _ensure_manifest(self) -> dict:
        if self.manifest is None:
            manifest = fmt.read_manifest(self.path)
            if self.key_map is not None:
                manifest = rename_manifest(manifest, self.key_map)
            self.manifest = manifest
            self.storage_data = metadata_from_manifest(manifest).storage_data
        return self.manifest

    def read_region(self, fqn: str, offsets: list[int] | None = None,
                    sizes: list[int] | None = None) -> torch.Tensor:
        """A box of a stored tensor (the whole tensor by default), reading only its blocks."""
        t = self._ensure_manifest()["tensors"][fqn]
        shape = list(t["shape"])
        offsets = [0] * len(shape) if offsets is None else list(offsets)
        sizes = shape if sizes is None else list(sizes)
        out = torch.empty(sizes, dtype=fmt.dtype_from_name(t["dtype"]))
        for ch in t["chunks"]:
            lo = [max(a, c) for a, c in zip(offsets, ch["offsets"])]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, ch["offsets"], ch["sizes"])]
            if any(h <= low for low, h in zip(lo, hi)) and shape:
                continue
            sd = self.storage_data[MetadataIndex(fqn, torch.Size(ch["offsets"]))]
            lengths = [h - low for low, h in zip(lo, hi)]
            rel = [low - c for low, c in zip(lo, ch["offsets"])]
            (src,) = self._chunk_regions(sd, [(rel, lengths)])
            if src is None:
                continue
            dst = out
            for d, (low, a, n) in enumerate(zip(lo, offsets, lengths)):
                dst = dst.narrow(d, low - a, n)
            dst.copy_(src)
        return out

    def read_object(self, fqn: str) -> Any:
        """A stored non-tensor value, under weights_only rules."""
        o = self._ensure_manifest()["objects"][fqn]
        raw = self._read_range({**o, "fqn": fqn}, 0, o["nbytes"])
        return safe_torch_load(io.BytesIO(raw.numpy().tobytes()), path=self.path, key=fqn)

    def _read_range(self, sd: dict, start: int, end: int) -> torch.Tensor:
        buf, base = self._read_span(sd, start, end)
        return buf[start - base:end - base]

    def _read_span(self, sd: dict, start: int, end: int,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Decode the blocks covering raw bytes [start, end) of an item; returns (buffer,
        raw offset of buffer[0]). `out`, if given, is a uint8 buffer for the whole item."""
        blocks = fmt.item_blocks(sd)
        return self._read_blocks(sd, blocks, fmt.blocks_for_range(blocks, start, end), out, start)

    def _read_blocks(self, sd: dict, blocks: list[fmt.Block], wanted: list[fmt.Block],
                     out: torch.Tensor | None = None, lo: int = 0) -> tuple[torch.Tensor, int]:
        """Read, verify and decode `wanted` blocks of an item; the buffer spans from the
        first to the last of them (bytes of blocks not wanted stay unset)."""
        chosen = sorted(wanted, key=lambda b: b.raw_start)
        if not chosen:
            return torch.empty(0, dtype=torch.uint8), lo
        if out is None:
            base = chosen[0].raw_start
            end = chosen[-1].raw_start + chosen[-1].raw_len
            out = torch.empty(end - base, dtype=torch.uint8)
        else:
            base = 0
        outmv = memoryview(out.numpy()).cast("B") if out.numel() else memoryview(b"")
        path = os.path.join(self.path, sd["file"])
        rank = fmt.file_rank(self.manifest, sd["file"])
        fqn = sd["fqn"]
        index_of = {b.offset: i for i, b in enumerate(blocks)}
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{path} (rank {rank}): data file is missing, needed for {fqn!r}; the checkpoint "
                f"is damaged, load an earlier one.", path=path, rank=rank, tensor=fqn) from None
        try:
            for off, length, run in fmt.coalesce(chosen):
                data = os.pread(fd, length, off)
                self.bytes_read += len(data)
                first = run[0]
                raw_end = run[-1].raw_start + run[-1].raw_len
                # Blocks of one run are consecutive blocks of one item: one batch call
                # decodes them in parallel (native: GIL released) straight into place.
                codec.decode_item_blocks(
                    memoryview(data), [b.record for b in run],
                    outmv[first.raw_start - base: raw_end - base], self.threads, self.verify,
                    path=path, rank=rank, tensor=fqn, first_index=index_of[first.offset])
        finally:
            os.close(fd)
        return out, base
