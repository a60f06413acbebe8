"""The async save's writer process (io/writer_process.py): real helper processes, real
kill -9 of the helper and of the training process, a real write limit on the helper."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import shardckpt
from shardckpt import codec
from shardckpt.async_save import staging_stats
from shardckpt.format import MANIFEST_NAME
from shardckpt.io import writer_process
from tests.workers import async_ as W
from tests.workers.world import run_world

pytestmark = pytest.mark.skipif(writer_process.mode() == "thread" and
                                not hasattr(os, "memfd_create"), reason="needs memfd (Linux)")


def _state(seed: int, big: int = 1 << 20) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(big, generator=g),
        "bf": torch.randn(333, 77, generator=g).to(torch.bfloat16),
        "half": torch.randn(1000, generator=g).half(),
        "ids": torch.randint(-(1 << 40), 1 << 40, (4097,), generator=g),
        "mask": torch.rand(999, generator=g) > 0.5,
        "t": torch.randn(64, 48, generator=g).t(),  # not contiguous in the state
        "empty": torch.empty(0, 5),
        "step": seed, "name": f"run-{seed}", "nested": {"lr": [0.1, 0.01]},
    }


def _blank(like: dict) -> dict:
    return {k: torch.zeros_like(v) if torch.is_tensor(v) else
            dict.fromkeys(v) if isinstance(v, dict) else None for k, v in like.items()}


def _same(a: dict, b: dict) -> bool:
    for k, v in a.items():
        if torch.is_tensor(v):
            if not (b[k].dtype == v.dtype and b[k].shape == v.shape and torch.equal(
                    b[k].contiguous().view(torch.uint8), v.contiguous().view(torch.uint8))):
                return False
        elif b[k] != v:
            return False
    return True


def _helper_pid() -> int:
    h = writer_process._helper
    assert h is not None and h.alive(), "no writer process is running"
    return h.proc.pid


def _gone(pid: int, within: float) -> bool:
    end = time.monotonic() + within
    while time.monotonic() < end:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def _stop_helper() -> None:
    """A fresh start: no helper, and no staging pools left by earlier tests in this
    process (a test that needs a new arena must not find a large one already there)."""
    from shardckpt.async_save import _saver

    with _saver.lock:
        done = [h for h, _ in _saver.inflight if h.done()]
        if len(done) == len(_saver.inflight):
            _saver.inflight.clear()
            _saver.pools.clear()
    h = writer_process._helper
    if h is not None and h.alive():
        h.close()
    writer_process._helper = None


@pytest.fixture
def process_mode(monkeypatch):
    # Nice 0 and unpinned: these tests check what the helper does, not how it yields the CPU
    # (test_the_writer_process_keeps_to_its_cpus_at_nice_19), and a nice-19 helper pinned to
    # one core of a 2-core CI machine running the rest of the suite could take minutes.
    monkeypatch.setenv("SHARDCKPT_ASYNC_WRITER", "process")
    monkeypatch.setenv("SHARDCKPT_WRITER_NICE", "0")
    monkeypatch.setenv("SHARDCKPT_WRITER_CPUS", "all")
    _stop_helper()  # one started elsewhere in this process had other settings
    yield
    _stop_helper()


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_saves_through_the_writer_process_load_bitwise(tmp_path, process_mode, compression):
    for i in range(2):
        state = _state(i)
        shardckpt.async_save(state, tmp_path / f"c{i}", compression=compression).wait()
        pid = _helper_pid()
        assert pid != os.getpid()
        out = _blank(state)
        shardckpt.load(out, tmp_path / f"c{i}")
        assert _same(state, out)
        assert shardckpt.verify(tmp_path / f"c{i}").ok


def test_the_writer_process_never_imports_torch(tmp_path, process_mode):
    # Each rank has a helper: with torch it cost 2-6 s of CPU to start and ~276 MB of memory.
    state = _state(3)
    shardckpt.async_save(state, tmp_path / "c", compression="zstd").wait()
    with open(f"/proc/{_helper_pid()}/maps") as f:
        libs = {line.split()[-1] for line in f if ".so" in line}
    assert not [p for p in libs if "torch" in os.path.basename(p)], sorted(libs)
    if codec.active_path() == "native":  # it did the encoding
        assert any("_native" in os.path.basename(p) for p in libs)
    with open(f"/proc/{_helper_pid()}/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))
    assert rss_kb < 150_000  # ~30 MB of its own; the arena it maps is shared, and small here
    out = _blank(state)
    shardckpt.load(out, tmp_path / "c")
    assert _same(state, out)


def test_a_larger_state_grows_the_shared_arena(tmp_path, process_mode):
    before = staging_stats()["allocations"]
    small, large = _state(1, big=1 << 16), _state(2, big=3 << 20)
    for i, state in enumerate([small, large, small]):
        shardckpt.async_save(state, tmp_path / f"c{i}").wait()
        out = _blank(state)
        shardckpt.load(out, tmp_path / f"c{i}")
        assert _same(state, out)
    assert staging_stats()["allocations"] - before <= 2
    # The helper unmapped the arena the larger one replaced: one pool, one mapping.
    with open(f"/proc/{_helper_pid()}/maps") as f:
        mapped = sum("shardckpt-staging" in line for line in f)
    assert mapped == 1 and staging_stats()["pools"] == 1


def test_kill_9_of_the_writer_process_fails_that_save_only(tmp_path, process_mode):
    shardckpt.async_save(_state(0, big=1 << 10), tmp_path / "warm").wait()
    pid = _helper_pid()
    big = {"w": torch.randn(96 << 20)}  # 384 MiB: seconds to write and fsync here
    h = shardckpt.async_save(big, tmp_path / "killed", compression="none")
    # Killed once it writes: a helper already dead when the save reaches it is replaced, and
    # that save succeeds (right, but not what this test is about).
    end = time.monotonic() + 60
    while not list(tmp_path.glob(".killed.partial-*/**/*.bin")) and time.monotonic() < end:
        time.sleep(0.005)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(shardckpt.SaveFailedError, match=r"(?s)killed.*rank 0\).*writer process.*SIGKILL.*nothing was committed"):
        h.wait()
    assert not (tmp_path / "killed").exists()
    state = _state(3)
    shardckpt.async_save(state, tmp_path / "after").wait()
    assert _helper_pid() != pid
    out = _blank(state)
    shardckpt.load(out, tmp_path / "after")
    assert _same(state, out)


def test_a_write_error_in_the_writer_process_is_typed_and_names_the_file(tmp_path, process_mode):
    shardckpt.async_save(_state(0, big=1 << 10), tmp_path / "warm").wait()
    pid = _helper_pid()
    limit = 1 << 20
    old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, old[1]))  # soft only: it goes back
    try:  # Python ignores SIGXFSZ: the helper's write gets EFBIG
        h = shardckpt.async_save({"w": torch.randn(1 << 21)}, tmp_path / "big",
                                 compression="none")
        with pytest.raises(shardckpt.SaveFailedError,
                           match=r"(?s)big.*rank 0.*nothing was committed"):
            h.wait()
    finally:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
    assert not (tmp_path / "big").exists()
    state = _state(4)
    shardckpt.async_save(state, tmp_path / "again").wait()
    assert _helper_pid() == pid  # the helper survived its error
    out = _blank(state)
    shardckpt.load(out, tmp_path / "again")
    assert _same(state, out)


def test_a_helper_that_cannot_map_the_arena_leaves_the_save_to_the_thread(tmp_path,
                                                                         process_mode):
    shardckpt.async_save(_state(0, big=1 << 10), tmp_path / "warm").wait()
    pid = _helper_pid()
    with open(f"/proc/{pid}/status") as f:
        vm = int(next(x for x in f if x.startswith("VmSize")).split()[1]) << 10
    old = resource.prlimit(pid, resource.RLIMIT_AS)
    resource.prlimit(pid, resource.RLIMIT_AS, (vm + (64 << 20), old[1]))
    try:
        state = {"w": torch.randn(64 << 20)}  # a new 256 MiB arena: more than the limit leaves
        before = staging_stats()["allocations"]
        shardckpt.async_save(state, tmp_path / "big").wait()
        assert staging_stats()["allocations"] == before + 1
        assert "cannot map the staging arena" in (writer_process._unavailable or "")
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, old)
        writer_process._unavailable = None
    out = {"w": torch.zeros(64 << 20)}
    shardckpt.load(out, tmp_path / "big")
    assert torch.equal(out["w"], state["w"])


def test_interrupts_to_the_process_group_leave_the_writer_process_running(tmp_path,
                                                                         process_mode):
    shardckpt.async_save(_state(0, big=1 << 10), tmp_path / "warm").wait()
    pid = _helper_pid()
    h = shardckpt.async_save({"w": torch.randn(16 << 20)}, tmp_path / "during")
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # what Ctrl-C / torchrun send
        os.kill(pid, sig)
    h.wait()
    assert _helper_pid() == pid
    assert shardckpt.verify(tmp_path / "during").ok


def test_a_forked_child_starts_its_own_writer_process(tmp_path, process_mode):
    from shardckpt.async_save import _saver

    shardckpt.async_save(_state(8), tmp_path / "warm").wait()
    parent_helper = _helper_pid()
    arena = _saver.inflight[-1][1].arena  # the parent's snapshot of _state(8)
    before = arena.clone()
    child = os.fork()
    if child == 0:  # a DataLoader-style fork: the parent's helper is not the child's
        code = 1
        signal.alarm(120)  # a hang here ends the child (and fails the test), not the suite
        try:
            torch.set_num_threads(1)  # as a DataLoader worker: the parent's OpenMP pool is gone
            state = _state(6)
            shardckpt.async_save(state, tmp_path / "child").wait()
            out = _blank(state)
            shardckpt.load(out, tmp_path / "child")
            code = 0 if _same(state, out) and _helper_pid() != parent_helper else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The child staged _state(6), as large, into an arena of its own, not into the parent's.
    assert torch.equal(arena, before)
    state = _state(7)
    shardckpt.async_save(state, tmp_path / "parent").wait()
    assert _helper_pid() == parent_helper
    out = _blank(state)
    shardckpt.load(out, tmp_path / "parent")
    assert _same(state, out)


def test_kill_9_of_the_training_process_stops_its_writer_process(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys, time, torch, shardckpt
        from shardckpt.io import writer_process
        os.environ["SHARDCKPT_ASYNC_WRITER"] = "process"
        first = {{"w": torch.arange(1 << 20, dtype=torch.float32)}}
        shardckpt.async_save(first, {str(tmp_path / "ok")!r}).wait()
        h = shardckpt.async_save({{"w": torch.randn(96 << 20)}}, {str(tmp_path / "cut")!r},
                                 compression="none")
        print(writer_process._helper.proc.pid, flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _gone(helper, within=10), "the writer process outlived the training process"
    out = {"w": torch.zeros(1 << 20)}
    shardckpt.load(out, tmp_path / "ok")
    assert torch.equal(out["w"], torch.arange(1 << 20, dtype=torch.float32))
    assert not (tmp_path / "cut" / MANIFEST_NAME).exists()
    with pytest.raises(shardckpt.ShardckptError):
        shardckpt.load({"w": torch.zeros(96 << 20)}, tmp_path / "cut")


def test_small_saves_and_thread_mode_start_no_writer_process(tmp_path):
    script = textwrap.dedent(f"""
        import os, torch, shardckpt
        from shardckpt.io import writer_process
        shardckpt.async_save({{"w": torch.randn(1000)}}, {str(tmp_path / "small")!r}).wait()
        small = writer_process._helper is None
        os.environ["SHARDCKPT_ASYNC_WRITER"] = "thread"
        shardckpt.async_save({{"w": torch.randn(8 << 20)}}, {str(tmp_path / "thr")!r}).wait()
        thread = writer_process._helper is None
        os.environ["SHARDCKPT_ASYNC_WRITER"] = "auto"  # larger: a new arena, a shared one
        h = shardckpt.async_save({{"w": torch.randn(12 << 20)}}, {str(tmp_path / "big")!r})
        early = writer_process._helper is not None  # started with the staging, not at write
        h.wait()
        print(small, thread, early)
    """)
    env = {k: v for k, v in os.environ.items() if k != "SHARDCKPT_ASYNC_WRITER"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", "True", "True"]


def test_a_file_the_helper_declines_resolves_each_item_once(tmp_path, monkeypatch):
    # Auto mode, a small file: the shared arena exists but the thread writes. Each item is
    # resolved once: an object's serialized bytes (checked to load back) are handed out
    # once, and a second resolve would serialize it again, unchecked.
    from collections import Counter

    from shardckpt.dcp.planner import SafeSavePlanner

    monkeypatch.setenv("SHARDCKPT_ASYNC_WRITER", "auto")
    _stop_helper()
    seen: Counter = Counter()
    resolve = SafeSavePlanner.resolve_data

    def counting(self, item):
        seen[item.index.fqn] += 1
        return resolve(self, item)

    monkeypatch.setattr(SafeSavePlanner, "resolve_data", counting)
    state = _state(5, big=1 << 12)
    shardckpt.async_save(state, tmp_path / "c").wait()
    assert writer_process._helper is None  # the thread wrote it
    assert seen and set(seen.values()) == {1}, seen
    out = _blank(state)
    shardckpt.load(out, tmp_path / "c")
    assert _same(state, out)


def test_a_bad_writer_setting_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("SHARDCKPT_ASYNC_WRITER", "fork")
    with pytest.raises(ValueError, match="SHARDCKPT_ASYNC_WRITER='fork'"):
        writer_process.mode()


def test_the_writer_process_keeps_to_its_cpus_at_nice_19(tmp_path):
    script = textwrap.dedent(f"""
        import json, os, torch, shardckpt
        from shardckpt import codec
        from shardckpt.io import writer_process
        os.environ["SHARDCKPT_ASYNC_WRITER"] = "process"
        shardckpt.async_save({{"w": torch.randn(1000)}}, {str(tmp_path / "c")!r}).wait()
        pid = writer_process._helper.proc.pid
        tasks = [int(t) for t in os.listdir(f"/proc/{{pid}}/task")]
        print(json.dumps({{"want": sorted(codec.writer_cpus() or os.sched_getaffinity(0)),
                          "cpus": [sorted(os.sched_getaffinity(t)) for t in tasks],
                          "nice": [os.getpriority(os.PRIO_PROCESS, t) for t in tasks]}}))
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARDCKPT_")}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                       timeout=180)
    assert r.returncode == 0, r.stderr[-2000:]
    import json

    got = json.loads(r.stdout.splitlines()[-1])
    assert got["cpus"] and all(c == got["want"] for c in got["cpus"])
    assert all(n == 19 for n in got["nice"])  # SHARDCKPT_WRITER_NICE's default


@pytest.mark.parametrize("env,cpus,want", [
    ({}, set(range(8)), {4, 5, 6, 7}),
    ({}, {0}, None),
    ({}, {0, 1}, {1}),
    ({"SHARDCKPT_WRITER_CPUS": "all"}, set(range(8)), None),
    ({"SHARDCKPT_WRITER_CPUS": "2,3,99"}, set(range(8)), {2, 3}),
    ({"SHARDCKPT_THREADS": "1"}, set(range(8)), {7}),
    # four ranks on a node that share every CPU: each keeps to the top of its quarter
    ({"LOCAL_WORLD_SIZE": "4", "LOCAL_RANK": "2"}, set(range(8)), {5}),
    ({"LOCAL_WORLD_SIZE": "8", "LOCAL_RANK": "3"}, set(range(8)), None),
])
def test_writer_cpus_leave_the_training_its_share(monkeypatch, env, cpus, want):
    for k in ("SHARDCKPT_WRITER_CPUS", "SHARDCKPT_THREADS", "LOCAL_WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cpus))
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert codec.writer_cpus() == want


def test_two_ranks_save_through_their_writer_processes(tmp_path):
    out = run_world(2, W.train_while_saving_in_writer_processes, str(tmp_path))
    assert all(r["ok"] == [True, True, True] for r in out)
    pids = [r["helper"] for r in out]
    assert None not in pids and len(set(pids)) == 2
    # saved by two ranks' writer processes, loaded in one process
    t = {"w": torch.zeros(512, 257), "step": -1}
    shardckpt.load(t, tmp_path / "s2")
    assert t["step"] == 2 and Path(tmp_path / "s2" / MANIFEST_NAME).exists()


def test_pieces_copy_items_outside_the_arena_only_for_a_file_that_qualifies(monkeypatch):
    from shardckpt.io import tensor_bytes as tb

    copies = []
    real = tb.tensor_bytes
    monkeypatch.setattr(tb, "tensor_bytes", lambda t: copies.append(t.numel()) or real(t))
    arena = writer_process.SharedArena(4 << 20)
    staged = arena.tensor[: 1 << 20].view(torch.float32)  # 1 MiB in the arena
    staged.copy_(torch.arange(staged.numel(), dtype=torch.float32))
    outside = torch.randn(1000)
    items = [(staged, 4), (outside, 4), (memoryview(b"objects"), 1)]
    # Too little in the arena for the helper: nothing is copied, the thread writes it.
    assert writer_process.pieces_for(arena, items, min_arena_bytes=2 << 20) is None
    assert copies == []
    pieces = writer_process.pieces_for(arena, items, min_arena_bytes=1 << 20)
    assert copies == [1000]
    assert [(p.offset, p.nbytes, p.group) for p in pieces] == [(0, 1 << 20, 4), (None, 4000, 4),
                                                               (None, 7, 1)]
    assert pieces[1].inline == outside.numpy().tobytes() and pieces[2].inline == b"objects"
    # An item outside the arena too large to go inline: the thread writes the file.
    assert writer_process.pieces_for(arena, [(staged, 4), (torch.zeros(1 << 19), 4)]) is None
