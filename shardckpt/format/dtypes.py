"""The dtype names of the format and which dtypes are byte-grouped.

torch is imported on first use, not with the module: the async writer process
(io/writer_serve.py) reads the format but never a dtype, and starting it without
torch takes 0.3 s and 26 MB instead of 2-6 s and 276 MB (2-core VM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import UnsupportedFormatError

if TYPE_CHECKING:
    import torch

_BASE = ("float32", "float64", "float16", "bfloat16", "complex64", "complex128",
         "int8", "int16", "int32", "int64", "uint8", "bool")
# Present in some torch versions only: a name is a format dtype where this torch has it.
_OPTIONAL = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
             "float8_e8m0fnu", "float4_e2m1fn_x2", "uint16", "uint32", "uint64", "complex32")
# Only these are byte-grouped: their high bytes (sign + exponent) are highly
# redundant in trained weights and optimizer moments.
_GROUPED_NAMES = {"float32": 4, "bfloat16": 2, "float16": 2}

_DTYPES: dict[str, torch.dtype] = {}
_DTYPE_NAMES: dict[torch.dtype, str] = {}
_ITEMSIZE: dict[str, int] = {}
_GROUPED: dict[torch.dtype, int] = {}


def _load() -> None:
    import torch

    table = {n: getattr(torch, n) for n in (*_BASE, *_OPTIONAL) if hasattr(torch, n)}
    _DTYPE_NAMES.update({v: k for k, v in table.items()})
    _ITEMSIZE.update({k: v.itemsize for k, v in table.items()})
    _GROUPED.update({table[k]: g for k, g in _GROUPED_NAMES.items()})
    _DTYPES.update(table)  # last: a filled _DTYPES says every table is filled


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        if not _DTYPES:
            _load()
            return dtype_name(dtype)
        raise TypeError(f"dtype {dtype} is not supported by the shardckpt format") from None


def dtype_from_name(name: str) -> torch.dtype:
    if not _DTYPES:
        _load()
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise UnsupportedFormatError(f"unknown dtype {name!r} in manifest") from None


def is_dtype_name(name: object) -> bool:
    if not _DTYPES:
        _load()
    return isinstance(name, str) and name in _DTYPES


def itemsize(name: str) -> int:
    if not _DTYPES:
        _load()
    return _ITEMSIZE[name]


def group_size(dtype: torch.dtype) -> int:
    """Bytes per element that are split into planes (1 means no byte-grouping)."""
    if not _DTYPES:
        _load()
    return _GROUPED.get(dtype, 1)
