"""Names inside a checkpoint and around it, and the states a directory can be in."""

from __future__ import annotations

import enum
import re

FORMAT_NAME = "shardckpt"
MANIFEST_NAME = "manifest.json"
# A checkpoint dropped while an incremental one still references its data: no
# longer committed (not listed, not restorable), its data kept (manager/refcount.py).
RETIRED_MANIFEST = "manifest.retired.json"
DATA_DIR = "data"
PARTIAL_MARKER = "PARTIAL.json"
# The longest checkpoint name whose staging name (".NAME.partial-<12 hex>") still
# fits NAME_MAX (255) on every common filesystem.
MAX_NAME_LEN = 255 - len(".") - len(".partial-") - 12

# A save in progress lives in a hidden sibling directory; the name says which
# checkpoint it was going to become, so leftovers are identifiable for cleanup.
_STAGING_RE = re.compile(r"^\.(?P<name>.+)\.partial-(?P<token>[0-9a-f]{12})$")
_TRASH_RE = re.compile(r"^\.(?P<name>.+)\.old-(?P<token>[0-9a-f]{12})$")
# Data files are the only files a manifest may name: data/<component>, no
# separators, no dot-names, so a manifest cannot point outside its checkpoint.
_DATA_FILE_RE = re.compile(r"data/[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}")


class DirState(str, enum.Enum):
    """What a path holds, as far as the commit protocol is concerned."""

    COMMITTED = "committed"  # a manifest: a published checkpoint
    PARTIAL = "partial"  # a staging directory (marker present, no manifest)
    EMPTY = "empty"  # an empty directory
    OTHER = "other"  # anything else: not ours to touch
    MISSING = "missing"


class Leftover(str, enum.Enum):
    PARTIAL = "partial"  # an interrupted save
    OLD = "old"  # a replaced or deleted checkpoint on its way out


def data_file_name(rank: int) -> str:
    return f"{DATA_DIR}/r{rank:05d}.bin"


def is_data_file_name(rel: str) -> bool:
    return isinstance(rel, str) and bool(_DATA_FILE_RE.fullmatch(rel)) and ".." not in rel


def staging_name(final_name: str, token: str) -> str:
    return f".{final_name}.partial-{token}"


def trash_name(final_name: str, token: str) -> str:
    return f".{final_name}.old-{token}"


_TEMP_RE = re.compile(r"\.(?P<name>.+)\.tmp-(?P<pid>[0-9]+)-[0-9a-f]{6}")


def temp_name(final_name: str, pid: int, token: str) -> str:
    """The hidden name a small file is written under before its atomic rename."""
    return f".{final_name}.tmp-{pid}-{token}"


def parse_temp(name: str) -> tuple[str, int] | None:
    """(final name, writer pid) for a temp file left by a killed write."""
    m = _TEMP_RE.fullmatch(name)
    return (m.group("name"), int(m.group("pid"))) if m else None


def parse_leftover(name: str) -> tuple[str, Leftover] | None:
    """For a leftover of an uncommitted save or a replaced checkpoint: (final name, kind)."""
    m = _STAGING_RE.match(name)
    if m:
        return m.group("name"), Leftover.PARTIAL
    m = _TRASH_RE.match(name)
    if m:
        return m.group("name"), Leftover.OLD
    return None
