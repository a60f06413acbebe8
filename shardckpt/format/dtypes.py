"""The dtype names of the format and which dtypes are byte-grouped."""

from __future__ import annotations

import torch

from ..errors import UnsupportedFormatError

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
    "bfloat16": torch.bfloat16, "complex64": torch.complex64, "complex128": torch.complex128,
    "int8": torch.int8, "int16": torch.int16, "int32": torch.int32, "int64": torch.int64,
    "uint8": torch.uint8, "bool": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
              "uint16", "uint32", "uint64", "complex32"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_ITEMSIZE = {k: v.itemsize for k, v in _DTYPES.items()}

# Only these are byte-grouped: their high bytes (sign + exponent) are highly
# redundant in trained weights and optimizer moments.
_GROUPED = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise TypeError(f"dtype {dtype} is not supported by the shardckpt format") from None


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(f"unknown dtype {name!r} in manifest") from None


def is_dtype_name(name: object) -> bool:
    return isinstance(name, str) and name in _DTYPES


def itemsize(name: str) -> int:
    return _ITEMSIZE[name]


def group_size(dtype: torch.dtype) -> int:
    """Bytes per element that are split into planes (1 means no byte-grouping)."""
    return _GROUPED.get(dtype, 1)
