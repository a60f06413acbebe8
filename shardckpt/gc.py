"""`shardckpt gc`: retention and leftover cleanup for a directory of checkpoints.

Removes (1) committed `step_*` checkpoints beyond `keep_last` (the
CheckpointManager's own retention rule, `retained_steps`), never one named by
the `latest` / `best` pointers or by a live reader lease, and (2) leftovers of
interrupted saves (`.NAME.partial-*`) and of replaced checkpoints (`.NAME.old-*`)
older than `older_than` seconds, so a save in progress is not pulled from under
its writer.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field

from . import format as fmt
from .fsutil import dir_size, fsync_dir

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


def _partial_owner_alive(path: str) -> bool:
    """A partial whose writer process still runs on this host is a save in progress."""
    try:
        with open(os.path.join(path, fmt.PARTIAL_MARKER), "rb") as f:
            marker = json.loads(f.read())
        if marker.get("host") != socket.gethostname():
            return False
        os.kill(int(marker["pid"]), 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _pointed(root: str) -> set[str]:
    from .manager import BEST_POINTER, LATEST_POINTER

    names = set()
    for p in (LATEST_POINTER, BEST_POINTER):
        try:
            with open(os.path.join(root, p), "rb") as f:
                v = json.loads(f.read())
            if isinstance(v, dict) and isinstance(v.get("name"), str):
                names.add(v["name"])
        except (OSError, ValueError):
            pass
    return names


def gc(root: str | os.PathLike, *, keep_last: int | None = None, older_than: float = 3600.0,
       dry_run: bool = False) -> GcReport:
    """Apply keep-last retention to `root/step_*` and remove stale leftovers.

    `keep_last=None` removes no committed checkpoint (leftovers only).
    """
    from .manager import CheckpointManager, retained_steps

    root = os.path.abspath(os.fspath(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"--keep-last must be >= 1, not {keep_last}")
    report = GcReport(root=root, dry_run=dry_run)
    protected = _pointed(root)
    actions: list[GcAction] = []
    if keep_last is not None:
        # The manager lists committed step checkpoints and knows the live reader
        # leases; its retention function decides, so `gc` and training agree.
        mgr = CheckpointManager(root, keep_last=keep_last, keep_best=0, preemption_signals=())
        try:
            infos = mgr.list()
            protected |= mgr._leased_names()
        finally:
            mgr.close()
        keep = retained_steps([(i.step, None) for i in infos], keep_last=keep_last, keep_best=0,
                              mode="min", keep_every=None)
        for i in infos:
            if i.step in keep:
                continue
            if i.name in protected:
                report.kept.append((i.name, "named by a latest/best pointer or a reader lease"))
                continue
            actions.append(GcAction(i.path, "checkpoint", f"beyond keep-last {keep_last}",
                                    i.size_bytes))
    now = time.time()
    for e in sorted(os.listdir(root)):
        parsed = fmt.parse_leftover(e)
        if parsed is None:
            continue
        name, kind = parsed
        p = os.path.join(root, e)
        age = now - os.lstat(p).st_mtime
        if age < older_than:
            report.kept.append((e, f"{kind} leftover only {age:.0f}s old"))
            continue
        if kind == "partial" and _partial_owner_alive(p):
            report.kept.append((e, "a save in progress (its process is alive)"))
            continue
        what = ("uncommitted save of " if kind == "partial" else "replaced copy of ") + name
        actions.append(GcAction(p, kind, what, dir_size(p)))
    for a in actions:
        if not dry_run:
            if a.kind == "checkpoint":
                # Rename first: a kill during rmtree must not leave a half-deleted
                # directory that still looks committed.
                trash = os.path.join(root, fmt.trash_name(os.path.basename(a.path),
                                                          uuid.uuid4().hex[:12]))
                os.rename(a.path, trash)
                fsync_dir(root)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                shutil.rmtree(a.path, ignore_errors=True)
        report.removed.append(a)
    return report
