"""The cache of serialized small objects never hands back another value's bytes."""

from __future__ import annotations

import io
import math
import struct

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardckpt.dcp.safety import weights_only_load
from shardckpt.dcp.saved_objects import plain_key, serialize

scalars = st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=8), st.none())
plain = st.one_of(scalars, st.lists(scalars, max_size=6), st.tuples(scalars, scalars))


def _fresh(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _same(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or a != a and b != b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def test_values_that_compare_equal_but_pickle_apart_get_their_own_bytes():
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000001))[0]
    for a, b in [(0.0, -0.0), (1, True), (1, 1.0), (0, False), ((1,), [1]), ("1", 1),
                 (math.nan, nan_payload), (math.nan, -math.nan)]:
        assert plain_key(a) != plain_key(b)
        assert _same(weights_only_load(io.BytesIO(serialize(b))), b)
        assert _same(weights_only_load(io.BytesIO(serialize(a))), a)
        assert serialize(a) == _fresh(a) and serialize(b) == _fresh(b)


def test_containers_of_containers_are_not_cached():
    inner = [1]
    assert plain_key([inner, inner]) is None  # an alias that equal values would not show
    assert plain_key({"a": 1}) is None
    assert plain_key([1, 2.5, "x", None]) is not None


@settings(max_examples=300, deadline=None)
@given(st.lists(plain, min_size=1, max_size=8))
def test_cached_bytes_are_the_bytes_of_the_value_asked_for(values):
    for v in values + values:  # the second pass is served from the cache
        data = serialize(v)
        assert data == _fresh(v)
        assert _same(weights_only_load(io.BytesIO(data)), v)
