"""The GPU data path: CUDA tensors staged by the shardckpt._cuda copy engine (docs/GPU.md)."""

from .staging import CudaStager, available, stats, unavailable_reason

__all__ = ["CudaStager", "available", "stats", "unavailable_reason"]
