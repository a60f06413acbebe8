"""`shardckpt diff`: compare two checkpoints, or a checkpoint against a model.

Tensors are compared slab by slab (rows along dim 0), so two checkpoints larger
than RAM can be diffed. "Equal" is bitwise: NaNs with the same bits are equal,
+0.0 and -0.0 are not.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from .sources import DEFAULT_SLAB_BYTES, Progress, Source, iter_slabs, open_source

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

    @property
    def same(self) -> bool:
        return not (self.only_a or self.only_b or self.changed or self.objects_differ
                    or any(not t.equal for t in self.tensors))

    def __str__(self) -> str:
        lines = [f"A = {self.a}", f"B = {self.b}"]
        lines += [f"only in A: {k}" for k in self.only_a]
        lines += [f"only in B: {k}" for k in self.only_b]
        lines += [f"changed:   {c}" for c in self.changed]
        lines += [f"object differs: {k}" for k in self.objects_differ]
        diff = [t for t in self.tensors if not t.equal]
        for t in diff:
            lines.append(f"values differ: {t.key}: max |A-B| = {t.max_abs_diff:.6g}, "
                         f"{100 * t.frac_equal:.2f}% of elements equal")
        if self.values_compared:
            lines.append(f"{len(self.tensors) - len(diff)} of {len(self.tensors)} common tensors "
                         f"are bitwise equal")
        lines.append("identical" if self.same else "DIFFERENT")
        return "\n".join(lines)


def _compare_tensor(sa: Source, sb: Source, key: str, slab_bytes: int,
                    on_progress: Progress) -> TensorDiff:
    e = sa.entries[key]
    n = e.shape[0] if e.shape else 0
    total = equal = 0
    max_diff = 0.0
    it_b = iter_slabs(sb, sb.entries[key], 0, n, slab_bytes)
    for ta in iter_slabs(sa, e, 0, n, slab_bytes):
        tb = next(it_b)
        fa, fb = ta.reshape(-1), tb.reshape(-1)
        if fa.numel():
            # Bitwise equality: view as unsigned ints of the element width.
            ua, ub = _as_bits(fa), _as_bits(fb)
            equal += int((ua == ub).sum())
            total += fa.numel()
            if fa.dtype.is_floating_point or fa.dtype.is_complex:
                d = (fa.to(torch.complex128 if fa.is_complex() else torch.float64)
                     - fb.to(torch.complex128 if fb.is_complex() else torch.float64)).abs()
                d = d[~torch.isnan(d)]
                if d.numel():
                    max_diff = max(max_diff, float(d.max()))
            elif fa.dtype != torch.bool:
                max_diff = max(max_diff, float((fa.long() - fb.long()).abs().max()))
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
    try:
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
        return bool(x == y)
    except Exception:  # incomparable values are reported as different
        return False


def diff_checkpoints(a: str | os.PathLike, b: str | os.PathLike, *, values: bool = True,
                     slab_bytes: int = DEFAULT_SLAB_BYTES,
                     on_progress: Progress = None, trust_pickle: bool = False) -> DiffReport:
    """Keys, shapes, dtypes and (with `values`) bitwise values of two checkpoints (any format)."""
    rep = DiffReport(a=os.fspath(a), b=os.fspath(b), values_compared=values)
    with (open_source(os.fspath(a), trust_pickle=trust_pickle) as sa,
          open_source(os.fspath(b), trust_pickle=trust_pickle) as sb):
        ka, kb = sa.entries, sb.entries
        rep.only_a = sorted(set(ka) - set(kb))
        rep.only_b = sorted(set(kb) - set(ka))
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
                rep.tensors.append(_compare_tensor(sa, sb, k, slab_bytes, on_progress))
            elif not _objects_equal(sa.read_object(k), sb.read_object(k)):
                rep.objects_differ.append(k)
    return rep


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
        raise TypeError(f"{spec} returned {type(obj).__name__}; expected an nn.Module or a "
                        f"state dict")
    return obj


def is_model_target(spec: str) -> bool:
    return not os.path.exists(spec) and bool(_TARGET_RE.match(spec))


def check_model(path: str | os.PathLike, target: str, *, prefix: str | None = None,
                trust_pickle: bool = False) -> ModelCheckReport:
    """Will the checkpoint's model keys load into the model `target` builds?"""
    sd = load_target(target)
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
