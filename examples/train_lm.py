"""Train a small decoder-only LM under FSDP2, checkpointed with shardckpt.

    scripts/launch_multi_gpu.sh --nproc-per-node 4 examples/train_lm.py --ckpt-dir /tmp/ckpt
    # ...interrupted; later, on another world size:
    scripts/launch_multi_gpu.sh --nproc-per-node 2 examples/train_lm.py --ckpt-dir /tmp/ckpt --resume

Checkpointing uses the public API only: a `TrainState` (model, optimizer,
scheduler, data position, RNG, step) saved by a `CheckpointManager` as
`{"train": ts}` every --save-every steps; --resume is `mgr.restore({"train": ts})`.
The data is a seeded Markov chain (known loss floor); sequence i depends only on
(seed, i) and the global batch is fixed, so a run resumed on another number of
ranks sees the same tokens as the interrupted one.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset, DistributedSampler

try:  # launched from a checkout without `pip install -e .`
    import shardckpt
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shardckpt


class MarkovSequences(Dataset):
    """Sequences of a sparse random Markov chain (map-style; item i depends on (seed, i) only)."""

    def __init__(self, vocab: int, seq_len: int, num_sequences: int, seed: int,
                 fanout: int = 4) -> None:
        self.vocab, self.seq_len, self.n, self.seed = vocab, seq_len, num_sequences, seed
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab, (vocab, fanout), generator=g)
        probs = -torch.log(torch.rand(vocab, fanout, generator=g))  # Dirichlet(1) rows
        self.probs = probs / probs.sum(dim=1, keepdim=True)
        cum = self.probs.cumsum(dim=1)
        cum[:, -1] = 1.0
        self._succ: list[list[int]] = successors.tolist()
        self._cum: list[list[float]] = cum.tolist()

    def entropy_rate(self) -> float:
        return float(-(self.probs * self.probs.log()).sum(dim=1).mean())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(i))
        tok = int(torch.randint(0, self.vocab, (1,), generator=g))
        out = [tok]
        for u in torch.rand(self.seq_len, generator=g).tolist():
            row = self._cum[tok]
            tok = self._succ[tok][min(bisect.bisect_left(row, u), len(row) - 1)]
            out.append(tok)
        return torch.tensor(out, dtype=torch.long)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d_model: int, n_layers: int, n_heads: int,
                 max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)  # untied: simpler under FSDP2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


def init_distributed() -> tuple[int, int, str, torch.device]:
    backend = os.environ.get("SHARDCKPT_BACKEND", "auto")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:  # plain `python examples/train_lm.py`: a one-process group
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "0"))
    if backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), backend, device


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt-dir", type=Path, default=Path("out/train_lm_ckpt"))
    p.add_argument("--max-steps", type=int, default=200)
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every K steps (0: never)")
    p.add_argument("--keep-last", type=int, default=None, help="keep the newest N (default all)")
    p.add_argument("--resume", action="store_true", help="restore the newest valid checkpoint")
    p.add_argument("--stop-after", type=int, metavar="S", help="os._exit(17) after step S")
    p.add_argument("--summary-json", type=Path, help="rank 0 writes a run summary here")
    p.add_argument("--metrics-jsonl", type=Path, help="rank 0: a JSON line per step and save")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per step, all ranks")
    for flag, default in (("--log-every", 10), ("--seed", 1234), ("--vocab", 1024),
                          ("--d-model", 128), ("--n-layers", 3), ("--n-heads", 4),
                          ("--seq-len", 32), ("--warmup", 10), ("--lr", 1e-2),
                          ("--weight-decay", 0.01)):
        p.add_argument(flag, type=type(default), default=default)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    rank, world, backend, device = init_distributed()
    def log(msg: str) -> None:
        if rank == 0:
            print(msg)

    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by world size {world}")

    # Same seed on every rank: each rank keeps its slice of identical full parameters.
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.n_layers, args.n_heads, args.seq_len).to(device)
    mesh = init_device_mesh(device.type, (world,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup, args.max_steps))
    data = MarkovSequences(args.vocab, args.seq_len, args.max_steps * args.global_batch, args.seed)
    # Sequential and rank-strided: step k covers the same sequences at any world size.
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False,
                                 drop_last=True)
    loader = DataLoader(data, batch_size=args.global_batch // world, sampler=sampler)

    ts = shardckpt.TrainState(model=model, optimizer=optimizer, scheduler=scheduler,
                              dataloader=loader)
    state = {"train": ts}
    mgr = shardckpt.CheckpointManager(args.ckpt_dir, keep_last=args.keep_last)

    # Line-buffered, so the record survives a SIGKILL.
    metrics_f = open(args.metrics_jsonl, "a", buffering=1) if args.metrics_jsonl and rank == 0 else None

    def record(**r: Any) -> None:
        if metrics_f is not None:
            metrics_f.write(json.dumps(r) + "\n")

    # What scripts/demo_report.py reads from --summary-json.
    summary: dict[str, Any] = {
        "world_size": world, "backend": backend, "resumed_from_step": None, "resumed_from": None,
        "load_seconds": None, "last_step": 0, "first_loss": None,
        "last_loss": None, "loss_floor": round(data.entropy_rate(), 4),
        "wall_seconds": 0.0}

    def write_summary() -> None:
        if rank == 0 and args.summary_json is not None:
            summary["wall_seconds"] = round(time.perf_counter() - t_start, 3)
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2) + "\n")

    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train_lm] world={world} backend={backend} device={device} params={n_params:,} "
        f"state=TrainState loss floor~{summary['loss_floor']:.3f} "
        f"(ln vocab={math.log(args.vocab):.3f})")

    if args.resume:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            # After a world-size change TrainState warns that RNG streams differ;
            # this model draws no random numbers while training.
            warnings.filterwarnings("ignore", message=".*resuming a checkpoint saved at world")
            step = mgr.restore(state)
        if step is None:
            log(f"[train_lm] --resume: no committed checkpoint in {args.ckpt_dir}; starting fresh")
        else:
            path = next(i.path for i in mgr.list() if i.step == step)
            summary["load_seconds"] = round(time.perf_counter() - t0, 4)
            summary["resumed_from_step"], summary["resumed_from"] = step, path
            log(f"[train_lm] resumed from {path} at step {ts.step} "
                f"(load {summary['load_seconds']:.3f}s)")

    start = ts.step
    summary["last_step"] = start
    loss_sum = torch.zeros((), device=device)
    batches = iter(ts.dataloader)  # ResumableLoader: continues after the last batch handed out
    t_log = time.perf_counter()
    for step in range(start + 1, args.max_steps + 1):
        batch = next(batches).to(device)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ts.step = step

        loss_sum.copy_(loss.detach())
        dist.all_reduce(loss_sum)  # SUM (gloo has no AVG); equal shares of the global batch
        loss_val = loss_sum.item() / world
        if summary["first_loss"] is None:
            summary["first_loss"] = loss_val
        summary["last_loss"], summary["last_step"] = loss_val, step
        lr_now = scheduler.get_last_lr()[0]
        record(event="step", step=step, loss=round(loss_val, 6), lr=lr_now, world_size=world)
        if step % args.log_every == 0 or step == start + 1:
            now = time.perf_counter()
            log(f"[train_lm] step {step:5d}  loss {loss_val:.4f}  lr {lr_now:.2e}  "
                f"({now - t_log:.2f}s since last log)")
            t_log = now

        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            t0 = time.perf_counter()
            mgr.save(step, state)  # every rank; returns once committed (pointers + retention)
            secs = round(time.perf_counter() - t0, 4)
            info = next((i for i in mgr.list() if i.step == step), None) if rank == 0 else None
            nbytes = info.size_bytes if info else 0
            record(event="save", step=step, seconds=secs, bytes=nbytes,
                   path=info.path if info else None, world_size=world)
            if info:
                log(f"[train_lm] saved {info.path} in {secs:.3f}s ({nbytes / 1e6:.2f} MB)")
        elif mgr.step_boundary(step, state):  # SIGTERM/SIGUSR1 on any rank: saved, stop
            log(f"[train_lm] preempted: saved step {step}, exiting")
            break

        if args.stop_after is not None and step == args.stop_after:
            write_summary()
            log(f"[train_lm] --stop-after {step}: simulating a crash (os._exit(17) on every rank)")
            sys.stdout.flush()
            os._exit(17)  # no barrier, no close, no atexit: a crash leaves nothing tidy

    mgr.wait()
    mgr.close()
    write_summary()
    log(f"[train_lm] done: steps {start + 1}..{summary['last_step']}, "
        f"loss {summary['first_loss']} -> {summary['last_loss']}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
