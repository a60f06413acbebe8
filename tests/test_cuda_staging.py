"""The GPU data path on a real GPU: snapshot semantics, bitwise round trips, pool reuse, errors.

Skipped where torch sees no CUDA device. Where it does, the extension must be
built (benchmarks/gpu_check.sh builds it): a missing one fails loudly instead
of silently testing torch's copies.
"""

from __future__ import annotations

import os
import time
import warnings

import pytest
import torch

import shardckpt
from shardckpt import async_save as async_mod
from shardckpt.errors import SaveFailedError
from shardckpt.gpu import staging

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _extension_built() -> None:
    assert staging._cuda is not None, ("torch sees a GPU but shardckpt._cuda is not built: "
                                       "pip install -e . with nvcc on PATH (docs/GPU.md)")
    assert staging.available(), staging.unavailable_reason()


def _fresh_pools() -> None:
    """Finish in-flight saves and drop the pools, so the next save builds a stager anew."""
    async_mod._saver.drain_at_exit()
    async_mod._saver.inflight.clear()
    async_mod._saver.pools.clear()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def _state(mb: int = 64, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    n = mb << 18  # fp32 elements for `mb` MiB
    return {
        "w": torch.randn(n, generator=g, device="cuda"),
        "h": torch.randn(n // 2, generator=g, device="cuda").to(torch.bfloat16),
        "opt": {"exp_avg": torch.randn(1000, 333, generator=g, device="cuda"),
                "step": torch.tensor(7.0),  # CPU tensor beside the CUDA ones
                "t": torch.randn(256, 128, generator=g, device="cuda").t()},  # strided
        "empty": torch.empty(0, device="cuda"),
        "scalar": torch.tensor(3.5, device="cuda", dtype=torch.bfloat16),
    }


def _zeros_like(state: dict) -> dict:
    return {k: _zeros_like(v) if isinstance(v, dict) else
            torch.zeros(v.shape, dtype=v.dtype, device=v.device) for k, v in state.items()}


def _assert_bitwise(got: dict, want: dict) -> None:
    for k, v in want.items():
        if isinstance(v, dict):
            _assert_bitwise(got[k], v)
        else:
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            assert torch.equal(_bits(got[k]), _bits(v)), k


def _clone(state: dict) -> dict:
    return {k: _clone(v) if isinstance(v, dict) else v.detach().clone()
            for k, v in state.items()}


def test_inplace_update_right_after_the_call_never_leaks(tmp_path) -> None:
    state = _state(128)
    want = _clone(state)
    before = staging.stats()["copy_streams"]
    h = shardckpt.async_save(state, tmp_path / "c")
    # The training loop goes on at once, on the same stream, in place.
    state["w"].mul_(-2)
    state["h"].add_(1)
    state["opt"]["exp_avg"].zero_()
    h.wait()
    assert staging.stats()["copy_streams"] >= max(before, 2)  # the extension did the copies
    got = _zeros_like(want)
    shardckpt.load(got, tmp_path / "c")
    _assert_bitwise(got, want)


def _cycles_per_second() -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    return 50_000_000 / (time.perf_counter() - t0)


def test_snapshot_sees_work_queued_before_the_call(tmp_path) -> None:
    state = {"x": torch.zeros(1 << 22, device="cuda")}
    torch.cuda._sleep(int(_cycles_per_second() * 0.5))  # pending work on the training stream
    state["x"].fill_(3.0)  # queued before the call: must be in the checkpoint
    h = shardckpt.async_save(state, tmp_path / "c")
    state["x"].fill_(4.0)  # queued after: must not
    h.wait()
    got = {"x": torch.empty(1 << 22, device="cuda")}
    shardckpt.load(got, tmp_path / "c")
    assert torch.equal(got["x"], torch.full_like(got["x"], 3.0))


def test_no_device_wide_synchronize(tmp_path) -> None:
    """A long kernel on another stream must not hold the snapshot up."""
    side = torch.cuda.Stream()
    cps = _cycles_per_second()
    state = {"x": torch.randn(1 << 20, device="cuda")}
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(int(cps * 3.0))
    t0 = time.perf_counter()
    h = shardckpt.async_save(state, tmp_path / "c")
    stall = time.perf_counter() - t0
    h.wait()
    assert stall < 1.5, f"async_save waited {stall:.2f}s for an unrelated stream"
    torch.cuda.synchronize()


def test_bitwise_roundtrip_bf16_fp32_through_async_save_and_load(tmp_path) -> None:
    state = _state(32, seed=1)
    want = _clone(state)
    shardckpt.async_save(state, tmp_path / "c").wait()
    got = _zeros_like(want)
    shardckpt.load(got, tmp_path / "c")
    _assert_bitwise(got, want)
    # The Python codec reads the same bytes: the format is the CPU reader's.
    os.environ["SHARDCKPT_CODEC"] = "python"
    try:
        cpu = {k: ({kk: vv.cpu() for kk, vv in v.items()} if isinstance(v, dict) else v.cpu())
               for k, v in _zeros_like(want).items()}
        shardckpt.load(cpu, tmp_path / "c")
        _assert_bitwise(cpu, want)
    finally:
        del os.environ["SHARDCKPT_CODEC"]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_pool_reused_across_20_saves_without_growth(tmp_path) -> None:
    _fresh_pools()
    state = _state(64, seed=2)
    shardckpt.async_save(state, tmp_path / "warm").wait()
    s0, rss0 = staging.stats(), _rss()
    for i in range(20):
        state["w"].add_(1)
        shardckpt.async_save(state, tmp_path / f"c{i % 2}").wait()
    s1, rss1 = staging.stats(), _rss()
    assert s1["pinned_allocations"] == s0["pinned_allocations"], (s0, s1)
    # <=: buffers of pools dropped before this test may still be collected meanwhile.
    assert s1["pinned_bytes"] <= s0["pinned_bytes"]
    assert rss1 - rss0 < 256 << 20, f"RSS grew {(rss1 - rss0) >> 20} MiB over 20 saves"
    got = _zeros_like(state)
    shardckpt.load(got, tmp_path / "c1")
    _assert_bitwise(got, state)


def test_state_larger_than_the_cap_streams_through_the_pool(tmp_path, monkeypatch) -> None:
    _fresh_pools()
    cap = 16 << 20
    monkeypatch.setenv("SHARDCKPT_PINNED_CAP_BYTES", str(cap))
    state = _state(96, seed=3)  # ~150 MiB: ten times the cap
    want = _clone(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        h = shardckpt.async_save(state, tmp_path / "c")
        state["w"].mul_(3)
        h.wait()
    # The blocking fallback warns: it must not have run.
    assert not [w for w in caught if "exceeds staging_cap_bytes" in str(w.message)]
    (pool,) = [p for _, p in async_mod._saver.inflight]
    stager = pool._cuda_stager
    assert stager.pinned_bytes == cap
    assert stager.last["streamed_bytes"] > 100 << 20 and stager.last["chunks"] > 4
    assert stager.last["direct_bytes"] > 0
    got = _zeros_like(want)
    shardckpt.load(got, tmp_path / "c")
    _assert_bitwise(got, want)
    # Reused as is by the next save: no new pinned memory.
    allocs = staging.stats()["pinned_allocations"]
    shardckpt.async_save(state, tmp_path / "d").wait()
    assert staging.stats()["pinned_allocations"] == allocs
    _fresh_pools()


def test_stager_direct_use_and_errors() -> None:
    with pytest.raises(ValueError, match="below the minimum"):
        staging.CudaStager(pinned_cap=4096)
    st = staging.CudaStager(pinned_cap=8 << 20)
    bad = {"ok": torch.ones(4, device="cuda"), "m": torch.empty(4, device="meta")}
    with pytest.raises(SaveFailedError, match=r"'m' is on meta"):
        st.stage(bad)
    with pytest.raises(ValueError, match="does not exist"):
        staging._cuda.PinnedBuffer(1 << 20, torch.cuda.device_count())
    out = st.stage({"a": torch.arange(10, device="cuda", dtype=torch.float32)})
    assert out["a"].device.type == "cpu" and torch.equal(out["a"], torch.arange(10.0))


def test_a_failed_cuda_call_raises_cuda_error_and_leaves_the_path_usable() -> None:
    allocs = staging.stats()["pinned_allocations"]
    with pytest.raises(staging._cuda.CudaError, match="cudaHostAlloc of 1125899906842624 bytes"):
        staging._cuda.PinnedBuffer(1 << 50, 0)
    assert staging.stats()["pinned_allocations"] == allocs
    out = staging.CudaStager(pinned_cap=8 << 20).stage({"a": torch.ones(5, device="cuda")})
    assert torch.equal(out["a"], torch.ones(5))
