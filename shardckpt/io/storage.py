"""The Storage protocol: what the commit protocol and the reader need from where
checkpoints live, and the local filesystem as its first implementation.

Paths handed to a Storage are checkpoint paths (a directory on a filesystem, a
prefix in an object store); names inside a checkpoint are relative and checked
by the format layer before they get here. The local implementation opens a
checkpoint as a directory file descriptor, so a reader keeps reading the
checkpoint it opened even if an overwrite swaps another one in under the same
name, and never follows a symlink out of it.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from ..format import Manifest

from ..errors import CorruptCheckpointError
from ..format.names import MANIFEST_NAME, PARTIAL_MARKER, DirState
from .sinks import DataSink

# A manifest larger than this is not one shardckpt wrote (1M tensors of 4 chunks
# is ~600 MB of JSON); refusing it keeps a hostile file from exhausting memory.
MAX_MANIFEST_BYTES = 1 << 30


class RangeFile(Protocol):
    size: int

    def pread(self, length: int, offset: int) -> bytes: ...
    def close(self) -> None: ...


class OpenCheckpoint(Protocol):
    path: str

    def read_manifest(self) -> bytes: ...
    def open_data(self, rel: str) -> RangeFile: ...
    def replaced(self) -> bool: ...
    def close(self) -> None: ...


class CheckpointWrite(Protocol):
    """One checkpoint being written (the write side of a Storage), made by rank 0.

    Every rank writes its data file to `join(staging, data_name(rank))` through
    `Storage.open_sink`; rank 0 then calls `finalize` (every file the manifest
    names is checked for its recorded size, then the manifest is made visible) or
    `abort` (this save's data goes; never raises).
    """

    final: str
    staging: str
    manifest_bytes: int

    def data_name(self, rank: int) -> str: ...
    def finalize(self, manifest: Manifest) -> None: ...
    def abort(self) -> None: ...


class Storage(Protocol):
    def state(self, path: str) -> DirState: ...
    def is_committed(self, path: str) -> bool: ...
    def open_checkpoint(self, path: str) -> OpenCheckpoint: ...
    # -- write side
    def begin_commit(self, final: str, *, overwrite: bool, save_id: str,
                     world_size: int) -> CheckpointWrite: ...
    def open_sink(self, path: str, rank: int | None = None) -> DataSink: ...
    # -- a root of checkpoints (the manager, ls, gc): small objects, listing, deletion
    def children(self, root: str) -> list[tuple[str, bool]]: ...
    def read_small(self, path: str, limit: int) -> bytes | None: ...
    def write_small(self, path: str, data: bytes) -> None: ...
    def remove_small(self, path: str) -> None: ...
    def delete_checkpoint(self, root: str, name: str) -> bool: ...


def _open_regular(name: str, dir_fd: int | None, where: str) -> int:
    """Open a regular file without following a symlink or blocking on a FIFO."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CorruptCheckpointError(f"{where}: is a symlink; shardckpt never follows links "
                                         f"out of a checkpoint. Replace it by the file.",
                                         path=where) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CorruptCheckpointError(f"{where}: is not a regular file (a FIFO, device or "
                                     f"directory); the checkpoint is damaged.", path=where)
    os.set_blocking(fd, True)
    return fd


class LocalFile:
    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path
        self.size = os.fstat(fd).st_size
        self._stream_fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def pread(self, length: int, offset: int) -> bytes:
        # One descriptor serves every read of a load, in the planner's order rather
        # than the file's: tell the kernel each range is wanted whole, or its
        # readahead heuristics see "random" access and read it page by page.
        # Each read through a fresh open file description of the same inode: one
        # descriptor shared by every read of a load (in the planner's order, not the
        # file's) looks like random access to the kernel, whose readahead then halves
        # cold-read speed (measured: 1.0 s against 0.55 s for 1 GB). /proc/self/fd
        # reopens the inode held open, so an overwrite swapping files under the
        # checkpoint's name cannot reach this read.
        try:
            fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no /proc (not Linux, or hidden): the shared descriptor
            return os.pread(self.fd, length, offset)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def _stream_fd(self) -> int:
        """This thread's own open file description of the inode (see pread): a read-ahead
        stream reads its pieces in order, and keeps the kernel's readahead state to
        itself. Reopening for every read instead costs 25 % on a cold 256 MB read
        (measured: 2.2 against 3.0 GB/s)."""
        tid = threading.get_ident()
        with self._lock:
            fd = self._stream_fds.get(tid)
            if fd is None:
                try:
                    fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDONLY | os.O_CLOEXEC)
                except OSError:  # no /proc: the shared descriptor
                    fd = self.fd
                self._stream_fds[tid] = fd
            return fd

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read into `buf` from `offset` (parallel loads: no copy out of a bytes object);
        returns the bytes read, fewer only at the end of the file."""
        fd = self._stream_fd()
        got = 0
        while got < len(buf):
            n = os.preadv(fd, [buf[got:]], offset + got)
            if n <= 0:
                break
            got += n
        return got

    def close(self) -> None:
        with self._lock:
            for fd in self._stream_fds.values():
                if fd != self.fd:
                    os.close(fd)
            self._stream_fds.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class LocalCheckpoint:
    """A checkpoint directory held open by file descriptor."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._subdirs: dict[str, int] = {}
        self._files: dict[str, LocalFile] = {}

    def _dir_fd(self, sub: str) -> int:
        fd = self._subdirs.get(sub)
        if fd is None:
            where = os.path.join(self.path, sub)
            try:
                fd = os.open(sub, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._dfd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise CorruptCheckpointError(
                        f"{where}: is not a directory of the checkpoint (a symlink or a file); "
                        f"shardckpt never follows links out of a checkpoint.", path=where) from None
                raise
            self._subdirs[sub] = fd
        return fd

    def replaced(self) -> bool:
        """True if `path` no longer names the directory held open (an overwrite swapped
        another one in, or it was deleted)."""
        try:
            now, held = os.stat(self.path), os.fstat(self._dfd)
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def read_manifest(self) -> bytes:
        where = os.path.join(self.path, MANIFEST_NAME)
        fd = _open_regular(MANIFEST_NAME, self._dfd, where)
        try:
            size = os.fstat(fd).st_size
            if size > MAX_MANIFEST_BYTES:
                raise CorruptCheckpointError(f"{where}: {size} bytes is not a manifest "
                                             f"shardckpt wrote; the checkpoint is damaged.",
                                             path=where)
            chunks = []
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_data(self, rel: str) -> LocalFile:
        f = self._files.get(rel)
        if f is None:
            sub, name = rel.split("/", 1)  # validated by the format layer: data/<name>
            where = os.path.join(self.path, rel)
            f = self._files[rel] = LocalFile(_open_regular(name, self._dir_fd(sub), where), where)
        return f

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        for fd in self._subdirs.values():
            os.close(fd)
        self._files.clear()
        self._subdirs.clear()
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    def __del__(self) -> None:  # a reader dropped without close() must not leak fds
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass


class LocalStorage:
    """Checkpoints as directories of a local (or POSIX network) filesystem."""

    def is_committed(self, path: str) -> bool:
        return self.state(path) == DirState.COMMITTED

    def state(self, path: str) -> DirState:
        try:
            st = os.stat(path)  # the path itself may be a link the user made
        except FileNotFoundError:
            return DirState.MISSING
        except OSError:
            return DirState.OTHER
        if not stat.S_ISDIR(st.st_mode):
            return DirState.OTHER
        for name, state in ((MANIFEST_NAME, DirState.COMMITTED), (PARTIAL_MARKER, DirState.PARTIAL)):
            try:
                if stat.S_ISREG(os.lstat(os.path.join(path, name)).st_mode):
                    return state
            except OSError:
                pass
        try:
            return DirState.EMPTY if not os.listdir(path) else DirState.OTHER
        except OSError:
            return DirState.OTHER

    def open_checkpoint(self, path: str) -> LocalCheckpoint:
        return LocalCheckpoint(path)

    # The write side delegates to today's code (io/commit.py, io/fsutil.py), imported
    # on use: commit.py itself imports this module.
    def begin_commit(self, final: str, *, overwrite: bool, save_id: str,
                     world_size: int) -> CheckpointWrite:
        from .commit import Commit

        return Commit.create(final, overwrite=overwrite, save_id=save_id, world_size=world_size)

    def open_sink(self, path: str, rank: int | None = None) -> DataSink:
        from .sinks import open_sink

        return open_sink(os.path.dirname(path) or ".", os.path.basename(path), rank=rank)

    def children(self, root: str) -> list[tuple[str, bool]]:
        try:
            names = os.listdir(root)
        except OSError:
            return []
        out = []
        for n in names:
            try:
                out.append((n, stat.S_ISDIR(os.lstat(os.path.join(root, n)).st_mode)))
            except OSError:
                continue
        return out

    def read_small(self, path: str, limit: int) -> bytes | None:
        try:
            fd = _open_regular(path, None, path)
        except (OSError, CorruptCheckpointError):
            return None
        try:
            return os.read(fd, limit + 1)
        except OSError:
            return None
        finally:
            os.close(fd)

    def write_small(self, path: str, data: bytes) -> None:
        from .fsutil import write_file_durable

        write_file_durable(path, data)

    def remove_small(self, path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def delete_checkpoint(self, root: str, name: str) -> bool:
        import uuid

        from ..format.names import trash_name
        from .foreign import remove_checkpoint_dir

        return remove_checkpoint_dir(os.path.join(root, name),
                          os.path.join(root, trash_name(name, uuid.uuid4().hex[:12])))


LOCAL = LocalStorage()

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: Any) -> bool:
    """True for `s3://...`, `gs://...`, `memory://...`, `file://...`: not a plain local path."""
    return isinstance(path, str) and bool(_URL_RE.match(path))


def norm_path(path: str | os.PathLike) -> str:
    """A checkpoint path as shardckpt reports it: absolute for local paths, URLs as given
    (without a trailing slash)."""
    p = os.fspath(path)
    return p.rstrip("/") if is_url(p) else os.path.abspath(p)


def join(path: str, *names: str) -> str:
    """`path`/name for a local path or a URL (os.path.join would drop a URL's meaning
    nowhere on POSIX, but this says what is meant)."""
    if is_url(path):
        return "/".join([path.rstrip("/"), *names])
    return os.path.join(path, *names)


def split_path(path: str) -> tuple[str, str]:
    """(parent, name) of a checkpoint path as `norm_path` gives it, local or URL."""
    p = norm_path(path)
    if is_url(p):
        head, _, name = p.rpartition("/")
        return head, name
    return os.path.split(p)


def storage_for(path: str, storage_options: dict | None = None) -> Storage:
    """The Storage that holds `path`: the local filesystem for plain paths, object
    storage (S3 natively, anything else through fsspec) for URLs. `storage_options`
    given once for a bucket stay bound to it for later calls in this process."""
    if is_url(path):
        from .objstore import remote_storage  # lazy: boto3 / fsspec only for URL users

        return remote_storage(path, storage_options)
    return LOCAL
