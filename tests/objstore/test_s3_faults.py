"""Faults between client and server (a proxy on 127.0.0.1), and kill -9 mid-upload."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import shardckpt
from shardckpt.errors import IncompleteCheckpointError, SaveFailedError
from shardckpt.format import DirState
from shardckpt.io.storage import storage_for
from shardckpt.tools.gc import gc
from tests.objstore.proxy import FaultProxy

FAST = {"part_size": 5 << 20, "max_in_flight": 2, "max_attempts": 4, "read_timeout": 2,
        "connect_timeout": 2}


@pytest.fixture
def proxy(s3_server):
    p = FaultProxy(s3_server.port)
    yield p
    p.close()


def _via(proxy, bucket: str, **kw) -> str:
    """The bucket's URL with storage_options sending its requests through the proxy."""
    storage_for(f"{bucket}/x", {**FAST, "endpoint_url": proxy.url, **kw})
    return bucket


def _state(seed: int) -> dict:
    return {"w": torch.randn(3 << 20, generator=torch.Generator().manual_seed(seed))}  # 12 MiB


def test_503_drops_and_slow_answers_are_retried(bucket, proxy):
    b = _via(proxy, bucket)
    proxy.add("PUT", "503", times=2)  # SlowDown on the first writes
    proxy.add("partNumber", "drop", times=2)  # connection reset halfway through a part
    proxy.add("GET", "slow", times=1, delay=3.0)  # past read_timeout: a timeout, retried
    proxy.add("GET", "503", times=1)
    src = _state(1)
    shardckpt.save(src, f"{b}/run/step_1", compression="none")
    out = {"w": torch.zeros(3 << 20)}
    shardckpt.load(out, f"{b}/run/step_1")
    assert torch.equal(out["w"], src["w"])
    acts = [a for _, a in proxy.log]
    assert acts.count("503") == 3 and acts.count("drop") == 2 and acts.count("slow") == 1


def test_persistent_failure_is_typed_and_leaves_nothing_visible(bucket, proxy):
    b = _via(proxy, bucket, max_attempts=2)  # gives up soon: the bound on retries holds
    prev = _state(0)
    shardckpt.save(prev, f"{b}/run/step_1")
    proxy.add("partNumber", "503", times=10 ** 6)  # every part of every upload: SlowDown
    with pytest.raises(SaveFailedError) as ei:
        shardckpt.save(_state(2), f"{b}/run/step_2", compression="none")
    msg = str(ei.value)
    assert "run/step_2/data/r00000." in msg and "rank 0" in msg and "SlowDown" in msg
    st = storage_for(f"{b}/run/step_2")
    assert st.state(f"{b}/run/step_2") in (DirState.MISSING, DirState.PARTIAL)
    with pytest.raises((IncompleteCheckpointError, shardckpt.CheckpointNotFoundError)):
        shardckpt.load({"w": torch.zeros(3 << 20)}, f"{b}/run/step_2")
    proxy.rules.clear()
    out = {"w": torch.zeros(3 << 20)}
    shardckpt.load(out, f"{b}/run/step_1")
    assert torch.equal(out["w"], prev["w"])
    assert st.store.uploads(f"{b}/run/") == []  # the failed save aborted its upload


_CHILD = r"""
import sys, torch, shardckpt
from shardckpt.io.storage import storage_for
url, endpoint = sys.argv[1], sys.argv[2]
storage_for(url, {"part_size": 5 << 20, "max_in_flight": 1, "endpoint_url": endpoint})
shardckpt.save({"w": torch.randn(6 << 20)}, url, compression="none")  # 24 MiB
"""


def test_kill_9_mid_multipart_upload(bucket, proxy, s3_server):
    root = f"{bucket}/run"
    prev = _state(3)
    shardckpt.save(prev, f"{root}/step_1")
    proxy.add("partNumber", "slow", times=10 ** 6, delay=0.5)  # parts crawl: time to kill
    child = subprocess.Popen([sys.executable, "-c", _CHILD, f"{root}/step_2", proxy.url],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    st = storage_for(f"{root}/step_1")
    try:
        deadline = time.monotonic() + 60
        while not st.store.uploads(f"{root}/step_2/") or not [
                line for line, a in proxy.log if a == "slow"]:
            assert child.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(0.6)  # a part or two in
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert st.state(f"{root}/step_2") == DirState.PARTIAL  # marker + upload, no manifest
    with pytest.raises(IncompleteCheckpointError):
        shardckpt.load({"w": torch.zeros(3 << 20)}, f"{root}/step_2")
    assert [i.step for i in shardckpt.list_checkpoints(root)] == [1]
    out = {"w": torch.zeros(3 << 20)}
    shardckpt.load(out, f"{root}/step_1")
    assert torch.equal(out["w"], prev["w"])
    rep = gc(root, older_than=0)
    assert {a.kind for a in rep.removed} >= {"partial"}
    assert st.store.uploads(f"{root}/") == []  # the dangling upload was aborted
    b = bucket.removeprefix("s3://")
    left = sorted(o["Key"] for o in s3_server.client().list_objects_v2(
        Bucket=b, Prefix="run/").get("Contents", []))
    assert left and all(k.startswith("run/step_1/") for k in left)
    shardckpt.load(out, f"{root}/step_1")
    assert torch.equal(out["w"], prev["w"])


def test_a_listing_that_fails_is_an_error_not_an_empty_run(bucket, proxy):
    # Read as "no checkpoints", a failed listing made restore() return None: the job then
    # started again from step 0 over its own checkpoints.
    b = _via(proxy, bucket, max_attempts=2)
    mgr = shardckpt.CheckpointManager(f"{b}/run", keep_last=2)
    mgr.save(1, {"w": torch.arange(8.0)})
    proxy.add("list-type", "503", times=10 ** 6)
    with pytest.raises(shardckpt.ShardckptError, match="SlowDown|503"):
        shardckpt.list_checkpoints(f"{b}/run")
    with pytest.raises(shardckpt.ShardckptError, match="SlowDown|503"):
        shardckpt.CheckpointManager(f"{b}/run", keep_last=2).restore({"w": torch.zeros(8)})
    proxy.rules.clear()
    out = {"w": torch.zeros(8)}
    assert shardckpt.CheckpointManager(f"{b}/run", keep_last=2).restore(out) == 1
    assert torch.equal(out["w"], torch.arange(8.0))


@pytest.mark.parametrize("attempts", [1, 3])
def test_max_attempts_counts_every_request(bucket, proxy, attempts):
    b = _via(proxy, bucket, max_attempts=attempts)
    proxy.add("PUT", "503", times=10 ** 6)
    with pytest.raises(SaveFailedError):
        shardckpt.save({"w": torch.arange(8.0)}, f"{b}/run/attempts_{attempts}")
    puts = [a for _, a in proxy.log if a == "503"]
    # One request of the save is refused that many times, then it gives up.
    assert len(puts) == attempts, proxy.log


def test_a_save_to_an_unreachable_store_is_a_save_error(s3_server):
    from tests.workers.world import free_port

    opts = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "max_attempts": 1,
            "connect_timeout": 1, "aws_access_key_id": "x", "aws_secret_access_key": "x"}
    with pytest.raises(SaveFailedError, match="nothing was committed"):
        shardckpt.save({"w": torch.ones(2)}, "s3://nobody-listens/ck", storage_options=opts)


def test_a_missing_bucket_is_an_error_not_an_empty_root(bucket):
    # A mistyped bucket listed as "0 checkpoints": restore() then started a fresh run.
    missing = bucket.rstrip("/") + "-no-such-bucket"
    with pytest.raises(shardckpt.CheckpointNotFoundError, match="does not exist"):
        shardckpt.list_checkpoints(f"{missing}/run")
