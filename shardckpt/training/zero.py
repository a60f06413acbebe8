"""ZeRO-style sharded optimizers without consolidation: each rank saves what it owns."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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

    def _local(self) -> torch.optim.Optimizer:
        return self.optimizer.optim

    def _ensure_state(self) -> None:
        # Placeholders must exist before a load: run one zero-gradient step with
        # lr=0 on parameters that have no state yet.
        local = self._local()
        todo = [p for g in local.param_groups for p in g["params"] if p not in local.state]
        if not todo:
            return
        saved = [(g, g["lr"]) for g in local.param_groups]
        grads = {p: p.grad for p in todo}
        for p in todo:
            p.grad = torch.zeros_like(p)
        for g, _ in saved:
            g["lr"] = 0.0
        local.step()
        for g, lr in saved:
            g["lr"] = lr
        for p, gr in grads.items():
            p.grad = gr

    def state_dict(self) -> dict[str, Any]:
        self._ensure_state()
        local = self._local()
        state = {}
        for g in local.param_groups:
            for p in g["params"]:
                state[self.names[p]] = dict(local.state[p])
        groups = []
        for g in self.optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params"}
                          | {"params": [self.names[p] for p in g["params"]]})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
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
