"""A Storage on an object store: the checkpoint layout without directories or renames.

    PREFIX/NAME/manifest.json                 the commit point (written last, by rank 0)
    PREFIX/NAME/data/r00003.<token>.bin       rank 3's data of the save with that token
    PREFIX/.NAME.partial-<token>              the marker of a save in progress (heartbeat)

A checkpoint is visible iff its manifest exists; the manifest is written only
after every object it names has been checked for its recorded size, so a
visible manifest never names a missing or partial object (commit.py).
"""

from __future__ import annotations

from ...errors import CorruptCheckpointError
from ...format.names import MANIFEST_NAME, RETIRED_MANIFEST, DirState, Leftover, parse_leftover
from ..storage import MAX_MANIFEST_BYTES, CheckpointWrite, DataSink, RangeFile
from .store import ObjectStore
from .urls import basename, join, parent


def parse_data_object(rel: str) -> tuple[int, str] | None:
    from .commit import parse_data_object as p

    return p(rel)


class RemoteCheckpoint:
    """An open checkpoint: its manifest's ETag says whether an overwrite replaced it since."""

    # Ranged GETs a load keeps in flight (io/prefetch.py): each waits mostly on the
    # round trip, so more of them fill the link where a disk would only seek more.
    read_streams = 8

    def __init__(self, storage: RemoteStorage, path: str) -> None:
        self.storage = storage
        self.store = storage.store
        self.path = path
        self._etag: str | None = None
        self._files: dict[str, RangeFile] = {}

    def read_manifest(self) -> bytes:
        url = join(self.path, MANIFEST_NAME)
        info = self.store.head(url)
        if info is None:
            raise FileNotFoundError(2, "no manifest", url)
        if info.size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{url}: {info.size} bytes is not a manifest shardckpt "
                                         f"wrote; the checkpoint is damaged.", path=url)
        data = self.store.get(url, MAX_MANIFEST_BYTES)
        if data is None:
            raise FileNotFoundError(2, "no manifest", url)
        self._etag = info.etag
        return data

    def open_data(self, rel: str) -> RangeFile:
        f = self._files.get(rel)
        if f is None:
            url = join(self.path, rel)
            info = self.store.head(url)
            if info is None:
                raise FileNotFoundError(2, "object is missing", url)
            f = self._files[rel] = self.store.open_range(url, info.size)
        return f

    def replaced(self) -> bool:
        info = self.store.head(join(self.path, MANIFEST_NAME))
        return info is None or (bool(self._etag) and info.etag != self._etag)

    def close(self) -> None:
        self._files.clear()


class RemoteStorage:
    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    # ------------------------------------------------------------ read side

    def markers(self, path: str) -> list[str]:
        """Markers of saves to `path` in progress or abandoned."""
        name = basename(path)
        out = []
        for o in self.store.listing(join(parent(path), f".{name}.partial-")):
            p = parse_leftover(basename(o.url))
            if p == (name, Leftover.PARTIAL):
                out.append(o.url)
        return out

    def is_committed(self, path: str) -> bool:
        """One HEAD (state() lists the prefix when there is no manifest)."""
        return self.store.head(join(path, MANIFEST_NAME)) is not None

    def state(self, path: str) -> DirState:
        if self.store.head(join(path, MANIFEST_NAME)) is not None:
            return DirState.COMMITTED
        objs = self.store.listing(path.rstrip("/") + "/")
        if not objs:
            return DirState.PARTIAL if self.markers(path) else DirState.MISSING
        pre = len(path.rstrip("/")) + 1
        if all(parse_data_object(o.url[pre:]) for o in objs):
            return DirState.PARTIAL  # only data objects of uncommitted saves
        return DirState.OTHER

    def open_checkpoint(self, path: str) -> RemoteCheckpoint:
        return RemoteCheckpoint(self, path)

    # ------------------------------------------------------------ write side

    def begin_commit(self, final: str, *, overwrite: bool, save_id: str,
                     world_size: int) -> CheckpointWrite:
        from .commit import RemoteCommit

        return RemoteCommit.create(self, final, overwrite=overwrite, save_id=save_id,
                                   world_size=world_size)

    def open_sink(self, path: str, rank: int | None = None) -> DataSink:
        return self.store.open_sink(path, rank)

    # ------------------------------------------------------------ a root of checkpoints

    def children(self, root: str) -> list[tuple[str, bool]]:
        return self.store.children(root)

    def read_small(self, path: str, limit: int) -> bytes | None:
        return self.store.get(path, limit)

    def write_small(self, path: str, data: bytes) -> None:
        self.store.put(path, data)

    def remove_small(self, path: str) -> None:
        try:
            self.store.delete([path])
        except Exception:  # noqa: BLE001 - a lease or pointer that stays is harmless
            pass

    def mtime(self, path: str) -> float | None:
        info = self.store.head(path)
        return None if info is None else info.mtime

    def is_retired(self, path: str) -> bool:
        return (self.store.head(join(path, MANIFEST_NAME)) is None
                and self.store.head(join(path, RETIRED_MANIFEST)) is not None)

    def retire(self, path: str) -> None:
        """The manifest becomes `manifest.retired.json` (refcount.py): a copy first, then the
        manifest goes. No rename here, so a crash between leaves both, and the checkpoint
        still committed, which the next retention retires again."""
        url = join(path, MANIFEST_NAME)
        data = self.store.get(url, MAX_MANIFEST_BYTES)
        if data is None:
            raise FileNotFoundError(2, "no manifest", url)
        self.store.put(join(path, RETIRED_MANIFEST), data)
        self.store.delete([url])

    def delete_checkpoint(self, root: str, name: str) -> bool:
        """The manifest goes first (the checkpoint is invisible from then on), then the data
        objects shardckpt wrote; a crash between leaves objects that `gc` removes. A retired
        checkpoint loses its data first and its retired manifest last, so a crash between
        leaves it retired, for the next sweep."""
        path = join(root, name)
        manifest, retired = join(path, MANIFEST_NAME), join(path, RETIRED_MANIFEST)
        live = self.store.head(manifest) is not None
        # a retired checkpoint, or one whose retire a crash cut short (both manifests)
        was_retired = self.store.head(retired) is not None
        if not live and not was_retired:
            return False
        if live:
            self.store.delete([manifest])
        pre = len(path) + 1
        self.store.delete([o.url for o in self.store.listing(path + "/")
                           if parse_data_object(o.url[pre:])])
        if was_retired:
            self.store.delete([retired])
        return True
