"""Import of a conventional `torch.save` training checkpoint into the TrainState layout.

Training scripts commonly save ``{"model_state_dict": ..., "optimizer_state_dict":
..., "scheduler_state_dict": ..., "epoch": 3, "rng_state": ...}``. `import_train_state`
maps those keys to what ``TrainState.state_dict()`` writes under a top-level key
(default ``"train"``), so that ``shardckpt.load({"train": ts}, out)`` resumes the run:

- model -> ``train.model.<fqn>`` (leading DDP ``module.`` / compile ``_orig_mod.``
  removed, as `get_model_state_dict` does);
- optimizer -> ``train.optim.state.<fqn>.<moment>`` and ``train.optim.param_groups``
  with FQNs instead of integer ids (DCP's `get_optimizer_state_dict` form);
- scheduler, scaler -> their state_dicts as they are;
- epoch / step / best metric -> ``train.progress``;
- Python, NumPy and torch RNG -> ``train.__rank0__.rng`` in TrainState's encoding.

Integer optimizer ids: torch numbers parameters in the order they were given to
the optimizer, group after group. Without the model object we ASSUME that order
is ``model.named_parameters()`` order (the optimizer was built from
``model.parameters()`` or groups that keep that order) and derive it from the
model state dict: its keys in order, without float buffers known by name
(``running_mean``, ``running_var``), non-float tensors and tied duplicates
(same storage). When there are more candidates than ids, the ids are aligned to
the candidates by the shapes of their state (exp_avg, momentum_buffer); only a
unique alignment is used. Anything that cannot be placed (an optimizer that does
not align, an unknown key, incomplete RNG) is reported, never dropped silently.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..format.keys import KeyMap
from ..training.train_state import encode_numpy_rng, encode_python_rng, library_version
from .external import load_torch_file
from .hf import model_names_map
from .sources import Entry, Source

MODEL_KEYS = ("model_state_dict", "model", "state_dict")
OPTIM_KEYS = ("optimizer_state_dict", "optimizer", "optim")
SCHEDULER_KEYS = ("scheduler_state_dict", "scheduler", "lr_scheduler")
SCALER_KEYS = ("scaler", "grad_scaler")
EPOCH_KEYS = ("epoch",)
STEP_KEYS = ("step", "global_step", "iteration")
BEST_KEYS = ("best_metric", "best_loss", "best_acc")
TORCH_RNG_KEYS = ("rng_state", "torch_rng_state")
CUDA_RNG_KEYS = ("cuda_rng_state",)
NUMPY_RNG_KEYS = ("numpy_rng_state",)
PYTHON_RNG_KEYS = ("python_rng_state", "random_state")

# Float buffers common enough to recognise by name (BatchNorm); they are in the
# state dict but not in named_parameters().
_BUFFER_NAMES = ("running_mean", "running_var")
# Above this many alignment cells the shape alignment is not attempted.
_MAX_ALIGN_CELLS = 20_000_000


@dataclass
class LegacyImport:
    """The TrainState-layout state and what could not be placed (key -> reason)."""

    state: dict[str, Any]
    unplaced: dict[str, str] = field(default_factory=dict)
    placed: dict[str, str] = field(default_factory=dict)  # section -> source key


# ---------------------------------------------------------------- RNG encodings


def _torch_rng(value: Any) -> torch.Tensor:
    if not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1):
        raise ValueError("not a torch RNG state (a 1-D uint8 tensor)")
    return value


def _cuda_rng(value: Any) -> dict[str, torch.Tensor]:
    if isinstance(value, torch.Tensor):
        value = [value]
    if isinstance(value, Mapping):
        value = [value[k] for k in sorted(value, key=int)]
    return {str(i): _torch_rng(v) for i, v in enumerate(value)}


# ---------------------------------------------------------------- optimizer ids


def _param_candidates(model: Mapping[str, Any]) -> list[str]:
    """Model keys that can be parameters, in state-dict (= named_parameters) order."""
    out, seen = [], set()
    for k, v in model.items():
        if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.is_complex()):
            continue
        if k.rsplit(".", 1)[-1] in _BUFFER_NAMES:
            continue
        if v.numel():
            sig = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
                   tuple(v.stride()))
            if sig in seen:
                continue  # a tied weight: named_parameters() lists it once
            seen.add(sig)
        out.append(k)
    return out


def _state_shape(st: Any) -> tuple[int, ...] | None:
    """The parameter shape the per-parameter optimizer state implies, if it does."""
    if not isinstance(st, Mapping):
        return None
    shapes = {tuple(v.shape) for k, v in st.items()
              if isinstance(v, torch.Tensor) and (v.dim() > 0 or k != "step")}
    return shapes.pop() if len(shapes) == 1 else None


def _align(ids: list[Any], shapes: dict[Any, tuple | None], cands: list[str],
           model: Mapping[str, Any]) -> list[str] | None:
    """The unique order-preserving assignment of ids to candidates that agrees with
    every known state shape, or None (none, or more than one)."""
    n, m = len(ids), len(cands)
    if n > m:
        return None
    width = m - n + 1  # candidate j = i + d for d in [0, width)
    if n * width > _MAX_ALIGN_CELLS:
        return None

    def ok(i: int, j: int) -> bool:
        s = shapes.get(ids[i])
        return s is None or tuple(model[cands[j]].shape) == s

    # ways[i][d]: assignments of ids[i:] into cands[i + d:], capped at 2.
    ways = [[0] * (width + 1) for _ in range(n + 1)]
    ways[n] = [1] * width + [0]
    for i in range(n - 1, -1, -1):
        row, nxt = ways[i], ways[i + 1]
        for d in range(width - 1, -1, -1):
            row[d] = min(2, row[d + 1] + (nxt[d] if ok(i, i + d) else 0))
    if ways[0][0] != 1:
        return None
    out, d = [], 0
    for i in range(n):
        while not (ok(i, i + d) and ways[i + 1][d]):
            d += 1
        out.append(cands[i + d])
    return out


def _optimizer(osd: Any, model: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """DCP-form optimizer state (FQNs), or (None, why not)."""
    if not (isinstance(osd, Mapping) and isinstance(osd.get("param_groups"), list)
            and isinstance(osd.get("state", {}), Mapping)):
        return None, "not a torch.optim state_dict (state, param_groups)"
    groups = osd["param_groups"]
    if not all(isinstance(g, Mapping) and isinstance(g.get("params"), list) for g in groups):
        return None, "param_groups without 'params' lists"
    ids = [p for g in groups for p in g["params"]]
    state = osd.get("state", {})
    if len(set(ids)) != len(ids):
        return None, "a parameter id is listed twice in param_groups"
    stray = [k for k in state if k not in set(ids)]
    if stray:
        return None, f"state for ids {stray[:5]} that no param_group lists"
    if all(isinstance(p, str) for p in ids):
        fqns = list(ids)  # already FQN-keyed (e.g. saved from get_optimizer_state_dict)
        missing = [p for p in fqns if p not in model]
        if missing:
            return None, f"parameters {missing[:3]} are not in the model state dict"
    else:
        cands = _param_candidates(model)
        fqns = _align(ids, {i: _state_shape(state.get(i)) for i in ids}, cands, model)
        if fqns is None:
            return None, (f"its {len(ids)} parameter ids do not align uniquely, by position and "
                          f"shape, with the {len(cands)} candidate parameters of the model state "
                          f"dict (the ids are assumed to follow model.named_parameters() order)")
    by_id = dict(zip(ids, fqns))
    new_groups, pos = [], 0
    for g in groups:
        k = len(g["params"])
        new_groups.append({**{a: b for a, b in g.items() if a != "params"},
                           "params": fqns[pos:pos + k]})
        pos += k
    return {"state": {by_id[i]: dict(st) for i, st in state.items()},
            "param_groups": new_groups}, ""


# ---------------------------------------------------------------- the mapping


def _as_state_dict(value: Any) -> Any:
    # A whole object (only with trust_pickle): its state_dict is what TrainState keeps.
    if not isinstance(value, Mapping) and callable(getattr(value, "state_dict", None)):
        return value.state_dict()
    return value


def _number(value: Any, kind: type) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number ({type(value).__name__})")
    return kind(value)


def import_train_state(obj: Any, *, key_map: KeyMap | None = None,
                       top: str = "train") -> LegacyImport:
    """Map a conventional training checkpoint (the loaded dict) to the TrainState layout."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"a training checkpoint is a dict of sections, not a "
                         f"{type(obj).__name__}")
    rest: dict[str, Any] = dict(obj)
    known = (MODEL_KEYS + OPTIM_KEYS + SCHEDULER_KEYS + SCALER_KEYS + EPOCH_KEYS + STEP_KEYS
             + BEST_KEYS + TORCH_RNG_KEYS + CUDA_RNG_KEYS + NUMPY_RNG_KEYS + PYTHON_RNG_KEYS)
    if (rest and not any(k in rest for k in known)
            and all(isinstance(v, torch.Tensor) for v in rest.values())):
        rest = {"state_dict": rest}  # a bare model state dict
    out = LegacyImport(state={})
    unplaced = out.unplaced

    def take(names: tuple[str, ...], section: str) -> tuple[str, Any] | None:
        """The first present (non-None) key of `names`; the others are duplicates."""
        hit = None
        for n in names:
            if n in rest:
                v = rest.pop(n)
                if v is None:
                    continue
                if hit is None:
                    hit = (n, v)
                else:
                    unplaced[n] = f"{section} already taken from {hit[0]!r}"
        if hit:
            out.placed[section] = hit[0]
        return hit

    ts: dict[str, Any] = {}
    model: dict[str, Any] = {}
    m = take(MODEL_KEYS, "model")
    if m is not None:
        msd = _as_state_dict(m[1])
        if isinstance(msd, Mapping) and all(isinstance(k, str) for k in msd):
            strip = model_names_map("")
            for k, v in msd.items():
                nk = strip(k)
                nk = key_map(nk) if key_map else nk
                if not nk:
                    continue
                if nk in model:
                    raise ValueError(f"model keys collide after mapping: {nk!r}; adjust "
                                     f"strip_prefix / rename")
                model[nk] = v
            ts["model"] = model
        else:
            unplaced[m[0]] = "not a state dict (str keys -> tensors)"
            del out.placed["model"]

    o = take(OPTIM_KEYS, "optimizer")
    if o is not None:
        optim, why = _optimizer(_as_state_dict(o[1]), model)
        if optim is None:
            unplaced[o[0]] = f"optimizer state not placed: {why}"
            del out.placed["optimizer"]
        else:
            ts["optim"] = optim
    for names, section in ((SCHEDULER_KEYS, "scheduler"), (SCALER_KEYS, "scaler")):
        s = take(names, section)
        if s is None:
            continue
        sd = _as_state_dict(s[1])
        if isinstance(sd, Mapping):
            ts[section] = dict(sd)
        else:
            unplaced[s[0]] = f"not a {section} state_dict"
            del out.placed[section]

    progress: dict[str, Any] = {"step": 0, "epoch": 0, "best_metric": None}
    for names, field_, kind in ((STEP_KEYS, "step", int), (EPOCH_KEYS, "epoch", int),
                                (BEST_KEYS, "best_metric", float)):
        p = take(names, field_)
        if p is None:
            continue
        try:
            progress[field_] = _number(p[1], kind)
        except ValueError as e:
            unplaced[p[0]] = f"{field_}: {e}"
            del out.placed[field_]
    ts["progress"] = progress
    ts["extra"] = {"json": "{}", "tensors": {}}
    ts["meta"] = {"shardckpt_version": library_version(), "torch_version": None,
                  "cuda_version": None, "world_size": 1, "base_seed": None}

    rng: dict[str, Any] = {}
    found: list[str] = []
    t = take(TORCH_RNG_KEYS, "rng.torch")
    if t is not None and isinstance(t[1], Mapping):
        # {"python": ..., "numpy": ..., "cpu"/"torch": ..., "cuda": ...} in one key.
        d = dict(t[1])
        parts = [("torch", d.pop("cpu", d.pop("torch", None))), ("numpy", d.pop("numpy", None)),
                 ("python", d.pop("python", None)), ("cuda", d.pop("cuda", None))]
        for name in d:
            unplaced[f"{t[0]}.{name}"] = "unknown RNG stream"
        sources = [(f"{t[0]}.{n}", n, v) for n, v in parts if v is not None]
    else:
        sources = [(t[0], "torch", t[1])] if t is not None else []
    for names, n in ((CUDA_RNG_KEYS, "cuda"), (NUMPY_RNG_KEYS, "numpy"),
                     (PYTHON_RNG_KEYS, "python")):
        h = take(names, f"rng.{n}")
        if h is not None:
            sources.append((h[0], n, h[1]))
    encoders = {"torch": _torch_rng, "cuda": _cuda_rng, "numpy": encode_numpy_rng,
                "python": encode_python_rng}
    for key, n, v in sources:
        out.placed.pop(f"rng.{n}", None)
        try:
            rng[n] = encoders[n](v)
            found.append(key)
        except (ValueError, TypeError) as e:
            unplaced[key] = f"{n} RNG state not recognised ({e})"
    if {"torch", "numpy", "python"} <= set(rng):
        ts["__rank0__"] = {"rng": rng}
        out.placed["rng"] = ", ".join(found)
    else:
        for key in found:
            # TrainState restores Python, NumPy and torch RNG together; without all
            # three it reseeds from the base seed instead, deterministically.
            unplaced[key] = ("RNG incomplete (needs python, numpy and torch states); a load "
                             "reseeds instead")

    for k in rest:
        unplaced[k] = "not a key of a conventional training checkpoint"
    out.state = {top: ts}
    return out


class LegacySource(Source):
    """A conventional torch.save training checkpoint, seen in the TrainState layout."""

    def __init__(self, path: str, *, trust_pickle: bool = False, key_map: KeyMap | None = None,
                 top: str = "train") -> None:
        from torch.distributed.checkpoint._nested_dict import flatten_state_dict

        self.path = path
        imp = import_train_state(load_torch_file(path, trust_pickle=trust_pickle),
                                 key_map=key_map, top=top)
        self.unplaced = imp.unplaced
        self.placed = imp.placed
        self.flat, mappings = flatten_state_dict(imp.state)
        self.planner_data = dict(mappings)
        self.entries = {k: (Entry(k, "tensor", v.dtype, tuple(v.shape))
                            if isinstance(v, torch.Tensor) else Entry(k, "object"))
                        for k, v in self.flat.items()}
        self.user_metadata = {"imported_from": os.path.basename(path),
                              "imported_sections": dict(imp.placed),
                              "unplaced": sorted(imp.unplaced)}
        if imp.unplaced:
            warnings.warn(
                f"{path}: {len(imp.unplaced)} key(s) could not be placed in the TrainState "
                f"layout and are not in the output: "
                + "; ".join(f"{k} ({why})" for k, why in sorted(imp.unplaced.items())),
                RuntimeWarning, stacklevel=3)

    def read_rows(self, key: str, start: int | None = None,
                  stop: int | None = None) -> torch.Tensor:
        t = self.flat[key]
        return t if start is None or t.dim() == 0 else t[start:stop]

    def read_object(self, key: str) -> Any:
        return self.flat[key]


__all__ = ["LegacyImport", "LegacySource", "import_train_state", "encode_numpy_rng",
           "encode_python_rng"]
