"""Data sinks of object stores: one data file streamed as a multipart upload.

Memory bound per sink: (max_in_flight + 1) x part_size (defaults 4 + 1 x 16 MiB
= 80 MiB): one part being filled from the encoder's buffers and up to
max_in_flight parts uploading; `write` blocks (back-pressure on the encoder)
while all of them are taken. Nothing touches a local disk. Each part carries a
CRC32 checksum header that the store verifies on receipt; the whole-object size
is checked again by the commit before the manifest names it.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any

from ...errors import SaveFailedError
from .s3 import save_error


class S3MultipartSink:
    def __init__(self, store: Any, url: str, rank: int | None = None) -> None:
        self.store = store
        self.name = url
        self.rank = rank
        self.bucket, self.key = store.bk(url)
        self.part_size = store.part_size
        n = store.max_in_flight
        self._free = [bytearray(self.part_size) for _ in range(1)]  # more made on demand
        self._slots = threading.Semaphore(n + 1)  # buffers alive: n uploading + 1 filling
        self._slots.acquire()
        self._buf = self._free.pop()
        self._fill = 0
        self._pool: cf.ThreadPoolExecutor | None = None
        self._n = n
        self._upload_id: str | None = None
        self._futures: list[cf.Future] = []
        self._lock = threading.Lock()
        self._closed = False
        self.size = 0

    def _who(self) -> str:
        return self.name if self.rank is None else f"{self.name} (rank {self.rank})"

    def _fail(self) -> None:
        for f in self._futures:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def write(self, data: memoryview) -> None:
        mv = memoryview(data).cast("B")
        while mv:
            n = min(len(mv), self.part_size - self._fill)
            self._buf[self._fill:self._fill + n] = mv[:n]
            self._fill += n
            self.size += n
            mv = mv[n:]
            if self._fill == self.part_size:
                self._ship()

    def _start(self) -> None:
        try:
            r = self.store.client.create_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                          ChecksumAlgorithm="CRC32")
        except Exception as e:  # noqa: BLE001
            raise save_error(e, self.name, "starting the multipart upload", self.rank) from e
        self._upload_id = r["UploadId"]
        self._pool = cf.ThreadPoolExecutor(self._n, thread_name_prefix="shardckpt-s3put")

    def _ship(self) -> None:
        self._fail()
        if self._upload_id is None:
            self._start()
        number = len(self._futures) + 1
        buf, fill = self._buf, self._fill
        assert self._pool is not None
        self._futures.append(self._pool.submit(self._upload_part, number, buf, fill))
        self._slots.acquire()  # back-pressure: wait for a buffer to come back
        with self._lock:
            self._buf = self._free.pop() if self._free else bytearray(self.part_size)
        self._fill = 0

    def _upload_part(self, number: int, buf: bytearray, fill: int) -> dict:
        try:
            body = bytes(memoryview(buf)[:fill]) if fill < len(buf) else buf
            try:
                r = self.store.client.upload_part(
                    Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                    PartNumber=number, Body=body, ChecksumAlgorithm="CRC32")
            except Exception as e:  # noqa: BLE001
                raise save_error(e, self.name, f"uploading part {number}", self.rank) from e
            part = {"PartNumber": number, "ETag": r["ETag"]}
            if r.get("ChecksumCRC32"):
                part["ChecksumCRC32"] = r["ChecksumCRC32"]
            return part
        finally:
            with self._lock:
                self._free.append(buf)
            self._slots.release()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._upload_id is None:  # small: one PUT, no multipart upload
                try:
                    self.store.client.put_object(Bucket=self.bucket, Key=self.key,
                                                 Body=bytes(memoryview(self._buf)[:self._fill]),
                                                 ChecksumAlgorithm="CRC32")
                except Exception as e:  # noqa: BLE001
                    raise save_error(e, self.name, "PUT", self.rank) from e
                return
            if self._fill:
                self._ship()
            parts = [f.result() for f in self._futures]
            try:
                self.store.client.complete_multipart_upload(
                    Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts})
            except Exception as e:  # noqa: BLE001
                raise save_error(e, self.name, "completing the multipart upload",
                                 self.rank) from e
        except SaveFailedError:
            self.abort()
            raise
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        self._closed = True
        try:
            for f in self._futures:
                f.cancel()
            self._shutdown()
            if self._upload_id is not None:
                self.store.client.abort_multipart_upload(Bucket=self.bucket, Key=self.key,
                                                         UploadId=self._upload_id)
                self._upload_id = None
        except Exception:  # noqa: BLE001 - abort never raises; gc finds what is left
            pass


class StreamSink:
    """An fsspec file opened for writing (its own buffering and multipart logic)."""

    def __init__(self, fs: Any, path: str, url: str, rank: int | None = None) -> None:
        self.fs = fs
        self.path = path
        self.name = url
        self.rank = rank
        try:
            self._f = fs.open(path, "wb")
        except Exception as e:  # noqa: BLE001
            raise save_error(e, url, "opening for write", rank) from e

    def write(self, data: memoryview) -> None:
        try:
            self._f.write(data)
        except Exception as e:  # noqa: BLE001
            raise save_error(e, self.name, "writing", self.rank) from e

    def close(self) -> None:
        try:
            self._f.close()
        except Exception as e:  # noqa: BLE001
            self.abort()
            raise save_error(e, self.name, "closing", self.rank) from e

    def abort(self) -> None:
        try:
            if not self._f.closed:
                discard = getattr(self._f, "discard", None)
                if callable(discard):
                    discard()
                else:
                    self._f.close()
            self.fs.rm_file(self.path)
        except Exception:  # noqa: BLE001 - abort never raises
            pass
