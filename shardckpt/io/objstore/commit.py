"""The commit protocol on an object store: unique data names, the manifest last, no rename.

    c = RemoteCommit.create(storage, final, overwrite=..., save_id=..., world_size=...)
    ... rank r uploads join(final, c.data_name(r)) ...
    c.finalize(manifest)   # sizes checked, manifest put (If-None-Match: * unless overwrite)
    c.abort()              # this save's objects, uploads and marker go

Data objects carry the save's token in their names, so two saves to one name
never touch each other's objects, and an overwrite is one PUT of the manifest
(atomic on every object store): readers see the old checkpoint or the new one.
The marker `.NAME.partial-<token>` beside the checkpoint records who saves
(host, pid) and its LastModified is the heartbeat; `gc` treats a save as
abandoned when its process is dead (same host) or the heartbeat stopped, and then
removes its objects and aborts its multipart uploads (leftovers.py).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import uuid
from typing import Any

from ...errors import CheckpointExistsError, SaveFailedError, ShardckptError
from ...format import Manifest, parse_manifest
from ...format.names import MANIFEST_NAME, MAX_NAME_LEN, staging_name
from ..fsutil import HOST
from ..storage import MAX_MANIFEST_BYTES
from .urls import basename, join, parent, split_url

HEARTBEAT_S = 30.0
_DATA_RE = re.compile(r"data/r(?P<rank>[0-9]{5})\.(?P<token>[0-9a-f]{12})\.bin")


def data_object_name(rank: int, token: str) -> str:
    return f"data/r{rank:05d}.{token}.bin"


def parse_data_object(rel: str) -> tuple[int, str] | None:
    """(rank, save token) for a data object shardckpt writes to object stores."""
    m = _DATA_RE.fullmatch(rel)
    return (int(m.group("rank")), m.group("token")) if m else None


def token_of_marker(url: str) -> str:
    return basename(url).rsplit("-", 1)[1]


def _exists(final: str) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{final}: Checkpoint already exists (a committed checkpoint is there); pass "
        f"overwrite=True or choose another path.")


def check_name(final: str) -> None:
    _, _, key = split_url(final)
    name = key.rsplit("/", 1)[-1]
    if not key or name in (".", ".."):
        raise SaveFailedError(f"{final!r}: not a checkpoint URL (write "
                              f"scheme://BUCKET/PREFIX/NAME, not a bucket alone).")
    if len(name.encode()) > MAX_NAME_LEN:
        raise SaveFailedError(f"{final}: the name is {len(name.encode())} bytes; checkpoint "
                              f"names may have at most {MAX_NAME_LEN}. Choose a shorter name.")


class RemoteCommit:
    def __init__(self, storage: Any, final: str, token: str, marker: str, body: bytes,
                 overwrite: bool) -> None:
        self.storage = storage
        self.store = storage.store
        self.final = final
        self.staging = final  # data objects live under the checkpoint, under unique names
        self.token = token
        self.marker = marker
        self._body = body
        self.overwrite = overwrite
        self.manifest_bytes = 0
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="shardckpt-heartbeat",
                                      daemon=True)
        self._beat.start()

    @classmethod
    def create(cls, storage: Any, final: str, *, overwrite: bool, save_id: str,
               world_size: int) -> RemoteCommit:
        final = final.rstrip("/")
        check_name(final)

        if not overwrite and storage.is_committed(final):
            raise _exists(final)
        token = uuid.uuid4().hex[:12]
        marker = join(parent(final), staging_name(basename(final), token))
        body = json.dumps({"target": basename(final), "save_id": save_id, "token": token,
                           "world_size": world_size, "started_unix": time.time(),
                           "host": HOST, "pid": os.getpid()}).encode()
        storage.store.put(marker, body)
        return cls(storage, final, token, marker, body, overwrite)

    def data_name(self, rank: int) -> str:
        return data_object_name(rank, self.token)

    def _heartbeat(self) -> None:
        # Re-writing the marker moves its LastModified: the heartbeat gc reads.
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.store.put(self.marker, self._body)
            except ShardckptError:
                continue

    def _check_sizes(self, manifest: Manifest) -> None:
        for rel, fi in sorted(manifest.files.items()):
            url = join(self.final, rel)
            info = self.store.head(url)
            size = -1 if info is None else info.size
            if size != fi.size:
                raise SaveFailedError(
                    f"{url} (rank {fi.rank}): in the store {size} bytes, reported {fi.size}; "
                    f"nothing was committed. Retry the save.")

    def _old_files(self) -> set[str]:
        try:
            data = self.store.get(join(self.final, MANIFEST_NAME), MAX_MANIFEST_BYTES)
            return set(parse_manifest(data, self.final).files) if data else set()
        except ShardckptError:
            return set()

    def finalize(self, manifest: Manifest) -> None:
        self._stop.set()
        if self.store.head(self.marker) is None:
            raise SaveFailedError(
                f"{self.final}: the marker {self.marker} of this save was removed by another "
                f"process (a concurrent `shardckpt gc`?) before the commit; nothing was "
                f"committed. Retry the save.")
        self._check_sizes(manifest)
        old = self._old_files() if self.overwrite else set()
        data = manifest.to_bytes()
        if not self.store.put(join(self.final, MANIFEST_NAME), data,
                              if_absent=not self.overwrite):
            self.abort()
            raise _exists(self.final)
        self.manifest_bytes = len(data)
        # Committed. What follows is cleanup: a failure leaves leftovers for gc.
        try:
            self.store.delete([self.marker])
            stale = old - set(manifest.files)
            self.store.delete([join(self.final, rel) for rel in sorted(stale)
                               if parse_data_object(rel)])
        except ShardckptError:
            pass

    def abort(self) -> None:
        self._stop.set()
        try:
            pre = len(self.final) + 1
            mine = [o.url for o in self.store.listing(join(self.final, "data") + "/")
                    if (p := parse_data_object(o.url[pre:])) and p[1] == self.token]
            self.store.delete(mine)
            for u in self.store.uploads(join(self.final, "data") + "/"):
                p = parse_data_object(u.url[pre:])
                if p and p[1] == self.token:
                    self.store.abort_upload(u)
            self.store.delete([self.marker])
        except Exception:  # noqa: BLE001 - abort never raises; gc removes what is left
            pass
