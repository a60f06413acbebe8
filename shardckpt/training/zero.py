"""ZeRO-style sharded optimizers without consolidation: each rank saves what it owns."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .optim_state import placeholder_states

_PREFIXES = ("module.", "_orig_mod.")


def clean_name(name: str) -> str:
    """Parameter name without wrapper prefixes, so DDP/compile/plain checkpoints agree."""
    parts = [p for p in name.split(".") if p not in ("module", "_orig_mod")]
    return ".".join(parts)


class ZeroOptimizerState:
    """DCP `Stateful` for `torch.distributed.optim.ZeroRedundancyOptimizer`.

    Every rank contributes the state of the parameters it owns, keyed by
    parameter name (not by position), so nothing is gathered to rank 0 and the
    checkpoint loads under any world size: after a change each rank simply asks
    for the parameters it owns now.
    """

    def __init__(self, optimizer: Any, model: nn.Module) -> None:
        self.optimizer = optimizer
        self.names = {p: clean_name(n) for n, p in model.named_parameters()}
        self.by_name = {n: p for p, n in self.names.items()}
        # Names whose state the checkpoint about to be loaded holds (prepare_load).
        self._load_names: set[str] | None = None

    def _local(self) -> torch.optim.Optimizer:
        return self.optimizer.optim

    def prepare_load(self, checkpoint: str | os.PathLike | Iterable[str]) -> None:
        """The checkpoint (its path, or its keys) about to be loaded: placeholders are made
        for exactly the parameters whose state it holds. shardckpt.load calls this; with
        plain dcp.load call it first, or parameters with no state yet load none."""
        if isinstance(checkpoint, (str, os.PathLike)):
            from ..io.reader import read_manifest

            keys = read_manifest(checkpoint).keys()
        else:
            keys = list(checkpoint)
        # <top>.state.<name>.<field>: the name is what lies between (one pass over the keys;
        # a substring test per parameter and key took seconds for large models).
        stored = set()
        for k in keys:
            i = k.find(".state.")
            if i >= 0:
                stored.add(k[i + len(".state."):].rpartition(".")[0])
        self._load_names = stored & set(self.by_name)

    def state_dict(self) -> dict[str, Any]:
        local = self._local()
        if self._load_names is not None:
            placeholder_states(local, [p for g in local.param_groups for p in g["params"]
                                       if self.names[p] in self._load_names])
            self._load_names = None  # this load's one call; never again on a save
        state = {}
        for g in local.param_groups:
            for p in g["params"]:
                if p in local.state:  # a parameter never stepped has none, and saves none
                    state[self.names[p]] = dict(local.state[p])
        groups = []
        for g in self.optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params"}
                          | {"params": [self.names[p] for p in g["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self._load_names = None
        local = self._local()
        for name, st in sd["state"].items():
            p = self.by_name[name]
            local.state[p] = {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v)
                              for k, v in st.items()}
        for g, saved in zip(self.optimizer.param_groups, sd["param_groups"]):
            for k, v in saved.items():
                if k != "params":
                    g[k] = v
        for lg in local.param_groups:
            for g in self.optimizer.param_groups:
                for k in lg:
                    if k != "params" and k in g:
                        lg[k] = g[k]
