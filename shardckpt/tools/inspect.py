"""`shardckpt inspect`: what a checkpoint holds, from its manifest alone (no data read).

Other formats (stock DCP directories, torch.save files, safetensors) are
summarized from their own metadata through `tools.sources.open_source`.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..format import dtype_from_name
from ..format.refs import RefBlock
from ..io.fsutil import dir_size
from ..io.reader import CheckpointReader
from ..io.storage import norm_path
from .report import human_bytes as _human
from .report import plural, refuse_special


def _stored_items(m: Any) -> list[Any]:
    return [c for t in m.tensors.values() for c in t.chunks] + list(m.objects.values())


def _step(um: dict) -> Any:
    for k in ("step", "global_step"):
        if k in um:
            return um[k]
    return None


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-able summary of a shardckpt checkpoint: totals, files per rank, and every key."""
    path = os.fspath(path)
    with CheckpointReader(path) as reader:
        return _summary(reader)


def inspect_path(path: str | os.PathLike, *, source_format: str | None = None,
                 trust_pickle: bool = False) -> dict[str, Any]:
    """`inspect_checkpoint` for any format the tools read (detected unless `source_format`).

    For formats other than shardckpt the fields a manifest alone knows
    (world_size, created, versions, codec, ranks, format_version) are None.
    """
    from .sources import detect, open_source

    path = os.fspath(path)
    refuse_special(path)
    kind = source_format or detect(path)
    if kind == "shardckpt":
        return {"format": "shardckpt", **inspect_checkpoint(path)}
    with open_source(path, kind, trust_pickle=trust_pickle) as src:
        keys: list[dict[str, Any]] = []
        for k, e in sorted(src.entries.items()):
            if e.kind == "tensor":
                keys.append({"key": k, "kind": "tensor", "shape": list(e.shape),
                             "dtype": str(e.dtype).removeprefix("torch."), "bytes": e.nbytes, "shards": None,
                             "stored_bytes": None})
            else:
                keys.append({"key": k, "kind": "object", "bytes": None, "shards": None,
                             "stored_bytes": None})
        step = _step(src.user_metadata)
        if step is None:
            cands = [k for k, e in src.entries.items() if e.kind == "object"
                     and (k == "progress.step" or k.endswith(".progress.step"))]
            if len(cands) == 1:
                step = src.read_object(cands[0])
        on_disk = dir_size(path) if os.path.isdir(path) else os.path.getsize(path)
        logical = sum(e.nbytes for e in src.entries.values())
        return {
            "format": kind, "path": os.path.abspath(path), "step": step, "world_size": None,
            "created": None, "format_version": None, "versions": {}, "codec": None,
            "bytes_logical": logical, "bytes_on_disk": on_disk,
            "compression_ratio": (logical / on_disk) if on_disk else None,
            "n_tensors": sum(e.kind == "tensor" for e in src.entries.values()),
            "n_objects": sum(e.kind == "object" for e in src.entries.values()),
            "ranks": [], "user_metadata": dict(src.user_metadata or {}), "keys": keys,
        }


def _summary(reader: CheckpointReader) -> dict[str, Any]:
    m = reader.manifest
    keys: list[dict[str, Any]] = []
    logical = 0
    referenced = sum(b.stored_len for c in _stored_items(m) for b in c.block_list()
                     if isinstance(b, RefBlock))
    for k, t in m.tensors.items():
        n = torch.empty((), dtype=dtype_from_name(t.dtype)).element_size()
        for s in t.shape:
            n *= s
        logical += n
        keys.append({"key": k, "kind": "tensor", "shape": list(t.shape), "dtype": t.dtype,
                     "bytes": n, "shards": len(t.chunks),
                     "stored_bytes": sum(c.length for c in t.chunks)})
    for k, o in m.objects.items():
        logical += o.nbytes
        keys.append({"key": k, "kind": "object", "bytes": o.nbytes, "shards": 1,
                     "stored_bytes": o.length})
    keys.sort(key=lambda x: x["key"])
    ranks: dict[int, dict[str, Any]] = {}
    on_disk = 0
    for rel, fi in sorted(m.files.items()):
        r = ranks.setdefault(fi.rank, {"rank": fi.rank, "files": [], "bytes": 0})
        r["files"].append(rel)
        r["bytes"] += fi.size
        on_disk += fi.size
    step = _step(m.user_metadata)
    if step is None:
        # TrainState records the step as an object; one tiny read is worth it.
        cands = [k for k in m.objects if k == "progress.step" or k.endswith(".progress.step")]
        if len(cands) == 1:
            step = reader.read_object(cands[0])
    return {
        "path": norm_path(reader.path),
        "step": step,
        "world_size": m.world_size,
        "created": m.created,
        "format_version": m.format_version,
        "versions": m.versions,
        "codec": m.codec,
        "bytes_logical": logical,
        "bytes_on_disk": on_disk,
        # of the codec: over every stored byte the checkpoint reads, its own and referenced
        "compression_ratio": (logical / (on_disk + referenced)) if on_disk + referenced else None,
        "n_tensors": len(m.tensors),
        "n_objects": len(m.objects),
        "ranks": [ranks[r] for r in sorted(ranks)],
        "user_metadata": m.user_metadata,
        "keys": keys,
        # incremental only: stored bytes this checkpoint holds vs those its bases hold for it
        **({"bytes_own": on_disk, "bytes_referenced": referenced,
            "bases": [reader.bases.dir_of(b) for b in sorted(m.bases)]} if m.bases else {}),
    }


def format_inspect(info: dict[str, Any], *, max_keys: int | None = None) -> str:
    """Human-readable rendering of `inspect_checkpoint`: header, ranks, then a key tree."""
    if info.get("format", "shardckpt") != "shardckpt":
        return _format_other(info, max_keys)
    v = info["versions"]
    ratio = info["compression_ratio"]
    lines = [
        f"checkpoint   {info['path']}",
        f"step         {info['step'] if info['step'] is not None else '(not recorded)'}",
        f"world size   {info['world_size']} (at save)",
        f"created      {info['created']}",
        f"versions     format {info['format_version']}, shardckpt {v.get('shardckpt')}, "
        f"torch {v.get('torch')}, cuda {v.get('cuda')}, codec {v.get('codec_path')}",
        f"codec        {info['codec'].get('compression')} level {info['codec'].get('level')}, "
        f"blocks of {_human(info['codec'].get('block_size', 0))}",
        f"size         {_human(info['bytes_logical'])} logical, {_human(info['bytes_on_disk'])} "
        f"on disk" + (f" (+{_human(info['bytes_referenced'])} referenced in bases)"
                      if info.get("bases") else "")
        + (f" (codec ratio {ratio:.2f}x)" if ratio else ""),
        f"keys         {plural(info['n_tensors'], 'tensor')}, "
        f"{plural(info['n_objects'], 'object')}",
    ]
    if info.get("bases"):
        lines.append(f"incremental  {_human(info['bytes_own'])} own, "
                     f"{_human(info['bytes_referenced'])} referenced in "
                     f"{', '.join(info['bases'])}")
    lines += [
        "files per rank:",
    ]
    for r in info["ranks"]:
        lines.append(f"  rank {r['rank']:>4}: {plural(len(r['files']), 'file')}, "
                     f"{_human(r['bytes'])}")
    lines += _key_tree(info, max_keys)
    return "\n".join(lines)


def _format_other(info: dict[str, Any], max_keys: int | None) -> str:
    lines = [
        f"checkpoint   {info['path']} ({info['format']})",
        f"step         {info['step'] if info['step'] is not None else '(not recorded)'}",
        f"size         {_human(info['bytes_logical'])} of tensors, "
        f"{_human(info['bytes_on_disk'])} on disk",
        f"keys         {plural(info['n_tensors'], 'tensor')}, "
        f"{plural(info['n_objects'], 'object')}",
    ]
    lines += _key_tree(info, max_keys)
    return "\n".join(lines)


def _key_tree(info: dict[str, Any], max_keys: int | None) -> list[str]:
    lines = ["keys:"]
    prev: list[str] = []
    keys = info["keys"] if max_keys is None else info["keys"][:max_keys]
    for k in keys:
        parts = k["key"].split(".")
        # Print each new group heading once, then the leaf indented under it.
        common = 0
        while common < min(len(prev), len(parts) - 1) and prev[common] == parts[common]:
            common += 1
        for d in range(common, len(parts) - 1):
            lines.append("  " + "  " * d + parts[d] + "/")
        prev = parts[:-1]
        pad = "  " + "  " * (len(parts) - 1)
        if k["kind"] == "tensor":
            desc = f"{str(k['shape']):<18} {k['dtype']:<9} {_human(k['bytes']):>10}"
            if k.get("shards") is not None:
                desc += f"  {plural(k['shards'], 'shard')}"
        else:
            desc = f"{'object':<28}" + (f" {_human(k['bytes']):>10}" if k.get("bytes") is not None
                                        else "")
        lines.append(f"{pad}{parts[-1]:<{max(1, 40 - len(pad))}} {desc}")
    if max_keys is not None and len(info["keys"]) > max_keys:
        more = len(info["keys"]) - max_keys
        lines.append(f"  ... {plural(more, 'more key')} (use --json for all)")
    return lines
