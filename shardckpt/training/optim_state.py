"""A TrainState's optimizer section: torch's optimizers through get/set_optimizer_state_dict,
ZeroRedundancyOptimizer through ZeroOptimizerState, and a load that asks only for the
parameter states the checkpoint holds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

_SECTION = ".optim.state."


def is_zero(optimizer: Any) -> bool:
    try:
        from torch.distributed.optim import ZeroRedundancyOptimizer
    except ImportError:  # torch built without distributed
        return False
    return isinstance(optimizer, ZeroRedundancyOptimizer)


def saved_param_states(keys: Iterable[str]) -> set[str]:
    """`<fqn>.<field>` of every optimizer state entry among a TrainState checkpoint's keys
    (`<top>.optim.state.<fqn>.<field>`)."""
    out = set()
    for k in keys:
        i = k.find(_SECTION)
        if i >= 0:
            out.add(k[i + len(_SECTION):])
    return out


def only_saved(osd: dict[str, Any], saved: set[str]) -> dict[str, Any]:
    """`osd` (a fresh optimizer's state dict, every parameter given a placeholder) without
    the parameters whose state the checkpoint does not hold: a parameter that had not been
    stepped at save time (an unused branch, an idle expert) stays without state, as it was,
    instead of being asked for keys that do not exist."""
    state = osd.get("state")
    if not isinstance(state, dict):
        return osd
    kept = {fqn: st for fqn, st in state.items()
            if not isinstance(st, dict) or any(f"{fqn}.{f}" in saved for f in st)}
    return {**osd, "state": kept}


def placeholder_states(optimizer: torch.optim.Optimizer, params: Iterable[Any]) -> None:
    """Give `params` (of `optimizer`, without state) a state to load into: a step with zero
    gradients and lr=0 on them alone. Only before a load, never on a save: a step also
    advances every parameter that holds a gradient (its step count, and its moments by
    that gradient), which would change the state being saved."""
    wanted = {p for p in params if p not in optimizer.state}
    if not wanted:
        return
    lrs = [(g, g["lr"]) for g in optimizer.param_groups]
    grads = {p: p.grad for g in optimizer.param_groups for p in g["params"]}
    try:
        for p in grads:
            p.grad = torch.zeros_like(p) if p in wanted else None
        for g, _ in lrs:
            g["lr"] = 0.0
        optimizer.step()
    finally:
        for g, lr in lrs:
            g["lr"] = lr
        for p, gr in grads.items():
            p.grad = gr


def prepare_plain_optimizer(key: str, optimizer: torch.optim.Optimizer,
                            keys: Iterable[str]) -> None:
    """Before `shardckpt.load(optimizer, path)`: a fresh optimizer's state_dict has no
    per-parameter entries, so the load would find every saved moment "unexpected".
    Placeholders for exactly the parameters (by index) whose state is stored under
    `key`."""
    pre = f"{key}.state."
    saved = {int(i) for k in keys if k.startswith(pre)
             and (i := k[len(pre):].split(".", 1)[0]).isdigit()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    placeholder_states(optimizer, [params[i] for i in sorted(saved) if i < len(params)])
