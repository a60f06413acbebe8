"""The commit protocol: a hidden staging directory, then one atomic publish.

Shared by the DCP writer (one file per rank) and the offline tools (reshard,
convert), so every checkpoint shardckpt produces is committed the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid

from . import format as fmt
from .errors import CheckpointExistsError
from .fsutil import fsync_dir, publish_dir, write_file_durable


def begin_staging(final: str, *, overwrite: bool, save_id: str, world_size: int) -> str:
    """Check the target and create the staging directory for a checkpoint at `final`."""
    final = os.path.abspath(final)
    state = fmt.checkpoint_state(final)
    if state == "other":
        raise CheckpointExistsError(
            f"{final}: exists and is not a shardckpt checkpoint; refusing to overwrite it. "
            f"Choose another path or remove it.")
    if state == "committed" and not overwrite:
        raise CheckpointExistsError(
            f"{final}: a checkpoint is already committed there; pass overwrite=True "
            f"or choose another path.")
    parent, name = os.path.split(final)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, fmt.staging_name(name, uuid.uuid4().hex[:12]))
    os.makedirs(os.path.join(staging, fmt.DATA_DIR))
    marker = {"target": name, "save_id": save_id, "world_size": world_size,
              "started_unix": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
    write_file_durable(os.path.join(staging, fmt.PARTIAL_MARKER), json.dumps(marker).encode())
    fsync_dir(parent)
    return staging


def commit_staging(staging: str, final: str, manifest: dict) -> None:
    """Write the manifest durably, then publish the directory under its final name."""
    final = os.path.abspath(final)
    write_file_durable(os.path.join(staging, fmt.MANIFEST_NAME),
                       json.dumps(manifest, separators=(",", ":")).encode())
    os.unlink(os.path.join(staging, fmt.PARTIAL_MARKER))
    fsync_dir(os.path.join(staging, fmt.DATA_DIR))
    fsync_dir(staging)
    parent, name = os.path.split(final)
    publish_dir(staging, final, os.path.join(parent, fmt.trash_name(name, uuid.uuid4().hex[:12])))


def abort_staging(staging: str | None) -> None:
    if staging and os.path.isdir(staging):
        shutil.rmtree(staging, ignore_errors=True)
