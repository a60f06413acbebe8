"""The native crc32 (csrc/crc32_fast.cpp: PCLMULQDQ / VPCLMULQDQ folding) is zlib.crc32."""

from __future__ import annotations

import platform
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt import codec
from shardckpt.format import blocks as fmt

native = pytest.importorskip("shardckpt._native")

IMPLS = ["zlib", "pclmul", "vpclmul"]
BEST = native.crc32_impl()
# Each one this CPU runs, then the default choice (None).
AVAILABLE = IMPLS[: IMPLS.index(BEST) + 1]
IMPL_PARAMS = [*AVAILABLE, None]
SOURCE = Path(__file__).resolve().parents[1] / "csrc" / "crc32_fast.cpp"


def rand_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def crc(data, value: int = 0, impl: str | None = None) -> int:
    return native.crc32(data, value) if impl is None else native.crc32(data, value, impl)


def test_a_cpu_with_carryless_multiply_uses_it() -> None:
    # Otherwise every comparison below would only be zlib against zlib.
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the folding paths are x86 only")
    flags = Path("/proc/cpuinfo").read_text().split()
    if "pclmulqdq" not in flags:
        pytest.skip("no PCLMULQDQ")
    assert BEST in ("pclmul", "vpclmul")
    if {"avx512f", "vpclmulqdq"} <= set(flags):
        assert BEST == "vpclmul"


def test_unknown_impl_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown crc32 impl"):
        native.crc32(b"abc", 0, "sse9")


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_every_length(impl: str | None) -> None:
    data = rand_bytes(2600, 1)
    # Well past the thresholds (79 and 512 bytes): the wide path folds 256,
    # then 64, then 16 bytes at a time, so every remainder mod 256 occurs.
    for n in range(0, 2600):
        assert crc(data[:n], 0, impl) == zlib.crc32(data[:n]), n


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_every_alignment(impl: str | None) -> None:
    buf = bytearray(rand_bytes(70000, 2))
    view = memoryview(buf)
    for off in range(64):
        for n in (78, 79, 80, 100, 511, 512, 575, 1023, 1100, 1344, 4096 + 13, 65536 + 17):
            part = view[off:off + n]
            assert crc(part, 0, impl) == zlib.crc32(part), (off, n)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_initial_values(impl: str | None) -> None:
    rng = np.random.default_rng(3)
    data = rand_bytes(300000, 4)
    for _ in range(200):
        n = int(rng.integers(0, len(data)))
        v = int(rng.integers(0, 2**32))
        assert crc(data[:n], v, impl) == zlib.crc32(data[:n], v), (n, v)
    for v in (0, 1, 0xFFFFFFFF, 0x80000000):
        assert crc(data, v, impl) == zlib.crc32(data, v)


def test_values_are_masked_like_zlib() -> None:
    data = rand_bytes(5000, 5)
    for v in (2**32, 2**32 + 7, -1, -12345, 2**70 + 3):
        assert native.crc32(data, v) == zlib.crc32(data, v), v


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_random_lengths_up_to_20_mb(impl: str | None) -> None:
    data = rand_bytes(20 << 20, 6)
    rng = np.random.default_rng(7)
    view = memoryview(data)
    for n in [len(data), *(int(x) for x in rng.integers(0, len(data), 6))]:
        off = int(rng.integers(0, 64))
        part = view[off:n]
        assert crc(part, 0, impl) == zlib.crc32(part), (off, n)


@pytest.mark.parametrize("impl", IMPL_PARAMS)
def test_chained(impl: str | None) -> None:
    data = rand_bytes(1 << 20, 8)
    rng = np.random.default_rng(9)
    for _ in range(50):
        cut = int(rng.integers(0, len(data)))
        a, b = data[:cut], data[cut:]
        assert crc(b, crc(a, 0, impl), impl) == zlib.crc32(data)
    # Many uneven pieces, as verify and materialize hash a file block by block.
    pos, value = 0, 0
    for size in rng.integers(0, 5000, 400):
        value = crc(data[pos:pos + int(size)], value, impl)
        pos += int(size)
    assert value == zlib.crc32(data[:pos])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_memoryviews_of_tensors(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    t = (torch.randn(257, 129) * 100).to(dtype)
    arr = t.view(torch.uint8).numpy() if dtype == torch.bfloat16 else t.numpy()
    mv = memoryview(arr)
    assert mv.ndim == 2
    expect = zlib.crc32(t.view(torch.uint8).numpy().tobytes())
    assert native.crc32(mv) == zlib.crc32(mv) == expect
    assert codec.crc32(mv) == expect
    flat = memoryview(t.reshape(-1).view(torch.uint8).numpy())[3:]
    assert native.crc32(flat) == zlib.crc32(flat)


def test_read_only_and_other_buffers() -> None:
    data = rand_bytes(100000, 10)
    ro = memoryview(data)
    assert ro.readonly
    assert native.crc32(data) == native.crc32(ro) == zlib.crc32(data)
    assert native.crc32(bytearray(data)) == zlib.crc32(data)
    assert native.crc32(np.frombuffer(data, dtype=np.uint8)) == zlib.crc32(data)
    assert native.crc32(b"") == 0 and native.crc32(b"", 1234) == 1234


def test_non_contiguous_is_refused_like_zlib() -> None:
    strided = memoryview(bytearray(4096))[::2]
    with pytest.raises((BufferError, TypeError, ValueError)):
        zlib.crc32(strided)
    with pytest.raises((BufferError, TypeError, ValueError)):
        native.crc32(strided)
    with pytest.raises(TypeError):
        native.crc32("text")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=6000), value=st.integers(0, 2**32 - 1), off=st.integers(0, 63),
       impl=st.sampled_from(IMPL_PARAMS))
def test_property_matches_zlib(data: bytes, value: int, off: int, impl: str | None) -> None:
    buf = bytearray(off) + data
    part = memoryview(buf)[off:]
    assert crc(part, value, impl) == zlib.crc32(data, value)


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.binary(max_size=3000), max_size=8))
def test_property_chained(pieces: list[bytes]) -> None:
    value = 0
    for p in pieces:
        value = codec.crc32(p, value)
    assert value == zlib.crc32(b"".join(pieces))


def test_python_function_without_the_extension(monkeypatch: pytest.MonkeyPatch) -> None:
    data = rand_bytes(10000, 11)
    monkeypatch.setattr(codec, "_native", None)
    assert codec.active_path() == "python"
    assert codec.crc32(data) == zlib.crc32(data)
    assert codec.crc32(data[5000:], codec.crc32(data[:5000])) == zlib.crc32(data)


# -- the folding constants and the method, recomputed from the polynomial

POLY = 0x104C11DB7  # x^32 + ... + 1, the normal (unreflected) CRC-32 polynomial


def xpow_mod(n: int) -> int:
    r = 1
    for _ in range(n):
        r <<= 1
        if r >> 32:
            r ^= POLY
    return r


def lane_constant(n: int) -> int:
    """x^n mod P as csrc/crc32_fast.cpp stores it: degree d at bit 32 - d."""
    k = xpow_mod(n)
    return sum(1 << (32 - d) for d in range(32) if k >> d & 1)


def test_constants_in_the_source() -> None:
    found = {int(n): int(v, 16) for n, v in
             re.findall(r"constexpr uint64_t kX(\d+) = (0x[0-9a-fA-F]+)ULL;", SOURCE.read_text())}
    # Folds over 128, 512 and 2048 bits, each with x^(D+32) and x^(D-32).
    assert sorted(found) == [96, 160, 480, 544, 2016, 2080]
    for n, v in found.items():
        assert v == lane_constant(n), n


def _clmul(a: int, b: int) -> int:
    r = 0
    while b:
        if b & 1:
            r ^= a
        a <<= 1
        b >>= 1
    return r


def _fold_model(data: bytes, value: int) -> int:
    """The 128-bit path in Python: four lanes, then one, then zlib over the rest."""
    if len(data) < 64:
        return zlib.crc32(data, value)

    def fold(x: int, dist: int) -> int:
        return (_clmul(x & (2**64 - 1), lane_constant(dist + 32))
                ^ _clmul(x >> 64, lane_constant(dist - 32)))

    def load(off: int) -> int:
        return int.from_bytes(data[off:off + 16], "little")

    x = [load(16 * i) for i in range(4)]
    x[0] ^= ~value & 0xFFFFFFFF
    p = 64
    while len(data) - p >= 64:
        x = [fold(x[i], 512) ^ load(p + 16 * i) for i in range(4)]
        p += 64
    r = x[0]
    for lane in x[1:]:
        r = fold(r, 128) ^ lane
    while len(data) - p >= 16:
        r = fold(r, 128) ^ load(p)
        p += 16
    return zlib.crc32(data[p:], zlib.crc32(r.to_bytes(16, "little"), 0xFFFFFFFF))


def test_the_method_in_python() -> None:
    for n in (64, 65, 79, 80, 127, 128, 200, 333):
        data = rand_bytes(n, n)
        for value in (0, 0xFFFFFFFF, 0x12345678):
            assert _fold_model(data, value) == zlib.crc32(data, value), (n, value)


# -- what the codec records and checks

@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_encoded_blocks_record_zlib_crc(compression: str, group: int) -> None:
    torch.manual_seed(1)
    t = torch.randn(300000).to(torch.bfloat16 if group == 2 else torch.float32)
    t[:50000] = 0  # a compressible stretch, so that compressed blocks occur
    raw = memoryview(t.view(torch.uint8).numpy())
    cfg = codec.CodecConfig(compression=compression, block_size=64 << 10)
    blocks = codec.encode_buffer(raw, group, cfg, threads=2)
    modes = {rec[3] for _, rec in blocks}
    if compression == "none":
        assert modes == {fmt.MODE_RAW}
    else:
        assert modes & {fmt.MODE_ZSTD, fmt.MODE_GROUPED}
    for stored, rec in blocks:
        assert rec[0] == len(stored) and rec[2] == zlib.crc32(stored)
    # The single-block entry point, on an odd length and an unaligned start.
    part = raw[group * 3:group * 3 + group * 40001]
    stored, rec = codec.encode_block(part, group, cfg)
    assert rec[2] == zlib.crc32(stored)

    stored_all = b"".join(s for s, _ in blocks)
    recs = [r for _, r in blocks]
    out = bytearray(len(raw))
    codec.decode_item_blocks(memoryview(stored_all), recs, memoryview(out), threads=2)
    assert out == raw.tobytes()
    # One flipped bit in the last block fails its crc on decode.
    bad = bytearray(stored_all)
    bad[-1] ^= 0x10
    with pytest.raises(Exception, match="checksum mismatch in block"):
        codec.decode_item_blocks(memoryview(bad), recs, memoryview(out), threads=2)
