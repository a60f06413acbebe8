"""Compress an item or store it raw: whichever the measured rates say finishes sooner.

A save is a pipeline: the codec pool encodes, the sink writes. Per raw byte,
compressing costs max(1/C, rho/D) and storing raw costs max(1/R, 1/D), where C
and R are the pool's encode rates (zstd, raw copy+crc), rho the compression
ratio and D the storage rate in stored bytes/s. While the storage is the
bottleneck (C > D) compression is free and writes fewer bytes; when the
encoder is (two cores, a fast disk), raw is faster. Every rate is measured on
this save's own items; D starts from the filesystem probe and is then measured
from the time the writer spends blocked in the sink, which is the storage's
real pace only while it is the bottleneck (otherwise D reads high and raw is
chosen, which is then right). Decisions are per item; the codec still stores
incompressible planes raw inside a compressed item.
"""

from __future__ import annotations

import threading

# Weight of a new observation in the moving averages.
_ALPHA = 0.3
# Writes are judged over windows at least this large: one block's write time says
# little (page cache), a window's includes the fdatasyncs.
WINDOW_BYTES = 16 << 20
# Encode rates are taken over windows of at least this many raw bytes.
ENCODE_WINDOW = 4 << 20
# After this many raw items in a row one item is compressed again, so a changed
# encoder or storage rate (another job on the disk) is noticed.
REPROBE_EVERY = 16
# Compression must be predicted at least this much faster than raw to be chosen. The
# model takes the encoder's measured rate as if it had the cores to itself; on a
# 2-core VM with a 3 GB/s direct-I/O disk, equal predictions (C x threads ~ D) made
# zstd saves 30 % slower than raw ones (benchmarks/compare.py, 1 GB), because the
# writer's copy, the hashes and the crc32s share those cores. Where the storage is
# really the bottleneck (a network filesystem, an object store) compressing wins by
# far more than this margin (rho ~0.5-0.8), so fewer bytes are still written there.
_MARGIN = 1.15


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + _ALPHA * (new - old)


def _ewma_rate(old: float | None, new: float) -> float:
    # Averaged as seconds per byte: what the predictions add up. Averaging rates
    # themselves lets one huge reading (a write into the page cache) dominate.
    return new if old is None else 1.0 / _ewma(1.0 / old, 1.0 / new)


class CompressionPolicy:
    """Thread-safe: encode observations arrive from the codec pool, write ones from the
    writer thread, decisions are made by the submitting thread."""

    def __init__(self, threads: int, storage_bps: float | None = None) -> None:
        self.threads = max(1, threads)
        self.storage_bps = storage_bps       # D, stored bytes/s
        self.zstd_bps: float | None = None   # C per encoder thread, raw bytes/s
        self.raw_bps: float | None = None    # R per encoder thread
        self.ratio: float | None = None      # rho = stored / raw of compressed items
        self.compressed = 0
        self.raw = 0
        self._raw_run = 0
        self._win_bytes = 0
        self._win_s = 0.0
        self._d_measured = False
        self._enc: dict[bool, list] = {True: [0, 0, 0.0], False: [0, 0, 0.0]}
        self._lock = threading.Lock()

    def observe_encode(self, raw_n: int, stored_n: int, thread_s: float, compressed: bool) -> None:
        """One item encoded: `thread_s` is wall seconds times the threads it ran on.

        Items are summed into windows of ENCODE_WINDOW raw bytes before a rate is
        taken: a 4-byte tensor's rate is all per-call overhead, and averaging
        per-item rates would let it count as much as a 40 MB embedding.
        """
        if raw_n <= 0 or thread_s <= 0:
            return
        with self._lock:
            w = self._enc[compressed]
            w[0] += raw_n
            w[1] += stored_n
            w[2] += thread_s
            if w[0] < ENCODE_WINDOW:
                return
            if compressed:
                self.zstd_bps = _ewma_rate(self.zstd_bps, w[0] / w[2])
                self.ratio = _ewma(self.ratio, w[1] / w[0])
            else:
                self.raw_bps = _ewma_rate(self.raw_bps, w[0] / w[2])
            self._enc[compressed] = [0, 0, 0.0]

    def observe_write(self, stored_n: int, seconds: float) -> None:
        """`stored_n` bytes accepted by the sink after `seconds` blocked in it."""
        with self._lock:
            self._win_bytes += stored_n
            self._win_s += seconds
            if self._win_bytes >= WINDOW_BYTES:
                rate = self._win_bytes / max(self._win_s, 1e-9)
                # The first measurement replaces the prior: that was only a guess.
                self.storage_bps = _ewma_rate(self.storage_bps if self._d_measured else None,
                                              rate)
                self._d_measured = True
                self._win_bytes, self._win_s = 0, 0.0

    def predicted(self) -> tuple[float, float] | None:
        """Seconds per raw byte of (compressing, storing raw), or None before any measurement."""
        d = self.storage_bps
        if self.zstd_bps is None or self.ratio is None or d is None:
            return None
        t = self.threads
        per_z = 1.0 / (self.zstd_bps * t)
        # Until a raw item was measured its encode (copy + crc32) is taken as free,
        # which favours raw only where the storage is not the bottleneck anyway.
        per_r = 0.0 if self.raw_bps is None else 1.0 / (self.raw_bps * t)
        return max(per_z, self.ratio / d), max(per_r, 1.0 / d)

    def choose(self) -> bool:
        """True: compress the next item; False: store it raw."""
        with self._lock:
            p = self.predicted()
            if p is None or self._raw_run >= REPROBE_EVERY:
                compress = True
            else:
                compress = p[0] * _MARGIN <= p[1]
            if compress:
                self.compressed += 1
                self._raw_run = 0
            else:
                self.raw += 1
                self._raw_run += 1
            return compress

    def summary(self) -> dict:
        """What ran, for the manifest's codec settings."""
        return {"items_compressed": self.compressed, "items_raw": self.raw}

    def _seed(self, prev: CompressionPolicy) -> None:
        with prev._lock:
            self.zstd_bps, self.raw_bps, self.ratio = prev.zstd_bps, prev.raw_bps, prev.ratio
            if prev._d_measured:
                self.storage_bps, self._d_measured = prev.storage_bps, True


# What the last save to each storage measured, by the sink's rate_key: the next save
# there decides from its first item on. A small save (the adapters of an incremental
# LoRA save: 96 items of 4-12 KiB, 0.8 MB in all) never fills a measuring window, and
# with nothing measured every item was compressed: 3 ms of a 30 ms save.
_LAST: dict[object, CompressionPolicy] = {}
_LAST_LOCK = threading.Lock()


def policy_for(key: object | None, threads: int, storage_bps: float | None) -> CompressionPolicy:
    """A fresh policy, seeded with the rates the last save with `key` measured (None: no
    seed, as for a sink that cannot say which storage it writes to)."""
    p = CompressionPolicy(threads, storage_bps)
    with _LAST_LOCK:
        prev = _LAST.get(key) if key is not None else None
    if prev is not None and prev.threads == p.threads:
        p._seed(prev)
    return p


def remember(key: object | None, policy: CompressionPolicy) -> None:
    """`policy`'s rates as the seed of the next save with `key` (after a save succeeded)."""
    if key is None:
        return
    with _LAST_LOCK:
        _LAST[key] = policy


def forget() -> None:
    """Drop every remembered rate: the next save anywhere starts as the first one did
    (a process that knows its storage changed under it; tests that need a save's
    first decisions, made before anything was measured)."""
    with _LAST_LOCK:
        _LAST.clear()
