"""Single process, no process group: round trips, bad input, corruption on disk."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

import shardckpt
from shardckpt import format as fmt
from shardckpt.format.manifest import content_checksum
from shardckpt.io.reader import find_partials


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(257, 129, generator=g), "b": torch.randn(129, generator=g),
                  "h": torch.randn(3000, generator=g).bfloat16(),
                  "f16": torch.randn(77, 3, generator=g).half()},
        "ints": torch.randint(-1000, 1000, (1001,), generator=g),
        "mask": torch.rand(333, generator=g) > 0.5,
        "empty": torch.empty(0, 5),
        "scalar": torch.tensor(3.5),
        "nc": torch.randn(40, 30, generator=g).t(),  # non-contiguous
        "view": torch.randn(1000, generator=g)[17:517],  # storage offset
        "meta": {"step": 12, "name": "run-a", "lrs": [0.1, 0.01]},
    }


def _zeros_like(state: dict) -> dict:
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = _zeros_like(v)
        elif torch.is_tensor(v):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None
    return out


def _assert_equal(a: dict, b: dict) -> None:
    for k, v in a.items():
        if isinstance(v, dict):
            _assert_equal(v, b[k])
        elif torch.is_tensor(v):
            assert v.dtype == b[k].dtype and v.shape == b[k].shape, k
            assert torch.equal(v, b[k]), k
        else:
            assert v == b[k], k


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("block_size", [4096, fmt.DEFAULT_BLOCK_SIZE])
def test_roundtrip_bitwise(tmp_path, compression, block_size):
    s = _state()
    path = tmp_path / "ck"
    shardckpt.save(s, path, compression=compression, block_size=block_size)
    assert sorted(os.listdir(path)) == ["data", "manifest.json"]
    t = _zeros_like(s)
    t["meta"] = {"step": 0, "name": "", "lrs": []}
    shardckpt.load(t, path)
    _assert_equal(s, t)
    assert shardckpt.verify(path).ok


def test_plain_dcp_with_storage_plugins(tmp_path):
    s = _state(1)
    dcp.save(s, storage_writer=shardckpt.ShardWriter(tmp_path / "ck"))
    t = _zeros_like(s)
    t["meta"] = {"step": 0, "name": "", "lrs": []}
    dcp.load(t, storage_reader=shardckpt.ShardReader(tmp_path / "ck"))
    _assert_equal(s, t)


def test_manifest_is_json_with_index(tmp_path):
    shardckpt.save(_state(), tmp_path / "ck", metadata={"run": "abc"})
    m = json.load(open(tmp_path / "ck" / "manifest.json"))
    assert m["format_version"] == fmt.FORMAT_VERSION and m["world_size"] == 1
    assert m["user_metadata"] == {"run": "abc"}
    assert m["versions"]["torch"] == torch.__version__
    w = m["tensors"]["model.w"]
    assert w["shape"] == [257, 129] and w["dtype"] == "float32"
    ch = w["chunks"][0]
    assert {"file", "offset", "length", "nbytes", "blocks"} <= set(ch)
    assert m["files"][ch["file"]]["size"] == os.path.getsize(tmp_path / "ck" / ch["file"])


def test_overwrite_replaces_atomically(tmp_path):
    path = tmp_path / "ck"
    shardckpt.save({"x": torch.ones(10)}, path)
    shardckpt.save({"x": torch.full((10,), 2.0)}, path)
    t = {"x": torch.zeros(10)}
    shardckpt.load(t, path)
    assert torch.equal(t["x"], torch.full((10,), 2.0))
    assert os.listdir(tmp_path) == ["ck"]
    with pytest.raises(shardckpt.CheckpointExistsError):
        shardckpt.save({"x": torch.ones(10)}, path, overwrite=False)


def test_saving_into_a_directory_of_other_files_keeps_them(tmp_path):
    # As DCP does (issue 14): the directory's own files stay; a file at the path or a
    # foreign `data` entry is refused, untouched.
    d = tmp_path / "mydata"
    d.mkdir()
    (d / "precious.txt").write_text("keep me")
    shardckpt.save({"x": torch.ones(3)}, d)
    assert (d / "precious.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["mydata"]
    t = {"x": torch.zeros(3)}
    shardckpt.load(t, d)
    assert torch.equal(t["x"], torch.ones(3))
    f = tmp_path / "afile"
    f.write_text("keep me too")
    with pytest.raises(shardckpt.CheckpointExistsError, match="not a directory"):
        shardckpt.save({"x": torch.ones(3)}, f)
    assert f.read_text() == "keep me too"
    d2 = tmp_path / "dataset"
    (d2 / "data").mkdir(parents=True)
    (d2 / "data" / "x.csv").write_text("1,2")
    with pytest.raises(shardckpt.CheckpointExistsError, match="did not write"):
        shardckpt.save({"x": torch.ones(3)}, d2)
    assert (d2 / "data" / "x.csv").read_text() == "1,2"
    assert sorted(os.listdir(tmp_path)) == ["afile", "dataset", "mydata"]


def test_missing_path(tmp_path):
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="no such checkpoint"):
        shardckpt.load({"x": torch.zeros(1)}, tmp_path / "nope")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.bin").write_bytes(b"123")
    with pytest.raises(shardckpt.NotACheckpointError, match="not a shardckpt checkpoint"):
        shardckpt.load({"x": torch.zeros(1)}, tmp_path / "junk")
    torch.save({"x": 1}, tmp_path / "file.pt")
    with pytest.raises(shardckpt.NotACheckpointError):
        shardckpt.load({"x": torch.zeros(1)}, tmp_path / "file.pt")


def test_key_shape_dtype_mismatch(tmp_path):
    path = tmp_path / "ck"
    shardckpt.save({"a": torch.ones(4, 3), "b": torch.ones(2)}, path)
    with pytest.raises(shardckpt.MissingKeysError, match="'c'.*strict=False"):
        shardckpt.load({"a": torch.zeros(4, 3), "b": torch.zeros(2), "c": torch.zeros(1)}, path)
    with pytest.raises(shardckpt.UnexpectedKeysError, match="'b'"):
        shardckpt.load({"a": torch.zeros(4, 3)}, path)
    with pytest.raises(shardckpt.ShapeMismatchError, match=r"'a'.*\[4, 3\].*\[3, 4\]"):
        shardckpt.load({"a": torch.zeros(3, 4), "b": torch.zeros(2)}, path)
    with pytest.raises(shardckpt.DtypeMismatchError, match="'a'.*float64"):
        shardckpt.load({"a": torch.zeros(4, 3, dtype=torch.float64), "b": torch.zeros(2)}, path)
    partial = {"a": torch.zeros(4, 3)}
    shardckpt.load(partial, path, strict=False)
    assert torch.equal(partial["a"], torch.ones(4, 3))
    # errors never touch what is saved
    assert shardckpt.verify(path).ok


def _first_block_of(path, fqn):
    m = json.load(open(os.path.join(path, "manifest.json")))
    ch = m["tensors"][fqn]["chunks"][0]
    return os.path.join(path, ch["file"]), ch["offset"], ch["blocks"][0][0]


def test_flipped_byte_is_detected_naming_file_rank_tensor(tmp_path):
    path = str(tmp_path / "ck")
    s = _state()
    shardckpt.save(s, path)
    f, off, n = _first_block_of(path, "model.w")
    with open(f, "r+b") as fh:
        fh.seek(off + n // 2)
        b = fh.read(1)
        fh.seek(off + n // 2)
        fh.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(shardckpt.CorruptCheckpointError) as ei:
        shardckpt.load(_zeros_like(s) | {"meta": {"step": 0, "name": "", "lrs": []}}, path)
    msg = str(ei.value)
    assert "r00000.bin" in msg and "rank 0" in msg and "model.w" in msg and "checksum" in msg
    assert ei.value.rank == 0 and ei.value.tensor == "model.w"
    with pytest.raises(shardckpt.CorruptCheckpointError, match="model.w"):
        shardckpt.verify(path)
    rep = shardckpt.verify(path, raise_on_error=False)
    assert not rep.ok and rep.problems[0].tensor == "model.w"


def test_truncated_and_missing_files(tmp_path):
    path = str(tmp_path / "ck")
    shardckpt.save({"x": torch.randn(100_000)}, path)
    f = os.path.join(path, fmt.data_file_name(0))
    size = os.path.getsize(f)
    os.truncate(f, size - 100)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="truncated"):
        shardckpt.load({"x": torch.zeros(100_000)}, path)
    os.remove(f)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="missing"):
        shardckpt.load({"x": torch.zeros(100_000)}, path)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="missing"):
        shardckpt.verify(path)


def test_damaged_manifest(tmp_path):
    path = tmp_path / "ck"
    shardckpt.save({"x": torch.ones(3)}, path)
    (path / "manifest.json").write_text('{"format": "shardckpt", "format_vers')
    with pytest.raises(shardckpt.CorruptCheckpointError, match="manifest"):
        shardckpt.load({"x": torch.zeros(3)}, path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/shardckpt_pwned",))


def test_loading_never_unpickles_arbitrary_objects(tmp_path):
    path = str(tmp_path / "ck")
    shardckpt.save({"x": torch.ones(3), "obj": {"k": 1}}, path)
    # Replace the stored object with a malicious pickle, keeping checksums valid.
    import io
    import zlib

    buf = io.BytesIO()
    torch.save(_Evil(), buf)
    payload = buf.getvalue()
    m = json.load(open(os.path.join(path, "manifest.json")))
    obj = m["objects"]["obj.k"]
    f = os.path.join(path, obj["file"])
    with open(f, "ab") as fh:
        start = fh.tell()
        fh.write(payload)
    obj.update(offset=start, length=len(payload), nbytes=len(payload),
               blocks=[[len(payload), len(payload), zlib.crc32(payload), "r"]])
    m["files"][obj["file"]]["size"] = os.path.getsize(f)
    m["checksum"] = content_checksum(m)  # an attacker who edits the manifest can re-sum it
    open(os.path.join(path, "manifest.json"), "w").write(json.dumps(m))
    if os.path.exists("/tmp/shardckpt_pwned"):
        os.remove("/tmp/shardckpt_pwned")
    with pytest.raises(shardckpt.UnsafeObjectError, match="obj.k"):
        shardckpt.load({"x": torch.zeros(3), "obj": {"k": 0}}, path)
    with pytest.raises(BaseException, match="weights_only"):  # DCP wraps it
        dcp.load({"x": torch.zeros(3), "obj": {"k": 0}},
                 storage_reader=shardckpt.ShardReader(path))
    assert not os.path.exists("/tmp/shardckpt_pwned")
    assert pickle  # the module is what an attacker would reach for


def test_uncommitted_save_is_invisible_and_identifiable(tmp_path):
    path = str(tmp_path / "ck")
    w = shardckpt.ShardWriter(path)
    from torch.distributed.checkpoint.planner import SavePlan

    w.prepare_global_plan([SavePlan([])])  # a save that starts and never commits
    assert not os.path.exists(path)
    (leftover,) = find_partials(path)
    assert fmt.parse_leftover(os.path.basename(leftover)) == ("ck", "partial")
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="never committed"):
        shardckpt.load({"x": torch.zeros(1)}, path)


def test_key_remapping_on_load(tmp_path):
    path = tmp_path / "ck"
    shardckpt.save({"model": {"module.w": torch.ones(3), "module._orig_mod.b": torch.zeros(2)}},
                   path)
    st = {"model": {"w": torch.zeros(3), "b": torch.ones(2)}}
    with pytest.raises(shardckpt.MissingKeysError):
        shardckpt.load(st, path)
    shardckpt.load(st, path, strip_prefix=["module.", "_orig_mod."])
    assert torch.equal(st["model"]["w"], torch.ones(3)) and torch.equal(st["model"]["b"],
                                                                        torch.zeros(2))
    st = {"model": {"W": torch.zeros(3), "b": torch.ones(2)}}
    shardckpt.load(st, path, rename={r"module\.(_orig_mod\.)?": "", r"\.w$": ".W"})
    assert torch.equal(st["model"]["W"], torch.ones(3))


def test_inner_dimension_slices_read_only_their_blocks(tmp_path):
    # A box cut along dim 1 is 64 short runs; only the blocks under them are read.
    x = torch.randn(64, 4096)
    shardckpt.save({"x": x}, tmp_path / "ck", compression="none", block_size=4096)
    r = shardckpt.ShardReader(tmp_path / "ck")
    got = r.read_region("x", [0, 1024], [64, 1024])
    assert torch.equal(got, x[:, 1024:2048])
    assert r.bytes_read == 64 * 4096  # one 4 KiB block per row, not the whole 1 MiB span
    y = torch.randn(6, 10, 20)
    shardckpt.save({"y": y}, tmp_path / "c2", compression="none", block_size=64)
    r2 = shardckpt.ShardReader(tmp_path / "c2")
    assert torch.equal(r2.read_region("y", [1, 3, 5], [4, 5, 7]), y[1:5, 3:8, 5:12])
    assert torch.equal(r2.read_region("y", [0, 0, 0], [6, 10, 1]), y[:, :, :1])
    assert torch.equal(r2.read_region("y", [2, 0, 0], [1, 10, 20]), y[2:3])
