"""Resumable iteration over a map-style DataLoader: epoch, position and generator.

`ResumableLoader` wraps a user's `DataLoader`. Iterating it runs the rest of the
current epoch; it counts the batches it hands out, so a checkpoint taken inside
the loop records exactly where to continue. On resume the already-consumed
batches are skipped as index lists (their samples are never loaded).

Exactness rests on replaying the loader's generator: at the start of every epoch
the generator state is recorded, and a resumed (or re-entered) epoch rewinds the
generator to it. The DataLoader then draws the workers' base seed and the
sampler's permutation from the same state as the uninterrupted run, so both the
order of samples and the generator state after the epoch match bit for bit.

World-size change (DistributedSampler only): the position is converted to the
number of samples consumed globally, `G`. Every rank of the old world consumed
positions ``r + N*j`` of the epoch's permutation, i.e. its first `G` positions
together, so the new world splits the remaining positions ``perm[G:]`` across its
ranks: nothing is skipped or repeated.
"""

from __future__ import annotations

import collections
import itertools
import warnings
from collections.abc import Iterable, Iterator, Sized
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler

from .seed import base_seed, derive_seed

__all__ = ["ResumableLoader"]


def _dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _SkipBatches:
    """Batch sampler that drops the first `skip` index lists of `batches` and
    remembers the length of each list it hands out, in order."""

    def __init__(self, batches: Iterable[list[int]], skip: int) -> None:
        self.batches = batches
        self.skip = skip
        self.lengths: collections.deque[int] = collections.deque()

    def __iter__(self) -> Iterator[list[int]]:
        # The inner sampler must still be iterated from the start: a RandomSampler
        # draws its permutation from the loader's generator on the first next().
        for batch in itertools.islice(iter(self.batches), self.skip, None):
            self.lengths.append(len(batch))
            yield batch

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)  # type: ignore[arg-type]


def resharded_indices(sampler: DistributedSampler, epoch: int, global_offset: int,
                      num_replicas: int, rank: int) -> list[int]:
    """This rank's indices for the rest of `epoch`, after `global_offset` samples of
    the epoch's permutation were consumed (possibly at another world size).

    Uses the permutation DistributedSampler uses (seed + epoch); pads (or, with
    drop_last, truncates) the remainder to a multiple of `num_replicas` the same
    way DistributedSampler pads a full epoch.
    """
    n = len(sampler.dataset)  # type: ignore[arg-type]
    if sampler.shuffle:
        g = torch.Generator()
        g.manual_seed(sampler.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
    else:
        perm = list(range(n))
    rest = perm[global_offset:]
    if sampler.drop_last:
        rest = rest[: len(rest) // num_replicas * num_replicas]
    elif rest and len(rest) % num_replicas:
        pad = num_replicas - len(rest) % num_replicas
        rest += (perm * (pad // n + 1))[:pad]
    return rest[rank::num_replicas]


class ResumableLoader:
    """Iterate a DataLoader epoch by epoch with a resumable position.

    ``for batch in rl:`` runs the remainder of epoch ``rl.epoch``; when the loop
    runs to the end, ``rl.epoch`` advances. Leaving the loop early (``break``)
    keeps the position, and the next loop continues from there. A batch counts as
    consumed as soon as it is yielded, so save after training on it.

    Requirements: a map-style dataset with batching (``batch_size`` or
    ``batch_sampler``); a shuffled loader that is not distributed must have
    ``generator=`` (see `shardckpt.make_generator`), since otherwise the
    permutation comes from the global torch RNG at an unrecorded moment.
    ``persistent_workers`` is turned off on the loader built per epoch: the worker
    base seed must be drawn at every epoch for the generator replay to be exact.
    Randomness inside ``Dataset.__getitem__`` in worker processes is reproduced
    exactly only when derived from the index (worker RNG streams depend on which
    worker fetched which batch, which a resume changes).
    """

    def __init__(self, loader: DataLoader) -> None:
        if loader.batch_sampler is None:
            raise ValueError("ResumableLoader needs a batching DataLoader (batch_size or "
                             "batch_sampler); batch_size=None is not supported.")
        if not isinstance(loader.batch_sampler, Sized) or not hasattr(loader.dataset, "__len__"):
            raise ValueError("ResumableLoader needs a map-style dataset with __len__ "
                             "(IterableDataset positions cannot be skipped by index).")
        sampler = loader.sampler
        if isinstance(sampler, RandomSampler) and sampler.generator is None:
            raise ValueError(
                "the DataLoader shuffles with the global torch RNG; pass "
                "generator=shardckpt.make_generator(seed) to DataLoader so the shuffle "
                "can be recorded and replayed on resume.")
        if loader.persistent_workers:
            warnings.warn("ResumableLoader starts workers per epoch (persistent_workers is "
                          "ignored) so that resumed epochs draw the same worker seeds.",
                          stacklevel=2)
        self.loader = loader
        rank, _ = _dist_rank_world()
        # The DataLoader draws the workers' base seed from its generator, or from the
        # global torch RNG when it has none; the global draw would shift every later
        # random op (dropout...) by a different amount in a resumed run. A private
        # generator keeps the global stream untouched.
        if loader.generator is not None:
            self.generator = loader.generator
        else:
            seed = sampler.seed if isinstance(sampler, DistributedSampler) else (
                base_seed() if base_seed() is not None else torch.initial_seed())
            self.generator = torch.Generator()
            self.generator.manual_seed(derive_seed(seed, rank))
        self.epoch = 0
        self.batches_consumed = 0  # by this rank, in the current epoch segment
        self.samples_consumed = 0
        # Samples of the epoch consumed globally before the current segment began
        # (non-zero only after resuming mid-epoch at another world size).
        self.global_offset = 0
        self._open = False
        self._epoch_start_state: torch.Tensor | None = None

    @property
    def distributed_sampler(self) -> DistributedSampler | None:
        s = self.loader.sampler
        return s if isinstance(s, DistributedSampler) else None

    def data_world_size(self) -> int:
        ds = self.distributed_sampler
        return ds.num_replicas if ds is not None else _dist_rank_world()[1]

    def global_samples_consumed(self) -> int:
        """Samples of the current epoch consumed by all ranks together (DistributedSampler)."""
        if self.distributed_sampler is None:
            return self.samples_consumed
        return self.global_offset + self.data_world_size() * self.samples_consumed

    def __len__(self) -> int:
        """Batches left in the current epoch for this rank."""
        return len(self._batches())

    def _batches(self) -> _SkipBatches:
        ds = self.distributed_sampler
        if ds is not None and self.global_offset:
            idx = resharded_indices(ds, self.epoch, self.global_offset, ds.num_replicas, ds.rank)
            bs = self.loader.batch_size
            if bs is None:
                raise ValueError("resuming at another world size needs DataLoader(batch_size=...)")
            inner: Iterable[list[int]] = BatchSampler(idx, bs, self.loader.drop_last)
        else:
            if hasattr(self.loader.sampler, "set_epoch"):
                self.loader.sampler.set_epoch(self.epoch)
            inner = self.loader.batch_sampler
        return _SkipBatches(inner, self.batches_consumed)

    def _epoch_loader(self, batches: _SkipBatches) -> DataLoader:
        src = self.loader
        return DataLoader(
            src.dataset, batch_sampler=batches, num_workers=src.num_workers,
            collate_fn=src.collate_fn, pin_memory=src.pin_memory, timeout=src.timeout,
            worker_init_fn=src.worker_init_fn,
            multiprocessing_context=src.multiprocessing_context, generator=self.generator,
            prefetch_factor=src.prefetch_factor if src.num_workers > 0 else None,
            persistent_workers=False, pin_memory_device=src.pin_memory_device,
            in_order=True,  # the consumed-batch count assumes batches arrive in index order
        )

    def __iter__(self) -> Iterator[Any]:
        if self._open:
            assert self._epoch_start_state is not None
            self.generator.set_state(self._epoch_start_state)
        else:
            self._epoch_start_state = self.generator.get_state()
            self.batches_consumed = 0
            self.samples_consumed = 0
            self.global_offset = 0
            self._open = True
        batches = self._batches()
        for batch in self._epoch_loader(batches):
            self.batches_consumed += 1
            self.samples_consumed += batches.lengths.popleft()
            yield batch
        self._open = False
        self.epoch += 1
        self.batches_consumed = 0
        self.samples_consumed = 0
        self.global_offset = 0

    def set_epoch(self, epoch: int) -> None:
        """Start `epoch` from its beginning at the next iteration."""
        if epoch != self.epoch or self._open:
            self.epoch = int(epoch)
            self._open = False
            self.batches_consumed = self.samples_consumed = self.global_offset = 0

    # -- checkpoint state ------------------------------------------------------

    def position(self) -> dict[str, Any]:
        """Replicated position (plain types): identical on every rank under a DistributedSampler."""
        return {
            "epoch": self.epoch,
            "open": self._open,
            "batches_consumed": self.batches_consumed,
            "samples_consumed": self.samples_consumed,
            "global_offset": self.global_offset,
            "global_samples_consumed": self.global_samples_consumed(),
            "world_size": self.data_world_size(),
            "distributed": self.distributed_sampler is not None,
        }

    def generator_state(self) -> torch.Tensor:
        """Generator state to store: the epoch-start state while an epoch is open, so
        the resumed epoch replays the same draws."""
        if self._open:
            assert self._epoch_start_state is not None
            return self._epoch_start_state.clone()
        return self.generator.get_state()

    def load_position(self, pos: dict[str, Any], generator_state: torch.Tensor | None,
                      *, new_rank_seed: int | None = None) -> bool:
        """Restore from `position()` / `generator_state()` of a checkpoint.

        `generator_state` is None for a rank that did not exist at save time; its
        generator is then seeded from `new_rank_seed`. Returns True when the
        position was converted to another world size.
        """
        self.epoch = int(pos["epoch"])
        self._open = bool(pos["open"])
        if generator_state is not None:
            state = generator_state.to(torch.uint8).clone()
        else:
            g = torch.Generator()
            g.manual_seed(int(new_rank_seed if new_rank_seed is not None else 0))
            state = g.get_state()
        self.generator.set_state(state)
        self._epoch_start_state = state if self._open else None
        resharded = (self.distributed_sampler is not None
                     and int(pos["world_size"]) != self.data_world_size())
        switched = bool(pos.get("distributed", self.distributed_sampler is not None)) != (
            self.distributed_sampler is not None)
        if switched and self._open:
            # A DistributedSampler's order and a plain sampler's are different permutations:
            # the samples consumed of one cannot be found in the other.
            warnings.warn(
                f"the data position was saved with "
                f"{'a DistributedSampler' if pos.get('distributed') else 'a plain sampler'} "
                f"and this loader uses "
                f"{'a DistributedSampler' if self.distributed_sampler is not None else 'a plain sampler'}"
                f": the samples consumed of epoch {self.epoch} cannot be identified in the new "
                f"order, so that epoch restarts from its beginning (some samples are seen twice,"
                f" none skipped). Resume with the same kind of sampler to continue exactly.",
                RuntimeWarning, stacklevel=3)
            self.global_offset = self.batches_consumed = self.samples_consumed = 0
            return True
        if resharded and self._open:
            # Restart the epoch's remaining positions as a new segment split over the new world.
            self.global_offset = int(pos["global_samples_consumed"])
            self.batches_consumed = self.samples_consumed = 0
        else:
            self.global_offset = int(pos["global_offset"])
            self.batches_consumed = int(pos["batches_consumed"])
            self.samples_consumed = int(pos["samples_consumed"])
        return resharded
