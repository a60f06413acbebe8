"""Data files written with O_DIRECT (io/direct_sink.py): real files, real bytes."""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import pytest
import torch

import shardckpt
from shardckpt.io import direct_sink, probe, sinks
from shardckpt.io.direct_sink import ALIGN, DirectSink

pytestmark = pytest.mark.skipif(not direct_sink.supported(), reason="no O_DIRECT here")

KB = 1 << 10
CHUNK = 64 * KB  # small chunks: many chunk boundaries, a padded tail


def _direct_ok(d: str) -> bool:
    try:
        DirectSink(os.path.join(d, "probe.bin"), chunk=CHUNK).abort()
        return True
    except OSError:
        return False


@pytest.fixture
def ddir(tmp_path):
    if not _direct_ok(str(tmp_path)):
        pytest.skip(f"{tmp_path} refuses O_DIRECT")
    return tmp_path


def _pieces(seed: int) -> list[bytes]:
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 7, 3 * CHUNK + 5, 100, 2 * CHUNK, ALIGN, 5 * CHUNK - 3, 0, 12, CHUNK - 1]
    return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()
            for n in sizes]


@pytest.mark.parametrize("streams", [1, 2, 4])
def test_every_byte_lands_in_place_and_the_file_has_its_true_size(ddir, streams):
    path = str(ddir / "f.bin")
    pieces = _pieces(streams)
    sink = DirectSink(path, streams=streams, chunk=CHUNK)
    for p in pieces:
        sink.write(memoryview(p))
    sink.close()
    assert sink.direct  # nothing fell back
    data = open(path, "rb").read()
    assert len(data) == sum(map(len, pieces)) and data == b"".join(pieces)


def test_an_exact_multiple_of_the_chunk_needs_no_truncation(ddir):
    path = str(ddir / "f.bin")
    body = os.urandom(3 * CHUNK)
    sink = DirectSink(path, chunk=CHUNK)
    sink.write(memoryview(body))
    sink.close()
    assert open(path, "rb").read() == body


def test_a_file_smaller_than_a_chunk_is_written_whole_at_close_without_padding(ddir, monkeypatch):
    reserved, writes = [], []
    real_pwrite = sinks._pwrite

    def spy(fd: int, data, offset: int) -> int:  # noqa: ANN001
        writes.append((offset, len(data), bool(fcntl.fcntl(fd, fcntl.F_GETFL)
                                               & direct_sink.DIRECT_FLAG)))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(sinks, "_pwrite", spy)
    real_reserve = os.posix_fallocate
    monkeypatch.setattr(direct_sink.os, "posix_fallocate",
                        lambda *a: reserved.append(a) or real_reserve(*a))
    path = str(ddir / "f.bin")
    body = [os.urandom(n) for n in (1, 5000, CHUNK - 6000)]  # CHUNK - 999 bytes in all
    sink = DirectSink(path, streams=2, chunk=CHUNK)
    for b in body:
        sink.write(memoryview(b))
    assert not writes and not sink._threads  # nothing written, no stream started yet
    sink.close()
    assert open(path, "rb").read() == b"".join(body)
    # one buffered write of the true length: no reserve ahead, no padding to truncate
    assert writes == [(0, CHUNK - 999, False)] and not reserved and not sink._threads
    assert sink.direct  # not a fallback: a larger file still goes direct
    big = DirectSink(str(ddir / "g.bin"), chunk=CHUNK)
    big.write(memoryview(b"z" * (CHUNK + 1)))
    big.close()
    assert [d for _, _, d in writes[1:]] == [True, True]
    assert open(ddir / "g.bin", "rb").read() == b"z" * (CHUNK + 1)


def test_write_copies_so_the_caller_may_reuse_its_buffer(ddir):
    path = str(ddir / "f.bin")
    buf = bytearray(b"a" * (CHUNK + 10))
    sink = DirectSink(path, chunk=CHUNK)
    sink.write(memoryview(buf))
    buf[:] = b"b" * len(buf)
    sink.write(memoryview(buf))
    sink.close()
    assert open(path, "rb").read() == b"a" * (CHUNK + 10) + b"b" * (CHUNK + 10)


@pytest.mark.parametrize("at_once", [False, True])
def test_a_filesystem_that_refuses_a_direct_write_gets_the_rest_buffered(ddir, monkeypatch,
                                                                         at_once):
    # at_once: both streams inside a refused direct write together. The second found the
    # file already switched by the first and raised (a CI failure: SaveFailedError, EINVAL).
    refused = []
    both = threading.Barrier(2)

    def einval_when_direct(fd: int, data, offset: int) -> int:  # noqa: ANN001
        if fcntl.fcntl(fd, fcntl.F_GETFL) & direct_sink.DIRECT_FLAG:
            refused.append(offset)
            if at_once:
                try:
                    both.wait(timeout=5)
                except threading.BrokenBarrierError:
                    pass
            raise OSError(errno.EINVAL, "Invalid argument")
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(sinks, "_pwrite", einval_when_direct)
    path = str(ddir / "f.bin")
    pieces = _pieces(7)
    sink = DirectSink(path, streams=2, chunk=CHUNK)
    for p in pieces:
        sink.write(memoryview(p))
    sink.close()
    assert refused and not sink.direct
    assert open(path, "rb").read() == b"".join(pieces)


def test_full_disk_is_a_typed_error_naming_the_file_and_rank(ddir, monkeypatch):
    def full(fd: int, data, offset: int) -> int:  # noqa: ANN001
        if offset + len(data) > 3 * CHUNK:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.pwrite(fd, data, offset)

    monkeypatch.setattr(sinks, "_pwrite", full)
    path = str(ddir / "f.bin")
    sink = DirectSink(path, streams=2, rank=3, chunk=CHUNK)
    with pytest.raises(shardckpt.InsufficientSpaceError) as ei:
        for _ in range(16):
            sink.write(memoryview(b"y" * CHUNK))
        sink.close()
    assert path in str(ei.value) and "rank 3" in str(ei.value)
    sink.abort()
    assert not os.path.exists(path)


def test_abort_removes_the_file_and_never_raises(ddir):
    path = str(ddir / "f.bin")
    sink = DirectSink(path, chunk=CHUNK)
    sink.write(memoryview(b"x" * (3 * CHUNK)))
    sink.abort()
    assert not os.path.exists(path)
    sink.abort()


def test_save_writes_with_o_direct_when_asked_and_loads_bitwise(ddir, monkeypatch):
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "1")
    monkeypatch.delenv("SHARDCKPT_STREAMS", raising=False)
    probe.forget()
    made = []
    real_init = DirectSink.__init__

    def spy(self, *a, **k):  # noqa: ANN001, ANN002, ANN003
        real_init(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(DirectSink, "__init__", spy)
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(1000, 777, generator=g).to(torch.bfloat16),
             "m": torch.randn(3_000_001, generator=g), "step": 7,
             "i": torch.arange(12345, dtype=torch.int64)}
    for comp in ("none", "zstd"):
        path = ddir / f"ck-{comp}"
        shardckpt.save(state, path, compression=comp)
        assert made and all(s.direct for s in made)
        made.clear()
        dest = {k: torch.zeros_like(v) if torch.is_tensor(v) else 0 for k, v in state.items()}
        shardckpt.load(dest, path)
        for k, v in state.items():
            if torch.is_tensor(v):
                assert torch.equal(dest[k].view(torch.uint8), v.view(torch.uint8)), k
            else:
                assert dest[k] == v
        assert shardckpt.verify(path).ok
    probe.forget()


def test_forced_off_uses_the_buffered_sink(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDCKPT_DIRECT_IO", "0")
    probe.forget()
    sink = sinks.open_sink(str(tmp_path), "f.bin")
    try:
        assert isinstance(sink, sinks.LocalSink)
    finally:
        sink.abort()
    probe.forget()


def test_space_is_reserved_ahead_and_a_refused_reservation_is_not_an_error(ddir, monkeypatch):
    calls = []
    real = os.posix_fallocate
    monkeypatch.setattr(direct_sink, "RESERVE", 2 * CHUNK)

    def spy(fd: int, off: int, n: int) -> None:
        calls.append((off, n))
        real(fd, off, n)

    monkeypatch.setattr(os, "posix_fallocate", spy)
    path = str(ddir / "f.bin")
    body = os.urandom(7 * CHUNK + 123)
    sink = DirectSink(path, chunk=CHUNK)
    sink.write(memoryview(body))
    sink.close()
    # Reserved in order, ahead of the writes, and truncated back to the true size.
    assert calls and all(a[0] + a[1] == b[0] for a, b in zip(calls, calls[1:]))
    assert open(path, "rb").read() == body

    def refuse(fd: int, off: int, n: int) -> None:  # less room than the reserve
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", refuse)
    sink = DirectSink(path, chunk=CHUNK)
    sink.write(memoryview(body))
    sink.close()
    assert open(path, "rb").read() == body
