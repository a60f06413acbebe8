"""Train a small decoder-only language model under FSDP2 with periodic shardckpt checkpoints.

Launch (any world size, including 1; gloo on CPU, NCCL on GPUs):

    scripts/launch_multi_gpu.sh --nproc-per-node 4 examples/train_lm.py \
        --ckpt-dir /tmp/ckpt --max-steps 200 --save-every 20
    # ...interrupted; later, on another world size:
    scripts/launch_multi_gpu.sh --nproc-per-node 2 examples/train_lm.py \
        --ckpt-dir /tmp/ckpt --max-steps 200 --save-every 20 --resume

The data is a seeded random Markov chain over the vocabulary, so the loss has a
known floor (the chain's entropy) and really decreases. Sequence ``i`` is a pure
function of ``(seed, i)`` and the *global* batch size is fixed, so a run resumed
on a different number of ranks sees exactly the tokens the interrupted run
would have seen: the losses of the steps recomputed after a resume match the
original ones up to float reduction order.

The checkpoint is ``{"train": shardckpt.TrainState(model, optimizer, scheduler,
dataloader)}``; ``--no-train-state`` (or a shardckpt without TrainState) uses a
small get_state_dict/set_state_dict Stateful instead.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset, DistributedSampler

try:  # launched from a checkout without `pip install -e .`
    import shardckpt
except ImportError:  # pragma: no cover - depends on how the script is started
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import shardckpt

STEP_DIR_RE = re.compile(r"^step_(\d{8})$")

# ----------------------------------------------------------------------------- storage


def ckpt_save(state: dict[str, Any], path: str) -> None:
    shardckpt.save(state, path)


def ckpt_load(state: dict[str, Any], path: str) -> None:
    shardckpt.load(state, path)


def is_committed(path: Path) -> bool:
    # shardckpt renames a checkpoint into place only after rank 0 wrote the
    # manifest, so a step_* directory without one was never fully published.
    return (path / "manifest.json").is_file()


def newest_committed(ckpt_dir: Path) -> tuple[int, Path] | None:
    """The committed checkpoint with the highest step, or None."""
    best: tuple[int, Path] | None = None
    if not ckpt_dir.is_dir():
        return None
    for entry in ckpt_dir.iterdir():
        m = STEP_DIR_RE.match(entry.name)
        if m and entry.is_dir() and is_committed(entry):
            step = int(m.group(1))
            if best is None or step > best[0]:
                best = (step, entry)
    return best


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- data


class MarkovSequences(Dataset):
    """Sequences of a sparse random Markov chain over the vocabulary (map-style).

    Each token has ``fanout`` possible successors with Dirichlet-random
    probabilities, so the best achievable loss is the chain's entropy rate, well
    below ln(vocab). Item ``i`` is a pure function of ``(seed, i)``: any rank, at
    any world size, before or after a resume, gets the same tokens for it.
    """

    def __init__(self, vocab: int, seq_len: int, num_sequences: int, seed: int,
                 fanout: int = 4) -> None:
        self.vocab, self.seq_len, self.n, self.seed = vocab, seq_len, num_sequences, seed
        g = torch.Generator().manual_seed(seed)
        successors = torch.randint(0, vocab, (vocab, fanout), generator=g)
        # Normalised exponentials are Dirichlet(1) draws; torch's Dirichlet takes
        # no generator, and the chain must not depend on the global RNG.
        probs = -torch.log(torch.rand(vocab, fanout, generator=g))
        self.probs = probs / probs.sum(dim=1, keepdim=True)
        cum = self.probs.cumsum(dim=1)
        cum[:, -1] = 1.0
        # Plain lists: walking the chain token by token in Python is far cheaper
        # than one tensor op per token.
        self._succ: list[list[int]] = successors.tolist()
        self._cum: list[list[float]] = cum.tolist()

    def entropy_rate(self) -> float:
        """Approximate loss floor in nats (row entropies, uniformly averaged)."""
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


def make_loader(ds: MarkovSequences, global_batch: int, rank: int, world: int) -> DataLoader:
    """Sequential, rank-strided loader.

    Global step k covers sequences ``k*global_batch .. (k+1)*global_batch - 1``
    whatever the world size, so runs on 4 and on 2 ranks train on exactly the
    same tokens at every step.
    """
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=False, drop_last=True)
    return DataLoader(ds, batch_size=global_batch // world, sampler=sampler, num_workers=0)


# ----------------------------------------------------------------------------- model


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.ln2 = nn.LayerNorm(d_model)
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
        # Untied head: tied weights shared across FSDP units need extra care and
        # buy nothing in a demo.
        self.head = nn.Linear(d_model, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------- checkpoint state


class AppState:
    """DCP Stateful with model, optimizer, scheduler and step (``--no-train-state``).

    get_state_dict/set_state_dict turn FSDP2 parameters and optimizer state into
    DTensors with fully-qualified-name keys, which is what lets a checkpoint
    written on N ranks reshard onto M ranks. The data position is the step: the
    loader is sequential, so a resumed run skips ``step`` batches.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "scheduler": self.scheduler.state_dict(),
                "step": self.step}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"],
                       optim_state_dict=sd["optim"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.step = int(sd["step"])


class RunState:
    """The checkpointed state and the data stream, whichever API holds them.

    With shardckpt.TrainState (the default when it exists) the checkpoint is
    ``{"train": TrainState(...)}``; TrainState wraps the loader in a
    ResumableLoader that records the data position and converts it when the
    world size changes. Otherwise it is ``{"app": AppState(...)}``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, loader: DataLoader,
                 use_train_state: bool) -> None:
        train_state_cls = None
        if use_train_state:
            try:  # imported lazily by shardckpt; absent from older checkouts
                train_state_cls = shardckpt.TrainState
            except (AttributeError, ImportError):
                pass
        self.loader = loader
        self.holder: Any
        if train_state_cls is not None:
            self.holder = train_state_cls(model=model, optimizer=optimizer,
                                          scheduler=scheduler, dataloader=loader)
            self.state: dict[str, Any] = {"train": self.holder}
        else:
            self.holder = AppState(model, optimizer, scheduler)
            self.state = {"app": self.holder}
        self.api = type(self.holder).__name__
        self._batches: Iterator[torch.Tensor] | None = None

    @property
    def step(self) -> int:
        return int(self.holder.step)

    @step.setter
    def step(self, value: int) -> None:
        self.holder.step = value

    def prepare_load(self, path: Path) -> None:
        # Needed only when the world grew, harmless otherwise: tells TrainState
        # which ranks' private (RNG) keys the checkpoint holds.
        if hasattr(self.holder, "prepare_load"):
            self.holder.prepare_load(str(path))

    def next_batch(self) -> torch.Tensor:
        if self._batches is None:
            if isinstance(self.holder, AppState):
                self._batches = itertools.islice(iter(self.loader), self.step, None)
            else:  # ResumableLoader: continues after the last batch it handed out
                self._batches = iter(self.holder.dataloader)
        return next(self._batches)


# ----------------------------------------------------------------------------- setup


@dataclass
class Dist:
    rank: int
    world: int
    backend: str
    device: torch.device


def init_distributed() -> Dist:
    backend = os.environ.get("SHARDCKPT_BACKEND", "auto")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "RANK" not in os.environ:
        # Plain `python examples/train_lm.py`: a one-process group, so the same
        # FSDP2 + checkpoint code path runs as under torchrun.
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), backend, device)


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to ``min_ratio`` of the peak."""

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
    p.add_argument("--resume", action="store_true", help="restore the newest committed checkpoint")
    p.add_argument("--stop-after", type=int, default=None, metavar="S",
                   help="simulate a crash: every rank calls os._exit(17) right after step S")
    p.add_argument("--summary-json", type=Path, default=None,
                   help="rank 0 writes a JSON summary of the run here at the end")
    p.add_argument("--metrics-jsonl", type=Path, default=None,
                   help="rank 0 appends one JSON line per step and per save, flushed at once, "
                        "so the record survives a SIGKILL")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=3)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--global-batch", type=int, default=8,
                   help="sequences per step over all ranks (must divide by the world size)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--no-train-state", action="store_true",
                   help="use get_state_dict/set_state_dict even if shardckpt.TrainState exists")
    return p.parse_args(argv)


@dataclass
class Summary:
    world_size: int
    backend: str
    storage: str
    state_api: str
    resumed_from_step: int | None = None
    resumed_from: str | None = None
    load_seconds: float | None = None
    start_step: int = 0
    last_step: int = 0
    steps_run: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    loss_floor: float | None = None
    losses: dict[str, float] = field(default_factory=dict)
    saves: list[dict[str, Any]] = field(default_factory=list)
    save_seconds: list[float] = field(default_factory=list)
    bytes_on_disk: int = 0
    interrupted: bool = False
    wall_seconds: float = 0.0


def write_summary(summary: Summary, path: Path | None, ckpt_dir: Path, t_start: float) -> None:
    if path is None:
        return
    newest = newest_committed(ckpt_dir)
    summary.bytes_on_disk = dir_bytes(newest[1]) if newest else 0
    summary.wall_seconds = round(time.perf_counter() - t_start, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(summary.__dict__, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Line-buffered JSONL on rank 0; a no-op elsewhere or without a path."""

    def __init__(self, path: Path | None, enabled: bool) -> None:
        self.f = None
        if path is not None and enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(path, "a", buffering=1)

    def write(self, **record: Any) -> None:
        if self.f is not None:
            self.f.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    d = init_distributed()
    log = print if d.rank == 0 else (lambda *a, **k: None)
    if args.global_batch % d.world:
        raise SystemExit(f"--global-batch {args.global_batch} must divide by world size {d.world}")

    # Same seed on every rank: fully_shard keeps each rank's slice of identical
    # full parameters, so the sharded model equals the unsharded one.
    torch.manual_seed(args.seed)
    model = TinyLM(args.vocab, args.d_model, args.n_layers, args.n_heads, args.seq_len).to(d.device)
    mesh = init_device_mesh(d.device.type, (d.world,))
    for blk in model.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                  lr_lambda(args.warmup, args.max_steps))
    data = MarkovSequences(args.vocab, args.seq_len, args.max_steps * args.global_batch, args.seed)
    run = RunState(model, optimizer, scheduler, make_loader(data, args.global_batch, d.rank, d.world),
                   use_train_state=not args.no_train_state)

    metrics = MetricsLog(args.metrics_jsonl, d.rank == 0)
    summary = Summary(world_size=d.world, backend=d.backend, storage="shardckpt",
                      state_api=run.api, loss_floor=round(data.entropy_rate(), 4))
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train_lm] world={d.world} backend={d.backend} device={d.device} params={n_params:,} "
        f"state={run.api} loss floor~{summary.loss_floor:.3f} "
        f"(ln vocab={math.log(args.vocab):.3f})", flush=True)

    if args.resume:
        found = newest_committed(args.ckpt_dir)
        if found is None:
            log(f"[train_lm] --resume: no committed checkpoint in {args.ckpt_dir}; starting fresh",
                flush=True)
        else:
            step, path = found
            run.prepare_load(path)
            dist.barrier()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                # TrainState warns that RNG streams differ after a world-size change;
                # this model draws no random numbers while training.
                warnings.filterwarnings("ignore", message=".*resuming a checkpoint saved at world")
                ckpt_load(run.state, str(path))
            dist.barrier()
            summary.load_seconds = round(time.perf_counter() - t0, 4)
            summary.resumed_from_step, summary.resumed_from = run.step, str(path)
            if run.step != step:
                raise RuntimeError(f"{path} holds step {run.step}, its name says {step}")
            metrics.write(event="load", step=step, seconds=summary.load_seconds,
                          world_size=d.world)
            log(f"[train_lm] resumed from {path} at step {run.step} "
                f"(load {summary.load_seconds:.3f}s)", flush=True)

    start = run.step
    summary.start_step = summary.last_step = start
    args.ckpt_dir.mkdir(parents=True, exist_ok=True)
    loss_sum = torch.zeros((), device=d.device)
    t_log = time.perf_counter()
    for step in range(start + 1, args.max_steps + 1):
        batch = run.next_batch().to(d.device)
        x, y = batch[:, :-1], batch[:, 1:]
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        run.step = step

        # Global mean loss: every rank holds an equal share of the global batch.
        loss_sum.copy_(loss.detach())
        dist.all_reduce(loss_sum)  # SUM: gloo has no AVG
        loss_val = loss_sum.item() / d.world
        summary.losses[str(step)] = round(loss_val, 6)
        summary.first_loss = summary.first_loss if summary.first_loss is not None else loss_val
        summary.last_loss, summary.last_step = loss_val, step
        summary.steps_run += 1
        lr_now = scheduler.get_last_lr()[0]
        metrics.write(event="step", step=step, loss=round(loss_val, 6), lr=lr_now,
                      world_size=d.world)
        if step % args.log_every == 0 or step == start + 1:
            now = time.perf_counter()
            log(f"[train_lm] step {step:5d}  loss {loss_val:.4f}  lr {lr_now:.2e}  "
                f"({now - t_log:.2f}s since last log)", flush=True)
            t_log = now

        if args.save_every and (step % args.save_every == 0 or step == args.max_steps):
            path = args.ckpt_dir / f"step_{step:08d}"
            dist.barrier()
            t0 = time.perf_counter()
            ckpt_save(run.state, str(path))
            dist.barrier()
            secs = time.perf_counter() - t0
            nbytes = dir_bytes(path) if d.rank == 0 else 0
            summary.saves.append({"step": step, "seconds": round(secs, 4), "bytes": nbytes})
            summary.save_seconds.append(round(secs, 4))
            metrics.write(event="save", step=step, seconds=round(secs, 4), bytes=nbytes,
                          path=str(path), world_size=d.world)
            log(f"[train_lm] saved {path} in {secs:.3f}s ({nbytes / 1e6:.2f} MB)", flush=True)

        if args.stop_after is not None and step == args.stop_after:
            summary.interrupted = True
            if d.rank == 0:
                write_summary(summary, args.summary_json, args.ckpt_dir, t_start)
            log(f"[train_lm] --stop-after {step}: simulating a crash (os._exit(17) on every rank)",
                flush=True)
            # No barrier, no destroy_process_group, no atexit: a crash leaves nothing tidy.
            sys.stdout.flush()
            os._exit(17)

    if d.rank == 0:
        write_summary(summary, args.summary_json, args.ckpt_dir, t_start)
    log(f"[train_lm] done: steps {start + 1}..{summary.last_step}, "
        f"loss {summary.first_loss} -> {summary.last_loss}", flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
