"""In-process tests of TrainState, the seeding helpers and ResumableLoader."""

from __future__ import annotations

import random
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import shardckpt
from shardckpt.training.data_position import ResumableLoader, resharded_indices
from shardckpt.training.seed import derive_seed, make_generator, seed_worker, set_seed
from shardckpt.training.train_state import (
    RestoreMismatchError,
    TrainState,
    _rng_state,
    _set_rng_state,
)

pytestmark = pytest.mark.filterwarnings("ignore:.*native codec extension not built.*")


class CountingData(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.fetched.append(i)
        return i


def _draws() -> tuple:
    return (random.random(), float(np.random.rand()), torch.rand(3))


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Dropout(0.5), torch.nn.Linear(6, 2))


def _plain_leaves(obj: object, path: str = "") -> list[str]:
    """Paths of leaves that are neither tensors nor plain Python values."""
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _plain_leaves(v, f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _plain_leaves(v, f"{path}[{i}]")]
    if isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        return []
    return [f"{path}: {type(obj).__name__}"]


def test_rng_state_roundtrip_restores_every_generator() -> None:
    set_seed(5)
    state = _rng_state()
    assert all(t.dtype == torch.uint8 for k, t in state.items() if k != "cuda")
    expected = _draws()
    set_seed(6)
    _set_rng_state(state)
    got = _draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_python_rng_with_cached_gauss_roundtrips() -> None:
    random.seed(1)
    random.gauss(0, 1)  # leaves a cached second Gaussian in the state
    np.random.seed(1)
    np.random.standard_normal()  # NumPy caches one too
    state = _rng_state()
    expected = (random.gauss(0, 1), np.random.standard_normal())
    random.seed(2)
    np.random.seed(2)
    _set_rng_state(state)
    assert (random.gauss(0, 1), np.random.standard_normal()) == expected


def test_set_seed_is_reproducible_and_deterministic_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    set_seed(11)
    a = _draws()
    set_seed(11)
    b = _draws()
    assert a[:2] == b[:2] and torch.equal(a[2], b[2])
    monkeypatch.delenv("PYTHONHASHSEED", raising=False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        with pytest.warns(RuntimeWarning, match="PYTHONHASHSEED"):
            set_seed(11, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]


def test_make_generator_and_seed_worker() -> None:
    assert torch.equal(torch.rand(4, generator=make_generator(3)),
                       torch.rand(4, generator=make_generator(3)))
    assert not torch.equal(torch.rand(4, generator=make_generator(3, rank=0)),
                           torch.rand(4, generator=make_generator(3, rank=1)))
    assert derive_seed(3, 0) != derive_seed(3, 1)
    torch.manual_seed(123)  # what a DataLoader worker sees: base_seed + worker_id
    seed_worker(0)
    first = (random.random(), float(np.random.rand()))
    torch.manual_seed(123)
    seed_worker(0)
    assert (random.random(), float(np.random.rand())) == first


def test_train_state_roundtrip_through_shardckpt(tmp_path) -> None:
    set_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    ts = TrainState(model, opt, sched, scaler, extra={"tag": "run-a", "ema": torch.ones(3)})
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
        ts.step += 1
    scaler.scale(torch.tensor(1.0))  # initialises the scale lazily
    scaler.update(new_scale=64.0)
    ts.epoch = 2
    ts.update_best(0.5)
    ts.update_best(0.7)  # worse under "min": ignored
    ts.extra["ema"] = torch.full((3,), 7.0)
    ts.extra["history"] = [1, 2.5, {"a": None}]
    sd = ts.state_dict()
    assert _plain_leaves(sd) == []
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in sd["model"])
    shardckpt.save({"train": ts}, tmp_path / "ck")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    after_save = _draws()

    set_seed(1)
    model2 = _model()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.9)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.1)
    scaler2 = torch.amp.GradScaler("cpu")
    ts2 = TrainState(model2, opt2, sched2, scaler2, extra={"ema": torch.zeros(3)})
    shardckpt.load({"train": ts2}, tmp_path / "ck")
    assert (ts2.step, ts2.epoch, ts2.best_metric) == (3, 2, 0.5)
    assert ts2.extra["tag"] == "run-a" and ts2.extra["history"] == [1, 2.5, {"a": None}]
    assert torch.equal(ts2.extra["ema"], torch.full((3,), 7.0))
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3
    assert scaler2.get_scale() == 64.0
    for k, v in model2.state_dict().items():
        assert torch.equal(v, expected[k])
    for p, q in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    got = _draws()  # the RNG continues exactly where the saving process was
    assert got[:2] == after_save[:2] and torch.equal(got[2], after_save[2])
    meta = ts2.loaded_meta
    assert meta["world_size"] == 1 and meta["torch_version"] == str(torch.__version__)
    assert meta["base_seed"] == 0 and meta["shardckpt_version"]


def test_compiled_module_keys_have_no_prefix() -> None:
    model = _model()
    ts = TrainState(torch.compile(model), optimizer=None)
    assert set(ts.state_dict()["model"]) == set(model.state_dict())


def test_extra_must_be_json_or_tensor() -> None:
    ts = TrainState(_model(), extra={"bad": object()})
    with pytest.raises(TypeError, match="JSON"):
        ts.state_dict()


def test_resumable_loader_skips_without_loading_and_continues() -> None:
    data = CountingData(20)
    rl = ResumableLoader(DataLoader(data, batch_size=3, shuffle=True, generator=make_generator(4)))
    seen: list[list[int]] = []
    for b in rl:
        seen.append(b.tolist())
        if len(seen) == 3:
            break
    pos, gen = rl.position(), rl.generator_state()
    rest_expected = [b.tolist() for b in rl]  # re-entering continues the same epoch
    assert rl.epoch == 1 and len(seen) + len(rest_expected) == 7
    assert sorted(i for b in seen + rest_expected for i in b) == list(range(20))
    next_epoch = [b.tolist() for b in rl]

    data2 = CountingData(20)
    rl2 = ResumableLoader(DataLoader(data2, batch_size=3, shuffle=True,
                                     generator=make_generator(999)))
    rl2.load_position(pos, gen)
    assert len(rl2) == 4
    assert [b.tolist() for b in rl2] == rest_expected
    assert sorted(data2.fetched) == sorted(i for b in rest_expected for i in b)
    assert [b.tolist() for b in rl2] == next_epoch


def test_resumable_loader_requires_generator_for_shuffle() -> None:
    with pytest.raises(ValueError, match="generator"):
        ResumableLoader(DataLoader(CountingData(4), batch_size=2, shuffle=True))


@pytest.mark.parametrize("old,new", [(4, 2), (2, 4), (4, 3), (3, 1)])
def test_resharded_indices_cover_the_rest_of_the_epoch(old: int, new: int) -> None:
    data = CountingData(48)
    samplers = [DistributedSampler(data, num_replicas=old, rank=r, seed=1) for r in range(old)]
    for s in samplers:
        s.set_epoch(3)
    per_rank = 4
    consumed = [i for s in samplers for i in list(s)[:per_rank]]
    offset = old * per_rank
    rest = [resharded_indices(samplers[0], 3, offset, new, r) for r in range(new)]
    assert len({len(r) for r in rest}) == 1  # every rank gets as many samples
    counts = Counter(consumed + [i for r in rest for i in r])
    assert set(counts) == set(range(48))
    if (48 - offset) % new == 0:
        assert set(counts.values()) == {1}
    # Same world size: identical to what DistributedSampler would have produced.
    same = resharded_indices(samplers[0], 3, offset, old, 1)
    assert same == list(samplers[1])[per_rank:]


def test_verify_after_restore() -> None:
    ts = TrainState(_model())
    assert ts.verify_after_restore(lambda: torch.tensor(1.0), 1.0) == 1.0
    with pytest.raises(RestoreMismatchError, match="expected"):
        ts.verify_after_restore(lambda: 1.1, 1.0, rtol=1e-3)
    with pytest.warns(RuntimeWarning, match="expected"):
        ts.verify_after_restore(lambda: 1.1, 1.0, rtol=1e-3, on_mismatch="warn")
    assert ts.verify_after_restore(lambda: 1.0005, 1.0, rtol=1e-3) == 1.0005


def test_new_rank_policy_and_prepare_load() -> None:
    set_seed(21)
    ts = TrainState(_model())
    saved = ts.state_dict()
    assert "__rank0__" in saved
    # A checkpoint whose rank-local keys belong to other ranks: rank 0 must not ask.
    assert ts.prepare_load(["train.__rank3__.rng.torch", "train.meta.world_size"]) == {3}
    placeholder = ts.state_dict()
    assert not any(k.startswith("__rank") for k in placeholder)
    placeholder["meta"] = dict(saved["meta"], world_size=4)
    with pytest.warns(RuntimeWarning, match="not be bitwise identical"):
        ts.load_state_dict(placeholder)
    draws = _draws()
    torch.manual_seed(derive_seed(21, 0))
    assert torch.equal(draws[2], torch.rand(3))  # rank 0 derived its seed from base + rank
    assert "__rank0__" in ts.state_dict()  # the hint applies to one load only


def test_train_state_epoch_without_loader() -> None:
    ts = TrainState(_model())
    ts.epoch = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = ts.state_dict()
    assert sd["progress"]["epoch"] == 4 and "data" not in sd


def _branchy(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"used": torch.nn.Linear(4, 4), "idle": torch.nn.Linear(4, 4)})
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _steps(model, opt, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        opt.zero_grad()
        model["used"](torch.randn(3, 4, generator=g)).pow(2).sum().backward()  # idle: no grad
        opt.step()


def test_a_parameter_without_optimizer_state_resumes_exactly(tmp_path) -> None:
    # An unused branch (an idle expert, a head not trained yet) has no optimizer state: the
    # restore asked for it and raised MissingKeysError (with a hint to rename another
    # parameter's moments onto it).
    ref, ref_opt = _branchy(0)
    _steps(ref, ref_opt, 3, seed=1)
    shardckpt.save(shardckpt.TrainState(ref, ref_opt), tmp_path / "ck")
    _steps(ref, ref_opt, 3, seed=2)
    model, opt = _branchy(5)
    shardckpt.load(shardckpt.TrainState(model, opt), tmp_path / "ck")
    assert len(opt.state) == 2 and all(p not in opt.state for p in model["idle"].parameters())
    _steps(model, opt, 3, seed=2)
    for (k, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k
    for p, q in zip(ref.parameters(), model.parameters()):
        assert (p in ref_opt.state) == (q in opt.state)
        if p in ref_opt.state:
            assert all(torch.equal(ref_opt.state[p][f], opt.state[q][f]) for f in ref_opt.state[p])


def test_an_optimizer_alone_loads_into_a_fresh_one(tmp_path) -> None:
    # A fresh optimizer's state_dict has no per-parameter entries: every saved moment was
    # "unexpected" (strict) or silently dropped (strict=False).
    model, opt = _branchy(0)
    _steps(model, opt, 2, seed=1)
    shardckpt.save(opt, tmp_path / "opt")
    fresh = torch.optim.AdamW(model.parameters(), lr=5.0)
    rep = shardckpt.load(fresh, tmp_path / "opt")
    assert rep.unexpected == [] and fresh.param_groups[0]["lr"] == 1e-2
    assert set(fresh.state) == set(opt.state)  # the idle branch still has none
    for p, st in opt.state.items():
        assert all(torch.equal(st[f], fresh.state[p][f]) for f in st)


def test_a_sampler_of_another_kind_restarts_the_open_epoch_and_says_so() -> None:
    # The position of a DistributedSampler applied to a plain sampler's order skipped
    # samples while the warning said the run continued with the ones not yet consumed.
    data = CountingData(24)
    rl = ResumableLoader(DataLoader(data, batch_size=4, sampler=DistributedSampler(
        data, num_replicas=2, rank=0, seed=1)))
    for i, _ in enumerate(rl):
        if i == 1:
            break
    pos, gen = rl.position(), rl.generator_state()
    rl2 = ResumableLoader(DataLoader(CountingData(24), batch_size=4, shuffle=True,
                                     generator=make_generator(3)))
    with pytest.warns(RuntimeWarning, match="restarts from its beginning"):
        assert rl2.load_position(pos, gen)
    assert sorted(i for b in rl2 for i in b.tolist()) == list(range(24))  # nothing skipped


def test_a_load_that_never_happened_does_not_shape_the_next_save(tmp_path) -> None:
    # prepare_load's filter belongs to one load's state_dict(): if that load fails, the
    # next save must still hold every parameter's state.
    model, opt = _branchy(0)
    _steps(model, opt, 1, seed=1)
    shardckpt.save(shardckpt.TrainState(model, opt), tmp_path / "ck")  # idle: no state
    opt.zero_grad()
    (model["used"](torch.ones(1, 4)).sum() + model["idle"](torch.ones(1, 4)).sum()).backward()
    opt.step()  # now idle has state too
    ts = shardckpt.TrainState(model, opt)
    ts.prepare_load(tmp_path / "ck")
    assert len(ts.state_dict()["optim"]["state"]) == 2  # the load's view: what ck holds
    assert len(ts.state_dict()["optim"]["state"]) == 4  # a save's: everything
