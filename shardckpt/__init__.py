"""shardckpt: distributed sharded checkpointing for PyTorch.

Public API (see DESIGN.md): save, load, async_save, TrainState, CheckpointManager,
set_seed, verify. Storage plugins for plain DCP: ShardWriter, ShardReader.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .api import load, save
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DtypeMismatchError,
    IncompleteCheckpointError,
    InsufficientSpaceError,
    MissingKeysError,
    NotACheckpointError,
    SaveFailedError,
    ShapeMismatchError,
    ShardckptError,
    StateMismatchError,
    UnexpectedKeysError,
    UnsafeObjectError,
    UnsupportedFormatError,
)
from .storage import ShardReader, ShardWriter
from .verify import VerifyReport, verify

# Heavier pieces load on first use, so `import shardckpt` stays cheap.
_LAZY = {
    "TrainState": ".train_state",
    "set_seed": ".seed",
    "seed_worker": ".seed",
    "make_generator": ".seed",
    "RestoreMismatchError": ".train_state",
    "ResumableLoader": ".data_position",
    "ZeroOptimizerState": ".zero",
    "CheckpointManager": ".manager",
    "async_save": ".async_ckpt",
    "AsyncSaveHandle": ".async_ckpt",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")
    return getattr(importlib.import_module(mod, __name__), name)


__all__ = [
    "__version__", "save", "load", "verify", "VerifyReport", "ShardReader", "ShardWriter",
    *_LAZY,
    "ShardckptError", "CheckpointNotFoundError", "NotACheckpointError",
    "IncompleteCheckpointError", "CorruptCheckpointError", "StateMismatchError",
    "MissingKeysError", "UnexpectedKeysError", "ShapeMismatchError", "DtypeMismatchError",
    "CheckpointExistsError", "InsufficientSpaceError", "SaveFailedError",
    "UnsafeObjectError", "UnsupportedFormatError",
]
