"""How many parallel write streams a filesystem rewards, measured once per filesystem.

A save probes the filesystem of its staging directory the first time this
process writes there: the same bytes written and fdatasync'd by 1, 2 and 4
concurrent `pwrite` streams into one scratch file, which is removed. The
result is remembered per device (`st_dev`) for the life of the process, and
shared for an hour with the other processes of the node through a small file in
the user's cache directory (`SHARDCKPT_CACHE_DIR`, default
`~/.cache/shardckpt`), under a lock: the ranks of a job on one node probe once,
one after the other rather than against each other, and choose alike. A
training job pays for it once (~0.1-0.3 s) and no user tunes thread counts.
SHARDCKPT_STREAMS overrides the count (tests, or a filesystem the probe
misjudges); the measured rate then is not known and is reported as None.

The probe also writes the same bytes with O_DIRECT (io/direct_sink.py) where the
filesystem accepts it; direct I/O is chosen when it writes at least `_DIRECT_FLOOR`
of the best buffered rate, since it leaves the CPU time of the page-cache copy to
the encoder. SHARDCKPT_DIRECT_IO=0 or 1 overrides that choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import mmap
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

# Bytes written per probe run. Small enough to cost a fraction of a second, large
# enough that an fdatasync has real work (device queue depth matters, not memcpy).
PROBE_BYTES = 32 << 20
_PIECE = 4 << 20
# A stream count must beat the one before it by this factor to be chosen:
# threads that do not help only add contention, and the probe itself is noisy.
_GAIN = 1.15
CANDIDATES = (1, 2, 4)
# Direct I/O is taken when it reaches this fraction of the best buffered rate: it
# costs ~1/20 of the CPU time per byte (measured), which a CPU-bound save spends encoding.
_DIRECT_FLOOR = 0.8
DIRECT_STREAMS = 2
# Concurrent reads of a load. Reads have no fdatasync to serialize on: one 4 MiB
# pread in flight while the previous one's bytes are copied out keeps this virtio
# disk at its cold-read rate; 4 streams measured 1.2-1.9 GB/s against 2.6-3.0 for 1-2.
READ_STREAMS = 2


@dataclass(frozen=True)
class StorageProfile:
    streams: int                # write streams per data file
    write_bps: float | None     # fdatasync'd bytes/s at that count (None: not measured)
    read_streams: int = READ_STREAMS
    direct: bool = False        # write data files with O_DIRECT (io/direct_sink.py)




def _env_streams() -> int | None:
    env = os.environ.get("SHARDCKPT_STREAMS")
    if not env:
        return None
    try:
        return max(1, int(env))
    except ValueError:
        raise ValueError(f"SHARDCKPT_STREAMS must be a positive integer, not {env!r}") from None


def _env_direct() -> bool | None:
    env = os.environ.get("SHARDCKPT_DIRECT_IO")
    if not env:
        return None
    if env not in ("0", "1"):
        raise ValueError(f"SHARDCKPT_DIRECT_IO must be 0 or 1, not {env!r}")
    return env == "1"


def measure_write(directory: str, streams: int, nbytes: int = PROBE_BYTES,
                  direct: bool = False) -> float:
    """Bytes/s of `nbytes` written by `streams` pwrite threads into one scratch file of
    `directory` and fdatasync'd by each (the pattern LocalSink uses); with `direct`, the
    same with O_DIRECT from an aligned buffer (DirectSink's pattern). OSError if the
    filesystem refuses O_DIRECT."""
    # Not zeros: some filesystems store zero pages specially. An anonymous mmap is
    # page-aligned, as O_DIRECT needs.
    piece = mmap.mmap(-1, _PIECE)
    piece.write(os.urandom(_PIECE))
    path = os.path.join(directory, f".shardckpt-probe-{os.getpid()}-{secrets.token_hex(4)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    if direct:
        from .direct_sink import DIRECT_FLAG, supported
        if not supported():
            raise OSError(errno.EINVAL, "O_DIRECT is not available", directory)
        flags |= DIRECT_FLAG
    try:
        fd = os.open(path, flags, 0o600)
    except OSError:
        if direct and os.path.exists(path):  # created, then refused: not ours to leave
            os.unlink(path)
        raise
    try:
        pieces = max(streams, nbytes // _PIECE)
        errors: list[BaseException] = []

        def run(i: int) -> None:
            try:
                for k in range(i, pieces, streams):
                    os.pwrite(fd, piece, k * _PIECE)
                os.fdatasync(fd)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return pieces * _PIECE / max(time.perf_counter() - t0, 1e-9)
    finally:
        os.close(fd)
        os.unlink(path)


def choose_streams(rates: dict[int, float]) -> int:
    """The smallest count whose rate no larger count beats by `_GAIN`, walking upward."""
    best = min(rates)
    for n in sorted(rates):
        if rates[n] >= rates[best] * _GAIN:
            best = n
    return best


@dataclass(frozen=True)
class _Measured:
    """What a probe measured on one filesystem; the profile follows from it and the overrides."""

    streams: int
    write_bps: float
    direct_bps: float | None = None  # None: refused, or not measured
    direct_measured: bool = False

    def profile(self, forced_direct: bool | None) -> StorageProfile:
        d = self.direct_bps
        if forced_direct is not False and d is not None and (
                forced_direct or d >= _DIRECT_FLOOR * self.write_bps):
            return StorageProfile(streams=DIRECT_STREAMS, write_bps=d, direct=True)
        return StorageProfile(streams=self.streams, write_bps=self.write_bps)


_measured: dict[int, _Measured] = {}
_lock = threading.Lock()


def storage_profile(directory: str) -> StorageProfile:
    """The write profile of `directory`'s filesystem (probed there on first use)."""
    forced = _env_streams()
    forced_direct = _env_direct()
    if forced is not None:
        return StorageProfile(streams=forced, write_bps=None, direct=bool(forced_direct))
    dev = os.stat(directory).st_dev
    with _lock:  # concurrent saves of one process probe once, not against each other
        m = _measured.get(dev)
        if m is None or (forced_direct is not False and not m.direct_measured):
            m = _shared_probe(directory, dev, forced_direct, m)
            if m is None:
                # A full or read-only disk fails the save itself with a typed error
                # naming the checkpoint; the probe must not be what reports it.
                return StorageProfile(streams=1, write_bps=None)
            _measured[dev] = m
        return m.profile(forced_direct)


def _probe(directory: str, forced_direct: bool | None, known: _Measured | None,
           ) -> _Measured | None:
    if known is None:
        try:
            rates: dict[int, float] = {}
            for n in CANDIDATES:
                rates[n] = measure_write(directory, n)
                if choose_streams(rates) != n:
                    break  # more streams did not help: more still will not
        except OSError:
            return None
        n = choose_streams(rates)
        known = _Measured(streams=n, write_bps=rates[n])
    if forced_direct is False or known.direct_measured:
        return known
    try:
        rate: float | None = measure_write(directory, DIRECT_STREAMS, direct=True)
    except OSError:
        rate = None  # the filesystem refuses O_DIRECT: buffered it is
    return _Measured(known.streams, known.write_bps, rate, True)


# --- one probe per filesystem and node, shared by the processes (ranks) there
#
# Ranks of a job start together: probing at once, each would measure the others'
# writes and their choices could differ. A lock file serializes them; the first
# probes, the rest read its result. Results older than this are measured afresh.
_SHARED_TTL_S = 3600.0


def _cache_dir() -> str:
    env = os.environ.get("SHARDCKPT_CACHE_DIR")
    if env:
        return env
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "shardckpt")


def _shared_probe(directory: str, dev: int, forced_direct: bool | None,
                  known: _Measured | None) -> _Measured | None:
    try:
        fsid = os.statvfs(directory).f_fsid
        # The host too: a home directory may be shared by nodes whose local disks
        # have the same device numbers.
        host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())
        cache = os.path.join(_cache_dir(), f"probe-{host}-{dev:x}-{fsid:x}.json")
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        lock_fd = os.open(cache + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:  # no writable cache directory: this process probes for itself
        return _probe(directory, forced_direct, known)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        shared = _read_shared(cache)
        if shared is not None and (forced_direct is False or shared.direct_measured):
            return shared
        m = _probe(directory, forced_direct, shared or known)
        if m is not None:
            _write_shared(cache, m)
        return m
    finally:
        os.close(lock_fd)  # releases the lock


def _read_shared(cache: str) -> _Measured | None:
    try:
        if time.time() - os.stat(cache).st_mtime > _SHARED_TTL_S:
            return None
        with open(cache) as f:
            d = json.load(f)
        m = _Measured(streams=int(d["streams"]), write_bps=float(d["write_bps"]),
                      direct_bps=None if d["direct_bps"] is None else float(d["direct_bps"]),
                      direct_measured=bool(d["direct_measured"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent, stale or not ours: measure again
    ok = (m.streams in CANDIDATES and m.write_bps > 0
          and (m.direct_bps is None or m.direct_bps > 0))
    return m if ok else None


def _write_shared(cache: str, m: _Measured) -> None:
    tmp = f"{cache}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(m), f)
        os.replace(tmp, cache)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def forget() -> None:
    """Drop remembered profiles, this process's and the shared ones (tests; a filesystem
    remounted on other hardware)."""
    with _lock:
        _measured.clear()
        with contextlib.suppress(OSError):
            for e in os.listdir(_cache_dir()):
                if e.startswith("probe-") and e.endswith(".json"):
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(_cache_dir(), e))
