"""Public save / load entry points (the API fixed in DESIGN.md)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from . import codec
from . import format as fmt
from .dcp import SafeLoadPlanner, ShardReader, ShardWriter
from .errors import ShardckptError
from .format.keys import key_mapper
from .io.reader import CheckpointReader


@contextmanager
def quiet_no_dist() -> Iterator[None]:
    # DCP warns on every single-process call; for shardckpt that is a supported mode.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def unwrap_checkpoint_exception(e: BaseException) -> BaseException:
    """DCP wraps per-rank failures; surface the first typed shardckpt error as itself."""
    if not isinstance(e, CheckpointException):
        return e
    first = None
    for rank, failure in sorted(e.failures.items()):
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, ShardckptError):
            if len(e.failures) > 1 and "rank" not in str(exc):
                exc.args = (f"[rank {rank}] {exc.args[0] if exc.args else ''}",) + exc.args[1:]
            return exc
        if first is None and isinstance(exc, BaseException):
            first = exc
    if isinstance(first, OSError):
        return first
    return e


def save(state: dict[str, Any], path: str | os.PathLike, *, process_group: Any = None,
         compression: str = "zstd", level: int = 1, block_size: int = fmt.DEFAULT_BLOCK_SIZE,
         threads: int | None = None, overwrite: bool = True,
         metadata: dict | None = None) -> None:
    """Save `state` (DCP semantics) as a sharded checkpoint at `path`; every rank calls it.

    Each rank writes its own file in parallel; the checkpoint becomes visible only
    after every rank's data is durable and rank 0 has committed the manifest.
    """
    if threads is None:
        threads = codec.blocking_threads()
    writer = ShardWriter(path, compression=compression, level=level, block_size=block_size,
                         threads=threads, overwrite=overwrite, user_metadata=metadata)
    try:
        with quiet_no_dist():
            dcp.save(state, storage_writer=writer, process_group=process_group)
    except BaseException as e:
        writer.abort()
        err = unwrap_checkpoint_exception(e)
        if err is e:
            raise
        raise err from e


def load(state: dict[str, Any], path: str | os.PathLike, *, process_group: Any = None,
         strict: bool = True, threads: int | None = None, verify: bool = True,
         strip_prefix: str | Sequence[str] | None = None,
         rename: dict[str, str] | None = None) -> None:
    """Load a checkpoint into `state` in place, at any world size (DCP semantics).

    With `strict`, keys missing from the checkpoint, keys of the checkpoint that
    nothing asked for, and shape or dtype differences raise typed errors.
    `strip_prefix` ("module.") and `rename` ({regex: replacement}) map the
    checkpoint's keys to the state's before matching.
    """
    if threads is None:
        threads = codec.blocking_threads()  # the caller waits for the load: use every CPU
    # Opened once, with typed errors before any collective starts.
    ckpt = CheckpointReader(path, threads=threads, verify=verify,
                            key_map=key_mapper(strip_prefix, rename))
    try:
        load_open(state, ckpt, process_group=process_group, strict=strict)
    finally:
        ckpt.close()


def load_open(state: dict[str, Any], ckpt: CheckpointReader, *, process_group: Any = None,
              strict: bool = True) -> None:
    """`load` from a checkpoint the caller has opened (the manager opens it once)."""
    keys = ckpt.manifest.keys()
    for value in state.values():
        # Objects with rank-private keys (TrainState) learn which ranks were saved,
        # so ranks added since then do not ask for keys that do not exist.
        prepare = getattr(value, "prepare_load", None)
        if callable(prepare):
            prepare(keys)
    planner = SafeLoadPlanner(strict=strict, path=ckpt.path)
    try:
        with quiet_no_dist():
            dcp.load(state, storage_reader=ShardReader(reader=ckpt), planner=planner,
                     process_group=process_group)
    except CheckpointException as e:
        err = unwrap_checkpoint_exception(e)
        if err is e:
            raise
        raise err from e
