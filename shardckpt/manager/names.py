"""Names under a manager root: step directories, pointer files, the lease directory."""

from __future__ import annotations

import re

from ..format.names import Leftover, parse_leftover

LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"
READERS_DIR = ".readers"
# step_00000120 is the manager's own name; step120, step-120 and step_120 are
# what users (and older examples) write by hand, and are recognised too.
_STEP_RE = re.compile(r"step[_-]?([0-9]+)")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.fullmatch(name) if isinstance(name, str) else None
    return int(m.group(1)) if m else None


def parse_leftover_in_root(entry: str) -> tuple[str, Leftover] | None:
    """(checkpoint name, kind) for a leftover of a step checkpoint."""
    parsed = parse_leftover(entry)
    if parsed is None or parse_step(parsed[0]) is None:
        return None
    return parsed
