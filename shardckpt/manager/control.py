"""The manager's collectives, on a dedicated gloo group, and error transport between ranks.

Rank 0 alone decides (what to delete, which checkpoint to load); the decision
and any error travel on this group, so the manager's collectives never
interleave with training collectives.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from .. import errors as _errors
from ..errors import CollectiveTimeoutError, InsufficientSpaceError, ShardckptError


def is_enospc(e: BaseException | None, seen: set[int] | None = None) -> bool:
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
                if isinstance(exc, BaseException) and is_enospc(exc, seen):
                    return True
        e = e.__cause__ or e.__context__
    return False


def rebuild_error(name: str, message: str) -> BaseException:
    # Only shardckpt's own classes are rebuilt by name; anything else becomes a
    # ShardckptError carrying the original type in its text.
    cls = getattr(_errors, name, None)
    if isinstance(cls, type) and issubclass(cls, ShardckptError):
        try:
            return cls(message)
        except TypeError:
            pass
    return ShardckptError(f"[rank 0] {name}: {message}")


@contextlib.contextmanager
def _peers_answer(what: str) -> Iterator[None]:
    """The manager's own collectives raise a typed error when a peer is gone: gloo says
    "Connection closed by peer" (a RuntimeError) when another rank died."""
    try:
        yield
    except RuntimeError as e:
        raise CollectiveTimeoutError(
            f"CheckpointManager: another rank died or stopped answering while {what} "
            f"({type(e).__name__}: {str(e)[:300]}); checkpoints already committed are intact. "
            f"Restart the job; restore() resumes from the newest of them.") from e


class Control:
    """The manager's collectives, on a dedicated gloo group (or none when not distributed)."""

    def __init__(self, process_group: Any, timeout: float | None = None) -> None:
        self.group = None
        self.rank, self.size = 0, 1
        if not (dist.is_available() and dist.is_initialized()):
            return
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        # Collective over the default group, like every new_group call.
        kw = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
        self.group = dist.new_group(ranks=ranks, backend="gloo", **kw)
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        self._src = dist.get_global_rank(self.group, 0)

    def any(self, flag: bool) -> bool:
        """One all_reduce(MAX): True on every rank if True on any."""
        if self.size == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32)
        with _peers_answer("agreeing on a flag"):
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
            with _peers_answer("sharing rank 0's decision"):
                dist.broadcast_object_list(box, src=self._src, group=self.group)
            out = box[0]
        if out[0] == "err":
            raise exc if exc is not None else rebuild_error(out[1], out[2])
        return out[1]

    def gather(self, obj: Any) -> list[Any]:
        if self.size == 1:
            return [obj]
        box: list[Any] = [None] * self.size
        with _peers_answer("gathering every rank's outcome"):
            dist.all_gather_object(box, obj, group=self.group)
        return box
