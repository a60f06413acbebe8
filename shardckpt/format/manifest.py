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

from . import dtypes
from .blocks import MAX_BLOCK_SIZE, Block, item_blocks
from .checks import (
    _MAX_INT,
    ManifestError,
    _bad,
    _check_disjoint,
    _check_tiling,
    _dict,
    _int,
    _list,
    _str,
    check_block_record,
)
from .names import FORMAT_NAME, is_data_file_name
from .refs import (
    Ref,
    RefProblem,
    blocks_with_refs,
    is_base_name,
    own_stored,
    parse_hashes,
    parse_refs,
)
from .texts import entry_text as _entry_text
from .texts import key_text as _key
from .texts import planner_text as _planner_text
from .versions import FORMAT_VERSION

_MAX_DIMS = 64
CHECKSUM_FIELD = "checksum"


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


@dataclass(frozen=True)
class StoredItem:
    """Where the bytes of one tensor chunk or one object lie: a run of blocks in a file.

    `hashes`: XXH3-128 of each block's raw bytes (hex). `refs`: runs of blocks that
    a base checkpoint holds (format/refs.py); the other blocks lie back to back in
    `file` from `offset`, and `length` counts only those.
    """

    file: str
    offset: int
    length: int
    nbytes: int
    blocks: tuple[list, ...]
    hashes: tuple[str, ...] = ()
    refs: tuple[Ref, ...] = ()

    def block_list(self) -> list[Block]:
        if self.refs:
            return blocks_with_refs(self.offset, self.blocks, self.refs)
        return item_blocks(self.offset, self.blocks)

    def stored_fields(self) -> dict:
        """The StoredItem fields, to build a Chunk / ObjectEntry of the same bytes."""
        return {"file": self.file, "offset": self.offset, "length": self.length,
                "nbytes": self.nbytes, "blocks": self.blocks, "hashes": self.hashes,
                "refs": self.refs}

    def item_json(self) -> dict:
        d = {"file": self.file, "offset": self.offset, "length": self.length,
             "nbytes": self.nbytes, "blocks": list(self.blocks)}
        if self.hashes:
            d["hashes"] = list(self.hashes)
        if self.refs:
            d["refs"] = [r.to_json() for r in self.refs]
        return d

    @staticmethod
    def parse_item(d: dict, where: str, files: Mapping[str, FileEntry], group: int,
                   block_size: int, bases: Mapping[str, Mapping[str, FileEntry]] | None = None,
                   ) -> dict:
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
        raw = 0
        for i, rec in enumerate(recs):
            check_block_record(rec, f"{where}.blocks[{i}]", group, block_size)
            raw += rec[1]
        try:
            hashes = parse_hashes(d["hashes"], len(recs)) if "hashes" in d else ()
            refs = parse_refs(d["refs"], recs, bases or {}, _MAX_INT) if "refs" in d else ()
        except RefProblem as e:
            raise _bad(where + e.where, e.what) from None
        stored = own_stored(recs, refs)
        if stored != length or raw != nbytes:
            raise _bad(where, f"blocks hold {stored} stored / {raw} raw bytes, the item says "
                              f"{length} / {nbytes}")
        return {"file": rel, "offset": offset, "length": length, "nbytes": nbytes,
                "blocks": tuple(recs), "hashes": hashes, "refs": refs}


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
                  block_size: int, bases: Mapping[str, Mapping[str, FileEntry]] | None = None,
                  ) -> TensorEntry:
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
            item = StoredItem.parse_item(c, cw, files, group, block_size, bases)
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
    # Sibling checkpoints (../NAME) holding referenced blocks -> their files (format/refs.py)
    bases: dict[str, dict[str, FileEntry]] = field(default_factory=dict)

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
        d = self._json_shell()
        d["tensors"] = {k: v.to_json() for k, v in self.tensors.items()}
        return d

    def to_bytes(self) -> bytes:
        """JSON of to_json() with a checksum of the canonical JSON of everything else
        (format version >= 2).

        Assembled from each tensor's canonical text, which is kept from one save to the
        next while the entry stays equal (an incremental save's unchanged tensors: most
        of them). The file lists the tensors in the state's order; within an entry the
        fields are in canonical (sorted) order."""
        d = self._json_shell()
        tensors = [(k, _entry_text(k, t)) for k, t in self.tensors.items()]

        def dump(sort: bool) -> str:
            parts = []
            for k, v in (sorted(d.items()) if sort else d.items()):
                if k == "tensors":
                    rows = sorted(tensors) if sort else tensors
                    text = "{" + ",".join(f"{_key(n)}:{t}" for n, t in rows) + "}"
                elif k == "planner_data" and v:
                    text = _planner_text(v, sort)
                else:
                    text = json.dumps(v, sort_keys=sort, separators=(",", ":"),
                                      allow_nan=False)
                parts.append(f"{_key(k)}:{text}")
            return "{" + ",".join(parts) + "}"

        checksum = "sha256:" + hashlib.sha256(dump(True).encode()).hexdigest()
        d[CHECKSUM_FIELD] = checksum
        return dump(False).encode()

    def _json_shell(self) -> dict:
        """to_json() with `tensors` left empty, in its place."""
        return {
            "format": FORMAT_NAME, "format_version": self.format_version,
            "created": self.created, "created_unix": self.created_unix,
            "world_size": self.world_size, "versions": self.versions, "codec": self.codec,
            "files": {k: v.to_json() for k, v in self.files.items()},
            "tensors": {},
            "objects": {k: v.to_json() for k, v in self.objects.items()},
            "planner_data": self.planner_data, "user_metadata": self.user_metadata,
            "bases": {b: {"files": {k: v.to_json() for k, v in fs.items()}}
                      for b, fs in self.bases.items()},
        }

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
        bases = _parse_bases(d.get("bases", {}))
        tensors = {_str(k, "tensors"): TensorEntry.from_json(v, f"tensors[{k!r:.80}]", files,
                                                             block_size, bases)
                   for k, v in _dict(d.get("tensors"), "tensors").items()}
        objects = {}
        for k, v in _dict(d.get("objects"), "objects").items():
            w = f"objects[{k!r:.80}]"
            objects[k] = ObjectEntry(**StoredItem.parse_item(_dict(v, w), w, files, 1, block_size,
                                                             bases))
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
                   format_version=d["format_version"], bases=bases)


def _parse_bases(v: Any) -> dict[str, dict[str, FileEntry]]:
    out: dict[str, dict[str, FileEntry]] = {}
    for ref, b in _dict(v, "bases").items():
        w = f"bases[{ref!r:.80}]"
        if not is_base_name(ref):
            raise _bad(w, "a base is a sibling checkpoint, ../NAME with NAME one visible path "
                          "component: a reference never resolves outside the directory of its "
                          "checkpoint")
        files = {}
        for rel, fe in _dict(_dict(b, w).get("files"), f"{w}.files").items():
            if not is_data_file_name(rel):
                raise _bad(f"{w}.files", f"{rel!r:.80} is not a data file name")
            files[rel] = FileEntry.from_json(fe, f"{w}.files[{rel!r}]")
        out[ref] = files
    return out


def content_checksum(d: dict) -> str:
    body = {k: v for k, v in d.items() if k != CHECKSUM_FIELD}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
