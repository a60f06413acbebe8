"""The data-file writer: encoded items appended to one data file through a sink.

Encoding (on the codec pool) overlaps with writing (a writer thread feeds the
sink, which writes with parallel streams); the whole-file crc32 is combined from
the blocks' crc32s and the size counted on the write pass, so no byte is read
again and every sink gets them.
With compression="zstd" each item is compressed or stored raw, whichever the
measured encode and storage rates say is faster (io/policy.py).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future as Future_
from dataclasses import replace
from typing import Any

from .. import codec
from ..format import StoredItem
from .base_index import BaseIndex
from .crc_combine import crc32_combine
from .dedupe import Encoded, encode_item, referenced
from .policy import CompressionPolicy, policy_for, remember
from .sinks import DataSink, final_of_staged, open_sink, typed_write_error

__all__ = ["DataFileWriter", "typed_write_error", "final_of_staged"]

# How many encoded bytes may wait for the writer thread before encoding pauses. It
# is also how far ahead of the measured storage rate the compression policy decides:
# enough to keep the sink's streams fed, not so much that a slow disk is noticed late.
_WRITE_QUEUE_BYTES = 64 << 20


def _local_sink(path: str, rank: int | None) -> DataSink:
    return open_sink(os.path.dirname(path) or ".", os.path.basename(path), rank=rank)


# Items up to this size are encoded on the calling thread: for a tensor of a few KiB
# the hand-off to a worker (and the GIL passed between the threads for each native
# call) costs several times the encode itself (measured: 96 LoRA tensors of 4-12 KiB,
# 2.5 ms encoded in turn, 12-16 ms through the workers on 2 cores).
_INLINE_BYTES = 64 << 10
# Bytes of items hashed in one call when saving against a base: enough that the per-call
# cost (and the GIL hand-off) is spread over many small tensors, small enough that
# little is held ahead of the writer.
_HASH_BATCH_BYTES = 16 << 20
_HASH_BATCH_ITEMS = 256


def _hashed_batches(items: Iterable[tuple[memoryview, int]], block_size: int, threads: int,
                    ex: Any) -> Iterator[tuple[memoryview, int, list[bytes]]]:
    """(raw, group, block digests) of each item, hashed a batch of items at a time on `ex`
    (the GIL released): the next batch is gathered, and this one's items settled, while
    a batch is hashed."""
    pending: tuple[list[tuple[memoryview, int]], Future_] | None = None
    for batch in _batches(items):
        fut = ex.submit(codec.hash_buffers, [raw for raw, _ in batch], block_size, threads)
        if pending is not None:
            yield from _with_digests(*pending)
        pending = (batch, fut)
    if pending is not None:
        yield from _with_digests(*pending)


def _batches(items: Iterable[tuple[memoryview, int]]) -> Iterator[list[tuple[memoryview, int]]]:
    batch: list[tuple[memoryview, int]] = []
    size = 0
    for raw, group in items:
        batch.append((raw, group))
        size += len(raw)
        if size >= _HASH_BATCH_BYTES or len(batch) >= _HASH_BATCH_ITEMS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _with_digests(batch: list[tuple[memoryview, int]],
                  fut: Future_) -> Iterator[tuple[memoryview, int, list[bytes]]]:
    for (raw, group), d in zip(batch, fut.result()):
        yield raw, group, d


# Blocks up to this size are joined into one write (and checksummed once) by the writer
# thread; larger ones are written as they are (no copy).
_JOIN_BYTES = 64 << 10


def _coalesced(job: list[tuple[Any, int]]) -> Iterator[tuple[Any, int]]:
    """(bytes, crc32) of a job's blocks in order, runs of small ones joined into one."""
    run: list[Any] = []
    for blob, crc in job:
        if len(blob) <= _JOIN_BYTES:
            run.append(blob)
            continue
        if run:
            joined = b"".join(run)
            yield joined, codec.crc32(joined)
            run = []
        yield blob, crc
    if len(run) == 1:
        yield run[0], job[-1][1]
    elif run:
        joined = b"".join(run)
        yield joined, codec.crc32(joined)


def _result(job: Future_ | Encoded | StoredItem) -> Encoded | StoredItem:
    return job.result() if isinstance(job, Future_) else job


class DataFileWriter:
    """Appends encoded items to one data file (a path, or any DataSink) and makes it
    durable on close.

    `adaptive` (default: on for a sink, off for a path) decides per item between
    compressing and storing raw (only with compression="zstd"); `storage_bps` is the sink's expected rate (the filesystem probe's),
    measured from then on. `policy` holds the decisions made (manifest codec field).
    """

    def __init__(self, target: str | DataSink, rel: str, cfg: codec.CodecConfig,
                 threads: int | None = None, rank: int | None = None, *,
                 adaptive: bool | None = None, storage_bps: float | None = None,
                 base_index: BaseIndex | None = None, borrow: bool = False) -> None:
        self.base_index = base_index
        # Raw blocks written as views of the caller's buffers, no copy (dedupe.borrowed_blocks):
        # only for a caller whose buffers stay unchanged until close() returns.
        self.borrow = borrow  # incremental save: blocks the base holds are skipped
        self.sink: DataSink = _local_sink(target, rank) if isinstance(target, str) else target
        self.path = self.sink.name
        self.rel = rel
        self.rank = rank
        self.cfg = cfg
        self.threads = threads
        self.size = 0
        self.crc = 0
        self.raw_bytes = 0
        self._queued = 0
        self._raw_cfg = replace(cfg, compression="none")
        # A caller that names a path (tools: reshard) records cfg.to_json() as what ran,
        # so it gets what it asked for unless it opts in; ShardWriter opts in.
        adaptive = not isinstance(target, str) if adaptive is None else adaptive
        if storage_bps is None:
            storage_bps = getattr(self.sink, "expected_bps", None)
        self._rate_key = getattr(self.sink, "rate_key", None)
        self.policy: CompressionPolicy | None = (
            policy_for(self._rate_key, threads or codec.default_threads(), storage_bps)
            if adaptive and cfg.compression == "zstd" else None)
        self._active = 0  # encoder threads busy now (to share CPU time between items)
        self._active_lock = threading.Lock()
        self._q: queue.Queue = queue.Queue()
        self._pending: list[tuple[Any, int]] = []  # (stored bytes, crc32) not handed over yet
        self._pending_bytes = 0
        self._budget = threading.Semaphore(max(1, _WRITE_QUEUE_BYTES // cfg.block_size))
        self._err: list[BaseException] = []
        self._closed = False
        # Started with the first job handed over before close: a file whose blocks all
        # fit in one job (an incremental save's) is written by close() itself.
        self._th: threading.Thread | None = None

    def _drain(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            self._write_job(job)

    def _write_job(self, job: list[tuple[Any, int]]) -> None:
        try:
            for blob, crc in _coalesced(job):
                if self._err:
                    break
                t0 = time.perf_counter()
                self.sink.write(memoryview(blob))
                if self.policy is not None:
                    self.policy.observe_write(len(blob), time.perf_counter() - t0)
                self.crc = crc32_combine(self.crc, crc, len(blob))
                self.size += len(blob)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            self._err.append(e)
        finally:
            self._budget.release()

    def _stop_writer(self) -> None:
        if self._th is not None:
            self._q.put(None)
            self._th.join()

    def _encode(self, raw: memoryview, group: int, inner: int,
                digests: list[bytes] | None = None, hits: list | None = None) -> Encoded:
        """Encode one item (only the blocks the base does not hold) with the codec settings
        the policy picks, timing it for the policy."""
        pol = self.policy
        compress = self.cfg.compression == "zstd" and (pol is None or pol.choose())
        cfg = self.cfg if compress else self._raw_cfg
        kw = {"borrow": self.borrow, "digests": digests, "hits": hits}
        if pol is None:
            return encode_item(raw, group, cfg, inner, self.base_index, **kw)
        budget = self.threads or codec.default_threads()
        with self._active_lock:
            self._active += inner
            share = min(1.0, budget / self._active)
        t0 = time.perf_counter()
        try:
            enc = encode_item(raw, group, cfg, inner, self.base_index, **kw)
        finally:
            with self._active_lock:
                self._active -= inner
        # Items encoded at once share the CPUs: count each its share of thread time.
        # Only the bytes actually encoded count (blocks the base holds were only hashed).
        thread_s = (time.perf_counter() - t0) * inner * share
        encoded = sum(r[1] for _, r in enc.own)
        if encoded:
            pol.observe_encode(encoded, sum(len(b) for b, _ in enc.own), thread_s, compress)
        return enc

    def append(self, raw: memoryview, group: int) -> StoredItem:
        """Encode and queue one item; returns its storage record (offset, blocks, ...)."""
        return self._queue(self._encode(raw, group, self.threads or codec.default_threads()),
                           len(raw))

    def append_many(self, items: Iterable[tuple[memoryview, int]],
                    where: Sequence[Any] | None = None) -> list[StoredItem]:
        """Encode several items at once (small ones in parallel), write them in order.

        A model has many tensors smaller than a block; encoded one after another
        they would use one core. `items` is consumed lazily, a bounded window ahead.
        With a base index, items are hashed in batches first (codec.hash_buffers); an
        item whose every block the base holds is settled here, without a worker.
        `where`: each item's place in the state (BaseIndex.reuse), in the same order.
        """
        threads = self.threads or codec.default_threads()
        ex = codec.item_pool(threads)
        window: deque[tuple[int, Future_ | Encoded]] = deque()
        ahead = 0
        out: list[StoredItem] = []
        index = self.base_index
        bs = self.cfg.block_size
        hashed = (_hashed_batches(items, bs, threads, ex) if index is not None
                  else ((raw, group, None) for raw, group in items))
        for i, (raw, group, digests) in enumerate(hashed):
            inner = 1 if len(raw) <= bs else threads
            same = None if digests is None or where is None else index.reuse(
                digests, len(raw), group, self.rel, where[i])
            hits = None if digests is None or same is not None else index.hits(
                digests, len(raw), bs, group)
            if same is not None:
                window.append((len(raw), same))
            elif hits is not None and None not in hits:
                window.append((len(raw), referenced(digests, hits)))
            elif len(raw) <= _INLINE_BYTES:
                window.append((len(raw), self._encode(raw, group, 1, digests, hits)))
            else:
                window.append((len(raw), ex.submit(self._encode, raw, group, inner, digests,
                                                   hits)))
            ahead += len(raw)
            while len(window) > 2 * threads or ahead > _WRITE_QUEUE_BYTES:
                n, job = window.popleft()
                ahead -= n
                out.append(self._queue(_result(job), n))
        while window:
            n, job = window.popleft()
            out.append(self._queue(_result(job), n))
        return out

    def _queue(self, enc: Encoded | StoredItem, nbytes: int) -> StoredItem:
        if isinstance(enc, StoredItem):  # settled by BaseIndex.reuse: nothing to write
            self.raw_bytes += nbytes
            return enc
        offset = self._queued
        bs = self.cfg.block_size
        for stored, rec in enc.own:  # rec[2]: the block's crc32 of its stored bytes
            n = len(stored)
            if self._pending_bytes + n > bs:
                self._flush()
            self._pending.append((stored, rec[2]))
            self._pending_bytes += n
            self._queued += n
        if self._pending_bytes * 2 > bs:
            self._flush()
        self.raw_bytes += nbytes
        if not enc.own and enc.refs:
            # Nothing of it in this file: where it "starts" is no place at all, and a fixed
            # 0 keeps the record equal from one save to the next (its text is reused).
            return enc.stored_item(self.rel, 0, 0, nbytes)
        return enc.stored_item(self.rel, offset, self._queued - offset, nbytes)

    def _flush(self) -> None:
        """Hand the blocks queued so far to the writer thread as one job: at most a block's
        worth of bytes (the write budget counts jobs), so many small items wake the
        writer, and take the GIL from the encoder, once, not once each."""
        if not self._pending:
            return
        self._budget.acquire()
        if self._err:
            raise self._error()
        if self._th is None:
            if self._closed:
                job, self._pending, self._pending_bytes = self._pending, [], 0
                self._write_job(job)
                return
            self._th = threading.Thread(target=self._drain, name="shardckpt-writer",
                                        daemon=True)
            self._th.start()
        self._q.put(self._pending)
        self._pending = []
        self._pending_bytes = 0

    def codec_summary(self) -> dict:
        """What the compression policy did, for the manifest's codec settings."""
        return {} if self.policy is None else self.policy.summary()

    def close(self) -> None:
        """Wait for every byte to be written and durable; typed errors name the file."""
        if self._closed:
            return
        self._closed = True
        flush_error: BaseException | None = None
        try:
            self._flush()
        except BaseException as e:  # noqa: BLE001 - raised below, once the writer stopped
            flush_error = e
        self._stop_writer()
        if self._err or flush_error is not None:
            self.sink.abort()
            raise self._error() if self._err else flush_error
        try:
            self.sink.close()
        except BaseException as e:
            raise typed_write_error(e, self.path, self.rank) from None
        if self.policy is not None:
            remember(self._rate_key, self.policy)

    def _error(self) -> BaseException:
        return typed_write_error(self._err[0], self.path, self.rank)

    def __enter__(self) -> DataFileWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif not self._closed:  # the caller's error wins; stop the writer without masking it
            self._closed = True
            self._stop_writer()
            self.sink.abort()
