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
load) and alone deletes; the decisions travel on a dedicated gloo group, so the
manager's collectives never interleave with training collectives.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from . import errors as _errors
from . import format as fmt
from .api import load as _load
from .api import save as _save
from .errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InsufficientSpaceError,
    NotACheckpointError,
    ShardckptError,
    UnsupportedFormatError,
)
from .fsutil import dir_size, fsync_dir, write_file_durable
from .verify import verify as _verify

__all__ = ["CheckpointManager", "CheckpointInfo", "retained_steps"]

LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"
READERS_DIR = ".readers"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_HOST = socket.gethostname()

# Damage that makes `restore()` fall back to the previous checkpoint. A state that
# does not match (keys, shapes) is the caller's bug and is raised, never skipped.
_FALLBACK_ERRORS = (CorruptCheckpointError, IncompleteCheckpointError, NotACheckpointError,
                    CheckpointNotFoundError, UnsupportedFormatError)


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def parse_step(name: str) -> int | None:
    m = _STEP_RE.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint under the manager's root."""

    step: int
    name: str
    path: str
    time: float  # commit time (manifest `created_unix`), seconds since the epoch
    size_bytes: int  # apparent size of every file in the directory
    metrics: dict[str, Any]
    pointers: tuple[str, ...]  # "latest" and/or "best" where a pointer names it
    problem: str | None = None  # set when the manifest cannot be read


def retained_steps(candidates: Iterable[tuple[int, float | None]], *, keep_last: int | None,
                   keep_best: int, mode: str, keep_every: int | None) -> set[int]:
    """Steps the retention policy keeps (the union of its three rules).

    `candidates` are (step, metric value or None). Pointers, leases and saves in
    progress are protected by the caller on top of this.
    """
    cands = sorted(candidates)
    steps = [s for s, _ in cands]
    keep = set(steps if keep_last is None else steps[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    if keep_best:
        scored = [(v, s) for s, v in cands if v is not None and not math.isnan(v)]
        # Ties go to the newer step: it carries more training for the same score.
        if mode == "min":
            scored.sort(key=lambda vs: (vs[0], -vs[1]))
        else:
            scored.sort(key=lambda vs: (-vs[0], -vs[1]))
        keep |= {s for _, s in scored[:keep_best]}
    return keep


def _jsonable(metrics: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        elif hasattr(v, "item") and not isinstance(v, (str, bytes)):
            v = v.item()  # numpy scalars
        if not isinstance(v, (int, float, str, bool)) and v is not None:
            v = str(v)
        out[str(k)] = v
    return out


def _metric_value(metrics: dict[str, Any], metric: str | None) -> float | None:
    if metric is None or metric not in metrics:
        return None
    try:
        v = float(metrics[metric])
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _state_bytes(tree: Any) -> int:
    """Bytes the tensors of a DCP state occupy (global size for DTensors)."""
    if hasattr(tree, "state_dict") and callable(tree.state_dict) and not isinstance(tree, dict):
        tree = tree.state_dict()
    if isinstance(tree, dict):
        return sum(_state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(_state_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        # A DTensor's numel() is the global one: the checkpoint stores it once.
        return tree.numel() * tree.element_size()
    return 0


def _is_enospc(e: BaseException | None, seen: set[int] | None = None) -> bool:
    # Walks causes and DCP's per-rank failures; those can point back at each other.
    seen = set() if seen is None else seen
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, InsufficientSpaceError):
            return True
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        failures = getattr(e, "failures", None)  # DCP's CheckpointException
        if isinstance(failures, dict):
            for f in failures.values():
                exc = f[0] if isinstance(f, tuple) else f
                if isinstance(exc, BaseException) and _is_enospc(exc, seen):
                    return True
        e = e.__cause__ or e.__context__
    return False


def _rebuild_error(name: str, message: str) -> BaseException:
    # Only shardckpt's own classes are rebuilt by name; anything else becomes a
    # ShardckptError carrying the original type in its text.
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ShardckptError):
        try:
            return cls(message)
        except TypeError:
            pass
    return ShardckptError(f"[rank 0] {name}: {message}")


class _Control:
    """The manager's collectives, on a dedicated gloo group (or none when not distributed)."""

    def __init__(self, process_group: Any) -> None:
        self.group = None
        self.rank, self.size = 0, 1
        if not (dist.is_available() and dist.is_initialized()):
            return
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        # Collective over the default group, like every new_group call.
        self.group = dist.new_group(ranks=ranks, backend="gloo")
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(self.group, 0)

    def any(self, flag: bool) -> bool:
        """One all_reduce(MAX): True on every rank if True on any."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return bool(t.item())

    def decide(self, fn: Callable[[], Any]) -> Any:
        """Rank 0 runs `fn`; every rank gets its result, or raises its error."""
        exc: BaseException | None = None
        out: Any = None
        if self.rank == 0:
            try:
                out = ("ok", fn())
            except Exception as e:  # other ranks must learn of it, or they hang
                exc = e
                out = ("err", type(e).__name__, str(e))
        if self.size > 1:
            box = [out]
            dist.broadcast_object_list(box, src=self._src, group=self.group)
            out = box[0]
        if out[0] == "err":
            raise exc if exc is not None else _rebuild_error(out[1], out[2])
        return out[1]

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        box: list[Any] = [None] * self.size
        dist.all_gather_object(box, obj, group=self.group)
        return box


class CheckpointManager:
    """Step checkpoints under `root` with retention, pointers and preemption handling.

    Construct it on every rank (it creates a gloo group, a collective when
    torch.distributed is initialized); call `save`, `restore`, `step_boundary`
    and `wait` on every rank together. It assumes it is the only writer of `root`.

    Retention keeps the union of: the newest `keep_last` (None: all), the
    `keep_best` best by `metrics[metric]` (`mode` "min" or "max"), and every step
    divisible by `keep_every`; plus whatever a pointer or a live reader lease names.

    `async_save=True` writes through `shardckpt.async_save`; pointers and retention
    for that save happen at the next `save` / `restore` / `wait` on every rank.
    """

    def __init__(self, root: str | os.PathLike, keep_last: int | None = 3, keep_best: int = 1,
                 metric: str | None = None, mode: Literal["min", "max"] = "min",
                 keep_every: int | None = None, async_save: bool = False,
                 process_group: Any = None,
                 preemption_signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1), *,
                 save_options: dict[str, Any] | None = None,
                 verify_on_restore: Literal["sizes", "full"] = "sizes",
                 space_margin: float = 1.1, min_free_bytes: int = 0,
                 lease_ttl_s: float = 24 * 3600.0) -> None:
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
        self.root = os.path.abspath(os.fspath(root))
        self.keep_last = keep_last
        self.keep_best = keep_best if metric is not None else 0
        self.metric = metric
        self.mode = mode
        self.keep_every = keep_every
        self.async_save = async_save
        self.process_group = process_group
        self.save_options = dict(save_options or {})
        self.verify_on_restore = verify_on_restore
        self.space_margin = space_margin
        self.min_free_bytes = min_free_bytes
        self.lease_ttl_s = lease_ttl_s
        self.preempted = False
        self._signal: int | None = None
        self._prev_handlers: dict[int, Any] = {}
        self._pending: tuple[int, dict, Any] | None = None  # async: (step, metrics, handle)
        self._last_saved_step: int | None = None
        self._state_estimate: int | None = None
        self._ctrl = _Control(process_group)
        if self._ctrl.rank == 0:
            os.makedirs(self.root, exist_ok=True)
        self._install_handlers(tuple(preemption_signals))

    # ------------------------------------------------------------------ signals

    def _install_handlers(self, signals: tuple[int, ...]) -> None:
        if not signals:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("CheckpointManager created outside the main thread: preemption "
                          "signals are not handled (Python only allows it in the main thread)",
                          RuntimeWarning, stacklevel=3)
            return
        for s in signals:
            self._prev_handlers[s] = signal.signal(s, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Only a flag: the save itself needs collectives, which must happen on all
        # ranks at the same point of the loop (the next step boundary).
        self._signal = signum

    def request_preemption(self) -> None:
        """Act as if a preemption signal had arrived on this rank."""
        self._signal = signal.SIGTERM

    def close(self) -> None:
        """Finish a pending async save and give the signal handlers back."""
        try:
            self.wait()
        finally:
            for s, h in self._prev_handlers.items():
                if signal.getsignal(s) == self._on_signal:
                    signal.signal(s, h)
            self._prev_handlers.clear()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ listing

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def _read_pointer(self, which: str) -> dict | None:
        try:
            with open(self._path(which), "rb") as f:
                p = json.loads(f.read())
        except (OSError, ValueError):
            return None
        if not isinstance(p, dict) or not isinstance(p.get("name"), str):
            return None
        return p

    def _write_pointer(self, which: str, payload: dict) -> None:
        write_pointer(self._path(which), payload)

    def _pointer_names(self) -> dict[str, str]:
        out = {}
        for key, fname in (("latest", LATEST_POINTER), ("best", BEST_POINTER)):
            p = self._read_pointer(fname)
            if p is not None:
                out[key] = p["name"]
        return out

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest step first (local; no collectives)."""
        try:
            entries = os.listdir(self.root)
        except FileNotFoundError:
            return []
        ptrs = self._pointer_names()
        out = []
        for name in entries:
            step = parse_step(name)
            path = self._path(name)
            if step is None or fmt.checkpoint_state(path) != "committed":
                continue
            problem = None
            metrics: dict[str, Any] = {}
            try:
                m = fmt.read_manifest(path)
                um = m.get("user_metadata") or {}
                metrics = dict(um.get("metrics") or {})
                created = float(m.get("created_unix", 0.0))
            except ShardckptError as e:
                problem = str(e)
                created = os.path.getmtime(path)
            out.append(CheckpointInfo(
                step=step, name=name, path=path, time=created, size_bytes=dir_size(path),
                metrics=metrics, pointers=tuple(k for k, v in sorted(ptrs.items()) if v == name),
                problem=problem))
        out.sort(key=lambda i: i.step)
        return out

    @property
    def latest_step(self) -> int | None:
        """Step named by the `latest` pointer (local read)."""
        p = self._read_pointer(LATEST_POINTER)
        return None if p is None else p.get("step")

    @property
    def best_step(self) -> int | None:
        p = self._read_pointer(BEST_POINTER)
        return None if p is None else p.get("step")

    # ------------------------------------------------------------------ leases

    @contextmanager
    def lease(self, name_or_step: str | int) -> Iterator[str]:
        """Hold a reader lease: retention will not delete that checkpoint meanwhile.

        For readers outside `restore` (an evaluation job reading a checkpoint).
        """
        name = step_dir_name(name_or_step) if isinstance(name_or_step, int) else name_or_step
        path = self._take_lease(name)
        try:
            yield self._path(name)
        finally:
            self._drop_lease(path)

    def _take_lease(self, name: str) -> str:
        d = self._path(READERS_DIR)
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"{os.getpid()}-{_HOST}-{uuid.uuid4().hex[:8]}.json")
        write_pointer(path, {"name": name, "pid": os.getpid(), "host": _HOST,
                             "time": time.time()})
        return path

    @staticmethod
    def _drop_lease(path: str | None) -> None:
        if path:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _leased_names(self) -> set[str]:
        d = self._path(READERS_DIR)
        try:
            entries = os.listdir(d)
        except FileNotFoundError:
            return set()
        names = set()
        now = time.time()
        for e in entries:
            if not e.endswith(".json"):
                continue
            p = os.path.join(d, e)
            try:
                with open(p, "rb") as f:
                    lease = json.loads(f.read())
                name, pid, host = lease["name"], int(lease["pid"]), lease["host"]
                age = now - float(lease["time"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written, or garbage: not a lease
            # Liveness is only checkable for local pids; remote leases expire.
            stale = (not _pid_alive(pid)) if host == _HOST else age > self.lease_ttl_s
            if stale:
                self._drop_lease(p)
                continue
            names.add(name)
        return names

    # ------------------------------------------------------------------ retention

    def _protected(self) -> set[str]:
        prot = set(self._pointer_names().values()) | self._leased_names()
        if self._pending is not None:
            prot.add(step_dir_name(self._pending[0]))
        return prot

    def _droppable(self, infos: list[CheckpointInfo],
                   extra: tuple[int, float | None] | None = None) -> list[CheckpointInfo]:
        """What retention may delete, oldest first (`extra`: a save about to happen)."""
        cands = [(i.step, _metric_value(i.metrics, self.metric)) for i in infos]
        if extra is not None:
            cands = [c for c in cands if c[0] != extra[0]] + [extra]
        keep = retained_steps(cands, keep_last=self.keep_last, keep_best=self.keep_best,
                              mode=self.mode, keep_every=self.keep_every)
        prot = self._protected()
        return [i for i in infos if i.step not in keep and i.name not in prot
                and (extra is None or i.step != extra[0])]

    def _delete(self, name: str) -> None:
        # Rename first: a kill during rmtree must not leave a half-deleted
        # directory that still looks committed. The trash name is a leftover that
        # the next save (or `shardckpt gc`) removes.
        trash = self._path(fmt.trash_name(name, uuid.uuid4().hex[:12]))
        os.rename(self._path(name), trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def _clean_leftovers(self) -> None:
        pending = step_dir_name(self._pending[0]) if self._pending is not None else None
        for e in os.listdir(self.root):
            parsed = parse_leftover_in_root(e)
            if parsed is None or parsed[0] == pending:
                continue
            shutil.rmtree(self._path(e), ignore_errors=True)

    # ------------------------------------------------------------------ saving

    def _better(self, value: float, best: dict | None) -> bool:
        if best is None or fmt.checkpoint_state(self._path(best["name"])) != "committed":
            return True
        old = best.get("value")
        if not isinstance(old, (int, float)) or math.isnan(old):
            return True
        return value < old if self.mode == "min" else value > old

    def _prepare_write(self, step: int, metrics: dict) -> dict:
        """Rank 0, before anything is written: clean leftovers, make room or refuse."""
        os.makedirs(self.root, exist_ok=True)
        self._clean_leftovers()
        infos = self.list()
        prev = [i for i in infos if i.step != step]
        estimate = prev[-1].size_bytes if prev else (self._state_estimate or 0)
        need = int(estimate * self.space_margin) + self.min_free_bytes
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return {"freed": []}
        droppable = self._droppable(infos, (step, _metric_value(metrics, self.metric)))
        reclaim = sum(i.size_bytes for i in droppable)
        if free + reclaim < need:
            raise InsufficientSpaceError(
                f"{self.root}: not enough free space for step {step}: need about {need} bytes "
                f"(size of the previous checkpoint x {self.space_margin}), {free} free, and "
                f"retention may only drop {reclaim} bytes ({len(droppable)} checkpoint(s)). "
                f"Nothing was written. Free disk space or lower keep_last / keep_best.")
        freed = []
        for i in droppable:  # oldest first
            if free >= need:
                break
            self._delete(i.name)
            freed.append(i.name)
            free = shutil.disk_usage(self.root).free
        return {"freed": freed}

    def _after_commit(self, step: int, metrics: dict) -> dict:
        """Rank 0, once `step` is committed: move pointers, then apply retention."""
        name = step_dir_name(step)
        now = time.time()
        moved = []
        latest = self._read_pointer(LATEST_POINTER)
        # A save of an older step (after restoring an old one) still becomes latest:
        # it is what the run continues from.
        if latest is None or latest.get("name") != name:
            self._write_pointer(LATEST_POINTER, {"name": name, "step": step, "updated_unix": now})
            moved.append("latest")
        value = _metric_value(metrics, self.metric)
        if value is not None:
            best = self._read_pointer(BEST_POINTER)
            if self._better(value, best) or (best is not None and best.get("name") == name):
                self._write_pointer(BEST_POINTER, {
                    "name": name, "step": step, "metric": self.metric, "value": value,
                    "mode": self.mode, "updated_unix": now})
                moved.append("best")
        deleted = []
        for i in self._droppable(self.list()):
            self._delete(i.name)
            deleted.append(i.name)
        return {"pointers": moved, "deleted": deleted}

    def _cleanup_failed(self, step: int) -> None:
        # shardckpt.save's coordinator removes its staging dir on failure; this
        # also catches a leftover from a path where it could not.
        for p in fmt.find_partials(self._path(step_dir_name(step))):
            shutil.rmtree(p, ignore_errors=True)

    def _space_error(self, step: int, e: BaseException) -> InsufficientSpaceError:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = -1
        kept = [i.name for i in self.list()]
        return InsufficientSpaceError(
            f"{self.root}: disk full while writing step {step} ({free} bytes free now): {e}. "
            f"Nothing was committed and the partial checkpoint was removed; the previous "
            f"checkpoints are intact ({', '.join(kept) or 'none'}). Free disk space or lower "
            f"keep_last.")

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, Any] | None = None,
             ) -> bool:
        """Save `state` as `root/step_<step>`, move the pointers, apply retention.

        Every rank calls it. Returns True when a preemption signal reached any rank:
        this save was then made synchronously, and the caller should exit.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, not {step}")
        preempt = self._ctrl.any(self._signal is not None)
        self.preempted = self.preempted or preempt
        self._save(step, state, _jsonable(metrics), sync=preempt or not self.async_save,
                   reason="preemption" if preempt else None)
        return preempt

    def step_boundary(self, step: int, state: dict[str, Any]) -> bool:
        """Call once per step on every rank; costs one small all_reduce on gloo.

        If a preemption signal reached any rank, all ranks save `state` as `step`
        (unless that step was just saved) and it returns True: exit the loop then.
        """
        if not self._ctrl.any(self._signal is not None):
            return False
        self.preempted = True
        if self._last_saved_step != int(step):
            self._save(int(step), state, {}, sync=True, reason="preemption")
        else:
            self.wait()
        return True

    def _save(self, step: int, state: dict[str, Any], metrics: dict, *, sync: bool,
              reason: str | None) -> None:
        self.wait()  # one save in flight at most; its pointers/retention first
        if self._state_estimate is None:
            # Once per manager and on every rank: a Stateful's state_dict() may itself
            # be a collective (FSDP). Only used when no earlier checkpoint exists.
            self._state_estimate = _state_bytes(state)
        self._ctrl.decide(lambda: self._prepare_write(step, metrics))
        path = self._path(step_dir_name(step))
        meta = {"step": step, "metrics": metrics, "manager": {"reason": reason}}
        opts = dict(self.save_options)
        if sync:
            try:
                _save(state, path, process_group=self._dcp_group(), metadata=meta, **opts)
            except BaseException as e:
                self._on_save_error(step, e)
                raise
            self._last_saved_step = step
            self._ctrl.decide(lambda: self._after_commit(step, metrics))
            return
        handle = _async_save_fn()(state, path, process_group=self.process_group, metadata=meta,
                                **opts)
        self._pending = (step, metrics, handle)
        self._last_saved_step = step

    def _on_save_error(self, step: int, e: BaseException) -> None:
        if self._ctrl.rank == 0:
            self._cleanup_failed(step)
        if _is_enospc(e):
            raise self._space_error(step, e) from e

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
        if failed:
            self._last_saved_step = None
            if err is None:
                err = ShardckptError(f"{self.root}: async save of step {step} failed on "
                                     f"another rank; nothing was committed.")
            self._on_save_error(step, err)
            raise err
        self._ctrl.decide(lambda: self._after_commit(step, metrics))

    # ------------------------------------------------------------------ restoring

    def _check(self, name: str) -> BaseException | None:
        """Cheap pre-load check of one checkpoint; the typed error if damaged."""
        path = self._path(name)
        try:
            if self.verify_on_restore == "full":
                _verify(path)
                return None
            manifest = fmt.read_manifest(path)
            bad = []
            for rel, info in sorted(manifest["files"].items()):
                p = os.path.join(path, rel)
                try:
                    size = os.path.getsize(p)
                except OSError:
                    bad.append(f"{rel} (rank {info.get('rank')}): data file is missing")
                    continue
                if size != info.get("size"):
                    bad.append(f"{rel} (rank {info.get('rank')}): size {size} bytes, manifest "
                               f"says {info.get('size')} (truncated or overwritten)")
            if bad:
                return CorruptCheckpointError(
                    f"{path}: checkpoint is damaged: " + "; ".join(bad), path=path)
        except ShardckptError as e:
            return e
        return None

    def _choose(self, step: int | None, which: str | None, exclude: set[str],
                holder: dict) -> dict:
        """Rank 0: pick the checkpoint to load and lease it before checking it."""
        notes: list[str] = []
        if step is not None or which is not None:
            if step is not None:
                name = step_dir_name(step)
            else:
                fname = LATEST_POINTER if which == "latest" else BEST_POINTER
                ptr = self._read_pointer(fname)
                if ptr is None:
                    raise CheckpointNotFoundError(
                        f"{self.root}: no {which!r} pointer ({fname}); nothing to restore that "
                        f"way. Use restore(state) for the newest valid checkpoint.")
                name = ptr["name"]
            holder["lease"] = self._take_lease(name)
            err = self._check(name)
            if err is not None:
                raise err  # explicit choice: no silent fallback
            return {"name": name, "notes": notes}
        infos = self.list()
        newest = infos[-1].step if infos else -1
        for e in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            parsed = parse_leftover_in_root(e)
            if parsed and parsed[1] == "partial":
                s = parse_step(parsed[0])
                if s is not None and s > newest:
                    notes.append(f"{self._path(parsed[0])}: its save was interrupted and never "
                                 f"committed (leftover {e}); ignored")
        for info in reversed(infos):
            if info.name in exclude:
                continue
            holder["lease"] = self._take_lease(info.name)
            err = self._check(info.name)
            if err is None:
                return {"name": info.name, "notes": notes}
            self._drop_lease(holder.pop("lease"))
            notes.append(f"skipping {info.path}: {err}")
        return {"name": None, "notes": notes}

    def restore(self, state: dict[str, Any], step: int | None = None,
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
        self.wait()
        explicit = step is not None or which is not None
        tried: set[str] = set()
        while True:
            holder: dict = {}
            try:
                decision = self._ctrl.decide(
                    lambda h=holder: self._choose(step, which, tried, h))
            except BaseException:
                self._drop_lease(holder.get("lease"))
                raise
            self._warn(decision["notes"])
            name = decision["name"]
            if name is None:
                return None
            lease = holder.get("lease") or self._take_lease(name)
            path = self._path(name)
            err: BaseException | None = None
            try:
                self._prepare_state(state, path)
                _load(state, path, process_group=self._dcp_group(), strict=strict)
            except _FALLBACK_ERRORS as e:
                err = e
            finally:
                self._drop_lease(lease)
            msgs = self._ctrl.gather(None if err is None else f"{type(err).__name__}: {err}")
            failed = [m for m in msgs if m is not None]
            if not failed:
                loaded = parse_step(name)
                self._ctrl.decide(lambda n=name: self._repair_pointers(n))
                self._last_saved_step = loaded
                return loaded
            if explicit:
                raise err if err is not None else CorruptCheckpointError(
                    f"{path}: loading failed on another rank: {failed[0]}", path=path)
            self._warn([f"skipping {path}: {failed[0]}"])
            tried.add(name)

    @staticmethod
    def _prepare_state(state: dict[str, Any], path: str) -> None:
        # Duck-typed hook (TrainState.prepare_load): lets a Stateful look at the
        # checkpoint's keys before loading, e.g. after a world-size change.
        for v in state.values():
            fn = getattr(v, "prepare_load", None)
            if callable(fn):
                fn(path)

    def _warn(self, notes: list[str]) -> None:
        if self._ctrl.rank != 0:
            return  # one copy per job, not one per rank
        for n in notes:
            warnings.warn(f"shardckpt.CheckpointManager.restore: {n}", RuntimeWarning,
                          stacklevel=3)

    def _repair_pointers(self, name: str) -> None:
        """Rank 0 after a restore: `latest` must not lag behind a committed checkpoint."""
        try:
            self._repair_pointers_unsafe(name)
        except OSError as e:  # e.g. a read-only root for an evaluation job
            warnings.warn(f"shardckpt.CheckpointManager: could not update pointers in "
                          f"{self.root}: {e}", RuntimeWarning, stacklevel=2)

    def _repair_pointers_unsafe(self, name: str) -> None:
        step = parse_step(name)
        latest = self._read_pointer(LATEST_POINTER)
        stale = (latest is None or fmt.checkpoint_state(self._path(latest["name"])) != "committed"
                 or (parse_step(latest["name"]) or -1) < (step or 0))
        if stale:
            self._write_pointer(LATEST_POINTER, {"name": name, "step": step,
                                                 "updated_unix": time.time()})
        if self.metric is None:
            return
        try:
            metrics = (fmt.read_manifest(self._path(name)).get("user_metadata") or {}).get(
                "metrics") or {}
        except ShardckptError:
            return
        value = _metric_value(metrics, self.metric)
        if value is not None and self._better(value, self._read_pointer(BEST_POINTER)):
            self._write_pointer(BEST_POINTER, {
                "name": name, "step": step, "metric": self.metric, "value": value,
                "mode": self.mode, "updated_unix": time.time()})


def _async_save_fn() -> Callable[..., Any]:
    # Looked up on use (through the package, so it stays replaceable): async_save
    # pulls in the staging machinery that synchronous users never need.
    import shardckpt

    return shardckpt.async_save


def parse_leftover_in_root(entry: str) -> tuple[str, str] | None:
    """(checkpoint name, "partial" | "old") for a leftover of a step checkpoint."""
    parsed = fmt.parse_leftover(entry)
    if parsed is None or parse_step(parsed[0]) is None:
        return None
    return parsed


def write_pointer(path: str, payload: dict) -> None:
    """Durable atomic small-file write: temp file, fsync, rename, fsync of the directory."""
    write_file_durable(path, json.dumps(payload, sort_keys=True).encode())
