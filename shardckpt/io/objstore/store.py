"""The object-store interface the checkpoint layout is written on (S3 and fsspec implement it).

Every name is a full URL. Objects are immutable once written; a write of a
whole object is atomic (readers see the old or the new one), which is all the
commit protocol needs from a store: no rename, no directories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..storage import DataSink, RangeFile


@dataclass(frozen=True)
class ObjectInfo:
    url: str
    size: int
    mtime: float  # seconds since the epoch (last write)
    etag: str = ""


@dataclass(frozen=True)
class Upload:
    """A multipart upload begun and neither completed nor aborted."""

    url: str
    upload_id: str


class ObjectStore(Protocol):
    def head(self, url: str) -> ObjectInfo | None: ...
    def get(self, url: str, limit: int) -> bytes | None: ...
    def put(self, url: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write a whole object; with `if_absent`, False (and nothing written) if it exists."""
        ...
    def listing(self, prefix: str) -> list[ObjectInfo]:
        """Every object whose URL starts with `prefix` (recursively)."""
        ...
    def children(self, root: str) -> list[tuple[str, bool]]:
        """(name, is_prefix) directly under `root`."""
        ...
    def delete(self, urls: list[str]) -> None: ...
    def open_range(self, url: str, size: int) -> RangeFile: ...
    def open_sink(self, url: str, rank: int | None = None) -> DataSink: ...
    def uploads(self, prefix: str) -> list[Upload]: ...
    def abort_upload(self, upload: Upload) -> None: ...
