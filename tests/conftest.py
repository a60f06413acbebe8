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
