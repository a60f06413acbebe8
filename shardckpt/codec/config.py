"""Codec settings of one save (recorded in the manifest's `codec` field)."""

from __future__ import annotations

from dataclasses import dataclass

from ..format.blocks import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE


@dataclass(frozen=True)
class CodecConfig:
    compression: str = "zstd"  # "zstd" or "none"
    level: int = 1
    block_size: int = DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.compression not in ("zstd", "none"):
            raise ValueError(f"compression must be 'zstd' or 'none', not {self.compression!r}")
        if not 0 < self.block_size <= MAX_BLOCK_SIZE or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, not {self.block_size}")

    def to_json(self) -> dict:
        return {"compression": self.compression, "level": self.level,
                "block_size": self.block_size, "checksum": "crc32"}
