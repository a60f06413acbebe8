"""The commit protocol: a hidden staging directory, then one atomic publish.

    c = Commit.create(final, overwrite=..., save_id=..., world_size=...)
    ... every rank writes into c.staging ...
    c.finalize(manifest)      # manifest durable, then published under `final`
    c.abort()                 # on failure: the staging directory goes

Shared by the DCP writer and the offline tools (reshard, convert), so every
checkpoint shardckpt produces is committed the same way.

The marker PARTIAL.json stays in the staging directory until the publish
rename, and the coordinator refreshes its mtime while the save runs: `gc`
treats a staging directory as abandoned only when its owner is provably dead
(same host) or its heartbeat has stopped, and claims it by renaming it before
deleting, so a save that publishes at the same moment either wins (gc's rename
fails) or fails loudly (its publish rename fails): it never reports success for
a directory gc emptied.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import time
import uuid

from ..errors import CheckpointExistsError, SaveFailedError, ShardckptError
from ..format import Manifest
from ..format.names import (
    DATA_DIR,
    MANIFEST_NAME,
    MAX_NAME_LEN,
    PARTIAL_MARKER,
    DirState,
    Leftover,
    data_file_name,
    parse_leftover,
    parse_temp,
    staging_name,
    temp_name,
    trash_name,
)
from .committed import remember_committed
from .foreign import carry_into, check_target
from .fsutil import (
    HOST,
    exchange,
    fsync_dir,
    pid_alive,
    remove_dir,
    rename_noreplace,
    typed_os_error,
    write_file_atomic,
    write_file_durable,
)
from .heartbeat import Heartbeat
from .storage import storage_for

HEARTBEAT_S = 30.0
_HEARTBEAT = Heartbeat(HEARTBEAT_S)
# The temp name a staging directory is built under (short: it must fit NAME_MAX
# whatever the checkpoint's name).
INIT_NAME = "shardckpt-staging"


def _token() -> str:
    return uuid.uuid4().hex[:12]


def read_marker(staging: str) -> dict | None:
    try:
        with open(os.path.join(staging, PARTIAL_MARKER), "rb") as f:
            m = json.loads(f.read(1 << 16))
        return m if isinstance(m, dict) else None
    except (OSError, ValueError, RecursionError):
        return None


def heartbeat_age(staging: str) -> float | None:
    """Seconds since the owning save last touched its staging directory."""
    try:
        return time.time() - os.stat(staging).st_mtime
    except OSError:
        return None


def staging_abandoned(staging: str, older_than: float) -> bool:
    """True if no live save owns this staging directory."""
    marker = read_marker(staging)
    age = heartbeat_age(staging)
    if age is None:
        return False
    if marker is None:
        return _unmarked_abandoned(staging, age, older_than)
    try:
        alive = pid_alive(int(marker.get("pid", -1)), str(marker.get("host", "")))
    except (TypeError, ValueError):
        alive = None
    if alive is False:
        return True
    # Alive or on another host: only a stopped heartbeat says it is abandoned.
    return age > max(older_than, 4 * HEARTBEAT_S)


def _unmarked_abandoned(staging: str, age: float, older_than: float) -> bool:
    """A staging directory without its marker: killed while it was being created
    (an empty data/, perhaps the marker's temp file), or something we do not know."""
    try:
        entries = os.listdir(staging)
        data = os.listdir(os.path.join(staging, DATA_DIR)) if DATA_DIR in entries else []
    except OSError:
        return False
    temps = [t for e in entries if (t := parse_temp(e)) is not None]
    if set(entries) - {DATA_DIR} - {e for e in entries if parse_temp(e)} or data:
        return age > max(older_than, 2 * HEARTBEAT_S)  # not a creation we recognise
    if any(t[0] == PARTIAL_MARKER and pid_alive(t[1]) is False for t in temps):
        return True  # its creator died writing the marker
    # Created and not yet marked: maybe a live creator about to write the marker,
    # which a gc looping beside it must not starve; gone once clearly old.
    return age > max(older_than, 2 * HEARTBEAT_S)


def check_name(final: str) -> None:
    name = os.path.basename(final)
    if not name or name in (".", ".."):
        raise SaveFailedError(f"{final!r}: not a checkpoint path (no final name).")
    if len(name.encode()) > MAX_NAME_LEN:
        raise SaveFailedError(
            f"{final}: the name is {len(name.encode())} bytes; checkpoint names may have at most "
            f"{MAX_NAME_LEN} (the staging name must fit the filesystem's 255). Choose a shorter name.")


class Commit:
    """One checkpoint being written at `final`, staged under a hidden sibling."""

    def __init__(self, final: str, staging: str, overwrite: bool) -> None:
        self.final = final
        self.staging = staging
        self.overwrite = overwrite
        self.manifest_bytes = 0
        _HEARTBEAT.add(staging)

    @classmethod
    def create(cls, final: str, *, overwrite: bool, save_id: str, world_size: int) -> Commit:
        """Check the target and create the staging directory for a checkpoint at `final`."""
        final = os.path.abspath(final)
        check_name(final)
        refuse_unpublishable(final)
        state = storage_for(final).state(final)
        if state == DirState.COMMITTED and not overwrite:
            raise _exists(final)
        if state == DirState.OTHER:  # a directory of other files, kept as DCP keeps them
            check_target(final, committed=False)
        parent, name = os.path.split(final)
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise typed_commit_error(e, final, "creating its parent directory") from e
        _remove_dead_partials(parent, name)
        staging = os.path.join(parent, staging_name(name, _token()))
        # Built under a temp name and renamed: a staging directory never exists
        # without its marker, so gc never has to guess about a half-made one. Nothing
        # here is fsynced: the staging directory only has to outlive its writer's
        # process, never the machine (a power loss kills the writer too, and gc's rules
        # for a dead writer's leftovers hold with or without the marker), and finalize
        # makes durable everything a committed checkpoint needs before it publishes.
        init = os.path.join(parent, temp_name(INIT_NAME, os.getpid(), uuid.uuid4().hex[:6]))
        try:
            os.makedirs(os.path.join(init, DATA_DIR))
            marker = {"target": name, "save_id": save_id, "world_size": world_size,
                      "started_unix": time.time(), "host": HOST, "pid": os.getpid()}
            write_file_atomic(os.path.join(init, PARTIAL_MARKER), json.dumps(marker).encode())
            os.rename(init, staging)
        except BaseException as e:
            shutil.rmtree(init, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise typed_commit_error(e, final, "creating the staging directory") from e
            raise
        return cls(final, staging, overwrite)

    def data_name(self, rank: int) -> str:
        return data_file_name(rank)

    def _stop_heartbeat(self) -> None:
        _HEARTBEAT.remove(self.staging)

    def finalize(self, manifest: Manifest) -> None:
        """Write the manifest durably, then publish the directory under its final name."""
        self._stop_heartbeat()
        staging, final = self.staging, self.final
        if read_marker(staging) is None:
            raise SaveFailedError(
                f"{final}: the staging directory {staging} was removed or emptied by another "
                f"process (a concurrent `shardckpt gc`?) before the commit; nothing was committed. "
                f"Retry the save.")
        try:
            data = manifest.to_bytes()
            # One fsync per directory: data/ for the rank files' entries (each rank
            # fsynced its own file), then the staging dir for manifest.json and data/.
            write_file_durable(os.path.join(staging, MANIFEST_NAME), data, sync_dir=False)
            self.manifest_bytes = len(data)
            fsync_dir(os.path.join(staging, DATA_DIR))
            fsync_dir(staging)
        except OSError as e:
            raise typed_commit_error(e, final, "writing the manifest") from e
        try:
            publish(staging, final, overwrite=self.overwrite)
        except FileNotFoundError:
            raise SaveFailedError(
                f"{final}: the staging directory {staging} was claimed by another process (a "
                f"concurrent `shardckpt gc`?) during the commit; nothing was committed. "
                f"Retry the save.") from None
        except (ShardckptError, Published):
            raise
        except OSError as e:
            raise typed_commit_error(e, final, "publishing it") from e
        remember_committed(final, manifest, data)
        # The marker only says "uncommitted" to readers that find no manifest; it
        # goes now that the manifest is there. Not fsynced: a crash that brings it
        # back leaves it as harmless as a crash before the unlink.
        try:
            os.unlink(os.path.join(final, PARTIAL_MARKER))
        except OSError:
            pass

    def abort(self) -> None:
        self._stop_heartbeat()
        if os.path.isdir(self.staging):
            shutil.rmtree(self.staging, ignore_errors=True)


class Published(SaveFailedError):
    """The checkpoint was published, but making the publish durable failed."""


def typed_commit_error(e: OSError, final: str, what: str) -> BaseException:
    """An OSError of the commit protocol as a typed error naming the checkpoint."""
    return typed_os_error(e, final, what)


def _exists(final: str) -> CheckpointExistsError:
    return CheckpointExistsError(
        f"{final}: Checkpoint already exists (a committed checkpoint is there); pass "
        f"overwrite=True or choose another path.")


def _remove_dead_partials(parent: str, name: str) -> None:
    """Leftovers of earlier saves to the same name whose process died on this host."""
    try:
        entries = os.listdir(parent)
    except OSError:
        return
    for e in entries:
        path = os.path.join(parent, e)
        t = parse_temp(e)
        if t is not None and t[0] == INIT_NAME:
            if pid_alive(t[1]) is False and os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)  # a staging directory never finished
            continue
        p = parse_leftover(e)
        if p is None or p[0] != name:
            continue
        if p[1] == Leftover.OLD or staging_abandoned(path, older_than=float("inf")):
            remove_dir(path, os.path.join(parent, trash_name(name, _token())))


def _fsync_published(parent: str, final: str) -> None:
    try:
        fsync_dir(parent)
    except OSError as e:
        err = Published(f"{final}: published, but the fsync of {parent} failed ({e.strerror}); "
                        f"the checkpoint is visible now but may not survive a crash of the "
                        f"machine. Check the disk and save again.")
        raise err from e


def _own_data(final: str) -> set[str]:
    """The data files the committed checkpoint at `final` names (all of data/ if unreadable)."""
    from .reader import read_manifest

    try:
        return set(read_manifest(final).files)
    except (ShardckptError, OSError):
        d = os.path.join(final, DATA_DIR)
        return {f"{DATA_DIR}/{n}" for n in os.listdir(d)} if os.path.isdir(d) else set()


def _adopt_mode(staging: str, final: str) -> None:
    """Give `staging` the permissions (and, where allowed, the owner) of the directory at
    `final` it is about to replace: a directory made for the job (a group-writable or
    sticky one, or one owned by the job's user) keeps them across saves."""
    try:
        st = os.stat(final)
        os.chmod(staging, stat.S_IMODE(st.st_mode))
    except OSError:
        return
    try:
        held = os.stat(staging)
        if (held.st_uid, held.st_gid) != (st.st_uid, st.st_gid):
            os.chown(staging, st.st_uid, st.st_gid)
    except OSError:  # not permitted (not root): the mode is what matters most
        pass


def refuse_unpublishable(final: str) -> None:
    """Raise before anything is written if a save could never publish at `final`: the
    checkpoint replaces the directory at its path, which cannot be a mount point nor this
    process's working directory (or one above it)."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    real = os.path.realpath(final)
    if cwd is not None and (cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)):
        raise CheckpointExistsError(
            f"{final}: is this process's working directory or holds it; a save replaces the "
            f"directory at its path, so save to a directory of its own, e.g. "
            f"{os.path.join(final, 'checkpoint')}.")
    if os.path.isdir(real) and os.path.ismount(real):
        raise CheckpointExistsError(
            f"{final}: is a mount point; a checkpoint is published by renaming a directory "
            f"onto its path, which a mount point cannot take. Save to a directory inside it, "
            f"e.g. {os.path.join(final, 'checkpoint')}.")


def publish(staging: str, final: str, *, overwrite: bool, replace_any: bool = False) -> None:
    """Make `staging` visible as `final` in one atomic step.

    A committed checkpoint already at `final` is swapped out atomically (readers
    see the old or the new one, never neither) when `overwrite`, else the save
    fails with CheckpointExistsError; an empty directory there is replaced. Files
    there that shardckpt did not write are kept (foreign.py); `replace_any`
    replaces the whole directory (an export the tools wrote themselves).
    """
    parent, name = os.path.split(os.path.abspath(final))
    for _ in range(3):
        try:
            rename_noreplace(staging, final)
        except FileExistsError:
            pass
        except OSError as e:
            if e.errno != errno.ENOTEMPTY:
                raise
        else:
            _fsync_published(parent, final)
            return
        state = storage_for(final).state(final)
        _adopt_mode(staging, final)
        if state == DirState.EMPTY:
            try:
                os.rmdir(final)
            except OSError:
                pass
            continue
        if state == DirState.MISSING:
            continue
        committed = state == DirState.COMMITTED
        if committed and not overwrite:
            raise _exists(final)
        if not replace_any:
            check_target(final, committed)
            carry_into(final, staging, _own_data(final) if committed else None)
        if exchange(staging, final):
            try:
                _fsync_published(parent, final)
            finally:  # `staging` now holds the replaced checkpoint
                shutil.rmtree(staging, ignore_errors=True)
            return
        # No atomic exchange on this filesystem: move the old one aside first. A
        # crash in between leaves it under the trash name, where `gc` finds it.
        trash = os.path.join(parent, trash_name(name, _token()))
        os.rename(final, trash)
        os.rename(staging, final)
        try:
            _fsync_published(parent, final)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    raise SaveFailedError(f"{final}: could not publish (the path kept changing under a "
                          f"concurrent writer); the data is in {staging}.")
