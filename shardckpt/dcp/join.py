"""Every rank joins a save or load before DCP's first collective, or a typed error says who
did not.

`if rank == 0: torch.save(...)` is a habit; with a collective save it makes rank 0
wait forever inside DCP's first gather. Each save and load therefore first meets
the other ranks of its group at a rendezvous in the process group's key-value
store (no collective, so it cannot itself hang), bounded by `timeout`. A rank
that arrives alone raises CollectiveTimeoutError naming the ranks that never
came; a rank that finds the others in a different call (one saves, one loads)
raises at once.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from typing import Any

import torch.distributed as dist

from ..errors import CollectiveTimeoutError, LoadFailedError
from ..io.storage import norm_path

DEFAULT_TIMEOUT_S = float(os.environ.get("SHARDCKPT_JOIN_TIMEOUT", "600"))

# Rounds per group, counted alike on every rank because every rank makes the same
# sequence of save/load calls on that group (that is what the rendezvous checks).
# Keyed by group name: a background save's own group must not share the count of
# the caller's group, whose calls interleave with it differently on each rank.
_rounds: dict[str, int] = {}
_lock = threading.Lock()


def _store(group: Any) -> Any:
    # No public accessor exists for a group's store; c10d keeps it per group.
    from torch.distributed import distributed_c10d as c10d

    try:
        return c10d._get_process_group_store(group)
    except (AttributeError, RuntimeError, ValueError):
        return c10d._get_default_store()


def _group(process_group: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def agree(process_group: Any, *, what: str, path: str, error: BaseException | None,
          timeout: float | None) -> None:
    """After a step every rank does on its own (opening a checkpoint): raise on every rank
    if it failed on any, so that no rank goes on into a collective the others skip."""
    if _group(process_group) is None:
        if error is not None:
            raise error
        return
    status = "ok" if error is None else f"{type(error).__name__}: {error}"
    others = join(process_group, what=f"{what}:opened", path=path, timeout=timeout,
                  value=status, compare=False)
    if error is not None:
        raise error
    failed = {r: v for r, v in others.items() if v != "ok"}
    if failed:
        r, v = next(iter(failed.items()))
        raise LoadFailedError(f"{path}: rank {r} could not open the checkpoint ({v}); every "
                              f"rank must see the same checkpoint (a shared filesystem).")


def _arrived(store: Any, key: str, timeout: float) -> bool:
    """Whether `key` appears within `timeout` s, polled with short checks. Not store.wait:
    a TCPStore client runs one request at a time, so a thread blocked in wait() keeps
    every other thread of the process off the store; an async save's join (background
    thread) and the next save's join (training thread) then each waited for a key the
    other's rank could not post: a deadlock of two ranks, seen under load."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while not store.check([key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    return True


def join(process_group: Any, *, what: str, path: str, timeout: float | None,
         value: str | None = None, compare: bool = True) -> dict[int, str]:
    """Meet every rank of `process_group` (default: the world) for `what` on `path`;
    returns what the other ranks posted."""
    group = _group(process_group)
    if group is None:
        return {}
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    ranks = tuple(dist.get_process_group_ranks(group))
    timeout = DEFAULT_TIMEOUT_S if timeout is None else float(timeout)
    name = f"{getattr(group, 'group_name', '')}:{ranks}"
    with _lock:
        seq = _rounds[name] = _rounds.get(name, 0) + 1
    tag = hashlib.sha1(name.encode()).hexdigest()[:12]
    base = f"shardckpt/join/{tag}/{seq}"
    store = _store(group)
    # norm_path, not abspath: a URL made absolute would carry each rank's cwd, and
    # ranks on different nodes (different cwds) would never agree on it.
    me = value if value is not None else f"{what} {norm_path(path)}"
    store.set(f"{base}/r{rank}", me)
    if store.add(f"{base}/n", 1) == world:
        store.set(f"{base}/done", "1")
    if not _arrived(store, f"{base}/done", timeout):
        missing = [r for r in range(world) if not store.check([f"{base}/r{r}"])]
        raise CollectiveTimeoutError(
            f"{path} (rank {rank}): shardckpt.{what} waited {timeout:.0f}s for rank(s) "
            f"{missing} of {world}, which never called it. Every rank of the group must call "
            f"shardckpt.{what}(...) together (not only rank 0, as with torch.save); raise "
            f"timeout= if some ranks are legitimately slower.")
    others = {r: store.get(f"{base}/r{r}").decode() for r in range(world) if r != rank}
    odd = {r: v for r, v in others.items() if v != me} if compare else {}
    if odd:
        r, v = next(iter(odd.items()))
        raise CollectiveTimeoutError(
            f"{path} (rank {rank}): ranks disagree on the checkpoint call: this rank is in "
            f"{me!r}, rank {r} in {v!r}. Every rank must make the same save/load calls in "
            f"the same order.")
    if rank == 0 and seq > 1:  # the previous round's keys are no longer read
        prev = f"shardckpt/join/{tag}/{seq - 1}"
        for k in [f"{prev}/n", f"{prev}/done", *(f"{prev}/r{r}" for r in range(world))]:
            try:
                store.delete_key(k)
            except (RuntimeError, dist.DistError):
                break
    return others
