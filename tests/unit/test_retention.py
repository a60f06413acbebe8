"""Retention policies (shardckpt/manager/retention.py) and metric handling."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import numpy as np
import pytest
import torch

from shardckpt.manager.retention import (
    AnyOf,
    BestN,
    EveryN,
    LastN,
    jsonable_metrics,
    metric_value,
    policy_for,
    retained_steps,
)

NAN = float("nan")
STEPS = [(30, None), (10, None), (50, None), (20, None), (40, None)]


# ------------------------------------------------------------------ LastN


@pytest.mark.parametrize("n,want", [
    (None, {10, 20, 30, 40, 50}), (0, set()), (1, {50}), (2, {40, 50}), (5, {10, 20, 30, 40, 50}),
    (9, {10, 20, 30, 40, 50}),
])
def test_last_n(n, want):
    assert LastN(n).keep(STEPS) == want


def test_last_n_of_nothing():
    assert LastN(3).keep([]) == set()
    assert LastN(None).keep([]) == set()


# ------------------------------------------------------------------ BestN

SCORED = [(1, 0.5), (2, 0.3), (3, 0.4), (4, None), (5, NAN), (6, 0.9)]


@pytest.mark.parametrize("mode,n,want", [
    ("min", 1, {2}), ("min", 2, {2, 3}), ("min", 3, {1, 2, 3}),
    ("max", 1, {6}), ("max", 2, {1, 6}), ("max", 3, {1, 3, 6}),
    ("min", 0, set()),
])
def test_best_n(mode, n, want):
    assert BestN(n, mode).keep(SCORED) == want
    assert BestN(n, mode).keep(list(reversed(SCORED))) == want


def test_best_n_default_mode_is_min():
    assert BestN(1).keep(SCORED) == {2}


def test_best_n_never_keeps_nan_or_missing():
    assert BestN(100, "min").keep(SCORED) == {1, 2, 3, 6}
    assert BestN(100, "max").keep(SCORED) == {1, 2, 3, 6}
    assert BestN(3).keep([(1, NAN), (2, None)]) == set()


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_n_ties_go_to_the_newer_step(mode):
    cands = [(3, 0.2), (9, 0.2), (5, 0.2), (1, 0.7 if mode == "min" else -0.7)]
    assert BestN(1, mode).keep(cands) == {9}
    assert BestN(2, mode).keep(cands) == {9, 5}
    assert BestN(1, mode).keep(list(reversed(cands))) == {9}


def test_best_n_with_infinities():
    cands = [(1, 0.0), (2, -math.inf), (3, math.inf)]
    assert BestN(1, "min").keep(cands) == {2}
    assert BestN(1, "max").keep(cands) == {3}


# ------------------------------------------------------------------ EveryN / AnyOf


def test_every_n():
    cands = [(0, None), (50, None), (100, 1.0), (250, None), (300, None), (301, None)]
    assert EveryN(100).keep(cands) == {0, 100, 300}
    assert EveryN(1).keep(cands) == {0, 50, 100, 250, 300, 301}


def test_any_of_is_the_union():
    cands = [(10, 0.1), (20, 0.5), (30, 0.4), (40, 0.6)]
    assert AnyOf((LastN(1), BestN(1, "min"), EveryN(20))).keep(cands) == {40, 10, 20}
    assert AnyOf(()).keep(cands) == set()
    assert AnyOf((LastN(0),)).keep(cands) == set()


# ------------------------------------------------------------------ policy_for / retained_steps


def test_policy_for_structure():
    assert policy_for(keep_last=3, keep_best=0, mode="min", keep_every=None) == AnyOf((LastN(3),))
    assert policy_for(keep_last=None, keep_best=2, mode="max", keep_every=0) == AnyOf(
        (LastN(None), BestN(2, "max")))
    assert policy_for(keep_last=1, keep_best=1, mode="min", keep_every=1000) == AnyOf(
        (LastN(1), BestN(1, "min"), EveryN(1000)))


def test_retained_steps_union_of_the_three_rules():
    # steps 10..100; loss is lowest at step 40; keep_every 30 -> 30, 60, 90
    losses = {10: 0.9, 20: 0.8, 30: 0.7, 40: 0.1, 50: 0.6, 60: 0.5, 70: NAN, 80: 0.45,
              90: None, 100: 0.4}
    cands = ((s, v) for s, v in losses.items())  # any iterable
    got = retained_steps(cands, keep_last=2, keep_best=1, mode="min", keep_every=30)
    assert got == {90, 100, 40, 30, 60}
    got = retained_steps(list(losses.items()), keep_last=1, keep_best=2, mode="max",
                         keep_every=None)
    assert got == {100, 10, 20}
    assert retained_steps(losses.items(), keep_last=None, keep_best=0, mode="min",
                          keep_every=None) == set(losses)
    assert retained_steps(losses.items(), keep_last=0, keep_best=0, mode="min",
                          keep_every=None) == set()


# ------------------------------------------------------------------ jsonable_metrics


def test_jsonable_metrics_values():
    out = jsonable_metrics({
        "t_float": torch.tensor(0.5), "t_int": torch.tensor(3), "t_nan": torch.tensor(NAN),
        "np_f32": np.float32(0.25), "np_i64": np.int64(7), "np_inf": np.float64("inf"),
        "np_bool": np.bool_(True),
        "nan": NAN, "inf": math.inf, "ninf": -math.inf,
        "f": 1.5, "i": 2, "s": "text", "b": True, "none": None,
        "list": [1, 2], "dict": {"a": 1}, "bytes": b"x", "dec": Decimal("1.5"),
        7: 1,
    })
    assert out == {
        "t_float": 0.5, "t_int": 3, "t_nan": None,
        "np_f32": 0.25, "np_i64": 7, "np_inf": None, "np_bool": True,
        "nan": None, "inf": None, "ninf": None,
        "f": 1.5, "i": 2, "s": "text", "b": True, "none": None,
        "list": "[1, 2]", "dict": "{'a': 1}", "bytes": "b'x'", "dec": "1.5",
        "7": 1,
    }
    assert type(out["t_float"]) is float and type(out["t_int"]) is int
    assert type(out["np_f32"]) is float and type(out["np_i64"]) is int
    assert type(out["np_bool"]) is bool
    json.dumps(out, allow_nan=False)  # strict JSON


def test_jsonable_metrics_of_nothing():
    assert jsonable_metrics(None) == {}
    assert jsonable_metrics({}) == {}


# ------------------------------------------------------------------ metric_value


@pytest.mark.parametrize("metrics,metric,want", [
    ({"loss": 0.5}, "loss", 0.5),
    ({"loss": 3}, "loss", 3.0),
    ({"loss": "0.25"}, "loss", 0.25),
    ({"loss": math.inf}, "loss", math.inf),
    ({"loss": NAN}, "loss", None),
    ({"loss": "nan"}, "loss", None),
    ({"loss": None}, "loss", None),
    ({"loss": "abc"}, "loss", None),
    ({"loss": [1]}, "loss", None),
    ({"loss": 0.5}, "acc", None),
    ({"loss": 0.5}, None, None),
    (None, "loss", None),
    ([("loss", 0.5)], "loss", None),
    ("loss", "loss", None),
])
def test_metric_value(metrics, metric, want):
    got = metric_value(metrics, metric)
    assert got == want and (want is None or type(got) is float)
