"""A helper process that encodes, writes and fsyncs an async save's data files.

An async save's background thread shares the training process: its Python work
takes the GIL from the training thread and its threads land on the training
core. Measured on a 2-core VM (benchmarks/train_slowdown.py, one training
thread): steps +21-36 % slower with the thread, +2-12 % with the same saves
made by a separate process (each step's run-queue and GIL waits are gone). So an async save stages into a memfd arena this
process and the helper both map, and the helper does the byte work of the
rank's data file; planning, the collectives and the commit stay in the training
process (they need its process group, and they are a small part of the time).

One helper per training process, started by the first async save that needs it,
kept for the process's life (the start costs an interpreter, 0.3 s: it never
imports torch, see io/writer_boot.py). It exits when this process goes away (the socket closes, or its parent
changes). SHARDCKPT_ASYNC_WRITER: "auto" (default: the helper for a data file of
at least 16 MiB), "process" (always), "thread" (never: the background thread
writes, as before).
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import SaveFailedError
from .writer_serve import recv_msg, send_msg

log = logging.getLogger("shardckpt")

# Below this many tensor bytes in a rank's file the helper saves less than its start costs.
AUTO_MIN_BYTES = 16 << 20
# Items not in the arena (DCP's own bytes items, a copy the planner made) go inline up to this.
_INLINE_MAX = 1 << 20
# How long the helper may take to start (an interpreter and numpy on a very busy node).
_START_TIMEOUT_S = 120.0


class HelperUnavailable(RuntimeError):
    """The helper could not be started: the calling thread writes the file itself."""


def mode() -> str:
    """"auto", "process" or "thread" (SHARDCKPT_ASYNC_WRITER); "thread" where memfd is missing."""
    m = os.environ.get("SHARDCKPT_ASYNC_WRITER", "auto").strip().lower() or "auto"
    if m not in ("auto", "process", "thread"):
        raise ValueError(f"SHARDCKPT_ASYNC_WRITER={m!r}: use auto, process or thread")
    if not hasattr(os, "memfd_create") or not hasattr(socket, "send_fds"):
        return "thread"
    return m


# -- the arena both processes map ---------------------------------------------------

class SharedArena:
    """Bytes backed by a memfd: this process writes the snapshot into them, the helper
    reads them (the fd travels over the helper's socket)."""

    _serial = 0

    def __init__(self, size: int) -> None:
        import torch

        SharedArena._serial += 1
        self.key = (os.getpid(), SharedArena._serial)
        self.size = size
        self.fd = os.memfd_create("shardckpt-staging", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(1, size))
            self._map = mmap.mmap(self.fd, max(1, size))
        except OSError:
            os.close(self.fd)
            raise
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8, count=size) if size else \
            torch.empty(0, dtype=torch.uint8)
        self.base = self.tensor.data_ptr()

    def locate(self, t: Any) -> int | None:
        """Offset of a contiguous CPU tensor's bytes in the arena, or None if it is not in it."""
        if not t.is_cpu or not t.is_contiguous():
            return None
        off = t.data_ptr() - self.base
        n = t.numel() * t.element_size()
        return off if 0 <= off and off + n <= self.size else None

    def __del__(self) -> None:
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass


_offload = threading.local()


class offload:
    """Within this block, the calling thread's saves may hand their data file to the
    helper when its tensors are in `arena` (async_save's background thread)."""

    def __init__(self, arena: SharedArena | None) -> None:
        self.arena = arena

    def __enter__(self) -> None:
        _offload.arena = self.arena

    def __exit__(self, *exc: Any) -> None:
        _offload.arena = None


def current_arena() -> SharedArena | None:
    return getattr(_offload, "arena", None)


@dataclass(frozen=True)
class Piece:
    """One item of a file to write: `offset` into the arena, or its bytes inline."""

    offset: int | None
    nbytes: int
    group: int
    inline: bytes | None = None


def pieces_for(arena: SharedArena, payloads: Sequence[tuple[Any, int]],
               min_arena_bytes: int = 0) -> list[Piece] | None:
    """The file's items as arena references, or None if a large one lies outside the arena
    or fewer than `min_arena_bytes` lie in it (then the calling thread writes the file
    itself). Items outside the arena are copied only once the file is known to qualify."""
    import torch

    out: list[Piece | tuple[Any, int]] = []
    in_arena = 0
    for data, group in payloads:
        if torch.is_tensor(data):
            off = arena.locate(data)
            n = data.numel() * data.element_size()
            if off is not None:
                out.append(Piece(off, n, group))
                in_arena += n
                continue
        else:
            n = memoryview(data).nbytes
        if n > _INLINE_MAX:
            return None
        out.append((data, group))
    if in_arena < min_arena_bytes:
        return None
    from .tensor_bytes import tensor_bytes

    pieces = []
    for p in out:
        if not isinstance(p, Piece):
            raw = bytes(tensor_bytes(p[0]) if torch.is_tensor(p[0]) else p[0])
            p = Piece(None, len(raw), p[1], raw)
        pieces.append(p)
    return pieces


# -- this process's side ----------------------------------------------------------------

class WriterProcess:
    """The training process's handle on its helper; one request at a time."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from .. import codec

        cpus = codec.writer_cpus()
        env = dict(os.environ)
        # The same shardckpt as ours, whatever sys.path the training script built.
        env["PYTHONPATH"] = os.pathsep.join([pkg_root, *filter(None, [env.get("PYTHONPATH")])])
        try:
            self.proc = subprocess.Popen(
                [sys.executable, os.path.join(os.path.dirname(__file__), "writer_boot.py"),
                 str(child.fileno()), str(os.getpid()),
                 ",".join(map(str, sorted(cpus or ())))],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            parent.close()
            raise HelperUnavailable(f"cannot start {sys.executable}: {e}") from None
        finally:
            child.close()
        self.sock = parent
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.arenas: set[tuple[int, int]] = set()
        self.stale: list[tuple[int, int]] = []  # arenas replaced since the last request
        self.ready = False

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.proc.poll() is None

    def _greet(self) -> None:
        """Wait for the helper's imports; HelperUnavailable if it cannot start."""
        self.sock.settimeout(_START_TIMEOUT_S)
        try:
            hello, _ = recv_msg(self.sock)
        except (EOFError, OSError, pickle.PickleError) as e:
            self.close()
            raise HelperUnavailable(f"the writer process did not start ({e})") from None
        finally:
            self.sock.settimeout(None)
        if hello != "ready":
            self.close()
            raise HelperUnavailable(f"the writer process said {hello!r}")
        self.ready = True

    def _call(self, msg: dict, fd: int | None = None) -> Any:
        send_msg(self.sock, msg, fd)
        reply, _ = recv_msg(self.sock)
        return reply

    def write_file(self, arena: SharedArena, *, path: str, rel: str, rank: int, cfg: Any,
                   threads: int | None, pieces: list[Piece]) -> dict:
        """Encode `pieces` into the data file `path` in the helper; its records and totals."""
        with self.lock:
            if not self.ready:
                self._greet()
            try:
                while self.stale:
                    key = self.stale.pop()
                    if key in self.arenas:
                        self.arenas.discard(key)
                        self._call({"op": "forget", "key": key})
                if arena.key not in self.arenas:
                    got = self._call({"op": "arena", "key": arena.key, "size": arena.size},
                                     arena.fd)
                    if "error" in got:  # e.g. ENOMEM under an address-space limit
                        raise HelperUnavailable(
                            f"the writer process cannot map the staging arena: {got['error']}")
                    self.arenas.add(arena.key)
                reply = self._call({"op": "write", "key": arena.key, "path": path, "rel": rel,
                                    "rank": rank, "cfg": cfg, "threads": threads,
                                    "pieces": pieces})
            except (EOFError, OSError, pickle.PickleError) as e:
                how = self._how_it_ended(e)
                self.close()
                raise SaveFailedError(
                    f"{path} (rank {rank}): the background writer process (pid "
                    f"{self.proc.pid}) {how} during the save; nothing was committed and "
                    "earlier checkpoints are intact. The next async save starts a new one; "
                    "if it was killed for memory (dmesg), lower SHARDCKPT_THREADS or save "
                    "less at once.") from None
        if "error" in reply:
            raise reply["error"]
        return reply

    def _how_it_ended(self, e: BaseException) -> str:
        try:  # its socket closes a moment before it can be reaped
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return f"stopped answering ({e})"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"

    def forget(self, key: tuple[int, int]) -> None:
        """The arena `key` was replaced by a larger one: the helper unmaps it with the next
        request (never waited for here: the caller is the training thread)."""
        self.stale.append(key)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
        if self.pid == os.getpid() and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


_helper: WriterProcess | None = None
_helper_lock = threading.Lock()
_unavailable: str | None = None  # why a helper could not be started here (then: threads)


def helper() -> WriterProcess:
    """This process's helper, started (again) if there is none or it died."""
    global _helper
    with _helper_lock:
        if _unavailable is not None:
            raise HelperUnavailable(_unavailable)
        if _helper is None or not _helper.alive():
            if _helper is not None and _helper.pid == os.getpid():
                _helper.close()
            _helper = WriterProcess()
        return _helper


def prestart(nbytes: int) -> None:
    """Start the helper ahead of a save of `nbytes` that will likely use it (no wait)."""
    how = mode()
    if how == "thread" or (how == "auto" and nbytes < AUTO_MIN_BYTES):
        return
    try:
        helper()
    except HelperUnavailable as e:
        give_up(str(e))


def give_up(why: str) -> None:
    """No helper in this process from now on; said once in the log."""
    global _unavailable
    if _unavailable is None:
        log.warning("shardckpt: async saves write from a thread of this process: %s", why)
    _unavailable = why


def forget(key: tuple[int, int]) -> None:
    h = _helper
    if h is not None and h.alive():
        h.forget(key)


def _after_fork() -> None:
    # The parent's helper serves the parent; a forked child starts its own if it needs one.
    global _helper, _unavailable
    if _helper is not None:
        try:  # the child's copy only; the parent's socket stays open
            _helper.sock.close()
        except OSError:
            pass
    _helper, _unavailable = None, None


os.register_at_fork(after_in_child=_after_fork)
