"""The data-file writer: encoded items appended to one file, then fsynced.

Encoding (on the codec pool) overlaps with writing (on a writer thread); the
whole-file crc32 is computed on the write pass, so no byte is read twice.
"""

from __future__ import annotations

import os
import queue
import threading
import zlib
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future as Future_
from typing import Any

import torch

from .. import codec
from ..errors import InsufficientSpaceError, SaveFailedError
from ..format import StoredItem
from .dedupe import BaseIndex, Encoded, encode_item
from .fsutil import typed_os_error

# How many encoded bytes may wait for the writer thread before encoding pauses.
_WRITE_QUEUE_BYTES = 256 << 20
# Bytes written between background fdatasync calls of a data file.
_SYNC_EVERY = 64 << 20


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The row-major bytes of a tensor as a zero-copy view where possible."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")



class DataFileWriter:
    """Appends encoded items to one data file and fsyncs it on close.

    Encoding (on the codec pool) overlaps with writing (on a writer thread); the
    whole-file crc32 is computed on the write pass, so no byte is read twice.
    """

    def __init__(self, path: str, rel: str, cfg: codec.CodecConfig, threads: int | None = None,
                 rank: int | None = None, sink: Any = None,
                 base_index: BaseIndex | None = None) -> None:
        self.base_index = base_index  # incremental save: blocks the base holds are skipped
        self.path = path
        # A DataSink (io/storage.py; object stores) instead of a local file.
        self._sink = sink
        self.rel = rel
        self.rank = rank
        self.cfg = cfg
        self.threads = threads
        self.size = 0
        self._synced = 0
        self.crc = 0
        self.raw_bytes = 0
        self._queued = 0
        self._f = open(path, "wb", buffering=0) if sink is None else None  # noqa: SIM115
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
                if not self._err and self._sink is not None:
                    self._sink.write(memoryview(blob))
                    self.crc = zlib.crc32(blob, self.crc)
                    self.size += len(blob)
                elif not self._err:
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

    def append(self, raw: memoryview, group: int) -> StoredItem:
        """Encode and queue one item; returns its storage record (offset, blocks, ...)."""
        return self._queue(encode_item(raw, group, self.cfg, self.threads, self.base_index),
                           len(raw))

    def append_many(self, items: Iterable[tuple[memoryview, int]]) -> list[StoredItem]:
        """Encode several items at once (small ones in parallel), write them in order.

        A model has many tensors smaller than a block; encoded one after another
        they would use one core. `items` is consumed lazily, a bounded window ahead.
        """
        threads = self.threads or codec.default_threads()
        ex = codec.item_pool(threads)
        window: deque[tuple[int, Future_]] = deque()
        ahead = 0
        out: list[StoredItem] = []
        for raw, group in items:
            inner = 1 if len(raw) <= self.cfg.block_size else threads
            window.append((len(raw), ex.submit(encode_item, raw, group, self.cfg, inner,
                                               self.base_index)))
            ahead += len(raw)
            while len(window) > 2 * threads or ahead > _WRITE_QUEUE_BYTES:
                n, fut = window.popleft()
                ahead -= n
                out.append(self._queue(fut.result(), n))
        while window:
            n, fut = window.popleft()
            out.append(self._queue(fut.result(), n))
        return out

    def _queue(self, enc: Encoded, nbytes: int) -> StoredItem:
        offset = self._queued
        recs = []
        for stored, rec in enc.own:
            self._budget.acquire()
            if self._err:
                raise self._error()
            self._q.put(stored)
            self._queued += len(stored)
            recs.append(rec)
        self.raw_bytes += nbytes
        return enc.stored_item(StoredItem(file=self.rel, offset=offset,
                                          length=self._queued - offset, nbytes=nbytes,
                                          blocks=tuple(recs)))

    def close(self) -> None:
        if self._sink is not None:
            return self._close_sink()
        if self._f.closed:
            return
        self._q.put(None)
        self._th.join()
        try:
            if not self._err:
                os.fsync(self._f.fileno())
        except OSError as e:
            self._err.append(e)
        finally:
            self._f.close()
        if self._err:
            raise self._error()

    def _close_sink(self) -> None:
        if self._th.is_alive():
            self._q.put(None)
            self._th.join()
        if self._err:
            self._sink.abort()
            raise self._error()
        self._sink.close()

    def _error(self) -> BaseException:
        return typed_write_error(self._err[0], self.path, self.rank)

    def __enter__(self) -> DataFileWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's error wins; stop the writer without masking it
            self._q.put(None)
            self._th.join()
            if self._sink is not None:
                self._sink.abort()
            else:
                self._f.close()


def typed_write_error(e: BaseException, path: str, rank: int | None) -> BaseException:
    """An OSError of a data-file write as a typed error naming the file and rank."""
    if not isinstance(e, OSError) or isinstance(e, (InsufficientSpaceError, SaveFailedError)):
        return e
    who = f"{path} (rank {rank})" if rank is not None else path
    final = final_of_staged(path)
    if final is not None:
        who = f"{final}: {who}"
    return typed_os_error(e, who, "writing the checkpoint")


def final_of_staged(path: str) -> str | None:
    """The checkpoint a file in a staging directory (.NAME.partial-<hex>/...) belongs to."""
    from ..format.names import Leftover, parse_leftover

    d = os.path.abspath(path)
    while True:
        parent, base = os.path.split(d)
        if not base:
            return None
        p = parse_leftover(base)
        if p is not None and p[1] == Leftover.PARTIAL:
            return os.path.join(parent, p[0])
        d = parent
