"""The writer process's side of io/writer_process.py, and the framing both sides use.

Messages are pickles with a length prefix on a Unix stream socket; an fd (a staging
arena's memfd) travels with SCM_RIGHTS on the message's tag byte. Only this
process's own helper is ever on the other end (a socketpair it was started with).
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import socket
import struct
import sys
import threading
from typing import Any

from ..errors import SaveFailedError

_LEN = struct.Struct("<Q")


def send_msg(sock: socket.socket, obj: Any, fd: int | None = None) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if fd is None:
        sock.sendall(b"M")
    else:
        socket.send_fds(sock, [b"F"], [fd])
    sock.sendall(_LEN.pack(len(body)) + body)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the socket")
        buf += chunk
    return bytes(buf)


def recv_msg(sock: socket.socket) -> tuple[Any, int | None]:
    tag, fds, _, _ = socket.recv_fds(sock, 1, 1)
    if not tag:
        raise EOFError("the other side closed the socket")
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return pickle.loads(_recv_exact(sock, n)), (fds[0] if fds else None)


# -- the helper's side ------------------------------------------------------------------

def _watch_parent(ppid: int) -> None:
    import time

    while True:
        time.sleep(0.5)
        if os.getppid() != ppid:  # the training process is gone (kill -9): stop writing
            os._exit(1)


def _write(arenas: dict, msg: dict) -> dict:
    from .data_writer import DataFileWriter
    from .storage import storage_for

    view = arenas[msg["key"]]
    path, rank = msg["path"], msg["rank"]
    payloads = ((view[p.offset:p.offset + p.nbytes] if p.inline is None else
                 memoryview(p.inline), p.group) for p in msg["pieces"])
    sink = storage_for(path, None).open_sink(path, rank)
    with DataFileWriter(sink, msg["rel"], msg["cfg"], msg["threads"], rank=rank,
                        adaptive=True, borrow=True) as out:
        records = out.append_many(payloads)
    return {"records": records, "size": out.size, "crc": out.crc, "raw_bytes": out.raw_bytes,
            "stats": out.codec_summary()}


def _portable(e: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any exception must reach the caller as a typed one
        return SaveFailedError(f"{type(e).__name__}: {e}")


def _every_thread(fn: Any) -> None:
    for tid in os.listdir("/proc/self/task"):
        try:
            fn(int(tid))
        except OSError:  # a CPU went away, the thread ended, or not permitted: never fatal
            pass


def serve() -> None:
    """The helper's main loop (argv: socket fd, parent pid; writer_boot applied the CPUs)."""
    from .. import codec

    # A Ctrl-C or a SIGTERM to the process group is the training process's to handle (the
    # manager's preemption save may still need this helper); it ends when its parent does.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    sock = socket.socket(fileno=int(sys.argv[1]))
    if os.environ.get("SHARDCKPT_WORKER_SCHED", "normal").lower() == "idle" and hasattr(
            os, "SCHED_IDLE"):
        # Safe here, unlike in the training process: a starved helper holds no GIL the
        # training thread waits for; it only delays its own save.
        _every_thread(lambda tid: os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0)))
    # writer_boot set this process's CPUs and nice (19) before any thread started; every
    # thread inherits them. The codec's own nice calls apply the same value in here.
    os.environ["SHARDCKPT_WORKER_NICE"] = str(max(0, int(os.environ.get(
        "SHARDCKPT_WRITER_NICE", "19"))))
    codec.lower_thread_priority(background=True)  # also marks it a background thread (pools)
    threading.Thread(target=_watch_parent, args=(int(sys.argv[2]),), daemon=True).start()
    maps: dict[Any, mmap.mmap] = {}
    arenas: dict[Any, memoryview] = {}
    send_msg(sock, "ready")
    while True:
        try:
            msg, fd = recv_msg(sock)
        except (EOFError, OSError):
            return
        try:
            if msg["op"] == "arena":
                maps[msg["key"]] = mmap.mmap(fd, max(1, msg["size"]), prot=mmap.PROT_READ)
                os.close(fd)
                arenas[msg["key"]] = memoryview(maps[msg["key"]])
                reply: dict = {}
            elif msg["op"] == "forget":
                arenas.pop(msg["key"], None)
                m = maps.pop(msg["key"], None)
                try:
                    if m is not None:
                        m.close()
                except BufferError:  # a view still alive: unmapped when it goes
                    pass
                reply = {}
            else:
                reply = _write(arenas, msg)
        except BaseException as e:  # noqa: BLE001 - every failure goes back to the caller
            reply = {"error": _portable(e)}
        try:
            send_msg(sock, reply)
        except OSError:
            return
