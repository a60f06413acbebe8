"""Shared helpers of the command line: human units, JSON output, CLI wording, progress bars.

Nothing here knows a checkpoint format; the tools and `shardckpt.cli` use it to
print what the library functions return.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys
import threading
from typing import Any

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float) -> str:
    """Bytes with a binary unit and one decimal: '512 B', '2.5 KiB', '160.6 MiB'.

    The unit is chosen so the number is at least 1 (never '0.0 MiB').
    """
    n = float(n)
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 object', '2 objects', '0 files' (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def human_seconds(s: float) -> str:
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1024', '1.5G' -> bytes (KB/MB/GB decimal, KiB/MiB/GiB binary;
    a bare K/M/G is binary, as in `ls -h`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?)(b?)\s*", text.lower())
    if not m or (m.group(3) and not m.group(2)):
        raise ValueError(f"bad size {text!r}: use a number with an optional unit "
                         f"(e.g. 500MB, 5GB, 2GiB)")
    num, unit, binary, b = m.groups()
    power = " kmgtp".index(unit) if unit else 0
    base = 1000 if (unit and b and not binary) else 1024
    value = int(float(num) * base**power)
    if value < 1:
        raise ValueError(f"bad size {text!r}: must be at least 1 byte")
    return value


# ---------------------------------------------------------------- JSON


def jsonable(x: Any) -> Any:
    """`x` with non-finite floats as strings ("inf", "-inf", "nan") and unknown objects as str,
    so the output is strict JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else ("nan" if math.isnan(x) else
                                           ("inf" if x > 0 else "-inf"))
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if hasattr(x, "to_dict"):
        return jsonable(x.to_dict())
    return str(x)


def to_json(obj: Any) -> str:
    """One JSON object, indented, strict (no NaN / Infinity literals)."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


# ---------------------------------------------------------------- CLI wording

# Library messages name Python keyword arguments; on the command line the flag is meant.
_PHRASES = (
    ("--trust-pickle (CLI) / trust_pickle=True (Python)", "--trust-pickle"),
    ("overwrite=True", "--overwrite"),
    ("trust_pickle=True", "--trust-pickle"),
    ("strip_prefix / rename", "--strip-prefix / --rename"),
    ("strip_prefix/rename", "--strip-prefix / --rename"),
    ("strip_prefix=", "--strip-prefix"),
    ("rename=", "--rename"),
)


def cli_wording(message: str) -> str:
    """A library message as the command line says it: one line, flags instead of kwargs."""
    for lib, flag in _PHRASES:
        message = message.replace(lib, flag)
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    return "; ".join(lines)


def error_message(e: BaseException) -> str:
    """One line for an exception: typed errors and OS errors as they are, others as internal."""
    from ..errors import ShardckptError

    if isinstance(e, ShardckptError):
        text = str(e)
    elif isinstance(e, OSError):
        if e.filename is not None and e.strerror:
            text = f"{os.fsdecode(e.filename)}: {e.strerror}"
            if e.filename2 is not None:
                text += f" (-> {os.fsdecode(e.filename2)})"
        else:
            text = str(e) or type(e).__name__
    elif isinstance(e, ValueError):
        text = str(e)
    else:
        text = f"internal error: {type(e).__name__}: {e} (please report)"
    return cli_wording(text) or type(e).__name__


def refuse_special(path: str) -> None:
    """Raise unless `path` is missing, a directory or a regular file: a FIFO, socket or
    device would block or stream forever when a reader opens it."""
    from ..errors import NotACheckpointError

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the reader says so with its own typed error
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise NotACheckpointError(f"{path}: is not a directory or a regular file (a FIFO, "
                                  f"socket or device); not a checkpoint.")


# ---------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on stderr, shown only when stderr is a terminal and `enabled`.

    Called with a byte count (the `on_progress` callbacks of the tools). With
    `total=None` it is an indeterminate bar that ticks on its own (for work that
    reports no progress, e.g. `verify`).
    """

    def __init__(self, total: int | None, desc: str, enabled: bool = True) -> None:
        self.enabled = enabled and _stderr_is_tty()
        self._bar: Any = None
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        if not self.enabled:
            return
        from tqdm import tqdm

        width, height = _stderr_size()
        if total is None:
            self._bar = tqdm(total=None, desc=desc, file=sys.stderr, leave=False, ncols=width,
                             nrows=height,
                             bar_format="{desc}: {elapsed} elapsed", mininterval=0.2)
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()
        else:
            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                             unit_divisor=1024, file=sys.stderr, leave=False, mininterval=0.2,
                             ncols=width, nrows=height)

    def _tick(self) -> None:
        while not self._stop.wait(0.25):
            self._bar.refresh()

    def __call__(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stderr_size() -> tuple[int, int]:
    """The terminal's columns and lines (80 x 24 where it reports none: a fresh pty says
    0 x 0, and tqdm would then draw nothing)."""
    try:
        cols, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        cols = lines = 0
    return (cols if cols > 0 else 80), (lines if lines > 0 else 24)


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# ---------------------------------------------------------------- reports of tools whose
# modules the command line does not own (verify, gc): built from their public fields


def verify_text(rep: Any) -> str:
    """A `tools.verify.VerifyReport` in human units."""
    head = (f"{rep.path}: {'OK' if rep.ok else 'DAMAGED'} — {plural(rep.files, 'file')}, "
            f"{plural(rep.blocks, 'block')}, {human_bytes(rep.bytes_checked)} checked"
            f"{' (deep: every block decoded)' if rep.deep else ''}")
    return "\n".join([head, *(f"  {p}" for p in rep.problems)])


def gc_to_dict(rep: Any) -> dict[str, Any]:
    """A `tools.gc.GcReport` as JSON: root, dry_run, bytes_freed, removed[], kept[]."""
    return rep.to_dict()


def gc_text(rep: Any) -> str:
    verb = "would remove" if rep.dry_run else "removed"
    lines = [f"{rep.root}: {verb} {plural(len(rep.removed), 'item')}, "
             f"{human_bytes(rep.bytes_freed)}"]
    lines += [f"  {verb} {os.path.basename(a.path)} ({a.reason})" for a in rep.removed]
    lines += [f"  kept {n} ({why})" for n, why in rep.kept]
    return "\n".join(lines)
