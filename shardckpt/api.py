"""Public save / load entry points (the API fixed in DESIGN.md)."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import codec
from . import format as fmt
from .dcp import SafeLoadPlanner, SafeSavePlanner, ShardReader, ShardWriter
from .dcp.join import agree, join
from .dcp.planner import key_hint
from .errors import (
    LoadFailedError,
    MissingKeysError,
    SaveFailedError,
    ShardckptError,
    StateMismatchError,
)
from .format.keys import AmbiguousKeysError, key_mapper, model_key_map
from .gcpause import gc_paused
from .io.data_writer import typed_write_error
from .io.reader import CheckpointReader
from .io.storage import norm_path
from .training.optim_state import prepare_plain_optimizer

log = logging.getLogger("shardckpt")


@contextmanager
def quiet_no_dist() -> Iterator[None]:
    # DCP warns on every single-process call; for shardckpt that is a supported mode.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def _failures(e: BaseException) -> list[tuple[int | None, BaseException]]:
    if not isinstance(e, CheckpointException):
        return [(None, e)]
    out = []
    for rank, failure in sorted(e.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, BaseException):
            out.append((rank, exc))
    return out or [(None, e)]


def typed_error(e: BaseException, *, path: str, action: str) -> BaseException:
    """The error a caller of save/load sees for `e`: always a ShardckptError (an Exception).

    DCP wraps per-rank failures in CheckpointException, a BaseException that
    `except Exception` does not catch; the first typed shardckpt error inside
    is raised as itself, an OSError becomes a typed write/read error naming the
    path and rank, anything else is chained under SaveFailedError/LoadFailedError.
    """
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return e
    if isinstance(e, ShardckptError):
        return _as_save_error(e) if action == "save" else e
    failures = _failures(e)
    multi = len(failures) > 1
    for rank, exc in failures:
        if isinstance(exc, ShardckptError):
            if multi and "rank" not in str(exc):
                exc.args = (f"[rank {rank}] {exc.args[0] if exc.args else ''}",) + exc.args[1:]
            return _as_save_error(exc) if action == "save" else exc
    rank, first = failures[0]
    who = path if rank is None else f"{path} (rank {rank})"
    if action == "save":
        if isinstance(first, OSError):
            return typed_write_error(first, getattr(first, "filename", None) or path, rank)
        err: ShardckptError = SaveFailedError(
            f"{who}: save failed ({type(first).__name__}: {first}); nothing was committed and "
            f"earlier checkpoints are intact.")
    else:
        err = LoadFailedError(f"{who}: load failed ({type(first).__name__}: {first}); the "
                              f"state may be partly loaded, the checkpoint is unchanged.")
    err.__cause__ = first
    return err


def _as_save_error(e: ShardckptError) -> ShardckptError:
    """A read that failed inside a save (the target's state, a base's manifest on an
    unreachable store) is the save's failure: `except SaveFailedError` must see it."""
    if type(e) is not LoadFailedError:
        return e
    err = SaveFailedError(f"{e}; the save failed, nothing was committed and earlier "
                          f"checkpoints are intact.")
    err.__cause__ = e
    return err


# A single Stateful passed as the whole state is stored under one top-level key,
# so that `save(ts, p)` and `save({"train": ts}, p)` write the same checkpoint.
STATEFUL_KEYS = (("TrainState", "train"), ("Module", "model"), ("Optimizer", "optimizer"))
DEFAULT_STATEFUL_KEY = "state"


def as_state(state: Any) -> dict[str, Any]:
    """`state` as DCP's dict: a dict as is, one Stateful object under its key."""
    if isinstance(state, dict):
        return state
    if callable(getattr(state, "state_dict", None)) and callable(
            getattr(state, "load_state_dict", None)):
        names = {c.__name__ for c in type(state).__mro__}
        key = next((k for cls, k in STATEFUL_KEYS if cls in names), DEFAULT_STATEFUL_KEY)
        return {key: state}
    raise TypeError(f"state must be a dict (DCP state) or an object with state_dict() and "
                    f"load_state_dict(), not {type(state).__name__}")


@dataclass(frozen=True)
class SaveResult:
    """What a save did, for a logger: where, how long, how many bytes."""

    path: str
    seconds: float
    bytes_written: int  # on disk, every rank's files and the manifest
    bytes_logical: int  # tensor and object bytes before compression

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def save(state: Any, path: str | os.PathLike, *, process_group: Any = None,
         compression: str = "zstd", level: int = 1, block_size: int = fmt.DEFAULT_BLOCK_SIZE,
         threads: int | None = None, overwrite: bool = True,
         metadata: dict | None = None, timeout: float | None = None,
         storage_options: dict | None = None,
         base: str | os.PathLike | None = None) -> SaveResult:
    """Save `state` as a sharded checkpoint at `path`; every rank calls it.

    `state` is a dict with DCP semantics (tensors, DTensors, nested dicts,
    Stateful objects) or one Stateful object (a TrainState is stored under
    "train", an nn.Module under "model", an optimizer under "optimizer", anything
    else under "state"). Each rank writes its own file in parallel; the checkpoint
    becomes visible only after every rank's data is durable and rank 0 has
    committed the manifest. A rank that calls it while others of the group do not
    gets CollectiveTimeoutError after `timeout` seconds (default 600).

    `path` may be a URL (s3://bucket/prefix/name, any fsspec URL): every rank
    streams its data to the store, no shared filesystem needed (docs/STORAGE.md);
    `storage_options` (endpoint, credentials, part size) apply to its bucket.

    `base`: an earlier checkpoint in the same directory; every block identical to
    one it (or a checkpoint it references) holds is referenced, not written again.
    A state whose keys, shapes or dtypes differ from the base's is saved in full.
    """
    t0 = time.perf_counter()
    state = as_state(state)
    join(process_group, what="save", path=os.fspath(path), timeout=timeout)
    if threads is None:
        threads = codec.blocking_threads()
    writer = ShardWriter(path, compression=compression, level=level, block_size=block_size,
                         threads=threads, overwrite=overwrite, user_metadata=metadata,
                         storage_options=storage_options, base=base)
    try:
        with quiet_no_dist(), gc_paused():
            md = dcp.save(state, storage_writer=writer, process_group=process_group,
                          planner=SafeSavePlanner(path=os.fspath(path),
                                                  process_group=process_group))
    except BaseException as e:
        writer.abort()
        if writer.committed and not isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise SaveFailedError(
                f"{norm_path(path)}: the checkpoint WAS committed (complete, durable and "
                f"loadable); what failed came after the commit, on the way back to the ranks "
                f"({type(e).__name__}: {e}): another rank likely died. Check the other ranks' "
                f"logs before resuming from it.") from e
        err = typed_error(e, path=os.fspath(path), action="save")
        if err is e:
            raise
        raise err from e
    totals = md.storage_data if isinstance(getattr(md, "storage_data", None), dict) else {}
    return SaveResult(path=norm_path(path), seconds=time.perf_counter() - t0,
                      bytes_written=int(totals.get("bytes_written", 0)),
                      bytes_logical=int(totals.get("bytes_logical", 0)))


@dataclass(frozen=True)
class LoadReport:
    """What a load did (this rank's view): keys loaded, asked for but absent, and
    stored but not asked for (within include/exclude)."""

    path: str
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _scope(include: Sequence[str] | None, exclude: Sequence[str] | None) -> Any:
    if not include and not exclude:
        return None
    inc = [include] if isinstance(include, str) else list(include or ())
    exc = [exclude] if isinstance(exclude, str) else list(exclude or ())

    def in_scope(key: str) -> bool:
        return ((not inc or any(fnmatch.fnmatchcase(key, g) for g in inc))
                and not any(fnmatch.fnmatchcase(key, g) for g in exc))

    return in_scope


def load(state: Any, path: str | os.PathLike, *, process_group: Any = None,
         strict: bool = True, threads: int | None = None, verify: bool = True,
         include: Sequence[str] | None = None, exclude: Sequence[str] | None = None,
         strip_prefix: str | Sequence[str] | None = None,
         rename: dict[str, str] | None = None, timeout: float | None = None,
         storage_options: dict | None = None) -> LoadReport:
    """Load a checkpoint into `state` in place, at any world size (DCP semantics).

    With `strict`, keys missing from the checkpoint, keys of the checkpoint that
    nothing asked for, and shape or dtype differences raise typed errors.
    `include` / `exclude` (glob patterns on the keys, the checkpoint's after
    mapping and the state's) limit what the load is about: keys out of scope are
    neither loaded (the state's keep their values, whatever their shape) nor
    "unexpected"; every key in scope the state asks for must be there. `strip_prefix` ("module.") and
    `rename` ({regex: replacement}) map the checkpoint's keys to the state's
    before matching (docs/USAGE.md: key mapping). Returns a LoadReport; with
    strict=False it warns when an asked-for key was not loaded.
    """
    join(process_group, what="load", path=os.fspath(path), timeout=timeout)
    if threads is None:
        threads = codec.blocking_threads()  # the caller waits for the load: use every CPU
    # Opened once, with typed errors before any collective starts, on every rank.
    ckpt = _open_everywhere(path, process_group, timeout, threads=threads, verify=verify,
                            key_map=key_mapper(strip_prefix, rename),
                            storage_options=storage_options)
    try:
        return load_open(as_state(state), ckpt, process_group=process_group, strict=strict,
                         scope=_scope(include, exclude))
    finally:
        ckpt.close()


def _open_everywhere(path: str | os.PathLike, process_group: Any, timeout: float | None,
                     **kw: Any) -> CheckpointReader:
    """Open the checkpoint on every rank; if any rank cannot, every rank raises."""
    ckpt, err = None, None
    try:
        ckpt = CheckpointReader(path, **kw)
    except (ShardckptError, OSError) as e:
        err = e
    try:
        agree(process_group, what="load", path=os.fspath(path), error=err, timeout=timeout)
    except BaseException:
        if ckpt is not None:
            ckpt.close()
        raise
    return ckpt


def load_model(model: Any, path: str | os.PathLike, *, strict: bool = True,
               process_group: Any = None, threads: int | None = None,
               timeout: float | None = None) -> LoadReport:
    """Load only the model's weights from any shardckpt checkpoint, at any world size.

    The model's keys are found wherever the checkpoint keeps them: a plain state,
    a TrainState under any top-level key (`train.model.`), behind DDP / compiled
    wrappers (`module.`, `_orig_mod.`). Optimizer, scheduler, RNG and the rest
    of the checkpoint are neither read nor touched. FSDP2 / DDP models work
    through torch's get/set_model_state_dict.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    join(process_group, what="load_model", path=os.fspath(path), timeout=timeout)
    if threads is None:
        threads = codec.blocking_threads()
    msd = get_model_state_dict(model)
    ckpt = _open_everywhere(path, process_group, timeout, threads=threads)
    try:
        try:
            key_map, prefix, hits = model_key_map(msd, ckpt.stored_manifest.keys())
        except AmbiguousKeysError as e:
            raise StateMismatchError(f"{ckpt.path}: {e}") from None
        if hits == 0:
            raise MissingKeysError(
                f"{ckpt.path}: none of the model's {len(msd)} keys (e.g. {next(iter(msd), '')!r}) "
                f"is in the checkpoint, under any prefix; is it a checkpoint of this model?")
        ckpt.remap(key_map)
        report = load_open(msd, ckpt, process_group=process_group, strict=strict,
                           scope=lambda k: not k.startswith("\0"))
    finally:
        ckpt.close()
    set_model_state_dict(model, msd)
    return report
def load_open(state: dict[str, Any], ckpt: CheckpointReader, *, process_group: Any = None,
              strict: bool = True, scope: Any = None) -> LoadReport:
    """`load` from a checkpoint the caller has opened (the manager opens it once)."""
    keys = ckpt.manifest.keys()
    for key, value in state.items():
        # Objects with rank-private keys (TrainState) learn which ranks were saved,
        # so ranks added since then do not ask for keys that do not exist.
        prepare = getattr(value, "prepare_load", None)
        if callable(prepare):
            prepare(keys)
        elif isinstance(value, torch.optim.Optimizer):
            prepare_plain_optimizer(key, value, keys)
    planner = SafeLoadPlanner(strict=strict, path=ckpt.path, scope=scope)
    try:
        with quiet_no_dist(), gc_paused():
            dcp.load(state, storage_reader=ShardReader(reader=ckpt), planner=planner,
                     process_group=process_group)
    except BaseException as e:
        err = typed_error(e, path=ckpt.path, action="load")
        if err is e:
            raise
        raise err from e
    asked = set(planner.state_dict)
    report = LoadReport(path=ckpt.path, loaded=sorted(asked - set(planner.missing)),
                        missing=list(planner.missing), unexpected=list(planner.unexpected))
    if report.missing and not strict:
        if not report.loaded:
            log.error("shardckpt.load: NOTHING was loaded from %s: none of the %d keys asked "
                      "for is in the checkpoint", ckpt.path, len(asked))
            warnings.warn(
                f"{ckpt.path}: NOTHING was loaded: none of the {len(asked)} keys asked for is "
                f"in the checkpoint (e.g. {report.missing[0]!r}); the state is unchanged."
                f"{key_hint(report.missing, ckpt.manifest.keys())}", UserWarning, stacklevel=3)
        else:
            warnings.warn(
                f"{ckpt.path}: {len(report.missing)} of {len(asked)} keys asked for are not in "
                f"the checkpoint and keep their values (e.g. {report.missing[0]!r})."
                f"{key_hint(report.missing, ckpt.manifest.keys())}", UserWarning, stacklevel=3)
    return report
