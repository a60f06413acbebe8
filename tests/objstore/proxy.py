"""A fault-injecting HTTP proxy on 127.0.0.1, between the S3 client and the server.

It reads each request's head (and Content-Length body) itself, so faults are per
request, not per connection: answer 503 SlowDown, drop the connection halfway
through a request body (a reset mid-upload), or delay the response. `faults` is
a list of (predicate on "METHOD target", action) consulted in order; each rule
fires `times` times. Bounded: every socket has a timeout and the server thread
stops with `close()`.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class Rule:
    match: str  # substring of "METHOD /bucket/key?query"
    action: str  # "503", "drop", "slow"
    times: int = 1
    delay: float = 0.0
    fired: int = 0


class FaultProxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str]] = []  # (request line, action taken)
        self._lock = threading.Lock()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self._sock.settimeout(0.2)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def add(self, match: str, action: str, times: int = 1, delay: float = 0.0) -> Rule:
        r = Rule(match, action, times, delay)
        with self._lock:
            self.rules.append(r)
        return r

    def _pick(self, line: str) -> Rule | None:
        with self._lock:
            for r in self.rules:
                if r.fired < r.times and r.match in line:
                    r.fired += 1
                    return r
        return None

    def close(self) -> None:
        self._stop.set()
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self._sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._conn, args=(c,), daemon=True).start()

    def _conn(self, c: socket.socket) -> None:
        c.settimeout(30)
        try:
            u = socket.create_connection(self.upstream, timeout=30)
        except OSError:
            c.close()
            return
        pending = bytearray()
        back = threading.Thread(target=self._pipe_back, args=(u, c), daemon=True)
        back.start()
        try:
            while not self._stop.is_set():
                while b"\r\n\r\n" not in pending:
                    d = c.recv(1 << 16)
                    if not d:
                        return
                    pending += d
                head, _, rest = bytes(pending).partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                hdr = {k.strip().lower(): v.strip() for k, _, v in
                       (h.partition(":") for h in lines[1:])}
                if "content-length" not in hdr and "transfer-encoding" in hdr:
                    u.sendall(bytes(pending))  # not ours to parse: relay the rest as is
                    pending.clear()
                    while (d := c.recv(1 << 16)):
                        u.sendall(d)
                    return
                n = int(hdr.get("content-length", 0))
                rule = self._pick(lines[0])
                self.log.append((lines[0], rule.action if rule else "pass"))
                if rule is not None and rule.action == "503":
                    body = (b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
                            b"<Message>Please reduce your request rate.</Message></Error>")
                    c.sendall(b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                              b"Connection: close\r\nContent-Length: " + str(len(body)).encode()
                              + b"\r\n\r\n" + body)
                    return
                if rule is not None and rule.action == "slow":
                    time.sleep(rule.delay)  # the answer comes late: a client read timeout
                u.sendall(head + b"\r\n\r\n")
                body = bytearray(rest)
                if rule is not None and rule.action == "drop":
                    want = max(1, n // 2)
                    while len(body) < want:
                        d = c.recv(1 << 16)
                        if not d:
                            break
                        body += d
                    u.sendall(bytes(body[:want]))
                    return  # both sides see the connection vanish mid-body
                while len(body) < n:
                    d = c.recv(min(1 << 20, n - len(body)))
                    if not d:
                        return
                    body += d
                u.sendall(bytes(body[:n]))
                pending = bytearray(body[n:])
        except OSError:
            pass
        finally:
            for s in (c, u):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _pipe_back(self, u: socket.socket, c: socket.socket) -> None:
        try:
            while (d := u.recv(1 << 16)):
                c.sendall(d)
        except OSError:
            pass
        finally:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
