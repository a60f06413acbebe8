"""`shardckpt ls`: the step checkpoints of a manager root, and leftovers of interrupted saves.

Reads manifests and pointer files only (no data file), needs no process group
and writes nothing.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointNotFoundError, NotACheckpointError
from ..format.names import MANIFEST_NAME, parse_leftover
from ..io.fsutil import dir_size
from .report import human_bytes, human_seconds, plural


@dataclass
class LsEntry:
    step: int
    name: str
    path: str
    size_bytes: int
    created_unix: float
    pointers: list[str]
    metrics: dict[str, Any]
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "name": self.name, "path": self.path,
                "size_bytes": self.size_bytes, "created": _iso(self.created_unix),
                "created_unix": self.created_unix, "pointers": self.pointers,
                "metrics": self.metrics, "ok": self.ok, "problem": self.problem}


@dataclass
class LsLeftover:
    name: str
    kind: str  # "partial" (an interrupted save) or "old" (a replaced copy on its way out)
    checkpoint: str  # the checkpoint name it belongs to
    bytes: int
    age_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "checkpoint": self.checkpoint,
                "bytes": self.bytes, "age_seconds": self.age_seconds}


@dataclass
class LsReport:
    root: str
    latest: str | None  # path of the newest valid checkpoint (`shardckpt.latest`)
    pointers: dict[str, str] = field(default_factory=dict)  # "latest"/"best" -> name
    checkpoints: list[LsEntry] = field(default_factory=list)
    leftovers: list[LsLeftover] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"root": self.root, "latest": self.latest, "pointers": self.pointers,
                "checkpoints": [c.to_dict() for c in self.checkpoints],
                "leftovers": [x.to_dict() for x in self.leftovers]}

    def __str__(self) -> str:
        n_bad = sum(not c.ok for c in self.checkpoints)
        head = f"{self.root}: {plural(len(self.checkpoints), 'checkpoint')}"
        if n_bad:
            head += f" ({n_bad} damaged)"
        if self.leftovers:
            head += f", {plural(len(self.leftovers), 'leftover')}"
        lines = [head]
        if self.checkpoints:
            rows = [("STEP", "NAME", "SIZE", "CREATED", "POINTERS", "METRICS", "VALIDITY")]
            for c in self.checkpoints:
                rows.append((str(c.step), c.name, human_bytes(c.size_bytes),
                             _iso(c.created_unix), ",".join(c.pointers) or "-",
                             _metrics(c.metrics) or "-", "OK" if c.ok else _short(c.problem)))
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
            for r in rows:
                lines.append("  ".join(f"{v:<{w}}" if i != 2 else f"{v:>{w}}"
                                       for i, (v, w) in enumerate(zip(r, widths)))
                             + "  " + r[-1])
        for x in self.leftovers:
            what = "interrupted save of" if x.kind == "partial" else "replaced copy of"
            lines.append(f"leftover {x.name}: {what} {x.checkpoint}, {human_bytes(x.bytes)}, "
                         f"{human_seconds(x.age_seconds)} old (`shardckpt gc` removes it)")
        return "\n".join(lines)


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "-"


def _metrics(m: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in sorted(m.items()))


def _short(problem: str | None, limit: int = 120) -> str:
    text = " ".join((problem or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def ls(root: str | os.PathLike, *, storage_options: dict | None = None) -> LsReport:
    """The checkpoints of a `CheckpointManager` root (oldest step first) and its leftovers."""
    from ..io.storage import is_url, norm_path, storage_for
    from ..manager.catalog import latest, list_checkpoints
    from ..manager.pointers import Pointers

    root = norm_path(root)
    if is_url(root):
        return _ls_remote(root, storage_for(root, storage_options))
    if not os.path.isdir(root):
        if os.path.lexists(root):
            raise NotACheckpointError(f"{root}: not a directory; `shardckpt ls` takes the root "
                                      f"directory of a CheckpointManager.")
        raise CheckpointNotFoundError(f"{root}: no such directory. Check the path.")
    if os.path.lexists(os.path.join(root, MANIFEST_NAME)):
        raise NotACheckpointError(f"{root}: is one checkpoint, not a manager root; use "
                                  f"`shardckpt inspect {root}`.")
    rep = LsReport(root=root, latest=latest(root), pointers=Pointers(root).names())
    for i in list_checkpoints(root):
        rep.checkpoints.append(LsEntry(step=i.step, name=i.name, path=i.path,
                                       size_bytes=i.size_bytes, created_unix=i.time,
                                       pointers=list(i.pointers), metrics=dict(i.metrics),
                                       problem=i.problem))
    now = time.time()
    for e in sorted(os.listdir(root)):
        parsed = parse_leftover(e)
        if parsed is None:
            continue
        p = os.path.join(root, e)
        try:
            age = max(0.0, now - os.lstat(p).st_mtime)
        except OSError:
            continue
        rep.leftovers.append(LsLeftover(name=e, kind=parsed[1].value, checkpoint=parsed[0],
                                        bytes=dir_size(p), age_seconds=age))
    return rep


def _ls_remote(root: str, st: Any) -> LsReport:
    from ..io.objstore.leftovers import find_leftovers
    from ..manager.catalog import latest, list_checkpoints
    from ..manager.pointers import Pointers

    if st.store.head(f"{root}/{MANIFEST_NAME}") is not None:
        raise NotACheckpointError(f"{root}: is one checkpoint, not a manager root; use "
                                  f"`shardckpt inspect {root}`.")
    rep = LsReport(root=root, latest=latest(root), pointers=Pointers(root).names())
    for i in list_checkpoints(root):
        rep.checkpoints.append(LsEntry(step=i.step, name=i.name, path=i.path,
                                       size_bytes=i.size_bytes, created_unix=i.time,
                                       pointers=list(i.pointers), metrics=dict(i.metrics),
                                       problem=i.problem))
    items, _ = find_leftovers(st, root, older_than=float("inf"))
    for x in items:
        if x.kind == "partial":
            rep.leftovers.append(LsLeftover(name=x.url.rsplit("/", 1)[-1], kind="partial",
                                            checkpoint=x.checkpoint, bytes=x.bytes,
                                            age_seconds=x.age))
    return rep
