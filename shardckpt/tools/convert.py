"""Convert between shardckpt, stock DCP directories, torch.save files and safetensors.

Every source is read tensor by tensor (row slabs where the format allows), and
every target but `torch` is written as it is read, so a checkpoint larger than
RAM converts. `torch` (one torch.save file) must hold the whole state in memory:
that is how torch.save works.

On the way, a `SelectedSource` view can keep only the model's weights
(`model_only`), filter output keys by glob (`include` / `exclude`) and cast
floating tensors (`dtype`), slab by slab. `train_state` reads a conventional
torch.save training checkpoint in the TrainState layout (`legacy.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch

from ..format.keys import KeyMap, key_mapper
from ..io.fsutil import fsync_dir, fsync_file
from ..io.tensor_bytes import tensor_bytes
from .dcp_export import DCP_CHUNK_BYTES, mapping_of, to_dcp
from .external import ST_OBJECTS, ST_PLANNER, ST_USER
from .hf import (
    DEFAULT_MAX_SHARD_BYTES,
    is_model_key,
    model_names_map,
    model_prefix,
    parse_size,
    write_hf_dir,
)
from .reshard import refuse_url_destination, renamed_entries, write_checkpoint
from .safetensors_io import write_safetensors
from .sources import (
    DEFAULT_SLAB_BYTES,
    Entry,
    Progress,
    Source,
    detect,
    iter_slabs,
    open_source,
)

TARGETS = ("shardckpt", "dcp", "torch", "safetensors")


# ---------------------------------------------------------------- key remapping


class SelectedSource(Source):
    """Some keys of `base`, under new names, floating tensors optionally cast.

    Every target reads through it as through any source, so filtering and
    casting stream like the rest (a slab is cast right after it is read).
    """

    def __init__(self, base: Source, pairs: list[tuple[str, str]],
                 dtype: torch.dtype | None = None) -> None:
        self.base = base
        self.path = base.path
        self.origin = {nk: ok for nk, ok in pairs}
        self.dtype = dtype
        self.entries = {}
        for nk, ok in pairs:
            e = base.entries[ok]
            dt = e.dtype
            if e.kind == "tensor" and dtype is not None and dt.is_floating_point:
                dt = dtype
            self.entries[nk] = Entry(nk, e.kind, dt, e.shape, e.requires_grad)
        # Nesting (planner data) survives only when no key changed name.
        same = all(nk == ok for nk, ok in pairs)
        self.planner_data = ({k: base.planner_data[k] for k in self.origin
                              if k in base.planner_data}
                             if same and base.planner_data else None)
        self.user_metadata = dict(base.user_metadata or {})
        self.codec = base.codec

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        t = self.base.read_rows(self.origin[key], start, stop)
        want = self.entries[key].dtype
        return t.to(want) if t.dtype != want else t

    def read_object(self, key: str) -> Any:
        return self.base.read_object(self.origin[key])

    def object_bytes(self, key: str) -> bytes:
        return self.base.object_bytes(self.origin[key])


def _cast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        dt = getattr(torch, str(dtype).removeprefix("torch."), None)
    if dtype is not None and not (isinstance(dt, torch.dtype) and dt.is_floating_point):
        raise ValueError(f"dtype {dtype!r}: expected a floating torch dtype name such as "
                         f"bfloat16, float16 or float32")
    return dt


def _patterns(p: str | Sequence[str]) -> tuple[str, ...]:
    return (p,) if isinstance(p, str) else tuple(p or ())


def select(src: Source, *, key_map: KeyMap | None, model_only: bool = False,
           include: Sequence[str] = (), exclude: Sequence[str] = (),
           dtype: torch.dtype | None = None,
           strip_prefix: Sequence[str] = ()) -> tuple[Source, list[str]]:
    """The view of `src` the options ask for, and the source keys it leaves out.

    With none of model_only / include / exclude / dtype, `src` itself (the targets
    then apply `key_map`, keeping the source's nesting). Output keys: with
    `model_only`, the model's own names (`hf.model_names_map`), then `key_map`;
    `include` / `exclude` are fnmatch globs on those, exclude winning.
    """
    include, exclude = _patterns(include), _patterns(exclude)
    if not (model_only or include or exclude or dtype is not None):
        return src, []
    prefix = model_prefix(src.entries, prefer=_patterns(strip_prefix)) if model_only else ""
    mk = model_names_map(prefix) if model_only else None
    pairs: list[tuple[str, str]] = []
    dropped: list[str] = []
    origin: dict[str, str] = {}
    for k, e in src.entries.items():
        if model_only and (e.kind != "tensor" or not is_model_key(k, prefix)):
            dropped.append(k)  # optimizer, scheduler, RNG, progress, meta, extra, objects
            continue
        nk = mk(k) if mk else k
        nk = key_map(nk) if key_map else nk
        if (not nk or (include and not any(fnmatchcase(nk, g) for g in include))
                or any(fnmatchcase(nk, g) for g in exclude)):
            dropped.append(k)
            continue
        if nk in origin:
            raise ValueError(f"keys {origin[nk]!r} and {k!r} both map to {nk!r}; "
                             f"fix --rename / --strip-prefix")
        origin[nk] = k
        pairs.append((nk, k))
    if not pairs:
        what = "model weights" if model_only else "keys"
        raise ValueError(f"{src.path}: no {what} left to convert after filtering "
                         f"(include={list(include)}, exclude={list(exclude)})")
    return SelectedSource(src, pairs, dtype), dropped


# ---------------------------------------------------------------- targets


def _to_torch(src: Source, dst: str, key_map: KeyMap | None,
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
        mappings[nk] = mapping_of(src, key_map, e.key, nk)
    state = unflatten_state_dict(flat, mappings)
    tmp = f"{dst}.tmp-{os.getpid()}"
    try:
        torch.save(state, tmp)
        fsync_file(tmp)
        os.replace(tmp, dst)
        fsync_dir(os.path.dirname(os.path.abspath(dst)))
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _to_safetensors(src: Source, dst: str, key_map: KeyMap | None, slab_bytes: int,
                    on_progress: Progress, *, directory: bool, max_bytes: int | None,
                    shardckpt_metadata: bool, overwrite: bool) -> tuple[list[str], list[str]]:
    """Returns the keys of objects that could not be stored (not JSON values) and the
    names of the files written.

    `directory`: the Hugging Face layout in `dst` (`hf.write_hf_dir`), else one
    file. `shardckpt_metadata`: carry JSON objects, nesting and user metadata in
    the header (round trips to shardckpt); an inference export has only tensors
    and `{"format": "pt"}`, which transformers requires.
    """
    specs, objects, skipped = [], {}, []
    by_new: dict[str, Entry] = {}
    planner: dict[str, list] = {}
    for nk, e in renamed_entries(src, key_map):
        planner[nk] = list(mapping_of(src, key_map, e.key, nk))
        if e.kind == "tensor":
            specs.append((nk, e.dtype, e.shape, e.nbytes))
            by_new[nk] = e
            continue
        if not shardckpt_metadata:
            skipped.append(nk)
            continue
        value = src.read_object(e.key)
        try:
            json.dumps(value)
            objects[nk] = value
        except TypeError:
            skipped.append(nk)
    extra = ({ST_OBJECTS: json.dumps(objects), ST_PLANNER: json.dumps(planner),
              ST_USER: json.dumps(src.user_metadata or {}, default=str)}
             if shardckpt_metadata else {})

    def produce(name: str) -> Iterator[memoryview]:
        e = by_new[name]
        stop = e.shape[0] if e.shape else None
        for slab in iter_slabs(src, e, 0, stop or 0, slab_bytes):
            if on_progress:
                on_progress(slab.numel() * slab.element_size())
            yield tensor_bytes(slab)

    if directory:
        files = write_hf_dir(dst, specs, produce, max_bytes=max_bytes or DEFAULT_MAX_SHARD_BYTES,
                             metadata={"format": "pt"}, first_metadata=extra,
                             overwrite=overwrite)
        return skipped, files
    total = sum(s[3] for s in specs)
    if max_bytes is not None and total > max_bytes:
        raise ValueError(f"{dst}: {total} bytes of tensors exceed max_shard_size={max_bytes} "
                         f"and a .safetensors path is one file; give a directory to shard")
    write_safetensors(dst, [s[:3] for s in specs], produce, {"format": "pt", **extra})
    return skipped, [os.path.basename(dst)]


def _files_under(root: str) -> list[str]:
    """Relative paths of the files of a written directory."""
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, fs in os.walk(root) for f in fs)


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str, *,
            source_format: str | None = None, strip_prefix: Sequence[str] = (),
            rename: Sequence[str] = (), world_size: int = 1, compression: str | None = None,
            overwrite: bool = False, slab_bytes: int = DEFAULT_SLAB_BYTES,
            dcp_chunk_bytes: int = DCP_CHUNK_BYTES,
            on_progress: Progress = None, trust_pickle: bool = False,
            model_only: bool = False, include: str | Sequence[str] = (),
            exclude: str | Sequence[str] = (), dtype: str | torch.dtype | None = None,
            max_shard_size: int | str | None = None,
            train_state: bool = False) -> dict[str, Any]:
    """Convert `src` (any supported format, detected) to `dst` in format `to`.

    - `model_only`: only the model's weights, under its own parameter names,
      whatever layout saved them (plain, TrainState under any key, DDP, compiled).
    - `include` / `exclude`: fnmatch globs on output keys; exclude wins.
    - `dtype`: cast floating tensors ("bfloat16", "float16", "float32").
    - `to="safetensors"`: `dst` ending in ``.safetensors`` is one file; any other
      `dst` is a directory in the Hugging Face layout (``model.safetensors``, or
      shards of at most `max_shard_size`, default 5GB, plus the index).
    - `train_state`: `src` is a conventional torch.save training checkpoint, mapped
      to the TrainState layout under "train" (see `legacy.py`); `strip_prefix` /
      `rename` apply to its model keys (and so to the optimizer's FQNs).

    Returns a summary: {"source_format", "to", "tensors", "objects", "bytes",
    "skipped", "files", "dropped", "unplaced"}; counts and bytes are what was
    written; "dropped" are source keys filtered out; "unplaced" keys of a
    training checkpoint that have no place in the TrainState layout.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, not {to!r}")
    refuse_url_destination(dst)
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError("convert needs a destination different from the source")
    cast = _cast_dtype(dtype)
    max_bytes = parse_size(max_shard_size) if max_shard_size is not None else None
    # A directory destination holds the HF layout; it may already exist with
    # config.json and tokenizer files (write_hf_dir checks what it would replace).
    st_dir = to == "safetensors" and (os.path.isdir(dst) or not dst.endswith(".safetensors"))
    if to != "shardckpt" and not st_dir and os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite or choose another path")
    if max_bytes is not None and to != "safetensors":
        raise ValueError("max_shard_size applies to --to safetensors only")
    key_map = key_mapper(strip_prefix, rename)
    kind = source_format or detect(src)
    if train_state:
        if kind != "torch":
            raise ValueError(f"train_state imports a torch.save training checkpoint; {src} is "
                             f"{kind}")
        from .legacy import LegacySource

        opened: Source = LegacySource(src, trust_pickle=trust_pickle, key_map=key_map)
        key_map = None  # already applied to the model keys and the optimizer's FQNs
    else:
        opened = open_source(src, kind, trust_pickle=trust_pickle)
    skipped: list[str] = []
    with opened as base:
        s, dropped = select(base, key_map=key_map, model_only=model_only, include=include,
                            exclude=exclude, dtype=cast, strip_prefix=_patterns(strip_prefix))
        km = key_map if s is base else None
        if to == "shardckpt":
            write_checkpoint(s, dst, world_size=world_size, compression=compression,
                             key_map=km, slab_bytes=slab_bytes, overwrite=overwrite,
                             on_progress=on_progress)
            files = _files_under(dst)
        elif to == "torch":
            _to_torch(s, dst, km, on_progress)
            files = [os.path.basename(dst)]
        elif to == "safetensors":
            skipped, files = _to_safetensors(s, dst, km, slab_bytes, on_progress,
                                             directory=st_dir, max_bytes=max_bytes,
                                             shardckpt_metadata=not model_only,
                                             overwrite=overwrite)
        else:
            to_dcp(s, dst, km, on_progress, dcp_chunk_bytes)
            files = _files_under(dst)
        ents = list(s.entries.values())
        return {"source_format": kind, "to": to,
                "tensors": sum(e.kind == "tensor" for e in ents),
                "objects": sum(e.kind == "object" for e in ents),
                "bytes": sum(e.nbytes for e in ents), "skipped": skipped,
                "files": files, "dropped": dropped,
                "unplaced": sorted(getattr(base, "unplaced", {}))}
