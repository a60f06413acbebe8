"""Convert between shardckpt, stock DCP directories, torch.save files and safetensors.

Every source is read tensor by tensor (row slabs where the format allows), and
every target but `torch` is written as it is read, so a checkpoint larger than
RAM converts. `torch` (one torch.save file) must hold the whole state in memory:
that is how torch.save works.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from . import format as fmt
from .api import _quiet_no_dist
from .errors import NotACheckpointError, UnsupportedFormatError
from .reshard import (
    DEFAULT_SLAB_BYTES,
    Entry,
    Progress,
    ShardSource,
    Source,
    iter_slabs,
    renamed_entries,
    tensor_bytes,
    write_checkpoint,
)
from .safetensors_io import SafetensorsFile, write_safetensors

TARGETS = ("shardckpt", "dcp", "torch", "safetensors")
# safetensors metadata keys under which non-tensor values and nesting travel.
_ST_OBJECTS = "shardckpt.objects"
_ST_PLANNER = "shardckpt.planner_data"
_ST_USER = "shardckpt.user_metadata"
# Tensors above this are exported to DCP as several row chunks, so that neither
# the writer nor a later loader needs one huge buffer.
DCP_CHUNK_BYTES = 16 << 20


# ---------------------------------------------------------------- sources


class TorchSource(Source):
    """A torch.save file, memory-mapped and loaded under weights_only rules."""

    def __init__(self, path: str) -> None:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        self.path = path
        try:
            obj = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
        except Exception as e:
            raise NotACheckpointError(
                f"{path}: cannot be read as a torch.save file under weights_only rules ({e}). "
                f"Only plain tensors / containers are accepted.") from None
        if not isinstance(obj, dict):
            obj = {"value": obj}
        self.flat, mappings = flatten_state_dict(obj)
        self.planner_data = dict(mappings)
        self.entries = {k: (Entry(k, "tensor", v.dtype, tuple(v.shape))
                            if isinstance(v, torch.Tensor) else Entry(k, "object"))
                        for k, v in self.flat.items()}
        self.user_metadata = {}

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        t = self.flat[key]
        return t if start is None or t.dim() == 0 else t[start:stop]

    def read_object(self, key: str) -> Any:
        return self.flat[key]


class SafetensorsSource(Source):
    """One .safetensors file, or a sharded set described by a *.index.json."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, SafetensorsFile] = {}
        if path.endswith(".json"):
            with open(path, "rb") as f:
                index = json.loads(f.read())
            base = os.path.dirname(path)
            for name in sorted(set(index["weight_map"].values())):
                self.files[name] = SafetensorsFile(os.path.join(base, name))
        else:
            self.files[os.path.basename(path)] = SafetensorsFile(path)
        self.entries = {}
        meta: dict[str, str] = {}
        for sf in self.files.values():
            meta.update(sf.metadata)
            for name, e in sf.entries.items():
                self.entries[name] = Entry(name, "tensor", e.dtype, e.shape)
                self.where[name] = sf
        self.objects: dict[str, Any] = json.loads(meta.get(_ST_OBJECTS, "{}"))
        for k in self.objects:
            self.entries[k] = Entry(k, "object")
        pd = json.loads(meta.get(_ST_PLANNER, "null"))
        self.planner_data = fmt.decode_planner_data(pd) if pd else None
        self.user_metadata = json.loads(meta.get(_ST_USER, "{}"))

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        return self.where[key].read(key, start, stop)

    def read_object(self, key: str) -> Any:
        return self.objects[key]


class DCPSource(Source):
    """A stock DCP directory (FileSystemWriter layout with `.metadata`).

    DCP reads whole chunks, so a tensor is loaded at once (and kept until the next
    tensor is asked for); no process group is needed.
    """

    def __init__(self, path: str) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self._reader_cls = FileSystemReader
        md = FileSystemReader(path).read_metadata()
        self.entries = {}
        for k, m in md.state_dict_metadata.items():
            if isinstance(m, TensorStorageMetadata):
                self.entries[k] = Entry(k, "tensor", m.properties.dtype, tuple(m.size),
                                        bool(m.properties.requires_grad))
            else:
                self.entries[k] = Entry(k, "object")
        pd = md.planner_data
        self.planner_data = dict(pd) if isinstance(pd, dict) else None
        self.user_metadata = {}
        self._cache: tuple[str, Any] | None = None

    def _load(self, key: str, placeholder: Any) -> Any:
        import torch.distributed.checkpoint as dcp

        from .planner import SafeLoadPlanner

        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # drop the previous tensor before reading the next
        state = {key: placeholder}
        with _quiet_no_dist():
            dcp.load(state, storage_reader=self._reader_cls(self.path),
                     planner=SafeLoadPlanner(strict=False, path=self.path))
        self._cache = (key, state[key])
        return state[key]

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        e = self.entries[key]
        t = self._load(key, torch.empty(e.shape, dtype=e.dtype))
        return t if start is None or t.dim() == 0 else t[start:stop]

    def read_object(self, key: str) -> Any:
        return self._load(key, 0)


def detect(path: str) -> str:
    """'shardckpt', 'dcp', 'safetensors' or 'torch' for an existing path."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, fmt.MANIFEST_NAME)):
            return "shardckpt"
        if os.path.isfile(os.path.join(path, ".metadata")):
            return "dcp"
        idx = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        if len(idx) == 1 or any(f.endswith(".safetensors") for f in os.listdir(path)):
            return "safetensors"
        fmt.read_manifest(path)  # raises the right typed error (partial, not a checkpoint)
    if not os.path.exists(path):
        fmt.read_manifest(path)  # CheckpointNotFoundError / IncompleteCheckpointError
    if path.endswith((".safetensors", ".safetensors.index.json")):
        return "safetensors"
    return "torch"


def open_source(path: str | os.PathLike, kind: str | None = None) -> Source:
    """Open any supported checkpoint for streaming reads."""
    path = os.fspath(path)
    kind = kind or detect(path)
    if kind == "shardckpt":
        return ShardSource(path)
    if kind == "dcp":
        return DCPSource(path)
    if kind == "safetensors":
        if os.path.isdir(path):
            names = os.listdir(path)
            idx = [f for f in names if f.endswith(".safetensors.index.json")]
            if idx:
                return SafetensorsSource(os.path.join(path, idx[0]))
            files = [f for f in names if f.endswith(".safetensors")]
            if len(files) != 1:
                raise NotACheckpointError(f"{path}: {len(files)} .safetensors files and no "
                                          f"index json; pass the file or the index.")
            return SafetensorsSource(os.path.join(path, files[0]))
        return SafetensorsSource(path)
    if kind == "torch":
        return TorchSource(path)
    raise UnsupportedFormatError(f"unknown source format {kind!r}")


# ---------------------------------------------------------------- key remapping


def make_key_map(strip_prefix: Sequence[str] = (),
                 rename: Sequence[str] = ()) -> Callable[[str], str] | None:
    """A key function from --strip-prefix P (repeatable) and --rename REGEX=REPL (repeatable)."""
    if not strip_prefix and not rename:
        return None
    subs = []
    for r in rename:
        if "=" not in r:
            raise ValueError(f"--rename {r!r}: expected REGEX=REPLACEMENT")
        pat, repl = r.split("=", 1)
        try:
            subs.append((re.compile(pat), repl))
        except re.error as e:
            raise ValueError(f"--rename {r!r}: bad regular expression ({e})") from None

    def fn(key: str) -> str:
        for p in strip_prefix:
            # Anywhere in the key: `module.` often sits under `model.`.
            key = key.replace(p, "", 1) if key.startswith(p) else key.replace("." + p, ".", 1)
        for pat, repl in subs:
            key = pat.sub(repl, key)
        return key

    return fn


def _mapping(src: Source, key_map: Callable[[str], str] | None, old: str, new: str) -> tuple:
    if key_map is None and src.planner_data and old in src.planner_data:
        return tuple(src.planner_data[old])
    return (new,)


# ---------------------------------------------------------------- targets


def _to_torch(src: Source, dst: str, key_map: Callable[[str], str] | None,
              on_progress: Progress) -> None:
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict

    flat: dict[str, Any] = {}
    mappings: dict[str, tuple] = {}
    for nk, e in renamed_entries(src, key_map):
        if e.kind == "tensor":
            t = src.read_rows(e.key).clone()
            flat[nk] = t
            if on_progress:
                on_progress(t.numel() * t.element_size())
        else:
            flat[nk] = src.read_object(e.key)
        mappings[nk] = _mapping(src, key_map, e.key, nk)
    state = unflatten_state_dict(flat, mappings)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_safetensors(src: Source, dst: str, key_map: Callable[[str], str] | None,
                    slab_bytes: int, on_progress: Progress) -> list[str]:
    """Returns the keys of objects that could not be stored (not JSON values)."""
    specs, objects, skipped = [], {}, []
    by_new: dict[str, Entry] = {}
    planner: dict[str, list] = {}
    for nk, e in renamed_entries(src, key_map):
        planner[nk] = list(_mapping(src, key_map, e.key, nk))
        if e.kind == "tensor":
            specs.append((nk, e.dtype, e.shape))
            by_new[nk] = e
            continue
        value = src.read_object(e.key)
        try:
            json.dumps(value)
            objects[nk] = value
        except TypeError:
            skipped.append(nk)
    metadata = {"format": "pt", _ST_OBJECTS: json.dumps(objects),
                _ST_PLANNER: json.dumps(planner),
                _ST_USER: json.dumps(src.user_metadata or {}, default=str)}

    def produce(name: str) -> Iterator[memoryview]:
        e = by_new[name]
        stop = e.shape[0] if e.shape else None
        for slab in iter_slabs(src, e, 0, stop or 0, slab_bytes):
            if on_progress:
                on_progress(slab.numel() * slab.element_size())
            yield tensor_bytes(slab)

    write_safetensors(dst, specs, produce, metadata)
    return skipped


def _to_dcp(src: Source, dst: str, key_map: Callable[[str], str] | None,
            on_progress: Progress, chunk_bytes: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )
    from torch.distributed.checkpoint.planner_helpers import _create_write_items

    flat: dict[str, Any] = {}
    mappings: dict[str, tuple] = {}
    entries: dict[str, Entry] = {}
    for nk, e in renamed_entries(src, key_map):
        entries[nk] = e
        # Tensors are meta placeholders: only shapes and dtypes until DCP asks.
        flat[nk] = (torch.empty(e.shape, dtype=e.dtype, device="meta") if e.kind == "tensor"
                    else src.read_object(e.key))
        mappings[nk] = _mapping(src, key_map, e.key, nk)

    class StreamingSavePlanner(DefaultSavePlanner):
        def create_local_plan(self) -> SavePlan:
            items: list[WriteItem] = []
            for fqn, obj in self.state_dict.items():
                e = entries[fqn]
                if e.kind != "tensor":
                    items += _create_write_items(fqn, obj)
                    continue
                props = TensorProperties(dtype=e.dtype, requires_grad=e.requires_grad)
                n = e.shape[0] if e.shape else 0
                rb = max(1, e.nbytes // max(1, n)) if e.shape else e.nbytes
                step = max(1, chunk_bytes // rb) if e.shape else 1
                starts = range(0, n, step) if e.shape and n > 0 else [0]
                for a in starts:
                    sizes = list(e.shape)
                    offsets = [0] * len(sizes)
                    if e.shape and n > 0:
                        offsets[0], sizes[0] = a, min(n, a + step) - a
                    items.append(WriteItem(
                        index=MetadataIndex(fqn, torch.Size(offsets)),
                        type=WriteItemType.SHARD if len(starts) > 1 else WriteItemType.TENSOR,
                        tensor_data=TensorWriteData(
                            chunk=ChunkStorageMetadata(offsets=torch.Size(offsets),
                                                       sizes=torch.Size(sizes)),
                            properties=props, size=torch.Size(e.shape))))
            plan = SavePlan(items, planner_data=self.mappings)
            self.plan = plan
            return plan

        def resolve_data(self, write_item: WriteItem) -> Any:
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            fqn = write_item.index.fqn
            e = entries[fqn]
            ch = write_item.tensor_data.chunk
            if e.shape and e.shape[0] > 0:
                a = ch.offsets[0]
                t = src.read_rows(e.key, a, a + ch.sizes[0])
            else:
                t = src.read_rows(e.key)
            if on_progress:
                on_progress(t.numel() * t.element_size())
            return t

    parent, name = os.path.split(os.path.abspath(dst))
    tmp = os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}")
    try:
        # One file per write item: FileSystemWriter keeps every tensor of a file
        # referenced until the file closes, which would defeat streaming.
        writer = FileSystemWriter(tmp, single_file_per_rank=False, thread_count=1,
                                  sync_files=True)
        with _quiet_no_dist():
            dcp.save(unflatten_state_dict(flat, mappings), storage_writer=writer,
                     planner=StreamingSavePlanner())
        if os.path.exists(dst):
            _swap(tmp, dst)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(new: str, old: str) -> None:
    parent, name = os.path.split(os.path.abspath(old))
    trash = os.path.join(parent, f".{name}.old-{uuid.uuid4().hex[:12]}")
    os.rename(old, trash)
    os.rename(new, old)
    shutil.rmtree(trash, ignore_errors=True)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, strip_prefix: Sequence[str] = (),
            rename: Sequence[str] = (), world_size: int = 1, compression: str | None = None,
            overwrite: bool = False, slab_bytes: int = DEFAULT_SLAB_BYTES,
            dcp_chunk_bytes: int = DCP_CHUNK_BYTES,
            on_progress: Progress = None) -> dict[str, Any]:
    """Convert `src` (any supported format, detected) to `dst` in format `to`.

    Returns a summary: {"source_format", "to", "tensors", "objects", "bytes", "skipped"}.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert needs a destination different from the source")
    if to != "shardckpt" and os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite or choose another path")
    key_map = make_key_map(strip_prefix, rename)
    kind = source_format or detect(src)
    skipped: list[str] = []
    with open_source(src, kind) as s:
        if to == "shardckpt":
            write_checkpoint(s, dst, world_size=world_size, compression=compression,
                             key_map=key_map, slab_bytes=slab_bytes, overwrite=overwrite,
                             on_progress=on_progress)
        elif to == "torch":
            _to_torch(s, dst, key_map, on_progress)
        elif to == "safetensors":
            skipped = _to_safetensors(s, dst, key_map, slab_bytes, on_progress)
        else:
            _to_dcp(s, dst, key_map, on_progress, dcp_chunk_bytes)
        ents = list(s.entries.values())
        return {"source_format": kind, "to": to,
                "tensors": sum(e.kind == "tensor" for e in ents),
                "objects": sum(e.kind == "object" for e in ents),
                "bytes": sum(e.nbytes for e in ents), "skipped": skipped}
