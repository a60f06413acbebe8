"""Suite-wide: the processes of a test session share no state with the user's machine."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_cache_dir(tmp_path_factory):
    # The storage probe's results are shared between the processes of a node through
    # SHARDCKPT_CACHE_DIR (io/probe.py); each pytest worker (and the processes it
    # spawns) gets its own, so tests that count probes see only their own.
    os.environ["SHARDCKPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("shardckpt-cache"))
    yield


@pytest.fixture(autouse=True, scope="module")
def _fresh_policy_per_module():
    # Saves in one process remember the compression rates the last save to the same
    # storage measured (io/policy.py); a module's shared checkpoint (built before any
    # of its tests) must not depend on which modules an xdist worker ran before it.
    from shardckpt.io import policy

    policy.forget()
    yield


@pytest.fixture(autouse=True)
def _fresh_policy():
    from shardckpt.io import policy

    policy.forget()
    yield
