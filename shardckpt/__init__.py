"""shardckpt: distributed sharded checkpointing for PyTorch.

Public API (see DESIGN.md): save, load, async_save, TrainState, CheckpointManager,
set_seed, verify. Storage plugins for plain DCP: ShardWriter, ShardReader.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .api import LoadReport, SaveResult, load, load_model, save
from .async_save import AsyncSaveHandle, async_save  # eager: the submodule shares the name
from .dcp import ShardReader, ShardWriter
from .errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    CorruptCheckpointError,
    DtypeMismatchError,
    IncompleteCheckpointError,
    InsufficientSpaceError,
    KeyMappingError,
    LoadFailedError,
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
from .tools.verify import VerifyReport, verify

# Heavier pieces load on first use, so `import shardckpt` stays cheap.
_LAZY = {
    "TrainState": ".training.train_state",
    "set_seed": ".training.seed",
    "seed_worker": ".training.seed",
    "make_generator": ".training.seed",
    "RestoreMismatchError": ".training.train_state",
    "ResumableLoader": ".training.data_position",
    "ZeroOptimizerState": ".training.zero",
    "CheckpointManager": ".manager",
    "CheckpointInfo": ".manager",
    "list_checkpoints": ".manager",
    "latest": ".manager",

}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'shardckpt' has no attribute {name!r}")
    return getattr(importlib.import_module(mod, __name__), name)


__all__ = [
    "__version__", "save", "load", "load_model", "LoadReport", "SaveResult", "async_save", "AsyncSaveHandle", "verify", "VerifyReport", "ShardReader", "ShardWriter",
    *_LAZY,
    "ShardckptError", "CheckpointNotFoundError", "CollectiveTimeoutError", "NotACheckpointError",
    "IncompleteCheckpointError", "CorruptCheckpointError", "StateMismatchError",
    "MissingKeysError", "UnexpectedKeysError", "ShapeMismatchError", "DtypeMismatchError",
    "CheckpointExistsError", "InsufficientSpaceError", "KeyMappingError", "SaveFailedError",
    "LoadFailedError",
    "UnsafeObjectError", "UnsupportedFormatError",
]
