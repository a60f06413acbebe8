"""Any fsspec URL (gs://, az://, memory://, file://, ...) as an object store.

What fsspec does not offer everywhere is said where it matters: a conditional
put is check-then-write here (not atomic against a concurrent writer of the
same name), and abandoned uploads are the backend's business (fsspec files
abort theirs on discard).
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from ...errors import LoadFailedError
from .s3 import load_error, save_error
from .store import ObjectInfo, Upload


def _mtime(info: dict) -> float:
    for k in ("mtime", "LastModified", "last_modified", "created", "updated", "timeCreated"):
        v = info.get(k)
        if isinstance(v, (int, float)):
            return float(v)
        if isinstance(v, datetime.datetime):
            return v.timestamp()
        if isinstance(v, str):
            try:
                return datetime.datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return time.time()


class FsspecRange:
    def __init__(self, fs: Any, path: str, url: str, size: int) -> None:
        self.fs, self.path, self.url, self.size = fs, path, url, size

    def pread(self, length: int, offset: int) -> bytes:
        end = min(self.size, offset + max(0, length))
        if end <= offset:
            return b""
        try:
            return self.fs.cat_file(self.path, start=offset, end=end)
        except FileNotFoundError:
            raise FileNotFoundError(2, "object is missing", self.url) from None
        except Exception as e:  # noqa: BLE001
            raise load_error(e, self.url, f"reading bytes {offset}-{end - 1}") from e

    def close(self) -> None:
        pass


class FsspecStore:
    def __init__(self, scheme: str, options: dict) -> None:
        import fsspec

        self.scheme = scheme
        try:
            self.fs = fsspec.filesystem(scheme, **options)
        except (ImportError, ValueError) as e:
            raise LoadFailedError(f"{scheme}://: no fsspec filesystem for this URL ({e}); "
                                  f"install the package fsspec names for it.") from e

    def _p(self, url: str) -> str:
        return self.fs._strip_protocol(url)

    def _url(self, path: str) -> str:
        path = path.lstrip("/") if self.scheme != "file" else path
        return f"{self.scheme}://{path}"

    def head(self, url: str) -> ObjectInfo | None:
        try:
            info = self.fs.info(self._p(url))
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001
            raise load_error(e, url, "stat") from e
        if info.get("type") == "directory":
            return None
        return ObjectInfo(url, int(info.get("size") or 0), _mtime(info))

    def get(self, url: str, limit: int) -> bytes | None:
        h = self.head(url)
        if h is None:
            return None
        if h.size > limit:
            return b"\0" * (limit + 1)
        try:
            return self.fs.cat_file(self._p(url))
        except FileNotFoundError:
            return None

    def put(self, url: str, data: bytes, *, if_absent: bool = False) -> bool:
        p = self._p(url)
        if if_absent and self.head(url) is not None:
            return False
        try:
            parent = p.rsplit("/", 1)[0]
            if parent and self.scheme == "file":
                self.fs.makedirs(parent, exist_ok=True)
            if self.scheme == "file":
                # A whole-object write must be atomic, as on a store: temp name + rename.
                tmp = f"{p}.tmp-{time.time_ns()}"
                self.fs.pipe_file(tmp, data)
                self.fs.mv(tmp, p)
            else:
                self.fs.pipe_file(p, data)
        except Exception as e:  # noqa: BLE001
            raise save_error(e, url, "write") from e
        return True

    def listing(self, prefix: str) -> list[ObjectInfo]:
        p = self._p(prefix)
        base, _, head = p.rpartition("/")
        root = p if prefix.endswith("/") else base
        try:
            found = self.fs.find(root or "/", detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise load_error(e, prefix, "list") from e
        out = []
        for path, info in found.items():
            if info.get("type") == "directory":
                continue
            u = self._url(path)
            if u.startswith(prefix):
                out.append(ObjectInfo(u, int(info.get("size") or 0), _mtime(info)))
        return out

    def children(self, root: str) -> list[tuple[str, bool]]:
        try:
            entries = self.fs.ls(self._p(root), detail=True)
        except FileNotFoundError:
            return []
        except Exception as e:  # noqa: BLE001
            raise load_error(e, root, "list") from e
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], e.get("type") == "directory")
                for e in entries]

    def delete(self, urls: list[str]) -> None:
        for u in urls:
            try:
                self.fs.rm_file(self._p(u))
            except FileNotFoundError:
                pass
            except Exception as e:  # noqa: BLE001
                raise save_error(e, u, "delete") from e

    def open_range(self, url: str, size: int) -> FsspecRange:
        return FsspecRange(self.fs, self._p(url), url, size)

    def open_sink(self, url: str, rank: int | None = None) -> Any:
        from .sink import StreamSink

        p = self._p(url)
        if self.scheme == "file":
            self.fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        return StreamSink(self.fs, p, url, rank)

    def uploads(self, prefix: str) -> list[Upload]:
        return []

    def abort_upload(self, upload: Upload) -> None:
        pass
