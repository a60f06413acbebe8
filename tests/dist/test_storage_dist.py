"""Multi-process save/load: FSDP2, DDP, ZeRO, resharding N -> M, crash safety (gloo, CPU)."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import shardckpt
from shardckpt import format as fmt
from shardckpt.io.reader import find_partials

from tests.workers import storage as W
from tests.workers.world import _entry, free_port, run_world


@pytest.fixture(scope="module")
def fsdp_ckpt(tmp_path_factory):
    """One FSDP2 checkpoint saved by 4 ranks, shared by the resharding checks."""
    d = tmp_path_factory.mktemp("fsdp")
    path, ref = str(d / "ckpt"), str(d / "ref.pt")
    run_world(4, W.fsdp_save, path, ref, 515, 1024, "none")
    return path, ref


@pytest.mark.parametrize("m", [2, 3, 4, 5])
def test_fsdp2_reshard_bitwise_and_read_amplification(fsdp_ckpt, m):
    path, ref = fsdp_ckpt
    out = run_world(m, W.fsdp_load, path, ref, 515)
    assert out[0]["mismatches"] == []
    for rank, r in enumerate(out):
        # Each rank reads only the blocks that cover what it owns now.
        assert r["bytes_read"] <= 1.1 * r["owned"], (rank, r)


def test_fsdp2_load_on_one_process_without_process_group(fsdp_ckpt):
    path, ref = fsdp_ckpt
    model = W.build_model(7, 515)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    W._train(model, opt, 0, steps=1)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    shardckpt.load(state, path)
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    msd, osd = get_state_dict(model, opt)
    expect = torch.load(ref, weights_only=True)
    assert W.compare_trees(expect, {"model": msd, "optim": osd}) == []


def test_fsdp2_compressed_roundtrip(tmp_path):
    path, ref = str(tmp_path / "c"), str(tmp_path / "ref.pt")
    run_world(2, W.fsdp_save, path, ref, 37, fmt.DEFAULT_BLOCK_SIZE, "zstd")
    out = run_world(3, W.fsdp_load, path, ref, 37)
    assert out[0]["mismatches"] == []
    assert shardckpt.verify(path).ok


def test_ddp_replicated_tensors_written_once_and_spread(tmp_path):
    path = str(tmp_path / "ddp")
    model_bytes = run_world(2, W.ddp_save, path)[0]
    manifest = json.load(open(os.path.join(path, fmt.MANIFEST_NAME)))
    sizes = {f: info["size"] for f, info in manifest["files"].items()}
    assert len(sizes) == 2, sizes
    total = sum(sizes.values())
    # Model + two Adam moments (+ small step counters and param groups), each written once.
    assert 3 * model_bytes <= total < 3 * model_bytes * 1.05 + 8192
    for s in sizes.values():
        assert s > 0.3 * total, sizes  # balanced, not all on rank 0
    for fqn, t in manifest["tensors"].items():
        assert len(t["chunks"]) == 1, fqn  # a replicated tensor is stored once


def test_zero_optimizer_each_rank_writes_what_it_owns(tmp_path):
    path = str(tmp_path / "zero")
    saved = run_world(2, W.zero_save, path)
    owned = [set(s) for s in saved]
    assert owned[0] and owned[1] and not owned[0] & owned[1]
    manifest = json.load(open(os.path.join(path, fmt.MANIFEST_NAME)))
    for r, names in enumerate(owned):
        for n in names:
            ch = manifest["tensors"][f"optim.state.{n}.exp_avg"]["chunks"]
            assert manifest["files"][ch[0]["file"]]["rank"] == r
    union = {k: v for s in saved for k, v in s.items()}
    loaded = run_world(3, W.zero_owned, path)
    got = {k: v for s in loaded for k, v in s.items()}
    assert set(got) == set(union)
    assert W.compare_trees(union, got) == []
    assert run_world(2, W.zero_load, path)[0]["lr"] == 1e-2


def test_a_zero_save_leaves_the_optimizer_as_it_was(tmp_path):
    # The save made placeholders with an lr=0 step, which also stepped every parameter
    # holding a gradient (step counts up, moments absorbing that gradient again).
    path = str(tmp_path / "zero")
    out = run_world(2, W.zero_save_leaves_optimizer_alone, path)
    assert all(o["same"] for o in out), out
    assert sum(o["with_state"] for o in out) == 4  # weight + bias of the two used layers
    manifest = json.load(open(os.path.join(path, fmt.MANIFEST_NAME)))
    stored = {k.split(".")[2] for k in manifest["tensors"] if k.startswith("optim.state.")}
    assert stored == {"0", "2"}  # layers 1 and 3 never stepped: nothing saved for them


def test_a_train_state_saves_and_reshards_a_zero_optimizer(tmp_path):
    # TrainState called get_optimizer_state_dict on ZeRO, which refuses an unconsolidated
    # optimizer: every rank's save failed.
    path = str(tmp_path / "zts")
    saved = run_world(2, W.zero_train_state, path, True)
    union = {k: v for s in saved for k, v in s.items()}
    assert saved[0] and saved[1] and not set(saved[0]) & set(saved[1])
    loaded = run_world(3, W.zero_train_state, path, False)
    got = {k: v for s in loaded for k, v in s.items()}
    assert set(got) == set(union) and W.compare_trees(union, got) == []


def test_kill_one_rank_mid_write_keeps_previous_checkpoint(tmp_path):
    good, bad, flag = str(tmp_path / "good"), str(tmp_path / "bad"), str(tmp_path / "flag")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, W.save_then_hang, (good, bad, flag), q),
                         daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        deadline = time.time() + 120
        while not os.path.exists(flag):
            assert time.time() < deadline, "rank 1 never reached the middle of its write"
            assert all(p.is_alive() for p in procs), "a rank died early"
            time.sleep(0.1)
        # The whole job dies (node loss): rank 0 gets no chance to clean up.
        os.kill(procs[0].pid, signal.SIGKILL)
        os.kill(procs[1].pid, signal.SIGKILL)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
    assert not os.path.exists(bad)
    leftovers = find_partials(bad)
    assert len(leftovers) == 1 and os.path.isfile(os.path.join(leftovers[0], fmt.PARTIAL_MARKER))
    with pytest.raises(shardckpt.IncompleteCheckpointError, match="never committed"):
        shardckpt.load({"w": torch.zeros(5000)}, bad)
    state = {"w": torch.zeros(5000), "r": torch.zeros(300), "v": torch.zeros(4096)}
    shardckpt.load(state, good)
    assert torch.equal(state["w"], torch.arange(5000, dtype=torch.float32))
    assert shardckpt.verify(good).ok
