"""Manifest.to_bytes assembles its JSON from per-tensor texts kept between saves: the
bytes must be exactly json.dumps of to_json() with the canonical checksum, whether a
tensor's text was just made, reused, or must not be reused (the entry changed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

import shardckpt
from shardckpt.format import parse_manifest
from shardckpt.format.manifest import CHECKSUM_FIELD, Manifest
from shardckpt.io.reader import read_manifest


def _reference(m: Manifest) -> bytes:
    d = m.to_json()
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False)
    d[CHECKSUM_FIELD] = "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()


def _manifest(tmp_path, name: str) -> Manifest:
    state = {"zeta": torch.arange(3000, dtype=torch.float32), "alpha": torch.ones(7),
             "\u00fcber/\"q\"": torch.zeros(2, 3), "mid": torch.tensor(2.5), "obj": {"k": [1, 2]}}
    path = tmp_path / name
    shardckpt.save(state, str(path), block_size=4096,
                   metadata={"note": "\u2603", "tensors": {"x": 1}})
    return read_manifest(str(path))


def test_to_bytes_is_the_reference_serialization(tmp_path):
    m = _manifest(tmp_path, "a")
    first = m.to_bytes()
    assert first == _reference(m)
    assert m.to_bytes() == first  # every text reused
    assert parse_manifest(first, "x") == m
    # Tensor order is the state's, not sorted.
    assert list(json.loads(first)["tensors"]) == list(m.tensors)


def test_a_changed_entry_is_serialized_again(tmp_path):
    m = _manifest(tmp_path, "a")
    m.to_bytes()
    t = m.tensors["zeta"]
    c = t.chunks[0]
    changed = dataclasses.replace(t, chunks=(dataclasses.replace(c, offset=c.offset + 1),))
    m2 = dataclasses.replace(m, tensors={**m.tensors, "zeta": changed})
    out = m2.to_bytes()
    assert out == _reference(m2)
    assert json.loads(out)["tensors"]["zeta"]["chunks"][0]["offset"] == c.offset + 1
    # And back: the first manifest's bytes again, not the changed entry's.
    assert m.to_bytes() == _reference(m)
