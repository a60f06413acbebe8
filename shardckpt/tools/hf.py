"""Export to (and naming of) the Hugging Face weights layout.

Two pieces:

- which keys of a checkpoint are the model's weights (`model_prefix`,
  `model_names_map`), whatever layout saved them: a plain state, a `TrainState`
  under any top-level key (``<top>.model.<fqn>``), a DDP (``module.``) or
  compiled (``_orig_mod.``) model;
- the directory layout `transformers` reads: one ``model.safetensors``, or
  ``model-00001-of-0000N.safetensors`` shards plus ``model.safetensors.index.json``
  (``{"metadata": {"total_size": N}, "weight_map": {key: file}}``).

Importing such a directory needs nothing here: `sources.SafetensorsSource`
opens the index (or the one file) and the keys are the files' own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator

import torch

from ..format.keys import KeyMap, is_rank_component, key_mapper
from ..io.fsutil import fsync_dir, fsync_file
from .safetensors_io import write_safetensors

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# huggingface_hub's shard names: model-00001-of-00003.safetensors
_SHARD_RE = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# save_pretrained's default max_shard_size ("5GB", decimal units).
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9

# Sibling sections that mark `<P>.model` as TrainState's model (or a {"model": ...,
# "optim": ...} state) rather than a submodule that happens to be called "model"
# (transformers' LlamaForCausalLM has `model.layers.*` next to `lm_head.weight`).
_SECTION_MARKERS = frozenset({"optim", "optimizer", "scheduler", "scaler", "progress",
                              "meta", "extra", "data"})
# Wrapper prefixes of DDP and torch.compile, in any order and nesting, at the
# start of a key only: a submodule legitimately named `module` deeper in the
# model keeps its name.
_WRAPPERS = r"^(?:(?:module|_orig_mod)\.)+"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes for 5000000, "5GB" (decimal, as transformers), "500MiB" (binary)."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(size))
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"max shard size {size!r}: expected bytes or e.g. 5GB, 500MB, 2GiB")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n < 1:
        raise ValueError(f"max shard size must be positive, not {size!r}")
    return n


# ---------------------------------------------------------------- model keys


def model_prefix(keys: Iterable[str], prefer: Iterable[str] = ()) -> str:
    """The prefix under which a checkpoint keeps its model ("train.model.", "model."),
    or "" when the keys are the model's own (a plain model state).

    A `<P>.model.` subtree is the model section when `<P>` also holds TrainState /
    training sections (optim, progress, meta, ``__rank<N>__``, ...), or when it is
    the only thing at the root (``shardckpt.save(model)``). Several such
    sections (two TrainStates) are ambiguous unless one is in `prefer` (the
    caller's strip_prefix).
    """
    children: dict[str, set[str]] = {}  # prefix -> its components (subtrees and leaves)
    inner: set[str] = set()  # prefixes that have keys below them
    for k in keys:
        parts = k.split(".")
        for i in range(len(parts)):
            p = ".".join(parts[:i])
            children.setdefault(p + "." if p else "", set()).add(parts[i])
            if i:
                inner.add(p + ".")
    found = sorted(p + "model." for p, ch in children.items()
                   if p + "model." in inner and (ch & _SECTION_MARKERS
                                         or any(is_rank_component(c) is not None for c in ch)
                                         # shardckpt.save(module) keys it "model": alone
                                         # at the root, "model." is that key
                                         or (p == "" and ch == {"model"})))
    if len(found) > 1:
        wanted = {p if p.endswith(".") else p + "." for p in prefer}
        chosen = [p for p in found if p in wanted]
        if len(chosen) != 1:
            raise ValueError(f"the checkpoint holds several models ({', '.join(found)}); "
                             f"choose one with strip_prefix (--strip-prefix), e.g. {found[0]!r}")
        return chosen[0]
    return found[0] if found else ""


def is_model_key(key: str, prefix: str) -> bool:
    """Is `key` one of the model's weights, given the section `prefix`?"""
    if any(is_rank_component(c) is not None for c in key.split(".")):
        return False  # RNG / loader streams of a rank
    if prefix:
        return key.startswith(prefix)
    # No model section: everything is the model's, except an optimizer saved
    # next to it ({"optim": {"state": ..., "param_groups": ...}} flattened).
    head, _, rest = key.partition(".")
    return not (head in ("optim", "optimizer") and rest.split(".")[0] in ("state", "param_groups"))


def model_names_map(prefix: str) -> KeyMap:
    """Checkpoint key -> the model's parameter / buffer name (THE key mapper, anchored rules)."""
    rules = [(_WRAPPERS, "")]
    if prefix:
        rules.insert(0, ("^" + re.escape(prefix), ""))
    fn = key_mapper(rename=rules)
    assert fn is not None
    return fn


# ---------------------------------------------------------------- HF directory


def shard_plan(specs: list[tuple[str, torch.dtype, tuple[int, ...], int]],
               max_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...], int]]]:
    """Split (name, dtype, shape, nbytes) in order into shards of at most `max_bytes`
    (huggingface_hub's rule: a new shard when the next tensor would overflow; a
    tensor larger than the limit gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s[3] > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s[3]
    return shards


def _owned_names(directory: str) -> list[str]:
    """Files of a previous export in `directory` (names this layout writes)."""
    return sorted(n for n in os.listdir(directory)
                  if n in (SINGLE_FILE, INDEX_FILE) or _SHARD_RE.fullmatch(n))


def write_hf_dir(dst: str, specs: list[tuple[str, torch.dtype, tuple[int, ...], int]],
                 produce: Callable[[str], Iterator[memoryview]], *, max_bytes: int,
                 metadata: dict[str, str], first_metadata: dict[str, str] | None = None,
                 overwrite: bool = False) -> list[str]:
    """Write the HF layout into directory `dst`; returns the file names written.

    `dst` may already exist with other files (config.json, tokenizer): they are
    left alone. Files of an earlier export there (model*.safetensors, the index)
    need `overwrite`; the new files are renamed into place, the index last, then
    old shards the new export does not have are removed, so `from_pretrained`
    never sees a mix. A new `dst` appears in one rename, complete.
    """
    fresh = not os.path.exists(dst)
    if not fresh:
        if not os.path.isdir(dst):
            raise FileExistsError(f"{dst} exists and is not a directory; the safetensors "
                                  f"directory layout needs one (or name a .safetensors file)")
        old = _owned_names(dst)
        if old and not overwrite:
            raise FileExistsError(f"{dst} already holds {', '.join(old[:3])}; pass --overwrite "
                                  f"to replace the exported weights")
    parent, name = os.path.split(os.path.abspath(dst))
    staging = (os.path.join(parent, f".{name}.partial-{uuid.uuid4().hex[:12]}") if fresh
               else os.path.join(dst, f".shardckpt-export-{uuid.uuid4().hex[:12]}"))
    os.makedirs(staging)
    try:
        shards = shard_plan(specs, max_bytes)
        n = len(shards)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                                              for i in range(n)]
        weight_map: dict[str, str] = {}
        for i, (fname, shard) in enumerate(zip(names, shards)):
            meta = dict(metadata)
            if i == 0 and first_metadata:
                meta.update(first_metadata)
            write_safetensors(os.path.join(staging, fname), [s[:3] for s in shard], produce,
                              meta)
            weight_map.update({s[0]: fname for s in shard})
        if n > 1:
            index = {"metadata": {"total_size": sum(s[3] for s in specs)},
                     "weight_map": weight_map}
            ipath = os.path.join(staging, INDEX_FILE)
            with open(ipath, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
                f.write("\n")
            fsync_file(ipath)
            names.append(INDEX_FILE)
        if fresh:
            os.rename(staging, dst)
            fsync_dir(parent)
            return names
        # Shards first, the index (what readers follow) last; then the stale rest.
        for fname in sorted(names, key=lambda x: x == INDEX_FILE):
            os.replace(os.path.join(staging, fname), os.path.join(dst, fname))
        for fname in old:
            if fname not in names:
                os.unlink(os.path.join(dst, fname))
        os.rmdir(staging)
        fsync_dir(dst)
        return names
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
