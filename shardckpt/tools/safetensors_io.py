"""A streaming writer (and a pread reader) for the safetensors format.

Reading for conversion goes through the `safetensors` library (see
`sources.SafetensorsSource`). Writing cannot: `safetensors.torch.save_file`
takes a dict of tensors and so needs every tensor in memory at once, while an
export must stream a checkpoint larger than RAM under a memory cap. The writer
here emits the header (every shape is known up front) and then each tensor's
bytes slab by slab; every file it writes is validated with `safe_open` in the
tests. `SafetensorsFile` reads with pread, never mmap, for callers that must not
map a whole file into their address space.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(padded with spaces to a multiple of 8), then the tensors' raw little-endian bytes,
back to back in the order of their offsets.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from ..errors import NotACheckpointError, UnsupportedFormatError

ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
}
for _st, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                   ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _name):
        ST_DTYPES[_st] = getattr(torch, _name)
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}

# Guards against treating an arbitrary file as a header length of terabytes.
_MAX_HEADER = 100 << 20


def st_dtype(dtype: torch.dtype) -> str:
    try:
        return _ST_NAMES[dtype]
    except KeyError:
        raise UnsupportedFormatError(f"dtype {dtype} has no safetensors equivalent") from None


@dataclass(frozen=True)
class StEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    end: int


class SafetensorsFile:
    """Header of one .safetensors file plus ranged reads of its tensors."""

    def __init__(self, path: str) -> None:
        self.path = path
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise NotACheckpointError(f"{path}: too short to be a safetensors file.")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or n > os.path.getsize(path) - 8:
                raise NotACheckpointError(f"{path}: not a safetensors file (bad header length).")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise NotACheckpointError(f"{path}: not a safetensors file ({e}).") from None
        base = 8 + n
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self.entries: dict[str, StEntry] = {}
        items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        for name, h in items:
            if h["dtype"] not in ST_DTYPES:
                raise UnsupportedFormatError(f"{path}: tensor {name!r} has dtype {h['dtype']}, "
                                             f"which this reader does not support.")
            b, e = h["data_offsets"]
            self.entries[name] = StEntry(name, ST_DTYPES[h["dtype"]], tuple(h["shape"]),
                                         base + b, base + e)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) along dim 0 of a tensor (all of it by default)."""
        e = self.entries[name]
        shape = list(e.shape)
        esize = torch.empty((), dtype=e.dtype).element_size()
        if shape and start is not None:
            stop = shape[0] if stop is None else stop
            row = esize
            for s in shape[1:]:
                row *= s
            lo, hi = e.begin + start * row, e.begin + stop * row
            shape[0] = stop - start
        else:
            lo, hi = e.begin, e.end
        buf = bytearray(hi - lo)
        if buf:
            with open(self.path, "rb") as f:
                f.seek(lo)
                got = f.readinto(buf)
            if got != len(buf):
                raise NotACheckpointError(f"{self.path}: truncated inside tensor {name!r}.")
            return torch.frombuffer(buf, dtype=e.dtype).reshape(shape)
        return torch.empty(shape, dtype=e.dtype)


def write_safetensors(path: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], Iterator[memoryview | bytes]],
                      metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file, streaming each tensor's bytes from `produce(name)`.

    The header needs every shape up front; the data then arrives piece by piece,
    so the whole file never sits in memory. Writes to a temporary name and
    renames, so a failure never leaves a half-written file under `path`.
    Returns the file size.
    """
    header: dict[str, dict] = {}
    order = []
    pos = 0
    for name, dtype, shape in specs:
        n = torch.empty((), dtype=dtype).element_size()
        for s in shape:
            n *= s
        header[name] = {"dtype": st_dtype(dtype), "shape": list(shape),
                        "data_offsets": [pos, pos + n]}
        order.append((name, n))
        pos += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # the spec aligns the data start to 8 bytes
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(hbytes)))
            f.write(hbytes)
            for name, n in order:
                got = 0
                for piece in produce(name):
                    f.write(piece)
                    got += len(piece)
                if got != n:
                    raise ValueError(f"{name!r}: produced {got} bytes, expected {n}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return 8 + len(hbytes) + pos
