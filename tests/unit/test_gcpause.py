"""The collector is paused inside a save/load and restored after it, whatever happened."""

from __future__ import annotations

import gc
import threading

import pytest

from shardckpt.gcpause import gc_paused


def test_paused_inside_restored_after_also_on_error():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the outer block still owns the restore
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_a_collector_the_user_disabled_stays_disabled():
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_background_threads_do_not_pause_it():
    seen = []

    def run() -> None:
        with gc_paused():
            seen.append(gc.isenabled())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen == [True] and gc.isenabled()
