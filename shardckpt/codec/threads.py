"""Thread budgets and the codec's process-wide thread pools."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor


def _usable_cpus() -> int:
    """CPUs this process may use, shared with the other ranks torchrun put on this node."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        n = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1 and n >= os.cpu_count():
        # Affinity not set per rank: every rank sees all CPUs; split them.
        n //= local
    return max(1, n)


def default_threads() -> int:
    """Codec threads for work beside a running training loop (async save, loads).

    Half the CPUs this process may use, at least 1, at most 8, so the training
    loop and data loader workers keep theirs. SHARDCKPT_THREADS overrides.
    """
    env = os.environ.get("SHARDCKPT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(8, _usable_cpus() // 2 or 1))


def blocking_threads() -> int:
    """Codec threads for a blocking save: the training loop waits, so use every CPU."""
    env = os.environ.get("SHARDCKPT_THREADS")
    if env:
        return max(1, int(env))
    return max(1, min(16, _usable_cpus()))


def writer_cpus() -> set[int] | None:
    """CPUs an async save's writer process keeps to (None: wherever the scheduler likes).

    SHARDCKPT_WRITER_CPUS: "auto" (default), "all", or a list like "6,7". Auto keeps the
    writer on the last `default_threads()` CPUs of this rank's share, so a training
    loop that leaves it cores has the others to itself: unpinned, the writer's threads
    also run on the training core (2-core VM, one training thread: steps +12-19 %
    unpinned, +4-6 % pinned, benchmarks/train_slowdown.py). A share of one CPU: None.
    """
    env = os.environ.get("SHARDCKPT_WRITER_CPUS", "auto").strip().lower()
    try:
        aff = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return None
    if env in ("all", ""):
        return None
    if env != "auto":
        chosen = {int(c) for c in env.split(",") if c.strip()} & set(aff)
        return chosen or None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    mine = aff
    if local > 1 and len(aff) >= (os.cpu_count() or len(aff)):
        share = len(aff) // local  # every rank sees all CPUs: each takes its slice
        rank = int(os.environ.get("LOCAL_RANK", "0") or 0) % local
        mine = aff[rank * share:(rank + 1) * share]
    if len(mine) < 2:
        return None
    return set(mine[-max(1, min(len(mine) // 2, default_threads())):])


def lower_thread_priority(background: bool = False) -> None:
    """Raise this thread's nice value (SHARDCKPT_WORKER_NICE, default 10).

    Checkpoint threads run beside the training loop: under contention the
    training threads should win; with no contention it costs nothing.
    `background=True` (the async-save thread) also marks this thread so that
    the codec pools it uses are SCHED_IDLE ones (see `_idle_workers`); the
    thread itself keeps the normal policy, because it takes part in the
    checkpoint's collectives with the other ranks and must not be starved.
    """
    _local.background = background
    nice = int(os.environ.get("SHARDCKPT_WORKER_NICE", "10"))
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:  # not permitted in some sandboxes; priority is an optimisation
        pass


def _idle_workers() -> None:
    """Pool initializer for an async save's encode workers: nice, then SCHED_IDLE.

    At nice 10 a codec thread still takes ~10 % of a core the training threads
    want, and one late intra-op thread delays a whole parallel region; a
    SCHED_IDLE thread is preempted at once by any normal thread that wakes, so
    it runs only on a core that would otherwise idle. The native pool's helpers
    started from these threads inherit it. Opt-in (SHARDCKPT_WORKER_SCHED=idle):
    a SCHED_IDLE worker holding the GIL can be starved by other processes on a
    busy machine, and then the save (and the threads waiting for the GIL) with
    it; on a 2-core VM at load 12 a 2-rank async save of 0.5 MB did not finish
    in 240 s, while it takes 1 s at the normal policy.
    """
    lower_thread_priority()
    if not _idle_wanted():
        return
    try:
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError):  # non-Linux or forbidden: nice alone stays
        pass


_local = threading.local()


def _idle_wanted() -> bool:
    return (hasattr(os, "SCHED_IDLE")
            and os.environ.get("SHARDCKPT_WORKER_SCHED", "normal").lower() == "idle")


def in_background() -> bool:
    """True on an async-save thread (and on its SCHED_IDLE workers, for nested pools)."""
    if getattr(_local, "background", False):
        return True
    try:
        return hasattr(os, "SCHED_IDLE") and os.sched_getscheduler(0) == os.SCHED_IDLE
    except (OSError, AttributeError):  # pragma: no cover - non-Linux
        return False


def _initializer(background: bool):
    return _idle_workers if background else lower_thread_priority


# Keyed by (threads, background): an async save's workers are SCHED_IDLE, a
# blocking save's are not (the caller waits for them; a busy neighbour must not
# starve them), so the two never share a pool. Which one a call gets follows the
# calling thread's own policy, so call sites need not pass it along.
_pools: dict[tuple[int, bool], ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def pool(threads: int | None = None) -> ThreadPoolExecutor:
    """A process-wide codec thread pool (created once; threads persist across saves)."""
    n = threads or default_threads()
    key = (n, in_background() and _idle_wanted())
    with _pool_lock:
        p = _pools.get(key)
        if p is None:
            p = _pools[key] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardckpt-codec",
                                                 initializer=_initializer(key[1]))
        return p


_item_pools: dict[tuple[int, bool], ThreadPoolExecutor] = {}


def item_pool(threads: int) -> ThreadPoolExecutor:
    """Workers that encode whole items concurrently (separate from `pool`, which the
    Python path uses inside one item, so nested waits cannot deadlock)."""
    key = (threads, in_background() and _idle_wanted())
    with _pool_lock:
        p = _item_pools.get(key)
        if p is None:
            p = _item_pools[key] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="shardckpt-items",
                initializer=_initializer(key[1]))
        return p


def _forget_pools_in_child() -> None:
    # A forked child has none of the parent's worker threads: a pool that believes it has
    # its workers would queue jobs that never run (a save from a forked child hung).
    global _pool_lock
    _pools.clear()
    _item_pools.clear()
    _pool_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_in_child)
