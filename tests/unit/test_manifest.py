"""Manifest validation (shardckpt/format/manifest.py): a real manifest, then one mutation each.

Every mutation must be rejected with a ManifestError (a CorruptCheckpointError) whose
message names the offending field; parse_manifest adds the JSON, version and checksum
checks in front.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os

import pytest
import torch

import shardckpt
from shardckpt.errors import (
    CorruptCheckpointError,
    NotACheckpointError,
    UnsupportedFormatError,
)
from shardckpt.format import Manifest, ManifestError, parse_manifest
from shardckpt.format.manifest import Chunk, FileEntry, ObjectEntry, TensorEntry

FILE = "data/r00000.bin"
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(manifest bytes, manifest dict) of a small real checkpoint."""
    path = tmp_path_factory.mktemp("m") / "ck"
    state = {
        "w": torch.arange(3000, dtype=torch.float32).reshape(30, 100),  # 3 grouped blocks
        "b": torch.arange(10),                                           # one "z" block
        "h": torch.ones(8, dtype=torch.bfloat16),                        # grouped, raw planes
        "s": torch.tensor(1.5),                                          # 0-d
        "step": 5,                                                       # an object
    }
    shardckpt.save(state, path, block_size=4096)
    data = (path / "manifest.json").read_bytes()
    return data, json.loads(data)


@pytest.fixture
def d(saved):
    return copy.deepcopy(saved[1])


def _sealed(d: dict) -> bytes:
    """The dict as manifest bytes with a freshly computed checksum (computed here, by hand)."""
    body = {k: v for k, v in d.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return json.dumps({**body, "checksum": "sha256:" + hashlib.sha256(text.encode()).hexdigest()}
                      ).encode()


def _rejects(d: dict, field: str, *also: str) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        Manifest.from_json(d)
    msg = str(ei.value)
    assert field in msg, msg
    for s in also:
        assert s in msg, msg
    # the same through parse_manifest, with a valid checksum
    with pytest.raises(ManifestError) as ei2:
        parse_manifest(_sealed(d), "some/ck/manifest.json")
    assert field in str(ei2.value) and "some/ck/manifest.json" in str(ei2.value)
    assert ei2.value.path == "some/ck/manifest.json"
    return ei.value


def _raw_chunk(offsets, sizes, offset=0):
    n = math.prod(sizes)  # int8: one byte per element
    return {"offsets": list(offsets), "sizes": list(sizes), "file": FILE, "offset": offset,
            "length": n, "nbytes": n, "blocks": [[n, n, 0, "r"]] if n else []}


def _with_tensor(d, chunks, shape=(4, 4), dtype="int8"):
    d["tensors"]["t"] = {"dtype": dtype, "shape": list(shape), "requires_grad": False,
                         "chunks": chunks}
    return d


# ------------------------------------------------------------------ the unmutated manifest


def test_saved_manifest_parses(saved):
    data, raw = saved
    m = parse_manifest(data, "x/manifest.json")
    assert m.format_version == 3 and m.world_size == 1
    assert set(m.tensors) == {"w", "b", "h", "s"} and set(m.objects) == {"step"}
    assert m.files == {FILE: FileEntry(rank=0, size=raw["files"][FILE]["size"],
                                       crc32=raw["files"][FILE]["crc32"])}
    w = m.tensors["w"]
    assert isinstance(w, TensorEntry) and w.dtype == "float32" and w.shape == (30, 100)
    assert w.itemsize == 4
    (c,) = w.chunks
    assert isinstance(c, Chunk) and c.offsets == (0, 0) and c.sizes == (30, 100)
    assert c.nbytes == 12000 and [r[1] for r in c.blocks] == [4096, 4096, 3808]
    assert [b.raw_start for b in c.block_list()] == [0, 4096, 8192]
    assert m.tensors["s"].shape == () and m.tensors["s"].chunks[0].sizes == ()
    assert isinstance(m.objects["step"], ObjectEntry)
    assert m.keys() == ["w", "b", "h", "s", "step"]
    assert m.file_rank(FILE) == 0 and m.file_rank("data/r00001.bin") is None


def test_checksum_is_sha256_of_sorted_compact_json(saved):
    data, raw = saved
    assert json.loads(_sealed(raw))["checksum"] == raw["checksum"]


def test_a_version_lowered_to_1_does_not_switch_off_the_checksum(saved):
    # One bit turns format_version 3 into 1, which had no checksum; the checksum field
    # left in place must still be checked, or any other change would pass unnoticed.
    raw = json.loads(saved[0])
    raw["format_version"] = 1
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        parse_manifest(json.dumps(raw).encode(), "x/manifest.json")
    del raw["checksum"]  # a version-1 manifest as version 1 wrote them still parses
    assert set(parse_manifest(json.dumps(raw).encode(), "x/manifest.json").tensors) == {
        "w", "b", "h", "s"}


def test_to_bytes_round_trips(saved):
    m = parse_manifest(saved[0], "a")
    again = parse_manifest(m.to_bytes(), "b")
    assert again == m
    assert parse_manifest(again.to_bytes(), "c") == m
    assert json.loads(m.to_bytes()) == saved[1]


def test_planner_data_text_follows_every_change_to_it(saved):
    # to_bytes keeps the last planner_data text while an equal one comes again; a change,
    # even to the very dict it serialized, must show in the bytes and their checksum.
    m = parse_manifest(saved[0], "a")
    assert m.planner_data and json.loads(m.to_bytes())["planner_data"] == m.planner_data
    key = next(iter(m.planner_data))
    m.planner_data[key].append("changed")
    for _ in range(2):
        out = m.to_bytes()
        assert json.loads(out)["planner_data"][key][-1] == "changed"
        assert json.loads(_sealed(json.loads(out)))["checksum"] == json.loads(out)["checksum"]
        assert parse_manifest(out, "b").planner_data == m.planner_data
    m.planner_data[key].pop()
    assert m.to_bytes() == parse_manifest(saved[0], "c").to_bytes()


def _placed(d, chunks):
    """Give synthetic chunks their own bytes past the file's real items (items of one
    file may not share bytes), growing the recorded file size to hold them."""
    for c in chunks:
        c["offset"] = d["files"][FILE]["size"]
        d["files"][FILE]["size"] += c["length"]
    return chunks


def test_valid_multi_chunk_tilings_are_accepted(d):
    _with_tensor(d, _placed(d, [_raw_chunk([2, 0], [2, 4]), _raw_chunk([0, 0], [2, 4])]))
    d["tensors"]["g"] = {"dtype": "int8", "shape": [4, 4], "chunks": _placed(d, [  # no requires_grad
        _raw_chunk([0, 0], [4, 1]), _raw_chunk([0, 1], [1, 3]), _raw_chunk([1, 1], [1, 3]),
        _raw_chunk([2, 1], [2, 3])])}
    d["tensors"]["e"] = {"dtype": "int8", "shape": [0, 4], "requires_grad": True, "chunks": []}
    d["tensors"]["z"] = {"dtype": "int8", "shape": [2, 2], "requires_grad": False,
                         "chunks": _placed(d, [_raw_chunk([0, 0], [2, 2]),
                                               _raw_chunk([1, 0], [0, 2])])}  # empty: harmless
    m = Manifest.from_json(d)
    assert [c.offsets for c in m.tensors["t"].chunks] == [(2, 0), (0, 0)]
    assert m.tensors["g"].requires_grad is False and len(m.tensors["g"].chunks) == 4
    assert m.tensors["e"].chunks == () and m.tensors["e"].requires_grad is True


def test_item_may_end_exactly_at_the_end_of_its_file(d):
    # moved past every other item, to end exactly where the (grown) file ends
    _placed(d, [d["tensors"]["b"]["chunks"][0]])
    Manifest.from_json(d)


def test_optional_fields_may_be_absent(d):
    for k in ("created", "created_unix", "versions", "planner_data", "user_metadata"):
        del d[k]
    m = Manifest.from_json(d)
    assert m.planner_data is None and m.user_metadata == {} and m.versions == {}
    assert m.created == "" and m.created_unix == 0.0


# ------------------------------------------------------------------ files


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "data/../x", "data/.hidden", "data/a/b",
                                  "data/", "x.bin", "data/..", "data\\r0.bin", "data/" + "a" * 202])
def test_file_names_outside_data_are_rejected(d, name):
    d["files"][name] = {"rank": 0, "size": 1, "crc32": 0}
    _rejects(d, "files", repr(name)[:40])


@pytest.mark.parametrize("name", ["data/r00001.bin", "data/x-1.bin", "data/_", "data/" + "a" * 201])
def test_file_names_inside_data_are_accepted(d, name):
    d["files"][name] = {"rank": 0, "size": 1, "crc32": 0}
    Manifest.from_json(d)


def test_item_naming_a_file_not_in_files(d):
    d["tensors"]["b"]["chunks"][0]["file"] = "data/r00001.bin"
    _rejects(d, "tensors['b'].chunks[0].file")
    d = copy.deepcopy(d)
    d["tensors"]["b"]["chunks"][0]["file"] = 5
    _rejects(d, "tensors['b'].chunks[0].file")


@pytest.mark.parametrize("field,value", [
    ("rank", True), ("rank", -1), ("rank", "0"), ("rank", 1 << 25), ("size", -1), ("size", 2 ** 70),
    ("size", 1.0), ("crc32", 1 << 32), ("crc32", -1), ("crc32", None),
])
def test_bad_file_entry(d, field, value):
    d["files"][FILE][field] = value
    _rejects(d, f"files['{FILE}'].{field}")


def test_file_entry_not_an_object(d):
    d["files"][FILE] = [0, 1, 2]
    _rejects(d, f"files['{FILE}']")


def test_offset_plus_length_past_the_file(d):
    size = d["files"][FILE]["size"]
    c = d["tensors"]["b"]["chunks"][0]
    c["offset"] = size - c["length"] + 1
    _rejects(d, "tensors['b'].chunks[0]", "outside")


def test_file_shorter_than_its_items(d):
    d["files"][FILE]["size"] = d["tensors"]["w"]["chunks"][0]["length"] - 1
    _rejects(d, "tensors['w'].chunks[0]", "outside")


def test_object_past_the_file(d):
    d["objects"]["step"]["offset"] = d["files"][FILE]["size"]
    _rejects(d, "objects['step']", "outside")


# ------------------------------------------------------------------ items and block records


def test_stored_lengths_not_summing_to_length(d):
    d["tensors"]["b"]["chunks"][0]["length"] -= 1
    _rejects(d, "tensors['b'].chunks[0]", "blocks hold")


def test_raw_lengths_not_summing_to_nbytes(d):
    d["objects"]["step"]["nbytes"] += 1
    _rejects(d, "objects['step']", "blocks hold")


def test_block_raw_len_changed_breaks_the_sum(d):
    d["tensors"]["w"]["chunks"][0]["blocks"][1][1] = 4080
    _rejects(d, "tensors['w'].chunks[0]", "blocks hold")


def test_nbytes_not_prod_sizes_times_itemsize(d):
    c = d["tensors"]["b"]["chunks"][0]
    c["nbytes"] = 72
    c["blocks"][0][1] = 72  # consistent with its blocks, inconsistent with 10 x int64
    _rejects(d, "tensors['b'].chunks[0]", "72 raw bytes")


def test_raw_block_stored_not_raw(d):
    c = d["tensors"]["b"]["chunks"][0]
    c["blocks"][0][3] = "r"          # 42 stored bytes for 80 raw
    _rejects(d, "tensors['b'].chunks[0].blocks[0]", "raw block")


def test_raw_block_with_extra_fields(d):
    n = d["tensors"]["b"]["chunks"][0]["length"]
    d["tensors"]["b"]["chunks"][0]["blocks"][0] = [n, n, 0, "r", "x"]
    d["tensors"]["b"]["chunks"][0]["nbytes"] = n
    _rejects(d, "tensors['b'].chunks[0].blocks[0]")


@pytest.mark.parametrize("rec", [[42, 80, 0], [], "42,80,0,z", None, {"0": 42}])
def test_block_record_malformed(d, rec):
    d["tensors"]["b"]["chunks"][0]["blocks"][0] = rec
    _rejects(d, "tensors['b'].chunks[0].blocks[0]")


@pytest.mark.parametrize("mode", ["x", "R", "", None, 1, "zz"])
def test_unknown_block_mode(d, mode):
    d["tensors"]["b"]["chunks"][0]["blocks"][0][3] = mode
    _rejects(d, "tensors['b'].chunks[0].blocks[0][3]", "mode")


@pytest.mark.parametrize("i,value", [(0, -1), (0, True), (0, "42"), (1, 4097), (1, -80),
                                     (1, 80.0), (2, 1 << 32), (2, -1), (2, False)])
def test_block_record_bad_numbers(d, i, value):
    d["tensors"]["b"]["chunks"][0]["blocks"][0][i] = value
    _rejects(d, f"tensors['b'].chunks[0].blocks[0][{i}]")


def test_block_larger_than_block_size(d):
    d["codec"]["block_size"] = 2048
    _rejects(d, "tensors['w'].chunks[0].blocks[0][1]")


def test_byte_planes_on_a_dtype_that_is_not_grouped(d):
    c = d["tensors"]["b"]["chunks"][0]
    n = c["length"]
    c["blocks"][0] = [n, 80, 0, "g", "zzzzzzzz", [n] + [0] * 7]
    _rejects(d, "tensors['b'].chunks[0].blocks[0]", "byte-grouped")


def test_byte_planes_on_an_object(d):
    o = d["objects"]["step"]
    n, raw = o["length"], o["nbytes"]
    o["blocks"] = [[n, raw, 0, "g", "z", [n]]]
    _rejects(d, "objects['step'].blocks[0]")


@pytest.mark.parametrize("kinds", ["zrz", "zrzzz", "zrzx", "ZRZZ", "", 4, None, ["z", "r", "z", "z"]])
def test_plane_kinds_wrong(d, kinds):
    d["tensors"]["w"]["chunks"][0]["blocks"][0][4] = kinds
    _rejects(d, "tensors['w'].chunks[0].blocks[0][4]")


def test_plane_lengths_count_wrong(d):
    rec = d["tensors"]["w"]["chunks"][0]["blocks"][0]   # "zrzz", 4 lengths
    rec[5] = rec[5][:3] + [0, 0]
    _rejects(d, "tensors['w'].chunks[0].blocks[0]", "plane lengths")
    rec[5] = rec[5][:3]
    _rejects(d, "tensors['w'].chunks[0].blocks[0]", "plane lengths")


def test_plane_lengths_not_a_list(d):
    d["tensors"]["w"]["chunks"][0]["blocks"][0][5] = 4
    _rejects(d, "tensors['w'].chunks[0].blocks[0][5]")


def test_plane_lengths_not_summing_to_stored(d):
    rec = d["tensors"]["w"]["chunks"][0]["blocks"][0]
    rec[5][0] += 1                                      # a "z" plane
    _rejects(d, "tensors['w'].chunks[0].blocks[0]", "sum to")


def test_raw_plane_of_the_wrong_length(d):
    rec = d["tensors"]["h"]["chunks"][0]["blocks"][0]   # [16, 16, crc, "g", "rr", [8, 8]]
    assert rec[4] == "rr" and rec[5] == [8, 8]
    rec[5] = [7, 9]
    _rejects(d, "tensors['h'].chunks[0].blocks[0][5][0]", "raw plane")


@pytest.mark.parametrize("value", [-1, True, "1", 1.5])
def test_plane_length_bad_number(d, value):
    d["tensors"]["w"]["chunks"][0]["blocks"][0][5][2] = value
    _rejects(d, "tensors['w'].chunks[0].blocks[0][5][2]")


def test_grouped_raw_len_not_a_multiple_of_the_group(d):
    rec = d["tensors"]["w"]["chunks"][0]["blocks"][2]   # 3808 raw bytes, 4 planes
    rec[1] = 3807
    _rejects(d, "tensors['w'].chunks[0].blocks[2]")


@pytest.mark.parametrize("field,value", [
    ("offset", -1), ("offset", True), ("offset", "0"), ("offset", 2 ** 70), ("offset", None),
    ("length", 1.0), ("length", -42), ("nbytes", 2 ** 70), ("nbytes", False),
])
def test_item_bad_numbers(d, field, value):
    d["tensors"]["b"]["chunks"][0][field] = value
    _rejects(d, f"tensors['b'].chunks[0].{field}")


def test_item_blocks_not_a_list(d):
    d["objects"]["step"]["blocks"] = {"0": [1, 1, 0, "r"]}
    _rejects(d, "objects['step'].blocks")


def test_object_entry_not_an_object(d):
    d["objects"]["step"] = [1, 2]
    _rejects(d, "objects['step']")


# ------------------------------------------------------------------ tensors and chunks


@pytest.mark.parametrize("dtype", ["float128", "Float32", "torch.float32", 5, None, ""])
def test_unknown_dtype(d, dtype):
    d["tensors"]["b"]["dtype"] = dtype
    _rejects(d, "tensors['b'].dtype")


def test_missing_dtype(d):
    del d["tensors"]["b"]["dtype"]
    _rejects(d, "tensors['b'].dtype")


@pytest.mark.parametrize("shape", [[10.0], ["10"], [True], [-10], [2 ** 70], "10", None, {"0": 10}])
def test_bad_shape(d, shape):
    d["tensors"]["b"]["shape"] = shape
    _rejects(d, "tensors['b'].shape")


def test_too_many_dims(d):
    _with_tensor(d, [_raw_chunk([0] * 65, [1] * 65)], shape=[1] * 65)
    _rejects(d, "tensors['t'].shape")


def test_too_many_elements(d):
    _with_tensor(d, [], shape=[1 << 31, 1 << 31, 2])
    _rejects(d, "tensors['t'].shape", "too many elements")


@pytest.mark.parametrize("value", ["yes", 1, 0, None])
def test_bad_requires_grad(d, value):
    d["tensors"]["b"]["requires_grad"] = value
    _rejects(d, "tensors['b'].requires_grad")


@pytest.mark.parametrize("field,value", [
    ("offsets", [True, 0]), ("offsets", [0, -1]), ("offsets", [0, "0"]), ("offsets", None),
    ("sizes", [30, 100.0]), ("sizes", [30, False]), ("sizes", "30,100"),
])
def test_bad_chunk_dims(d, field, value):
    d["tensors"]["w"]["chunks"][0][field] = value
    _rejects(d, f"tensors['w'].chunks[0].{field}")


def test_chunks_not_a_list(d):
    d["tensors"]["w"]["chunks"] = {"0": d["tensors"]["w"]["chunks"][0]}
    _rejects(d, "tensors['w'].chunks")


def test_chunk_not_an_object(d):
    d["tensors"]["w"]["chunks"] = [[0, 0]]
    _rejects(d, "tensors['w'].chunks[0]")


@pytest.mark.parametrize("offsets,sizes", [([0], [4, 4]), ([0, 0], [16]), ([0, 0, 0], [4, 4, 1]),
                                           ([], [])])
def test_chunk_rank_mismatch(d, offsets, sizes):
    c = _raw_chunk([0, 0], [4, 4])
    c["offsets"], c["sizes"] = offsets, sizes
    _with_tensor(d, [c])
    _rejects(d, "tensors['t'].chunks[0]", "rank")


@pytest.mark.parametrize("offsets,sizes", [([3, 0], [2, 4]), ([0, 1], [4, 4]), ([4, 0], [1, 4]),
                                           ([0, 0], [5, 4])])
def test_chunk_outside_the_shape(d, offsets, sizes):
    _with_tensor(d, [_raw_chunk(offsets, sizes)])
    _rejects(d, "tensors['t'].chunks[0]", "exceeds shape")


def test_chunk_missing(d):
    _with_tensor(d, [_raw_chunk([0, 0], [2, 4])])
    _rejects(d, "tensors['t']", "missing")


def test_chunks_overlapping_with_too_much_volume(d):
    _with_tensor(d, [_raw_chunk([0, 0], [3, 4]), _raw_chunk([2, 0], [2, 4])])
    _rejects(d, "tensors['t']", "overlapping")


def test_chunks_overlapping_with_the_right_volume(d):
    # 8 + 8 = 16 elements, but rows 1-2 are covered twice (and row 3 never)
    _with_tensor(d, [_raw_chunk([0, 0], [2, 4]), _raw_chunk([1, 0], [2, 4])])
    _rejects(d, "tensors['t']", "overlap")


def test_overlap_with_a_chunk_that_is_not_the_previous_one(d):
    # column 0 is one tall chunk; a later row chunk reaches back into it at (2, 0);
    # (2, 3) is left uncovered, so the volume is still 16
    chunks = [_raw_chunk([0, 0], [4, 1]), _raw_chunk([0, 1], [1, 3]), _raw_chunk([1, 1], [1, 3]),
              _raw_chunk([2, 0], [1, 3]), _raw_chunk([3, 1], [1, 3])]
    _with_tensor(d, chunks)
    _rejects(d, "tensors['t']", "[0, 0] and [2, 0] overlap")


def test_duplicate_chunk(d):
    _with_tensor(d, [_raw_chunk([0, 0], [4, 4]), _raw_chunk([0, 0], [4, 4])], shape=[4, 8])
    _rejects(d, "tensors['t']")


def test_scalar_with_two_chunks(d):
    d["tensors"]["s"]["chunks"].append(copy.deepcopy(d["tensors"]["s"]["chunks"][0]))
    _rejects(d, "tensors['s']")


def test_empty_chunk_list_for_a_non_empty_tensor(d):
    d["tensors"]["b"]["chunks"] = []
    _rejects(d, "tensors['b']", "no chunks")


def test_tensor_entry_not_an_object(d):
    d["tensors"]["b"] = ["int64", [10]]
    _rejects(d, "tensors['b']")


def test_key_both_tensor_and_object(d):
    d["objects"]["b"] = copy.deepcopy(d["objects"]["step"])
    _rejects(d, "objects", "'b'", "also a tensor")


# ------------------------------------------------------------------ top level


@pytest.mark.parametrize("value", [0, -1, True, "1", 1.0, None, 1 << 25, 2 ** 70])
def test_bad_world_size(d, value):
    d["world_size"] = value
    _rejects(d, "world_size")


def test_missing_world_size(d):
    del d["world_size"]
    _rejects(d, "world_size")


@pytest.mark.parametrize("value", [0, -4096, (1 << 30) + 16, 2 ** 70, True, "4096", 4096.0, None])
def test_bad_block_size(d, value):
    d["codec"]["block_size"] = value
    _rejects(d, "codec.block_size")


def test_block_size_of_one_gib_is_accepted(d):
    d["codec"]["block_size"] = 1 << 30
    Manifest.from_json(d)


@pytest.mark.parametrize("value", ["lz4", "ZSTD", None, 1])
def test_bad_compression(d, value):
    d["codec"]["compression"] = value
    _rejects(d, "codec.compression")


def test_codec_none_is_accepted(d):
    d["codec"]["compression"] = "none"
    Manifest.from_json(d)


@pytest.mark.parametrize("key", ["codec", "files", "tensors", "objects"])
@pytest.mark.parametrize("value", ["x", [], None, 3])
def test_required_objects_of_the_wrong_type(d, key, value):
    d[key] = value
    _rejects(d, key)


@pytest.mark.parametrize("pd,field", [
    ({"w": "w"}, "planner_data['w']"), ({"w": [True]}, "planner_data['w']"),
    ({"w": [1.5]}, "planner_data['w']"), ({"w": [None]}, "planner_data['w']"),
    ({"w": ["w", ["x"]]}, "planner_data['w']"), ({"w": {"0": "w"}}, "planner_data['w']"),
    (["w"], "planner_data"), ("w", "planner_data"),
])
def test_bad_planner_data(d, pd, field):
    d["planner_data"] = pd
    _rejects(d, field)


def test_planner_data_of_keys_and_indices_is_accepted(d):
    d["planner_data"] = {"w": ["model", 0, "w"], "b": []}
    assert Manifest.from_json(d).planner_data == {"w": ["model", 0, "w"], "b": []}


@pytest.mark.parametrize("key,value", [("created_unix", "now"), ("created_unix", [1]),
                                       ("user_metadata", [1]), ("user_metadata", "x"),
                                       ("versions", "x"), ("versions", [1])])
def test_bad_optional_fields(d, key, value):
    d[key] = value
    _rejects(d, key)


def test_top_level_not_an_object():
    with pytest.raises(ManifestError, match="top level"):
        Manifest.from_json([])


def test_manifest_error_is_a_corrupt_checkpoint_error():
    assert issubclass(ManifestError, CorruptCheckpointError)
    assert shardckpt.format.ManifestError is ManifestError


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_created_unix(d, value):
    d["created_unix"] = value
    with pytest.raises(ManifestError, match="created_unix"):
        Manifest.from_json(d)


# ------------------------------------------------------------------ parse_manifest


@pytest.mark.parametrize("data", [b"{", b"", b'{"format": "shardckpt",', b"\xff\xfe\x00garbage",
                                  b"[" * 100000, b'{"a":' * 100000, b'{"a": [' * 50000])
def test_not_json_is_corrupt(data):
    with pytest.raises(CorruptCheckpointError) as ei:
        parse_manifest(data, "p/manifest.json")
    assert "p/manifest.json" in str(ei.value) and ei.value.path == "p/manifest.json"


@pytest.mark.parametrize("data", [b"[]", b"1", b"null", b'"shardckpt"', b"{}",
                                  b'{"format": "other", "format_version": 2}',
                                  b'{"format": "Shardckpt", "format_version": 2}'])
def test_not_a_checkpoint(data):
    with pytest.raises(NotACheckpointError, match="p/manifest.json"):
        parse_manifest(data, "p/manifest.json")


@pytest.mark.parametrize("version", [4, 99, 2 ** 70])
def test_newer_format_version_is_unsupported(d, version):
    d["format_version"] = version
    with pytest.raises(UnsupportedFormatError, match="upgrade"):
        parse_manifest(_sealed(d), "p")
    with pytest.raises(UnsupportedFormatError):   # the checksum is not looked at first
        parse_manifest(json.dumps(d).encode(), "p")


@pytest.mark.parametrize("version", [0, -1, "2", 2.0, True, None])
def test_format_version_not_a_version(d, version):
    d["format_version"] = version
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        parse_manifest(_sealed(d), "p")


def test_missing_format_version(d):
    del d["format_version"]
    with pytest.raises(CorruptCheckpointError, match="format_version"):
        parse_manifest(_sealed(d), "p")


def test_checksum_mismatch(saved):
    data, raw = saved
    d = copy.deepcopy(raw)
    d["user_metadata"] = {"x": 1}        # altered after the checksum was written
    with pytest.raises(CorruptCheckpointError, match="checksum") as ei:
        parse_manifest(json.dumps(d).encode(), "p")
    assert ei.value.path == "p"
    d = copy.deepcopy(raw)
    d["checksum"] = "sha256:" + "0" * 64
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        parse_manifest(json.dumps(d).encode(), "p")
    d = copy.deepcopy(raw)
    del d["checksum"]                    # version 2 without a checksum
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        parse_manifest(json.dumps(d).encode(), "p")
    # a byte flipped inside a number
    text = data.decode()
    i = text.index('"world_size":1') + len('"world_size":')
    with pytest.raises(CorruptCheckpointError):
        parse_manifest((text[:i] + "2" + text[i + 1:]).encode(), "p")


def test_reformatted_manifest_keeps_its_checksum(saved):
    # the checksum covers content, not layout: indentation and key order do not matter
    raw = saved[1]
    pretty = json.dumps(dict(reversed(list(raw.items()))), indent=2).encode()
    assert parse_manifest(pretty, "p") == parse_manifest(saved[0], "p")


@pytest.mark.parametrize("where", ["created_unix", "user_metadata"])
def test_unchecksummable_v2_manifest_without_checksum_is_rejected(d, where):
    del d["checksum"]
    if where == "created_unix":
        d["created_unix"] = float("nan")
    else:
        d["user_metadata"] = {"loss": float("inf")}
    with pytest.raises(CorruptCheckpointError):
        parse_manifest(json.dumps(d).encode(), "p")   # json.dumps writes NaN / Infinity


def test_version_1_without_checksum_is_migrated(d):
    del d["checksum"]
    d["format_version"] = 1
    m = parse_manifest(json.dumps(d).encode(), "p")
    assert m.format_version == 3
    d["format_version"] = 3
    assert m == Manifest.from_json(d)
    # and written again it is a valid version-3 manifest with a checksum
    again = json.loads(m.to_bytes())
    assert again["format_version"] == 3 and again["checksum"].startswith("sha256:")
    assert parse_manifest(m.to_bytes(), "p") == m


def test_version_1_fixture_parses():
    path = os.path.join(FIXTURES, "v1_single_zstd", "manifest.json")
    with open(path, "rb") as f:
        data = f.read()
    assert json.loads(data)["format_version"] == 1 and "checksum" not in json.loads(data)
    m = parse_manifest(data, path)
    assert m.format_version == 3 and m.world_size == 1 and "w32" in m.tensors


def test_mutation_is_also_caught_behind_a_valid_checksum(d):
    # parse_manifest validates after the checksum: a sealed but invalid manifest is rejected
    d["world_size"] = 0
    with pytest.raises(ManifestError, match="world_size"):
        parse_manifest(_sealed(d), "p")


# ------------------------------------------------------------------ references (format 3)

BASE = "../ck0"


def _with_ref(d: dict, key: str = "w", first: int = 0, count: int = 1, offset: int = 0,
              base_size: int = 1 << 20) -> dict:
    """Chunk 0 of `key` with its blocks [first, first+count) moved to a base file."""
    d["bases"] = {BASE: {"files": {FILE: {"rank": 0, "size": base_size, "crc32": 0}}}}
    c = d["tensors"][key]["chunks"][0]
    c["refs"] = [[first, count, BASE, FILE, offset]]
    c["length"] -= sum(b[0] for b in c["blocks"][first:first + count])
    return d


def test_saved_manifest_has_a_hash_per_block(d):
    for t in d["tensors"].values():
        for c in t["chunks"]:
            assert len(c["hashes"]) == len(c["blocks"])
    assert d["bases"] == {}


def test_reference_round_trips(d):
    m = Manifest.from_json(_with_ref(d, count=2, offset=100))
    c = m.tensors["w"].chunks[0]
    assert c.refs[0].base == BASE and c.refs[0].count == 2
    blocks = c.block_list()
    assert [type(b).__name__ for b in blocks] == ["RefBlock", "RefBlock", "Block"]
    assert blocks[1].offset == 100 + blocks[0].stored_len and blocks[2].offset == c.offset
    assert Manifest.from_json(json.loads(m.to_bytes())) == m


@pytest.mark.parametrize("base", ["../../x", "..", "../", "../.hidden", "/etc", "x", "../a/b",
                                  "../a/../b", "../a\\b", "../a\0b", 7])
def test_base_names_stay_in_the_root(d, base):
    d = _with_ref(d)
    d["bases"] = {str(base): d["bases"][BASE]}
    d["tensors"]["w"]["chunks"][0]["refs"][0][2] = base
    _rejects(d, "bases")


def test_ref_to_an_unknown_base_or_file(d):
    d = _with_ref(d)
    d["tensors"]["w"]["chunks"][0]["refs"][0][2] = "../other"
    _rejects(d, "refs[0][2]", "not one of the manifest's bases")
    d["tensors"]["w"]["chunks"][0]["refs"][0][2] = BASE
    d["tensors"]["w"]["chunks"][0]["refs"][0][3] = "data/r00009.bin"
    _rejects(d, "refs[0][3]", "not a file of base")


@pytest.mark.parametrize("first,count", [(0, 0), (2, 2), (3, 1), (-1, 1)])
def test_ref_block_ranges(d, first, count):
    d = _with_ref(d)
    d["tensors"]["w"]["chunks"][0]["refs"][0][:2] = [first, count]
    _rejects(d, "refs[0]")


def test_overlapping_or_unordered_refs(d):
    d = _with_ref(d, first=1, count=1)
    c = d["tensors"]["w"]["chunks"][0]
    c["refs"].append([0, 1, BASE, FILE, 0])
    _rejects(d, "refs[1]", "out of order")


def test_ref_bytes_inside_the_base_file(d):
    d = _with_ref(d, base_size=10)
    _rejects(d, "refs[0]", "outside")


def test_own_length_counts_only_own_blocks(d):
    d = _with_ref(d)
    d["tensors"]["w"]["chunks"][0]["length"] += 1
    _rejects(d, "tensors['w'].chunks[0]", "stored")


@pytest.mark.parametrize("bad", [["0" * 32], "x", [1, 2, 3], ["G" * 32] * 3, ["0" * 31] * 3])
def test_hashes_are_validated(d, bad):
    d["tensors"]["w"]["chunks"][0]["hashes"] = bad
    _rejects(d, "hashes")


def test_v2_manifest_migrates_to_standalone_v3(d):
    d["format_version"] = 2
    del d["bases"]
    m = parse_manifest(_sealed(d), "p")
    assert m.format_version == 3 and m.bases == {}
