"""`latest` / `best` pointers: small JSON files naming a step directory of the root.

A pointer is a convenience written after the commit; a damaged or hostile one
is treated as absent. The name it holds must be a step directory directly
under the root: a pointer cannot send a restore outside it.
"""

from __future__ import annotations

import json
import os
import stat

from ..io.fsutil import write_file_durable
from ..io.storage import is_url, storage_for
from .names import BEST_POINTER, LATEST_POINTER, parse_step

_MAX_POINTER_BYTES = 1 << 16


def read_small_json(path: str) -> dict | None:
    """A small JSON object from a regular file, or None (missing, FIFO, link, garbage)."""
    if is_url(path):
        try:
            data = storage_for(path).read_small(path, _MAX_POINTER_BYTES)
        except Exception:  # noqa: BLE001 - an unreadable pointer is an absent one
            return None
        return _parse_small(data) if data is not None else None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, _MAX_POINTER_BYTES + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return _parse_small(data)


def _parse_small(data: bytes) -> dict | None:
    if len(data) > _MAX_POINTER_BYTES:
        return None
    try:
        p = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return p if isinstance(p, dict) else None


def safe_step_name(name: object) -> str | None:
    if isinstance(name, str) and "/" not in name and "\\" not in name and name not in (".", ".."):
        if parse_step(name) is not None:
            return name
    return None


class Pointers:
    def __init__(self, root: str) -> None:
        self.root = root

    def read(self, which: str) -> dict | None:
        """The pointer file `which` (LATEST_POINTER / BEST_POINTER), if valid."""
        p = read_small_json(os.path.join(self.root, which))
        if p is None or safe_step_name(p.get("name")) is None:
            return None
        return p

    def write(self, which: str, payload: dict, *, sync_dir: bool = True) -> None:
        write_pointer(os.path.join(self.root, which), payload, sync_dir=sync_dir)

    def names(self) -> dict[str, str]:
        out = {}
        for key, fname in (("latest", LATEST_POINTER), ("best", BEST_POINTER)):
            p = self.read(fname)
            if p is not None:
                out[key] = p["name"]
        return out


def write_pointer(path: str, payload: dict, *, sync_dir: bool = True) -> None:
    """Durable atomic small-file write: temp file, fsync, rename, fsync of the directory
    (on an object store: one PUT, atomic there). `sync_dir=False`: the caller fsyncs the
    directory itself, once for several entries."""
    data = json.dumps(payload, sort_keys=True).encode()
    if is_url(path):
        storage_for(path).write_small(path, data)
        return
    write_file_durable(path, data, sync_dir=sync_dir)
