"""Export for inference (model-only, Hugging Face safetensors layout) and HF import.

Every safetensors file written is opened with the `safetensors` library
(`safe_open`), the reader other tools use, not with shardckpt's own code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import shardckpt
from shardckpt.errors import NotACheckpointError
from shardckpt.io.reader import read_manifest
from shardckpt.tools.convert import convert
from shardckpt.tools.hf import parse_size, shard_plan


def read_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor and the metadata of one file, through the safetensors library."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def read_st_dir(d: Path) -> dict[str, torch.Tensor]:
    """An HF directory as from_pretrained sees it: the index's files, or model.safetensors."""
    index = d / "model.safetensors.index.json"
    if not index.exists():
        tensors, meta = read_st(d / "model.safetensors")
        assert meta.get("format") == "pt"
        return tensors
    wm = json.loads(index.read_text())["weight_map"]
    out: dict[str, torch.Tensor] = {}
    for name in sorted(set(wm.values())):
        tensors, meta = read_st(d / name)
        assert meta.get("format") == "pt", name
        assert all(wm[k] == name for k in tensors), name
        out.update(tensors)
    assert sorted(out) == sorted(wm)
    return out


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


def _trained_ts(model: nn.Module) -> shardckpt.TrainState:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 6)).square().mean().backward()
    opt.step()
    ts = shardckpt.TrainState(model=model, optimizer=opt)
    ts.step = 3
    return ts


# ---------------------------------------------------------------- transformers


def _bert():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, vocab_size=100)
    torch.manual_seed(0)
    return transformers, cfg, transformers.BertModel(cfg)


@pytest.mark.parametrize("shard", [None, "20KB"])
def test_trainstate_to_hf_dir_loads_with_from_pretrained(tmp_path: Path, shard: str | None):
    transformers, cfg, bert = _bert()
    ts = _trained_ts_bert(bert)  # a real optimizer step: weights differ from the init
    ref = {k: v.clone() for k, v in bert.state_dict().items()}
    shardckpt.save({"train": ts}, tmp_path / "ck")

    out = tmp_path / "hf"
    r = convert(tmp_path / "ck", out, "safetensors", model_only=True, max_shard_size=shard)
    assert r["tensors"] == len(ref) and r["objects"] == 0
    assert any(k.startswith("train.optim.") for k in r["dropped"])
    assert any("__rank0__" in k for k in r["dropped"])
    assert "train.progress.step" in r["dropped"] and "train.meta.world_size" in r["dropped"]
    if shard is None:
        assert r["files"] == ["model.safetensors"]
    else:
        assert len(r["files"]) > 2 and r["files"][-1] == "model.safetensors.index.json"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                      for v in ref.values())
        n = len(r["files"]) - 1
        assert r["files"][:-1] == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                   for i in range(1, n + 1)]
        for name in r["files"][:-1]:
            tensors, _ = read_st(out / name)
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            assert size <= 20_000 or len(tensors) == 1, name  # only a big tensor overflows
    assert sorted(os.listdir(out)) == sorted(r["files"])
    got = read_st_dir(out)
    assert sorted(got) == sorted(ref)
    assert all(bitwise(got[k], ref[k]) for k in ref)

    cfg.to_json_file(str(out / "config.json"))  # the user's config beside the weights
    loaded, info = transformers.BertModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    sd = loaded.state_dict()
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert bitwise(sd[k], v), k


def _trained_ts_bert(bert: nn.Module) -> shardckpt.TrainState:
    opt = torch.optim.AdamW(bert.parameters(), lr=1e-2)
    ids = torch.randint(0, 100, (2, 7))
    bert(input_ids=ids).last_hidden_state.square().mean().backward()
    opt.step()
    return shardckpt.TrainState(model=bert, optimizer=opt)


def test_hf_directory_imports_to_shardckpt(tmp_path: Path):
    _, _, bert = _bert()
    ref = bert.state_dict()
    for shard, name in (("10KB", "sharded"), ("1GB", "single")):
        hf = tmp_path / name
        bert.save_pretrained(str(hf), max_shard_size=shard, safe_serialization=True)
        sharded = (hf / "model.safetensors.index.json").exists()
        assert sharded == (name == "sharded")
        out = tmp_path / f"{name}_ck"
        r = convert(hf, out, "shardckpt")
        assert r["source_format"] == "safetensors"
        reader = shardckpt.ShardReader(str(out))
        keys = set(read_manifest(str(out)).tensors)
        expect = read_st_dir(hf)  # keys as in the files
        assert keys == set(expect)
        for k, v in expect.items():
            assert bitwise(reader.read_region(k), v), k
            assert bitwise(v, ref[k]), k
        # and back out to HF, bitwise
        back = tmp_path / f"{name}_back"
        convert(out, back, "safetensors", model_only=True, max_shard_size=shard)
        again = read_st_dir(back)
        assert sorted(again) == sorted(expect)
        assert all(bitwise(again[k], expect[k]) for k in expect)


# ---------------------------------------------------------------- model_only layouts


@pytest.mark.parametrize("layout", ["trainstate_any_key", "trainstate_alone", "module_alone",
                                    "ddp_plain", "compiled_in_dict", "model_and_optim_dict"])
def test_model_only_finds_the_model_in_any_layout(tmp_path: Path, layout: str):
    m = _mlp()
    ts = _trained_ts(m)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    sd = m.state_dict()
    state = {
        "trainstate_any_key": lambda: {"run_a": ts, "note": torch.ones(2)},
        "trainstate_alone": lambda: ts,
        "module_alone": lambda: m,
        "ddp_plain": lambda: {f"module.{k}": v for k, v in sd.items()},
        "compiled_in_dict": lambda: {"model": {f"_orig_mod.{k}": v for k, v in sd.items()},
                                     "optim": ts.optimizer.state_dict(), "epoch": 4},
        "model_and_optim_dict": lambda: {"model": sd, "optimizer": ts.optimizer.state_dict()},
    }[layout]()
    shardckpt.save(state, tmp_path / "ck")
    r = convert(tmp_path / "ck", tmp_path / "w.safetensors", "safetensors", model_only=True)
    got, meta = read_st(tmp_path / "w.safetensors")
    assert meta == {"format": "pt"}  # only tensors: no shardckpt objects in the header
    assert sorted(got) == sorted(ref), layout
    assert all(bitwise(got[k], ref[k]) for k in ref)
    assert r["files"] == ["w.safetensors"] and r["tensors"] == len(ref)
    stored = read_manifest(str(tmp_path / "ck")).keys()
    assert len(r["dropped"]) == len(stored) - len(ref) and set(r["dropped"]) <= set(stored)


def test_submodule_named_model_is_kept(tmp_path: Path):
    """A plain HF-style state (`model.layers.*` next to `lm_head`) is all model."""
    state = {"model.embed.weight": torch.randn(5, 4), "model.layers.0.weight": torch.randn(4, 4),
             "lm_head.weight": torch.randn(5, 4)}
    shardckpt.save(state, tmp_path / "plain")
    convert(tmp_path / "plain", tmp_path / "a.safetensors", "safetensors", model_only=True)
    assert sorted(read_st(tmp_path / "a.safetensors")[0]) == sorted(state)
    # the same model saved as a Module: "model." is shardckpt's key for it, stripped once
    shardckpt.save({"model": state}, tmp_path / "keyed")
    convert(tmp_path / "keyed", tmp_path / "b.safetensors", "safetensors", model_only=True)
    got = read_st(tmp_path / "b.safetensors")[0]
    assert sorted(got) == sorted(state)
    assert all(bitwise(got[k], v) for k, v in state.items())


def test_two_trainstates_need_a_choice(tmp_path: Path):
    a, b = _trained_ts(_mlp(0)), _trained_ts(_mlp(1))
    shardckpt.save({"gen": a, "disc": b}, tmp_path / "ck")
    with pytest.raises(ValueError, match="several models"):
        convert(tmp_path / "ck", tmp_path / "x.safetensors", "safetensors", model_only=True)
    convert(tmp_path / "ck", tmp_path / "x.safetensors", "safetensors", model_only=True,
            strip_prefix=["disc.model."])
    got = read_st(tmp_path / "x.safetensors")[0]
    assert all(bitwise(got[k], v) for k, v in b.model.state_dict().items())


def test_include_exclude_dtype(tmp_path: Path):
    torch.manual_seed(0)
    state = {"enc.0.weight": torch.randn(8, 4), "enc.0.bias": torch.randn(8),
             "enc.1.weight": torch.randn(8, 8, dtype=torch.float64),
             "head.weight": torch.randn(2, 8), "enc.steps": torch.arange(5),
             "enc.mask": torch.tensor([True, False])}
    shardckpt.save(state, tmp_path / "ck")
    r = convert(tmp_path / "ck", tmp_path / "out", "safetensors", include=["enc.*"],
                exclude="*.bias", dtype="bfloat16")
    got = read_st_dir(tmp_path / "out")
    assert sorted(got) == ["enc.0.weight", "enc.1.weight", "enc.mask", "enc.steps"]
    assert sorted(r["dropped"]) == ["enc.0.bias", "head.weight"]
    for k, v in got.items():
        want = state[k].to(torch.bfloat16) if state[k].is_floating_point() else state[k]
        assert bitwise(v, want), k
    # with model_only: globs see the output (model) names, not the checkpoint's
    ts = _trained_ts(_mlp())
    shardckpt.save({"train": ts}, tmp_path / "ts")
    r = convert(tmp_path / "ts", tmp_path / "w.safetensors", "safetensors", model_only=True,
                include="3.*", dtype=torch.float16)
    got = read_st(tmp_path / "w.safetensors")[0]
    assert sorted(got) == ["3.bias", "3.weight"]
    assert bitwise(got["3.weight"], ts.model.state_dict()["3.weight"].half())
    assert "train.model.0.weight" in r["dropped"]
    with pytest.raises(ValueError, match="no keys left"):
        convert(tmp_path / "ck", tmp_path / "none", "safetensors", include="nothing*")
    with pytest.raises(ValueError, match="floating"):
        convert(tmp_path / "ck", tmp_path / "none", "safetensors", dtype="int8")


def test_dtype_cast_streams_to_every_target(tmp_path: Path):
    state = {"w": torch.randn(300, 7), "n": torch.arange(3)}
    shardckpt.save(state, tmp_path / "ck")
    convert(tmp_path / "ck", tmp_path / "bf", "shardckpt", dtype="bfloat16", slab_bytes=512)
    rd = shardckpt.ShardReader(str(tmp_path / "bf"))
    assert bitwise(rd.read_region("w"), state["w"].bfloat16())
    assert bitwise(rd.read_region("n"), state["n"])
    convert(tmp_path / "ck", tmp_path / "bf.pt", "torch", dtype="float16")
    assert bitwise(torch.load(tmp_path / "bf.pt", weights_only=True)["w"], state["w"].half())


# ---------------------------------------------------------------- layout and files


def test_sharding_rule_and_sizes():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 << 20
    assert parse_size(123) == 123 and parse_size("1.5KB") == 1500
    with pytest.raises(ValueError):
        parse_size("lots")
    f32 = torch.float32
    specs = [("a", f32, (3,), 12), ("b", f32, (5,), 20), ("c", f32, (1,), 4), ("d", f32, (9,), 36)]
    plan = shard_plan(specs, 32)
    # a+b fill 32 exactly; d is larger than the limit and gets a shard of its own
    assert [[s[0] for s in sh] for sh in plan] == [["a", "b"], ["c"], ["d"]]


def test_existing_directory_keeps_user_files_and_replaces_only_with_overwrite(tmp_path: Path):
    state = {f"l{i}.weight": torch.randn(64, 64) for i in range(4)}
    shardckpt.save(state, tmp_path / "ck")
    out = tmp_path / "model_dir"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "tokenizer.json").write_text("{}")
    r = convert(tmp_path / "ck", out, "safetensors", max_shard_size="20KB")
    assert len(r["files"]) == 5
    assert sorted(os.listdir(out)) == sorted(r["files"] + ["config.json", "tokenizer.json"])
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(tmp_path / "ck", out, "safetensors")
    # now one file: the four old shards and the index go, the user's files stay
    r = convert(tmp_path / "ck", out, "safetensors", overwrite=True)
    assert r["files"] == ["model.safetensors"]
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    got = read_st_dir(out)
    assert all(bitwise(got[k], v) for k, v in state.items())


def test_single_file_target_and_its_limit(tmp_path: Path):
    state = {"a": torch.randn(100, 10), "b": torch.randn(10)}
    shardckpt.save(state, tmp_path / "ck")
    with pytest.raises(ValueError, match="one file"):
        convert(tmp_path / "ck", tmp_path / "m.safetensors", "safetensors", max_shard_size=1000)
    assert not (tmp_path / "m.safetensors").exists()
    r = convert(tmp_path / "ck", tmp_path / "m.safetensors", "safetensors", max_shard_size="1MB")
    assert r["files"] == ["m.safetensors"]
    got, meta = read_st(tmp_path / "m.safetensors")
    assert meta["format"] == "pt" and all(bitwise(got[k], v) for k, v in state.items())


def test_objects_round_trip_through_a_sharded_directory(tmp_path: Path):
    """Not model-only: JSON objects and nesting travel in the first shard's header."""
    state = {"model": {"w": torch.randn(40, 40), "v": torch.randn(40, 40)},
             "step": 7, "cfg": {"lr": 0.1, "name": "x"}}
    shardckpt.save(state, tmp_path / "ck")
    r = convert(tmp_path / "ck", tmp_path / "d", "safetensors", max_shard_size="8KB")
    assert len(r["files"]) == 3 and r["objects"] == 3
    read_st_dir(tmp_path / "d")  # valid for the library
    convert(tmp_path / "d", tmp_path / "back", "shardckpt")
    got = {"model": {"w": torch.zeros(40, 40), "v": torch.zeros(40, 40)}, "step": 0,
           "cfg": {"lr": 0.0, "name": ""}}
    shardckpt.load(got, tmp_path / "back")
    assert got["step"] == 7 and got["cfg"] == {"lr": 0.1, "name": "x"}
    assert bitwise(got["model"]["w"], state["model"]["w"])


def test_index_must_name_files_beside_it_and_agree_with_them(tmp_path: Path):
    state = {f"t{i}": torch.randn(32, 32) for i in range(3)}
    shardckpt.save(state, tmp_path / "ck")
    d = tmp_path / "d"
    convert(tmp_path / "ck", d, "safetensors", max_shard_size="5KB")
    index = d / "model.safetensors.index.json"
    good = json.loads(index.read_text())
    bad = dict(good, weight_map=dict(good["weight_map"], t0="../model-00001-of-00003.safetensors"))
    index.write_text(json.dumps(bad))
    with pytest.raises(NotACheckpointError, match="outside"):
        convert(d, tmp_path / "x", "shardckpt")
    wrong = dict(good, weight_map=dict(good["weight_map"], t0=good["weight_map"]["t1"]))
    index.write_text(json.dumps(wrong))
    with pytest.raises(NotACheckpointError, match="does not hold"):
        convert(d, tmp_path / "x", "shardckpt")


def test_hf_source_reads_row_slabs_through_the_library(tmp_path: Path):
    """Streaming import: rows come from safetensors' get_slice, slab by slab."""
    from shardckpt.tools.external import SafetensorsSource

    w = torch.randn(1000, 33)
    shardckpt.save({"w": w, "s": torch.tensor(2.5)}, tmp_path / "ck")
    convert(tmp_path / "ck", tmp_path / "m.safetensors", "safetensors")
    with SafetensorsSource(str(tmp_path / "m.safetensors")) as src:
        assert bitwise(src.read_rows("w", 10, 20), w[10:20])
        assert bitwise(src.read_rows("s"), torch.tensor(2.5))
    convert(tmp_path / "m.safetensors", tmp_path / "back", "shardckpt", slab_bytes=1000)
    assert bitwise(shardckpt.ShardReader(str(tmp_path / "back")).read_region("w"), w)
