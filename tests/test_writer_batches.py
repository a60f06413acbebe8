"""DataFileWriter hands small blocks to its writer thread in batches: the file's bytes,
size and crc32 must be exactly those of the blocks in order, whatever the mix."""

from __future__ import annotations

import json
import os
import zlib

import pytest
import torch

import shardckpt
from shardckpt import codec
from shardckpt.format import MANIFEST_NAME
from shardckpt.io.data_writer import DataFileWriter


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_small_and_large_items_mixed_keep_file_bytes_and_crc(tmp_path, compression):
    g = torch.Generator().manual_seed(0)
    sizes = [1, 3, 700, 5000, 40, 9000, 2, 30000, 16, 4096, 1]
    state = {f"t{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    state["ints"] = torch.arange(3000)
    path = str(tmp_path / "c")
    shardckpt.save(state, path, block_size=4096, compression=compression)
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        m = json.load(f)
    for rel, fe in m["files"].items():
        with open(os.path.join(path, rel), "rb") as f:
            data = f.read()
        assert len(data) == fe["size"] and zlib.crc32(data) == fe["crc32"]
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    shardckpt.load(out, path)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert shardckpt.verify(path, deep=True).ok


@pytest.mark.parametrize("block_size, sizes", [
    (1024, (10, 1024, 3000, 1, 700, 700, 5000, 33)),
    (1 << 20, (10, 70_000, 3, 5, 200_000, 65_536, 65_537, 1, 900_000, 2)),
    (1 << 20, (100_000, 7)),
    (1 << 20, (7, 100_000)),
])
def test_blocks_land_in_order_at_their_offsets(tmp_path, block_size, sizes):
    cfg = codec.CodecConfig(compression="none", block_size=block_size)
    blobs = [os.urandom(n) for n in sizes]
    path = str(tmp_path / "f.bin")
    with DataFileWriter(path, "f.bin", cfg) as w:
        items = [w.append(memoryview(b), 1) for b in blobs]
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"".join(blobs)
    assert w.size == len(data) and w.crc == zlib.crc32(data)
    for it, b in zip(items, blobs):
        assert data[it.offset:it.offset + it.length] == b
