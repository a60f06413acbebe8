"""The cyclic garbage collector paused while a save or load runs.

A save or load allocates tens of thousands of small objects (plans, block records,
manifest dicts). Each allocation burst can trigger a full collection, which walks
every object the process holds: torch, the model, the optimizer, the user's
program. Measured on a 1 GB state: 0.15 s of a 1.1 s save was collector time
spent in building the manifest alone. Nothing a save creates needs the collector
(no reference cycles are left behind that matter for memory), so it runs once,
when the last concurrent save or load ends, instead of during them.

Only a call on the main thread pauses it: a background save (async_save) may run
for minutes beside training, and the training loop's own garbage must not wait
that long.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_depth = 0
_was_enabled = False


@contextmanager
def gc_paused() -> Iterator[None]:
    """Disable the cyclic collector for the block (nested and concurrent uses count)."""
    global _depth, _was_enabled
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            restore = _depth == 0 and _was_enabled
            if restore:
                gc.enable()
