"""Preemption signals: a flag for the next step boundary, and a way out if none comes.

The save a preemption asks for needs collectives, which must happen on every
rank at the same point of the loop, so the handler only sets a flag. A second
signal, or one that no step boundary answers within `grace_s`, is logged and
falls through to the previous handler (by default: the process ends), so a
process that stopped calling `step_boundary` still dies when told to.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from typing import Any

log = logging.getLogger("shardckpt")


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...], grace_s: float | None = 120.0) -> None:
        self.signum: int | None = None
        self.grace_s = grace_s
        self._prev: dict[int, Any] = {}
        self._timer: threading.Timer | None = None
        if not signals:
            return
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("CheckpointManager created outside the main thread: preemption "
                          "signals are not handled (Python only allows it in the main thread)",
                          RuntimeWarning, stacklevel=4)
            return
        for s in signals:
            self._prev[s] = signal.signal(s, self._on_signal)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self) -> None:
        self.signum = signal.SIGTERM

    def answered(self) -> None:
        """A step boundary acted on the signal: the fallback timer is not needed."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            log.warning("shardckpt: second %s; not waiting for a step boundary any longer",
                        signal.Signals(signum).name)
            self._fall_through(signum)
            return
        self.signum = signum
        log.warning("shardckpt: %s received; the checkpoint is saved at the next step boundary",
                    signal.Signals(signum).name)
        if self.grace_s is not None:
            self._timer = threading.Timer(self.grace_s, self._expired, args=(signum,))
            self._timer.daemon = True
            self._timer.start()

    def _expired(self, signum: int) -> None:
        log.warning("shardckpt: no step boundary within %.0f s of %s; ending the process",
                    self.grace_s, signal.Signals(signum).name)
        prev = self._prev.get(signum, signal.SIG_DFL)
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            prev(signum, None)
        elif prev != signal.SIG_IGN:
            # Handlers can only be changed on the main thread, which is stuck:
            # end the process as the default action would, with its exit status.
            os._exit(128 + signum)

    def _fall_through(self, signum: int) -> None:
        prev = self._prev.get(signum, signal.SIG_DFL)
        self.restore()
        if callable(prev) and prev not in (signal.SIG_DFL, signal.SIG_IGN):
            prev(signum, None)
            return
        if prev == signal.SIG_IGN:
            return
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def restore(self) -> None:
        self.answered()
        if threading.current_thread() is not threading.main_thread():
            return
        for s, h in self._prev.items():
            if signal.getsignal(s) == self._on_signal:
                signal.signal(s, h)
        self._prev.clear()
