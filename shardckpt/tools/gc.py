"""`shardckpt gc`: retention and leftover cleanup for a directory of checkpoints.

Removes (1) committed `step_*` checkpoints beyond `keep_last` (the
CheckpointManager's own retention rule, `retained_steps`), never one named by
the `latest` / `best` pointers or by a live reader lease, and (2) leftovers of
interrupted saves (`.NAME.partial-*`) and of replaced checkpoints (`.NAME.old-*`)
older than `older_than` seconds, so a save in progress is not pulled from under
its writer.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

from ..format.names import Leftover, parse_leftover, parse_temp, trash_name
from ..io.commit import staging_abandoned
from ..io.fsutil import dir_size, pid_alive, remove_dir
from ..io.storage import is_url, join, norm_path, storage_for
from ..manager import refcount
from ..manager.catalog import delete_checkpoint, list_checkpoints
from ..manager.leases import Leases
from ..manager.pointers import Pointers
from ..manager.retention import LastN

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> float:
    """'90', '30s', '15m', '1h', '2d', '1w' -> seconds."""
    t = text.strip().lower()
    try:
        if t and t[-1] in _UNITS:
            return float(t[:-1]) * _UNITS[t[-1]]
        return float(t)
    except ValueError:
        raise ValueError(f"bad age {text!r}: use a number with s, m, h, d or w (e.g. 1h)") from None


@dataclass
class GcAction:
    path: str
    kind: str  # "checkpoint", "partial", "old"
    reason: str
    bytes: int


@dataclass
class GcReport:
    root: str
    dry_run: bool
    removed: list[GcAction] = field(default_factory=list)
    kept: list[tuple[str, str]] = field(default_factory=list)  # (name, why)

    def to_dict(self) -> dict:
        return {"root": self.root, "dry_run": self.dry_run, "bytes_freed": self.bytes_freed,
                "removed": [{"path": a.path, "name": os.path.basename(a.path), "kind": a.kind,
                             "reason": a.reason, "bytes": a.bytes} for a in self.removed],
                "kept": [{"name": n, "why": w} for n, w in self.kept]}

    @property
    def bytes_freed(self) -> int:
        return sum(a.bytes for a in self.removed)

    def __str__(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        lines = [f"{self.root}: {verb} {len(self.removed)} item(s), "
                 f"{self.bytes_freed / 2**20:.1f} MiB"]
        lines += [f"  {verb} {os.path.basename(a.path)} ({a.reason})" for a in self.removed]
        lines += [f"  kept {n} ({why})" for n, why in self.kept]
        return "\n".join(lines)


def gc(root: str | os.PathLike, *, keep_last: int | None = None, older_than: float = 3600.0,
       dry_run: bool = False, storage_options: dict | None = None) -> GcReport:
    """Apply keep-last retention to the step checkpoints of `root` and remove stale leftovers.

    `keep_last=None` removes no committed checkpoint (leftovers only). A leftover
    of a save goes only when no live save owns it (its process is dead, or its
    heartbeat stopped for longer than `older_than`); it is claimed by a rename
    first, so a save publishing at that moment is never emptied.
    """
    root = norm_path(root)
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, not {keep_last}")
    if is_url(root):
        return _gc_remote(root, keep_last, older_than, dry_run, storage_options)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    report = GcReport(root=root, dry_run=dry_run)
    actions = _retention(root, keep_last, report)
    now = time.time()
    for e in sorted(os.listdir(root)):
        parsed = parse_leftover(e)
        if parsed is None:
            continue
        name, kind = parsed
        p = os.path.join(root, e)
        try:
            age = now - os.lstat(p).st_mtime
        except OSError:
            continue
        if kind == Leftover.PARTIAL:
            if not staging_abandoned(p, older_than):
                report.kept.append((e, "a save in progress (its process is alive or its "
                                       "heartbeat is recent)"))
                continue
        elif age < older_than:
            report.kept.append((e, f"{kind.value} leftover only {age:.0f}s old"))
            continue
        what = ("uncommitted save of " if kind == Leftover.PARTIAL else "replaced copy of ") + name
        actions.append(GcAction(p, kind.value, what, dir_size(p)))
    for e in sorted(os.listdir(root)):
        t = parse_temp(e)
        p = os.path.join(root, e)
        if t is None or os.path.islink(p) or not (os.path.isfile(p) or os.path.isdir(p)):
            continue
        try:
            age = now - os.lstat(p).st_mtime
        except OSError:
            continue
        if age >= older_than and pid_alive(t[1]) is False:
            actions.append(GcAction(p, "temp", f"unfinished write of {t[0]}", os.lstat(p).st_size))
    for a in actions:
        if not dry_run and a.kind == "temp":
            if os.path.isdir(a.path):  # a staging directory its creator never finished
                shutil.rmtree(a.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(a.path)
            report.removed.append(a)
            continue
        if not dry_run:
            if a.kind == "checkpoint":
                if not _drop(root, a):
                    continue
            else:
                base = parse_leftover(os.path.basename(a.path))[0]
                if not remove_dir(a.path, os.path.join(root, trash_name(base, uuid.uuid4().hex[:12]))):
                    continue
        report.removed.append(a)
    _sweep(root, report, dry_run)
    return report


def _drop(root: str, a: GcAction) -> bool:
    # Referenced by a kept incremental checkpoint: retired, not deleted (refcount.py).
    return refcount.drop(root, a.path.rstrip("/").rsplit("/", 1)[-1]) is not None


def _sweep(root: str, report: GcReport, dry_run: bool) -> None:
    """Retired checkpoints nothing references any more are leftovers too."""
    protected = set(Pointers(root).names().values()) | Leases(root).live_names(remove_stale=False)
    for name in refcount.sweepable(root, protected):
        path = join(root, name)
        size = _checkpoint_bytes(path)
        if dry_run or delete_checkpoint(root, name):
            report.removed.append(GcAction(path, "retired",
                                           "retired, and no checkpoint references it any more",
                                           size))


def _checkpoint_bytes(path: str) -> int:
    if is_url(path):
        return 0  # a listing per checkpoint for a figure: not worth it on object storage
    return dir_size(path)


def _retention(root: str, keep_last: int | None, report: GcReport) -> list[GcAction]:
    """Checkpoints beyond keep-last. The manager's own listing, leases and retention policy
    decide, so `gc` and training agree on what is kept."""
    if keep_last is None:
        return []
    protected = set(Pointers(root).names().values())
    infos = list_checkpoints(root)
    protected |= Leases(root).live_names(remove_stale=not report.dry_run)
    keep = LastN(keep_last).keep([(i.step, None) for i in infos])
    refs = refcount.references(root)
    actions: list[GcAction] = []
    for i in infos:
        if i.step in keep:
            continue
        if i.name in protected:
            report.kept.append((i.name, "named by a latest/best pointer or a reader lease"))
            continue
        users = refs.users_of(i.name) - {j.name for j in infos if j.step not in keep}
        if users:  # retired: it goes once nothing that is kept references it
            report.kept.append((i.name, f"retired, still referenced by "
                                        f"{', '.join(sorted(users))}"))
        actions.append(GcAction(i.path, "checkpoint", f"beyond keep-last {keep_last}",
                                0 if users else i.size_bytes))
    return actions


def _gc_remote(root: str, keep_last: int | None, older_than: float, dry_run: bool,
               storage_options: dict | None) -> GcReport:
    """gc of a root in an object store: retention as on disk; leftovers are markers of dead
    saves with their objects, unreferenced data objects, and dangling multipart uploads."""
    from ..io.objstore.leftovers import find_leftovers, remove_leftover

    st = storage_for(root, storage_options)
    report = GcReport(root=root, dry_run=dry_run)
    actions = _retention(root, keep_last, report)
    for a in actions:
        if dry_run or _drop(root, a):
            report.removed.append(a)
    items, kept = find_leftovers(st, root, older_than=older_than)
    report.kept += kept
    for item in items:
        if not dry_run:
            remove_leftover(st, item)
        report.removed.append(GcAction(item.url, item.kind, item.reason, item.bytes))
    _sweep(root, report, dry_run)
    return report
