"""A restricted unpickler for the `.metadata` of stock DCP checkpoints.

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
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from typing import Any

from .allowlist import (
    MAX_DEPTH,
    MAX_KEY_NODES,
    allow_list,
    short_repr,
    unsafe_error,
)

__all__ = ["RestrictedUnpickler"]


_Base: type = pickle._Unpickler  # type: ignore[attr-defined]  # pure-Python pickle.Unpickler


class RestrictedUnpickler(_Base):
    dispatch = dict(_Base.dispatch)

    def __init__(self, data: bytes, mdfile: str) -> None:
        super().__init__(io.BytesIO(data))
        self._mdfile = mdfile
        self._allow = allow_list()

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
            raise unsafe_error(self._mdfile, f"global {module}.{name}", f"{module}.{name}") from None

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
            raise unsafe_error(self._mdfile, f"a call of {name}", name)
        _, qual, check = entry
        if type(args) is not tuple or not check(args):
            raise unsafe_error(self._mdfile, f"a call of {qual} with arguments {short_repr(args)}", qual)
        if func is set or func is frozenset:
            for k in args[0] if args else ():
                self._check_key(k)
        stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = _load_reduce

    # -- NEWOBJ / NEWOBJ_EX -----------------------------------------------------------
    def _check_newobj(self, cls: Any, args: Any, kwargs: Any) -> None:
        if self._allow.newobj.get(id(cls)) is not cls:
            name = self._allow.name_of(cls)
            raise unsafe_error(self._mdfile, f"an instance of {name} (NEWOBJ)", name)
        if args != () or kwargs:
            name = self._allow.name_of(cls)
            raise unsafe_error(self._mdfile,
                          f"{name}.__new__ with arguments {short_repr(args)}", name)

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
            raise unsafe_error(self._mdfile, f"state set on {name} (BUILD)", name)
        if "__setstate__" in vars(t):  # TensorProperties: a 5-tuple
            ok = type(state) is tuple
        else:
            ok = type(state) is dict and all(
                type(k) is str and not k.startswith("__") for k in state)
        if not ok:
            name = self._allow.name_of(t)
            raise unsafe_error(self._mdfile, f"state {short_repr(state)} set on {name} (BUILD)", name)
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
        raise unsafe_error(self._mdfile, f"an instance of {module}.{name} (INST)", f"{module}.{name}")

    def _load_obj(self) -> None:
        args = self.pop_mark()
        cls = args[0] if args else None
        name = self._allow.name_of(cls)
        raise unsafe_error(self._mdfile, f"an instance of {name} (OBJ)", name)

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
            if depth > MAX_DEPTH or n > MAX_KEY_NODES:
                raise pickle.UnpicklingError(
                    f"a dict or set key nests more than {MAX_DEPTH} levels or "
                    f"{MAX_KEY_NODES} objects deep (DCP keys are strings and MetadataIndex)")
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
        raise unsafe_error(self._mdfile, "a copyreg extension code (EXT1/EXT2/EXT4)", "copyreg")

    for _op in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _load_ext
    del _op


