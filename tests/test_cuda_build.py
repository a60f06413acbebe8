"""csrc/cuda/ compiles with nvcc and imports without a GPU, so the GPU path cannot rot.

nvcc comes from PyPI (`pip install -e .[cuda-build]`, which `make setup` does)
or from a CUDA toolkit. The module is built exactly as setup.py builds it
(csrc/cuda/build_cuda.py), into a temporary directory, then imported in a
child process that sees no GPU: import must work, every call that needs a
device must raise a clear CudaError, and bad arguments must be refused before
any CUDA call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_module():
    spec = importlib.util.spec_from_file_location(
        "shardckpt_build_cuda", os.path.join(ROOT, "csrc", "cuda", "build_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_cuda = _build_module()
NVCC = build_cuda.find_nvcc(allow_wheel=True)
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="no nvcc: `pip install -e .[cuda-build]` (make setup) or a CUDA toolkit")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    out_dir = tmp_path_factory.mktemp("cuda_ext")
    out = os.path.join(out_dir, "_cuda" + build_cuda.ext_suffix())
    cmds = build_cuda.build(out, NVCC, ccbin="g++", arches=("80", "90"),
                            build_dir=str(out_dir / "obj"))
    assert any("sm_80" in " ".join(c) for c in cmds) and any("sm_90" in " ".join(c) for c in cmds)
    assert os.path.getsize(out) > 0
    return out


CHILD = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("_cuda", sys.argv[1])
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
out = {"names": sorted(n for n in dir(m) if not n.startswith("__")),
       "device_count": m.device_count(), "problem": m.device_problem(),
       "runtime": m.runtime_version(), "version": m.version(), "stats": m.stats(),
       "is_runtime_error": issubclass(m.CudaError, RuntimeError)}

def outcome(f):
    try:
        f()
    except Exception as e:
        return [type(e).__name__, str(e.args[0]) if e.args else ""]
    return ["no error", ""]

out["pinned"] = outcome(lambda: m.PinnedBuffer(1 << 20))
out["outside_pinned"] = outcome(lambda: m.snapshot(None, [(0, 4096, 16, True, 0)], [], 0, 0, 0, 1))
out["no_ring"] = outcome(lambda: m.snapshot(None, [(0, 4096, 16, False, 8192)], [], 0, 0, 0, 1))
out["bad_segment"] = outcome(lambda: m.snapshot(None, [(0, 1)], [], 0, 0, 0, 1))
out["bad_pinned"] = outcome(lambda: m.snapshot(b"x", [], [], 0, 0, 0, 1))
out["empty"] = m.snapshot(None, [], [], 0, 0, 0, 1)
print(json.dumps(out))
"""


def _child(path: str) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # a GPU machine must behave the same
    r = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_nvcc
def test_builds_and_imports_without_a_gpu(built: str) -> None:
    out = _child(built)
    assert {"CudaError", "PinnedBuffer", "snapshot", "device_count", "device_problem", "stats",
            "runtime_version", "version"} <= set(out["names"])
    assert out["device_count"] == 0 and out["problem"]
    assert out["runtime"] >= 12000 and out["version"] == "0.1.0"
    assert out["stats"] == {"pinned_bytes": 0, "pinned_allocations": 0, "copy_streams": 0}
    assert out["is_runtime_error"]
    # Needing a device: a clear CudaError naming what is missing.
    kind, msg = out["pinned"]
    assert kind == "CudaError" and "no usable CUDA device" in msg and "driver" in msg, out
    # Bad layouts are refused before any CUDA call, with a ValueError saying why.
    assert out["outside_pinned"] == ["ValueError", "segment 0: [0, +16) is outside the pinned "
                                     "buffer"]
    assert out["no_ring"] == ["ValueError", "segment 0 is streamed but there is no ring slot"]
    assert out["bad_segment"][0] == "TypeError"
    assert out["bad_pinned"] == ["TypeError", "pinned must be a PinnedBuffer or None"]
    assert out["empty"]["direct_bytes"] == 0 and out["empty"]["chunks"] == 0


@needs_nvcc
@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")
def test_exports_only_the_module_init(built: str) -> None:
    r = subprocess.run(["nm", "-D", "--defined-only", built], capture_output=True, text=True,
                       check=True)
    strong = [ln.split()[-1] for ln in r.stdout.splitlines() if ln.split()[1:2] == ["T"]]
    assert strong == ["PyInit__cuda"], strong
    # The static CUDA runtime stays private: it must not interpose on torch's libcudart.
    assert not [ln for ln in r.stdout.splitlines() if " cuda" in ln], r.stdout


def test_python_side_without_the_extension_or_a_gpu() -> None:
    import torch

    from shardckpt.gpu import staging

    if torch.cuda.is_available() and staging._cuda is not None:
        pytest.skip("this machine has a GPU and the extension: the CUDA tests cover it")
    assert staging.unavailable_reason()
    assert not staging.handles({"x": torch.ones(3)})
    assert staging.stats()["pinned_allocations"] == 0
    with pytest.raises(ValueError, match="below the minimum"):
        staging.CudaStager(pinned_cap=1024)
    with pytest.raises(ValueError, match="SHARDCKPT_PINNED_CAP_BYTES"):
        os.environ["SHARDCKPT_PINNED_CAP_BYTES"] = "lots"
        try:
            staging.default_pinned_cap()
        finally:
            del os.environ["SHARDCKPT_PINNED_CAP_BYTES"]
