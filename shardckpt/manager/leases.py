"""Reader leases: files under ROOT/.readers naming a checkpoint that someone reads.

Retention and gc never delete a leased checkpoint. A lease of a dead local
process, or a remote one older than the TTL, is stale and removed; nothing is
ever removed through a symlinked lease directory.
"""

from __future__ import annotations

import json
import os
import stat
import time
import uuid
import warnings

from ..errors import ShardckptError
from ..io.fsutil import HOST, pid_alive, write_file_atomic
from ..io.storage import is_url, join, storage_for
from .names import READERS_DIR
from .pointers import read_small_json, safe_step_name, write_pointer


class Leases:
    def __init__(self, root: str, ttl_s: float = 24 * 3600.0) -> None:
        self.root = root
        self.dir = join(root, READERS_DIR)
        self.remote = is_url(root)
        self.ttl_s = ttl_s

    def _dir_ok(self) -> bool:
        if self.remote:
            return True  # no directories (nor symlinks) in an object store
        try:
            return stat.S_ISDIR(os.lstat(self.dir).st_mode)  # lstat: a symlink is not ours
        except OSError:
            return False

    def take(self, name: str) -> str | None:
        """Lease `name`; None where the root is read-only (nothing there can delete it then)."""
        try:
            if not self.remote:
                os.makedirs(self.dir, exist_ok=True)
            if not self._dir_ok():
                return None
            path = join(self.dir, f"{os.getpid()}-{HOST}-{uuid.uuid4().hex[:8]}.json")
            lease = {"name": name, "pid": os.getpid(), "host": HOST, "time": time.time()}
            if self.remote:
                write_pointer(path, lease)
            else:
                # Atomic but not fsynced: a lease protects a reader while its process
                # lives; after a crash of the machine that process is gone and the lease
                # stale whether or not it survived.
                write_file_atomic(path, json.dumps(lease, sort_keys=True).encode())
            return path
        except (OSError, ShardckptError) as e:
            warnings.warn(f"shardckpt: could not take a reader lease in {self.dir} "
                          f"({getattr(e, 'strerror', None) or e}); "
                          f"reading {name} without one", RuntimeWarning, stacklevel=3)
            return None

    @staticmethod
    def drop(path: str | None) -> None:
        if path and is_url(path):
            storage_for(path).remove_small(path)
        elif path:
            try:
                os.unlink(path)
            except OSError:
                pass

    def live_names(self, *, remove_stale: bool = True) -> set[str]:
        if not self._dir_ok():
            return set()
        try:
            entries = ([n for n, d in storage_for(self.dir).children(self.dir) if not d]
                       if self.remote else os.listdir(self.dir))
        except (OSError, ShardckptError):
            return set()
        names = set()
        now = time.time()
        for e in entries:
            if not e.endswith(".json"):
                continue
            p = join(self.dir, e)
            lease = read_small_json(p)
            try:
                name = safe_step_name(lease["name"]) if lease else None
                pid, host = int(lease["pid"]), str(lease["host"])
                age = now - float(lease["time"])
            except (KeyError, TypeError, ValueError):
                continue  # being written, or garbage: not a lease
            if name is None:
                continue
            alive = pid_alive(pid, host)
            stale = (alive is False) or (alive is None and age > self.ttl_s)
            if stale:
                if remove_stale:
                    self.drop(p)
                continue
            names.add(name)
        return names
