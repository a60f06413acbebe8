"""CheckpointManager: retention, pointers, leases, crash points, corruption fallback,
full disk, preemption (single process and a real 2-process gloo run)."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import shardckpt
from shardckpt import format as fmt
from shardckpt.io import commit, sinks
from shardckpt.io.fsutil import HOST, dir_size
from shardckpt.io.reader import find_partials, read_manifest
from shardckpt.manager import BEST_POINTER, LATEST_POINTER, CheckpointManager
from shardckpt.manager import names as manager_mod  # READERS_DIR, pointer names
from tests.fault._util import kill9_when_parked
from tests.workers import manager as W
from tests.workers.world import _entry, free_port

REPO = Path(__file__).resolve().parents[1]


def _mgr(root: Path, **kw) -> CheckpointManager:
    kw.setdefault("preemption_signals", ())  # pytest's own handlers stay in place
    return CheckpointManager(root, **kw)


def _steps(root: Path) -> list[int]:
    return [i.step for i in _mgr(root, keep_last=None).list()]


def _pointer(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def _entries(root: Path) -> set[str]:
    return {e for e in os.listdir(root) if e != manager_mod.READERS_DIR}


# ---------------------------------------------------------------- retention


@pytest.mark.parametrize("mode,keep_best", [("min", 1), ("max", 2)])
def test_retention_over_20_saves(tmp_path, mode, keep_best):
    losses = [0.9, 0.8, 0.85, 0.7, 0.75, 0.6, 0.65, 0.62, 0.5, 0.55,
              0.58, 0.52, 0.53, 0.54, 0.56, 0.57, 0.59, 0.6, 0.61, 0.63]
    mgr = _mgr(tmp_path, keep_last=3, keep_best=keep_best, metric="val_loss", mode=mode,
               keep_every=5)
    sign = 1 if mode == "min" else -1
    alive: set[int] = set()
    best_so_far = None
    for step, loss in enumerate(losses, start=1):
        mgr.save(step, {"w": torch.full((64,), float(step))}, metrics={"val_loss": loss})
        # Independent model of the policy: evaluated over what is still on disk.
        alive.add(step)
        if best_so_far is None or sign * loss < sign * losses[best_so_far - 1]:
            best_so_far = step
        ranked = sorted(alive, key=lambda s: (sign * losses[s - 1], -s))
        keep = set(sorted(alive)[-3:]) | {s for s in alive if s % 5 == 0}
        keep |= set(ranked[:keep_best]) | {best_so_far, step}
        alive &= keep
        assert set(_steps(tmp_path)) == alive, step
    if mode == "min":
        assert alive == {5, 9, 10, 15, 18, 19, 20}
    else:
        assert alive == {1, 3, 5, 10, 15, 18, 19, 20}
    assert _pointer(tmp_path, LATEST_POINTER)["step"] == 20
    assert _pointer(tmp_path, BEST_POINTER)["step"] == best_so_far
    infos = {i.step: i for i in mgr.list()}
    assert infos[20].pointers == ("latest",) and infos[best_so_far].pointers == ("best",)
    assert infos[20].metrics == {"val_loss": 0.63}
    assert all(i.size_bytes > 64 * 4 and i.time > 0 and i.problem is None
               for i in infos.values())
    # Nothing but checkpoints and pointers is left behind.
    assert _entries(tmp_path) == {f"step_{s:08d}" for s in alive} | {LATEST_POINTER, BEST_POINTER}


def test_reader_lease_protects_and_stale_lease_is_ignored(tmp_path):
    mgr = _mgr(tmp_path, keep_last=1)
    mgr.save(1, {"w": torch.ones(8)})
    mgr.save(2, {"w": torch.ones(8)})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    readers = tmp_path / manager_mod.READERS_DIR
    readers.mkdir(exist_ok=True)
    (readers / f"{dead.pid}-x.json").write_text(json.dumps(
        {"name": "step_00000002", "pid": dead.pid, "host": HOST,
         "time": time.time()}))
    with mgr.lease(2):
        mgr.save(3, {"w": torch.ones(8)})
        assert _steps(tmp_path) == [2, 3]  # leased by a live reader: kept
    mgr.save(4, {"w": torch.ones(8)})
    assert _steps(tmp_path) == [4]  # the dead pid's lease does not hold step 2
    assert os.listdir(readers) == []


def test_step_name_is_zero_padded_and_sorts(tmp_path):
    mgr = _mgr(tmp_path, keep_last=None)
    for s in (7, 123456789, 30):
        mgr.save(s, {"w": torch.ones(2)})
    assert sorted(_entries(tmp_path) - {LATEST_POINTER}) == [
        "step_00000007", "step_00000030", "step_123456789"]
    st = {"w": torch.zeros(2)}
    assert mgr.restore(st) == 30  # the most recent save, as `latest` says, not the highest step
    assert mgr.latest_step == 30 and shardckpt.latest(tmp_path).endswith("step_00000030")


def test_restore_empty_root_returns_none(tmp_path):
    assert _mgr(tmp_path / "nothing").restore(W.empty_state()) is None


# ---------------------------------------------------------------- kill -9 at protocol points


# After a kill before the rename, the new step was never committed: the previous one
# is restored. The rename is the commit point, so after it the new step is restored
# even though `latest` still named the old one (restore repairs the pointer).
@pytest.mark.parametrize("point,expect", [("data", 2), ("manifest", 2), ("pointer", 3),
                                          ("retention", 3)])
def test_kill9_during_save(tmp_path, point, expect):
    root, flag = tmp_path / "ck", tmp_path / "flag"
    kill9_when_parked(["tests.workers.manager", "kill", point, str(root), str(flag)], flag,
                      timeout=90)
    mgr = _mgr(root, keep_last=2, metric="loss")
    state = W.empty_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert mgr.restore(state) == expect
    assert W.state_matches(state, expect)
    if point in ("data", "manifest"):
        assert find_partials(str(root / "step_00000003"))
        assert any("step_00000003" in str(w.message) and "never committed" in str(w.message)
                   for w in caught)
    assert _pointer(root, LATEST_POINTER)["step"] == expect
    assert _pointer(root, BEST_POINTER)["step"] == expect  # loss = 1/step
    if point == "retention":
        assert _steps(root) == [2, 3]
    # The next save clears every leftover (partial or half-deleted) of the dead run.
    mgr.save(4, W.make_state(4), metrics={"loss": 0.25})
    assert _entries(root) == {"step_00000003", "step_00000004", LATEST_POINTER, BEST_POINTER} \
        if expect == 3 else {"step_00000002", "step_00000004", LATEST_POINTER, BEST_POINTER}


# ---------------------------------------------------------------- corruption fallback


def _flip_byte(ck: Path) -> str:
    data = ck / "data" / "r00000.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    data.write_bytes(bytes(raw))
    return "checksum"


def _delete_data(ck: Path) -> str:
    (ck / "data" / "r00000.bin").unlink()
    return "missing"


def _truncate_manifest(ck: Path) -> str:
    m = ck / fmt.MANIFEST_NAME
    m.write_bytes(m.read_bytes()[:40])
    return "manifest"


@pytest.mark.parametrize("damage", [_flip_byte, _delete_data, _truncate_manifest])
@pytest.mark.parametrize("verify_mode", ["sizes", "full"])
def test_corrupt_newest_falls_back_with_warning(tmp_path, damage, verify_mode):
    mgr = _mgr(tmp_path, keep_last=5, metric="loss", verify_on_restore=verify_mode)
    for s in (1, 2, 3):
        mgr.save(s, W.make_state(s), metrics={"loss": 1.0 / s})
    word = damage(tmp_path / "step_00000003")
    state = W.empty_state()
    with pytest.warns(RuntimeWarning, match=rf"(?s)step_00000003.*{word}"):
        assert mgr.restore(state) == 2
    assert W.state_matches(state, 2)  # bitwise, even after a failed partial load
    # An explicit choice of the damaged one is an error, not a silent fallback.
    with pytest.raises(shardckpt.CorruptCheckpointError, match="step_00000003"):
        mgr.restore(W.empty_state(), step=3)
    with pytest.raises(shardckpt.CorruptCheckpointError, match="step_00000003"):
        mgr.restore(W.empty_state(), which="best")
    assert mgr.restore(state, step=1) == 1 and W.state_matches(state, 1)
    with pytest.raises(shardckpt.CheckpointNotFoundError):
        mgr.restore(state, step=99)


def test_state_mismatch_is_raised_not_skipped(tmp_path):
    mgr = _mgr(tmp_path)
    mgr.save(1, W.make_state(1))
    mgr.save(2, W.make_state(2))
    state = W.empty_state()
    state["w"] = torch.zeros(10)
    with pytest.raises(shardckpt.StateMismatchError):
        mgr.restore(state)


# ---------------------------------------------------------------- full disk


def _full_disk_pwrite(fd: int, data, offset: int) -> int:  # noqa: ANN001
    """A data file on a disk that fills up after 4000 bytes."""
    if offset + len(data) > 4000:
        raise OSError(errno.ENOSPC, "No space left on device")
    return os.pwrite(fd, data, offset)


def _no_leftovers(root: Path, steps: list[int]) -> None:
    assert _entries(root) == {f"step_{s:08d}" for s in steps} | {LATEST_POINTER}


@pytest.mark.parametrize("where", ["data", "manifest"])
def test_enospc_injected_mid_save(tmp_path, monkeypatch, where):
    mgr = _mgr(tmp_path, keep_last=3)
    mgr.save(1, W.make_state(1))
    if where == "data":
        monkeypatch.setattr(sinks, "_pwrite", _full_disk_pwrite)
    else:
        real = commit.write_file_durable

        def wfd(path: str, data: bytes, **kw: object) -> None:
            if path.endswith(fmt.MANIFEST_NAME):
                raise OSError(errno.ENOSPC, "No space left on device", path)
            real(path, data, **kw)

        monkeypatch.setattr(commit, "write_file_durable", wfd)
    with pytest.raises(shardckpt.InsufficientSpaceError, match=r"(?s)disk full.*step 2.*intact"):
        mgr.save(2, W.make_state(2))
    monkeypatch.undo()
    _no_leftovers(tmp_path, [1])
    state = W.empty_state()
    assert mgr.restore(state) == 1 and W.state_matches(state, 1)
    mgr.save(2, W.make_state(2))  # works again once there is space
    assert _steps(tmp_path) == [1, 2]


def test_space_precheck_frees_by_retention_or_refuses(tmp_path, monkeypatch):
    opts = {"save_options": {"compression": "none"}}  # equal sizes for every step
    mgr = _mgr(tmp_path, keep_last=2, **opts)
    mgr.save(1, W.make_state(1))
    mgr.save(2, W.make_state(2))
    size = mgr.list()[-1].size_bytes
    real = shutil.disk_usage
    cap = 3 * size + size // 5  # a pretend disk: room for three checkpoints and a bit

    def usage(path):
        used = sum(dir_size(str(p)) for p in tmp_path.iterdir())
        return real(path)._replace(total=cap, used=used, free=cap - used)

    monkeypatch.setattr(shutil, "disk_usage", usage)
    mgr.save(3, W.make_state(3))  # fits; retention drops 1 afterwards
    assert _steps(tmp_path) == [2, 3]
    cap = 2 * size + size // 5  # room for two: 2 must go before 4 is written
    mgr.save(4, W.make_state(4))
    assert _steps(tmp_path) == [3, 4]
    # With keep_last=None nothing is droppable, and 0.2 x size is not enough.
    keep_all = _mgr(tmp_path, keep_last=None, **opts)
    with pytest.raises(shardckpt.InsufficientSpaceError, match="Nothing was written"):
        keep_all.save(5, W.make_state(5))
    _no_leftovers(tmp_path, [3, 4])


@pytest.fixture
def tiny_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_real_full_disk_tmpfs(tiny_disk):
    root = tiny_disk / "ck"
    small = lambda s: {"w": torch.randn(75_000, generator=torch.Generator().manual_seed(s))}  # noqa: E731
    mgr = _mgr(root, keep_last=5, save_options={"compression": "none"})
    mgr.save(1, small(1))
    mgr.save(2, small(2))
    # Bigger than the disk, but the estimate (previous checkpoint) fits: the disk
    # fills up in the middle of the data file, a real ENOSPC.
    with pytest.raises(shardckpt.InsufficientSpaceError, match="disk full"):
        mgr.save(3, {"w": torch.randn(1_250_000)})
    _no_leftovers(root, [1, 2])
    st = {"w": torch.zeros(75_000)}
    assert mgr.restore(st) == 2 and torch.equal(st["w"], small(2)["w"])
    # Leave ~200 KB free: the pre-check refuses before writing anything.
    free = shutil.disk_usage(root).free
    (tiny_disk / "filler").write_bytes(b"\0" * (free - 200_000))
    with pytest.raises(shardckpt.InsufficientSpaceError, match="Nothing was written"):
        mgr.save(3, small(3))
    _no_leftovers(root, [1, 2])
    # With keep_last=1, retention may drop step 1 (not 2: `latest` names it) first.
    mgr1 = _mgr(root, keep_last=1, save_options={"compression": "none"})
    mgr1.save(3, small(3))
    _no_leftovers(root, [3])
    assert mgr1.restore(st) == 3 and torch.equal(st["w"], small(3)["w"])


# ---------------------------------------------------------------- preemption and async


def test_sigusr1_saves_at_step_boundary(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    try:
        state = W.make_state(5)
        assert mgr.step_boundary(5, state) is False
        assert _steps(tmp_path) == []
        os.kill(os.getpid(), signal.SIGUSR1)  # only a flag is set here
        assert _steps(tmp_path) == []
        assert mgr.step_boundary(5, state) is True
        assert mgr.preempted and _steps(tmp_path) == [5]
        man = read_manifest(str(tmp_path / "step_00000005")).to_json()
        assert man["user_metadata"]["manager"]["reason"] == "preemption"
    finally:
        mgr.close()
    assert signal.getsignal(signal.SIGUSR1) == before
    st = W.empty_state()
    assert _mgr(tmp_path).restore(st) == 5 and W.state_matches(st, 5)


def test_async_mode_defers_pointers_to_wait(tmp_path, monkeypatch):
    calls = []

    class Handle:
        def __init__(self, state, path, kw):
            self.args = (state, path, kw)
            self._done = False

        def done(self) -> bool:
            return self._done

        def wait(self) -> None:
            if not self._done:  # the "background" part: write + commit
                state, path, kw = self.args
                shardckpt.save(state, path, **kw)
                self._done = True

    def fake_async_save(state, path, **kw):
        calls.append(path)
        return Handle(state, path, kw)

    monkeypatch.setattr(shardckpt, "async_save", fake_async_save, raising=False)
    mgr = _mgr(tmp_path, keep_last=1, async_save=True, metric="loss")
    mgr.save(1, W.make_state(1), metrics={"loss": 1.0})
    assert not (tmp_path / LATEST_POINTER).exists()  # not committed yet
    mgr.save(2, W.make_state(2), metrics={"loss": 2.0})  # finishes step 1 first
    assert _pointer(tmp_path, LATEST_POINTER)["step"] == 1
    mgr.wait()
    assert _pointer(tmp_path, LATEST_POINTER)["step"] == 2
    assert _steps(tmp_path) == [1, 2]  # 1 is best, 2 is latest
    assert len(calls) == 2
    st = W.empty_state()
    assert mgr.restore(st) == 2 and W.state_matches(st, 2)


def test_sigterm_to_one_rank_of_two_saves_and_resumes(tmp_path):
    root, ready = str(tmp_path / "ck"), str(tmp_path / "ready")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, W.train_until_preempted,
                                              (root, ready), q), daemon=True)
             for r in range(2)]
    for p in procs:
        p.start()
    results = {}
    try:
        deadline = time.time() + 120
        while not os.path.exists(ready):
            assert time.time() < deadline, "training never reached step 3"
            assert all(p.is_alive() for p in procs), "a rank died early"
            time.sleep(0.05)
        os.kill(procs[1].pid, signal.SIGTERM)  # the signal reaches one rank only
        for _ in range(2):
            rank, status, out = q.get(timeout=120)
            assert status == "ok", out
            results[rank] = torch.load(io.BytesIO(out), weights_only=False)
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    step = results[0]["step"]
    assert results[1]["step"] == step >= 3
    assert _pointer(Path(root), LATEST_POINTER)["step"] == step
    # Every rank of a restarted job restores the same step, bitwise; so does a
    # fresh single process (the checkpoint loads at world size 1 too).
    for r in [results[0]["resumed"], results[1]["resumed"], W.resume(0, 1, root)]:
        assert r["step"] == step
        for k, v in results[0]["sd"].items():
            assert torch.equal(r["sd"][k], v), k


def test_real_full_disk_in_last_block(tiny_disk):
    root = tiny_disk / "ck"
    mgr = _mgr(root, save_options={"compression": "none", "block_size": 4 << 20})
    mgr.save(1, {"w": torch.zeros(10)})
    with pytest.raises(shardckpt.InsufficientSpaceError, match="disk full"):
        mgr.save(2, {"w": torch.randn(600_000)})  # 2.4 MB in one block: a short write


def test_retention_and_gc_keep_the_files_a_user_put_in_a_checkpoint(tmp_path):
    # Invariant 8: retention deleted the whole directory, eval reports and all.
    mgr = _mgr(tmp_path, keep_last=1)
    mgr.save(1, W.make_state(1))
    step1 = tmp_path / "step_00000001"
    (step1 / "eval_report.json").write_text('{"acc": 0.9}')
    (step1 / "export").mkdir()
    (step1 / "export" / "model.pt").write_bytes(b"weights")
    (step1 / "data" / "notes.txt").write_text("mine")
    mgr.save(2, W.make_state(2))  # retention drops step 1
    assert [i.step for i in shardckpt.list_checkpoints(tmp_path)] == [2]
    assert sorted(str(p.relative_to(step1)) for p in step1.rglob("*")) == [
        "data", "data/notes.txt", "eval_report.json", "export", "export/model.pt"]
    assert (step1 / "export" / "model.pt").read_bytes() == b"weights"
    assert not [n for n in os.listdir(tmp_path) if ".old-" in n]  # nothing left in the trash
    # gc --keep-last too
    (tmp_path / "step_00000002" / "keep.txt").write_text("k")
    mgr.save(3, W.make_state(3))
    mgr.close()
    from shardckpt.tools.gc import gc

    gc(str(tmp_path), keep_last=1, older_than=0)  # step 3 stays
    assert (tmp_path / "step_00000002" / "keep.txt").read_text() == "k"
    assert (step1 / "eval_report.json").exists()


_PEER_DIES = r"""
import os, sys, torch, shardckpt, torch.distributed as dist
dist.init_process_group("gloo"); rank = dist.get_rank()
mgr = shardckpt.CheckpointManager(sys.argv[1], keep_last=2, preemption_signals=(), timeout=20)
mgr.save(1, {"w": torch.ones(10)})
if rank == 1:
    os._exit(0)  # the peer dies (OOM kill, node loss)
try:
    mgr.save(2, {"w": torch.ones(10)})
except Exception as e:
    print(type(e).__name__, isinstance(e, shardckpt.ShardckptError), str(e)[:200], flush=True)
"""


def test_a_peer_that_died_is_a_typed_error_from_the_managers_collectives(tmp_path):
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-c", _PEER_DIES, str(tmp_path)], cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, OMP_NUM_THREADS="1")) for r in range(2)]
    out = procs[0].communicate(timeout=180)[0]
    procs[1].wait(timeout=60)
    assert out.split()[:2] in (["CollectiveTimeoutError", "True"], ["SaveFailedError", "True"]), out
    assert [i.step for i in shardckpt.list_checkpoints(tmp_path)] == [1]


def test_latest_skips_a_checkpoint_whose_data_is_missing_or_truncated(tmp_path):
    mgr = _mgr(tmp_path, keep_last=None)
    for s in (1, 2, 3):
        mgr.save(s, W.make_state(s))
    mgr.close()
    assert shardckpt.latest(tmp_path).endswith("step_00000003")
    data3 = tmp_path / "step_00000003" / "data" / "r00000.bin"
    data3.write_bytes(data3.read_bytes()[:10])  # truncated: the load would fail
    assert shardckpt.latest(tmp_path).endswith("step_00000002")
    (tmp_path / "step_00000002" / "data" / "r00000.bin").unlink()
    assert shardckpt.latest(tmp_path).endswith("step_00000001")
    state = W.empty_state()
    shardckpt.load(state, shardckpt.latest(tmp_path))


def test_after_a_rollback_the_new_branch_is_the_latest(tmp_path):
    # Save 1..4, go back to 2 (a loss spike), save 3 again: resuming picked the abandoned
    # branch's step 4, the highest step, over the 3 just saved.
    mgr = _mgr(tmp_path, keep_last=None)
    for s in (1, 2, 3, 4):
        mgr.save(s, W.make_state(s))
    st = W.empty_state()
    assert mgr.restore(st, step=2) == 2
    mgr.save(3, W.make_state(103))  # replaces the old branch's step 3
    mgr.close()
    assert shardckpt.latest(tmp_path).endswith("step_00000003")
    fresh = _mgr(tmp_path, keep_last=None)
    st = W.empty_state()
    assert fresh.restore(st) == 3 and fresh.latest_step == 3
    assert torch.equal(st["w"], W.make_state(103)["w"])
