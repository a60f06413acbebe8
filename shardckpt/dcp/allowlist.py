"""What the restricted unpickler lets a stock DCP `.metadata` build: the allow-list of
globals, the argument checks of each allowed callable, and the error it raises.

Found by pickletools over real torch 2.13 saves of every kind DCP writes (plain
tensors, nested dicts, objects, FSDP2 DTensors); see tests/test_dcp_metadata_safe.py.
"""

from __future__ import annotations

import os
import pathlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from ..errors import UnsafeObjectError

METADATA_FILE = ".metadata"
MAX_DEPTH = 100  # stock DCP metadata nests 6 deep (Metadata/dict/TSM/list/chunk/Size)
MAX_KEY_NODES = 10_000  # objects in one dict key (a MetadataIndex key has 4)

_DCP_MD = "torch.distributed.checkpoint.metadata"
DCP_FS = "torch.distributed.checkpoint.filesystem"
_LEGACY_MD = "torch.distributed._shard.sharded_tensor.metadata"  # torch <= 2.0 DCP

# Dataclasses DCP pickles as NEWOBJ(cls, ()) + BUILD(state).
_DATACLASSES = (
    (_DCP_MD, "Metadata"),
    (_DCP_MD, "MetadataIndex"),
    (_DCP_MD, "ChunkStorageMetadata"),
    (_DCP_MD, "TensorStorageMetadata"),
    (_DCP_MD, "BytesStorageMetadata"),
    (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "StorageMeta"),
    (DCP_FS, "_StorageInfo"),
    (_LEGACY_MD, "TensorProperties"),
)
# Callables DCP pickles as REDUCE(func, args); each with a check of its arguments.
_CALLABLES = (
    ("torch", "Size"),                       # torch.Size((2, 3))
    ("torch.serialization", "_get_layout"),  # torch.layout: _get_layout("torch.strided")
    (_DCP_MD, "_MEM_FORMAT_ENCODING"),       # inside TensorProperties' state: Enum(0)
    (_LEGACY_MD, "MEM_FORMAT_ENCODING"),
    ("pathlib", "PosixPath"),                # StorageMeta.checkpoint_id
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),          # planner_data / storage_data of other planners
    ("builtins", "set"),                     # protocol 2/3 sets
    ("builtins", "frozenset"),
)
# Plus: every torch dtype, pickled as the global `torch.<name>` (torch.float32, ...).
_DTYPE_NAMES = frozenset(n for n, v in vars(torch).items() if isinstance(v, torch.dtype))
_LAYOUT_NAMES = frozenset(str(v) for v in vars(torch).values() if isinstance(v, torch.layout))

ALLOWED_GLOBALS: tuple[str, ...] = tuple(
    [f"{m}.{n}" for m, n in _DATACLASSES + _CALLABLES]
    + [f"pathlib._local.{n}" for m, n in _CALLABLES if m == "pathlib"]  # Python >= 3.13
    + sorted(f"torch.{n}" for n in _DTYPE_NAMES))

_TRUST_HINT = ("If the checkpoint comes from a trusted source, read it with full unpickling: "
               "--trust-pickle (CLI) / trust_pickle=True (Python).")


def unsafe_error(mdfile: str, what: str, name: str) -> UnsafeObjectError:
    err = UnsafeObjectError(
        f"{mdfile}: refused to unpickle {what}: not part of stock DCP metadata, and unpickling "
        f"it could run code. {_TRUST_HINT}")
    err.path = mdfile  # type: ignore[attr-defined]
    err.global_name = name  # type: ignore[attr-defined]
    return err


def short_repr(x: Any) -> str:
    try:
        r = repr(x)
    except Exception:  # a repr of arbitrary loaded objects is only for the message
        r = f"<{type(x).__name__}>"
    r = r.replace("\n", " ")
    return r if len(r) <= 60 else r[:57] + "..."


def is_int(x: Any) -> bool:
    return type(x) is int or type(x) is bool


def _args_size(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) in (tuple, list) and all(is_int(v) for v in args[0])


def _args_layout(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) is str and args[0] in _LAYOUT_NAMES


def _args_enum(args: tuple) -> bool:
    return len(args) == 1 and is_int(args[0])


def _args_path(args: tuple) -> bool:
    return all(type(a) is str and "\x00" not in a for a in args)


def _args_none(args: tuple) -> bool:
    return args == ()


def _args_container(args: tuple) -> bool:
    return args == () or (len(args) == 1 and type(args[0]) in (list, tuple))


_ARG_CHECKS: dict[str, Callable[[tuple], bool]] = {
    "Size": _args_size, "_get_layout": _args_layout, "_MEM_FORMAT_ENCODING": _args_enum,
    "MEM_FORMAT_ENCODING": _args_enum, "PosixPath": _args_path, "PurePosixPath": _args_path,
    "WindowsPath": _args_path, "PureWindowsPath": _args_path, "OrderedDict": _args_none,
    "set": _args_container, "frozenset": _args_container,
}


def _resolve(module: str, name: str) -> Any:
    """The real object behind an allowed (module, name); imports only torch modules."""
    if module == "torch":
        return getattr(torch, name)
    if module in ("pathlib", "pathlib._local"):
        # A concrete path of the other OS cannot be instantiated here; the pure flavour
        # holds the same value (StorageMeta.checkpoint_id is informational).
        if name == "WindowsPath" and os.name != "nt":
            return pathlib.PureWindowsPath
        if name == "PosixPath" and os.name == "nt":
            return pathlib.PurePosixPath
        return getattr(pathlib, name)
    if module == "collections":
        return OrderedDict
    if module == "builtins":
        return {"set": set, "frozenset": frozenset}[name]
    import importlib

    return getattr(importlib.import_module(module), name)


class _Allow:
    """Allowed globals, resolved once, keyed by (module, name) and by id(obj)."""

    def __init__(self) -> None:
        self.by_name: dict[tuple[str, str], Any] = {}
        self.newobj: dict[int, type] = {}       # id(cls) -> cls   (NEWOBJ + BUILD)
        self.calls: dict[int, tuple[Any, str, Callable[[tuple], bool]]] = {}  # REDUCE
        self.names: dict[int, str] = {}
        self._loaded: set[tuple[str, str]] = set()

    def get(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in self.by_name:
            return self.by_name[key]
        kind = None
        if module == "torch" and name in _DTYPE_NAMES:
            kind = "dtype"
        elif key in _DATACLASSES:
            kind = "dataclass"
        elif key in _CALLABLES or (module == "pathlib._local" and ("pathlib", name) in _CALLABLES):
            kind = "call"
        if kind is None:
            raise KeyError(key)
        obj = _resolve(module, name)
        qual = f"{module}.{name}"
        if kind == "dataclass":
            self.newobj[id(obj)] = obj
        elif kind == "call":
            self.calls[id(obj)] = (obj, qual, _ARG_CHECKS[name])
        self.names.setdefault(id(obj), qual)
        self.by_name[key] = obj
        return obj

    def name_of(self, obj: Any) -> str:
        n = self.names.get(id(obj))
        if n is not None:
            return n
        t = obj if isinstance(obj, type) else type(obj)
        return f"{getattr(t, '__module__', '?')}.{getattr(t, '__qualname__', t.__name__)}"


_ALLOW: _Allow | None = None


def allow_list() -> _Allow:
    global _ALLOW
    if _ALLOW is None:
        _ALLOW = _Allow()
    return _ALLOW


