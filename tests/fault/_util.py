"""Helpers of the fault suite: small real checkpoints, manifest surgery, timeouts, subprocesses."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

import shardckpt
from shardckpt.format.manifest import content_checksum

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable


def make_state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(64, 32, generator=g),
        "h": torch.randn(300, generator=g).bfloat16(),
        "i": torch.randint(-1000, 1000, (257,), generator=g),
        "s": torch.tensor(float(seed) + 0.5),
        "meta": {"step": seed, "name": f"run-{seed}"},
    }


def zeros_like(state: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out[k] = zeros_like(v)
        elif torch.is_tensor(v):
            out[k] = torch.zeros_like(v)
        else:
            out[k] = None
    return out


def equal(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return (torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.view(torch.uint8) if a.dim() else a, b.view(torch.uint8)
                                if b.dim() else b))
    return bool(a == b)


def save_ckpt(path: str | os.PathLike, seed: int = 0, **kw: Any) -> dict[str, Any]:
    state = make_state(seed)
    kw.setdefault("block_size", 256)
    shardckpt.save(state, os.fspath(path), **kw)
    return state


def load_fresh(path: str | os.PathLike, like: dict[str, Any], **kw: Any) -> dict[str, Any]:
    out = zeros_like(like)
    shardckpt.load(out, os.fspath(path), **kw)
    return out


def read_manifest_json(ckpt: str | os.PathLike) -> dict:
    with open(os.path.join(ckpt, "manifest.json"), "rb") as f:
        return json.loads(f.read())


def write_manifest_json(ckpt: str | os.PathLike, m: dict, *, resum: bool = True) -> None:
    """Write a tampered manifest, re-summed as an attacker would (unless resum=False)."""
    if resum:
        m["checksum"] = content_checksum(m)
    with open(os.path.join(ckpt, "manifest.json"), "wb") as f:
        f.write(json.dumps(m, separators=(",", ":")).encode())


def rename_data_file(m: dict, old: str, new: str) -> None:
    """Change a data file's name everywhere the manifest mentions it."""
    m["files"][new] = m["files"].pop(old)
    for t in m["tensors"].values():
        for c in t["chunks"]:
            if c["file"] == old:
                c["file"] = new
    for o in m["objects"].values():
        if o["file"] == old:
            o["file"] = new


class Hung(AssertionError):
    pass


def within(seconds: float, fn: Callable[[], Any], *, unblock: Callable[[], None] | None = None
           ) -> Any:
    """fn() in a daemon thread; fail (Hung) if it takes longer than `seconds`.

    `unblock` is called on a hang so that the stuck thread can finish (e.g. by
    opening the other end of a FIFO)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(seconds)
    if th.is_alive():
        if unblock is not None:
            with contextlib.suppress(Exception):
                unblock()
        raise Hung(f"{fn} did not return within {seconds}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def fifo_unblocker(path: str) -> Callable[[], None]:
    def unblock() -> None:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
    return unblock


def run_py(code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    full_env.update(env or {})
    return subprocess.run([PY, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return run_py("import sys; from shardckpt.cli import main; sys.exit(main(sys.argv[1:]))",
                  *args, timeout=timeout)


@contextlib.contextmanager
def tmpfs(path: str, *opts: str) -> Iterator[str]:
    """A private tmpfs mounted at `path` (pytest.skip where mounting is not permitted)."""
    import pytest

    os.makedirs(path, exist_ok=True)
    options = ",".join(opts) if opts else "size=16m"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs CAP_SYS_ADMIN")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], capture_output=True)


def remount(path: str, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", path], check=True, capture_output=True)


def dead_pid() -> int:
    p = subprocess.Popen([PY, "-c", "pass"])
    p.wait()
    return p.pid


def leftovers(parent: str | os.PathLike) -> list[str]:
    return sorted(e for e in os.listdir(parent) if ".partial-" in e or ".old-" in e)


def kill9_when_parked(module_args: list[str], flag: str | os.PathLike,
                      timeout: float = 180) -> None:
    """Run `python -m MODULE ARGS...` and SIGKILL it once it touches `flag` (it parks
    there, at the point under test)."""
    import signal
    import time

    import pytest

    proc = subprocess.Popen([PY, "-m", *module_args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while not os.path.exists(flag):
            if proc.poll() is not None:
                pytest.fail(f"child exited early: {proc.stdout.read().decode()}")
            assert time.time() < deadline, "child never reached the kill point"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
