"""Sources in formats shardckpt did not write: torch.save files, safetensors (one file or
a sharded directory with an index, read through the `safetensors` library) and
stock DCP directories. Nothing read runs code (weights_only rules, the restricted
unpickler for DCP's `.metadata`) unless the caller says trust_pickle.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from ..api import quiet_no_dist
from ..dcp.metadata import planner_data_from_json
from ..errors import NotACheckpointError, UnsafeObjectError, UnsupportedFormatError
from .safetensors_io import ST_DTYPES
from .sources import Entry, Source

# safetensors metadata keys under which non-tensor values and nesting travel.
ST_OBJECTS = "shardckpt.objects"
ST_PLANNER = "shardckpt.planner_data"
ST_USER = "shardckpt.user_metadata"


def _numpy_data_globals() -> list:
    """The numpy globals a pickled ndarray needs (e.g. `np.random.get_state()`).

    They only rebuild an array from its dtype and raw bytes; an object-dtype
    array's items still go through the restricted unpickler one by one, so
    allowing these runs no code from the file.
    """
    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.UInt32DType):
    # the numeric ones only, never object / string / structured dtypes.
    numeric = {type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDG"}
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, *sorted(numeric, key=str)]


def load_torch_file(path: str, *, trust_pickle: bool = False, mmap: bool = True) -> Any:
    """`torch.load` of a file under weights_only rules (plus plain numpy arrays).

    A file that needs more (a pickled class, a whole nn.Module) raises
    `UnsafeObjectError` naming the globals it wants, unless `trust_pickle`, which
    runs whatever the file says.
    """
    import pickle

    if trust_pickle:
        try:
            return torch.load(path, mmap=mmap, weights_only=False, map_location="cpu")
        except RuntimeError:
            if not mmap:
                raise
            # Files of the legacy (pre-zip) serialization cannot be memory-mapped.
            return torch.load(path, weights_only=False, map_location="cpu")
    try:
        with torch.serialization.safe_globals(_numpy_data_globals()):
            try:
                return torch.load(path, mmap=mmap, weights_only=True, map_location="cpu")
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        try:
            wanted = ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only for the message
            wanted = ""
        raise UnsafeObjectError(
            f"{path}: loading needs unpickling of arbitrary objects"
            f"{f' ({wanted})' if wanted else ''}, which can run code from the file. Pass "
            f"--trust-pickle (trust_pickle=True) only for a file you trust, or re-save it "
            f"with plain state_dicts. ({str(e).splitlines()[0]})") from None
    except Exception as e:
        raise NotACheckpointError(
            f"{path}: cannot be read as a torch.save file under weights_only rules ({e}). "
            f"Only plain tensors / containers are accepted.") from None


class TorchSource(Source):
    """A torch.save file, memory-mapped and loaded under weights_only rules."""

    def __init__(self, path: str, *, trust_pickle: bool = False) -> None:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        self.path = path
        obj = load_torch_file(path, trust_pickle=trust_pickle)
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


def _weight_map(index_path: str) -> dict[str, str]:
    """`weight_map` of a safetensors index, every file a plain name next to the index."""
    try:
        with open(index_path, "rb") as f:
            index = json.loads(f.read(64 << 20))
    except (OSError, ValueError, RecursionError) as e:
        raise NotACheckpointError(f"{index_path}: not a readable safetensors index ({e}).") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                           for k, v in wm.items()):
        raise NotACheckpointError(f"{index_path}: `weight_map` is not an object of key -> file "
                                  f"name strings.")
    base = os.path.dirname(index_path)
    for name in set(wm.values()):
        if (os.path.isabs(name) or name != os.path.basename(name) or name in ("", ".", "..")
                or os.path.islink(os.path.join(base, name))):
            raise NotACheckpointError(
                f"{index_path}: weight_map names {name!r}, which is not a file next to the "
                f"index; refusing to read outside the checkpoint.")
    return wm


def _safe_open(path: str) -> Any:
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, framework="pt")
    except (SafetensorError, OSError, ValueError) as e:
        raise NotACheckpointError(f"{path}: not a readable safetensors file ({e}).") from None


class SafetensorsSource(Source):
    """One .safetensors file, or a sharded set described by a *.index.json.

    Read through the `safetensors` library (it validates the header: offsets in
    bounds, contiguous, no overlap). Row ranges come from `get_slice`, a view
    into the memory-mapped file: only the pages of the rows asked for are read,
    so a file larger than RAM streams (it does need the file's size in address
    space; `safetensors_io.SafetensorsFile` reads with pread where that matters).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.files: dict[str, Any] = {}
        self.where: dict[str, Any] = {}
        weight_map: dict[str, str] | None = None
        if path.endswith(".json"):
            base = os.path.dirname(path)
            weight_map = _weight_map(path)
            for name in sorted(set(weight_map.values())):
                self.files[name] = _safe_open(os.path.join(base, name))
        else:
            self.files[os.path.basename(path)] = _safe_open(path)
        self.entries = {}
        meta: dict[str, str] = {}
        for fname, sf in self.files.items():
            meta.update(sf.metadata() or {})
            for name in sf.keys():
                if name in self.where:
                    raise NotACheckpointError(f"{path}: tensor {name!r} is stored in more than "
                                              f"one file.")
                sl = sf.get_slice(name)
                st = sl.get_dtype()
                if st not in ST_DTYPES:
                    raise UnsupportedFormatError(f"{fname}: tensor {name!r} has dtype {st}, "
                                                 f"which this reader does not support.")
                self.entries[name] = Entry(name, "tensor", ST_DTYPES[st], tuple(sl.get_shape()))
                self.where[name] = sf
        if weight_map is not None:
            # The index is what other readers (transformers) trust: it must agree
            # with the files, or the two would load different models.
            for k, fname in weight_map.items():
                if self.where.get(k) is not self.files[fname]:
                    raise NotACheckpointError(f"{path}: weight_map puts {k!r} in {fname}, "
                                              f"which does not hold it.")
        self.objects: dict[str, Any] = json.loads(meta.get(ST_OBJECTS, "{}"))
        for k in self.objects:
            self.entries[k] = Entry(k, "object")
        pd = json.loads(meta.get(ST_PLANNER, "null"))
        self.planner_data = planner_data_from_json(pd) if pd else None
        self.user_metadata = json.loads(meta.get(ST_USER, "{}"))

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        sf = self.where[key]
        if start is None or not self.entries[key].shape:
            return sf.get_tensor(key)
        return sf.get_slice(key)[start:stop]

    def read_object(self, key: str) -> Any:
        return self.objects[key]

    def close(self) -> None:
        # Dropping the handles unmaps the files (tensors already read keep their pages).
        self.files.clear()
        self.where.clear()


class DCPSource(Source):
    """A stock DCP directory (FileSystemWriter layout with `.metadata`).

    DCP reads whole chunks, so a tensor is loaded at once (and kept until the next
    tensor is asked for); no process group is needed. `.metadata` is a pickle:
    it is read with the restricted unpickler unless `trust_pickle` (then torch's
    own reader, which runs whatever the file says); objects load under
    weights_only rules either way.
    """

    def __init__(self, path: str, *, trust_pickle: bool = False) -> None:
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from ..dcp.stock import read_dcp_metadata

        self.path = path
        self.trust_pickle = trust_pickle
        md = self._metadata = read_dcp_metadata(path, trust_pickle=trust_pickle)
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

        from ..dcp.planner import SafeLoadPlanner
        from ..dcp.stock import SafeFileSystemReader

        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        self._cache = None  # drop the previous tensor before reading the next
        state = {key: placeholder}
        with quiet_no_dist():
            reader = SafeFileSystemReader(self.path, metadata=self._metadata,
                                          trust_pickle=self.trust_pickle)
            dcp.load(state, storage_reader=reader,
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


def safetensors_entry(path: str) -> str:
    """The file to open for a directory of safetensors: its index, or its one file.

    Hugging Face's names win, in transformers' order (`model.safetensors`, then
    `model.safetensors.index.json`), so a model directory that also holds other
    safetensors (adapters, ...) opens the same weights `from_pretrained` would.
    """
    names = os.listdir(path)
    for hf in ("model.safetensors", "model.safetensors.index.json"):
        if hf in names:
            return os.path.join(path, hf)
    idx = [f for f in names if f.endswith(".safetensors.index.json")]
    if len(idx) == 1:
        return os.path.join(path, idx[0])
    files = [f for f in names if f.endswith(".safetensors")]
    if len(idx) > 1 or len(files) != 1:
        raise NotACheckpointError(f"{path}: {len(files)} .safetensors files and {len(idx)} "
                                  f"index json files; pass the file or the index.")
    return os.path.join(path, files[0])


