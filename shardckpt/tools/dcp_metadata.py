"""Read the `.metadata` file of a stock DCP checkpoint without running code from it.

Stock DCP (`torch.distributed.checkpoint.FileSystemWriter`) writes `<dir>/.metadata` with
plain `pickle.dump`, and `FileSystemReader.read_metadata` reads it back with plain
`pickle.load`: a planted `.metadata` runs arbitrary code. `read_dcp_metadata` reads it
with a restricted unpickler instead, which builds only the objects stock DCP puts there.

Why not `pickle.Unpickler` (the C one) with `find_class` overridden: `find_class` gates
GLOBAL / STACK_GLOBAL / INST (and EXT*), i.e. which callables reach the stack, but not
what the other opcodes then do with them. REDUCE calls any stack item with any arguments
(e.g. the Enum functional API, `_MEM_FORMAT_ENCODING("X", "A B")`, builds a new class),
NEWOBJ calls `cls.__new__`, and BUILD's "slot state" branch does `setattr(top, k, v)`
on whatever is on top of the stack, which may be an allowed *class* itself: a planted
file could monkeypatch `pathlib.PosixPath` or DCP's dataclasses process-wide. The C
unpickler has no hook for those opcodes. `pickle._Unpickler` is the pure-Python
implementation of the same class (same API, same opcode semantics); subclassing it lets
every code-running opcode be gated:

  GLOBAL, STACK_GLOBAL            -> find_class: exact (module, name) allow-list, no
                                     dotted names, no getattr chains
  REDUCE                          -> only the few allowed callables, each with its
                                     arguments checked (torch.Size(tuple of ints), ...)
  NEWOBJ, NEWOBJ_EX               -> only the DCP dataclasses, with no arguments
  BUILD                           -> only onto an *instance* of a DCP dataclass, with a
                                     dict of attribute names (or TensorProperties' tuple)
  INST, OBJ                       -> refused (protocol 0/1 calls; DCP writes protocol 4)
  EXT1, EXT2, EXT4                -> refused (copyreg's extension cache skips find_class)
  PERSID, BINPERSID               -> refused (no persistent ids in DCP metadata)

  APPEND(S), SETITEM(S), ADDITEMS  -> only onto a list / dict / set (not onto any object
                                     with an `append` or `__setitem__`); every dict or
                                     set key is checked before it is hashed: at most
                                     100 levels and 10,000 objects (hashing a deeply
                                     nested tuple recurses in C and segfaults; a shared
                                     DAG-shaped one takes exponential time)

Everything else (memo, marks, literals, tuples) runs no code.

The loaded object is then checked: a `Metadata` whose `state_dict_metadata` has the
shape DCP writes, storage entries that stay inside the checkpoint directory (no
absolute path, no `..`), and no container nesting deeper than `_MAX_DEPTH` nor cycles
(so that `==` / `repr` on the result cannot raise RecursionError later).
"""

from __future__ import annotations

import enum
import io
import os
import pathlib
import pickle
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    NotACheckpointError,
    ShardckptError,
    UnsafeObjectError,
)

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

# Also `SafeFileSystemReader` (built on first access; see __getattr__ at the end).
__all__ = ["METADATA_FILE", "read_dcp_metadata", "ALLOWED_GLOBALS"]

METADATA_FILE = ".metadata"
_MAX_DEPTH = 100  # stock DCP metadata nests 6 deep (Metadata/dict/TSM/list/chunk/Size)
_MAX_KEY_NODES = 10_000  # objects in one dict key (a MetadataIndex key has 4)

_DCP_MD = "torch.distributed.checkpoint.metadata"
_DCP_FS = "torch.distributed.checkpoint.filesystem"
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
    (_DCP_FS, "_StorageInfo"),
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


def _unsafe(mdfile: str, what: str, name: str) -> UnsafeObjectError:
    err = UnsafeObjectError(
        f"{mdfile}: refused to unpickle {what}: not part of stock DCP metadata, and unpickling "
        f"it could run code. {_TRUST_HINT}")
    err.path = mdfile  # type: ignore[attr-defined]
    err.global_name = name  # type: ignore[attr-defined]
    return err


def _short(x: Any) -> str:
    try:
        r = repr(x)
    except Exception:  # a repr of arbitrary loaded objects is only for the message
        r = f"<{type(x).__name__}>"
    r = r.replace("\n", " ")
    return r if len(r) <= 60 else r[:57] + "..."


def _is_int(x: Any) -> bool:
    return type(x) is int or type(x) is bool


def _args_size(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) in (tuple, list) and all(_is_int(v) for v in args[0])


def _args_layout(args: tuple) -> bool:
    return len(args) == 1 and type(args[0]) is str and args[0] in _LAYOUT_NAMES


def _args_enum(args: tuple) -> bool:
    return len(args) == 1 and _is_int(args[0])


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


def _allow() -> _Allow:
    global _ALLOW
    if _ALLOW is None:
        _ALLOW = _Allow()
    return _ALLOW


_Base: type = pickle._Unpickler  # type: ignore[attr-defined]  # pure-Python pickle.Unpickler


class _RestrictedUnpickler(_Base):
    dispatch = dict(_Base.dispatch)

    def __init__(self, data: bytes, mdfile: str) -> None:
        super().__init__(io.BytesIO(data))
        self._mdfile = mdfile
        self._allow = _allow()

    # -- GLOBAL / STACK_GLOBAL / EXT* -------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise pickle.UnpicklingError("global names must be strings")
        key = (module, name)
        if self.proto < 3:  # protocol 0-2 pickles name Python 2 modules (__builtin__.set)
            import _compat_pickle

            key = _compat_pickle.NAME_MAPPING.get(key, key)
            key = (_compat_pickle.IMPORT_MAPPING.get(key[0], key[0]), key[1])
        try:
            return self._allow.get(*key)
        except KeyError:
            raise _unsafe(self._mdfile, f"global {module}.{name}", f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids do not occur in DCP metadata")

    # -- REDUCE -----------------------------------------------------------------------
    def _load_reduce(self) -> None:
        stack = self.stack
        args = stack.pop()
        func = stack[-1]
        entry = self._allow.calls.get(id(func))
        if entry is None or entry[0] is not func:
            name = self._allow.name_of(func)
            raise _unsafe(self._mdfile, f"a call of {name}", name)
        _, qual, check = entry
        if type(args) is not tuple or not check(args):
            raise _unsafe(self._mdfile, f"a call of {qual} with arguments {_short(args)}", qual)
        if func is set or func is frozenset:
            for k in args[0] if args else ():
                self._check_key(k)
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = _load_reduce

    # -- NEWOBJ / NEWOBJ_EX -----------------------------------------------------------
    def _check_newobj(self, cls: Any, args: Any, kwargs: Any) -> None:
        if self._allow.newobj.get(id(cls)) is not cls:
            name = self._allow.name_of(cls)
            raise _unsafe(self._mdfile, f"an instance of {name} (NEWOBJ)", name)
        if args != () or kwargs:
            name = self._allow.name_of(cls)
            raise _unsafe(self._mdfile,
                          f"{name}.__new__ with arguments {_short(args)}", name)

    def _load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_newobj(cls, args, None)
        self.append(cls.__new__(cls))

    def _load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._check_newobj(cls, args, kwargs)
        self.append(cls.__new__(cls))

    dispatch[pickle.NEWOBJ[0]] = _load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = _load_newobj_ex

    # -- BUILD ------------------------------------------------------------------------
    def _load_build(self) -> None:
        stack = self.stack
        state = stack[-1]
        inst = stack[-2]
        t = type(inst)
        if self._allow.newobj.get(id(t)) is not t:
            name = self._allow.name_of(inst)
            raise _unsafe(self._mdfile, f"state set on {name} (BUILD)", name)
        if "__setstate__" in vars(t):  # TensorProperties: a 5-tuple
            ok = type(state) is tuple
        else:
            ok = type(state) is dict and all(
                type(k) is str and not k.startswith("__") for k in state)
        if not ok:
            name = self._allow.name_of(t)
            raise _unsafe(self._mdfile, f"state {_short(state)} set on {name} (BUILD)", name)
        stack.pop()
        setstate = getattr(inst, "__setstate__", None) if "__setstate__" in vars(t) else None
        if setstate is not None:
            setstate(state)
        else:
            inst.__dict__.update(state)

    dispatch[pickle.BUILD[0]] = _load_build

    # -- INST / OBJ (protocol 0/1 instantiation) --------------------------------------
    def _load_inst(self) -> None:
        module = self.readline()[:-1].decode("ascii", "replace")
        name = self.readline()[:-1].decode("ascii", "replace")
        raise _unsafe(self._mdfile, f"an instance of {module}.{name} (INST)", f"{module}.{name}")

    def _load_obj(self) -> None:
        args = self.pop_mark()
        cls = args[0] if args else None
        name = self._allow.name_of(cls)
        raise _unsafe(self._mdfile, f"an instance of {name} (OBJ)", name)

    dispatch[pickle.INST[0]] = _load_inst
    dispatch[pickle.OBJ[0]] = _load_obj

    # -- containers: only onto the lists/dicts/sets the pickle made; keys checked -------
    # `dict[key] = v` / `set.add(key)` hash the key, and hashing a deeply nested tuple
    # recurses in C without a recursion check: a 1M-deep tuple key segfaults the process
    # (plain pickle.load too), and a DAG-shaped one ((t, t), (t, t)) ... takes 2**depth.
    def _check_key(self, key: Any) -> None:
        if type(key) in (str, int):
            return
        todo = [(key, 1)]
        n = 0
        while todo:
            obj, depth = todo.pop()
            n += 1
            if depth > _MAX_DEPTH or n > _MAX_KEY_NODES:
                raise pickle.UnpicklingError(
                    f"a dict or set key nests more than {_MAX_DEPTH} levels or "
                    f"{_MAX_KEY_NODES} objects deep (DCP keys are strings and MetadataIndex)")
            t = type(obj)
            if t in (tuple, frozenset):
                todo.extend((c, depth + 1) for c in obj)
            elif self._allow.newobj.get(id(t)) is t:
                todo.extend((c, depth + 1) for c in vars(obj).values())

    def _target(self, kinds: tuple[type, ...], op: str) -> Any:
        obj = self.stack[-1]
        if type(obj) not in kinds:
            raise pickle.UnpicklingError(f"{op} onto a {type(obj).__name__}")
        return obj

    def _load_append(self) -> None:
        value = self.stack.pop()
        self._target((list,), "APPEND").append(value)

    def _load_appends(self) -> None:
        items = self.pop_mark()
        self._target((list,), "APPENDS").extend(items)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        d = self._target((dict, OrderedDict), "SETITEM")
        self._check_key(key)
        d[key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        d = self._target((dict, OrderedDict), "SETITEMS")
        for i in range(0, len(items) - 1, 2):
            self._check_key(items[i])
            d[items[i]] = items[i + 1]
        if len(items) % 2:
            raise pickle.UnpicklingError("SETITEMS with an odd number of items")

    def _load_additems(self) -> None:
        items = self.pop_mark()
        st = self._target((set,), "ADDITEMS")
        for k in items:
            self._check_key(k)
        st.update(items)

    def _load_frozenset(self) -> None:
        items = self.pop_mark()
        for k in items:
            self._check_key(k)
        self.append(frozenset(items))

    def _load_dict(self) -> None:  # protocol 0/1 DICT: builds a dict from marked pairs
        items = self.pop_mark()
        if len(items) % 2:
            raise pickle.UnpicklingError("DICT with an odd number of items")
        for k in items[::2]:
            self._check_key(k)
        self.append(dict(zip(items[::2], items[1::2])))

    dispatch[pickle.DICT[0]] = _load_dict
    dispatch[pickle.APPEND[0]] = _load_append
    dispatch[pickle.APPENDS[0]] = _load_appends
    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.ADDITEMS[0]] = _load_additems
    dispatch[pickle.FROZENSET[0]] = _load_frozenset

    # -- EXT1/2/4: copyreg's extension cache would bypass find_class; DCP never uses them.
    def _load_ext(self) -> None:
        raise _unsafe(self._mdfile, "a copyreg extension code (EXT1/EXT2/EXT4)", "copyreg")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext
    del _op


# -- checks of the loaded object ----------------------------------------------------------

_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.dtype, torch.layout,
           torch.memory_format, torch.Size, enum.Enum, pathlib.PurePath)


def _check_shape(root: Any, mdfile: str, path: str) -> None:
    """Bounded nesting, no cycles (iterative: cannot itself hit the recursion limit)."""
    allow = _allow()
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
        if depth > _MAX_DEPTH:
            raise CorruptCheckpointError(
                f"{mdfile}: the DCP metadata nests more than {_MAX_DEPTH} levels deep; stock "
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
            raise bad(f"state_dict_metadata has a non-string key {_short(k)}")
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
            raise _unsafe(mdfile, f"a {_DCP_FS}._StorageInfo whose file {_short(rel)} lies "
                                  f"outside the checkpoint directory (stock DCP writes plain "
                                  f"file names)", f"{_DCP_FS}._StorageInfo")
        for f in ("offset", "length"):
            v = getattr(info, f, None)
            if not _is_int(v) or v < 0:
                raise bad(f"a storage entry of {rel!r} has {f}={_short(v)}")
        td = getattr(info, "transform_descriptors", None)
        if td is not None and not (type(td) in (list, tuple)
                                   and all(type(x) is str for x in td)):
            raise bad(f"a storage entry of {rel!r} has transform_descriptors={_short(td)}")


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
            md = _RestrictedUnpickler(data, mdfile).load()
        _check_metadata(md, mdfile, path, strict=not trust_pickle)
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = load_id  # as FileSystemReader.read_metadata does
    except ShardckptError:
        raise
    except Exception as e:  # pickle/EOF/Recursion/Type/...: the bytes are not DCP metadata
        raise CorruptCheckpointError(
            f"{mdfile}: cannot read the DCP metadata ({type(e).__name__}: {_short(str(e))}); "
            f"the file is truncated or damaged, or was not written by DCP.",
            path=mdfile) from e
    return md


def _make_safe_reader() -> type:
    from torch.distributed.checkpoint import FileSystemReader

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

    SafeFileSystemReader.__module__ = __name__
    return SafeFileSystemReader


_SAFE_READER: type | None = None


def __getattr__(name: str) -> Any:  # lazy: torch.distributed.checkpoint on first use
    global _SAFE_READER
    if name == "SafeFileSystemReader":
        if _SAFE_READER is None:
            _SAFE_READER = _make_safe_reader()
        return _SAFE_READER
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
