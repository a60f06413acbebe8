"""`shardckpt diff`: compare two checkpoints, or a checkpoint against a model.

Tensors are compared slab by slab (rows along dim 0), so two checkpoints larger
than RAM can be diffed. "Equal" is bitwise: NaNs with the same bits are equal,
+0.0 and -0.0 are not.

`strip_prefix` / `rename` (the one key mapper, `format.keys.key_mapper`) apply
to side A's keys only; the report names keys as they are after mapping (B's
namespace). When the key sets differ and a prefix would explain it, the report
carries a hint (`format.keys.prefix_hint`).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..format.keys import key_mapper, map_keys, prefix_hint
from .report import refuse_special
from .sources import DEFAULT_SLAB_BYTES, Entry, Progress, Source, iter_slabs, open_source

_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class TensorDiff:
    key: str
    equal: bool
    max_abs_diff: float
    frac_equal: float


@dataclass
class DiffReport:
    a: str
    b: str
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # shape / dtype / kind differences
    tensors: list[TensorDiff] = field(default_factory=list)
    objects_differ: list[str] = field(default_factory=list)
    values_compared: bool = True
    strip_prefix: list[str] = field(default_factory=list)  # applied to A's keys
    rename: list[str] = field(default_factory=list)  # applied to A's keys, after strip_prefix
    # A prefix that would explain differing key sets: stripped from side `hint_side`'s keys
    # it makes `hint_matches` of `hint_of` keys match (all of them: the keys differ only by it).
    hint_prefix: str | None = None
    hint_side: str | None = None  # "A" or "B"
    hint_matches: int = 0
    hint_of: int = 0

    @property
    def same(self) -> bool:
        return not (self.only_a or self.only_b or self.changed or self.objects_differ
                    or any(not t.equal for t in self.tensors))

    @property
    def hint(self) -> str | None:
        """The prefix hint in command-line words, or None."""
        if self.hint_prefix is None:
            return None
        p = self.hint_prefix
        how = "only by" if self.hint_matches == self.hint_of else "by"
        text = f"keys differ {how} the prefix {p!r}"
        if self.hint_side == "A":
            return f"{text}: try --strip-prefix {p}"
        return f"{text} on B's side: swap A and B and try --strip-prefix {p}"

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "checkpoints", "a": self.a, "b": self.b, "same": self.same,
                "only_a": self.only_a, "only_b": self.only_b, "changed": self.changed,
                "objects_differ": self.objects_differ, "values_compared": self.values_compared,
                "tensors": [asdict(t) for t in self.tensors],
                "tensors_equal": sum(t.equal for t in self.tensors),
                "strip_prefix": self.strip_prefix, "rename": self.rename,
                "hint": self.hint,
                "hint_prefix": self.hint_prefix, "hint_side": self.hint_side}

    def __str__(self) -> str:
        lines = [f"A = {self.a}", f"B = {self.b}"]
        if self.strip_prefix or self.rename:
            opts = [f"--strip-prefix {p}" for p in self.strip_prefix]
            opts += [f"--rename {r}" for r in self.rename]
            lines.append(f"A's keys mapped by {' '.join(opts)}")
        lines += [f"only in A: {k}" for k in self.only_a]
        lines += [f"only in B: {k}" for k in self.only_b]
        lines += [f"changed:   {c}" for c in self.changed]
        lines += [f"object differs: {k}" for k in self.objects_differ]
        diff = [t for t in self.tensors if not t.equal]
        for t in diff:
            lines.append(f"values differ: {t.key}: max |A-B| = {t.max_abs_diff:.6g}, "
                         f"{100 * t.frac_equal:.2f}% of elements equal")
        if self.values_compared:
            n = len(self.tensors)
            lines.append(f"{n - len(diff)} of {n} common tensor{'s' if n != 1 else ''} "
                         f"{'is' if n == 1 else 'are'} bitwise equal")
        if self.hint:
            lines.append(f"hint: {self.hint}")
        lines.append("identical" if self.same else "DIFFERENT")
        return "\n".join(lines)


def _compare_tensor(sa: Source, e: Entry, sb: Source, eb: Entry, key: str, slab_bytes: int,
                    on_progress: Progress) -> TensorDiff:
    n = e.shape[0] if e.shape else 0
    total = equal = 0
    max_diff = 0.0
    it_b = iter_slabs(sb, eb, 0, n, slab_bytes)
    for ta in iter_slabs(sa, e, 0, n, slab_bytes):
        tb = next(it_b)
        fa, fb = ta.reshape(-1), tb.reshape(-1)
        if fa.numel():
            # Bitwise equality: view as unsigned ints of the element width.
            ua, ub = _as_bits(fa), _as_bits(fb)
            equal += int((ua == ub).sum())
            total += fa.numel()
            if fa.dtype.is_floating_point or fa.dtype.is_complex:
                wa = fa.to(torch.complex128 if fa.is_complex() else torch.float64)
                wb = fb.to(torch.complex128 if fb.is_complex() else torch.float64)
                if bool((torch.isnan(wa) != torch.isnan(wb)).any()):
                    max_diff = math.inf  # NaN against a number: as far apart as it gets
                d = (wa - wb).abs()
                d = d[~torch.isnan(d)]
                if d.numel():
                    max_diff = max(max_diff, float(d.max()))
            elif fa.dtype != torch.bool:
                # In float64: int64 (or uint64) differences can overflow int64 and wrap.
                max_diff = max(max_diff, float((fa.double() - fb.double()).abs().max()))
            else:
                max_diff = max(max_diff, float((fa != fb).any()))
        if on_progress:
            on_progress(ta.numel() * ta.element_size())
    return TensorDiff(key, equal == total, max_diff, (equal / total) if total else 1.0)


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    width = t.element_size()
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}.get(width)
    if view is None:  # complex128: compare byte by byte
        return t.contiguous().view(torch.uint8)
    return t.contiguous().view(view)


def _objects_equal(x: Any, y: Any) -> bool:
    """Equal as stored: NaN equals NaN and tensors compare bitwise, as tensor values do (a
    checkpoint diffed against itself must come out the same)."""
    try:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape
                    and bool((_as_bits(x.reshape(-1)) == _as_bits(y.reshape(-1))).all()))
        if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
            return True
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(_objects_equal(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return (type(x) is type(y) and len(x) == len(y)
                    and all(_objects_equal(a, b) for a, b in zip(x, y)))
        return bool(x == y)
    except Exception:  # incomparable values are reported as different
        return False


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, *, values: bool = True,
                     slab_bytes: int = DEFAULT_SLAB_BYTES,
                     on_progress: Progress = None, trust_pickle: bool = False,
                     strip_prefix: str | Sequence[str] = (),
                     rename: Sequence[str] = ()) -> DiffReport:
    """Keys, shapes, dtypes and (with `values`) bitwise values of two checkpoints (any format).

    `strip_prefix` / `rename` map A's keys (the key mapper of `load` and `convert`)
    before they are matched with B's.
    """
    strips = [strip_prefix] if isinstance(strip_prefix, str) else list(strip_prefix or ())
    renames = list(rename or ())
    key_map = key_mapper(strips, renames)  # bad rules raise before anything is opened
    a, b = os.fspath(a), os.fspath(b)
    refuse_special(a)
    refuse_special(b)
    rep = DiffReport(a=a, b=b, values_compared=values, strip_prefix=strips, rename=renames)
    with (open_source(a, trust_pickle=trust_pickle) as sa,
          open_source(b, trust_pickle=trust_pickle) as sb):
        ka, kb = map_keys(sa.entries, key_map), sb.entries
        rep.only_a = sorted(set(ka) - set(kb))
        rep.only_b = sorted(set(kb) - set(ka))
        if rep.only_a or rep.only_b:
            _hint(rep, ka, kb)
        for k in sorted(set(ka) & set(kb)):
            ea, eb = ka[k], kb[k]
            if ea.kind != eb.kind:
                rep.changed.append(f"{k}: {ea.kind} in A, {eb.kind} in B")
            elif ea.kind == "tensor" and (ea.shape != eb.shape or ea.dtype != eb.dtype):
                rep.changed.append(f"{k}: {list(ea.shape)} {ea.dtype} in A, "
                                   f"{list(eb.shape)} {eb.dtype} in B")
            elif not values:
                continue
            elif ea.kind == "tensor":
                rep.tensors.append(_compare_tensor(sa, ea, sb, eb, k, slab_bytes, on_progress))
            elif not _objects_equal(sa.read_object(ea.key), sb.read_object(k)):
                rep.objects_differ.append(k)
    return rep


def _hint(rep: DiffReport, ka: dict[str, Entry], kb: dict[str, Entry]) -> None:
    """Would stripping a prefix from A's (or else B's) keys explain the difference?"""
    for side, wanted, stored in (("A", kb, ka), ("B", ka, kb)):
        p = prefix_hint(wanted, stored)
        if p is None:
            continue
        fn = key_mapper(p)
        mapped = {fn(k) for k in stored} if fn else set(stored)
        rep.hint_prefix, rep.hint_side = p, side
        rep.hint_matches = len(mapped & set(wanted))
        rep.hint_of = max(len(wanted), len(stored))
        return


# ---------------------------------------------------------------- checkpoint vs model


@dataclass
class ModelCheckReport:
    path: str
    target: str
    prefix: str
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    mismatched: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": "model", "path": self.path, "target": self.target,
                "prefix": self.prefix, "ok": self.ok, "missing": self.missing,
                "unexpected": self.unexpected, "mismatched": self.mismatched}

    def __str__(self) -> str:
        lines = [f"checkpoint {self.path} (keys under {self.prefix or '<root>'!r}) "
                 f"vs model {self.target}"]
        lines += [f"missing from checkpoint: {k}" for k in self.missing]
        lines += [f"not in model: {k}" for k in self.unexpected]
        lines += [f"mismatch: {m}" for m in self.mismatched]
        lines.append("will load" if self.ok else
                     "will NOT load with strict=True (fix the model config or --prefix)")
        return "\n".join(lines)


def load_target(spec: str) -> dict[str, torch.Tensor]:
    """Import `module:function`, call it, return the state dict of what it returns."""
    mod_name, fn_name = spec.split(":", 1)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: local modules are importable
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {spec} ({e}); run from the directory that makes "
                         f"{mod_name} importable") from None
    obj = fn() if callable(fn) else fn
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise ValueError(f"{spec} returned {type(obj).__name__}; expected an nn.Module or a "
                        f"state dict")
    return obj


def is_model_target(spec: str) -> bool:
    return not os.path.exists(spec) and bool(_TARGET_RE.match(spec))


def check_model(path: str | os.PathLike, target: str, *, prefix: str | None = None,
                trust_pickle: bool = False) -> ModelCheckReport:
    """Will the checkpoint's model keys load into the model `target` builds?"""
    sd = load_target(target)
    refuse_special(os.fspath(path))
    with open_source(os.fspath(path), trust_pickle=trust_pickle) as src:
        ents = src.entries
        if prefix is None:
            # The prefix that makes the most model keys match, among the usual ones.
            cands = {""} | {k[: len(k) - len(mk)] for k in ents for mk in sd
                            if k.endswith("." + mk)}
            prefix = max(sorted(cands), key=lambda p: sum(p + mk in ents for mk in sd))
        rep = ModelCheckReport(path=os.fspath(path), target=target, prefix=prefix)
        ck = {k[len(prefix):]: e for k, e in ents.items() if k.startswith(prefix)}
        for k, t in sd.items():
            e = ck.get(k)
            if e is None:
                rep.missing.append(k)
            elif not isinstance(t, torch.Tensor) or e.kind != "tensor":
                if isinstance(t, torch.Tensor) != (e.kind == "tensor"):
                    rep.mismatched.append(f"{k}: tensor/object kind differs")
            elif tuple(t.shape) != e.shape or t.dtype != e.dtype:
                rep.mismatched.append(f"{k}: checkpoint {list(e.shape)} {e.dtype}, "
                                      f"model {list(t.shape)} {t.dtype}")
        if prefix:
            rep.unexpected = sorted(k for k in ck if k not in sd)
        return rep
