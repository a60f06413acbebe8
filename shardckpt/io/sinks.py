"""Where a data file's bytes go: the `DataSink` protocol and the local parallel-stream writer.

`DataFileWriter` computes sizes and the whole-file crc32 and hands the bytes to a
sink; a sink only has to put them somewhere durably. A second storage backend
(an object store's multipart upload) plugs in by providing another sink.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
from typing import Protocol

from ..errors import InsufficientSpaceError, SaveFailedError
from .fsutil import typed_os_error

# Bytes a stream writes between its background fdatasync calls.
_SYNC_EVERY = 64 << 20
# Bytes handed to the streams but not yet written, per stream, before `write` blocks.
_INFLIGHT_PER_STREAM = 32 << 20
# Bytes held before the streams start (LocalSink): below it a file is one write at close.
_HOLD_BYTES = 4 << 20
# The write call, by name, so a test can make the disk fill up at a chosen offset.
_pwrite = os.pwrite


class DataSink(Protocol):
    """Where one data file's bytes go. `write` is called from one thread, with consecutive ranges
    starting at 0; the sink may write them concurrently (streams, upload parts) and may block for
    back-pressure. `close` returns only when every byte is durable (fsync / upload completed) and
    raises a typed error naming the file otherwise. `abort` discards what was written, never raises."""
    name: str            # for error messages: the path or URL of the file
    def write(self, data: memoryview) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


class StreamedFile:
    """What the local sinks share: a file written by `self._threads` fed from `self._q`,
    errors collected in `self._err`, made durable on close, removed on abort."""

    name: str
    rank: int | None
    rate_key: object = None  # set by open_sink: which storage (io/policy.py)
    _fd: int
    _q: queue.SimpleQueue
    _threads: list[threading.Thread]
    _err: list[BaseException]
    _stop: bool

    def _join(self) -> None:
        for _ in self._threads:
            self._q.put(None)
        for t in self._threads:
            t.join()

    def _before_fsync(self) -> None:
        """Last changes to the file once every stream is done (a subclass's hook)."""

    def close(self) -> None:
        if self._fd < 0:
            return
        self._join()
        try:
            if not self._err:
                self._before_fsync()
                os.fsync(self._fd)
        except OSError as e:
            self._err.append(e)
        finally:
            os.close(self._fd)
            self._fd = -1
        if self._err:
            raise self._error()

    def abort(self) -> None:
        self._stop = True
        try:
            if self._fd >= 0:
                self._join()
                os.close(self._fd)
                self._fd = -1
            os.unlink(self.name)
        except OSError:  # never raises: the staging directory goes as a whole anyway
            pass

    def _error(self) -> BaseException:
        return typed_write_error(self._err[0], self.name, self.rank)


class LocalSink(StreamedFile):
    """A local file written by `streams` threads, each `os.pwrite`-ing its ranges at their
    offsets and fdatasync-ing every `sync_every` bytes of its own.

    One stream that stops to fdatasync leaves the disk idle while it waits; with
    several, one syncs while the others keep the device's queue full (measured with
    dd-style writers on a virtio disk: two fdatasync'd streams write 1.7-2x faster
    than one). The caller must not change a buffer after passing it to `write`.
    """

    def __init__(self, path: str, *, streams: int = 1, rank: int | None = None,
                 sync_every: int = _SYNC_EVERY, expected_bps: float | None = None) -> None:
        self.name = path
        # The rate the filesystem probe measured: the compression policy's first guess.
        self.expected_bps = expected_bps
        self.rank = rank
        self.streams = max(1, int(streams))
        self.sync_every = sync_every
        self.offset = 0
        # O_NOFOLLOW: the staging directory is ours; a link planted in it is not.
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                           | os.O_NOFOLLOW, 0o666)  # the umask decides, as for open()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._room_mib = max(2, self.streams * _INFLIGHT_PER_STREAM >> 20)
        self._room = threading.Semaphore(self._room_mib)
        self._err: list[BaseException] = []
        self._stop = False
        # The streams start with the file's first _HOLD_BYTES: a smaller file (an
        # incremental save's few changed tensors) is written at close by the calling
        # thread, without starting and joining a thread per stream for it.
        self._threads: list[threading.Thread] = []
        self._held: list[memoryview] = []
        self._held_bytes = 0

    def _start_streams(self) -> None:
        self._threads = [threading.Thread(target=self._stream, name=f"shardckpt-stream{i}",
                                          daemon=True) for i in range(self.streams)]
        for t in self._threads:
            t.start()
        offset = 0
        for view in self._held:
            self._enqueue(offset, view)
            offset += len(view)
        self._held, self._held_bytes = [], 0

    def _write_range(self, view: memoryview, offset: int) -> None:
        while view:
            # A short pwrite (disk filling up) is retried, so it raises ENOSPC
            # instead of leaving a silently short file.
            n = _pwrite(self._fd, view, offset)
            if n <= 0:
                raise OSError(f"write to {self.name} made no progress")
            view, offset = view[n:], offset + n

    def _stream(self) -> None:
        unsynced = 0
        while True:
            job = self._q.get()
            if job is None:
                return
            offset, view, mib = job
            try:
                if not self._err and not self._stop:
                    self._write_range(view, offset)
                    unsynced += len(view)
                    if unsynced >= self.sync_every:
                        # While this stream waits for the device the others keep
                        # writing, and close() only waits for the tail.
                        os.fdatasync(self._fd)
                        unsynced = 0
            except BaseException as e:  # noqa: BLE001 - raised by write()/close()
                self._err.append(e)
            finally:
                self._room.release(mib)

    def write(self, data: memoryview) -> None:
        if self._err:
            raise self._error()
        n = len(data)
        if not n:
            return
        view = memoryview(data).cast("B")
        if not self._threads:
            self._held.append(view)
            self._held_bytes += n
            self.offset += n
            if self._held_bytes >= _HOLD_BYTES:
                self._start_streams()
            return
        self._enqueue(self.offset, view)
        self.offset += n

    def _enqueue(self, offset: int, view: memoryview) -> None:
        mib = min(max(1, len(view) >> 20), self._room_mib)
        for _ in range(mib):  # back-pressure: at most the in-flight budget is queued
            self._room.acquire()
        self._q.put((offset, view, mib))

    def _join(self) -> None:
        if self._held and not self._stop:
            offset = 0
            try:
                for view in self._held:
                    self._write_range(view, offset)
                    offset += len(view)
            except BaseException as e:  # noqa: BLE001 - raised by close()
                self._err.append(e)
        self._held, self._held_bytes = [], 0
        super()._join()

def open_sink(staging_dir: str, rel: str, *, rank: int | None = None) -> DataSink:
    """The sink for data file `rel` of a save's staging directory: the one place a storage
    backend plugs in. Local files get as many streams as their filesystem rewards
    (probed once per filesystem, io/probe.py), written with O_DIRECT where the probe
    found that it pays (io/direct_sink.py)."""
    from .probe import storage_profile

    prof = storage_profile(staging_dir)
    path = os.path.join(staging_dir, rel)
    sink: DataSink | None = None
    if prof.direct:
        from .direct_sink import DirectSink
        try:
            sink = DirectSink(path, streams=prof.streams, rank=rank,
                              expected_bps=prof.write_bps)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise typed_write_error(e, path, rank) from e
            # EINVAL: this directory refuses O_DIRECT after all (another mount on the device)
    if sink is None:
        sink = LocalSink(path, streams=prof.streams, rank=rank, expected_bps=prof.write_bps)
    # Which storage, for the compression policy's rates remembered between saves.
    sink.rate_key = (type(sink).__name__, os.stat(staging_dir).st_dev, prof.streams)
    return sink


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
