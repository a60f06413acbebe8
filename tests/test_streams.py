"""Parallel write streams (LocalSink), the stream-count probe, adaptive compression and
read-ahead on load: real files, real bytes, bitwise comparisons."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
import zlib

import pytest
import torch

import shardckpt
from shardckpt import codec
from shardckpt import format as fmt
from shardckpt.io import data_writer, direct_sink, prefetch, probe, sinks
from shardckpt.io import policy as policy_mod
from shardckpt.io.data_writer import DataFileWriter
from shardckpt.io.policy import REPROBE_EVERY, CompressionPolicy
from shardckpt.io.sinks import LocalSink
from shardckpt.io.tensor_bytes import tensor_bytes

MB = 1 << 20


def _pieces(seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 3 * MB + 5, 100, 2 * MB, 65536, 5 * MB - 3, 0, 12]
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
            for n in sizes]


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_local_sink_writes_every_byte_in_place(tmp_path, streams):
    path = str(tmp_path / "f.bin")
    pieces = _pieces(streams)
    # A small sync interval makes every stream fdatasync while the others write.
    sink = LocalSink(path, streams=streams, sync_every=MB)
    for p in pieces:
        sink.write(memoryview(p))
    sink.close()
    with open(path, "rb") as f:
        assert f.read() == b"".join(pieces)


def test_local_sink_abort_removes_the_file_and_never_raises(tmp_path):
    path = str(tmp_path / "f.bin")
    sink = LocalSink(path, streams=2)
    sink.write(memoryview(b"x" * MB))
    sink.abort()
    assert not os.path.exists(path)
    sink.abort()  # twice: still quiet


def test_local_sink_full_disk_is_a_typed_error_naming_the_file(tmp_path, monkeypatch):
    def full(fd: int, data: memoryview, offset: int) -> int:
        if offset + len(data) > 3 * MB:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(sinks, "_pwrite", full)
    path = str(tmp_path / "f.bin")
    sink = LocalSink(path, streams=2, rank=3)
    with pytest.raises(shardckpt.InsufficientSpaceError) as ei:
        for _ in range(16):
            sink.write(memoryview(b"y" * MB))
        sink.close()
    assert path in str(ei.value) and "rank 3" in str(ei.value)
    sink.abort()


def _counting_pwrite(monkeypatch, fail_past: int | None = None) -> list[tuple[int, int, str]]:
    """(offset, length, thread name) of every data write; ENOSPC past `fail_past` bytes."""
    calls: list[tuple[int, int, str]] = []

    def pw(fd: int, data: memoryview, offset: int) -> int:
        calls.append((offset, len(data), threading.current_thread().name))
        if fail_past is not None and offset + len(data) > fail_past:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(sinks, "_pwrite", pw)
    return calls


def test_a_file_smaller_than_the_hold_is_written_at_close_by_the_caller(tmp_path, monkeypatch):
    calls = _counting_pwrite(monkeypatch)
    started = []
    monkeypatch.setattr(threading.Thread, "start",
                        lambda self, real=threading.Thread.start: (started.append(self.name),
                                                                   real(self))[1])
    path = str(tmp_path / "f.bin")
    pieces = [b"a" * 1000, b"b" * (MB + 3), b"", b"c" * 17]
    sink = LocalSink(path, streams=4)
    for p in pieces:
        sink.write(memoryview(p))
    assert calls == [] and os.path.getsize(path) == 0  # held until close
    sink.close()
    with open(path, "rb") as f:
        assert f.read() == b"".join(pieces)
    assert started == [] and {c[2] for c in calls} == {threading.current_thread().name}
    assert [c[0] for c in calls] == [0, 1000, 1000 + MB + 3]

    # One byte past the hold: the streams take over, and every byte still lands in place.
    calls.clear()
    big = [bytes([i]) * MB for i in range(4)] + [b"z"]
    sink = LocalSink(str(tmp_path / "g.bin"), streams=2)
    for p in big:
        sink.write(memoryview(p))
    sink.close()
    with open(tmp_path / "g.bin", "rb") as f:
        assert f.read() == b"".join(big)
    assert len(started) == 2 and all(c[2].startswith("shardckpt-stream") for c in calls)


def test_a_held_file_that_hits_a_full_disk_is_a_typed_error_and_abort_writes_nothing(
        tmp_path, monkeypatch):
    calls = _counting_pwrite(monkeypatch, fail_past=MB)
    path = str(tmp_path / "f.bin")
    sink = LocalSink(path, streams=2, rank=1)
    sink.write(memoryview(b"x" * (2 * MB)))
    with pytest.raises(shardckpt.InsufficientSpaceError) as ei:
        sink.close()
    assert path in str(ei.value) and "rank 1" in str(ei.value)
    sink.abort()
    assert not os.path.exists(path)

    calls.clear()
    sink = LocalSink(path, streams=2)
    sink.write(memoryview(b"x" * 100))
    sink.abort()
    assert calls == [] and not os.path.exists(path)


def test_a_data_file_of_one_job_is_written_without_a_writer_thread(tmp_path, monkeypatch):
    """An incremental save's small data file: DataFileWriter hands its one job over in
    close(), on the calling thread, and the bytes and checksums are those of the items."""
    started = []
    monkeypatch.setattr(threading.Thread, "start",
                        lambda self, real=threading.Thread.start: (started.append(self.name),
                                                                   real(self))[1])
    items = _items(n=3, numel=4096)
    sink = _MemorySink()
    cfg = codec.CodecConfig(block_size=256 * 1024, compression="none")
    w = DataFileWriter(sink, "data/r0.bin", cfg, threads=2, rank=0)
    with w:
        recs = w.append_many((tensor_bytes(t), 4) for t in items)
        assert sink.buf == b""
    assert "shardckpt-writer" not in started
    assert sink.threads == {threading.get_ident()} and sink.closed
    assert w.size == len(sink.buf) and w.crc == zlib.crc32(sink.buf)
    assert _decode_all(bytes(sink.buf), recs, cfg) == [t.numpy().tobytes() for t in items]


class _MemorySink:
    """A sink in memory that checks the protocol: one calling thread, consecutive ranges."""

    def __init__(self, delay_per_mb: float = 0.0, expected_bps: float | None = None) -> None:
        self.name = "mem://test"
        self.expected_bps = expected_bps  # what a probe of this storage would have said
        self.buf = bytearray()
        self.threads: set[int] = set()
        self.delay = delay_per_mb
        self.closed = self.aborted = False

    def write(self, data: memoryview) -> None:
        self.threads.add(threading.get_ident())
        if self.delay:
            time.sleep(self.delay * len(data) / MB)
        self.buf += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


def _items(n: int = 24, numel: int = 256 * 1024) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    # Weight-like fp32: the exponent planes compress well, so zstd clearly pays off.
    return [torch.randn(numel, generator=g) * 0.02 for _ in range(n)]


def _decode_all(buf: bytes, records: list, cfg: codec.CodecConfig) -> list[bytes]:
    out = []
    for rec in records:
        raw = bytearray(rec.nbytes)
        codec.decode_item_blocks(memoryview(buf)[rec.offset:rec.offset + rec.length],
                                 [list(b) for b in rec.blocks], memoryview(raw))
        out.append(bytes(raw))
    return out


def _write(sink: _MemorySink, items: list[torch.Tensor]) -> tuple[DataFileWriter, list]:
    cfg = codec.CodecConfig(block_size=256 * 1024)
    w = DataFileWriter(sink, "data/r0.bin", cfg, threads=2, rank=0)
    with w:
        recs = w.append_many((tensor_bytes(t), 4) for t in items)
    assert w.size == len(sink.buf) and w.crc == zlib.crc32(sink.buf)
    assert len(sink.threads) == 1 and sink.closed
    assert _decode_all(bytes(sink.buf), recs, cfg) == [t.numpy().tobytes() for t in items]
    return w, recs


def _compressed(rec) -> bool:  # noqa: ANN001
    return any(b[3] != fmt.blocks.MODE_RAW for b in rec.blocks)


def test_slow_storage_makes_it_compress(monkeypatch):
    # The prior says "very fast storage" (raw would win), but writes take 20 ms per MB
    # (~50 MB/s, slower than any zstd-1 encoder): once measured, items are compressed.
    # A short write queue keeps decisions close to the measured writes for this small test.
    monkeypatch.setattr(data_writer, "_WRITE_QUEUE_BYTES", 4 * MB)
    w, recs = _write(_MemorySink(delay_per_mb=0.02, expected_bps=1e12), _items(48))
    assert all(_compressed(r) for r in recs[-12:])
    assert w.policy.storage_bps < 200e6


def test_slow_encoder_makes_it_store_raw(monkeypatch):
    real = codec.encode_buffer

    def slow(raw, group, cfg, threads=None):  # noqa: ANN001, ANN202
        if cfg.compression == "zstd":
            time.sleep(len(raw) / (4 * MB))  # a 4 MB/s "encoder"
        return real(raw, group, cfg, threads)

    monkeypatch.setattr(codec, "encode_buffer", slow)
    w, recs = _write(_MemorySink(expected_bps=2e9), _items(48))
    s = w.policy.summary()
    assert s["items_raw"] + s["items_compressed"] == len(recs)
    assert sum(not _compressed(r) for r in recs) == s["items_raw"]
    # After the first measurements only the periodic re-probes are compressed.
    assert sum(_compressed(r) for r in recs[-24:]) <= 24 // REPROBE_EVERY + 1


def test_policy_decisions_from_rates():
    p = CompressionPolicy(threads=2, storage_bps=None)
    assert p.choose()  # nothing measured: compress (and measure)
    p.observe_encode(100 * MB, 50 * MB, thread_s=1.0, compressed=True)  # 200 MB/s pool
    assert p.choose()  # storage rate unknown
    p.observe_write(64 * MB, 1.0)  # storage: 64 MB/s < 200 MB/s encoder
    assert p.predicted()[0] < p.predicted()[1] and p.choose()
    q = CompressionPolicy(threads=2, storage_bps=2000e6)  # 2 GB/s disk
    q.observe_encode(100 * MB, 50 * MB, thread_s=1.0, compressed=True)
    q.observe_encode(100 * MB, 100 * MB, thread_s=0.02, compressed=False)
    assert not q.choose()
    raws = [q.choose() for _ in range(REPROBE_EVERY)]
    assert raws[:-1] == [False] * (REPROBE_EVERY - 1) and raws[-1]  # periodic re-probe
    # Compression predicted only a little faster than raw (the encoder pool just about
    # keeps up with the disk): raw, since the prediction ignores the cores the writer
    # and the checksums take.
    e = CompressionPolicy(threads=2, storage_bps=1000e6)  # 1 GB/s disk
    e.observe_encode(100 * MB, 92 * MB, thread_s=0.095, compressed=True)  # ~2.1 GB/s pool
    e.observe_encode(100 * MB, 100 * MB, thread_s=0.02, compressed=False)
    z, r = e.predicted()
    assert z < r < z * 1.15 and not e.choose()
    # Clearly faster (a slow disk, good ratio): compressed.
    f = CompressionPolicy(threads=2, storage_bps=300e6)
    f.observe_encode(100 * MB, 60 * MB, thread_s=0.2, compressed=True)
    f.observe_encode(100 * MB, 100 * MB, thread_s=0.02, compressed=False)
    assert f.choose()


def test_next_save_to_a_storage_decides_from_the_rates_the_last_one_measured(tmp_path):
    q = policy_mod.policy_for(("t", 1), 2, 2000e6)
    assert q.predicted() is None and q.choose()  # nothing known yet: compress, measure
    q.observe_encode(100 * MB, 50 * MB, thread_s=1.0, compressed=True)
    q.observe_encode(100 * MB, 100 * MB, thread_s=0.02, compressed=False)
    policy_mod.remember(("t", 1), q)
    # The next save there: raw from its first item (a few small items never fill a window).
    nxt = policy_mod.policy_for(("t", 1), 2, 2000e6)
    assert nxt.predicted() == q.predicted() and not nxt.choose()
    assert nxt.summary() == {"items_compressed": 0, "items_raw": 1}
    # Another storage, another thread count, or a sink that cannot say: nothing carried.
    for key, threads in ((("t", 2), 2), (("t", 1), 4), (None, 2)):
        assert policy_mod.policy_for(key, threads, 2000e6).predicted() is None
    # A real save records its storage's rates under the sink's key.
    policy_mod._LAST.clear()
    shardckpt.save({"w": torch.randn(3 << 20)}, str(tmp_path / "a"))
    ((kind, dev, streams),) = policy_mod._LAST
    assert dev == os.stat(tmp_path).st_dev and kind in ("LocalSink", "DirectSink")


def test_probe_choice_and_cache(tmp_path, monkeypatch):
    assert probe.choose_streams({1: 100.0, 2: 180.0, 4: 190.0}) == 2
    assert probe.choose_streams({1: 100.0, 2: 105.0, 4: 250.0}) == 4
    assert probe.choose_streams({1: 100.0, 2: 90.0, 4: 110.0}) == 1
    monkeypatch.delenv("SHARDCKPT_STREAMS", raising=False)
    monkeypatch.delenv("SHARDCKPT_DIRECT_IO", raising=False)
    probe.forget()
    calls = []
    real = probe.measure_write
    monkeypatch.setattr(probe, "measure_write",
                        lambda d, n, nbytes=MB, direct=False: calls.append((n, direct))
                        or real(d, n, MB, direct))
    a = probe.storage_profile(str(tmp_path))
    b = probe.storage_profile(str(tmp_path))
    # 1 and 2 are always measured, 4 only if 2 beat 1, then direct I/O; once per filesystem.
    buffered = [n for n, d in calls if not d]
    assert a == b and buffered[:2] == [1, 2] and len(buffered) in (2, 3) and a.write_bps > 0
    assert [d for _, d in calls] == [False] * len(buffered) + [True]
    assert os.listdir(tmp_path) == []  # the scratch files are gone
    # Forced off: never measured, never chosen.
    probe.forget()
    calls.clear()
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "0")
    assert not probe.storage_profile(str(tmp_path)).direct and all(not d for _, d in calls)
    probe.forget()
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "1")
    assert probe.storage_profile(str(tmp_path)).direct == direct_sink.supported()
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "yes")
    probe.forget()
    with pytest.raises(ValueError, match="SHARDCKPT_DIRECT_IO"):
        probe.storage_profile(str(tmp_path))
    monkeypatch.delenv("SHARDCKPT_DIRECT_IO")
    monkeypatch.setenv("SHARDCKPT_STREAMS", "3")
    assert probe.storage_profile(str(tmp_path)).streams == 3
    probe.forget()


_PROBE_CHILD = """
import json, sys, time
from shardckpt.io import probe
calls = []
real = probe.measure_write
probe.measure_write = lambda d, n, nbytes=1 << 20, direct=False: (
    calls.append([n, direct]) or real(d, n, 1 << 20, direct))
while time.time() < float(sys.argv[2]):  # start together, as the ranks of a job do
    time.sleep(0.001)
p = probe.storage_profile(sys.argv[1])
print(json.dumps({"calls": calls, "profile": [p.streams, p.write_bps, p.direct]}))
"""


def _probe_children(data, cache, n: int) -> list[dict]:
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items()
           if k not in ("SHARDCKPT_STREAMS", "SHARDCKPT_DIRECT_IO")}
    env["SHARDCKPT_CACHE_DIR"] = str(cache)
    start = time.time() + 8
    procs = [subprocess.Popen([sys.executable, "-c", _PROBE_CHILD, str(data), str(start)],
                              env=env, stdout=subprocess.PIPE) for _ in range(n)]
    return [json.loads(p.communicate(timeout=180)[0]) for p in procs]


def test_probe_is_shared_by_the_processes_of_a_node(tmp_path):
    data, cache = tmp_path / "data", tmp_path / "cache"
    data.mkdir()
    outs = _probe_children(data, cache, 4)
    # One process measured (under the lock); the others read its result and chose alike.
    assert sum(1 for o in outs if o["calls"]) == 1, outs
    assert len({tuple(o["profile"]) for o in outs}) == 1, outs
    (f,) = [p for p in cache.iterdir() if p.suffix == ".json"]
    # A damaged or stale result is measured again, by one process.
    f.write_text("{not json")
    outs = _probe_children(data, cache, 2)
    assert sum(1 for o in outs if o["calls"]) == 1, outs
    assert json.loads(f.read_text())["streams"] in probe.CANDIDATES
    os.utime(f, (time.time() - 2 * 3600, time.time() - 2 * 3600))
    assert sum(1 for o in _probe_children(data, cache, 1) if o["calls"]) == 1
    assert sorted(os.listdir(data)) == []  # no scratch file left


def test_read_pieces_split_at_block_boundaries():
    recs = [[3 * MB, 4 * MB, 0, "z"]] * 20
    blocks = fmt.blocks.item_blocks(1000, recs)
    pieces = prefetch.read_pieces(blocks)
    assert [b for _, _, bl in pieces for b in bl] == blocks
    assert all(length <= prefetch.READ_PIECE for _, length, _ in pieces)
    assert all(off == bl[0].offset and length == sum(b.stored_len for b in bl)
               for off, length, bl in pieces)


def _state() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"w": torch.randn(900, 1000, generator=g), "h": torch.randn(3, 77).bfloat16(),
            "b": torch.randn(5000, generator=g), "meta": {"step": 4}}


@pytest.mark.parametrize("streams", ["1", "4"])
def test_save_load_with_streams_and_read_ahead(tmp_path, monkeypatch, streams):
    monkeypatch.setenv("SHARDCKPT_STREAMS", streams)
    monkeypatch.setattr(prefetch, "READ_PIECE", 256 * 1024)  # many pieces per tensor
    hits = []
    real_take = prefetch.Prefetcher.take
    monkeypatch.setattr(prefetch.Prefetcher, "take",
                        lambda self, key: (lambda d: hits.append(d is not None) or d)(
                            real_take(self, key)))
    state = _state()
    path = tmp_path / "ck"
    shardckpt.save(state, path, block_size=64 * 1024)
    manifest = json.loads((path / fmt.MANIFEST_NAME).read_text())
    c = manifest["codec"]
    assert c["adaptive"] is True and c["items_compressed"] + c["items_raw"] == 4
    dest = {"w": torch.zeros(900, 1000), "h": torch.zeros(3, 77).bfloat16(),
            "b": torch.zeros(5000), "meta": {"step": 0}}
    shardckpt.load(dest, path)
    assert all(torch.equal(dest[k], state[k]) for k in ("w", "h", "b"))
    assert dest["meta"] == {"step": 4}
    assert len(hits) > 12 and all(hits)  # every read came from the read-ahead


def test_truncated_file_is_reported_through_read_ahead(tmp_path):
    state = _state()
    path = tmp_path / "ck"
    shardckpt.save(state, path, block_size=64 * 1024, compression="none")
    data = path / fmt.data_file_name(0)
    os.truncate(data, os.path.getsize(data) // 2)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="truncated|checksum|size"):
        shardckpt.load({k: torch.zeros_like(v) if torch.is_tensor(v) else v
                        for k, v in state.items()}, path)


class _CountingFile:
    """A real file read through pread, counting the requests (what an object store bills)."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self.size = os.fstat(self._fd).st_size
        self.calls: list[tuple[int, int]] = []
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        with self._lock:
            self.calls.append((offset, length))
        return os.pread(self._fd, length, offset)

    def close(self) -> None:
        os.close(self._fd)


def test_read_ahead_fetches_back_to_back_ranges_in_one_request(tmp_path):
    data = os.urandom(3 << 20)
    (tmp_path / "f.bin").write_bytes(data)
    f = _CountingFile(str(tmp_path / "f.bin"))
    # Three ranges that continue one another, then one after a gap, then a repeat.
    keys = [("f", 0, 1000), ("f", 1000, 5000), ("f", 6000, 100), ("f", 10_000, 50),
            ("f", 6000, 100)]
    pf = prefetch.Prefetcher(lambda rel: f, keys, streams=2)
    got = [pf.take(k) for k in keys[:4]]
    pf.close()
    assert [bytes(g) for g in got] == [data[o:o + n] for _, o, n in keys[:4]]
    # The first three are one read of their span; the gapped one is its own read.
    assert sorted(f.calls) == [(0, 6100), (10_000, 50)]
    assert sum(n for _, n in f.calls) == sum(n for _, _, n in keys[:4])  # no extra bytes
    f.close()


def test_read_ahead_of_a_truncated_span_reports_the_short_range(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 1500)
    f = _CountingFile(str(tmp_path / "f.bin"))
    keys = [("f", 0, 1000), ("f", 1000, 1000)]
    pf = prefetch.Prefetcher(lambda rel: f, keys, streams=1)
    a, b = pf.take(keys[0]), pf.take(keys[1])
    pf.close()
    assert len(a) == 1000 and len(b) == 500  # the caller sees the truncation of its range
    f.close()
