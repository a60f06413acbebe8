"""Snapshot of CUDA tensors into a reused pinned pool through shardckpt._cuda.

`async_save`'s StagingPool hands a state with CUDA tensors here when the
extension is built and a GPU is present. One pinned buffer per pool, allocated
once (cudaHostAlloc costs ~0.7 s per GiB) and reused by every later save, up to
a cap; a state larger than the buffer streams its excess through a ring of
pinned slots into a reused pageable arena instead of falling back to a
blocking save. The copies run on the extension's own streams, ordered after
the work already queued on each device's current stream by an event, with the
GIL released; `stage` returns once every byte is on the host, so in-place
updates the training loop queues afterwards never reach the checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import SaveFailedError

try:  # built only where nvcc was found (setup.py)
    from .. import _cuda  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - depends on the build
    _cuda = None

_ALIGN = 64
# Ring slots: big enough that per-chunk overhead vanishes, several so the copy
# engine fills the next slots while the host drains one.
_SLOT_BYTES = 64 << 20
_RING_SLOTS = 4
_MIN_CAP = 1 << 20


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def unavailable_reason() -> str | None:
    """Why CUDA tensors would not take this path (None when they would)."""
    if _cuda is None:
        return "shardckpt._cuda is not built (no nvcc at install time, docs/GPU.md)"
    if os.environ.get("SHARDCKPT_GPU_STAGING", "1") == "0":
        return "disabled by SHARDCKPT_GPU_STAGING=0"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def available() -> bool:
    return unavailable_reason() is None


def stats() -> dict[str, int]:
    """Pinned bytes held by the process, cudaHostAlloc calls ever made, copy streams."""
    if _cuda is None:
        return {"pinned_bytes": 0, "pinned_allocations": 0, "copy_streams": 0}
    return dict(_cuda.stats())


def default_pinned_cap() -> int:
    """SHARDCKPT_PINNED_CAP_BYTES, else a quarter of RAM shared by the local ranks.

    Pinned memory cannot be swapped or reclaimed: every rank of a node pinning
    its whole state could take the node down, so a rank gets its share of a
    quarter of RAM and streams what does not fit.
    """
    env = os.environ.get("SHARDCKPT_PINNED_CAP_BYTES")
    if env:
        try:
            return int(env)
        except ValueError:
            raise ValueError(f"SHARDCKPT_PINNED_CAP_BYTES={env!r} is not a number of bytes; "
                             "set it to an integer such as 4294967296") from None
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or max(1, torch.cuda.device_count())
    return max(_MIN_CAP, ram // (4 * local))


def _is_dtensor(v: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(v, DTensor)


def _leaves(tree: Any, name: str, out: list[tuple[str, torch.Tensor]]) -> None:
    if _is_dtensor(tree):
        out.append((name, tree.to_local()))
    elif torch.is_tensor(tree):
        out.append((name, tree))
    elif isinstance(tree, dict):
        for k, v in tree.items():
            _leaves(v, f"{name}.{k}" if name else str(k), out)
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            _leaves(v, f"{name}.{i}" if name else str(i), out)


def has_cuda_tensors(tree: Any) -> bool:
    found: list[tuple[str, torch.Tensor]] = []
    _leaves(tree, "", found)
    return any(t.is_cuda for _, t in found)


def _rebuild(tree: Any, staged: list[torch.Tensor]) -> Any:
    """`tree` with its tensors replaced, in traversal order, by `staged` (consumed)."""
    if _is_dtensor(tree):
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(staged.pop(), tree.device_mesh, tree.placements,
                                  run_check=False, shape=tree.shape, stride=tree.stride())
    if torch.is_tensor(tree):
        return staged.pop()
    if isinstance(tree, dict):
        return {k: _rebuild(v, staged) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_rebuild(v, staged) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_rebuild(v, staged) for v in tree)
    return tree


def _rank() -> int | None:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else None


class CudaStager:
    """One pinned buffer and one pageable overflow arena, reused by every save of a pool."""

    def __init__(self, pinned_cap: int | None = None, threads: int | None = None) -> None:
        cap = default_pinned_cap() if pinned_cap is None else int(pinned_cap)
        if cap < _MIN_CAP:
            raise ValueError(f"pinned_cap={cap} bytes is below the minimum of {_MIN_CAP} "
                             "(the streaming ring needs room); raise it")
        self.pinned_cap = cap
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.pinned: Any = None  # _cuda.PinnedBuffer
        self._pinned_u8: torch.Tensor | None = None
        self.overflow: torch.Tensor | None = None
        self.pinned_allocations = 0
        self.overflow_allocations = 0
        self.last: dict[str, Any] = {}  # the copy engine's figures of the latest stage()

    @property
    def pinned_bytes(self) -> int:
        return 0 if self.pinned is None else self.pinned.nbytes

    def _ensure_pinned(self, need: int, device: int) -> None:
        want = min(self.pinned_cap, need)
        if want <= self.pinned_bytes:
            return
        # Growth only up to the cap and only when a larger state arrives: in
        # steady state this happens once. The old buffer goes before the new
        # one is pinned, so the cap holds at every moment.
        self.pinned = self._pinned_u8 = None
        self.pinned = _cuda.PinnedBuffer(want, device)
        self._pinned_u8 = torch.frombuffer(self.pinned, dtype=torch.uint8)
        self.pinned_allocations += 1

    def _ensure_overflow(self, need: int) -> None:
        if need > (0 if self.overflow is None else self.overflow.numel()):
            self.overflow = None
            self.overflow = torch.empty(need, dtype=torch.uint8)
            self.overflow_allocations += 1

    def stage(self, tree: Any) -> Any:
        """A copy of `tree` whose tensors live in host memory, consistent at the call."""
        if _cuda is None:
            raise RuntimeError(f"the GPU staging path is unavailable: {unavailable_reason()}")
        leaves: list[tuple[str, torch.Tensor]] = []
        _leaves(tree, "", leaves)
        # Raw byte copies need dense tensors; a strided view is made dense on
        # its own stream first, which the snapshot event then orders after.
        srcs = []
        for name, t in leaves:
            t = t.detach()
            if t.device.type not in ("cpu", "cuda"):
                raise SaveFailedError(
                    f"rank {_rank()}: tensor {name!r} is on {t.device}, which async_save cannot "
                    "stage; move it to a CUDA device or the CPU before saving.")
            if t.is_cuda and not t.is_contiguous():
                t = t.contiguous()
            srcs.append(t)
        cuda = [t for t in srcs if t.is_cuda and t.numel() > 0]
        need = sum(_aligned(t.numel() * t.element_size()) for t in cuda)
        devices = sorted({t.device.index for t in cuda})
        if cuda:
            self._ensure_pinned(need, devices[0])
        cap = self.pinned_bytes
        ring_off = ring_bytes = slot = 0
        direct_room = cap
        if need > cap:
            slot = max(_ALIGN, min(_SLOT_BYTES, cap // (2 * _RING_SLOTS)) // _ALIGN * _ALIGN)
            ring_bytes = slot * _RING_SLOTS
            ring_off = direct_room = (cap - ring_bytes) // _ALIGN * _ALIGN

        # Layout: CUDA tensors into the pinned buffer while they fit (first fit,
        # in order), the rest and CPU tensors into the pageable overflow arena.
        place: list[tuple[str, int]] = []  # ("pinned" | "overflow" | "empty", offset)
        pin_off = over_off = 0
        for t in srcs:
            n = t.numel() * t.element_size()
            if n == 0:
                place.append(("empty", 0))
            elif t.is_cuda and pin_off + n <= direct_room:
                place.append(("pinned", pin_off))
                pin_off += _aligned(n)
            else:
                place.append(("overflow", over_off))
                over_off += _aligned(n)
        self._ensure_overflow(over_off)

        segments = []
        staged: list[torch.Tensor] = []
        for t, (where, off) in zip(srcs, place):
            n = t.numel() * t.element_size()
            if where == "empty":
                staged.append(torch.empty(t.shape, dtype=t.dtype))
                continue
            arena = self._pinned_u8 if where == "pinned" else self.overflow
            dst = arena[off:off + n].view(t.dtype).view(t.shape)
            if t.is_cuda:
                segments.append((t.device.index, t.data_ptr(), n, where == "pinned",
                                 off if where == "pinned" else dst.data_ptr()))
            else:
                dst.copy_(t)
            staged.append(dst)
        after = [(d, torch.cuda.current_stream(d).cuda_stream) for d in devices]
        try:
            self.last = _cuda.snapshot(self.pinned, segments, after, ring_off, ring_bytes, slot,
                                       self.threads)
        except _cuda.CudaError as e:
            names = [name for (name, t) in leaves if t.is_cuda][:3]
            raise SaveFailedError(
                f"rank {_rank()}: copying {len(segments)} CUDA tensors ({', '.join(names)}, ...) "
                f"to host memory failed: {e.args[0]}; nothing was saved. Check the GPU "
                "(nvidia-smi, dmesg), or set SHARDCKPT_GPU_STAGING=0 to stage through torch "
                "copies.") from e
        del srcs  # the dense temporaries may go now: every byte has landed
        staged.reverse()
        return _rebuild(tree, staged)


def stage_for(pool: Any, tree: Any) -> Any:
    """Stage `tree` with the CudaStager that belongs to `pool` (an async_save StagingPool)."""
    stager = getattr(pool, "_cuda_stager", None)
    if stager is None:
        stager = CudaStager()
        pool._cuda_stager = stager
    return stager.stage(tree)


def handles(tree: Any) -> bool:
    """Whether `StagingPool.stage` should hand `tree` to this path."""
    return available() and has_cuda_tensors(tree)
