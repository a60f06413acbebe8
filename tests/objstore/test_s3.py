"""Checkpoints on a real S3 server (moto, 127.0.0.1): layout, commit, overwrite, integrity."""

from __future__ import annotations

import threading

import pytest
import torch

import shardckpt
from shardckpt.errors import (
    CheckpointExistsError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from shardckpt.format import DirState
from shardckpt.io.reader import CheckpointReader
from shardckpt.io.storage import storage_for

PART = 5 << 20


def _state(seed: int = 0, mb: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(mb << 18, generator=g),  # incompressible: mb MiB on the wire
            "b": torch.arange(7, dtype=torch.int64) + seed, "step": seed}


def _empty(mb: int = 12) -> dict:
    return {"w": torch.zeros(mb << 18), "b": torch.zeros(7, dtype=torch.int64), "step": -1}


def _keys(s3_server, url: str) -> list[str]:
    b, _, prefix = url.removeprefix("s3://").partition("/")
    out = s3_server.client().list_objects_v2(Bucket=b, Prefix=prefix).get("Contents", [])
    return sorted(o["Key"] for o in out)


def _same(a: dict, b: dict) -> None:
    assert torch.equal(a["w"], b["w"]) and torch.equal(a["b"], b["b"]) and a["step"] == b["step"]


def test_save_load_streams_parts_in_flight_bitwise(bucket, s3_server):
    url = f"{bucket}/run/step_1"
    store = storage_for(url, {"part_size": PART, "max_in_flight": 3}).store
    live, peak, parts, lock = [0], [0], [0], threading.Lock()

    def before(**kw):
        with lock:
            live[0] += 1
            parts[0] += 1
            peak[0] = max(peak[0], live[0])

    def after(**kw):
        with lock:
            live[0] -= 1
    store.client.meta.events.register("before-call.s3.UploadPart", before)
    store.client.meta.events.register("after-call.s3.UploadPart", after)
    try:
        src = _state(1)
        res = shardckpt.save(src, url, compression="none")
    finally:
        store.client.meta.events.unregister("before-call.s3.UploadPart", before)
        store.client.meta.events.unregister("after-call.s3.UploadPart", after)
    assert res.path == url and res.bytes_written > 12 << 20
    assert parts[0] == 3  # 12 MiB + a little in 5 MiB parts
    assert 2 <= peak[0] <= 3  # several in flight, never more than max_in_flight
    keys = _keys(s3_server, url)
    assert keys[-1] == "run/step_1/manifest.json" and len(keys) == 2
    assert keys[0].startswith("run/step_1/data/r00000.") and keys[0].endswith(".bin")
    out = _empty()
    shardckpt.load(out, url)
    _same(out, src)
    assert shardckpt.verify(url).ok


def test_overwrite_replaces_and_overwrite_false_refuses(bucket, s3_server):
    url = f"{bucket}/run/step_2"
    a, b = _state(1, mb=1), _state(2, mb=1)
    shardckpt.save(a, url)
    first = _keys(s3_server, url)
    with pytest.raises(CheckpointExistsError, match="already exists"):
        shardckpt.save(b, url, overwrite=False)
    assert _keys(s3_server, url) == first  # the refused save left nothing behind
    out = _empty(1)
    shardckpt.load(out, url)
    _same(out, a)
    shardckpt.save(b, url)  # overwrite=True: one PUT of the manifest swaps it
    second = _keys(s3_server, url)
    assert len(second) == 2 and second != first  # the old data object is gone
    shardckpt.load(out, url)
    _same(out, b)


def test_concurrent_overwrite_false_exactly_one_wins(bucket, s3_server):
    """Two saves to one new name, both past the existence check: the conditional PUT
    (If-None-Match: *) of the manifest lets only the first commit."""
    url = f"{bucket}/run/step_3"
    st = storage_for(url)
    c1 = st.begin_commit(url, overwrite=False, save_id="a", world_size=1)
    c2 = st.begin_commit(url, overwrite=False, save_id="b", world_size=1)
    assert st.state(url) == DirState.PARTIAL
    shardckpt.save(_state(3, mb=1), url, overwrite=False)  # a third save commits first
    with pytest.raises(CheckpointExistsError):
        c1.finalize(CheckpointReader(url).manifest)
    c2.abort()
    assert st.state(url) == DirState.COMMITTED
    assert not [k for k in _keys(s3_server, f"{bucket}/run") if ".partial-" in k]


def test_uncommitted_save_is_invisible_then_aborted(bucket, s3_server):
    url = f"{bucket}/run/step_4"
    st = storage_for(url)
    c = st.begin_commit(url, overwrite=True, save_id="x", world_size=1)
    sink = st.open_sink(f"{url}/{c.data_name(0)}", 0)
    sink.write(memoryview(b"x" * 100))
    sink.close()
    assert st.state(url) == DirState.PARTIAL
    with pytest.raises(IncompleteCheckpointError, match="never committed"):
        shardckpt.load(_empty(1), url)
    c.abort()
    assert _keys(s3_server, f"{bucket}/run") == []


def test_flipped_byte_in_object_is_detected_naming_it(bucket, s3_server):
    url = f"{bucket}/run/step_5"
    shardckpt.save(_state(5, mb=1), url)
    key = _keys(s3_server, url)[0]
    b = bucket.removeprefix("s3://")
    cl = s3_server.client()
    data = bytearray(cl.get_object(Bucket=b, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x40
    cl.put_object(Bucket=b, Key=key, Body=bytes(data))
    with pytest.raises(CorruptCheckpointError) as ei:
        shardckpt.load(_empty(1), url)
    assert key.rsplit("/", 1)[1] in str(ei.value) and "rank 0" in str(ei.value)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
        shardckpt.verify(url)
    rep = shardckpt.verify(url, raise_on_error=False)
    assert not rep.ok


def test_region_read_fetches_only_needed_blocks(bucket, tmp_path):
    """Ranged GETs of only the blocks a region needs: the bytes fetched from the store
    equal what the same read takes from the same checkpoint on disk."""
    src = {"m": torch.randn(512, 1024)}  # 2 MiB, 64 KiB blocks
    url = f"{bucket}/run/step_6"
    for where in (url, str(tmp_path / "c")):
        shardckpt.save(src, where, block_size=64 << 10, compression="none")
    got = {}
    for where in (url, str(tmp_path / "c")):
        with CheckpointReader(where) as r:
            part = r.read_region("m", [100, 0], [50, 1024])
            assert torch.equal(part, src["m"][100:150])
            got[where] = r.bytes_read
            if where == url:  # what went over the wire, counted by the ranged GETs
                assert sum(f.bytes_fetched for f in r._ckpt._files.values()) == r.bytes_read
    assert got[url] == got[str(tmp_path / "c")]
    assert got[url] <= 1.1 * 50 * 1024 * 4 + (64 << 10) * 2


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(scheme, tmp_path):
    pytest.importorskip("fsspec")
    url = (f"memory://shardckpt-{tmp_path.name}/run/step_7" if scheme == "memory"
           else f"file://{tmp_path}/run/step_7")
    src = _state(7, mb=1)
    shardckpt.save(src, url)
    out = _empty(1)
    shardckpt.load(out, url)
    _same(out, src)
    assert shardckpt.verify(url).ok
    with pytest.raises(CheckpointExistsError):
        shardckpt.save(src, url, overwrite=False)
    st = storage_for(url)
    assert st.state(url) == DirState.COMMITTED
    assert st.state(url + "x") == DirState.MISSING
