"""Stock dcp.save / dcp.load with the plugins, FSDP2 DTensors resharded 2 -> 3 (gloo)."""

from __future__ import annotations

from tests.workers import storage as W
from tests.workers.world import run_world


def test_plain_dcp_fsdp2_save_at_2_load_at_3_bitwise(tmp_path):
    path, ref = str(tmp_path / "ck"), str(tmp_path / "ref.pt")
    run_world(2, W.plain_dcp_save, path, ref, 37)
    out = run_world(3, W.plain_dcp_load, path, ref, 37)
    assert out[0] == []


def test_load_model_of_an_fsdp2_checkpoint_at_3_ranks_and_at_1(tmp_path):
    import torch

    import shardckpt

    path, ref = str(tmp_path / "ck"), str(tmp_path / "ref.pt")
    run_world(2, W.fsdp_save, path, ref, 37, 4096, "zstd")
    assert run_world(3, W.load_model_fsdp, path, ref, 37)[0] == []
    m = W.build_model(5, 37)  # one process, no process group
    shardckpt.load_model(m, path)
    expect = torch.load(ref, weights_only=True)["model"]
    for k, v in m.state_dict().items():
        assert torch.equal(v, expect[k]), k
