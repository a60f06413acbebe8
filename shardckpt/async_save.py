"""Async save: return to the training loop once the state is staged in host memory.

Staging copies every tensor into a host arena (pinned when CUDA is present) that
is allocated once and reused, so the checkpoint is a true snapshot: training may
mutate parameters as soon as `async_save` returns. Encoding, writing, fsync and
the rank-0 commit run on a background thread, coordinated over a dedicated gloo
group so they never interleave with the training collectives.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from . import api, codec
from .dcp.join import join
from .gpu import staging as gpu_staging
from .io import writer_process

log = logging.getLogger("shardckpt")
_ALIGN = 64


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _tensors(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []

    def visit(v: Any) -> None:
        if _is_dtensor(v):
            out.append(v.to_local())
        elif torch.is_tensor(v):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                visit(x)
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)

    visit(tree)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def staged_bytes(tree: Any) -> int:
    """Arena bytes needed to stage `tree` (each tensor aligned)."""
    return sum((_nbytes(t) + _ALIGN - 1) // _ALIGN * _ALIGN for t in _tensors(tree))


class StagingPool:
    """One host arena reused by every save; grows only when a larger state arrives."""

    def __init__(self, cap_bytes: int | None = None, pin: bool | None = None) -> None:
        self.cap_bytes = cap_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.arena: torch.Tensor | None = None
        # The arena as memory the writer process maps too (io/writer_process.py); None when
        # pinned (CUDA copies need page-locked memory) or the writer is a thread.
        self.shared: writer_process.SharedArena | None = None
        self.allocations = 0  # how many times host memory was (re)allocated

    @property
    def capacity(self) -> int:
        return 0 if self.arena is None else self.arena.numel()

    def fits(self, tree: Any) -> bool:
        return self.cap_bytes is None or staged_bytes(tree) <= self.cap_bytes

    def _ensure(self, need: int) -> None:
        if need <= self.capacity:
            return
        old, self.shared = self.shared, None
        if old is not None:
            writer_process.forget(old.key)
        if not self.pin and writer_process.mode() != "thread":
            try:
                self.shared = writer_process.SharedArena(need)
            except OSError as e:  # memfd refused (a sandbox): the thread writes instead
                log.debug("shardckpt: no shared staging arena (%s)", e)
        if self.shared is not None:
            arena = self.shared.tensor
        else:
            arena = torch.empty(need, dtype=torch.uint8)
            if self.pin:
                arena = arena.pin_memory()
        self.arena = arena
        self.allocations += 1

    def stage(self, tree: Any) -> Any:
        """A copy of `tree` whose tensors live in the arena (the caller checked `fits`)."""
        # GPU data path (shardckpt/gpu, docs/GPU.md): CUDA tensors go through the
        # extension's pinned pool and copy streams instead of this arena.
        if gpu_staging.handles(tree):
            return gpu_staging.stage_for(self, tree)
        self._ensure(staged_bytes(tree))
        state = {"off": 0, "cuda": False}

        def copy(t: torch.Tensor) -> torch.Tensor:
            n = _nbytes(t)
            off = state["off"]
            if t.is_cuda:
                state["cuda"] = True
            if n == 0:
                return torch.empty(t.shape, dtype=t.dtype)
            state["off"] = off + (n + _ALIGN - 1) // _ALIGN * _ALIGN
            dst = self.arena[off:off + n].view(t.dtype).view(t.shape)
            dst.copy_(t.detach(), non_blocking=t.is_cuda)
            return dst

        def visit(v: Any) -> Any:
            if _is_dtensor(v):
                from torch.distributed.tensor import DTensor

                local = copy(v.to_local())
                return DTensor.from_local(local, v.device_mesh, v.placements, run_check=False,
                                          shape=v.shape, stride=v.stride())
            if torch.is_tensor(v):
                return copy(v)
            if isinstance(v, dict):
                return {k: visit(x) for k, x in v.items()}
            if isinstance(v, list):
                return [visit(x) for x in v]
            if isinstance(v, tuple):
                return tuple(visit(x) for x in v)
            return v

        staged = visit(tree)
        if state["cuda"]:
            torch.cuda.synchronize()
        return staged


class AsyncSaveHandle:
    """Returned by `async_save`; `wait()` blocks until committed and raises any background error."""

    def __init__(self, path: str, stall_s: float) -> None:
        self.path = path
        self.stall_s = stall_s
        self.total_s: float | None = None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._reported = False
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.path}: async save still running after {timeout} s")
        if self._error is not None:
            self._reported = True
            raise self._error

    def exception(self) -> BaseException | None:
        return self._error if self._done.is_set() else None


class _Saver:
    """Per-process state: pools, in-flight handles, the checkpoint process group."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.inflight: list[tuple[AsyncSaveHandle, StagingPool]] = []
        self.pools: list[StagingPool] = []
        self.groups: dict[Any, Any] = {}
        # Drain before concurrent.futures shuts its pools down at exit (its hook is a
        # threading atexit too, and those run last-registered first).
        register = getattr(threading, "_register_atexit", atexit.register)
        register(self.drain_at_exit)
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        # A forked child (a DataLoader worker) starts afresh: the saves in flight are the
        # parent's (their threads are not here), and a shared arena is the parent's memory
        # (MAP_SHARED, not copy-on-write): staging into it would change the parent's snapshot.
        self.lock = threading.Lock()
        self.inflight, self.pools = [], []

    def group_for(self, process_group: Any) -> Any:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        key = process_group
        if key not in self.groups:
            ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
            # A group of our own: checkpoint traffic never queues behind (or ahead
            # of) training collectives, and gloo works for CPU-side coordination.
            self.groups[key] = dist.new_group(ranks=ranks, backend="gloo")
        return self.groups[key]

    def drain_at_exit(self) -> None:
        for handle, _ in list(self.inflight):
            try:
                handle.wait()
            except BaseException as e:  # noqa: BLE001 - reported, exit goes on
                if not handle._reported:
                    print(f"shardckpt: async save to {handle.path} failed: {e}", file=sys.stderr)
            # The thread must be gone, not just done: a daemon thread still unwinding
            # while the interpreter tears down C++ state can abort the process.
            if handle._thread is not None:
                handle._thread.join()


_saver = _Saver()


def async_save(state: dict[str, Any], path: str | os.PathLike, *, process_group: Any = None,
               max_in_flight: int = 1, staging_cap_bytes: int | None = None,
               **save_kwargs: Any) -> AsyncSaveHandle:
    """Snapshot `state` into host memory and save it in the background.

    Returns as soon as the snapshot is taken. At most `max_in_flight` saves run at
    once; a new one first waits for the oldest. A failed earlier save that was
    never waited on raises here. Every rank calls this, like `save`.
    """
    t0 = time.perf_counter()
    state = api.as_state(state)
    path = os.fspath(path)
    # Meet the other ranks here, in the caller's thread: a rank-0-only call fails now
    # instead of leaving a background save waiting forever.
    join(process_group, what="async_save", path=path, timeout=save_kwargs.pop("timeout", None))
    with _saver.lock:
        while len(_saver.inflight) >= max(1, max_in_flight):
            handle, pool = _saver.inflight.pop(0)
            handle._done.wait()
            _saver.pools.append(pool)
            if handle._error is not None and not handle._reported:
                handle._reported = True
                raise handle._error
        for handle, _ in _saver.inflight:
            if handle.done() and handle._error is not None and not handle._reported:
                handle._reported = True
                raise handle._error
        pool = _saver.pools.pop() if _saver.pools else StagingPool(staging_cap_bytes)
        if staging_cap_bytes is not None:
            pool.cap_bytes = staging_cap_bytes
    group = _saver.group_for(process_group)
    # Stateful objects are asked for their state now: the snapshot is of this moment.
    flat = {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state.items()}
    if not pool.fits(flat):
        # Bigger than the host memory we may hold: stream it through the writer
        # while the caller waits. It costs stall time, never memory or the save.
        return _save_blocking(flat, path, group, pool, save_kwargs, t0)
    staged = pool.stage(flat)
    if pool.shared is not None:
        # Started now, its imports overlap with this save's planning (first save only).
        writer_process.prestart(staged_bytes(flat))
    handle = AsyncSaveHandle(path, time.perf_counter() - t0)

    def run() -> None:
        codec.lower_thread_priority(background=True)  # the writer thread inherits this
        try:
            # Training runs meanwhile: leave it half the cores.
            save_kwargs.setdefault("threads", codec.default_threads())
            with writer_process.offload(pool.shared):
                api.save(staged, path, process_group=group, **save_kwargs)
        except BaseException as e:  # noqa: BLE001 - delivered through the handle
            handle._error = e
            log.error("shardckpt: async save to %s failed: %s", path, e)
        finally:
            handle.total_s = time.perf_counter() - t0
            handle._done.set()

    th = threading.Thread(target=run, name="shardckpt-async-save", daemon=True)
    handle._thread = th
    with _saver.lock:
        _saver.inflight.append((handle, pool))
    th.start()
    return handle


def _save_blocking(flat: dict, path: str, group: Any, pool: StagingPool, save_kwargs: dict,
                   t0: float) -> AsyncSaveHandle:
    warnings.warn(f"shardckpt: state ({staged_bytes(flat)} bytes) exceeds staging_cap_bytes "
                  f"({pool.cap_bytes}); this save runs while the caller waits", stacklevel=3)
    handle = AsyncSaveHandle(path, 0.0)
    try:
        api.save(flat, path, process_group=group, **save_kwargs)
    except BaseException as e:  # noqa: BLE001 - same contract as a background failure
        handle._error = e
    handle.stall_s = handle.total_s = time.perf_counter() - t0
    handle._done.set()
    with _saver.lock:
        _saver.inflight.append((handle, pool))
    return handle


def staging_stats() -> dict[str, int]:
    """Host memory held for staging, and how often it was allocated (for tests/benchmarks)."""
    pools = _saver.pools + [p for _, p in _saver.inflight]
    return {"pools": len(pools), "bytes": sum(p.capacity for p in pools),
            "allocations": sum(p.allocations for p in pools)}
