"""Stock DCP checkpoints read safely: `.metadata` through the restricted unpickler.

`read_dcp_metadata` unpickles it with `RestrictedUnpickler` (unpickler.py), then
checks the loaded object: a `Metadata` whose `state_dict_metadata` has the
shape DCP writes, storage entries that stay inside the checkpoint directory (no
absolute path, no `..`), and no container nesting deeper than `MAX_DEPTH` nor cycles
(so that `==` / `repr` on the result cannot raise RecursionError later).
"""

from __future__ import annotations

import enum
import os
import pathlib
import uuid
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint import FileSystemReader

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    ShardckptError,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

from .allowlist import (
    DCP_FS,
    MAX_DEPTH,
    METADATA_FILE,
    allow_list,
    is_int,
    short_repr,
    unsafe_error,
)
from .unpickler import RestrictedUnpickler

__all__ = ["read_dcp_metadata", "SafeFileSystemReader"]


# -- checks of the loaded object ----------------------------------------------------------

_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.layout,
           torch.memory_format, torch.Size, enum.Enum, pathlib.PurePath)


def _check_shape(root: Any, mdfile: str, path: str) -> None:
    """Bounded nesting, no cycles (iterative: cannot itself hit the recursion limit)."""
    allow = allow_list()
    on_path: set[int] = set()
    done: set[int] = set()
    exit_mark = object()
    todo: list[tuple[Any, int]] = [(root, 1)]  # (object, depth) or (exit_mark, id)
    while todo:
        obj, depth = todo.pop()
        if obj is exit_mark:
            on_path.discard(depth)
            done.add(depth)
            continue
        if isinstance(obj, _LEAVES) or isinstance(obj, type):
            continue
        oid = id(obj)
        if oid in done:
            continue
        if oid in on_path:
            raise CorruptCheckpointError(
                f"{mdfile}: the DCP metadata refers to itself (a cycle); stock DCP never "
                f"writes one. The file is damaged or was not written by DCP.", path=mdfile)
        if depth > MAX_DEPTH:
            raise CorruptCheckpointError(
                f"{mdfile}: the DCP metadata nests more than {MAX_DEPTH} levels deep; stock "
                f"DCP nests 6. The file is damaged or was not written by DCP.", path=mdfile)
        on_path.add(oid)
        todo.append((exit_mark, oid))
        if isinstance(obj, dict):
            children = [c for kv in obj.items() for c in kv]
        elif isinstance(obj, (list, tuple, set, frozenset)):
            children = list(obj)
        elif allow.newobj.get(id(type(obj))) is type(obj):
            children = list(vars(obj).values())
        else:  # cannot happen with the allow-list; be strict anyway
            raise CorruptCheckpointError(
                f"{mdfile}: unexpected {type(obj).__name__} in the DCP metadata.", path=mdfile)
        todo.extend((c, depth + 1) for c in children)


def _check_metadata(md: Any, mdfile: str, path: str, *, strict: bool) -> None:
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        TensorStorageMetadata,
    )

    def bad(what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{mdfile}: {what}; not the metadata of a stock DCP checkpoint (damaged or "
            f"written by something else).", path=mdfile)

    if not isinstance(md, Metadata):
        raise bad(f"holds a {type(md).__name__}, not a DCP Metadata")
    if not isinstance(md.state_dict_metadata, dict):
        raise bad("state_dict_metadata is not a dict")
    if not strict:
        return
    _check_shape(md, mdfile, path)
    for k, m in md.state_dict_metadata.items():
        if type(k) is not str:
            raise bad(f"state_dict_metadata has a non-string key {short_repr(k)}")
        if isinstance(m, TensorStorageMetadata):
            props = getattr(m, "properties", None)
            if not isinstance(getattr(props, "dtype", None), torch.dtype):
                raise bad(f"{k!r} has no tensor dtype")
            if type(getattr(m, "size", None)) is not torch.Size:
                raise bad(f"{k!r} has no tensor size")
            chunks = getattr(m, "chunks", None)
            if not isinstance(chunks, list) or not all(
                    isinstance(c, ChunkStorageMetadata)
                    and type(getattr(c, "offsets", None)) is torch.Size
                    and type(getattr(c, "sizes", None)) is torch.Size
                    and len(c.offsets) == len(c.sizes) == len(m.size) for c in chunks):
                raise bad(f"{k!r} has malformed chunks")
        elif not isinstance(m, BytesStorageMetadata):
            raise bad(f"{k!r} is a {type(m).__name__}, not tensor or bytes storage metadata")
    sd = md.storage_data
    for info in (sd.values() if isinstance(sd, dict) else ()):
        if not isinstance(info, _StorageInfo):
            continue
        rel = getattr(info, "relative_path", None)
        if (type(rel) is not str or not rel or "\x00" in rel or os.path.isabs(rel)
                or rel.startswith(("/", "\\")) or ":" in rel
                or ".." in rel.replace("\\", "/").split("/")):
            raise unsafe_error(mdfile, f"a {DCP_FS}._StorageInfo whose file {short_repr(rel)} lies "
                                  f"outside the checkpoint directory (stock DCP writes plain "
                                  f"file names)", f"{DCP_FS}._StorageInfo")
        for f in ("offset", "length"):
            v = getattr(info, f, None)
            if not is_int(v) or v < 0:
                raise bad(f"a storage entry of {rel!r} has {f}={short_repr(v)}")
        td = getattr(info, "transform_descriptors", None)
        if td is not None and not (type(td) in (list, tuple)
                                   and all(type(x) is str for x in td)):
            raise bad(f"a storage entry of {rel!r} has transform_descriptors={short_repr(td)}")


def read_dcp_metadata(path: str | os.PathLike, *, trust_pickle: bool = False) -> Metadata:
    """Read `<path>/.metadata` of a stock DCP checkpoint (FileSystemWriter layout).

    trust_pickle=False (default): restricted unpickling, only the objects stock DCP writes
    (see ALLOWED_GLOBALS); anything else raises UnsafeObjectError, before it is built.
    trust_pickle=True: torch's own `FileSystemReader(path).read_metadata()` (full
    unpickling: runs whatever the file says; only for trusted checkpoints).

    Returns what `FileSystemReader.read_metadata` returns (storage_meta filled in, with a
    fresh load_id). Raises CheckpointNotFoundError if `path` does not exist,
    NotACheckpointError if it is not a directory, CorruptCheckpointError (with .path) if
    `.metadata` is missing, unreadable, truncated, or not DCP metadata.
    """
    return _read(os.fspath(path), trust_pickle=trust_pickle, rank=None,
                 load_id=str(uuid.uuid4()))


def _read(path: str, *, trust_pickle: bool, rank: int | None, load_id: str) -> Metadata:
    name = METADATA_FILE if rank is None else f"__{int(rank)}{METADATA_FILE}"
    mdfile = os.path.join(path, name)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{path}: no such checkpoint directory.")
    if not os.path.isdir(path):
        raise NotACheckpointError(
            f"{path}: is a file; a stock DCP checkpoint is a directory with a {METADATA_FILE}.")
    try:
        with open(mdfile, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CorruptCheckpointError(
            f"{mdfile}: cannot read the DCP metadata ({type(e).__name__}: {e.strerror or e}). "
            f"A DCP checkpoint whose save finished has this file; re-save or restore it.",
            path=mdfile) from e
    if not data:
        raise CorruptCheckpointError(
            f"{mdfile}: the DCP metadata file is empty (the save did not finish, or the file "
            f"was truncated); re-save or restore it.", path=mdfile)
    try:
        if trust_pickle:
            from torch.distributed.checkpoint import FileSystemReader

            reader = FileSystemReader(path)
            md = reader.read_metadata() if rank is None else reader.read_metadata(rank=rank)
        else:
            md = RestrictedUnpickler(data, mdfile).load()
        _check_metadata(md, mdfile, path, strict=not trust_pickle)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = load_id  # as FileSystemReader.read_metadata does
    except ShardckptError:
        raise
    except Exception as e:  # pickle/EOF/Recursion/Type/...: the bytes are not DCP metadata
        raise CorruptCheckpointError(
            f"{mdfile}: cannot read the DCP metadata ({type(e).__name__}: {short_repr(str(e))}); "
            f"the file is truncated or damaged, or was not written by DCP.",
            path=mdfile) from e
    return md


class SafeFileSystemReader(FileSystemReader):
    """torch's FileSystemReader, with `read_metadata` done by `read_dcp_metadata`.

    `dcp.load(state, storage_reader=FileSystemReader(path))` calls
    `read_metadata()` itself, i.e. plain `pickle.load` again, and on *any* error
    retries with `read_metadata(rank=...)` after only logging it. Pass this reader
    instead; give it the Metadata read beforehand (`metadata=`) so that a refusal
    surfaces as UnsafeObjectError where it was read, not as a DCP load failure.
    Tensor items are then read by torch with `torch.load(weights_only=True)`;
    non-tensor (BYTE_IO) items go to `planner.load_bytes`, which in torch's
    DefaultLoadPlanner is `torch.load(weights_only=False)`: use a planner whose
    load_bytes loads under weights_only rules (shardckpt's SafeLoadPlanner).
    """

    def __init__(self, path: str | os.PathLike, *, metadata: Metadata | None = None,
                 trust_pickle: bool = False, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._dir = os.fspath(path)
        self._metadata = metadata
        self._trust_pickle = trust_pickle

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if self._metadata is not None and rank is None:
            md = self._metadata
            if getattr(md, "storage_meta", None) is not None:
                md.storage_meta.load_id = self.load_id
            return md
        return _read(self._dir, trust_pickle=self._trust_pickle, rank=rank,
                     load_id=self.load_id)

