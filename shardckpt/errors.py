"""Typed errors. Every message names the path (and rank / tensor where known) and says what to do."""

from __future__ import annotations


class ShardckptError(Exception):
    """Base class of every error shardckpt raises on purpose."""


class CheckpointNotFoundError(ShardckptError, FileNotFoundError):
    """The path does not exist."""


class NotACheckpointError(ShardckptError):
    """The path exists but holds no shardckpt checkpoint."""


class IncompleteCheckpointError(ShardckptError):
    """A save started but was never committed (crash, kill, or failure on some rank)."""


class CorruptCheckpointError(ShardckptError):
    """Stored bytes do not match their checksum, or a file is truncated or missing."""

    def __init__(self, message: str, *, path: str | None = None, rank: int | None = None,
                 tensor: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.rank = rank
        self.tensor = tensor


class BaseCheckpointError(CorruptCheckpointError):
    """A block an incremental checkpoint references is missing or damaged in its base
    checkpoint; the message names both checkpoints and the tensor."""

    def __init__(self, message: str, *, path: str | None = None, rank: int | None = None,
                 tensor: str | None = None, base: str | None = None) -> None:
        super().__init__(message, path=path, rank=rank, tensor=tensor)
        self.base = base


class InvalidBaseError(ShardckptError, ValueError):
    """`base=` cannot serve as the base of this save (not a sibling, not committed)."""


class ReferencedCheckpointError(ShardckptError):
    """The checkpoint is a base of other checkpoints; the operation would break them."""


class StateMismatchError(ShardckptError):
    """The state to load into does not match the checkpoint (keys, shapes or dtypes)."""


class MissingKeysError(StateMismatchError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnexpectedKeysError(StateMismatchError, KeyError):
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(StateMismatchError, ValueError):
    pass


class DtypeMismatchError(StateMismatchError, TypeError):
    pass


class KeyMappingError(StateMismatchError, ValueError):
    """strip_prefix / rename send two keys to one."""


class CheckpointExistsError(ShardckptError, FileExistsError):
    """The target path is occupied by something shardckpt will not overwrite."""


class InsufficientSpaceError(ShardckptError, OSError):
    """Not enough free disk space to write the checkpoint."""


class SaveFailedError(ShardckptError):
    """A save failed on one or more ranks; nothing was committed."""


class LoadFailedError(ShardckptError):
    """A load failed on one or more ranks for a reason that is not damage or a mismatch
    (the cause is chained); the checkpoint itself was not changed."""


class CollectiveTimeoutError(ShardckptError):
    """Not every rank of the group called the same save or load within the timeout."""


class UnsupportedFormatError(ShardckptError):
    """The checkpoint was written by a newer, unknown format version."""


class UnsafeObjectError(ShardckptError):
    """A non-tensor item would need arbitrary unpickling to load; refused."""
