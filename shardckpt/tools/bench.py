"""`shardckpt bench`: a few-seconds save / load / codec benchmark on this machine.

The data mimics a trained model's float32/bfloat16 weights (normal values: the
exponent bytes compress, the mantissa bytes do not), so the codec numbers are
in the range real checkpoints get, not the flattering ones of zeros.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

import torch

from .. import codec
from .. import format as fmt


def _state(mb: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n32 = (mb << 20) * 3 // 4 // 4
    n16 = (mb << 20) // 4 // 2
    return {"w32": torch.randn(n32 // 1024, 1024, generator=g) * 0.02,
            "w16": (torch.randn(n16 // 1024, 1024, generator=g) * 0.02).bfloat16()}


def run_bench(size_mb: int = 64, *, directory: str | None = None, repeat: int = 2,
              threads: int | None = None) -> dict[str, Any]:
    """Save, load and codec throughput in MB/s (best of `repeat`), plus the codec path."""
    from ..api import load, save

    if size_mb < 1:
        raise ValueError(f"size_mb must be at least 1, not {size_mb}")
    if directory is not None:
        # Before the codec part runs for seconds: say at once what is wrong with the place.
        if not os.path.exists(directory):
            raise FileNotFoundError(f"{directory}: no such directory; --dir must name an "
                                    f"existing directory to write the benchmark into")
        if not os.path.isdir(directory):
            raise NotADirectoryError(f"{directory}: not a directory; --dir must name an "
                                     f"existing directory to write the benchmark into")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"{directory}: not writable; --dir must name a directory "
                                  f"this user can write into")
    state = _state(size_mb)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    cfg = codec.CodecConfig()
    raw = memoryview(state["w32"].reshape(-1).view(torch.uint8).numpy()).cast("B")
    enc, dec = [], []
    for _ in range(repeat):
        t0 = time.perf_counter()
        blocks = codec.encode_buffer(raw, fmt.group_size(torch.float32), cfg, threads)
        enc.append(time.perf_counter() - t0)
        out = bytearray(len(raw))
        mv = memoryview(out)
        t0 = time.perf_counter()
        pos = 0
        for stored, rec in blocks:
            codec.decode_block(memoryview(stored), rec, mv[pos:pos + rec[1]])
            pos += rec[1]
        dec.append(time.perf_counter() - t0)
        assert bytes(out[:64]) == bytes(raw[:64])
    stored_bytes = sum(len(s) for s, _ in blocks)
    res: dict[str, Any] = {
        "codec_path": codec.active_path(), "native_available": codec.native_available(),
        "threads": threads or codec.default_threads(), "size_mb": nbytes / 2**20,
        "codec_ratio_f32": len(raw) / stored_bytes,
        "encode_MBps": len(raw) / 2**20 / min(enc), "decode_MBps": len(raw) / 2**20 / min(dec),
    }
    with tempfile.TemporaryDirectory(dir=directory, prefix="shardckpt-bench-") as d:
        saves, loads = [], []
        for i in range(repeat):
            p = os.path.join(d, f"ckpt{i}")
            t0 = time.perf_counter()
            save(state, p, threads=threads)
            saves.append(time.perf_counter() - t0)
            target = {k: torch.empty_like(v) for k, v in state.items()}
            t0 = time.perf_counter()
            load(target, p, threads=threads)
            loads.append(time.perf_counter() - t0)
            assert all(torch.equal(target[k], state[k]) for k in state)
        res["save_MBps"] = nbytes / 2**20 / min(saves)
        res["load_MBps"] = nbytes / 2**20 / min(loads)
        res["directory"] = d if directory is None else directory
    return res


def format_bench(r: dict[str, Any]) -> str:
    path = r["codec_path"]
    note = "" if path == "native" else (" (native extension not built)" if not
                                        r["native_available"] else " (forced by SHARDCKPT_CODEC)")
    return "\n".join([
        f"codec path   {path}{note}, {r['threads']} thread{'s' if r['threads'] != 1 else ''}",
        f"data         {r['size_mb']:.0f} MiB of float32 + bfloat16 weights",
        f"codec        encode {r['encode_MBps']:.0f} MB/s, decode {r['decode_MBps']:.0f} MB/s, "
        f"ratio {r['codec_ratio_f32']:.2f}x (float32)",
        f"save         {r['save_MBps']:.0f} MB/s (encode + write + fsync + commit)",
        f"load         {r['load_MBps']:.0f} MB/s (read + checksum + decode)",
    ])
