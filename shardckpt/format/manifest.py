"""The manifest: a typed, validated description of everything a checkpoint stores.

`Manifest.from_json` checks every field before anything else sees it (types,
bounds, names inside the checkpoint, offsets inside their files, chunks that
tile their tensor exactly, lengths that agree), so readers never allocate or
seek on an unchecked number. The JSON form is specified in docs/FORMAT.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import CorruptCheckpointError, NotACheckpointError, UnsupportedFormatError
from . import dtypes
from .blocks import MAX_BLOCK_SIZE, MODE_GROUPED, Block, item_blocks, record_problem
from .names import FORMAT_NAME, is_data_file_name
from .versions import FORMAT_VERSION, migrate

_MAX_INT = 1 << 62  # no size, offset or shape in a real checkpoint comes near this
_MAX_DIMS = 64
CHECKSUM_FIELD = "checksum"


class ManifestError(CorruptCheckpointError):
    """A manifest field is malformed; the message names the field."""


def _bad(where: str, what: str) -> ManifestError:
    return ManifestError(f"manifest field {where}: {what}")


def _int(v: Any, where: str, lo: int = 0, hi: int = _MAX_INT) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _bad(where, f"expected an integer in [{lo}, {hi}], got {v!r:.60}")
    return v


def _str(v: Any, where: str) -> str:
    if not isinstance(v, str):
        raise _bad(where, f"expected a string, got {type(v).__name__}")
    return v


def _dict(v: Any, where: str) -> dict:
    if not isinstance(v, dict):
        raise _bad(where, f"expected an object, got {type(v).__name__}")
    return v


def _list(v: Any, where: str) -> list:
    if not isinstance(v, list):
        raise _bad(where, f"expected a list, got {type(v).__name__}")
    return v


@dataclass(frozen=True)
class FileEntry:
    rank: int
    size: int
    crc32: int

    def to_json(self) -> dict:
        return {"rank": self.rank, "size": self.size, "crc32": self.crc32}

    @classmethod
    def from_json(cls, d: Any, where: str) -> FileEntry:
        d = _dict(d, where)
        return cls(rank=_int(d.get("rank"), f"{where}.rank", 0, 1 << 24),
                   size=_int(d.get("size"), f"{where}.size"),
                   crc32=_int(d.get("crc32"), f"{where}.crc32", 0, 0xFFFFFFFF))


def check_block_record(rec: Any, where: str, group: int, block_size: int) -> list:
    """Validate one block record; returns it (a JSON list, as the codecs take it)."""
    if isinstance(rec, list) and len(rec) >= 5 and rec[3] == MODE_GROUPED:
        if group < 2:
            raise _bad(where, "byte planes in a dtype that is not byte-grouped")
        if isinstance(rec[4], str) and len(rec[4]) != group:
            raise _bad(f"{where}[4]", f"{len(rec[4])} byte planes for a dtype of {group}")
    problem = record_problem(rec)
    if problem is not None:
        raise _bad(where + problem[0], problem[1])
    if rec[1] > block_size:
        raise _bad(f"{where}[1]", f"{rec[1]} raw bytes in a block of at most {block_size}")
    return rec


@dataclass(frozen=True)
class StoredItem:
    """Where the bytes of one tensor chunk or one object lie: a run of blocks in a file."""

    file: str
    offset: int
    length: int
    nbytes: int
    blocks: tuple[list, ...]

    def block_list(self) -> list[Block]:
        return item_blocks(self.offset, self.blocks)

    def item_json(self) -> dict:
        return {"file": self.file, "offset": self.offset, "length": self.length,
                "nbytes": self.nbytes, "blocks": list(self.blocks)}

    @staticmethod
    def parse_item(d: dict, where: str, files: Mapping[str, FileEntry], group: int,
                   block_size: int) -> dict:
        rel = _str(d.get("file"), f"{where}.file")
        if rel not in files:
            raise _bad(f"{where}.file", f"{rel!r:.80} is not one of the manifest's files")
        offset = _int(d.get("offset"), f"{where}.offset")
        length = _int(d.get("length"), f"{where}.length")
        nbytes = _int(d.get("nbytes"), f"{where}.nbytes")
        if offset + length > files[rel].size:
            raise _bad(where, f"bytes [{offset}, {offset + length}) lie outside {rel} "
                              f"({files[rel].size} bytes)")
        recs = _list(d.get("blocks"), f"{where}.blocks")
        stored = raw = 0
        for i, rec in enumerate(recs):
            check_block_record(rec, f"{where}.blocks[{i}]", group, block_size)
            stored += rec[0]
            raw += rec[1]
        if stored != length or raw != nbytes:
            raise _bad(where, f"blocks hold {stored} stored / {raw} raw bytes, the item says "
                              f"{length} / {nbytes}")
        return {"file": rel, "offset": offset, "length": length, "nbytes": nbytes,
                "blocks": tuple(recs)}


@dataclass(frozen=True)
class Chunk(StoredItem):
    offsets: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes), **self.item_json()}


@dataclass(frozen=True)
class ObjectEntry(StoredItem):
    def to_json(self) -> dict:
        return self.item_json()


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    requires_grad: bool
    chunks: tuple[Chunk, ...]

    @property
    def itemsize(self) -> int:
        return dtypes.itemsize(self.dtype)

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape),
                "requires_grad": self.requires_grad, "chunks": [c.to_json() for c in self.chunks]}

    @classmethod
    def from_json(cls, d: Any, where: str, files: Mapping[str, FileEntry],
                  block_size: int) -> TensorEntry:
        d = _dict(d, where)
        dt = d.get("dtype")
        if not dtypes.is_dtype_name(dt):
            raise _bad(f"{where}.dtype", f"unknown dtype {dt!r:.40}")
        shape = _dims(d.get("shape"), f"{where}.shape")
        rg = d.get("requires_grad", False)
        if not isinstance(rg, bool):
            raise _bad(f"{where}.requires_grad", "expected true or false")
        esize = dtypes.itemsize(dt)
        group = dtypes.group_size(dtypes.dtype_from_name(dt))
        chunks = []
        for i, c in enumerate(_list(d.get("chunks"), f"{where}.chunks")):
            cw = f"{where}.chunks[{i}]"
            c = _dict(c, cw)
            offs = _dims(c.get("offsets"), f"{cw}.offsets")
            sizes = _dims(c.get("sizes"), f"{cw}.sizes")
            if len(offs) != len(shape) or len(sizes) != len(shape):
                raise _bad(cw, f"offsets/sizes of rank {len(offs)}/{len(sizes)} for a tensor of "
                               f"shape {list(shape)}")
            if any(o + s > n for o, s, n in zip(offs, sizes, shape)):
                raise _bad(cw, f"box at {list(offs)} of {list(sizes)} exceeds shape {list(shape)}")
            item = StoredItem.parse_item(c, cw, files, group, block_size)
            if item["nbytes"] != math.prod(sizes) * esize:
                raise _bad(cw, f"{item['nbytes']} raw bytes for {list(sizes)} x {esize} bytes")
            chunks.append(Chunk(offsets=offs, sizes=sizes, **item))
        _check_tiling(shape, chunks, where)
        return cls(dtype=dt, shape=shape, requires_grad=rg, chunks=tuple(chunks))


def _dims(v: Any, where: str) -> tuple[int, ...]:
    v = _list(v, where)
    if len(v) > _MAX_DIMS:
        raise _bad(where, f"{len(v)} dimensions")
    out = tuple(_int(x, f"{where}[{i}]") for i, x in enumerate(v))
    if math.prod(out) > _MAX_INT:
        raise _bad(where, f"{list(out)} has too many elements")
    return out


def _check_tiling(shape: tuple[int, ...], chunks: list[Chunk], where: str) -> None:
    """The chunks cover every element of the tensor exactly once."""
    total = math.prod(shape)
    if not chunks:
        if total:
            raise _bad(where, "a non-empty tensor has no chunks")
        return
    if sum(math.prod(c.sizes) for c in chunks) != total:
        raise _bad(where, f"chunks hold {sum(math.prod(c.sizes) for c in chunks)} elements, "
                          f"the tensor {total}: chunks missing or overlapping")
    if not shape or len(chunks) == 1:
        return
    # Equal volume plus no overlap is exact tiling. Sweep along dim 0 so that the
    # usual row-sharded layouts compare each chunk with its neighbours only.
    live = sorted((c for c in chunks if math.prod(c.sizes)), key=lambda c: c.offsets[0])
    active: list[Chunk] = []
    for c in live:
        active = [a for a in active if a.offsets[0] + a.sizes[0] > c.offsets[0]]
        for a in active:
            if all(ao < co + cs and co < ao + as_ for ao, as_, co, cs
                   in zip(a.offsets, a.sizes, c.offsets, c.sizes)):
                raise _bad(where, f"chunks at {list(a.offsets)} and {list(c.offsets)} overlap")
        active.append(c)


def _check_disjoint(tensors: Mapping[str, TensorEntry], objects: Mapping[str, ObjectEntry],
                    ) -> None:
    """No two items share stored bytes: a writer appends items back to back, so an
    offset that moved (damage the block checksums alone would catch only when
    verifying) lands on a neighbour and is refused here."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for k, t in tensors.items():
        for i, c in enumerate(t.chunks):
            if c.length:
                spans.setdefault(c.file, []).append((c.offset, c.length,
                                                     f"tensors[{k!r:.80}].chunks[{i}]"))
    for k, o in objects.items():
        if o.length:
            spans.setdefault(o.file, []).append((o.offset, o.length, f"objects[{k!r:.80}]"))
    for rel, items in spans.items():
        items.sort()
        for (a_off, a_len, a_where), (b_off, _, b_where) in zip(items, items[1:]):
            if b_off < a_off + a_len:
                raise _bad(b_where, f"bytes at {b_off} of {rel} overlap those of {a_where} "
                                    f"[{a_off}, {a_off + a_len})")


@dataclass(frozen=True)
class Manifest:
    world_size: int
    files: dict[str, FileEntry]
    tensors: dict[str, TensorEntry]
    objects: dict[str, ObjectEntry]
    codec: dict[str, Any]
    planner_data: dict[str, list] | None = None
    user_metadata: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    created_unix: float = 0.0
    format_version: int = FORMAT_VERSION

    @classmethod
    def new(cls, **kw: Any) -> Manifest:
        now = time.time()
        return cls(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
                   created_unix=now, **kw)

    def keys(self) -> list[str]:
        return [*self.tensors, *self.objects]

    def file_rank(self, rel: str) -> int | None:
        f = self.files.get(rel)
        return None if f is None else f.rank

    def renamed(self, key_map: Any) -> Manifest:
        """The same manifest with every key mapped (checkpoint key -> state key)."""
        from .keys import map_keys

        tensors = map_keys(self.tensors, key_map)
        objects = map_keys(self.objects, key_map)
        if set(tensors) & set(objects):
            raise ValueError(f"key mapping sends a tensor and an object to "
                             f"{sorted(set(tensors) & set(objects))[0]!r}; adjust strip_prefix/rename")
        pd = None if self.planner_data is None else {key_map(k): v for k, v in
                                                     self.planner_data.items()}
        return replace(self, tensors=tensors, objects=objects, planner_data=pd)

    # ---------------------------------------------------------------- JSON

    def to_json(self) -> dict:
        return {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "created": self.created, "created_unix": self.created_unix,
            "world_size": self.world_size, "versions": self.versions, "codec": self.codec,
            "files": {k: v.to_json() for k, v in self.files.items()},
            "tensors": {k: v.to_json() for k, v in self.tensors.items()},
            "objects": {k: v.to_json() for k, v in self.objects.items()},
            "planner_data": self.planner_data, "user_metadata": self.user_metadata,
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON with a checksum of everything else (format version >= 2)."""
        d = self.to_json()
        d[CHECKSUM_FIELD] = content_checksum(d)
        return json.dumps(d, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, d: Any, *, path: str = "manifest.json") -> Manifest:
        try:
            return cls._from_json(d)
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}; the checkpoint is damaged, load an earlier "
                                f"one (`shardckpt verify` shows all problems).", path=path) from None

    @classmethod
    def _from_json(cls, d: Any) -> Manifest:
        d = _dict(d, "(top level)")
        codec = _dict(d.get("codec"), "codec")
        if codec.get("compression") not in ("zstd", "none"):
            raise _bad("codec.compression", f"unknown compression {codec.get('compression')!r:.40}")
        block_size = _int(codec.get("block_size"), "codec.block_size", 16, MAX_BLOCK_SIZE)
        if block_size % 16:
            raise _bad("codec.block_size", f"{block_size} is not a multiple of 16")
        world = _int(d.get("world_size"), "world_size", 1, 1 << 24)
        files = {}
        for rel, fe in _dict(d.get("files"), "files").items():
            if not is_data_file_name(rel):
                raise _bad("files", f"{rel!r:.80} is not a data file name inside the checkpoint")
            files[rel] = FileEntry.from_json(fe, f"files[{rel!r}]")
        tensors = {_str(k, "tensors"): TensorEntry.from_json(v, f"tensors[{k!r:.80}]", files,
                                                             block_size)
                   for k, v in _dict(d.get("tensors"), "tensors").items()}
        objects = {}
        for k, v in _dict(d.get("objects"), "objects").items():
            w = f"objects[{k!r:.80}]"
            objects[k] = ObjectEntry(**StoredItem.parse_item(_dict(v, w), w, files, 1, block_size))
        if set(tensors) & set(objects):
            raise _bad("objects", f"{sorted(set(tensors) & set(objects))[0]!r:.80} is also a tensor")
        _check_disjoint(tensors, objects)
        pd = d.get("planner_data")
        if pd is not None:
            for k, v in _dict(pd, "planner_data").items():
                if not isinstance(v, list) or not all(type(p) in (str, int) for p in v):
                    raise _bad(f"planner_data[{k!r:.80}]", "expected a list of keys and indices")
        um = d.get("user_metadata", {})
        created_unix = d.get("created_unix", 0.0)
        if type(created_unix) not in (int, float) or not math.isfinite(created_unix):
            raise _bad("created_unix", "expected a finite number")
        return cls(world_size=world, files=files, tensors=tensors, objects=objects, codec=codec,
                   planner_data=pd, user_metadata=_dict(um, "user_metadata"),
                   versions=_dict(d.get("versions", {}), "versions"),
                   created=_str(d.get("created", ""), "created"), created_unix=float(created_unix),
                   format_version=d["format_version"])


def content_checksum(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def parse_manifest(data: bytes, path: str) -> Manifest:
    """Bytes of manifest.json -> a validated Manifest, or a typed error naming `path`."""
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{path}: manifest is not valid JSON ({str(e)[:120]}); the checkpoint is damaged, "
            f"load an earlier one.", path=path) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise NotACheckpointError(f"{path}: not a shardckpt manifest.")
    version = d.get("format_version")
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(f"{path}: format_version {version!r:.40} is not a version; "
                                     f"the checkpoint is damaged.", path=path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path}: format version {version} is newer than this shardckpt "
            f"(reads up to {FORMAT_VERSION}); upgrade shardckpt.")
    expected = _safe_checksum(d) if version >= 2 else None
    if version >= 2 and (expected is None or d.get(CHECKSUM_FIELD) != expected):
        raise CorruptCheckpointError(
            f"{path}: manifest checksum mismatch (the file was altered or damaged after it was "
            f"written); load an earlier checkpoint.", path=path)
    return Manifest.from_json(migrate(d), path=path)


def _safe_checksum(d: dict) -> str | None:
    try:
        return content_checksum(d)
    except (ValueError, TypeError, RecursionError):
        return None
