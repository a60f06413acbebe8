"""The key namespace (shardckpt/format/keys.py): the one key mapper and rank-private keys."""

from __future__ import annotations

import pytest

from shardckpt.format.keys import (
    is_rank_component,
    is_rank_local,
    key_mapper,
    map_keys,
    prefix_hint,
    rank_of_key,
)

# ------------------------------------------------------------------ key_mapper: no-ops


@pytest.mark.parametrize("strip,rename", [
    (None, None), ("", None), ([], None), ([""], None), (None, {}), (None, []), ("", []),
])
def test_mapper_that_changes_nothing_is_none(strip, rename):
    assert key_mapper(strip, rename) is None


# ------------------------------------------------------------------ strip_prefix


@pytest.mark.parametrize("prefix", ["module.", "module"])
@pytest.mark.parametrize("key,want", [
    ("module.w", "w"),
    ("module.layers.0.weight", "layers.0.weight"),
    ("a.module.b.module.c", "a.b.c"),
    ("module.module.w", "w"),
    ("a.module.module.b", "a.b"),
    ("mymodule.x", "mymodule.x"),          # inside a component name: kept
    ("a.mymodule.x", "a.mymodule.x"),
    ("a.module_x.y", "a.module_x.y"),
    ("modules.x", "modules.x"),
    ("a.module", "a.module"),              # no trailing dot: not a prefix of anything
    ("module", "module"),
    ("w", "w"),
])
def test_strip_prefix_at_every_component_start(prefix, key, want):
    assert key_mapper(prefix)(key) == want


def test_strip_several_prefixes():
    fn = key_mapper(["module.", "_orig_mod"])
    assert fn("_orig_mod.module.w") == "w"
    assert fn("module._orig_mod.w") == "w"
    assert fn("a._orig_mod.b.module.c") == "a.b.c"
    assert fn("x_orig_mod.w") == "x_orig_mod.w"


def test_strip_prefix_is_literal_not_a_regex():
    fn = key_mapper("a+b")
    assert fn("a+b.x") == "x"
    assert fn("aab.x") == "aab.x"
    assert fn("ab.x") == "ab.x"
    dot = key_mapper("m.n")          # a dotted prefix: both components together
    assert dot("m.n.w") == "w"
    assert dot("q.m.n.w") == "q.w"
    assert dot("mxn.w") == "mxn.w"
    assert dot("m.w") == "m.w"


# ------------------------------------------------------------------ rename


def test_rename_dict_pairs_and_strings_are_the_same_rule():
    want = "blocks.3.attn"
    for rename in ({r"layers\.(\d+)": r"blocks.\1"}, [(r"layers\.(\d+)", r"blocks.\1")],
                   [r"layers\.(\d+)=blocks.\1"]):
        assert key_mapper(None, rename)("layers.3.attn") == want


def test_rename_rules_apply_in_order():
    assert key_mapper(None, [("a", "b"), ("b", "c")])("a") == "c"
    assert key_mapper(None, [("b", "c"), ("a", "b")])("a") == "b"
    assert key_mapper(None, ["a=b", "b=c"])("xa") == "xc"
    assert key_mapper(None, {"a": "b", "b": "c"})("a") == "c"


def test_rename_replaces_every_match():
    assert key_mapper(None, {"w": "W"})("w.w.x") == "W.W.x"


def test_rename_string_splits_at_the_first_equals_sign():
    assert key_mapper(None, ["x=y=z"])("x.x") == "y=z.y=z"


def test_rename_runs_after_strip():
    fn = key_mapper("module", {r"^a\.": "b."})
    assert fn("module.a.x") == "b.x"
    # a rule that only matches the unstripped key does nothing
    assert key_mapper("module", {r"^module\.": "Z."})("module.a") == "a"


@pytest.mark.parametrize("rename", [{"(": "x"}, [("[a-", "x")], ["(=x"], ["a)b=c"]])
def test_bad_regex_is_value_error(rename):
    with pytest.raises(ValueError, match="regular expression"):
        key_mapper(None, rename)


def test_rename_string_without_equals_is_value_error():
    with pytest.raises(ValueError, match="REGEX=REPLACEMENT"):
        key_mapper(None, ["abc"])


# ------------------------------------------------------------------ map_keys


def test_map_keys_without_mapper_copies():
    src = {"a": 1, "b": 2}
    out = map_keys(src, None)
    assert out == src and out is not src


def test_map_keys_maps_and_keeps_values():
    out = map_keys({"module.a": 1, "module.b.module.c": 2, "x": 3}, key_mapper("module"))
    assert out == {"a": 1, "b.c": 2, "x": 3}


def test_map_keys_collision_names_both_keys():
    with pytest.raises(ValueError) as ei:
        map_keys({"module.w": 1, "w": 2}, key_mapper("module."))
    msg = str(ei.value)
    assert "'module.w'" in msg and "'w'" in msg


def test_map_keys_collision_from_rename():
    with pytest.raises(ValueError) as ei:
        map_keys({"a.x": 1, "b.x": 2}, key_mapper(None, {"^[ab]": "c"}))
    assert "'a.x'" in str(ei.value) and "'b.x'" in str(ei.value) and "'c.x'" in str(ei.value)


# ------------------------------------------------------------------ rank-private keys


@pytest.mark.parametrize("key,rank", [
    ("train.__rank3__.rng.python", 3),
    ("__rank0__", 0),
    ("__rank12__.x", 12),
    ("a.__rank7__", 7),
    ("a.b.__rank100__.c", 100),
    ("a__rank1__.x", None),
    ("a.__rank1__x", None),
    ("a.x__rank1__", None),
    ("a.__rankx__", None),
    ("a.__rank__.b", None),
    ("a.__rank-1__.b", None),
    ("a._rank1_.b", None),
    ("rank1", None),
    ("", None),
])
def test_rank_of_key(key, rank):
    assert rank_of_key(key) == rank
    assert is_rank_local(key) is (rank is not None)


@pytest.mark.parametrize("part,rank", [
    ("__rank0__", 0), ("__rank7__", 7), ("__rank42__", 42),
    ("x.__rank7__", None), ("__rank7__.x", None), ("__rank__", None), ("rank7", None),
    ("__rank7_", None), ("__Rank7__", None),
])
def test_is_rank_component(part, rank):
    assert is_rank_component(part) == rank


# ------------------------------------------------------------------ prefix_hint


def test_prefix_hint_suggests_module_for_ddp_keys():
    stored = ["module.layer.weight", "module.layer.bias", "module.head.weight"]
    wanted = ["layer.weight", "layer.bias", "head.weight"]
    assert prefix_hint(wanted, stored) == "module."


def test_prefix_hint_suggests_a_nested_prefix():
    stored = ["train.model.w", "train.model.b"]
    assert prefix_hint(["w", "b"], stored) == "train.model."


def test_prefix_hint_none_when_keys_already_match():
    keys = ["layer.weight", "layer.bias"]
    assert prefix_hint(keys, keys) is None


def test_prefix_hint_none_when_nothing_helps():
    assert prefix_hint(["a.w"], ["b.v"]) is None
    # the wanted keys carry the prefix, the stored ones do not: stripping cannot help
    assert prefix_hint(["module.w"], ["w"]) is None
    assert prefix_hint([], []) is None


def test_prefix_hint_only_when_it_beats_the_keys_as_they_are():
    # two keys already match; stripping "module." would match only one
    wanted = ["module.a", "module.b", "c"]
    stored = ["module.a", "module.b", "module.c"]
    assert prefix_hint(wanted, stored) is None
    # a prefix that matches more keys than are matched now is suggested
    assert prefix_hint(["a", "b", "module.c"], ["module.a", "module.b", "module.c"]) == "module."
