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


def lower_thread_priority() -> None:
    """Raise this thread's nice value (SHARDCKPT_WORKER_NICE, default 10).

    Checkpoint threads run beside the training loop: under contention the
    training threads should win; with no contention it costs nothing.
    """
    nice = int(os.environ.get("SHARDCKPT_WORKER_NICE", "10"))
    if nice <= 0 or not hasattr(os, "setpriority"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError:  # not permitted in some sandboxes; priority is an optimisation
        pass


_pools: dict[int, ThreadPoolExecutor] = {}
_pool_lock = threading.Lock()


def pool(threads: int | None = None) -> ThreadPoolExecutor:
    """A process-wide codec thread pool (created once; threads persist across saves)."""
    n = threads or default_threads()
    with _pool_lock:
        p = _pools.get(n)
        if p is None:
            p = _pools[n] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="shardckpt-codec",
                                               initializer=lower_thread_priority)
        return p


_item_pools: dict[int, ThreadPoolExecutor] = {}


def item_pool(threads: int) -> ThreadPoolExecutor:
    """Workers that encode whole items concurrently (separate from `pool`, which the
    Python path uses inside one item, so nested waits cannot deadlock)."""
    with _pool_lock:
        p = _item_pools.get(threads)
        if p is None:
            p = _item_pools[threads] = ThreadPoolExecutor(
                max_workers=threads, thread_name_prefix="shardckpt-items",
                initializer=lower_thread_priority)
        return p
