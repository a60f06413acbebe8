"""The fast paths of an incremental save: batched hashing, items settled without a
worker (every block referenced, or small enough to encode in place). Each must
reference only blocks whose content hash matches and load back bitwise."""

from __future__ import annotations

import json
import os

import pytest
import torch
import xxhash

import shardckpt
from shardckpt import codec
from shardckpt.format import MANIFEST_NAME
from shardckpt.io import data_writer

BS = 1024  # bytes per block: a 64x48 float32 tensor is 12 blocks


def _manifest(path) -> dict:
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


def _want(raw: bytes, bs: int) -> list[bytes]:
    return [xxhash.xxh3_128_digest(raw[i:i + bs]) for i in range(0, len(raw), bs)]


@pytest.mark.parametrize("path", ["native", "python"])
def test_hash_buffers_is_hash_buffer_of_each(monkeypatch, path):
    if path == "python":
        monkeypatch.setenv("SHARDCKPT_CODEC", "python")
    elif not codec.native_available():
        pytest.skip("native extension not built")
    assert codec.active_path() == path
    bufs = [b"", b"a", bytes(range(256)) * 4, os.urandom(3 * 64 + 5), os.urandom(64),
            os.urandom(100_000)]
    got = codec.hash_buffers([memoryview(b) for b in bufs], 64, 2)
    assert got == [_want(b, 64) for b in bufs]
    assert codec.hash_buffers([], 64, 2) == []
    with pytest.raises(ValueError):
        codec.hash_buffers([memoryview(b"x")], 0)


def test_native_hash_is_xxh3_128_at_every_length_and_large_blocks():
    # The native hash runs the widest SIMD variant the CPU has (csrc/xxh_dispatch.c); its
    # long-input loop starts past 240 bytes and works in 1 KiB stripes: every length up to
    # 4 KiB, and MiB blocks with ragged ends, must give the reference digests bit for bit.
    if not codec.native_available():
        pytest.skip("native extension not built")
    data = os.urandom(4096 + 64)
    for n in range(4097):
        raw = memoryview(data)[n % 61:n % 61 + n]
        assert codec.hash_buffer(raw, 4096, 1) == ([] if n == 0 else _want(bytes(raw), 4096)), n
    big = [os.urandom((1 << 20) * 3 + 12345), os.urandom(7 << 20)]
    assert codec.hash_buffers([memoryview(b) for b in big], 1 << 20, 2) == [
        _want(b, 1 << 20) for b in big]


def _state(base: torch.Tensor, small: torch.Tensor, step: int) -> dict:
    return {"base": base, "small": small, "bias": torch.arange(48, dtype=torch.float32),
            "step": step}


def _loaded(path) -> dict:
    st = _state(torch.zeros(64, 48), torch.zeros(4, 48), -1)
    shardckpt.load(st, path)
    return st


def _refs(m: dict, key: str) -> list[list]:
    return m["tensors"][key]["chunks"][0].get("refs", [])


def test_a_changed_middle_block_is_written_not_referenced(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g)
    small = torch.randn(4, 48, generator=g)
    p1, p2, p3 = (str(tmp_path / f"s{i}") for i in (1, 2, 3))
    shardckpt.save(_state(base, small, 1), p1, block_size=BS)
    # In place through .data, as a LoRA merge does: the tensor's _version does not move.
    version = base._version
    base.data[32, 0].add_(1.0)  # byte 32*48*4 = 6144: block 6 of 12
    assert base._version == version
    small.data.mul_(2.0)
    shardckpt.save(_state(base, small, 2), p2, block_size=BS, base=p1)
    m = _manifest(p2)
    refs = _refs(m, "base")
    referenced = {i for r in refs for i in range(r[0], r[0] + r[1])}
    assert referenced == set(range(12)) - {6}, refs
    assert all(r[2] == "../s1" for r in refs)
    chunk = m["tensors"]["base"]["chunks"][0]
    assert chunk["hashes"][6] == xxhash.xxh3_128_hexdigest(
        base.reshape(-1).view(torch.uint8).numpy()[6 * BS:7 * BS].tobytes())
    assert chunk["length"] == chunk["blocks"][6][0]  # only the changed block is own
    assert _refs(m, "small") == []  # changed: below the in-place size, encoded here
    assert len(_refs(m, "bias")) == 1  # unchanged: one reference
    out = _loaded(p2)
    assert torch.equal(out["base"], base) and torch.equal(out["small"], small)
    assert out["step"] == 2
    assert shardckpt.verify(p2, deep=True).ok
    # Unchanged since p2: every block referenced, the changed one where p2 holds it.
    shardckpt.save(_state(base, small, 3), p3, block_size=BS, base=p2)
    m3 = _manifest(p3)
    holders = {i: r[2] for r in _refs(m3, "base") for i in range(r[0], r[0] + r[1])}
    assert holders == {**{i: "../s1" for i in range(12) if i != 6}, 6: "../s2"}
    assert m3["tensors"]["base"]["chunks"][0]["length"] == 0
    assert _refs(m3, "small")[0][:3] == [0, 1, "../s2"]
    assert torch.equal(_loaded(p3)["base"], base)
    assert shardckpt.verify(p3, deep=True).ok


def test_every_block_referenced_out_of_place_loads_bitwise(tmp_path):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=g)
    small = torch.randn(4, 48, generator=g)
    shardckpt.save(_state(base, small, 1), str(tmp_path / "a"), block_size=BS)
    # The same blocks in another order: all referenced, in several runs, none written.
    rows = base.reshape(12, -1)
    perm = torch.tensor([3, 4, 5, 0, 1, 2, 11, 10, 9, 8, 7, 6])
    moved = rows[perm].reshape(64, 48).clone()
    shardckpt.save(_state(moved, small, 2), str(tmp_path / "b"), block_size=BS,
                   base=str(tmp_path / "a"))
    m = _manifest(tmp_path / "b")
    chunk = m["tensors"]["base"]["chunks"][0]
    assert chunk["length"] == 0
    assert [(r[0], r[1]) for r in chunk["refs"]] == [(0, 3), (3, 3)] + [(i, 1) for i in
                                                                        range(6, 12)]
    out = _loaded(tmp_path / "b")
    assert torch.equal(out["base"], moved) and torch.equal(out["small"], small)
    assert shardckpt.verify(str(tmp_path / "b"), deep=True).ok


def test_hash_batches_split_anywhere_keep_items_in_order(tmp_path, monkeypatch):
    # Batches of 1-2 items and items larger than a batch: same references, same bytes.
    monkeypatch.setattr(data_writer, "_HASH_BATCH_ITEMS", 2)
    monkeypatch.setattr(data_writer, "_HASH_BATCH_BYTES", 3 * BS)
    g = torch.Generator().manual_seed(2)
    state = {f"t{i}": torch.randn(i * 37 + 1, generator=g) for i in range(20)}
    shardckpt.save(state, str(tmp_path / "a"), block_size=BS)
    changed = dict(state)
    for k in ("t3", "t11", "t19"):
        changed[k] = state[k] + 1
    shardckpt.save(changed, str(tmp_path / "b"), block_size=BS, base=str(tmp_path / "a"))
    m = _manifest(tmp_path / "b")
    for k in changed:
        refs = _refs(m, k)
        nblocks = len(m["tensors"][k]["chunks"][0]["blocks"])
        if k in ("t3", "t11", "t19"):
            assert refs == [], k
        else:
            assert [(r[0], r[1]) for r in refs] == [(0, nblocks)], k
    out = {k: torch.zeros_like(t) for k, t in changed.items()}
    shardckpt.load(out, str(tmp_path / "b"))
    assert all(torch.equal(out[k], changed[k]) for k in changed)
    assert shardckpt.verify(str(tmp_path / "b"), deep=True).ok


def test_an_unchanged_item_shares_its_bases_record_entry_and_text(tmp_path):
    # BaseIndex.reuse: a tensor whose blocks are those of the base's item at the same
    # place is settled in one lookup; once the base's record is all references, the new
    # manifest holds that very entry (and its kept text), not an equal copy.
    from shardckpt.format import texts
    from shardckpt.io.committed import read_committed

    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g)
    small = torch.randn(4, 48, generator=g)
    paths = [str(tmp_path / f"s{i}") for i in range(4)]
    shardckpt.save(_state(base, small, 0), paths[0], block_size=BS)
    for i in (1, 2, 3):
        small.add_(1.0)
        shardckpt.save(_state(base, small, i), paths[i], block_size=BS, base=paths[i - 1])
    m2, m3 = read_committed(paths[2]), read_committed(paths[3])
    assert m3.tensors["base"] is m2.tensors["base"]
    assert m3.tensors["bias"] is m2.tensors["bias"]
    assert m3.tensors["small"] is not m2.tensors["small"]  # changed: written again
    on_disk = _manifest(paths[3])
    assert [r[2] for r in _refs(on_disk, "base")] == ["../s0"]
    assert on_disk["tensors"]["base"] == _manifest(paths[1])["tensors"]["base"]
    # The text kept for the shared entry is the text of that entry.
    texts._TEXTS.clear()
    texts._PLANNER.clear()
    assert json.loads(m3.to_bytes()) == on_disk
    out = _loaded(paths[3])
    assert torch.equal(out["base"], base) and torch.equal(out["small"], small)
    assert shardckpt.verify(paths[3], deep=True).ok


def test_reuse_refuses_other_layouts_other_bytes_and_holders_the_save_replaces(tmp_path):
    from shardckpt.io.base_index import BaseIndex

    t = (torch.arange(4096, dtype=torch.float32) % 97).to(torch.bfloat16)  # compressible
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    shardckpt.save({"t": t}, a, block_size=BS)
    rec = _manifest(a)["tensors"]["t"]["chunks"][0]
    assert any(blk[3] == "g" for blk in rec["blocks"]), rec["blocks"]  # byte planes of 2
    raw = t.view(torch.uint8).numpy().tobytes()
    digests = _want(raw, BS)
    where = ("t", (0,))
    index = BaseIndex(a, b)
    got = index.reuse(digests, len(raw), 2, "data/r00000.bin", where)
    assert got is not None and got.length == 0 and got.hashes == tuple(rec["hashes"])
    assert [(r.first, r.count, r.base) for r in got.refs] == [(0, len(digests), "../a")]
    # The same bytes as a 4-byte dtype: planes of 2 do not decode into it.
    assert index.reuse(digests, len(raw), 4, "data/r00000.bin", where) is None
    other = list(digests)
    other[1] = bytes(16)
    assert index.reuse(other, len(raw), 2, "data/r00000.bin", where) is None
    assert index.reuse(digests, len(raw), 2, "data/r00000.bin", ("u", (0,))) is None
    assert index.reuse(digests, len(raw) - 1, 2, "data/r00000.bin", where) is None
    # b references a; a save that replaces a (b as its base) may not reference a.
    shardckpt.save({"t": t}, b, block_size=BS, base=a)
    assert _refs(_manifest(b), "t")[0][2] == "../a"
    assert BaseIndex(b, a).reuse(digests, len(raw), 2, "data/r00000.bin", where) is None
    assert BaseIndex(b, str(tmp_path / "c")).reuse(digests, len(raw), 2, "data/r00000.bin",
                                                   where) is not None
