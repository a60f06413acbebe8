"""`TrainState`: everything needed to continue a training run exactly, as one DCP Stateful.

Layout of ``TrainState.state_dict()`` (DCP flattens it under the key the user
puts the TrainState at, e.g. ``{"train": ts}`` gives ``train.model.<fqn>``):

- ``model``, ``optim``: from ``torch.distributed.checkpoint.state_dict`` so keys
  carry no wrapper prefixes and FSDP2 shards stay DTensors (resharded on load).
- ``scheduler``, ``scaler``: their own (plain) state_dicts.
- ``progress``: step, epoch, best_metric. ``extra``: user values (JSON string +
  tensors). ``meta``: versions, world size, base seed. ``data``: loader position.
  These are replicated: every rank holds the same values and one copy is stored.
- ``__rank<r>__``: this rank's RNG states (Python, NumPy, torch CPU, every CUDA
  device) and its loader generator, as uint8 tensors. Each rank saves and loads
  only its own key; storage treats ``__rank<N>__`` keys as rank-local.

Step and epoch count completed units: resume continues with the next one.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import io
import json
import math
import os
import random
import struct
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.data import DataLoader, IterableDataset

from ..dcp.safety import weights_only_load
from ..errors import ShardckptError
from ..format.keys import RANK_KEY, rank_of_key
from .data_position import ResumableLoader
from .optim_state import is_zero, only_saved, saved_param_states
from .seed import base_seed, derive_seed
from .zero import ZeroOptimizerState

__all__ = ["TrainState", "RestoreMismatchError"]

# Header of the Python/NumPy RNG encodings: version-or-pos, has_gauss, gauss value.
_HDR = struct.Struct("<qqd")


class RestoreMismatchError(ShardckptError):
    """The check run after a restore gave a different value than at save time."""


def library_version() -> str:
    try:
        return importlib.metadata.version("shardckpt")
    except importlib.metadata.PackageNotFoundError:
        try:
            from .. import __version__
            return str(__version__)
        except ImportError:
            return "unknown"


def _bytes_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def encode_python_rng(state: Any = None) -> torch.Tensor:
    """A `random.getstate()` (default: the current one) in TrainState's encoding:
    a header (version, has_gauss, gauss) and the 625 Mersenne Twister words."""
    version, internal, gauss = random.getstate() if state is None else state
    if len(internal) != 625:
        raise ValueError("not a Mersenne Twister state")
    hdr = _HDR.pack(int(version), gauss is not None, 0.0 if gauss is None else float(gauss))
    return _bytes_tensor(hdr + np.asarray(internal, dtype="<u4").tobytes())


def _decode_python_rng(t: torch.Tensor) -> None:
    raw = t.numpy().tobytes()
    version, has_gauss, gauss = _HDR.unpack_from(raw)
    internal = tuple(int(x) for x in np.frombuffer(raw[_HDR.size:], dtype="<u4"))
    random.setstate((version, internal, gauss if has_gauss else None))


def encode_numpy_rng(state: Any = None) -> torch.Tensor:
    """An `np.random.get_state()` (default: the current one) in TrainState's encoding."""
    name, keys, pos, has_gauss, gauss = np.random.get_state() if state is None else state
    if name != "MT19937":
        raise ValueError(f"bit generator {name!r}, not MT19937")
    hdr = _HDR.pack(int(pos), int(has_gauss), float(gauss))
    return _bytes_tensor(hdr + np.asarray(keys, dtype="<u4").tobytes())


def _decode_numpy_rng(t: torch.Tensor) -> None:
    raw = t.numpy().tobytes()
    pos, has_gauss, gauss = _HDR.unpack_from(raw)
    keys = np.frombuffer(raw[_HDR.size:], dtype="<u4").astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, gauss))


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": encode_python_rng(),
        "numpy": encode_numpy_rng(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = {str(i): s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    _decode_python_rng(state["python"])
    _decode_numpy_rng(state["numpy"])
    torch.set_rng_state(state["torch"])
    for i, s in (state.get("cuda") or {}).items():
        torch.cuda.set_rng_state(s, device=int(i))


def _seed_new_rank(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _split_extra(extra: dict[str, Any]) -> tuple[str, dict[str, torch.Tensor]]:
    plain = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
    tensors = {k: v for k, v in extra.items() if isinstance(v, torch.Tensor)}
    try:
        # A single string leaf: restored even when the loading TrainState does not
        # know the keys yet (a dict placeholder would need every key present).
        text = json.dumps(plain, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"TrainState.extra values must be tensors or JSON-serialisable "
                        f"(int, float, str, bool, None, lists/dicts of these): {e}") from e
    return text, tensors


def _stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(
        getattr(obj, "load_state_dict", None))


def _own_state(loader: Any) -> Any:
    """The object whose state_dict() is the loader's position, if it keeps one itself."""
    if loader is None or isinstance(loader, ResumableLoader):
        return None
    if _stateful(loader):
        return loader
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, IterableDataset) and _stateful(dataset):
        return dataset
    return None


class TrainState:
    """Model, optimizer, scheduler, GradScaler, RNG, data position and counters of a run.

    Pass it to `shardckpt.save` / `shardckpt.load` inside the state dict, e.g.
    ``shardckpt.save({"train": ts}, path)``. Set ``ts.step`` (completed optimizer
    steps), ``ts.best_metric`` and ``ts.extra`` yourself; with a `dataloader`,
    iterate ``ts.dataloader`` (a `ResumableLoader`) and ``ts.epoch`` advances when
    an epoch runs to its end.

    At load time every key this object reports must exist in the checkpoint; tensor
    values in `extra` must be present (right shape) before loading, JSON values are
    restored regardless. When loading on more ranks than were saved, the new ranks
    must not ask for RNG keys that do not exist: `shardckpt.load` calls
    `prepare_load` for you; with plain `dcp.load` call `prepare_load(path)` first.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any = None, scaler: torch.amp.GradScaler | None = None,
                 dataloader: DataLoader | ResumableLoader | Any | None = None,
                 extra: dict[str, Any] | None = None, *,
                 options: StateDictOptions | None = None,
                 process_group: dist.ProcessGroup | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        # ZeRO shards its state over the ranks: each saves what it owns, by parameter name.
        self._zero = ZeroOptimizerState(optimizer, model) if is_zero(optimizer) else None
        # Optimizer entries the checkpoint about to be loaded holds (prepare_load).
        self._load_states: set[str] | None = None
        self._partial_optim = False  # the state_dict for that load left some out
        self.scheduler = scheduler
        self.scaler = scaler
        # A loader that carries its own state (torchdata's StatefulDataLoader, or one
        # over an IterableDataset with state_dict / load_state_dict) is saved per rank
        # as it describes itself; a plain DataLoader gets a ResumableLoader.
        self._loader_state = _own_state(dataloader)
        if self._loader_state is None and isinstance(dataloader, DataLoader):
            dataloader = ResumableLoader(dataloader)
        self.dataloader: Any = dataloader
        self._resumable: ResumableLoader | None = (
            dataloader if isinstance(dataloader, ResumableLoader) else None)
        self.extra: dict[str, Any] = dict(extra or {})
        self.step = 0
        self._epoch = 0
        self.best_metric: float | None = None
        self.options = options
        self.process_group = process_group
        # `meta` of the checkpoint last loaded (versions, world size, seed at save time).
        self.loaded_meta: dict[str, Any] | None = None
        # Ranks whose private keys exist in the checkpoint about to be loaded (set by
        # prepare_load, consumed by the next load); None: assume the current ranks.
        self._load_ranks: set[int] | None = None

    # -- counters ----------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Completed epochs (= index of the epoch in progress)."""
        return self._resumable.epoch if self._resumable is not None else self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        if self._resumable is not None:
            self._resumable.set_epoch(value)
        self._epoch = int(value)

    def update_best(self, value: float, mode: Literal["min", "max"] = "min") -> bool:
        """Record `value` if it beats `best_metric`; return whether it did."""
        better = (self.best_metric is None
                  or (value < self.best_metric if mode == "min" else value > self.best_metric))
        if better:
            self.best_metric = float(value)
        return better

    def _rank_world(self) -> tuple[int, int]:
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)
        return 0, 1

    # -- Stateful ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        rank, world = self._rank_world()
        sd: dict[str, Any] = {"model": get_model_state_dict(self.model, options=self.options)}
        if self._zero is not None:
            sd["optim"] = self._zero.state_dict()
        elif self.optimizer is not None:
            sd["optim"] = get_optimizer_state_dict(self.model, self.optimizer,
                                                   options=self.options)
            if self._load_states is not None:
                full = len(sd["optim"].get("state") or ())
                sd["optim"] = only_saved(sd["optim"], self._load_states)
                self._partial_optim = len(sd["optim"].get("state") or ()) < full
                # Consumed by this load's one state_dict() call: a save after a load that
                # failed must not leave out parameters that checkpoint lacked.
                self._load_states = None
        if self.scheduler is not None:
            sd["scheduler"] = self.scheduler.state_dict()
        if self.scaler is not None:
            sd["scaler"] = self.scaler.state_dict()
        sd["progress"] = {"step": int(self.step), "epoch": int(self.epoch),
                          "best_metric": self.best_metric}
        text, tensors = _split_extra(self.extra)
        sd["extra"] = {"json": text, "tensors": tensors}
        sd["meta"] = {
            "shardckpt_version": library_version(),
            "torch_version": str(torch.__version__),
            "cuda_version": torch.version.cuda,
            "world_size": world,
            "base_seed": base_seed(),
        }
        if self._resumable is not None:
            sd["data"] = self._resumable.position()
        if self._load_ranks is None or rank in self._load_ranks:
            mine: dict[str, Any] = {"rng": _rng_state()}
            if self._resumable is not None:
                mine["loader_generator"] = self._resumable.generator_state()
            if self._loader_state is not None:
                # One opaque value: the loader's state changes shape as it iterates
                # (worker states appear), which a key-by-key strict load would refuse.
                buf = io.BytesIO()
                torch.save(self._loader_state.state_dict(), buf)
                mine["loader_state"] = io.BytesIO(buf.getvalue())
            sd[RANK_KEY.format(rank)] = mine
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Sections absent from `state_dict` are left as they are, so a partial dict
        # (e.g. torch.load of an older layout) can still be applied.
        self._load_ranks = self._load_states = None
        rank, world = self._rank_world()
        if "model" in state_dict:
            set_model_state_dict(self.model, state_dict["model"], options=self.options)
        if "optim" in state_dict and self._zero is not None:
            self._zero.load_state_dict(state_dict["optim"])
        elif "optim" in state_dict and self.optimizer is not None:
            # Parameters saved without state (never stepped) are loaded without one: torch
            # refuses that unless told it is meant.
            opts = (dataclasses.replace(self.options or StateDictOptions(), strict=False)
                    if self._partial_optim else self.options)
            self._partial_optim = False
            set_optimizer_state_dict(self.model, self.optimizer, state_dict["optim"],
                                     options=opts)
        if "scheduler" in state_dict and self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
        if "scaler" in state_dict and self.scaler is not None:
            self.scaler.load_state_dict(state_dict["scaler"])
        if "extra" in state_dict:
            self.extra.update(json.loads(state_dict["extra"]["json"]))
            self.extra.update(state_dict["extra"].get("tensors", {}))
        meta = state_dict.get("meta") or {}
        self.loaded_meta = dict(meta)
        saved_world = int(meta.get("world_size", world))
        seed = meta.get("base_seed")
        seed = int(seed) if seed is not None else (base_seed() or 0)
        mine = state_dict.get(RANK_KEY.format(rank)) or {}

        if "progress" in state_dict:
            p = state_dict["progress"]
            self.step = int(p["step"])
            self._epoch = int(p["epoch"])
            self.best_metric = p["best_metric"]
        if "loader_state" in mine and self._loader_state is not None:
            blob = mine["loader_state"]
            data = blob.getvalue() if isinstance(blob, io.BytesIO) else bytes(blob)
            self._loader_state.load_state_dict(weights_only_load(io.BytesIO(data)))
        if "data" in state_dict and self._resumable is not None:
            self._resumable.load_position(state_dict["data"], mine.get("loader_generator"),
                                          new_rank_seed=derive_seed(seed, rank) + 1)

        if saved_world != world:
            warnings.warn(
                f"resuming a checkpoint saved at world size {saved_world} on {world} ranks: "
                f"parameters and optimizer state are resharded exactly and the data position "
                f"continues with the samples not yet consumed, but ranks "
                f"{'0..' + str(min(saved_world, world) - 1)} keep their RNG streams and any "
                f"new ranks derive theirs from the base seed, so the run will not be bitwise "
                f"identical to one that kept {saved_world} ranks.",
                RuntimeWarning, stacklevel=2)
        # RNG last: nothing after it may draw random numbers before training resumes.
        if "rng" in mine:
            _set_rng_state(mine["rng"])
        elif "meta" in state_dict:
            _seed_new_rank(derive_seed(seed, rank))

    # -- loading on a larger world ---------------------------------------------------

    def prepare_load(self, checkpoint: str | os.PathLike | Iterable[str]) -> set[int]:
        """Look up which ranks' private state the checkpoint holds, so that the next
        load asks only for keys that exist. Needed when the world size grew.

        `checkpoint` is a shardckpt checkpoint path, or the checkpoint's keys.
        Returns the saved ranks.
        """
        if isinstance(checkpoint, (str, os.PathLike)):
            from ..io.reader import read_manifest
            keys: Iterable[str] = read_manifest(checkpoint).keys()
        else:
            keys = list(checkpoint)
        ranks = {r for k in keys if (r := rank_of_key(k)) is not None}
        self._load_ranks = ranks
        self._load_states = saved_param_states(keys)
        if self._zero is not None:
            self._zero.prepare_load(keys)
        return ranks

    # -- optional check --------------------------------------------------------------

    def verify_after_restore(self, fn: Callable[[], float | torch.Tensor], expected: float, *,
                             rtol: float = 1e-6, atol: float = 0.0,
                             on_mismatch: Literal["raise", "warn"] = "raise") -> float:
        """Run `fn` (e.g. a validation loss) and compare it to `expected`, the value
        measured before saving. A difference beyond ``atol + rtol*|expected|`` raises
        `RestoreMismatchError` or warns, per `on_mismatch`. Returns the value."""
        if on_mismatch not in ("raise", "warn"):
            raise ValueError(f"on_mismatch must be 'raise' or 'warn', not {on_mismatch!r}")
        got = fn()
        value = float(got.item() if isinstance(got, torch.Tensor) else got)
        if not math.isclose(value, float(expected), rel_tol=rtol, abs_tol=atol):
            msg = (f"check after restore gave {value!r}, expected {float(expected)!r} "
                   f"(rtol={rtol}, atol={atol}): the restored state differs from the saved one")
            if on_mismatch == "raise":
                raise RestoreMismatchError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=2)
        return value
