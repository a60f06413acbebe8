"""One source abstraction over every checkpoint format the tools read.

shardckpt checkpoints, stock DCP directories, torch.save files and safetensors
(one file or a sharded directory with an index) are read key by key, tensors in
row slabs where the format allows, so a checkpoint larger than RAM streams.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..dcp.metadata import planner_data_from_json
from ..errors import NotACheckpointError, UnsupportedFormatError
from ..format import dtype_from_name
from ..format.names import MANIFEST_NAME
from ..io.reader import CheckpointReader, check_committed

# Read granularity: large enough for sequential I/O, small enough to stream.
DEFAULT_SLAB_BYTES = 8 << 20
# Tensors smaller than this are not worth splitting across readers.
DEFAULT_MIN_SPLIT_BYTES = 4096

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class Entry:
    """One key of a source checkpoint."""

    key: str
    kind: str  # "tensor" or "object"
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    requires_grad: bool = False

    @property
    def nbytes(self) -> int:
        if self.kind != "tensor":
            return 0
        n = torch.empty((), dtype=self.dtype).element_size()
        for s in self.shape:
            n *= s
        return n


class Source:
    """What the tools read from: keys, tensor rows, objects. Subclasses per format."""

    path: str = ""
    entries: dict[str, Entry]
    planner_data: dict[str, tuple] | None = None
    user_metadata: dict[str, Any] = {}
    codec: dict[str, Any] | None = None

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (the whole tensor when start is None)."""
        raise NotImplementedError

    def read_object(self, key: str) -> Any:
        raise NotImplementedError

    def object_bytes(self, key: str) -> bytes:
        """The object as torch.save bytes (sources that store such bytes return them as is)."""
        buf = io.BytesIO()
        torch.save(self.read_object(key), buf)
        return buf.getvalue()

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ShardSource(Source):
    """A committed shardckpt checkpoint; reads only the blocks covering each request."""

    def __init__(self, path: str, *, verify: bool = True) -> None:
        self.path = path
        self.reader = CheckpointReader(path, verify=verify)
        self.manifest = self.reader.manifest
        self.entries = {}
        for k, t in self.manifest.tensors.items():
            self.entries[k] = Entry(k, "tensor", dtype_from_name(t.dtype), tuple(t.shape),
                                    t.requires_grad)
        for k in self.manifest.objects:
            self.entries[k] = Entry(k, "object")
        self.planner_data = planner_data_from_json(self.manifest.planner_data) or None
        self.user_metadata = dict(self.manifest.user_metadata)
        self.codec = dict(self.manifest.codec)

    def close(self) -> None:
        self.reader.close()

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        shape = list(self.entries[key].shape)
        if start is None or not shape:
            return self.reader.read_region(key)
        return self.reader.read_region(key, [start] + [0] * (len(shape) - 1),
                                       [stop - start] + shape[1:])

    def read_object(self, key: str) -> Any:
        return self.reader.read_object(key)

    def object_bytes(self, key: str) -> bytes:
        # Copy the stored bytes verbatim (checksummed on read) instead of a
        # load/save round trip that could change their encoding.
        return self.reader.object_bytes(key)


def row_bytes(e: Entry) -> int:
    n = torch.empty((), dtype=e.dtype).element_size()
    for s in e.shape[1:]:
        n *= s
    return n


def iter_slabs(src: Source, e: Entry, start: int, stop: int,
               slab_bytes: int = DEFAULT_SLAB_BYTES) -> Iterator[torch.Tensor]:
    """Rows [start, stop) of a tensor in pieces of at most ~slab_bytes (at least one row)."""
    if not e.shape:
        yield src.read_rows(e.key)
        return
    step = max(1, slab_bytes // max(1, row_bytes(e)))
    for a in range(start, stop, step):
        yield src.read_rows(e.key, a, min(stop, a + step))


def detect(path: str) -> str:
    """'shardckpt', 'dcp', 'safetensors' or 'torch' for an existing path."""
    from ..io.storage import is_url

    if is_url(path):  # object stores hold shardckpt checkpoints only
        check_committed(path)
        return "shardckpt"
    if os.path.exists(path) and not (os.path.isdir(path) or os.path.isfile(path)):
        # torch.load on a FIFO would wait forever
        raise NotACheckpointError(f"{path}: not a file or directory (a FIFO or device); not a "
                                  f"checkpoint.")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST_NAME)):
            return "shardckpt"
        if os.path.isfile(os.path.join(path, ".metadata")):
            return "dcp"
        idx = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        if len(idx) == 1 or any(f.endswith(".safetensors") for f in os.listdir(path)):
            return "safetensors"
        check_committed(path)  # raises the right typed error (partial, not a checkpoint)
    if not os.path.exists(path):
        check_committed(path)  # CheckpointNotFoundError / IncompleteCheckpointError
    if path.endswith((".safetensors", ".safetensors.index.json")):
        return "safetensors"
    return "torch"


def open_source(path: str | os.PathLike, kind: str | None = None, *,
                trust_pickle: bool = False) -> Source:
    """Open any supported checkpoint for streaming reads.

    Nothing read runs code: stock DCP `.metadata` goes through the restricted
    unpickler unless `trust_pickle`; every object loads under weights_only rules.
    """
    from .external import DCPSource, SafetensorsSource, TorchSource, safetensors_entry

    path = os.fspath(path)
    kind = kind or detect(path)
    if kind == "shardckpt":
        return ShardSource(path)
    if kind == "dcp":
        return DCPSource(path, trust_pickle=trust_pickle)
    if kind == "safetensors":
        if os.path.isdir(path):
            return SafetensorsSource(safetensors_entry(path))
        return SafetensorsSource(path)
    if kind == "torch":
        return TorchSource(path, trust_pickle=trust_pickle)
    raise UnsupportedFormatError(f"unknown source format {kind!r}")
