"""Raw blocks written from the caller's memory without a copy (dedupe.borrowed_blocks):
only where the memory outlives the write, and never where a caller reuses its buffer."""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from shardckpt import codec
from shardckpt.io import dedupe
from shardckpt.io.data_writer import DataFileWriter

MB = 1 << 20


def _load(path, like: dict) -> dict:  # noqa: ANN001
    dest = {k: torch.zeros_like(v) for k, v in like.items()}
    shardckpt.load(dest, path)
    return dest


def test_borrowed_blocks_are_views_with_the_codecs_records():
    raw = torch.randint(0, 256, (9 * MB + 3,), dtype=torch.uint8)
    mv = memoryview(raw.numpy()).cast("B")
    cfg = codec.CodecConfig(compression="none", block_size=4 * MB)
    got = dedupe.borrowed_blocks(mv, cfg.block_size)
    want = codec.encode_buffer(mv, 1, cfg)
    assert [r for _, r in got] == [r for _, r in want]
    assert [bytes(b) for b, _ in got] == [bytes(b) for b, _ in want]
    raw[0] ^= 1  # a view: the caller's change shows (hence the contract)
    assert bytes(got[0][0][:1]) == bytes([int(raw[0])])


def test_a_tool_writer_copies_so_a_reused_buffer_cannot_change_the_file(tmp_path):
    buf = bytearray(b"a" * (5 * MB))
    cfg = codec.CodecConfig(compression="none", block_size=4 * MB)
    path = str(tmp_path / "f.bin")
    with DataFileWriter(path, "f.bin", cfg) as w:  # borrow defaults to off
        w.append(memoryview(buf), 1)
        buf[:] = b"b" * len(buf)  # a tool refilling its buffer for the next item
        w.append(memoryview(buf), 1)
    data = open(path, "rb").read()
    assert data == b"a" * (5 * MB) + b"b" * (5 * MB)


@pytest.mark.parametrize("in_flight", [1, 2])
def test_back_to_back_async_saves_each_hold_their_own_snapshot(tmp_path, in_flight):
    # Staging buffers are borrowed by the writer: a pool may serve the next save only
    # after the one using it is durable. Changing the state between saves must never
    # leak into an earlier checkpoint.
    state = {"w": torch.zeros(6 * MB // 4), "v": torch.zeros(3 * MB // 4 + 5)}
    handles, expected = [], []
    for i in range(4):
        for t in state.values():
            t.fill_(float(i + 1))
        expected.append({k: v.clone() for k, v in state.items()})
        handles.append(shardckpt.async_save(state, tmp_path / f"ck{i}", compression="none",
                                            max_in_flight=in_flight))
    for h in handles:
        h.wait()
    for i, exp in enumerate(expected):
        got = _load(tmp_path / f"ck{i}", exp)
        for k in exp:
            assert torch.equal(got[k], exp[k]), (i, k)
        assert shardckpt.verify(tmp_path / f"ck{i}").ok


def test_a_blocking_save_of_a_non_contiguous_tensor_is_bitwise(tmp_path):
    # tensor_bytes makes a contiguous copy; the borrowed view must keep it alive.
    base = torch.randn(2048, 1024)
    state = {"t": base.t(), "s": base[::2, ::3]}
    shardckpt.save(state, tmp_path / "ck", compression="none")
    got = _load(tmp_path / "ck", {k: v.contiguous() for k, v in state.items()})
    for k, v in state.items():
        assert torch.equal(got[k], v)
    assert os.path.isdir(tmp_path / "ck")
