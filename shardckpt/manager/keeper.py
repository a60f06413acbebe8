"""Rank 0's decisions about the root: what to delete, where the pointers go, what to load.

The manager runs these on rank 0 only (inside `Control.decide`) and sends the
outcome to every rank; nothing here is a collective.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import stat
import time
import uuid
import warnings
from typing import Any

import torch

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    InsufficientSpaceError,
    NotACheckpointError,
    UnsupportedFormatError,
)
from ..format import DirState
from ..format.names import Leftover, trash_name
from ..io.commit import staging_abandoned
from ..io.committed import read_committed
from ..io.fsutil import fsync_dir, remove_dir
from ..io.reader import CheckpointReader, find_partials
from ..io.storage import is_url, storage_for
from ..tools.verify import verify_reader
from . import catalog, refcount
from .backoff import BaseBackoff
from .catalog import CheckpointInfo, files_damage, list_checkpoints, precheck, step_entries
from .leases import Leases
from .names import BEST_POINTER, LATEST_POINTER, parse_leftover_in_root, parse_step, step_dir_name
from .pointers import Pointers
from .retention import Policy, metric_value

log = logging.getLogger("shardckpt")

# Damage that makes `restore()` fall back to the previous checkpoint. A state that
# does not match (keys, shapes) is the caller's bug and is raised, never skipped.
FALLBACK_ERRORS = (CorruptCheckpointError, IncompleteCheckpointError, NotACheckpointError,
                   CheckpointNotFoundError, UnsupportedFormatError)


def state_bytes(tree: Any) -> int:
    """Bytes the tensors of a DCP state occupy (global size for DTensors)."""
    if hasattr(tree, "state_dict") and callable(tree.state_dict) and not isinstance(tree, dict):
        tree = tree.state_dict()
    if isinstance(tree, dict):
        return sum(state_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(state_bytes(v) for v in tree)
    if isinstance(tree, torch.Tensor):
        # A DTensor's numel() is the global one: the checkpoint stores it once.
        return tree.numel() * tree.element_size()
    return 0


class RootKeeper:
    def __init__(self, root: str, *, policy: Policy, metric: str | None, mode: str,
                 leases: Leases, verify_on_restore: str, space_margin: float,
                 min_free_bytes: int, incremental: bool = False, full_every: int = 10) -> None:
        if full_every < 1:
            raise ValueError(f"full_every must be >= 1, not {full_every}")
        self.root = root
        self.incremental = incremental
        self.full_every = full_every
        self._save_leases: list[str | None] = []  # the bases of the save in flight
        self.backoff = BaseBackoff(root, full_every)
        self.policy = policy
        self.metric = metric
        self.mode = mode
        self.pointers = Pointers(root)
        self.leases = leases
        self.verify_on_restore = verify_on_restore
        self.space_margin = space_margin
        self.min_free_bytes = min_free_bytes
        self.pending_name: str | None = None  # an async save in flight: never touched
        self.state_estimate: int | None = None

    def _path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def protected(self) -> set[str]:
        prot = set(self.pointers.names().values()) | self.leases.live_names()
        if self.pending_name is not None:
            prot.add(self.pending_name)
        return prot

    def drop_save_leases(self) -> None:
        for p in self._save_leases:
            self.leases.drop(p)
        self._save_leases = []

    def choose_base(self, step: int) -> tuple[str | None, int]:
        """(base, chain) of the next save: the previous checkpoint and saves since the last
        full one; (None, 0) for a full save (not incremental, none yet, every full_every)."""
        if not self.incremental:
            return None, 0
        target = step_dir_name(step)
        latest = self.pointers.read(LATEST_POINTER)
        prev = None if latest is None or latest["name"] == target else latest["name"]
        if prev is None or storage_for(self._path(prev)).state(
                self._path(prev)) != DirState.COMMITTED:
            infos = [i for i in list_checkpoints(self.root)
                     if i.problem is None and i.name != target]
            if not infos:
                return None, 0
            prev = infos[-1].name
        try:
            m = read_committed(self._path(prev))
        except FALLBACK_ERRORS:
            return None, 0
        chain = m.user_metadata.get("manager", {}).get("chain") if m.bases else 0
        if type(chain) is not int or chain + 1 >= self.full_every:
            return None, 0
        if not self.backoff.worth(m):
            return None, 0
        damage = files_damage(self._path(prev))
        if damage is not None:
            # A save that referenced it would commit, and never load.
            warnings.warn(f"{self._path(prev)}: not used as the base of step {step}'s "
                          f"incremental save, which is written in full: {damage}",
                          RuntimeWarning, stacklevel=2)
            return None, 0
        # Leased until the save commits, so a concurrent `shardckpt gc` keeps it; the
        # checkpoints it references in turn stay because it (live) references them.
        self._save_leases = [self.leases.take(prev)]
        return prev, chain + 1

    def droppable(self, infos: list[CheckpointInfo],
                   extra: tuple[int, float | None] | None = None) -> list[CheckpointInfo]:
        """What retention may delete, oldest first (`extra`: a save about to happen)."""
        cands = [(i.step, metric_value(i.metrics, self.metric)) for i in infos]
        if extra is not None:
            cands = [c for c in cands if c[0] != extra[0]] + [extra]
        keep = self.policy.keep(cands)
        prot = self.protected()
        return [i for i in infos if i.step not in keep and i.name not in prot
                and (extra is None or i.step != extra[0])]

    def clean_leftovers(self) -> None:
        pending = self.pending_name
        if is_url(self.root):
            from ..io.objstore.leftovers import find_leftovers, remove_leftover

            st = storage_for(self.root)
            for item in find_leftovers(st, self.root, older_than=0.0)[0]:
                if item.checkpoint != pending and item.kind != "orphan":
                    remove_leftover(st, item)
            return
        for e in os.listdir(self.root):
            parsed = parse_leftover_in_root(e)
            if parsed is None or parsed[0] == pending:
                continue
            path = self._path(e)
            if parsed[1] == Leftover.OLD or staging_abandoned(path, older_than=0.0):
                remove_dir(path, self._path(trash_name(parsed[0], uuid.uuid4().hex[:12])))

    # ------------------------------------------------------------------ saving

    def better(self, value: float, best: dict | None) -> bool:
        if best is None or storage_for(self._path(best["name"])).state(
                self._path(best["name"])) != DirState.COMMITTED:
            return True
        old = best.get("value")
        if not isinstance(old, (int, float)) or math.isnan(old):
            return True
        return value < old if self.mode == "min" else value > old

    def prepare_write(self, step: int, metrics: dict) -> dict:
        """Rank 0, before anything is written: clean leftovers, make room or refuse."""
        if not is_url(self.root):
            os.makedirs(self.root, exist_ok=True)
        self.clean_leftovers()
        self.make_target_free(step)
        infos = list_checkpoints(self.root)
        prev = [i for i in infos if i.step != step]
        estimate = prev[-1].size_bytes if prev else (self.state_estimate or 0)
        need = int(estimate * self.space_margin) + self.min_free_bytes
        if is_url(self.root):
            return {"freed": [], **self._base_plan(step)}  # no free space to check there
        free = shutil.disk_usage(self.root).free
        if free >= need:
            return {"freed": [], **self._base_plan(step)}
        droppable = self.droppable(infos, (step, metric_value(metrics, self.metric)))
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
            if refcount.drop(self.root, i.name) == "deleted":
                freed.append(i.name)
            free = shutil.disk_usage(self.root).free
        return {"freed": freed, **self._base_plan(step)}

    def after_commit(self, step: int, metrics: dict) -> dict:
        """Rank 0, once `step` is committed: move pointers, then apply retention."""
        name = step_dir_name(step)
        now = time.time()
        moved = []
        latest = self.pointers.read(LATEST_POINTER)
        # A save of an older step (after restoring an old one) still becomes latest:
        # it is what the run continues from.
        # The pointers' renames are made durable by one fsync of the root: the first
        # deletion's (it renames into the root and fsyncs it before removing
        # anything), else the one at the end. A crash in between leaves a pointer
        # that lags, which restore repairs; retention decides from the pointers
        # as written, and never deletes what the new ones name.
        if latest is None or latest.get("name") != name:
            self.pointers.write(LATEST_POINTER, {"name": name, "step": step,
                                                  "updated_unix": now}, sync_dir=False)
            moved.append("latest")
        value = metric_value(metrics, self.metric)
        if value is not None:
            best = self.pointers.read(BEST_POINTER)
            if self.better(value, best) or (best is not None and best.get("name") == name):
                self.pointers.write(BEST_POINTER, {
                    "name": name, "step": step, "metric": self.metric, "value": value,
                    "mode": self.mode, "updated_unix": now}, sync_dir=False)
                moved.append("best")
        self.drop_save_leases()
        deleted, retired = [], []
        try:
            # One reading of who references whom for every drop and the sweep: on an
            # object store each reading costs a listing and a GET per checkpoint.
            refs = None
            for i in self.droppable(list_checkpoints(self.root)):
                refs = refs or refcount.references(self.root)
                outcome = refcount.drop(self.root, i.name, refs)
                (deleted if outcome == "deleted" else retired if outcome else []).append(i.name)
            deleted += refcount.sweep(self.root, self.protected(), refs)
        finally:
            if moved and not deleted and not is_url(self.root):
                fsync_dir(self.root)
        return {"pointers": moved, "deleted": deleted, "retired": retired}

    def _base_plan(self, step: int) -> dict:
        base, chain = self.choose_base(step)
        return {"base": base, "chain": chain}

    def make_target_free(self, step: int) -> None:
        """Before saving over `step`'s name: what references it is rewritten standalone, and
        a retired checkpoint there (kept only for those references) goes."""
        name = step_dir_name(step)
        path = self._path(name)
        if (storage_for(path).state(path) == DirState.MISSING if is_url(path)
                else not os.path.isdir(path)):
            return
        if refcount.references(self.root).users_of(name):
            refcount.release(self.root, name)
        if refcount.is_retired(self.root, name):
            refcount.drop(self.root, name)

    def cleanup_failed(self, step: int) -> None:
        # shardckpt.save's coordinator removes its staging dir on failure; this
        # also catches a leftover from a path where it could not.
        self.drop_save_leases()
        for p in find_partials(self._path(step_dir_name(step))):
            if staging_abandoned(p, older_than=0.0):
                shutil.rmtree(p, ignore_errors=True)

    def space_error(self, step: int, e: BaseException) -> InsufficientSpaceError:
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = -1
        kept = [i.name for i in list_checkpoints(self.root)]
        return InsufficientSpaceError(
            f"{self.root}: disk full while writing step {step} ({free} bytes free now): {e}. "
            f"Nothing was committed and the partial checkpoint was removed; the previous "
            f"checkpoints are intact ({', '.join(kept) or 'none'}). Free disk space or lower "
            f"keep_last.")

    def open_checked(self, name: str) -> tuple[CheckpointReader | None, BaseException | None]:
        """Open one checkpoint and check it cheaply (or fully); the typed error if damaged."""
        path = self._path(name)
        try:
            if stat.S_ISLNK(os.lstat(path).st_mode):
                # A step directory of the root must be one: a link could lead anywhere.
                return None, CorruptCheckpointError(
                    f"{path}: is a symlink; a manager root's step directories must be real "
                    f"directories (shardckpt never follows a link out of the root). Replace "
                    f"it by the checkpoint or restore it by its own path.", path=path)
        except OSError:
            pass  # missing: CheckpointReader says so with its typed error
        try:
            reader = CheckpointReader(path)
        except FALLBACK_ERRORS as e:
            return None, e
        try:
            err = (verify_reader(reader, raise_on_error=False).error()
                   if self.verify_on_restore == "full" else
                   precheck(reader) or reader.bases.precheck())
        except FALLBACK_ERRORS as e:
            err = e
        if err is not None:
            reader.close()
            return None, err
        return reader, None

    def choose(self, step: int | None, which: str | None, exclude: set[str],
                holder: dict) -> dict:
        """Rank 0: pick the checkpoint to load, lease it, then check it."""
        notes: list[str] = []
        if step is not None or which is not None:
            if step is not None:
                matches = [n for s, n in step_entries(self.root) if s == step]
                name = matches[-1] if matches else step_dir_name(step)
            else:
                fname = LATEST_POINTER if which == "latest" else BEST_POINTER
                ptr = self.pointers.read(fname)
                if ptr is None:
                    raise CheckpointNotFoundError(
                        f"{self.root}: no {which!r} pointer ({fname}); nothing to restore that "
                        f"way. Use restore(state) for the newest valid checkpoint.")
                name = ptr["name"]
            holder["lease"] = self.leases.take(name)
            holder["reader"], err = self.open_checked(name)
            if err is not None:
                raise err  # explicit choice: no silent fallback
            return {"name": name, "notes": notes}
        entries = step_entries(self.root)
        newest = entries[-1][0] if entries else -1
        for e in sorted(os.listdir(self.root)) if os.path.isdir(self.root) else []:
            parsed = parse_leftover_in_root(e)
            if parsed and parsed[1] == Leftover.PARTIAL:
                s = parse_step(parsed[0])
                if s is not None and s > newest:
                    notes.append(f"{self._path(parsed[0])}: its save was interrupted and never "
                                 f"committed (leftover {e}); ignored")
        for _, name in catalog.newest_first(self.root, entries):
            path = self._path(name)
            if name in exclude:
                continue
            if not storage_for(path).is_committed(path):
                continue
            holder["lease"] = self.leases.take(name)
            holder["reader"], err = self.open_checked(name)
            if err is None:
                return {"name": name, "notes": notes}
            self.leases.drop(holder.pop("lease"))
            notes.append(f"skipping {path}: {err}")
        failed = [n for n in notes if n.startswith("skipping ")]
        if failed or exclude:
            # Checkpoints exist and none loads: None would read as "a fresh run", which then
            # starts from step 0 and overwrites them.
            raise CorruptCheckpointError(
                f"{self.root}: none of its {len(failed) + len(exclude)} committed checkpoints "
                f"loads, so nothing was restored: {'; '.join(failed[:3]) or 'see the warnings'}."
                f" Repair or remove them (`shardckpt verify`, `shardckpt gc`), restore one by "
                f"step=, or start the run in a new root.", path=self.root)
        return {"name": None, "notes": notes}

    def repair_pointers(self, name: str, manifest: Any) -> None:
        """Rank 0 after a restore: `latest` must not lag behind a committed checkpoint."""
        try:
            self.repair_pointers_unsafe(name, manifest)
        except OSError as e:  # e.g. a read-only root for an evaluation job
            warnings.warn(f"shardckpt.CheckpointManager: could not update pointers in "
                          f"{self.root}: {e}", RuntimeWarning, stacklevel=2)

    def repair_pointers_unsafe(self, name: str, manifest: Any) -> None:
        step = parse_step(name)
        latest = self.pointers.read(LATEST_POINTER)
        stale = (latest is None
                 or storage_for(self._path(latest["name"])).state(
                     self._path(latest["name"])) != DirState.COMMITTED
                 or not catalog.pointer_current(latest, parse_step(latest["name"]) or -1,
                                                step or 0, manifest.created_unix))
        if stale:
            self.pointers.write(LATEST_POINTER, {"name": name, "step": step,
                                                  "updated_unix": time.time()})
        if self.metric is None:
            return
        value = metric_value(manifest.user_metadata.get("metrics"), self.metric)
        if value is not None and self.better(value, self.pointers.read(BEST_POINTER)):
            self.pointers.write(BEST_POINTER, {
                "name": name, "step": step, "metric": self.metric, "value": value,
                "mode": self.mode, "updated_unix": time.time()})
