"""Raw blocks read straight into the destination tensors on load (no buffer, no copy),
and still checked: real files with real bytes flipped and cut off."""

from __future__ import annotations

import os

import pytest
import torch

import shardckpt
from shardckpt.io import reader as reader_mod


def _state() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"big": torch.randn(3_000_000, generator=g),  # several 4 MiB blocks
            "bf": torch.randn(513, 77, generator=g).to(torch.bfloat16),
            "ints": torch.arange(1000, dtype=torch.int32), "step": 11}


def _dest(state: dict) -> dict:
    return {k: torch.full_like(v, 7) if torch.is_tensor(v) else 0 for k, v in state.items()}


@pytest.fixture
def in_place_calls(monkeypatch):
    calls: list[str] = []
    real = reader_mod.CheckpointReader._check_in_place

    def spy(self, got, run, **kw):  # noqa: ANN001, ANN003
        calls.append(kw["tensor"])
        return real(self, got, run, **kw)

    monkeypatch.setattr(reader_mod.CheckpointReader, "_check_in_place", spy)
    return calls


def _data_file(path) -> str:  # noqa: ANN001
    d = os.path.join(path, "data")
    (name,) = os.listdir(d)
    return os.path.join(d, name)


def test_raw_items_load_in_place_bitwise(tmp_path, in_place_calls):
    state = _state()
    shardckpt.save(state, tmp_path / "ck", compression="none")
    dest = _dest(state)
    ptrs = {k: v.data_ptr() for k, v in dest.items() if torch.is_tensor(v)}
    shardckpt.load(dest, tmp_path / "ck")
    assert {"big", "bf", "ints"} <= set(in_place_calls)
    for k, v in state.items():
        if torch.is_tensor(v):
            assert dest[k].data_ptr() == ptrs[k]  # into the caller's tensors
            assert torch.equal(dest[k].view(torch.uint8), v.view(torch.uint8)), k
        else:
            assert dest[k] == v


def test_a_flipped_byte_in_a_raw_block_fails_the_load_naming_the_tensor(tmp_path, in_place_calls):
    state = _state()
    ck = tmp_path / "ck"
    shardckpt.save(state, ck, compression="none")
    f = _data_file(ck)
    with open(f, "r+b") as fh:  # "big" is written first: byte 5 MiB lies in its second block
        fh.seek(5 << 20)
        b = fh.read(1)
        fh.seek(5 << 20)
        fh.write(bytes([b[0] ^ 0x01]))
    with pytest.raises(shardckpt.CorruptCheckpointError) as ei:
        shardckpt.load(_dest(state), ck)
    msg = str(ei.value)
    assert "'big'" in msg and "checksum" in msg and f in msg
    assert in_place_calls  # the in-place path is the one that caught it


def test_a_truncated_data_file_is_reported_even_without_verify(tmp_path, in_place_calls):
    state = _state()
    ck = tmp_path / "ck"
    shardckpt.save(state, ck, compression="none")
    f = _data_file(ck)
    os.truncate(f, 6 << 20)
    for verify in (True, False):
        with pytest.raises(shardckpt.CorruptCheckpointError, match="truncated"):
            shardckpt.load(_dest(state), ck, verify=verify)
