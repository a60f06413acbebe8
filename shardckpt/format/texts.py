"""Canonical JSON texts of a manifest's parts, kept from one save to the next.

An incremental save of an unchanged structure writes a manifest that is mostly the
last one: the same tensor entries (the very objects, io/base_index.BaseIndex.reuse),
the same planner_data. Their texts are kept here so that Manifest.to_bytes
serializes only what changed.
"""

from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manifest import TensorEntry


# The canonical JSON texts of tensor entries by key, with the entry each is of: reused
# only for an equal entry. A few entries per key (saves of one state to two roots
# alternate); bounded; a miss only costs the serialization.
_TEXTS: dict[str, list[tuple[TensorEntry, str]]] = {}
_TEXTS_MAX, _TEXTS_PER_KEY = 1 << 16, 2
# json.dumps with arguments builds an encoder per call: a quarter of the time of a
# tensor entry's text (~100 changed entries an incremental save).
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_text(key: str, entry: TensorEntry) -> str:
    kept = _TEXTS.get(key)
    if kept is None:
        if len(_TEXTS) >= _TEXTS_MAX:
            _TEXTS.clear()
        kept = _TEXTS[key] = []
    for e, text in kept:
        if e is entry:  # an unchanged tensor of an incremental save: the base's entry
            return text
    for e, text in kept:
        if e == entry:
            return text
    text = _CANONICAL.encode(entry.to_json())
    kept.insert(0, (entry, text))
    del kept[_TEXTS_PER_KEY:]
    return text


# The JSON texts (sorted, as written) of the last planner_data written: a save of the
# same state has the same one, a key for every entry of the state (0.2 ms to serialize
# for a 6-layer BERT, twice a save). Kept with a copy, so a later change to the dict
# that was serialized cannot make an equal-looking stale text.
_PLANNER: list[tuple[dict, str, str]] = []


def planner_text(pd: dict, sort: bool) -> str:
    kept = _PLANNER[0] if _PLANNER else None
    if kept is None or kept[0] != pd:
        def text(s: bool) -> str:
            return json.dumps(pd, sort_keys=s, separators=(",", ":"), allow_nan=False)

        kept = ({k: list(v) for k, v in pd.items()}, text(True), text(False))
        _PLANNER[:] = [kept]
    return kept[1] if sort else kept[2]


@functools.lru_cache(maxsize=1 << 16)
def key_text(k: str) -> str:
    # Twice per tensor per save (the checksummed text and the file's): the same keys.
    return json.dumps(k)
