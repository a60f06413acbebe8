"""kill -9 of an incremental run: during a save, while retiring, while sweeping."""

from __future__ import annotations

import os

import pytest

from tests.workers import incremental as W

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("point,listed", [("data", [3, 4]), ("published", [4, 5]),
                                          ("lease", [3, 4]), ("retire", [5, 6]),
                                          ("sweep", [4, 5])])
def test_kill9_leaves_every_committed_checkpoint_loadable(tmp_path, point, listed):
    root, flag = str(tmp_path / "root"), str(tmp_path / "flag")
    W.run_until_parked(point, root, flag)
    steps = W.every_committed_checkpoint_loads(root)
    # "retire" parks after step 6 committed, before step 4 (still listed) is retired
    assert steps[-2:] == listed, steps
    # the next run of the manager (and gc) finish what the killed one left
    W.resume_after_kill(root, steps[-1])
    assert not [e for e in os.listdir(root) if ".partial-" in e or ".old-" in e]
    # the killed run's lease (its process is dead) protects nothing and is gone
    assert not os.listdir(os.path.join(root, ".readers"))
