"""Issue 17, item 8: failing writes give typed errors naming the path, and lose nothing.

Long names, a failing staging creation, leftovers of killed saves, a full disk
(a small tmpfs) and EIO from write()/fsync() (an LD_PRELOAD shim built here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

import shardckpt
from shardckpt.errors import InsufficientSpaceError, SaveFailedError, ShardckptError
from shardckpt.format.names import MAX_NAME_LEN

from ._util import PY, REPO, equal, leftovers, load_fresh, make_state, run_py, save_ckpt, tmpfs


@pytest.mark.parametrize("n", [MAX_NAME_LEN + 1, 240, 250, 255, 256, 300])
def test_long_names_fail_typed_before_anything_is_written(tmp_path, n):
    parent = tmp_path / "p"
    parent.mkdir()
    path = str(parent / ("n" * n))
    with pytest.raises(SaveFailedError) as ei:
        shardckpt.save(make_state(0), path)
    assert path in str(ei.value) and "name" in str(ei.value)
    assert os.listdir(parent) == []


def test_longest_allowed_name_saves_and_loads(tmp_path):
    path = str(tmp_path / ("n" * MAX_NAME_LEN))
    like = save_ckpt(path)
    assert equal(load_fresh(path, like), like)
    save_ckpt(path, 1)  # an overwrite needs the trash/staging names to fit too
    assert equal(load_fresh(path, make_state(1)), make_state(1))
    assert leftovers(tmp_path) == []


def test_multibyte_long_name_counts_bytes(tmp_path):
    path = str(tmp_path / ("é" * (MAX_NAME_LEN // 2 + 1)))  # 2 bytes each: over the limit
    with pytest.raises(SaveFailedError):
        shardckpt.save(make_state(0), path)
    assert os.listdir(tmp_path) == []


def _big_state(mib: float, seed: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(int(mib * 2**20) // 4, generator=g)}  # incompressible


def test_enospc_keeps_the_previous_checkpoint(tmp_path):
    mnt = str(tmp_path / "small")
    with tmpfs(mnt, "size=2m"):
        path = os.path.join(mnt, "ck")
        like = save_ckpt(path)
        for target in (path, os.path.join(mnt, "other")):
            with pytest.raises(InsufficientSpaceError) as ei:
                shardckpt.save(_big_state(3), target)
            assert target in str(ei.value), ei.value
            assert leftovers(mnt) == [], os.listdir(mnt)
            assert not os.path.exists(os.path.join(mnt, "other"))
            assert equal(load_fresh(path, like), like)
            shardckpt.verify(path)


def test_full_disk_at_staging_creation_leaves_no_partial(tmp_path):
    mnt = str(tmp_path / "full")
    with tmpfs(mnt, "size=1m", "nr_inodes=64"):
        path = os.path.join(mnt, "ck")
        like = save_ckpt(path)
        fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT)
        try:  # every block taken
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        with pytest.raises(InsufficientSpaceError) as ei:
            shardckpt.save(make_state(1), path)
        assert path in str(ei.value)
        assert leftovers(mnt) == [], os.listdir(mnt)
        assert equal(load_fresh(path, like), like)


def test_read_only_parent_gives_typed_error(tmp_path):
    mnt = str(tmp_path / "ro")
    with tmpfs(mnt, "size=4m"):
        path = os.path.join(mnt, "ck")
        like = save_ckpt(path)
        subprocess.run(["mount", "-o", "remount,ro", mnt], check=True)
        with pytest.raises(SaveFailedError) as ei:
            shardckpt.save(make_state(1), path)
        assert path in str(ei.value)
        with pytest.raises(SaveFailedError):
            shardckpt.save(make_state(1), os.path.join(mnt, "new"))
        assert equal(load_fresh(path, like), like)


_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static long long used = 0;

static int under_prefix(int fd) {
    const char *prefix = getenv("EIO_PREFIX");
    char link[64], target[4096];
    if (!prefix || !*prefix) return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, target, sizeof target - 1);
    if (n < 0) return 0;
    target[n] = 0;
    return strncmp(target, prefix, strlen(prefix)) == 0;
}

static int over(int fd, size_t n) {
    const char *after = getenv("EIO_AFTER");
    if (!after || !under_prefix(fd)) return 0;
    if (used + (long long)n > atoll(after)) return 1;
    used += n;
    return 0;
}

static int fsync_fails(int fd) {
    const char *f = getenv("EIO_FSYNC");
    return f && *f == '1' && under_prefix(fd);
}

#define REAL(name, ret, ...) static ret (*real_##name)(__VA_ARGS__); \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name)

ssize_t write(int fd, const void *b, size_t n) {
    REAL(write, ssize_t, int, const void *, size_t);
    if (over(fd, n)) { errno = EIO; return -1; }
    return real_write(fd, b, n);
}
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite, ssize_t, int, const void *, size_t, off_t);
    if (over(fd, n)) { errno = EIO; return -1; }
    return real_pwrite(fd, b, n, o);
}
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) {
    REAL(pwrite64, ssize_t, int, const void *, size_t, off_t);
    if (over(fd, n)) { errno = EIO; return -1; }
    return real_pwrite64(fd, b, n, o);
}
ssize_t writev(int fd, const struct iovec *v, int c) {
    REAL(writev, ssize_t, int, const struct iovec *, int);
    size_t n = 0;
    for (int i = 0; i < c; i++) n += v[i].iov_len;
    if (over(fd, n)) { errno = EIO; return -1; }
    return real_writev(fd, v, c);
}
int fsync(int fd) {
    REAL(fsync, int, int);
    if (fsync_fails(fd)) { errno = EIO; return -1; }
    return real_fsync(fd);
}
int fdatasync(int fd) {
    REAL(fdatasync, int, int);
    if (fsync_fails(fd)) { errno = EIO; return -1; }
    return real_fdatasync(fd);
}
"""

_EIO_SAVER = """
import json, sys, torch
import shardckpt
g = torch.Generator().manual_seed(7)
state = {"x": torch.randn(40000, generator=g), "y": torch.arange(5000)}
try:
    shardckpt.save(state, sys.argv[1], block_size=65536)
    print(json.dumps({"ok": True}))
except BaseException as e:
    print(json.dumps({"ok": False, "type": type(e).__name__, "msg": str(e),
                      "typed": isinstance(e, shardckpt.ShardckptError)}))
"""


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the EIO shim")
    d = tmp_path_factory.mktemp("shim")
    src, lib = d / "eio.c", d / "eio.so"
    src.write_text(_SHIM)
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"],
                   check=True, capture_output=True)
    return str(lib)


@pytest.mark.parametrize("mode", ["data", "manifest", "fsync"])
def test_eio_gives_a_typed_error_and_keeps_the_previous_checkpoint(tmp_path, shim, mode):
    parent = str(tmp_path / "d")
    path = os.path.join(parent, "ck")
    like = save_ckpt(path)
    env = {"LD_PRELOAD": shim, "EIO_PREFIX": parent}
    if mode == "fsync":
        env["EIO_FSYNC"] = "1"
    else:
        # the marker is ~200 bytes; the data of the state ~180 kB (float32 barely compresses)
        env["EIO_AFTER"] = "20000" if mode == "data" else "1000000"
    if mode == "manifest":
        # measure the data: everything but the final manifest write fits
        probe = str(tmp_path / "probe" / "ck")
        r = run_py(_EIO_SAVER, probe)
        assert json.loads(r.stdout)["ok"], r.stderr
        size = os.path.getsize(os.path.join(probe, "data", "r00000.bin"))
        env["EIO_AFTER"] = str(size + 1000)
    r = run_py(_EIO_SAVER, path, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert not out["ok"] and out["typed"], out
    assert out["type"] == "SaveFailedError", out
    assert path in out["msg"] and "Input/output error" in out["msg"], out
    assert leftovers(parent) == [], os.listdir(parent)
    assert equal(load_fresh(path, like), like)
    shardckpt.verify(path)


_KILLED_SAVER = """
import sys, time, torch
import shardckpt
from shardckpt.io import commit
# The save stops before its commit, its staging directory in place, until it is killed:
# a timed window could close first (a raw save of 64 MiB takes ~50 ms).
commit.Commit.finalize = lambda self, manifest: time.sleep(600)
print("go", flush=True)
state = {f"t{i}": torch.randn(1 << 18) for i in range(64)}
shardckpt.save(state, sys.argv[1], block_size=1 << 16, threads=1)
"""


def test_plain_save_removes_leftovers_of_killed_saves(tmp_path):
    path = str(tmp_path / "ck")
    seen: list[list[str]] = []
    for _ in range(2):
        p = subprocess.Popen([PY, "-c", _KILLED_SAVER, path], stdout=subprocess.PIPE, cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1"))
        assert p.stdout is not None and p.stdout.readline().strip() == b"go"
        deadline = time.time() + 60
        while leftovers(tmp_path) in ([], *seen):
            assert time.time() < deadline and p.poll() is None
            time.sleep(0.01)
        time.sleep(0.2)
        p.send_signal(signal.SIGKILL)
        p.wait()
        seen.append(leftovers(tmp_path))
    # the second save already removed the first one's leftover (its process was dead)
    assert len(seen[0]) == 1 and len(seen[1]) == 1 and seen[0] != seen[1], seen
    with pytest.raises(ShardckptError):  # never committed: typed, names the leftovers
        load_fresh(path, make_state(0))
    like = save_ckpt(path)
    assert leftovers(tmp_path) == [], os.listdir(tmp_path)
    assert equal(load_fresh(path, like), like)
