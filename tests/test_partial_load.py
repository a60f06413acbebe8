"""Load only what you need (issue 14): include/exclude, load_model, strict=False reports and
the hints that say which strip_prefix / rename would make keys match."""

from __future__ import annotations

import warnings

import pytest
import torch

import shardckpt


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def ts_ckpt(tmp_path):
    m = _model(0)
    opt = torch.optim.AdamW(m.parameters())
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    ts = shardckpt.TrainState(model=m, optimizer=opt,
                              scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))
    ts.step = 9
    path = tmp_path / "ck"
    shardckpt.save({"train": ts}, path)
    return path, m, opt


def test_load_model_from_a_train_state_checkpoint_touches_nothing_else(ts_ckpt):
    path, m, _ = ts_ckpt
    m2 = _model(1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=0.5)
    rng = torch.get_rng_state()
    rep = shardckpt.load_model(m2, path)
    assert _same(m, m2)
    assert sorted(rep.loaded) == sorted(m2.state_dict()) and rep.missing == []
    assert opt2.state == {} and opt2.param_groups[0]["lr"] == 0.5
    assert torch.equal(torch.get_rng_state(), rng)  # the checkpoint's RNG was not applied


@pytest.mark.parametrize("layout", ["ddp", "compiled", "nested"])
def test_load_model_from_wrapped_layouts(tmp_path, layout):
    m = _model(0)
    prefix = {"ddp": "module.", "compiled": "_orig_mod.", "nested": "model.module._orig_mod."}
    shardckpt.save({f"{prefix[layout]}{k}": v for k, v in m.state_dict().items()}, tmp_path / "c")
    m2 = _model(1)
    shardckpt.load_model(m2, tmp_path / "c")
    assert _same(m, m2)
    m3 = torch.compile(_model(2))  # a compiled target model, too
    shardckpt.load_model(m3, tmp_path / "c")
    assert _same(m, m3._orig_mod)


def test_load_model_strict_names_missing_keys(tmp_path):
    m = _model(0)
    sd = {k: v for k, v in m.state_dict().items() if k != "2.bias"}
    shardckpt.save({"model": sd}, tmp_path / "c")
    with pytest.raises(shardckpt.MissingKeysError, match="'2.bias'"):
        shardckpt.load_model(_model(1), tmp_path / "c")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        rep = shardckpt.load_model(_model(1), tmp_path / "c", strict=False)
    assert rep.missing == ["2.bias"]
    with pytest.raises(shardckpt.MissingKeysError, match="none of the model"):
        shardckpt.load_model(torch.nn.ModuleDict({"enc": torch.nn.Linear(7, 7)}), tmp_path / "c")


def test_include_exclude_make_partial_loads_strict(ts_ckpt):
    path, m, opt = ts_ckpt
    m2 = _model(1)
    with pytest.raises(shardckpt.UnexpectedKeysError):
        shardckpt.load({"train": {"model": m2.state_dict()}}, path)
    sd = m2.state_dict()
    rep = shardckpt.load({"train": {"model": sd}}, path, include=["train.model.*"])
    m2.load_state_dict(sd)
    assert _same(m, m2) and rep.unexpected == []
    sd = _model(2).state_dict()
    rep = shardckpt.load({"train": {"model": sd}}, path,
                         exclude=["train.optim.*", "train.scheduler.*", "train.progress.*",
                                  "train.meta.*", "train.extra.*"])
    assert rep.unexpected == []
    # keys the state asks for must still be there
    with pytest.raises(shardckpt.MissingKeysError, match="train.model.nope"):
        shardckpt.load({"train": {"model": {"nope": torch.zeros(1)}}}, path,
                       include=["train.model.*"])


def test_strict_false_reports_and_warns(tmp_path):
    m = _model(0)
    shardckpt.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "c")
    m2 = _model(1)
    sd = m2.state_dict()
    with pytest.warns(UserWarning, match=r"NOTHING was loaded.*strip_prefix='module\.'"):
        rep = shardckpt.load(sd, tmp_path / "c", strict=False)
    assert rep.loaded == [] and sorted(rep.missing) == sorted(sd)
    assert sorted(rep.unexpected) == sorted(f"module.{k}" for k in sd)
    assert not _same(m, m2)
    sd["extra"] = torch.zeros(1)
    with pytest.warns(UserWarning, match=r"1 of 5 keys asked for are not in the checkpoint"):
        rep = shardckpt.load(sd, tmp_path / "c", strict=False, strip_prefix="module.")
    assert rep.missing == ["extra"] and len(rep.loaded) == 4


def test_missing_keys_error_says_which_mapping_would_match(tmp_path):
    m = _model(0)
    shardckpt.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "c")
    with pytest.raises(shardckpt.MissingKeysError, match=r"strip_prefix='module\.'"):
        shardckpt.load(_model(1).state_dict(), tmp_path / "c")
    with pytest.raises(shardckpt.MissingKeysError, match=r"rename=\{'\^module"):
        shardckpt.load({"model": _model(1).state_dict()}, tmp_path / "c")
    shardckpt.save(m.state_dict(), tmp_path / "plain")
    with pytest.raises(shardckpt.MissingKeysError, match=r"rename=\{'\^': 'module\.'\}"):
        shardckpt.load({f"module.{k}": v for k, v in _model(1).state_dict().items()},
                       tmp_path / "plain")


def test_load_model_refuses_to_guess_between_two_submodules_that_fit(tmp_path):
    # Linear(4, 4) fits both layer 0 and layer 2 of this Sequential: loading either one
    # silently (the shorter-prefix rule picked "0.") loads weights of the wrong layer.
    import torch.nn as nn

    from shardckpt.errors import StateMismatchError

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    shardckpt.save(seq, tmp_path / "seq")
    with pytest.raises(StateMismatchError, match="'model.0.', 'model.2.'"):
        shardckpt.load_model(nn.Linear(4, 4), tmp_path / "seq")
    one = nn.Sequential(nn.Linear(4, 4), nn.ReLU())  # one submodule fits: no guess needed
    shardckpt.save(one, tmp_path / "one")
    lin = nn.Linear(4, 4)
    shardckpt.load_model(lin, tmp_path / "one", strict=False)
    assert torch.equal(lin.weight, one[0].weight) and torch.equal(lin.bias, one[0].bias)


def test_excluded_keys_of_the_state_keep_their_values_whatever_their_shape(tmp_path):
    # Fine-tuning with a new head: exclude it, load the rest. Before, the checkpoint's
    # head still overwrote the new one (or a new shape raised ShapeMismatchError).
    import torch.nn as nn

    torch.manual_seed(0)
    old = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    shardckpt.save({"model": old.state_dict()}, tmp_path / "ck")
    for out in (3, 10):  # the same head shape, and a new one
        torch.manual_seed(1)
        new = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, out))
        head = [p.detach().clone() for p in new[2].parameters()]
        sd = new.state_dict()
        rep = shardckpt.load({"model": sd}, tmp_path / "ck", exclude=["model.2.*"])
        new.load_state_dict(sd)
        assert torch.equal(new[0].weight, old[0].weight) and torch.equal(new[0].bias, old[0].bias)
        assert all(torch.equal(a, b) for a, b in zip(new[2].parameters(), head))
        assert rep.missing == [] and rep.unexpected == [] and "model.2.weight" not in rep.loaded


def test_a_rename_that_sends_two_keys_to_one_is_a_typed_error(tmp_path):
    shardckpt.save({"model": {"a.weight": torch.ones(2), "a.bias": torch.ones(2)}}, tmp_path / "c")
    with pytest.raises(shardckpt.KeyMappingError, match="'model.a.weight' and 'model.a.bias'"):
        shardckpt.load({"model": {"x": torch.zeros(2)}}, tmp_path / "c",
                       rename={r"a\.(weight|bias)": "x"}, strict=False)
