"""The native encoder's Huffman-only zstd frames: standard frames that stock zstd decodes.

Every 'z' plane the native encoder writes is checked three ways: decoded by python-
zstandard (a separate build of zstd), by the Python reference codec, and parsed here
block by block against RFC 8878, so a frame that only our own decoder accepts fails.
"""

from __future__ import annotations

import shutil
import subprocess
import zlib

import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardckpt import codec
from shardckpt.format.blocks import record_problem

native = codec._native
pytestmark = pytest.mark.skipif(native is None, reason="native extension not built")

AUTO, HUFFMAN = 1, 2
SAMPLE = 4096
ZSTD_BLOCK = 128 << 10
MAGIC = b"\x28\xb5\x2f\xfd"


def parse_frame(frame: bytes) -> dict:
    """The structure of one zstd frame, checked against RFC 8878 section 3.1.

    Returns the declared content size and, per block, (block type, literals type or
    None, number of sequences or None).
    """
    assert frame[:4] == MAGIC
    fhd = frame[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    assert (fhd >> 3) & 1 == 0, "reserved bit set"
    assert checksum == 0 and dict_flag == 0
    pos = 5
    window = None
    if not single:
        wd = frame[pos]
        pos += 1
        log = 10 + (wd >> 3)
        window = (1 << log) + ((1 << log) >> 3) * (wd & 7)
    fcs_bytes = {0: 1 if single else 0, 1: 2, 2: 4, 3: 8}[fcs_flag]
    assert fcs_bytes, "the frame must declare its content size"
    size = int.from_bytes(frame[pos:pos + fcs_bytes], "little") + (256 if fcs_bytes == 2 else 0)
    pos += fcs_bytes
    block_max = min(window or size, ZSTD_BLOCK)
    blocks = []
    regenerated: int | None = 0
    while True:
        bh = int.from_bytes(frame[pos:pos + 3], "little")
        pos += 3
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        assert btype != 3, "reserved block type"
        if btype == 0:
            blocks.append((0, None, None))
            regenerated = None if regenerated is None else regenerated + bsize
            pos += bsize
        elif btype == 1:
            blocks.append((1, None, None))
            regenerated = None if regenerated is None else regenerated + bsize
            pos += 1
        else:
            body = frame[pos:pos + bsize]
            assert bsize <= block_max
            lit_type, size_format = body[0] & 3, (body[0] >> 2) & 3
            if lit_type >= 2:  # Huffman-coded: regenerated and compressed sizes
                hdr_len = {0: 3, 1: 3, 2: 4, 3: 5}[size_format]
                bits = {0: 10, 1: 10, 2: 14, 3: 18}[size_format]
                lh = int.from_bytes(body[:hdr_len], "little")
                lit_size = (lh >> 4) & ((1 << bits) - 1)
                lit_bytes = lh >> (4 + bits)
            else:  # raw or RLE literals
                hdr_len = {0: 1, 2: 1, 1: 2, 3: 3}[size_format]
                lh = int.from_bytes(body[:hdr_len], "little")
                lit_size = lh >> (3 if size_format in (0, 2) else 4)
                lit_bytes = lit_size if lit_type == 0 else 1
            assert lit_size <= block_max
            seq = body[hdr_len + lit_bytes:]
            blocks.append((2, lit_type, seq[0] if seq else None))
            # Sequences add bytes this parser does not decode.
            regenerated = None if regenerated is None or seq[:1] != b"\0" else regenerated + lit_size
            pos += bsize
        if last:
            break
    assert pos == len(frame), "bytes after the last block"
    assert regenerated in (None, size)
    return {"size": size, "window": window, "blocks": blocks}


def z_planes(stored: bytes, rec: list) -> list[tuple[bytes, int]]:
    """(frame, plane size) of every zstd-coded part of a block."""
    if rec[3] == "z":
        return [(stored, rec[1])]
    if rec[3] != "g":
        return []
    out, off, m = [], 0, rec[1] // len(rec[4])
    for kind, n in zip(rec[4], rec[5]):
        if kind == "z":
            out.append((stored[off:off + n], m))
        off += n
    return out


def check_blocks(raw: bytes, blocks: list[tuple[bytes, list]]) -> list[dict]:
    """Decodes every block three ways and returns the parsed Huffman-only frames."""
    d = zstandard.ZstdDecompressor()
    frames = []
    pos = 0
    for stored, rec in blocks:
        assert record_problem(rec, len(stored)) is None and rec[2] == zlib.crc32(stored)
        for frame, m in z_planes(stored, rec):
            assert zstandard.frame_content_size(frame) == m
            assert len(d.decompress(frame)) == m
            info = parse_frame(frame)
            if any(b[0] == 2 for b in info["blocks"]) and all(b[2] in (0, None)
                                                              for b in info["blocks"]):
                assert all(b[1] in (2, 3, None) for b in info["blocks"])
                frames.append(info)
        out = bytearray(rec[1])
        codec.py_decode_block(memoryview(stored), rec, memoryview(out))
        assert out == raw[pos:pos + rec[1]]
        pos += rec[1]
    stored = b"".join(s for s, _ in blocks)
    out = bytearray(len(raw))
    native.decode_blocks(stored, [r for _, r in blocks], out, 2, True)
    assert out == raw
    return frames


def skewed(rng: np.random.Generator, n: int, spread: float = 1.5) -> np.ndarray:
    """Bytes with an exponent-like distribution: few common values, a long tail."""
    return (120 + np.clip(rng.normal(0, spread, n), -110, 130)).astype(np.uint8)


def test_huffman_frames_on_bf16_like_planes() -> None:
    rng = np.random.default_rng(1)
    m = 3 * ZSTD_BLOCK + 1000  # several zstd blocks, the last one short
    raw = np.empty(2 * m, np.uint8)
    raw[1::2] = skewed(rng, m)  # high byte: the exponent plane
    raw[0::2] = rng.integers(0, 256, m, dtype=np.uint8)  # low byte: noise
    raw = raw.tobytes()
    blocks = native.encode_blocks(raw, 2, True, 1, len(raw), SAMPLE, 1, AUTO)
    rec = blocks[0][1]
    assert rec[3] == "g" and rec[4] == "zr"
    frames = check_blocks(raw, blocks)
    assert len(frames) == 1
    kinds = frames[0]["blocks"]
    assert len(kinds) == 4 and all(b[0] == 2 and b[2] == 0 for b in kinds)
    assert kinds[0][1] == 2  # the first block carries its Huffman table
    assert any(b[1] == 3 for b in kinds[1:]), "later blocks should reuse it (treeless)"
    assert frames[0]["window"] == ZSTD_BLOCK
    # The same plane, as python-zstandard's streaming decoder reads it.
    frame = blocks[0][0][:rec[5][0]]
    assert zstandard.ZstdDecompressor().decompressobj().decompress(frame) == raw[1::2]


def test_raw_and_rle_blocks_inside_a_frame() -> None:
    rng = np.random.default_rng(2)
    parts = [skewed(rng, ZSTD_BLOCK), rng.integers(0, 256, ZSTD_BLOCK, dtype=np.uint8),
             skewed(rng, ZSTD_BLOCK), np.full(ZSTD_BLOCK, 7, np.uint8), skewed(rng, 5000)]
    raw = np.concatenate(parts).tobytes()
    blocks = native.encode_blocks(raw, 1, True, 1, len(raw), SAMPLE, 1, HUFFMAN)
    assert blocks[0][1][3] == "z"
    (info,) = check_blocks(raw, blocks)
    types = [b[0] for b in info["blocks"]]
    assert types == [2, 0, 2, 1, 2], types
    # The table of block 0 survives the raw and RLE blocks: blocks 2 and 4 reuse it.
    assert [b[1] for b in info["blocks"]] == [2, None, 3, None, 3]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_zstd_cli_decodes_a_plane(tmp_path) -> None:
    rng = np.random.default_rng(3)
    plane = skewed(rng, 2 * ZSTD_BLOCK + 77).tobytes()
    stored, rec = native.encode_block(plane, 1, True, 1, SAMPLE, HUFFMAN)
    assert rec[3] == "z" and len(stored) < len(plane) // 2
    path = tmp_path / "plane.zst"
    path.write_bytes(stored)
    out = subprocess.run(["zstd", "-d", "-c", "-q", str(path)], capture_output=True, check=True)
    assert out.stdout == plane
    test = subprocess.run(["zstd", "-t", "-q", str(path)], capture_output=True)
    assert test.returncode == 0, test.stderr


CONTENT = st.sampled_from(["skewed", "wide", "noise", "runs", "constant", "mixed"])


def _content(kind: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "skewed":
        return skewed(rng, n)
    if kind == "wide":
        return skewed(rng, n, spread=20.0)
    if kind == "noise":
        return rng.integers(0, 256, n, dtype=np.uint8)
    if kind == "runs":  # Adam-moment-like: zeros with islands of values
        out = skewed(rng, n)
        out[rng.random(n) < 0.7] = 0
        return np.sort(out.reshape(-1, 64), axis=1).reshape(-1) if n % 64 == 0 else out
    if kind == "constant":
        return np.full(n, seed % 256, np.uint8)
    cut = n // 3
    return np.concatenate([skewed(rng, cut), rng.integers(0, 256, n - cut, dtype=np.uint8)])


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=CONTENT, elems=st.integers(0, 300_000), group=st.sampled_from([1, 2, 4]),
       block=st.sampled_from([1 << 14, 1 << 16, 200_000, 1 << 20]),
       strategy=st.sampled_from([AUTO, HUFFMAN]), level=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_property_native_frames_decode_everywhere(kind: str, elems: int, group: int, block: int,
                                                   strategy: int, level: int, seed: int) -> None:
    raw = _content(kind, elems * group, seed).tobytes()
    blocks = native.encode_blocks(raw, group, True, level, block, SAMPLE, 2, strategy)
    assert sum(r[1] for _, r in blocks) == len(raw)
    assert all(r[0] <= r[1] for _, r in blocks)
    check_blocks(raw, blocks)
    # The Python reference's blocks of the same bytes decode natively.
    cfg = codec.CodecConfig(level=level, block_size=block)
    ref = [codec.py_encode_block(memoryview(raw)[i:i + block], group, cfg)
           for i in range(0, len(raw), block)]
    out = bytearray(len(raw))
    native.decode_blocks(b"".join(bytes(s) for s, _ in ref), [r for _, r in ref], out, 2, True)
    assert out == raw


def test_auto_picks_zstd_for_runs_and_huffman_for_exponents() -> None:
    rng = np.random.default_rng(4)
    n = 1 << 20
    runs = _content("runs", n, 5).tobytes()
    stored, rec = native.encode_block(runs, 1, True, 1, SAMPLE, AUTO)
    legacy, _ = native.encode_block(runs, 1, True, 1, SAMPLE, 0)
    assert rec[3] == "z" and len(stored) <= len(legacy), "runs: zstd's matches must be kept"
    exps = skewed(rng, n).tobytes()
    stored, rec = native.encode_block(exps, 1, True, 1, SAMPLE, AUTO)
    assert rec[3] == "z" and parse_frame(stored)["blocks"][0][1] == 2  # Huffman-only
    legacy, _ = native.encode_block(exps, 1, True, 1, SAMPLE, 0)
    assert len(stored) <= len(legacy) * 1.01
    noise = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert native.encode_block(noise, 1, True, 1, SAMPLE, AUTO)[1][3] == "r"


def test_head_of_plane_does_not_decide_alone() -> None:
    # Noise in the first rows, zeros after: the legacy head sample stores it all
    # raw; the spread sample sees the zeros.
    rng = np.random.default_rng(6)
    plane = np.zeros(1 << 20, np.uint8)
    plane[:8192] = rng.integers(0, 256, 8192, dtype=np.uint8)
    plane = plane.tobytes()
    assert native.encode_block(plane, 1, True, 1, SAMPLE, 0)[1][3] == "r"
    stored, rec = native.encode_block(plane, 1, True, 1, SAMPLE, AUTO)
    assert rec[3] == "z" and len(stored) < len(plane) // 50
    check_blocks(plane, [(stored, rec)])


def test_damaged_huffman_frames_are_refused() -> None:
    rng = np.random.default_rng(7)
    plane = skewed(rng, 2 * ZSTD_BLOCK + 500).tobytes()
    frame, rec = native.encode_block(plane, 1, True, 1, SAMPLE, HUFFMAN)
    n = len(plane)

    def decode(data: bytes, size: int = n) -> bytes:
        out = bytearray(size)
        native.decode_block(data, [len(data), size, zlib.crc32(data), "z"], out)
        return bytes(out)

    assert decode(frame) == plane
    for bad, size, why in (
            (frame[:-1], n, "truncated"), (frame + b"\0", n, "trailing byte"),
            (frame + frame, n, "second frame"), (frame, n - 1, "declares more"),
            (frame, n + 1, "declares less"),
            (frame[:6] + (n + 1).to_bytes(4, "little") + frame[10:], n + 1, "content size lies"),
            (frame[:4] + bytes([frame[4] & 0x3F]) + frame[5:6] + frame[10:], n, "no size"),
    ):
        with pytest.raises(ValueError):
            decode(bad, size)
            pytest.fail(why)
    # A damaged Huffman stream either fails to decode or decodes to other bytes of
    # the right length (the crc32 of the stored bytes is what catches it); never a crash.
    for i in range(10, len(frame), max(1, len(frame) // 200)):
        bad = bytearray(frame)
        bad[i] ^= 0x5A
        try:
            assert len(decode(bytes(bad))) == n
        except ValueError:
            pass


# ---------------------------------------------------------------- block digests


@pytest.mark.parametrize("size", [0, 1, 15, 4096, 65536, 65537, 3 * 65536 - 1, 300_001])
@pytest.mark.parametrize("path", ["native", "python"])
def test_hashes_match_xxhash(size: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDCKPT_CODEC", "python" if path == "python" else "")
    raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    bs = 65536
    want = [xxhash.xxh3_128_digest(raw[i:i + bs]) for i in range(0, size, bs)]
    assert codec.hash_buffer(memoryview(raw), bs, threads=2) == want
    hashes: list[bytes] = []
    cfg = codec.CodecConfig(block_size=bs)
    blocks = codec.encode_buffer(memoryview(raw), 1, cfg, threads=2, hashes=hashes)
    assert hashes == want and len(blocks) == len(want)
    assert all(len(h) == codec.HASH_SIZE for h in hashes)
    # Existing entries are kept: digests are appended.
    more = [b"x"]
    codec.encode_buffer(memoryview(raw), 1, cfg, threads=1, hashes=more)
    assert more == [b"x"] + want


def test_hash_of_empty_and_single_block() -> None:
    assert codec.hash_buffer(memoryview(b""), 16) == []
    assert native.hash_buffer(b"a", 16, 1) == [xxhash.xxh3_128_digest(b"a")]
    data = bytes(range(256)) * 64
    assert native.hash_buffer(data, len(data), 2) == [xxhash.xxh3_128_digest(data)]
    # One digest per block, whatever the dtype grouping and the compression.
    hashes: list[bytes] = []
    native.encode_blocks(data, 4, False, 1, 4096, SAMPLE, 2, AUTO, hashes)
    assert hashes == [xxhash.xxh3_128_digest(data[i:i + 4096]) for i in range(0, len(data), 4096)]
    with pytest.raises(ValueError):
        codec.hash_buffer(memoryview(data), 0)
    with pytest.raises(TypeError):
        native.encode_blocks(data, 4, True, 1, 4096, SAMPLE, 2, AUTO, ())


@settings(max_examples=40, deadline=None, database=None)
@given(data=st.binary(max_size=5000), bs=st.integers(1, 2000), threads=st.integers(1, 4))
def test_property_hashes(data: bytes, bs: int, threads: int) -> None:
    want = [xxhash.xxh3_128_digest(data[i:i + bs]) for i in range(0, len(data), bs)]
    assert native.hash_buffer(data, bs, threads) == want
