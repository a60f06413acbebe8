"""Training worker for the TrainState tests: a small dropout MLP, a shuffling
DataLoader with worker processes, AdamW and a StepLR that decays mid-run.

One invocation = one set of processes (spawned here, gloo on CPU). It trains
until `--until` completed steps, optionally restoring from `--load` first and
saving at `--save-at` (then exiting, like a job that was stopped). Every rank
writes what the test compares to `--out`/rank<r>[_<variant>].pt.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
)
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import shardckpt
from shardckpt.training.seed import make_generator, seed_worker, set_seed
from shardckpt.training.train_state import TrainState

SEED = 1234


class IndexedData(Dataset):
    """Deterministic samples that also report their index, so tests can check coverage."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(99)
        self.x = torch.randn(n, 8, generator=g)
        self.y = torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Dropping:
    """A TrainState with one piece removed from what is saved and loaded."""

    def __init__(self, ts: TrainState, drop: str) -> None:
        self.ts, self.drop = ts, drop

    def state_dict(self) -> dict:
        sd = self.ts.state_dict()
        rank_key = f"__rank{dist.get_rank() if dist.is_initialized() else 0}__"
        if self.drop == "rng":
            sd.get(rank_key, {}).pop("rng", None)
        elif self.drop == "scheduler":
            sd.pop("scheduler")
        elif self.drop == "data":
            sd.pop("data")
            sd.get(rank_key, {}).pop("loader_generator", None)
        return sd

    def load_state_dict(self, sd: dict) -> None:
        self.ts.load_state_dict(sd)


def build(args: argparse.Namespace, world: int) -> TrainState:
    # Same seed on every rank: FSDP2 shards one identical initialisation.
    set_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3),
        torch.nn.Linear(16, 1))
    if args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model[0])
        fully_shard(model[3])
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=args.decay_every, gamma=0.5)
    data = IndexedData(args.samples)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers,
                  worker_init_fn=seed_worker)
    if args.num_workers:
        # Ranks are spawned, and DataLoader would then spawn its workers too
        # (seconds of torch import each, every epoch); fork is what torchrun users get.
        common["multiprocessing_context"] = "fork"
    if args.mode == "fsdp":
        loader = DataLoader(data, sampler=DistributedSampler(data, shuffle=True, seed=3),
                            **common)
    else:
        loader = DataLoader(data, shuffle=True, generator=make_generator(7), **common)
    return TrainState(model=model, optimizer=opt, scheduler=sched, dataloader=loader)


def full_state(ts: TrainState) -> dict[str, torch.Tensor]:
    """Unsharded model + optimizer tensors (collective; filled on rank 0)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # Clone: full state dicts can alias live tensors (the optimizer's step counter).
    out = {f"model.{k}": v.clone()
           for k, v in get_model_state_dict(ts.model, options=opts).items()}
    osd = get_optimizer_state_dict(ts.model, ts.optimizer, options=opts)
    for fqn, st in osd.get("state", {}).items():
        for name, v in st.items():
            out[f"optim.{fqn}.{name}"] = torch.as_tensor(v).clone()
    for i, g in enumerate(osd.get("param_groups", [])):
        out[f"optim.group{i}.lr"] = torch.as_tensor(g["lr"], dtype=torch.float64)
    return out


def train(ts: TrainState, until: int, save_at: int | None, save_fn) -> dict:
    rec: dict = {"losses": [], "lrs": [], "indices": {}}
    while ts.step < until:
        for x, y, idx in ts.dataloader:
            rec["indices"].setdefault(ts.epoch, []).extend(idx.tolist())
            rec["lrs"].append(ts.scheduler.get_last_lr()[0])
            loss = torch.nn.functional.mse_loss(ts.model(x), y)
            ts.optimizer.zero_grad()
            loss.backward()
            ts.optimizer.step()
            ts.scheduler.step()
            ts.step += 1
            rec["losses"].append(loss.detach().clone())
            if save_at is not None and ts.step == save_at:
                save_fn()
                return rec
            if ts.step >= until:
                break
    return rec


def run(rank: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    world = args.world_size
    if args.mode == "fsdp" or world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}",
                                rank=rank, world_size=world)
    variants = args.drop.split(",") if args.drop else [None]
    for variant in variants:
        ts = build(args, world)
        holder = Dropping(ts, variant) if variant else ts
        record: dict = {"warnings": []}
        if args.load:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                shardckpt.load({"train": holder}, args.load, strict=variant is None)
            record["warnings"] = [str(w.message) for w in caught
                                  if issubclass(w.category, RuntimeWarning)]
            record["resumed_step"] = ts.step
            record["after_load"] = full_state(ts)
        rec = train(ts, args.until, args.save_at,
                    lambda h=holder: shardckpt.save({"train": h}, args.save))
        record.update(rec)
        record["final"] = full_state(ts)
        record["step"] = ts.step
        suffix = f"_{variant}" if variant else ""
        torch.save(record, os.path.join(args.out, f"rank{rank}{suffix}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=["plain", "fsdp"], default="plain")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--port", type=int, default=29500)
    p.add_argument("--until", type=int, required=True)
    p.add_argument("--save", default=None)
    p.add_argument("--save-at", type=int, default=None)
    p.add_argument("--load", default=None)
    p.add_argument("--drop", default="", help="comma list of rng,scheduler,data")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--decay-every", type=int, default=5)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if args.world_size == 1 and args.mode == "plain":
        run(0, args)
    else:
        mp.start_processes(run, args=(args,), nprocs=args.world_size, start_method="spawn")


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*native codec extension not built.*")
    sys.exit(main())
