"""How many parallel write streams a filesystem rewards, measured once per filesystem.

A save probes the filesystem of its staging directory the first time this
process writes there: the same bytes written and fdatasync'd by 1, 2 and 4
concurrent `pwrite` streams into one scratch file, which is removed. The
result is remembered per device (`st_dev`) for the life of the process, so a
training job pays for it once (~0.1-0.3 s) and no user tunes thread counts.
SHARDCKPT_STREAMS overrides the count (tests, or a filesystem the probe
misjudges); the measured rate then is not known and is reported as None.

The probe also writes the same bytes with O_DIRECT (io/direct_sink.py) where the
filesystem accepts it; direct I/O is chosen when it writes at least `_DIRECT_FLOOR`
of the best buffered rate, since it leaves the CPU time of the page-cache copy to
the encoder. SHARDCKPT_DIRECT_IO=0 or 1 overrides that choice.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
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


_profiles: dict[int, StorageProfile] = {}
_lock = threading.Lock()


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


def storage_profile(directory: str) -> StorageProfile:
    """The write profile of `directory`'s filesystem (probed there on first use)."""
    forced = _env_streams()
    forced_direct = _env_direct()
    if forced is not None:
        return StorageProfile(streams=forced, write_bps=None, direct=bool(forced_direct))
    dev = os.stat(directory).st_dev
    with _lock:  # concurrent saves of one process probe once, not against each other
        prof = _profiles.get(dev)
        if prof is None:
            try:
                rates: dict[int, float] = {}
                for n in CANDIDATES:
                    rates[n] = measure_write(directory, n)
                    if choose_streams(rates) != n:
                        break  # more streams did not help: more still will not
            except OSError:
                # A full or read-only disk fails the save itself with a typed error
                # naming the checkpoint; the probe must not be what reports it.
                return StorageProfile(streams=1, write_bps=None)
            n = choose_streams(rates)
            prof = StorageProfile(streams=n, write_bps=rates[n])
            if forced_direct is not False:
                try:
                    rate = measure_write(directory, DIRECT_STREAMS, direct=True)
                except OSError:
                    rate = None  # the filesystem refuses O_DIRECT: buffered it is
                if rate is not None and (forced_direct or rate >= _DIRECT_FLOOR * rates[n]):
                    prof = StorageProfile(streams=DIRECT_STREAMS, write_bps=rate, direct=True)
            _profiles[dev] = prof
        return prof


def forget() -> None:
    """Drop remembered profiles (tests; a filesystem remounted on other hardware)."""
    with _lock:
        _profiles.clear()
