"""Manifest.to_bytes assembles its JSON from per-tensor texts kept between saves: the
JSON must be to_json() with the canonical checksum, tensors in the state's order,
whether a tensor's text was just made, reused, or must not be reused (the entry
changed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import torch

import shardckpt
from shardckpt.format import parse_manifest
from shardckpt.format.manifest import CHECKSUM_FIELD, Manifest
from shardckpt.io.reader import read_manifest


def _checked(m: Manifest, data: bytes) -> dict:
    """`data` parsed, after checking it is `m`'s JSON with the canonical checksum."""
    d = json.loads(data)
    body = {k: v for k, v in d.items() if k != CHECKSUM_FIELD}
    assert body == m.to_json()
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert d[CHECKSUM_FIELD] == "sha256:" + hashlib.sha256(text.encode()).hexdigest()
    assert list(d["tensors"]) == list(m.tensors)  # the state's order, not sorted
    assert list(d) == [*m.to_json(), CHECKSUM_FIELD]
    assert parse_manifest(data, "x") == m
    return d


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
    _checked(m, first)
    assert m.to_bytes() == first  # every text reused


def test_a_changed_entry_is_serialized_again(tmp_path):
    m = _manifest(tmp_path, "a")
    m.to_bytes()
    t = m.tensors["zeta"]
    changed = dataclasses.replace(t, requires_grad=not t.requires_grad)
    m2 = dataclasses.replace(m, tensors={**m.tensors, "zeta": changed})
    first = m.to_bytes()
    out = m2.to_bytes()
    assert _checked(m2, out)["tensors"]["zeta"]["requires_grad"] is (not t.requires_grad)
    # And back: the first manifest's bytes again, not the changed entry's.
    assert m.to_bytes() == first
    _checked(m, first)
