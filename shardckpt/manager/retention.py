"""Retention as composable policies: which step checkpoints to keep.

Each policy maps the candidates (step, metric value or None) to the steps it
keeps; `AnyOf` keeps the union. Pointers, leases and saves in progress are
protected by the manager on top of this.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

Candidate = tuple[int, float | None]


class Policy(Protocol):
    def keep(self, candidates: Sequence[Candidate]) -> set[int]: ...


@dataclass(frozen=True)
class LastN:
    n: int | None  # None keeps every step

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        steps = sorted(s for s, _ in candidates)
        return set(steps if self.n is None else steps[-self.n:] if self.n else [])


@dataclass(frozen=True)
class BestN:
    n: int
    mode: str = "min"

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        scored = [(v, s) for s, v in candidates if v is not None and not math.isnan(v)]
        # Ties go to the newer step: it carries more training for the same score.
        sign = 1 if self.mode == "min" else -1
        scored.sort(key=lambda vs: (sign * vs[0], -vs[1]))
        return {s for _, s in scored[:self.n]}


@dataclass(frozen=True)
class EveryN:
    n: int

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        return {s for s, _ in candidates if s % self.n == 0}


@dataclass(frozen=True)
class AnyOf:
    policies: tuple[Policy, ...]

    def keep(self, candidates: Sequence[Candidate]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(candidates)
        return out


def policy_for(*, keep_last: int | None, keep_best: int, mode: str,
               keep_every: int | None) -> AnyOf:
    parts: list[Policy] = [LastN(keep_last)]
    if keep_best:
        parts.append(BestN(keep_best, mode))
    if keep_every:
        parts.append(EveryN(keep_every))
    return AnyOf(tuple(parts))


def retained_steps(candidates: Iterable[Candidate], *, keep_last: int | None,
                   keep_best: int, mode: str, keep_every: int | None) -> set[int]:
    """Steps the manager's retention keeps (the union of its three rules)."""
    return policy_for(keep_last=keep_last, keep_best=keep_best, mode=mode,
                      keep_every=keep_every).keep(list(candidates))


def jsonable_metrics(metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        elif hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()  # numpy scalars
        if isinstance(v, float) and not math.isfinite(v):
            v = None  # JSON has no NaN/inf; a NaN metric never ranks as best anyway
        if not isinstance(v, (int, float, str, bool)) and v is not None:
            v = str(v)
        out[str(k)] = v
    return out


def metric_value(metrics: Any, metric: str | None) -> float | None:
    if metric is None or not isinstance(metrics, dict) or metric not in metrics:
        return None
    try:
        v = float(metrics[metric])
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v
