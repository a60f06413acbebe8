"""Reads of a load, issued ahead on parallel streams while earlier ones are decoded.

A load knows every range it will read before it reads the first (the plan says
which blocks of which items). `Prefetcher` reads them in that order on a few
threads, each range split into pieces read concurrently into one buffer, a
bounded number of bytes ahead; the loader takes them in the same order and
decodes range k while ranges k+1.. are in flight. A range the loader asks for
that was not prefetched (or whose read failed) is read by the loader itself, so
its errors are reported exactly as without prefetching.

A range may come with its destination (`dests`): raw blocks whose bytes are the
tensor's own bytes are read straight into the tensor, with no buffer and no copy;
the loader then only checks their crc32s in place.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from ..format import Block
from ..format import blocks as geo

# Stored bytes decoded per call: large enough for the codec pool to be busy, small
# enough that decoding starts long before a large tensor is read whole.
READ_PIECE = 16 << 20
# Bytes one stream reads in one call.
_STREAM_PIECE = 4 << 20
# Stored bytes read ahead of the decoder.
READ_AHEAD = 256 << 20

Key = tuple[str, int, int]


def read_pieces(chosen: Sequence[Block]) -> list[tuple[int, int, list[Block]]]:
    """The reads for `chosen` blocks: adjacent blocks coalesced, then cut at block
    boundaries into pieces of about READ_PIECE (offset, length, blocks)."""
    out = []
    for off, _length, run in geo.coalesce(list(chosen)):
        start, size, part = off, 0, []
        for b in run:
            if part and size + b.stored_len > READ_PIECE:
                out.append((start, size, part))
                start, size, part = b.offset, 0, []
            part.append(b)
            size += b.stored_len
        out.append((start, size, part))
    return out


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(streams: int) -> ThreadPoolExecutor:
    with _pools_lock:
        p = _pools.get(streams)
        if p is None:
            p = _pools[streams] = ThreadPoolExecutor(max_workers=streams,
                                                     thread_name_prefix="shardckpt-read")
        return p


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's reader threads (see codec/threads.py).
    global _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)


class _Range:
    """One range being read: its buffer and the futures of its pieces."""

    def __init__(self, f: Any, offset: int, length: int, pool: ThreadPoolExecutor,
                 dest: memoryview | None = None) -> None:
        n = max(0, min(length, f.size - offset))  # never past the end: the codec reports that
        # Uninitialized (bytearray(n) would zero every page before the read fills it).
        self.buf = np.empty(n, dtype=np.uint8) if dest is None else dest[:n]
        self.futures: list[Future] = []
        view = memoryview(self.buf).cast("B")
        for a in range(0, n, _STREAM_PIECE):
            self.futures.append(pool.submit(_read_piece, f, view[a:a + _STREAM_PIECE],
                                            offset + a))

    def result(self) -> memoryview:
        got = 0
        for fut in self.futures:
            n, want = fut.result()
            got += n
            if n < want:  # shorter than fstat said (truncated under us): up to there
                break
        return memoryview(self.buf).cast("B")[:got]


class _Slice:
    """One prefetched key: a part of a (possibly shared) range read."""

    def __init__(self, r: _Range, start: int, length: int) -> None:
        self.range, self.start, self.length = r, start, length

    def result(self) -> memoryview:
        return self.range.result()[self.start:self.start + self.length]


def _read_piece(f: Any, view: memoryview, offset: int) -> tuple[int, int]:
    readinto = getattr(f, "readinto", None)
    if readinto is not None:
        return readinto(view, offset), len(view)
    data = f.pread(len(view), offset)
    view[:len(data)] = data
    return len(data), len(view)


class Prefetcher:
    """Reads `ranges` ((file, offset, length), in the order they will be taken) ahead."""

    def __init__(self, open_file: Callable[[str], Any], ranges: Sequence[Key], streams: int,
                 ahead: int = READ_AHEAD, dests: dict[Key, memoryview] | None = None) -> None:
        self._open = open_file
        # Ranges read straight into where their bytes belong (never coalesced with others:
        # their destinations are not adjacent in memory).
        self._dests = dests or {}
        self._pending: deque[Key] = deque(ranges)
        self._ready: dict[Key, _Range] = {}
        self._bytes = 0
        self._ahead = ahead
        self._pool = _pool(max(1, streams))
        self._fill()

    def _fill(self) -> None:
        while self._pending and (not self._ready
                                 or self._bytes + self._pending[0][2] <= self._ahead):
            key = self._pending.popleft()
            if key in self._ready:
                continue
            # Ranges that continue one another in the same file (items written back to
            # back) are fetched as one read: the same bytes, far fewer requests, which
            # is what an object store charges and waits for.
            group = [key]
            end = key[1] + key[2]
            dest = self._dests.get(key)
            while (dest is None and self._pending and self._pending[0][0] == key[0]
                   and self._pending[0] not in self._dests
                   and self._pending[0][1] == end and self._pending[0] not in self._ready
                   and end - key[1] + self._pending[0][2] <= READ_PIECE):
                nxt = self._pending.popleft()
                group.append(nxt)
                end = nxt[1] + nxt[2]
            try:
                f = self._open(key[0])  # opened here, on the loader's thread, never in a worker
            except Exception:  # noqa: BLE001 - the loader's own read reports it
                continue
            r = _Range(f, key[1], end - key[1], self._pool, dest)
            for k in group:
                self._ready[k] = _Slice(r, k[1] - key[1], k[2])
            self._bytes += end - key[1]

    def into_place(self, key: Key) -> bool:
        """Whether `key` is read into its destination (the bytes taken are the target's)."""
        return key in self._dests

    def take(self, key: Key) -> memoryview | None:
        """The bytes of `key`, or None: the caller then reads it itself."""
        r = self._ready.pop(key, None)
        if r is None:
            return None
        self._bytes -= key[2]
        try:
            data = r.result()
        except Exception:  # noqa: BLE001 - read again by the caller, which reports it
            data = None
        self._fill()
        return data

    def close(self) -> None:
        """Wait for reads still in flight (their buffers are dropped)."""
        self._pending.clear()
        ranges = {id(x.range): x.range for x in self._ready.values()}.values()
        for r in ranges:
            for fut in r.futures:
                fut.cancel()
        for r in ranges:
            for fut in r.futures:
                if not fut.cancelled():
                    try:
                        fut.result()
                    except Exception:  # noqa: BLE001 - nobody wants these bytes any more
                        pass
        self._ready.clear()
