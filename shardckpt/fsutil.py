"""Durable filesystem primitives: fsync of files and directories, atomic publish."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import uuid

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: str, data: bytes) -> None:
    """Write via a temporary name, fsync, then rename: readers never see half a file."""
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def dir_size(path: str) -> int:
    """Bytes of the files below `path` (files vanishing meanwhile count as 0)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _renameat2_exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE). False if unsupported."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if not _libc or not hasattr(_libc, "renameat2"):
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), a)


def publish_dir(staging: str, final: str, trash: str) -> None:
    """Make `staging` visible as `final` in one atomic step.

    When `final` already holds a committed checkpoint it is swapped out atomically
    (readers see the old or the new one, never neither), then removed.
    """
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.lexists(final):
        os.rename(staging, final)
        fsync_dir(parent)
        return
    if os.path.isdir(final) and not os.listdir(final):
        os.rmdir(final)
        os.rename(staging, final)
        fsync_dir(parent)
        return
    if _renameat2_exchange(staging, final):
        fsync_dir(parent)
        shutil.rmtree(staging, ignore_errors=True)
        return
    # No atomic exchange on this filesystem: move the old one aside first. A crash
    # in between leaves it under the trash name, where `shardckpt gc` finds it.
    os.rename(final, trash)
    os.rename(staging, final)
    fsync_dir(parent)
    shutil.rmtree(trash, ignore_errors=True)


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
