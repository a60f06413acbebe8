"""The block codec: native and pure-Python paths are interchangeable (each decodes the other's
blocks bitwise); the native legacy strategy is byte-identical to the Python reference."""

from __future__ import annotations

import os
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from shardckpt import codec
from shardckpt import format as fmt
from shardckpt.errors import CorruptCheckpointError
from shardckpt.format.blocks import record_problem

native = codec._native
needs_native = pytest.mark.skipif(native is None, reason="native extension (shardckpt._native) "
                                  "not built; pure-Python path only")

# Small blocks so that modest tensors span many blocks, with planes both below
# and above the 2 * SAMPLE_SIZE threshold of the raw-or-zstd sample test.
BLOCK = 1 << 16
# Native plane strategies (csrc/codec.h): 0 = regular zstd frames, the Python
# reference's bytes; 1 = auto (the default); 2 = Huffman-only frames.
LEGACY, AUTO, HUFFMAN = 0, 1, 2


def _dtypes() -> list[torch.dtype]:
    out = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8, torch.int16,
           torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
    out += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
    return out


DTYPES = _dtypes()
# Element counts: empty, one, odd, not a multiple of a block, several blocks.
SIZES = [0, 1, 7, 4099, 70001]
CONTENTS = ["weights", "random", "constant"]


def make(dtype: torch.dtype, n: int, content: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if content == "constant":
        base = torch.full((n,), 0.375)
    elif content == "weights":  # trained-weight-like: small values, redundant exponents
        base = torch.randn(n, generator=g) * 0.02
    else:
        base = torch.randn(n, generator=g) * 1000
    if dtype == torch.bool:
        return base > 0
    if dtype == torch.complex64:
        return torch.complex(base, base.flip(0))
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        if content == "random":
            return torch.randint(info.min, info.max, (n,), generator=g, dtype=torch.int64).to(dtype)
        return (base * 100).round().clamp(info.min, info.max).to(dtype)
    return base.to(dtype)


def as_bytes(t: torch.Tensor) -> memoryview:
    """Tensor -> its raw bytes (C order), the codec's input."""
    t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def from_bytes(b: bytes | bytearray, like: torch.Tensor) -> torch.Tensor:
    u8 = torch.frombuffer(bytearray(b), dtype=torch.uint8) if len(b) else torch.empty(0, dtype=torch.uint8)
    return u8.view(like.dtype).reshape(like.shape)


def py_encode_all(raw: memoryview, group: int, cfg: codec.CodecConfig) -> list[tuple[bytes, list]]:
    bs = cfg.block_size
    return [codec.py_encode_block(raw[i:i + bs], group, cfg) for i in range(0, len(raw), bs)]


def py_decode_all(blocks: list[tuple[bytes, list]], size: int) -> bytearray:
    out = bytearray(size)
    mv = memoryview(out)
    pos = 0
    for stored, rec in blocks:
        codec.py_decode_block(memoryview(stored), rec, mv[pos:pos + rec[1]])
        pos += rec[1]
    return out


def joined(blocks: list[tuple[bytes, list]]) -> tuple[bytes, list[list]]:
    return b"".join(bytes(s) for s, _ in blocks), [r for _, r in blocks]


def test_native_present_when_required() -> None:
    # CI sets SHARDCKPT_REQUIRE_NATIVE=1 so a silently failed build cannot
    # pass as a green run of the pure-Python path.
    if os.environ.get("SHARDCKPT_REQUIRE_NATIVE") == "1":
        assert codec.native_available(), "SHARDCKPT_REQUIRE_NATIVE=1 but shardckpt._native is missing"


def test_active_path_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_CODEC", "python")
    assert codec.active_path() == "python"
    monkeypatch.delenv("SHARDCKPT_CODEC")
    assert codec.active_path() == ("native" if native else "python")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("content", CONTENTS)
def test_python_roundtrip(dtype: torch.dtype, n: int, content: str) -> None:
    t = make(dtype, n, content)
    raw = as_bytes(t)
    cfg = codec.CodecConfig(block_size=BLOCK)
    blocks = py_encode_all(raw, fmt.group_size(dtype), cfg)
    for stored, rec in blocks:
        assert rec[0] == len(stored) and rec[2] == zlib.crc32(stored)
    assert torch.equal(from_bytes(py_decode_all(blocks, len(raw)), t), t)


def _decode_native(blocks: list[tuple[bytes, list]], size: int) -> bytearray:
    stored, recs = joined(blocks)
    out = bytearray(size)
    native.decode_blocks(stored, recs, out, 2, True)
    return out


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("content", CONTENTS)
def test_native_legacy_matches_python(dtype: torch.dtype, n: int, content: str) -> None:
    t = make(dtype, n, content)
    raw = as_bytes(t)
    group = fmt.group_size(dtype)
    cfg = codec.CodecConfig(block_size=BLOCK)
    ref = py_encode_all(raw, group, cfg)
    got = native.encode_blocks(raw, group, True, cfg.level, BLOCK, fmt.SAMPLE_SIZE, 2, LEGACY)
    assert [r for _, r in got] == [r for _, r in ref]
    assert [s for s, _ in got] == [bytes(s) for s, _ in ref]
    pos = 0
    for s, r in got:  # the single-block entry point agrees with the batch one
        assert native.encode_block(raw[pos:pos + r[1]], group, True, cfg.level,
                                   fmt.SAMPLE_SIZE, LEGACY) == (s, r)
        pos += r[1]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("content", CONTENTS)
def test_native_and_python_decode_each_other(dtype: torch.dtype, n: int, content: str) -> None:
    t = make(dtype, n, content)
    raw = as_bytes(t)
    group = fmt.group_size(dtype)
    cfg = codec.CodecConfig(block_size=BLOCK)
    for strategy in (AUTO, HUFFMAN):
        got = native.encode_blocks(raw, group, True, cfg.level, BLOCK, fmt.SAMPLE_SIZE, 2, strategy)
        for s, r in got:
            assert record_problem(r, len(s)) is None
            assert r[0] == len(s) <= r[1] and r[2] == zlib.crc32(s)
        pos = 0
        for s, r in got:  # the single-block entry point agrees with the batch one
            assert native.encode_block(raw[pos:pos + r[1]], group, True, cfg.level,
                                       fmt.SAMPLE_SIZE, strategy) == (s, r)
            pos += r[1]
        assert torch.equal(from_bytes(py_decode_all(got, len(raw)), t), t)
        assert torch.equal(from_bytes(_decode_native(got, len(raw)), t), t)
    ref = py_encode_all(raw, group, cfg)
    assert torch.equal(from_bytes(_decode_native(ref, len(raw)), t), t)


@needs_native
def test_record_types() -> None:
    raw = as_bytes(make(torch.float32, 50000, "weights"))
    stored, rec = native.encode_block(raw, 4, True, 1, fmt.SAMPLE_SIZE)
    assert type(stored) is bytes
    assert [type(x) for x in rec] == [int, int, int, str, str, list]
    assert all(type(x) is int for x in rec[5])
    assert rec[3] == fmt.MODE_GROUPED and sum(rec[5]) == rec[0] == len(stored)
    _, rec1 = native.encode_block(raw, 1, True, 1, fmt.SAMPLE_SIZE)
    assert len(rec1) == 4 and rec1[3] in (fmt.MODE_RAW, fmt.MODE_ZSTD)
    _, rec0 = native.encode_block(raw, 4, False, 1, fmt.SAMPLE_SIZE)
    assert rec0 == [len(raw), len(raw), zlib.crc32(raw), fmt.MODE_RAW]


@needs_native
@pytest.mark.parametrize("level", [-5, 1, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=str)
def test_levels_identical(level: int, dtype: torch.dtype) -> None:
    raw = as_bytes(make(dtype, 300_000, "weights"))
    group = fmt.group_size(dtype)
    cfg = codec.CodecConfig(level=level, block_size=1 << 20)
    ref = py_encode_all(raw, group, cfg)
    got = native.encode_blocks(raw, group, True, level, cfg.block_size, fmt.SAMPLE_SIZE, 2, LEGACY)
    assert got == [(bytes(s), r) for s, r in ref]
    fast = native.encode_blocks(raw, group, True, level, cfg.block_size, fmt.SAMPLE_SIZE, 2)
    assert py_decode_all(fast, len(raw)) == bytes(raw)


@needs_native
def test_threads_do_not_change_output() -> None:
    raw = as_bytes(make(torch.bfloat16, 400_000, "weights"))
    outs = [native.encode_blocks(raw, 2, True, 1, BLOCK, fmt.SAMPLE_SIZE, t) for t in (1, 2, 5)]
    assert outs[0] == outs[1] == outs[2]


@needs_native
def test_concurrent_callers_share_the_pool() -> None:
    tensors = [make(torch.float32, 100_000 + 13 * i, "weights", seed=i) for i in range(8)]

    def roundtrip(t: torch.Tensor) -> bool:
        raw = as_bytes(t)
        blocks = native.encode_blocks(raw, 4, True, 1, BLOCK, fmt.SAMPLE_SIZE, 3)
        stored, recs = joined(blocks)
        out = bytearray(len(raw))
        native.decode_blocks(stored, recs, out, 3, True)
        return bytes(out) == bytes(raw)

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(roundtrip, tensors))


@pytest.mark.parametrize("path", ["native", "python"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_dispatch_roundtrip(path: str, compression: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "native" and native is None:
        pytest.skip("native extension not built")
    monkeypatch.setenv("SHARDCKPT_CODEC", "python" if path == "python" else "")
    t = make(torch.bfloat16, 100_003, "weights")
    raw = as_bytes(t)
    cfg = codec.CodecConfig(compression=compression, block_size=BLOCK)
    blocks = codec.encode_buffer(raw, 2, cfg, threads=2)
    ref = py_encode_all(raw, 2, cfg)
    if path == "python" or compression == "none":
        assert [(bytes(s), r) for s, r in blocks] == [(bytes(s), r) for s, r in ref]
    else:  # different frames, the same bytes once decoded, by either path
        assert py_decode_all(blocks, len(raw)) == bytes(raw)
    stored, recs = joined(blocks)
    out = bytearray(len(raw))
    codec.decode_item_blocks(memoryview(stored), recs, memoryview(out), threads=2, verify=True)
    assert torch.equal(from_bytes(out, t), t)
    out1 = bytearray(recs[0][1])
    codec.decode_block(memoryview(stored)[:recs[0][0]], recs[0], memoryview(out1))
    assert out1 == out[:recs[0][1]]


@pytest.mark.parametrize("make_view", ["transpose", "offset", "strided"])
def test_views_and_noncontiguous(make_view: str) -> None:
    base = make(torch.float32, 300 * 257, "weights").reshape(300, 257)
    t = {"transpose": lambda: base.t(), "offset": lambda: base[17:, 3:],
         "strided": lambda: base[::3, ::2]}[make_view]()
    assert not t.is_contiguous() or t.storage_offset() > 0
    raw = as_bytes(t)
    assert len(raw) == t.numel() * 4
    cfg = codec.CodecConfig(block_size=BLOCK)
    blocks = py_encode_all(raw, 4, cfg)
    if native is not None:
        assert native.encode_blocks(raw, 4, True, 1, BLOCK, fmt.SAMPLE_SIZE, 2, LEGACY) == \
            [(bytes(s), r) for s, r in blocks]
        fast = native.encode_blocks(raw, 4, True, 1, BLOCK, fmt.SAMPLE_SIZE, 2)
        assert torch.equal(from_bytes(py_decode_all(fast, len(raw)), t), t)
    assert torch.equal(from_bytes(py_decode_all(blocks, len(raw)), t), t)


# ---------------------------------------------------------------- damage detection


def _encoded(path: str) -> tuple[bytes, list[list], int]:
    raw = as_bytes(make(torch.float32, 5 * BLOCK // 4, "weights"))
    blocks = py_encode_all(raw, 4, codec.CodecConfig(block_size=BLOCK))
    stored, recs = joined(blocks)
    assert len(recs) == 5
    return stored, recs, len(raw)


PATHS = ["python"] + (["native"] if native is not None else [])


def _use(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_CODEC", "python" if path == "python" else "")


@pytest.mark.parametrize("path", PATHS)
def test_corrupted_block_detected(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(path, monkeypatch)
    stored, recs, n = _encoded(path)
    bad = bytearray(stored)
    bad[recs[0][0] + recs[1][0] + recs[2][0] // 2] ^= 0x40  # inside block 2
    with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch in block 12 of 'w'") as ei:
        codec.decode_item_blocks(memoryview(bytes(bad)), recs, memoryview(bytearray(n)), 2, True,
                                 path="f.bin", rank=3, tensor="w", first_index=10)
    assert ei.value.rank == 3 and ei.value.path == "f.bin" and ei.value.tensor == "w"


@pytest.mark.parametrize("path", PATHS)
def test_truncated_block_detected(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(path, monkeypatch)
    stored, recs, n = _encoded(path)
    short = stored[:len(stored) - recs[4][0] - 5]  # block 3 loses its last 5 bytes
    with pytest.raises(CorruptCheckpointError, match=r"block 3 of 'w' is truncated"):
        codec.decode_item_blocks(memoryview(short), recs, memoryview(bytearray(n)), 2, False,
                                 path="f.bin", rank=0, tensor="w")


@pytest.mark.parametrize("path", PATHS)
def test_wrong_crc_detected(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(path, monkeypatch)
    stored, recs, n = _encoded(path)
    recs = [list(r) for r in recs]
    recs[4][2] ^= 1
    with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch in block 4"):
        codec.decode_item_blocks(memoryview(stored), recs, memoryview(bytearray(n)), 1, True,
                                 path="f.bin", rank=0, tensor="w")


@pytest.mark.parametrize("path", PATHS)
def test_undecodable_block_detected_without_verify(path: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _use(path, monkeypatch)
    stored, recs, n = _encoded(path)
    assert recs[1][4][0] == fmt.MODE_ZSTD  # the exponent plane is a zstd frame
    bad = bytearray(stored)
    bad[recs[0][0]:recs[0][0] + 8] = b"\xff" * 8  # wreck block 1's frame header
    with pytest.raises(CorruptCheckpointError, match=r"block 1 of 'w' does not decode"):
        codec.decode_item_blocks(memoryview(bytes(bad)), recs, memoryview(bytearray(n)), 2, False,
                                 path="f.bin", rank=0, tensor="w")


@needs_native
def test_native_errors_name_the_block() -> None:
    stored, recs, n = _encoded("native")
    bad = bytearray(stored)
    bad[-1] ^= 1
    with pytest.raises(ValueError, match="block 4: checksum mismatch") as ei:
        native.decode_blocks(bytes(bad), recs, bytearray(n), 2, True)
    assert ei.value.block_index == 4 and ei.value.reason == "checksum"
    with pytest.raises(ValueError, match="output buffer"):
        native.decode_blocks(stored, recs, bytearray(n + 1), 2, True)
    with pytest.raises(ValueError, match="block 0"):
        native.decode_blocks(stored, [[1, 2, 3, "x"]] + recs[1:], bytearray(n), 2, True)
    with pytest.raises(ValueError, match="plane lengths"):
        rec = list(recs[0])
        rec[5] = [rec[5][0] + 1] + rec[5][1:]
        native.decode_block(stored[:recs[0][0]], rec, bytearray(recs[0][1]))
    with pytest.raises(ValueError, match="whole number"):
        native.encode_block(b"\0" * 6, 4, True, 1, fmt.SAMPLE_SIZE)
    with pytest.raises(BufferError):
        native.decode_blocks(stored, recs, b"\0" * n, 2, True)  # read-only output


@needs_native
def test_versions() -> None:
    assert native.zstd_version() == "1.5.7"
    assert isinstance(native.version(), str)


def test_mx_scales_and_packed_fp4_round_trip_and_unknown_dtypes_are_refused_first(tmp_path):
    import shardckpt
    from shardckpt.errors import UnsupportedFormatError

    raw = torch.randint(0, 256, (64, 33), dtype=torch.uint8)
    state = {n: raw.view(getattr(torch, n)) for n in ("float8_e8m0fnu", "float4_e2m1fn_x2")
             if hasattr(torch, n)}
    if not state:
        pytest.skip("this torch has neither dtype")
    shardckpt.save(state, tmp_path / "mx")
    out = {k: torch.empty_like(v) for k, v in state.items()}
    shardckpt.load(out, tmp_path / "mx")
    for k, v in state.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k].view(torch.uint8), raw)
    bits = getattr(torch, "bits8", None)
    if bits is not None:  # a dtype the format has no name for: refused before any write
        with pytest.raises(UnsupportedFormatError, match="'odd'"):
            shardckpt.save({"odd": raw.view(bits)}, tmp_path / "odd")
        assert not (tmp_path / "odd").exists()
