"""`CheckpointManager`: a directory of step checkpoints with `latest` / `best` pointers,
retention, reader leases, a free-space check before writing, and preemption-safe saves.

Layout of the root directory::

    root/step_00000120/          one committed checkpoint (shardckpt.save layout)
    root/latest.json             {"name": "step_00000120", "step": 120, ...}
    root/best.json               {"name": ..., "step": ..., "metric": ..., "value": ..., "mode": ...}
    root/.readers/<pid>-<host>-<token>.json   a reader lease naming a checkpoint

The commit point of a checkpoint is the atomic rename done by `shardckpt.save`;
pointers are conveniences written afterwards. `restore` therefore trusts the
directories (newest committed and valid step wins) and repairs a `latest` pointer
that lags behind, e.g. after a kill between the rename and the pointer update.

Multi-rank: every rank constructs the manager and calls save / restore /
step_boundary together. Rank 0 alone decides (what to delete, which checkpoint to
load) and alone deletes; the decisions travel on a dedicated gloo group (control.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from ..api import as_state, load_open
from ..api import save as _save
from ..errors import (
    CorruptCheckpointError,
    ShardckptError,
)
from ..io.reader import CheckpointReader
from ..io.storage import norm_path, storage_for
from .catalog import (
    CheckpointInfo,
    ManagerSaveResult,
    list_checkpoints,
)
from .control import Control, is_enospc
from .keeper import FALLBACK_ERRORS, RootKeeper, state_bytes
from .leases import Leases
from .names import (
    BEST_POINTER,
    LATEST_POINTER,
    parse_step,
    step_dir_name,
)
from .pointers import Pointers
from .preemption import PreemptionHandler
from .retention import jsonable_metrics, policy_for

__all__ = ["CheckpointManager"]

class CheckpointManager:
    """Step checkpoints under `root` with retention, pointers and preemption handling.

    Construct it on every rank (it creates a gloo group, a collective when
    torch.distributed is initialized); call `save`, `restore`, `step_boundary`
    and `wait` on every rank together. It assumes it is the only writer of `root`.

    Retention keeps the union of: the newest `keep_last` (None: all), the
    `keep_best` best by `metrics[metric]` (`mode` "min" or "max"), and every step
    divisible by `keep_every`; plus whatever a pointer or a live reader lease names.

    `incremental=True`: unchanged blocks are referenced, not rewritten; every `full_every`-th
    save is full; a dropped checkpoint still referenced is retired (docs/USAGE.md).

    `async_save=True` writes through `shardckpt.async_save`; pointers and retention
    for that save happen at the next `save` / `restore` / `wait` on every rank.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int | None = 3, keep_best: int = 1,
                 metric: str | None = None, mode: Literal["min", "max"] = "min",
                 keep_every: int | None = None, incremental: bool = False,
                 async_save: bool = False,
                 process_group: Any = None,
                 preemption_signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1), *,
                 save_options: dict[str, Any] | None = None,
                 verify_on_restore: Literal["sizes", "full"] = "sizes",
                 space_margin: float = 1.1, min_free_bytes: int = 0,
                 lease_ttl_s: float = 24 * 3600.0,
                 preemption_grace_s: float | None = 120.0,
                 on_save: Callable[[ManagerSaveResult], Any] | None = None,
                 on_restore: Callable[[int, str], Any] | None = None,
                 timeout: float | None = None,
                 storage_options: dict | None = None, full_every: int = 10) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None (keep all), not {keep_last}")
        if keep_best < 0:
            raise ValueError(f"keep_best must be >= 0, not {keep_best}")
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be >= 1 or None, not {keep_every}")
        if verify_on_restore not in ("sizes", "full"):
            raise ValueError(f"verify_on_restore must be 'sizes' or 'full', not "
                             f"{verify_on_restore!r}")
        self.root = norm_path(root)
        if storage_options is not None:  # bound to the root's bucket: saves, loads, listing
            storage_for(self.root, storage_options)
        self.keep_last = keep_last
        self.keep_best = keep_best if metric is not None else 0
        self.metric = metric
        self.mode = mode
        self.keep_every = keep_every
        self.incremental, self.full_every = incremental, full_every
        self.async_save = async_save
        self.process_group = process_group
        self.save_options = dict(save_options or {})
        self.verify_on_restore = verify_on_restore
        self.space_margin = space_margin
        self.min_free_bytes = min_free_bytes
        self.lease_ttl_s = lease_ttl_s
        self.preempted = False
        self.on_save = on_save
        self.on_restore = on_restore
        self._warned = False
        self._pending: tuple[int, dict, Any] | None = None  # async: (step, metrics, handle)
        self._last_saved_step: int | None = None
        self.timeout = timeout
        self._ctrl = Control(process_group, timeout)
        self._pointers = Pointers(self.root)
        self._leases = Leases(self.root, lease_ttl_s)
        self._keeper = RootKeeper(
            self.root, policy=policy_for(keep_last=keep_last, keep_best=self.keep_best,
                                         mode=mode, keep_every=keep_every),
            metric=metric, mode=mode, leases=self._leases, verify_on_restore=verify_on_restore,
            space_margin=space_margin, min_free_bytes=min_free_bytes, incremental=incremental,
            full_every=full_every)
        self._preempt = PreemptionHandler(tuple(preemption_signals), preemption_grace_s)

    # ------------------------------------------------------------------ signals

    def request_preemption(self) -> None:
        """Act as if a preemption signal had arrived on this rank."""
        self._preempt.request()

    def close(self) -> None:
        """Finish a pending async save and give the signal handlers back."""
        try:
            self.wait()
        finally:
            self._preempt.restore()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ listing

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest step first (local; no collectives)."""
        return list_checkpoints(self.root)

    @property
    def latest_step(self) -> int | None:
        """Step named by the `latest` pointer (local read)."""
        p = self._pointers.read(LATEST_POINTER)
        return None if p is None else p.get("step")

    @property
    def best_step(self) -> int | None:
        p = self._pointers.read(BEST_POINTER)
        return None if p is None else p.get("step")

    # ------------------------------------------------------------------ leases

    @contextmanager
    def lease(self, name_or_step: str | int) -> Iterator[str]:
        """Hold a reader lease: retention will not delete that checkpoint meanwhile.

        For readers outside `restore` (an evaluation job reading a checkpoint).
        """
        name = step_dir_name(name_or_step) if isinstance(name_or_step, int) else name_or_step
        path = self._leases.take(name)
        try:
            yield self._path(name)
        finally:
            self._leases.drop(path)

    def save(self, step: int, state: Any, metrics: dict[str, Any] | None = None,
             ) -> ManagerSaveResult:
        """Save `state` as `root/step_<step>`, move the pointers, apply retention.

        `state` is a dict or one Stateful object (a TrainState), as for
        `shardckpt.save`. Every rank calls it. The result is true when a
        preemption signal reached any rank: this save was then made
        synchronously, and the caller should exit.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        metrics = jsonable_metrics(metrics)
        if self.metric is not None and metrics and self.metric not in metrics and not self._warned:
            self._warned = True
            if self._ctrl.rank == 0:
                warnings.warn(f"shardckpt.CheckpointManager: metrics {sorted(metrics)} lack the "
                              f"configured metric {self.metric!r}; `best` is not updated by this "
                              f"save. Pass metrics={{{self.metric!r}: ...}} or fix metric=.",
                              RuntimeWarning, stacklevel=2)
        preempt = self._ctrl.any(self._preempt.requested)
        self.preempted = self.preempted or preempt
        res = self._save(step, state, metrics, sync=preempt or not self.async_save,
                         reason="preemption" if preempt else None)
        if preempt:
            self._preempt.answered()
        return dataclasses.replace(res, preempted=preempt)

    def step_boundary(self, step: int, state: Any) -> bool:
        """Call once per step on every rank; costs one small all_reduce on gloo.

        If a preemption signal reached any rank, all ranks save `state` as `step`
        (unless that step was just saved) and it returns True: exit the loop then.
        """
        if not self._ctrl.any(self._preempt.requested):
            return False
        self.preempted = True
        if self._last_saved_step != int(step):
            self._save(int(step), state, {}, sync=True, reason="preemption")
        else:
            self.wait()
        self._preempt.answered()
        return True

    def _save(self, step: int, state: Any, metrics: dict, *, sync: bool,
              reason: str | None) -> ManagerSaveResult:
        state = as_state(state)
        self.wait()  # one save in flight at most; its pointers/retention first
        if self._keeper.state_estimate is None:
            # Once per manager and on every rank: a Stateful's state_dict() may itself
            # be a collective (FSDP). Only used when no earlier checkpoint exists.
            self._keeper.state_estimate = state_bytes(state)
        plan = self._ctrl.decide(lambda: self._keeper.prepare_write(step, metrics))
        path = self._path(step_dir_name(step))
        meta = {"step": step, "metrics": metrics, "manager": {"reason": reason}}
        opts = dict(self.save_options)
        if plan.get("base"):  # incremental: blocks the previous checkpoint holds are skipped
            opts["base"] = self._path(plan["base"])
            meta["manager"]["chain"] = plan["chain"]
        if sync:
            try:
                r = _save(state, path, process_group=self._dcp_group(), metadata=meta,
                          timeout=self.timeout, **opts)
            except BaseException as e:
                self._on_save_error(step, e)
                raise
            self._last_saved_step = step
            self._ctrl.decide(lambda: self._keeper.after_commit(step, metrics))
            res = ManagerSaveResult(path=r.path, step=step, seconds=r.seconds,
                                    bytes_written=r.bytes_written, bytes_logical=r.bytes_logical,
                                    metrics=metrics, committed=True)
            self._notify(self.on_save, res)
            return res
        t0 = time.perf_counter()
        handle = _async_save_fn()(state, path, process_group=self.process_group, metadata=meta,
                                  timeout=self.timeout, **opts)
        self._pending = (step, metrics, handle)
        self._keeper.pending_name = step_dir_name(step)
        self._last_saved_step = step
        # Committed later (at the next save / restore / wait, which calls on_save).
        return ManagerSaveResult(path=norm_path(path), step=step,
                                 seconds=time.perf_counter() - t0, bytes_written=0,
                                 bytes_logical=0, metrics=metrics, committed=False)

    def _notify(self, fn: Callable[..., Any] | None, *args: Any) -> None:
        # A tracker callback that fails must not fail the save that already committed.
        if fn is None:
            return
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - user callback
            warnings.warn(f"shardckpt.CheckpointManager: callback {fn!r} raised {e!r}",
                          RuntimeWarning, stacklevel=3)

    def _on_save_error(self, step: int, e: BaseException) -> None:
        if self._ctrl.rank == 0:
            self._keeper.cleanup_failed(step)
        if is_enospc(e):
            raise self._keeper.space_error(step, e) from e

    def _dcp_group(self) -> Any:
        # Synchronous saves/loads coordinate on the manager's gloo group too: DCP's
        # gathers then never queue behind (or between) NCCL training collectives.
        return self._ctrl.group if self._ctrl.group is not None else self.process_group

    def wait(self) -> None:
        """Finish a pending async save (every rank): wait, then pointers and retention."""
        if self._pending is None:
            return
        step, metrics, handle = self._pending
        err: BaseException | None = None
        try:
            handle.wait()
        except BaseException as e:  # agreed on below, so no rank is left waiting
            err = e
        failed = self._ctrl.any(err is not None)
        self._pending = None
        self._keeper.pending_name = None
        if failed:
            self._last_saved_step = None
            if err is None:
                err = ShardckptError(f"{self.root}: async save of step {step} failed on "
                                     f"another rank; nothing was committed.")
            self._on_save_error(step, err)
            raise err
        self._ctrl.decide(lambda: self._keeper.after_commit(step, metrics))
        path = self._path(step_dir_name(step))
        self._notify(self.on_save, ManagerSaveResult(
            path=path, step=step, seconds=0.0, bytes_written=0, bytes_logical=0, metrics=metrics,
            committed=True))

    # ------------------------------------------------------------------ restoring

    def restore(self, state: Any, step: int | None = None,
                which: Literal["latest", "best"] | None = None, *, strict: bool = True,
                ) -> int | None:
        """Load a checkpoint into `state` in place on every rank; return its step.

        Default: the newest committed checkpoint that is valid; an incomplete or
        damaged newer one is skipped with a warning naming the problem. None when
        there is nothing to restore. `step=K`, `which="latest"` or `which="best"`
        select one explicitly and raise a typed error if it is damaged.
        """
        if step is not None and which is not None:
            raise ValueError("pass step= or which=, not both")
        if which not in (None, "latest", "best"):
            raise ValueError(f"which must be 'latest' or 'best', not {which!r}")
        state = as_state(state)
        self.wait()
        explicit = step is not None or which is not None
        tried: set[str] = set()
        while True:
            holder: dict = {}
            try:
                decision = self._ctrl.decide(
                    lambda h=holder: self._keeper.choose(step, which, tried, h))
            except BaseException:
                self._leases.drop(holder.get("lease"))
                raise
            self._warn(decision["notes"])
            name = decision["name"]
            if name is None:
                return None
            path = self._path(name)
            lease = holder.get("lease")
            reader: CheckpointReader | None = holder.get("reader")
            err: BaseException | None = None
            try:
                if reader is None:  # ranks other than 0 open it here, once
                    reader = CheckpointReader(path)
                load_open(state, reader, process_group=self._dcp_group(), strict=strict)
            except FALLBACK_ERRORS as e:
                err = e
            finally:
                self._leases.drop(lease)
            msgs = self._ctrl.gather(None if err is None else f"{type(err).__name__}: {err}")
            failed = [m for m in msgs if m is not None]
            if not failed:
                loaded = parse_step(name)
                manifest = reader.manifest
                self._ctrl.decide(lambda n=name, m=manifest: self._keeper.repair_pointers(n, m))
                reader.close()
                self._last_saved_step = loaded
                self._notify(self.on_restore, loaded, path)
                return loaded
            if reader is not None:
                reader.close()
            if explicit:
                raise err if err is not None else CorruptCheckpointError(
                    f"{path}: loading failed on another rank: {failed[0]}", path=path)
            self._warn([f"skipping {path}: {failed[0]}"])
            tried.add(name)

    def _warn(self, notes: list[str]) -> None:
        if self._ctrl.rank != 0:
            return  # one copy per job, not one per rank
        for n in notes:
            warnings.warn(f"shardckpt.CheckpointManager.restore: {n}", RuntimeWarning,
                          stacklevel=3)

def _async_save_fn() -> Callable[..., Any]:
    # Looked up on use (through the package, so it stays replaceable): async_save
    # pulls in the staging machinery that synchronous users never need.
    import shardckpt

    return shardckpt.async_save


