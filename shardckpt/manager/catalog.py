"""What a manager root holds: its committed step checkpoints, read without a process group.

`list_checkpoints(root)` and `latest(root)` are for anyone (a dashboard, an
evaluation job, a shell): no collectives, no signal handlers, no writes.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import uuid
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError, ShardckptError
from ..format import Manifest
from ..format.names import MANIFEST_NAME, trash_name
from ..io.committed import read_committed
from ..io.foreign import remove_checkpoint_dir
from ..io.reader import CheckpointReader
from ..io.storage import is_url, join, norm_path, storage_for
from .names import LATEST_POINTER, parse_step
from .pointers import Pointers


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint under a manager root."""

    step: int
    name: str
    path: str
    time: float  # commit time (manifest `created_unix`), seconds since the epoch
    size_bytes: int  # data files + manifest, as the manifest records them
    metrics: dict[str, Any]
    pointers: tuple[str, ...]  # "latest" and/or "best" where a pointer names it
    problem: str | None = None  # set when the manifest cannot be read


@dataclass(frozen=True)
class ManagerSaveResult:
    """What `CheckpointManager.save` did. True (as a bool) when a preemption was requested:
    the save was then synchronous and the caller should stop."""

    path: str
    step: int
    seconds: float  # blocking time (the stall, for an async save)
    bytes_written: int  # 0 until an async save has committed
    bytes_logical: int
    metrics: dict[str, Any]
    committed: bool  # False for an async save still in flight
    preempted: bool = False

    def __bool__(self) -> bool:
        return self.preempted

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def step_entries(root: str) -> list[tuple[int, str]]:
    """(step, name) of every directory in `root` named like a step, symlinks excluded."""
    if is_url(root):
        # A listing that fails (server down, credentials refused, no bucket) raises: read as
        # "no checkpoints", it would make restore() start the run again from step 0.
        kids = storage_for(root).children(root)
        return sorted((s, n) for n, d in kids if d and (s := parse_step(n)) is not None)
    try:
        entries = os.listdir(root)
    except OSError:
        return []
    out = []
    for name in entries:
        step = parse_step(name)
        if step is None:
            continue
        try:
            if not stat.S_ISDIR(os.lstat(os.path.join(root, name)).st_mode):
                continue  # a symlinked step directory could lead anywhere
        except OSError:
            continue
        out.append((step, name))
    out.sort()
    return out


def pointer_current(ptr: dict, ptr_step: int, newest_step: int, newest_created: float) -> bool:
    """Whether the `latest` pointer, naming a checkpoint of step `ptr_step`, wins over the
    highest step: it names that step or a higher one, or it was written after that
    checkpoint was committed (a rollback: restore step 2, save 3 again; the abandoned
    branch's step 4 is older than the pointer). A pointer written before the highest
    step was committed lags behind it (a crash between commit and pointer update)."""
    updated = ptr.get("updated_unix")
    return ptr_step >= newest_step or (isinstance(updated, (int, float))
                                       and updated >= newest_created)


def created(path: str) -> float:
    """When the checkpoint at `path` was committed (its manifest's time; else the
    directory's mtime, else 0)."""
    try:
        return read_committed(path).created_unix
    except (ShardckptError, OSError):
        try:
            return 0.0 if is_url(path) else os.path.getmtime(path)
        except OSError:
            return 0.0


def newest_first(root: str, entries: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """(step, name) entries in the order restore tries them: the `latest` pointer's first
    when it is current (pointer_current), then by step, highest first."""
    order = entries[::-1]
    p = Pointers(root).read(LATEST_POINTER)
    if p is None or not order:
        return order
    named = [e for e in order if e[1] == p["name"]]
    if named and pointer_current(p, named[0][0], order[0][0], created(join(root, order[0][1]))):
        order = named + [e for e in order if e is not named[0]]
    return order


def manifest_size(m: Manifest, path: str) -> int:
    if is_url(path):
        info = storage_for(path).store.head(join(path, MANIFEST_NAME))
        return (info.size if info else 0) + sum(f.size for f in m.files.values())
    try:
        own = os.path.getsize(os.path.join(path, MANIFEST_NAME))
    except OSError:
        own = 0
    return own + sum(f.size for f in m.files.values())


def list_checkpoints(root: str | os.PathLike, *,
                     storage_options: dict | None = None) -> list[CheckpointInfo]:
    """Committed checkpoints under `root` (a directory or a URL), oldest step first; a
    damaged one has `problem` set."""
    root = norm_path(root)
    if storage_options is not None:
        storage_for(root, storage_options)
    ptrs = Pointers(root).names()
    out = []
    for step, name in step_entries(root):
        path = os.path.join(root, name)
        if not storage_for(path).is_committed(path):
            continue
        problem = None
        metrics: dict[str, Any] = {}
        size = 0
        try:
            m = read_committed(path)
            metrics = dict(m.user_metadata.get("metrics") or {}) if isinstance(
                m.user_metadata.get("metrics"), dict) else {}
            created = m.created_unix
            size = manifest_size(m, path)
        except (ShardckptError, OSError) as e:
            problem = str(e)
            try:
                created = 0.0 if is_url(path) else os.path.getmtime(path)
            except OSError:
                created = 0.0
        out.append(CheckpointInfo(
            step=step, name=name, path=path, time=created, size_bytes=size, metrics=metrics,
            pointers=tuple(k for k, v in sorted(ptrs.items()) if v == name), problem=problem))
    return out


def latest(root: str | os.PathLike, *, storage_options: dict | None = None) -> str | None:
    """Path of the newest valid committed checkpoint under `root`, or None.

    The highest step, unless the `latest` pointer is current (pointer_current): after
    a rollback it names the new branch's checkpoint, not the abandoned higher step.
    """
    root = norm_path(root)
    infos = [i for i in list_checkpoints(root, storage_options=storage_options)
             if i.problem is None]
    if not infos:
        return None
    p = Pointers(root).read(LATEST_POINTER)
    order = infos[::-1]
    if p is not None:
        named = [i for i in infos if i.name == p["name"]]
        if named and pointer_current(p, named[0].step, order[0].step, order[0].time):
            order = named + [i for i in order if i is not named[0]]
    # "Valid" as restore() means it: a checkpoint whose data file is missing or truncated
    # would fail the load its caller is about to make.
    for info in order:
        if files_damage(info.path) is None:
            return info.path
    return None


def precheck(reader: CheckpointReader) -> CorruptCheckpointError | None:
    """Cheap check before a load: every data file is there with its recorded size."""
    bad = []
    for rel, info in sorted(reader.manifest.files.items()):
        try:
            size = reader.file_size(rel)
        except ShardckptError as e:
            bad.append(f"{rel} (rank {info.rank}): {e}")
            continue
        except OSError:
            bad.append(f"{rel} (rank {info.rank}): data file is missing")
            continue
        if size != info.size:
            bad.append(f"{rel} (rank {info.rank}): size {size} bytes, manifest says {info.size} "
                       f"(truncated or overwritten)")
    if bad:
        return CorruptCheckpointError(f"{reader.path}: checkpoint is damaged: " + "; ".join(bad),
                                      path=reader.path)
    return None


def files_damage(path: str) -> str | None:
    """Why the checkpoint at `path` cannot be used, by the cheap check a restore makes first
    (every data file, its own and its bases', there at its recorded size), or None."""
    try:
        reader = CheckpointReader(path)
    except ShardckptError as e:
        return str(e)
    try:
        err = precheck(reader) or reader.bases.precheck()
    except ShardckptError as e:
        err = e
    finally:
        reader.close()
    return None if err is None else str(err)


def delete_checkpoint(root: str, name: str) -> bool:
    # Rename first: a kill during rmtree must not leave a half-deleted directory
    # that still looks committed. The trash name is a leftover that the next
    # save (or `shardckpt gc`) removes.
    if is_url(root):
        return storage_for(root).delete_checkpoint(root, name)
    return remove_checkpoint_dir(os.path.join(root, name),
                      os.path.join(root, trash_name(name, uuid.uuid4().hex[:12])))
