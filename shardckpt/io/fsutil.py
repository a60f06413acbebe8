"""Durable filesystem primitives: fsync of files and directories, atomic publish."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import socket
import uuid

_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None
HOST = socket.gethostname()


def fsync_dir(path: str) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durable(path: str, data: bytes, *, sync_dir: bool = True) -> None:
    """Write via a temporary name, fsync, then rename: readers never see half a file.

    `sync_dir=False` leaves the fsync of the directory to a caller that makes several
    entries of it durable with one (the commit: the manifest, then the staging dir)."""
    _write_via_temp(path, data, durable=True)
    if sync_dir:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_file_atomic(path: str, data: bytes) -> None:
    """Temporary name, then rename, no fsync: whole or absent for every process on the
    host, but not kept across a crash of the machine. For files that only matter while
    their writer lives (a reader lease, a save's PARTIAL marker): a power loss kills the
    writer too, and the rules that judge a dead writer's leftovers do not need them."""
    _write_via_temp(path, data, durable=False)


def _write_via_temp(path: str, data: bytes, *, durable: bool) -> None:
    # Hidden, and named for its writer: a kill before the rename leaves a file that
    # no listing mistakes for a checkpoint and that `gc` recognises.
    from ..format.names import temp_name

    parent, name = os.path.split(path)
    tmp = os.path.join(parent, temp_name(name, os.getpid(), uuid.uuid4().hex[:6]))
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def dir_size(path: str) -> int:
    """Bytes of the files below `path` (files vanishing meanwhile count as 0)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(dirpath, f))
    return total


def _renameat2(a: str, b: str, flags: int) -> bool:
    """Linux renameat2 with `flags`. False if this kernel or filesystem lacks it."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else False
    if not _libc or not hasattr(_libc, "renameat2"):
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def rename_noreplace(a: str, b: str) -> None:
    """Rename `a` to `b`, failing with FileExistsError if `b` exists (even if empty).

    Check-then-rename would let two concurrent savers both win; renameat2
    (RENAME_NOREPLACE) decides atomically where the filesystem supports it.
    """
    if _renameat2(a, b, _RENAME_NOREPLACE):
        return
    if os.path.lexists(b):  # no renameat2 here: the best a plain rename allows
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), b)
    os.rename(a, b)


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (RENAME_EXCHANGE). False if unsupported."""
    return _renameat2(a, b, _RENAME_EXCHANGE)


def remove_dir(path: str, trash: str) -> bool:
    """Delete a directory so that no one ever sees it half-deleted under its name.

    The rename is the claim: of two deleters (or a deleter and a publisher) only
    one rename succeeds. False if `path` was already gone.
    """
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return False
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    shutil.rmtree(trash, ignore_errors=True)
    return True


def pid_alive(pid: int, host: str | None = None) -> bool | None:
    """Whether process `pid` lives; None when it is on another host (cannot tell)."""
    if host is not None and host != HOST:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def typed_os_error(e: OSError, who: str, what: str) -> BaseException:
    """An OSError of a save as the typed error a user sees: it names `who` (the
    checkpoint, file and rank) and `what` was being done, and says what to do."""
    from ..errors import InsufficientSpaceError, SaveFailedError

    detail = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        err: BaseException = InsufficientSpaceError(
            errno.ENOSPC, f"{who}: disk full while {what} ({detail}); nothing was committed "
            f"and earlier checkpoints are intact. Free space and retry.")
    else:
        # ENOMEM reaches here from a thread that could not start or a buffer that could
        # not be mapped: the disk is not what to check then.
        todo = ("Free memory (or lower SHARDCKPT_THREADS), then retry"
                if e.errno == errno.ENOMEM else "Check the disk and permissions, then retry")
        err = SaveFailedError(f"{who}: {what} failed ({detail}); nothing was committed and "
                              f"earlier checkpoints are intact. {todo}.")
    err.__cause__ = e
    return err
