"""Seeding helpers: one call seeds every RNG a training run touches.

`set_seed` records the seed so `TrainState` can store it and derive seeds for
ranks that did not exist when a checkpoint was saved (world-size change).
"""

from __future__ import annotations

import os
import random
import warnings

import numpy as np
import torch

__all__ = ["set_seed", "seed_worker", "make_generator", "base_seed", "derive_seed"]

# NumPy's legacy global seeding accepts only 32-bit seeds.
_NP_SEED_MOD = 2**32

_base_seed: int | None = None


def base_seed() -> int | None:
    """The seed given to the last `set_seed` call in this process, or None."""
    return _base_seed


def derive_seed(seed: int, rank: int) -> int:
    """A seed for `rank` derived from `seed`, distinct per rank and stable across runs.

    A large odd multiplier keeps the seeds of neighbouring ranks far apart in the
    seed space of `seed + k` style user seeds (epochs, workers).
    """
    return (seed + (rank + 1) * 0x9E3779B1) % (2**63)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % _NP_SEED_MOD)
    # torch.manual_seed also seeds every CUDA device (lazily, if CUDA is not yet initialised).
    torch.manual_seed(seed)


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python `random`, NumPy's global RNG, torch CPU and every CUDA device.

    With ``deterministic=True`` also select deterministic kernels: cuDNN
    deterministic and no benchmark autotuning, ``torch.use_deterministic_algorithms``
    (ops without a deterministic implementation raise), and
    ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS. ``PYTHONHASHSEED`` only
    takes effect at interpreter start, so a warning says to export it before launch
    when it is not set.
    """
    global _base_seed
    seed = int(seed)
    _base_seed = seed
    _seed_all(seed)
    if not deterministic:
        return
    # cuBLAS reads this when its handle is created; set it before the first matmul on GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True)
    if os.environ.get("PYTHONHASHSEED") is None:
        warnings.warn(
            "PYTHONHASHSEED is not set: hash() of str/bytes (and the order of sets of them) "
            "differs between processes. It cannot be changed from inside a running "
            "interpreter; export PYTHONHASHSEED=0 (or any fixed value) before launching "
            "(torchrun passes the environment to every rank).",
            RuntimeWarning,
            stacklevel=2,
        )


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn` for DataLoader: seed `random` and NumPy in each worker.

    The DataLoader already seeds torch in each worker with ``base_seed + worker_id``
    (base_seed drawn from the loader's generator); Python and NumPy are derived from
    that same value so all three follow the loader's generator.
    """
    del worker_id  # already folded into torch.initial_seed() by the DataLoader
    worker_seed = torch.initial_seed() % _NP_SEED_MOD
    random.seed(worker_seed)
    np.random.seed(worker_seed)


def make_generator(seed: int | None = None, rank: int | None = None) -> torch.Generator:
    """A CPU `torch.Generator` for DataLoader(generator=...) / samplers.

    `seed` defaults to the last `set_seed` value (or 0). With `rank`, the seed is
    derived per rank so that ranks draw different worker seeds.
    """
    if seed is None:
        seed = _base_seed if _base_seed is not None else 0
    if rank is not None:
        seed = derive_seed(seed, rank)
    g = torch.Generator()
    g.manual_seed(int(seed))
    return g
