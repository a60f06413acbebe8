"""The non-tensor values of a save: serialized and checked to load back, each once.

A save of a training state carries a few dozen small objects (an optimizer's
param_groups flatten to one per hyperparameter, counters, flags). DCP pickles each
with torch.save, and shardckpt loads each back under weights_only rules to refuse
what a load would refuse (invariant 3). At ~0.2 ms per object both were a tenth of a
small incremental save, and both give the same answer for the same value every time.
"""

from __future__ import annotations

import io
import struct
import threading
from collections import OrderedDict
from typing import Any

import torch

from .safety import weights_only_load

_MAX_ENTRIES, _MAX_BYTES, _MAX_LEN = 4096, 1 << 16, 1024
_LOCK = threading.Lock()

# Objects that loaded back, by their exact bytes.
_LOADS_BACK: OrderedDict[bytes, None] = OrderedDict()
_LOADS_BACK_GLOBALS: list[frozenset[int]] = [frozenset()]
# torch.save bytes of plain values, by a key that tells apart what pickles differently.
_SERIALIZED: OrderedDict[tuple, bytes] = OrderedDict()

_SCALARS = (bool, int, str, bytes, type(None))


def _scalar_key(v: Any) -> Any:
    t = type(v)
    if t is float:
        # By its bits: 0.0 == -0.0, a NaN is never equal to itself, and float.hex()
        # writes every NaN payload as "nan"; pickle writes all eight bytes.
        return (float, struct.pack("<d", v))
    if t in _SCALARS:
        return (t, v)
    return None


def plain_key(obj: Any) -> tuple | None:
    """A hashable key equal only for values torch.save writes to the same bytes, or
    None where that cannot be told cheaply. Containers hold scalars only: a list that
    held a list twice would pickle an alias, which equal values do not show."""
    key = _scalar_key(obj)
    if key is not None:
        return key
    t = type(obj)
    if t not in (tuple, list) or len(obj) > _MAX_LEN:
        return None
    keys = []
    for v in obj:
        k = _scalar_key(v)
        if k is None:
            return None
        keys.append(k)
    return (t, tuple(keys))


def _remember(cache: OrderedDict, key: Any, value: Any) -> None:
    cache[key] = value
    while len(cache) > _MAX_ENTRIES:
        cache.popitem(last=False)


def serialize(obj: Any) -> bytes:
    """torch.save(obj) as bytes, from the cache for a plain value saved before."""
    key = plain_key(obj)
    if key is not None:
        with _LOCK:
            data = _SERIALIZED.get(key)
            if data is not None:
                _SERIALIZED.move_to_end(key)
                return data
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    if key is not None and len(data) <= _MAX_BYTES:
        with _LOCK:
            _remember(_SERIALIZED, key, data)
    return data


def check_loads_back(data: bytes) -> None:
    """Raise unless `data` (a torch.save) loads under weights_only rules."""
    small = len(data) <= _MAX_BYTES
    if small:
        # A set: torch hands the allowlist back in an order that changes from call to
        # call (each safe_globals() context rebuilds it), and an order change is no change.
        allowed = frozenset(map(id, torch.serialization.get_safe_globals()))
        with _LOCK:
            if allowed != _LOADS_BACK_GLOBALS[0]:  # the user's allowlist changed
                _LOADS_BACK.clear()
                _LOADS_BACK_GLOBALS[0] = allowed
            if data in _LOADS_BACK:
                _LOADS_BACK.move_to_end(data)
                return
    weights_only_load(io.BytesIO(data))
    if small:
        with _LOCK:
            _remember(_LOADS_BACK, data, None)
