"""Leftovers of saves on an object store, for `gc` and the manager.

Three kinds, each identifiable by name alone: markers `.NAME.partial-<token>` of
saves whose process died (same host) or whose heartbeat stopped; data objects
`NAME/data/r*.<token>.bin` that no manifest names and no live save owns (a
crash, or the data of a replaced checkpoint; a retired checkpoint's data is
named by its retired manifest); and multipart uploads under
`NAME/data/` whose save has no live marker (a rank killed mid-upload: its parts
are billed until aborted). Nothing else is ever touched.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ...errors import ShardckptError
from ...format import parse_manifest
from ...format.names import MANIFEST_NAME, RETIRED_MANIFEST, Leftover, parse_leftover
from ..fsutil import pid_alive
from ..storage import MAX_MANIFEST_BYTES
from .commit import HEARTBEAT_S, parse_data_object, token_of_marker
from .store import Upload
from .urls import join


@dataclass
class RemoteLeftover:
    url: str
    kind: str  # "partial" (a marker and its save's objects), "orphan", "upload"
    checkpoint: str  # the checkpoint name it belongs to
    reason: str
    bytes: int
    age: float
    objects: list[str]
    uploads: list[Upload]


def _marker_abandoned(storage, url: str, age: float, older_than: float) -> bool:
    raw = storage.store.get(url, 1 << 16)
    try:
        m = json.loads(raw) if raw else None
        alive = pid_alive(int(m["pid"]), str(m["host"])) if isinstance(m, dict) else None
    except (ValueError, KeyError, TypeError):
        alive = None
    if alive is False:
        return True
    return age > max(older_than, 4 * HEARTBEAT_S)


def find_leftovers(storage, root: str, *, older_than: float,
                   now: float | None = None) -> tuple[list[RemoteLeftover], list[tuple[str, str]]]:
    """(removable leftovers, [(name, why kept)]) under a root of checkpoints."""
    store = storage.store
    now = time.time() if now is None else now
    out: list[RemoteLeftover] = []
    kept: list[tuple[str, str]] = []
    live: dict[str, set[str]] = {}  # checkpoint name -> tokens of saves still running
    dead: dict[str, list[tuple[str, str, float]]] = {}
    entries = store.children(root)
    for e, is_dir in entries:
        p = parse_leftover(e)
        if is_dir or p is None or p[1] != Leftover.PARTIAL:
            continue
        url = join(root, e)
        info = store.head(url)
        if info is None:
            continue
        age = max(0.0, now - info.mtime)
        if _marker_abandoned(storage, url, age, older_than):
            dead.setdefault(p[0], []).append((url, token_of_marker(url), age))
        else:
            live.setdefault(p[0], set()).add(token_of_marker(url))
            kept.append((e, "a save in progress (its process is alive or its heartbeat is "
                            "recent)"))
    names = {e for e, d in entries if d} | set(dead)
    for name in sorted(names):
        path = join(root, name)
        pre = len(path) + 1
        objs = store.listing(join(path, "data") + "/")
        ups = store.uploads(join(path, "data") + "/")
        named: set[str] = set()
        # A retired checkpoint's data is named by its retired manifest: incremental
        # checkpoints still reference it (manager/refcount.py sweeps it when they are gone).
        for mname in (MANIFEST_NAME, RETIRED_MANIFEST):
            raw = store.get(join(path, mname), MAX_MANIFEST_BYTES)
            if raw is not None:
                break
        if raw is not None:
            try:
                named = set(parse_manifest(raw, join(path, mname)).files)
            except ShardckptError:
                continue  # a damaged manifest: which objects it meant is unknowable; keep all
        alive = live.get(name, set())
        dead_tokens = {t for _, t, _ in dead.get(name, [])}
        for url, token, age in dead.get(name, []):
            mine = [o for o in objs if (d := parse_data_object(o.url[pre:])) and d[1] == token
                    and o.url[pre:] not in named]
            out.append(RemoteLeftover(url, "partial", name, f"uncommitted save of {name}",
                                      sum(o.size for o in mine), age,
                                      [o.url for o in mine] + [url],
                                      [u for u in ups if (d := parse_data_object(u.url[pre:]))
                                       and d[1] == token]))
        for o in objs:
            d = parse_data_object(o.url[pre:])
            if d is None or o.url[pre:] in named or d[1] in alive or d[1] in dead_tokens:
                continue
            age = max(0.0, now - o.mtime)
            if age < older_than:
                kept.append((o.url[len(root) + 1:], f"unreferenced object only {age:.0f}s old"))
                continue
            out.append(RemoteLeftover(o.url, "orphan", name, f"object no manifest of {name} "
                                      f"names", o.size, age, [o.url], []))
        for u in ups:
            d = parse_data_object(u.url[pre:])
            if d is None or d[1] in alive or d[1] in dead_tokens:
                continue
            out.append(RemoteLeftover(u.url, "upload", name, f"dangling multipart upload of "
                                      f"{name}", 0, 0.0, [], [u]))
    return out, kept


def remove_leftover(storage, item: RemoteLeftover) -> None:
    for u in item.uploads:
        storage.store.abort_upload(u)
    # The marker goes last: until then a retried gc still finds this save's objects.
    storage.store.delete(item.objects)
