"""Import of conventional torch.save training checkpoints into the TrainState layout."""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from torch import nn

import shardckpt
from shardckpt.io.reader import read_manifest
from shardckpt.tools.convert import convert
from shardckpt.tools.legacy import import_train_state

STEPS = 5


def build() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    # BatchNorm: float buffers between parameters; Dropout: the torch RNG matters.
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched,
               gen: torch.Generator) -> None:
    x = torch.randn(8, 6, generator=gen)
    y = torch.randn(8, 3, generator=gen)
    opt.zero_grad()
    (model(x) - y).square().mean().backward()
    opt.step()
    sched.step()


def bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@pytest.fixture
def run(tmp_path: Path):
    """A real training run, saved the conventional way after STEPS steps."""
    model, opt, sched = build()
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        train_step(model, opt, sched, gen)
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    ckpt = {
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": opt.state_dict(),
        "scheduler_state_dict": sched.state_dict(),
        "epoch": 2,
        "global_step": STEPS,
        "best_loss": torch.tensor(0.125),
        "rng_state": torch.get_rng_state(),
        "numpy_rng_state": np.random.get_state(),
        "python_rng_state": random.getstate(),
    }
    path = tmp_path / "legacy.pt"
    torch.save(ckpt, path)
    return path, model, opt, sched, gen


def test_resume_from_a_conventional_checkpoint_is_exact(run, tmp_path: Path):
    path, model, opt, sched, gen = run
    out = tmp_path / "ck"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unplaced: no warning
        r = convert(path, out, "shardckpt", train_state=True)
    assert r["unplaced"] == [] and r["source_format"] == "torch"
    keys = read_manifest(str(out)).keys()
    assert "train.optim.state.0.weight.exp_avg" in keys
    assert "train.optim.param_groups.0.params" in keys and "train.progress.step" in keys
    assert not any("running_mean" in k and "optim" in k for k in keys)

    # What the original run does next (RNG draws, then one more step), from the RNG
    # states it saved (whatever drew from the global RNGs since: a plugin reseeding them).
    legacy = torch.load(path, weights_only=False)
    random.setstate(legacy["python_rng_state"])
    np.random.set_state(legacy["numpy_rng_state"])
    torch.set_rng_state(legacy["rng_state"])
    gen_state = gen.get_state()
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(5), np.random.seed(6), torch.manual_seed(7)  # back to the saved RNG
    train_step(model, opt, sched, gen)

    m2, o2, s2 = build()
    ts = shardckpt.TrainState(model=m2, optimizer=o2, scheduler=s2)
    shardckpt.load({"train": ts}, out)
    assert ts.step == STEPS and ts.epoch == 2 and ts.best_metric == 0.125
    assert (random.random(), float(np.random.rand())) == draws[:2]
    assert bitwise(torch.rand(3), draws[2])
    torch.manual_seed(7)  # undo the check's draw; the original continued from the saved RNG

    saved = torch.load(path, weights_only=False)
    for k, v in saved["model_state_dict"].items():
        assert bitwise(m2.state_dict()[k], v), k
    names = [n for n, _ in m2.named_parameters()]
    for i, n in enumerate(names):
        got = o2.state[dict(m2.named_parameters())[n]]
        want = saved["optimizer_state_dict"]["state"][i]
        for moment in ("exp_avg", "exp_avg_sq", "step"):
            assert bitwise(got[moment], want[moment]), (n, moment)
    assert s2.last_epoch == saved["scheduler_state_dict"]["last_epoch"]
    assert s2.get_last_lr() == saved["scheduler_state_dict"]["_last_lr"]
    assert o2.param_groups[0]["lr"] == saved["optimizer_state_dict"]["param_groups"][0]["lr"]

    # One more step from the import == one more step of the original run.
    train_step(m2, o2, s2, torch.Generator().set_state(gen_state))
    for (k, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert bitwise(a, b), k
    assert s2.get_last_lr() == sched.get_last_lr()


def test_same_layout_as_trainstate_writes(run, tmp_path: Path):
    path, model, opt, sched, _ = run
    convert(path, tmp_path / "imported", "shardckpt", train_state=True)
    ts = shardckpt.TrainState(model=model, optimizer=opt, scheduler=sched)
    shardckpt.save({"train": ts}, tmp_path / "native")
    a = read_manifest(str(tmp_path / "imported"))
    b = read_manifest(str(tmp_path / "native"))
    assert sorted(a.keys()) == sorted(b.keys())
    for k, t in b.tensors.items():
        assert (a.tensors[k].dtype, a.tensors[k].shape) == (t.dtype, t.shape), k


def test_unknown_keys_are_reported_not_dropped_silently(run, tmp_path: Path):
    path, *_ = run
    ck = torch.load(path, weights_only=False)
    ck["my_custom_counter"] = 17
    ck["step"] = 99  # a second step key: "step" is taken first, global_step reported
    torch.save(ck, tmp_path / "extra.pt")
    with pytest.warns(RuntimeWarning, match="my_custom_counter"):
        r = convert(tmp_path / "extra.pt", tmp_path / "ck", "shardckpt", train_state=True)
    assert r["unplaced"] == ["global_step", "my_custom_counter"]
    assert read_manifest(str(tmp_path / "ck")).user_metadata["unplaced"] == r["unplaced"]


def test_optimizer_that_does_not_match_the_model_is_unplaced(run, tmp_path: Path):
    path, *_ = run
    ck = torch.load(path, weights_only=False)
    other = nn.Linear(2, 2)
    o = torch.optim.Adam(other.parameters())
    other(torch.randn(1, 2)).sum().backward()
    o.step()
    ck["optimizer_state_dict"] = o.state_dict()
    torch.save(ck, tmp_path / "bad.pt")
    with pytest.warns(RuntimeWarning, match="optimizer_state_dict"):
        r = convert(tmp_path / "bad.pt", tmp_path / "ck", "shardckpt", train_state=True)
    assert r["unplaced"] == ["optimizer_state_dict"]
    assert not any(".optim." in k for k in read_manifest(str(tmp_path / "ck")).keys())


def test_ddp_prefix_two_groups_and_partial_rng(tmp_path: Path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                           {"params": list(model[1].parameters()) + list(model[2].parameters())}],
                          lr=0.01, momentum=0.9)
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    ck = {"model": {f"module.{k}": v for k, v in model.state_dict().items()},
          "optimizer": opt.state_dict(), "iteration": 3, "torch_rng_state": torch.get_rng_state()}
    imp = import_train_state(ck)
    ts = imp.state["train"]
    assert sorted(ts["model"]) == sorted(model.state_dict())  # module. stripped
    groups = ts["optim"]["param_groups"]
    assert groups[0]["params"] == ["0.weight", "0.bias"] and groups[0]["lr"] == 0.1
    assert groups[1]["params"] == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert bitwise(ts["optim"]["state"]["2.weight"]["momentum_buffer"],
                   opt.state[model[2].weight]["momentum_buffer"])
    assert ts["progress"]["step"] == 3
    assert "__rank0__" not in ts and "torch_rng_state" in imp.unplaced  # torch RNG alone

    torch.save(ck, tmp_path / "ddp.pt")
    with pytest.warns(RuntimeWarning, match="RNG incomplete"):
        convert(tmp_path / "ddp.pt", tmp_path / "ck", "shardckpt", train_state=True)
    m2 = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    o2 = torch.optim.SGD([{"params": m2[0].parameters(), "lr": 0.1},
                          {"params": list(m2[1].parameters()) + list(m2[2].parameters())}],
                         lr=0.01, momentum=0.9)
    ts2 = shardckpt.TrainState(model=m2, optimizer=o2)
    shardckpt.load({"train": ts2}, tmp_path / "ck")  # no RNG saved: reseeds, loads
    assert ts2.step == 3
    assert bitwise(o2.state[m2[1].bias]["momentum_buffer"],
                   opt.state[model[1].bias]["momentum_buffer"])


def test_trained_import_exports_model_only(run, tmp_path: Path):
    """legacy.pt -> model-only safetensors in one call."""
    path, model, *_ = run
    convert(path, tmp_path / "m.safetensors", "safetensors", train_state=True, model_only=True)
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert sorted(got) == sorted(model.state_dict())
    assert all(bitwise(got[k], v) for k, v in model.state_dict().items())


_RAN: list[str] = []


def _mark(what: str) -> str:
    _RAN.append(what)
    return what


class Payload:
    """What a malicious checkpoint carries: unpickling it calls a function."""

    def __reduce__(self):
        return (_mark, ("payload ran",))


def test_pickle_payload_needs_trust_pickle(run, tmp_path: Path):
    path, *_ = run
    ck = torch.load(path, weights_only=False)
    ck["hook"] = Payload()
    torch.save(ck, tmp_path / "evil.pt")
    _RAN.clear()
    with pytest.raises(shardckpt.UnsafeObjectError, match="trust-pickle"):
        convert(tmp_path / "evil.pt", tmp_path / "ck", "shardckpt", train_state=True)
    with pytest.raises(shardckpt.UnsafeObjectError):
        convert(tmp_path / "evil.pt", tmp_path / "ck2", "shardckpt")  # plain conversion too
    assert _RAN == [] and not (tmp_path / "ck").exists()
    with pytest.warns(RuntimeWarning, match="hook"):
        r = convert(tmp_path / "evil.pt", tmp_path / "ck", "shardckpt", train_state=True,
                    trust_pickle=True)
    assert _RAN == ["payload ran"] and r["unplaced"] == ["hook"]


def test_parameter_order_skips_tied_weights_and_refuses_ambiguity():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.proj = nn.Linear(4, 4)
            self.head = nn.Linear(4, 5, bias=False)
            self.head.weight = self.emb.weight  # tied: one parameter, two state-dict keys
            self.register_buffer("scale", torch.ones(4))  # an unnamed float buffer

    torch.manual_seed(0)
    m = Tied()
    opt = torch.optim.Adam(m.parameters())
    m.head(m.proj(m.emb(torch.tensor([1, 2])))).sum().backward()
    opt.step()
    assert [n for n, _ in m.named_parameters()] == ["emb.weight", "proj.weight", "proj.bias"]
    # torch.save keeps the tie (shared storage), as a real checkpoint file would
    sd = {"model_state_dict": m.state_dict(), "optimizer_state_dict": opt.state_dict()}
    imp = import_train_state(sd)
    from shardckpt.tools.legacy import _param_candidates

    # state-dict order puts the module's own buffer first; the tie is listed once
    assert _param_candidates(sd["model_state_dict"]) == [
        "scale", "emb.weight", "proj.weight", "proj.bias"]
    # "scale" (4,) cannot be id 0 (state shape (5, 4)): the alignment skips it
    assert imp.unplaced == {}
    assert imp.state["train"]["optim"]["param_groups"][0]["params"] == [
        "emb.weight", "proj.weight", "proj.bias"]
    # A buffer of the same shape BEFORE a parameter makes the order ambiguous: unplaced.
    amb = {"model_state_dict": {"a": torch.zeros(3), "b": torch.zeros(3), "c": torch.zeros(2)},
           "optimizer_state_dict": {"state": {0: {"exp_avg": torch.zeros(3)},
                                              1: {"exp_avg": torch.zeros(2)}},
                                    "param_groups": [{"lr": 1.0, "params": [0, 1]}]}}
    imp = import_train_state(amb)
    assert "do not align uniquely" in imp.unplaced["optimizer_state_dict"]
    assert "optim" not in imp.state["train"]
