"""`shardckpt audit`: is this checkpoint enough to resume training exactly?

Checks the key layout `TrainState` writes (``<prefix>model``, ``optim``,
``scheduler``, ``scaler``, ``progress``, ``data``, ``__rank<N>__``) and says, for
each missing piece, what resuming from it would do. Reads only the manifest and
a few small objects (optimizer param lists, saved world size).
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..format.keys import is_rank_component
from ..io.reader import CheckpointReader
from .report import plural

_SECTIONS = ("model", "optim", "optimizer", "scheduler", "scaler", "progress", "data")


@dataclass
class Finding:
    what: str
    consequence: str
    severity: str  # "missing" (resume is not exact) or "note"

    def __str__(self) -> str:
        tag = "MISSING" if self.severity == "missing" else "note"
        return f"[{tag}] {self.what}: {self.consequence}"


@dataclass
class AuditReport:
    path: str
    prefix: str
    present: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.severity == "missing" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "prefix": self.prefix, "ok": self.ok,
                "present": list(self.present), "findings": [vars(f) for f in self.findings]}

    def __str__(self) -> str:
        head = (f"{self.path}: {'resumable' if self.ok else 'NOT fully resumable'}"
                f" (training state under {self.prefix or '<root>'!r})")
        lines = [head]
        lines += [f"  [ok] {p}" for p in self.present]
        lines += [f"  {f}" for f in self.findings]
        return "\n".join(lines)


def _find_prefix(keys: list[str]) -> str:
    """The key prefix under which the training state lives ('' or e.g. 'train.')."""
    counts: Counter[str] = Counter()
    for k in keys:
        parts = k.split(".")
        for i, p in enumerate(parts[:-1]):
            if p in _SECTIONS or is_rank_component(p) is not None:
                counts[".".join(parts[:i]) + ("." if i else "")] += 1
                break
    return counts.most_common(1)[0][0] if counts else ""


def audit(path: str | os.PathLike, *, prefix: str | None = None) -> AuditReport:
    """Completeness of a training checkpoint; `report.ok` is False when a resume is not exact."""
    path = os.fspath(path)
    with CheckpointReader(path) as reader:
        return _audit(reader, prefix)


def _audit(reader: CheckpointReader, prefix: str | None) -> AuditReport:
    path = reader.path
    m = reader.manifest
    keys = m.keys()
    if prefix is None:
        prefix = _find_prefix(keys)
    elif prefix and not prefix.endswith("."):
        prefix += "."
    rel = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    sections: dict[str, list[str]] = {}
    for k in rel:
        head, _, rest = k.partition(".")
        sections.setdefault(head, []).append(rest)
    rep = AuditReport(path=path, prefix=prefix)

    def missing(what: str, why: str) -> None:
        rep.findings.append(Finding(what, why, "missing"))

    def note(what: str, why: str) -> None:
        rep.findings.append(Finding(what, why, "note"))

    model = sections.get("model", [])
    if model:
        rep.present.append(f"model: {plural(len(model), 'tensor')}")
    else:
        missing("no model state", "the weights restart from their initialization")

    optim_key = "optim" if "optim" in sections else "optimizer"
    optim = sections.get(optim_key, [])
    if not optim:
        missing("no optimizer state",
                "momentum / Adam moments restart from zero and the loss spikes after resume")
    else:
        with_state = {k.rsplit(".", 1)[0][len("state."):] for k in optim if k.startswith("state.")}
        params: list[str] = []
        expects_state = False
        for k in optim:
            if k.startswith("param_groups.") and k.endswith(".params"):
                v = reader.read_object(f"{prefix}{optim_key}.{k}")
                params += [str(p) for p in v] if isinstance(v, list) else []
            if k.startswith("param_groups.") and (k.endswith(".betas") or k.endswith(".momentum")):
                v = reader.read_object(f"{prefix}{optim_key}.{k}")
                expects_state |= bool(v) if not isinstance(v, (list, tuple)) else True
        without = [p for p in params if p not in with_state]
        if params and without and (with_state or expects_state):
            shown = ", ".join(without[:5]) + (f" and {len(without) - 5} more" if len(without) > 5
                                              else "")
            missing(f"optimizer state missing for {len(without)} of {plural(len(params), 'parameter')} "
                    f"({shown})",
                    "their momentum / Adam moments restart from zero"
                    + ("" if with_state else " (was the optimizer stepped before saving?)"))
        else:
            rep.present.append(f"optimizer: state for {plural(len(with_state), 'parameter')}")
        model_set = set(model)
        stray = [p for p in params if model and p not in model_set]
        if stray:
            missing(f"optimizer names {plural(len(stray), 'parameter')} the model lacks ({stray[0]}, ...)",
                    "the optimizer state will not load into this model")

    if sections.get("scheduler"):
        rep.present.append("scheduler")
    else:
        missing("no scheduler state",
                "the learning rate restarts at its initial value (warm-up and decay start over)")

    if sections.get("scaler"):
        rep.present.append("GradScaler")
    else:
        half = any(m.tensors[f"{prefix}model.{k}"].dtype == "float16"
                   for k in model if f"{prefix}model.{k}" in m.tensors)
        if half:
            missing("no GradScaler state (model has float16 tensors)",
                    "the loss scale restarts at its default: skipped steps / overflow right after "
                    "resume")
        else:
            note("no GradScaler state", "fine unless you train with float16 AMP")

    saved_ranks = sorted({r for k in sections if (r := is_rank_component(k)) is not None})
    world = m.world_size
    wkey = f"{prefix}meta.world_size"
    if wkey in m.objects:
        try:
            world = int(reader.read_object(wkey))
        except (TypeError, ValueError):
            pass
    if not saved_ranks:
        missing("no RNG state", "dropout / augmentation / sampling draw different random numbers "
                                "than an uninterrupted run")
    else:
        lost = [r for r in range(world) if r not in saved_ranks]
        if lost:
            missing(f"no RNG state for rank(s) {lost} of {world}",
                    "those ranks reseed: their random streams differ from an uninterrupted run")
        else:
            rep.present.append("RNG for the 1 rank" if world == 1 else f"RNG for all {world} ranks")

    if sections.get("data"):
        rep.present.append("data position")
    else:
        missing("no data loader position",
                "the data loader restarts from the beginning of the epoch: samples already seen "
                "are seen again")

    progress = sections.get("progress", [])
    if "step" in progress:
        step = reader.read_object(f"{prefix}progress.step")
        rep.present.append(f"step {step}")
    elif "step" in m.user_metadata:
        rep.present.append(f"step {m.user_metadata['step']} (user metadata)")
    else:
        missing("no step counter", "the step restarts at 0: LR schedule, logging and checkpoint "
                                   "names restart")
    return rep


def audit_dict(rep: AuditReport) -> dict[str, Any]:
    """`rep.to_dict()` (kept for callers of the older name)."""
    return rep.to_dict()
