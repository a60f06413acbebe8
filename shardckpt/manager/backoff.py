"""When the manager's incremental saves stop paying, and when to try them again."""

from __future__ import annotations

import logging

from ..format import Manifest
from ..io.base_index import manifest_items

log = logging.getLogger("shardckpt")

# An incremental save that references less than this share of its bytes does not
# pay for hashing every block (about as long as writing them raw on fast storage).
MIN_REFERENCED = 0.05


def referenced_fraction(m: Manifest) -> float:
    """Share of a manifest's raw bytes that lie in its bases (0 for a full checkpoint)."""
    total = referenced = 0
    for item in manifest_items(m):
        total += item.nbytes
        for r in item.refs:
            referenced += sum(b[1] for b in item.blocks[r.first:r.first + r.count])
    return referenced / total if total else 0.0


class BaseBackoff:
    """False from `worth` while incremental saves are not paying: one that referenced
    under MIN_REFERENCED of its bytes (everything trained) cost the hashing of every
    block for nothing, so the next saves are full, 1, 2, 4.. up to full_every of them
    after each such probe; one that referenced more resets the backoff."""

    def __init__(self, root: str, full_every: int) -> None:
        self.root = root
        self.full_every = full_every
        self._full_left = 0  # full saves still to make before the next incremental probe
        self._probe_gap = 1  # full saves after the next probe that references ~nothing

    def worth(self, prev: Manifest) -> bool:
        if self._full_left > 0:
            self._full_left -= 1
            return False
        manager = prev.user_metadata.get("manager")
        if not isinstance(manager, dict) or "chain" not in manager:
            return True  # saved without a base: the next one probes
        if referenced_fraction(prev) >= MIN_REFERENCED:
            self._probe_gap = 1
            return True
        self._full_left = self._probe_gap - 1
        self._probe_gap = min(2 * self._probe_gap, self.full_every)
        log.info("shardckpt: %s: the last incremental save referenced under %.0f %% of its "
                 "bytes; the next %d save(s) are full", self.root, 100 * MIN_REFERENCED,
                 self._full_left + 1)
        return False
