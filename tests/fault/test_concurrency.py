"""Issue 17, item 5 and the reader/overwriter race of item 8: concurrent tools, real processes."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

import shardckpt
from shardckpt.errors import CorruptCheckpointError, ShardckptError

from ._util import PY, REPO, equal, load_fresh, make_state

_ENV = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")

_SAVER = """
import json, sys, traceback
import shardckpt
from tests.fault._util import make_state
root, n, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
with open(log, "w") as out:
    for i in range(n):
        name = f"ck{i % 4}"  # overwrites too
        try:
            shardckpt.save(make_state(i), f"{root}/{name}", block_size=256)
            rec = {"i": i, "name": name, "ok": True}
        except shardckpt.ShardckptError as e:
            rec = {"i": i, "name": name, "ok": False, "typed": True, "err": repr(e)}
        except BaseException as e:
            rec = {"i": i, "name": name, "ok": False, "typed": False,
                   "err": traceback.format_exc()}
        out.write(json.dumps(rec) + "\\n")
        out.flush()
"""

_GC_LOOP = """
import os, sys
from shardckpt.tools.gc import gc
root, stop = sys.argv[1], sys.argv[2]
n = 0
print("ready", flush=True)
while not os.path.exists(stop):
    gc(root, older_than=0)
    n += 1
print(n, flush=True)
"""


def test_gc_loop_never_loses_a_successful_save(tmp_path):
    root = str(tmp_path / "root")
    os.makedirs(root)
    stop = str(tmp_path / "stop")
    gcs = [subprocess.Popen([PY, "-c", _GC_LOOP, root, stop], stdout=subprocess.PIPE, env=_ENV,
                            cwd=REPO) for _ in range(2)]
    for g in gcs:
        assert g.stdout is not None and g.stdout.readline().strip() == b"ready"
    log = str(tmp_path / "log")
    saver = subprocess.run([PY, "-c", _SAVER, root, "24", log], env=_ENV, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    open(stop, "w").close()
    rounds = [int(g.communicate(timeout=60)[0].strip()) for g in gcs]
    assert saver.returncode == 0, saver.stderr
    assert min(rounds) > 5, rounds
    recs = [json.loads(line) for line in open(log)]
    assert len(recs) == 24
    assert all(r["ok"] or r["typed"] for r in recs), [r for r in recs if not r["ok"]]
    last_ok: dict[str, int] = {}
    for r in recs:
        if r["ok"]:
            last_ok[r["name"]] = r["i"]
    assert len(last_ok) == 4, recs
    for name, i in last_ok.items():
        like = make_state(i)
        assert equal(load_fresh(os.path.join(root, name), like), like), name
        shardckpt.verify(os.path.join(root, name))


_RACER = """
import os, sys, time, json
import shardckpt
from tests.fault._util import make_state
me, base, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
out = []
for r in range(rounds):
    open(f"{base}/ready-{r}-{me}", "w").close()
    while not os.path.exists(f"{base}/go-{r}"):
        time.sleep(0.0005)
    try:
        shardckpt.save(make_state(10 * r + me), f"{base}/ck{r}", overwrite=False)
        out.append({"ok": True})
    except shardckpt.CheckpointExistsError as e:
        out.append({"ok": False, "type": "CheckpointExistsError", "msg": str(e)})
    except BaseException as e:
        out.append({"ok": False, "type": type(e).__name__, "msg": str(e)})
print(json.dumps(out), flush=True)
"""


def test_overwrite_false_race_exactly_one_wins(tmp_path):
    rounds = 8
    base = str(tmp_path)
    procs = [subprocess.Popen([PY, "-c", _RACER, str(me), base, str(rounds)],
                              stdout=subprocess.PIPE, text=True, env=_ENV, cwd=REPO)
             for me in range(2)]
    for r in range(rounds):
        deadline = time.time() + 120
        while not all(os.path.exists(f"{base}/ready-{r}-{me}") for me in range(2)):
            assert time.time() < deadline and all(p.poll() is None for p in procs)
            time.sleep(0.001)
        open(f"{base}/go-{r}", "w").close()
    res = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    for r in range(rounds):
        a, b = res[0][r], res[1][r]
        assert [a["ok"], b["ok"]].count(True) == 1, (r, a, b)
        loser, winner = (b, 0) if a["ok"] else (a, 1)
        assert loser["type"] == "CheckpointExistsError", loser
        path = os.path.join(base, f"ck{r}")
        assert "Checkpoint already exists" in loser["msg"] and path in loser["msg"]
        like = make_state(10 * r + winner)
        assert equal(load_fresh(path, like), like)
    assert not [e for e in os.listdir(base) if ".partial-" in e]


_OVERWRITER = """
import os, sys
import shardckpt
from tests.fault._util import make_state
path, stop = sys.argv[1], sys.argv[2]
n = 0
print("ready", flush=True)
while not os.path.exists(stop):
    shardckpt.save(make_state(n % 2), path, block_size=256)
    n += 1
print(n, flush=True)
"""


@pytest.mark.parametrize("verify", [True, False])
def test_reader_never_sees_a_spurious_corruption_during_overwrites(tmp_path, verify):
    path = str(tmp_path / "ck")
    a, b = make_state(0), make_state(1)
    shardckpt.save(a, path, block_size=256)
    stop = str(tmp_path / "stop")
    w = subprocess.Popen([PY, "-c", _OVERWRITER, path, stop], stdout=subprocess.PIPE, env=_ENV,
                         cwd=REPO)
    assert w.stdout is not None and w.stdout.readline().strip() == b"ready"
    loads = {"a": 0, "b": 0}
    errors: list[str] = []
    t_end = time.time() + 8
    try:
        while time.time() < t_end:
            try:
                out = load_fresh(path, a, verify=verify)
            except CorruptCheckpointError as e:
                errors.append(f"CorruptCheckpointError: {e}")
                continue
            except ShardckptError as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            if equal(out, a):
                loads["a"] += 1
            elif equal(out, b):
                loads["b"] += 1
            else:
                errors.append("neither the old nor the new data")
    finally:
        open(stop, "w").close()
        n = int(w.communicate(timeout=60)[0].strip())
    assert not errors, (len(errors), errors[:3])
    assert n >= 3 and loads["a"] + loads["b"] >= 10, (n, loads)
