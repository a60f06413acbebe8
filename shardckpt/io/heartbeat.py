"""One thread per process that keeps every local save in flight marked alive.

A staging directory's mtime is its writer's heartbeat (commit.staging_abandoned
tells a stopped one from a live one): touched every HEARTBEAT_S while the save
runs. One shared thread, started with the first save, rather than one per save:
starting a thread cost ~0.2 ms of an incremental save's ~22 ms on the 2-core VM.
"""

from __future__ import annotations

import os
import threading


class Heartbeat:
    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._paths: set[str] = set()
        self._lock = threading.Lock()
        self._pid: int | None = None
        if hasattr(os, "register_at_fork"):
            # A fork while the thread holds the lock would leave the child's copy held.
            os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self._lock = threading.Lock()
        self._paths = set()
        self._pid = None

    def add(self, path: str) -> None:
        with self._lock:
            if self._pid != os.getpid():
                # First use, or a forked child: it has none of its parent's threads,
                # and none of its parent's saves to keep alive.
                self._pid = os.getpid()
                self._paths = set()
                threading.Thread(target=self._run, name="shardckpt-heartbeat",
                                 daemon=True).start()
            self._paths.add(path)

    def remove(self, path: str) -> None:
        with self._lock:
            self._paths.discard(path)

    def beat(self) -> None:
        """Touch every registered directory once; one that is gone stops being touched."""
        with self._lock:
            paths = list(self._paths)
        for p in paths:
            try:
                os.utime(p)
            except OSError:
                self.remove(p)

    def _run(self) -> None:
        pid = os.getpid()
        stop = threading.Event()  # never set: the thread sleeps between beats until exit
        while not stop.wait(self.period_s):
            if self._pid != pid:
                return
            self.beat()
