"""A TrainState's optimizer section: torch's optimizers through get/set_optimizer_state_dict,
ZeroRedundancyOptimizer through ZeroOptimizerState, and a load that asks only for the
parameter states the checkpoint holds."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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
