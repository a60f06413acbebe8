"""Reading a committed checkpoint: the manifest once, then only the blocks asked for.

`CheckpointReader` opens a checkpoint once (manifest read, checksummed and
validated; data files opened on first use and kept open) and is passed to
whatever needs it: the DCP reader, verify, the tools and the manager. It knows
no DCP and no process group.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import torch

from .. import codec
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    NotACheckpointError,
)
from ..format import Block, DirState, Manifest, StoredItem, parse_manifest
from ..format import blocks as geo
from ..format.dtypes import dtype_from_name
from ..format.keys import KeyMap
from ..format.names import MANIFEST_NAME, Leftover, parse_leftover
from .bases import BaseFiles
from .prefetch import Key, Prefetcher, read_pieces
from .storage import OpenCheckpoint, is_url, storage_for


def find_partials(path: str) -> list[str]:
    """Leftovers of interrupted saves to `path` (hidden siblings)."""
    parent, name = os.path.split(os.path.abspath(path))
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    return sorted(os.path.join(parent, e) for e in entries
                  if (p := parse_leftover(e)) and p == (name, Leftover.PARTIAL))


def check_committed(path: str) -> None:
    """Raise the typed error that says why `path` is not a committed checkpoint."""
    state = storage_for(path).state(path)
    if state == DirState.COMMITTED:
        return
    if state == DirState.MISSING:
        partials = find_partials(path)
        if partials:
            raise IncompleteCheckpointError(
                f"{path}: this checkpoint was never committed (its save was interrupted or failed); "
                f"leftovers: {', '.join(partials)}. Load an earlier checkpoint; "
                f"remove the leftovers with `shardckpt gc`.")
        raise CheckpointNotFoundError(f"{path}: no such checkpoint. Check the path.")
    if state == DirState.PARTIAL:
        raise IncompleteCheckpointError(
            f"{path}: this save was never committed; load an earlier checkpoint.")
    raise NotACheckpointError(
        f"{path}: not a shardckpt checkpoint (no {MANIFEST_NAME}). "
        f"For a stock DCP directory use `shardckpt convert`.")


# Data files opened together with the manifest (more are opened on first use):
# an overwrite that swaps a new checkpoint in and deletes the old one then cannot
# pull a file from under a reader that has read the old manifest.
_EAGER_FILES = 256
_OPEN_TRIES = 8


class _Replaced(Exception):
    """The directory was swapped out while being opened: open the new one."""


def _open_once(path: str) -> tuple[OpenCheckpoint, Manifest]:
    try:
        ckpt = storage_for(path).open_checkpoint(path)
    except FileNotFoundError:
        raise _Replaced() from None
    except OSError as e:
        raise CorruptCheckpointError(f"{path}: cannot open the checkpoint ({e.strerror}); check "
                                     f"the path and its permissions.", path=path) from None
    try:
        where = os.path.join(path, MANIFEST_NAME)
        try:
            data = ckpt.read_manifest()
        except FileNotFoundError:
            if ckpt.replaced():
                raise _Replaced() from None
            raise IncompleteCheckpointError(f"{where}: vanished while opening (a concurrent "
                                            f"overwrite or delete); retry.") from None
        except OSError as e:
            raise CorruptCheckpointError(f"{where}: cannot be read ({e.strerror}).",
                                         path=where) from None
        manifest = parse_manifest(data, where)
        for rel in sorted(manifest.files)[:_EAGER_FILES]:
            try:
                ckpt.open_data(rel)
            except FileNotFoundError:
                if ckpt.replaced():
                    raise _Replaced() from None
                # really missing: reported when it is read, naming the tensor
            except (OSError, CorruptCheckpointError):
                pass  # a link, FIFO or unreadable file: reported when it is read
        return ckpt, manifest
    except BaseException:
        ckpt.close()
        raise


def _open(path: str) -> tuple[OpenCheckpoint, Manifest]:
    for _ in range(_OPEN_TRIES):
        check_committed(path)
        try:
            return _open_once(path)
        except _Replaced:
            continue  # an overwrite swapped a new checkpoint in: read that one
    raise IncompleteCheckpointError(f"{path}: kept changing while being opened (concurrent "
                                    f"overwrites or deletes); retry.")


def read_manifest(path: str | os.PathLike) -> Manifest:
    """The validated manifest of a committed checkpoint, or a typed error."""
    ckpt, manifest = _open(os.fspath(path))
    ckpt.close()
    return manifest


def decode_target(chosen: list[Block], out: torch.Tensor | None
                  ) -> tuple[torch.Tensor, int, memoryview]:
    """Where blocks `chosen` (sorted) decode to: `out` (the whole item, from raw offset 0)
    or a new buffer spanning the first to the last of them; (buffer, its raw offset, view)."""
    if out is None:
        base = chosen[0].raw_start
        end = chosen[-1].raw_start + chosen[-1].raw_len
        out = torch.empty(end - base, dtype=torch.uint8)
    else:
        base = 0
    return out, base, memoryview(out.numpy()).cast("B") if out.numel() else memoryview(b"")


class CheckpointReader:
    """One open checkpoint. `key_map` (checkpoint key -> caller's key) renames keys."""

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None,
                 verify: bool = True, key_map: KeyMap | None = None,
                 storage_options: dict | None = None) -> None:
        self.path = os.fspath(path)
        if storage_options is not None:  # bound to the URL's bucket for every later call
            storage_for(self.path, storage_options)
        self.threads = threads
        self.verify = verify
        self._ckpt, stored = _open(self.path)
        self._bases = BaseFiles(self.path, stored)  # incremental: blocks its bases hold
        self.stored_manifest = stored
        self.manifest = stored if key_map is None else stored.renamed(key_map)
        self.bytes_read = 0
        self._prefetch: Prefetcher | None = None

    def close(self) -> None:
        self.stop_prefetch()
        self._ckpt.close()
        self._bases.close()

    @property
    def bases(self) -> BaseFiles:
        """The base checkpoints this one references (opened on first use)."""
        return self._bases

    # ---------------------------------------------------------------- read-ahead

    def item_reads(self, item: StoredItem, wanted: Sequence[Block]) -> list[Key]:
        """The reads `read_blocks` will make for `wanted` blocks of `item`, in order."""
        if item.refs:  # some blocks live in a base checkpoint: read through io/bases.py
            return []
        chosen = sorted(wanted, key=lambda b: b.raw_start)
        return [(item.file, off, length) for off, length, _ in read_pieces(chosen)]

    def reads_into(self, item: StoredItem, out: torch.Tensor) -> dict[Key, memoryview] | None:
        """The reads of a whole item whose bytes can go straight into `out` (uint8, the whole
        item): every block stored raw, none in a base, a local file. With each read's
        destination in `out`; None if the item does not qualify."""
        if item.refs or not item.nbytes or is_url(self.path):
            return None
        blocks = item.block_list()
        if any(b.record[3] != geo.MODE_RAW for b in blocks):
            return None
        _, _, outmv = decode_target(blocks, out)
        return {(item.file, off, length): outmv[run[0].raw_start:run[-1].raw_start + run[-1].raw_len]
                for off, length, run in read_pieces(blocks)}

    def prefetch(self, reads: Sequence[Key], streams: int | None = None,
                 dests: dict[Key, memoryview] | None = None) -> None:
        """Read `reads` ahead on parallel streams, in this order (the order the load will
        ask for them); anything asked for that was not prefetched is read directly.
        `dests` (from reads_into) are read into place; read_blocks then only checks them."""
        from .probe import READ_STREAMS, _env_streams

        self.stop_prefetch()
        if reads:
            # An object store answers many requests at once; a disk rewards few.
            n = (streams or _env_streams() or getattr(self._ckpt, "read_streams", None)
                 or READ_STREAMS)
            self._prefetch = Prefetcher(self._ckpt.open_data, reads, n, dests=dests)

    def stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def remap(self, key_map: KeyMap) -> None:
        """Use `key_map` (checkpoint key -> caller's key) from now on."""
        self.manifest = self.stored_manifest.renamed(key_map)

    def open_file(self, rel: str) -> Any:
        """A data file of this checkpoint (opened once, kept open): `.size`, `.pread`."""
        return self._ckpt.open_data(rel)

    def data_file_for(self, fqn: str, rel: str) -> Any:
        """`open_file(rel)`, needed to read `fqn`: a missing or unreadable file is a typed
        error naming the file, its rank and the tensor."""
        path = os.path.join(self.path, rel)
        rank = self.manifest.file_rank(rel)
        try:
            return self.open_file(rel)
        except FileNotFoundError:
            raise CorruptCheckpointError(
                f"{path} (rank {rank}): data file is missing, needed for {fqn!r}; the checkpoint "
                f"is damaged, load an earlier one.", path=path, rank=rank, tensor=fqn) from None
        except OSError as e:
            raise CorruptCheckpointError(
                f"{path} (rank {rank}): cannot read the data file ({e.strerror}), needed for "
                f"{fqn!r}.", path=path, rank=rank, tensor=fqn) from None

    def file_size(self, rel: str) -> int:
        """Size of a data file as it is on disk now (opened, so it stays the one read)."""
        return self._ckpt.open_data(rel).size

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- tensors

    def chunk_regions(self, fqn: str, chunk: Any, dtype: torch.dtype,
                      boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
                      ) -> list[torch.Tensor | None]:
        """Views of boxes (offsets, lengths within one stored chunk), from one read."""
        esize = torch.empty((), dtype=dtype).element_size()
        sizes = list(chunk.sizes)
        spans = [geo.box_span_bytes(so, ln, sizes, esize) for so, ln in boxes]
        if all(s is None for s in spans):
            return [None] * len(boxes)
        blocks = chunk.block_list()
        buf, base = self.read_blocks(fqn, chunk, blocks,
                                     self.region_blocks(chunk, dtype, boxes, blocks))
        strides = geo.row_major_strides(sizes)
        out: list[torch.Tensor | None] = []
        for (_, ln), span in zip(boxes, spans):
            if span is None:
                out.append(None)
                continue
            src = buf[span[0] - base: span[1] - base].view(dtype)
            # as_strided's offset is absolute in the storage, not relative to the view
            out.append(src.as_strided(list(ln), strides, src.storage_offset()))
        return out

    def region_blocks(self, chunk: Any, dtype: torch.dtype,
                      boxes: Sequence[tuple[Sequence[int], Sequence[int]]],
                      blocks: list[Block] | None = None) -> list[Block]:
        """The blocks of a stored chunk under boxes (offsets, lengths within it)."""
        esize = torch.empty((), dtype=dtype).element_size()
        sizes = list(chunk.sizes)
        blocks = chunk.block_list() if blocks is None else blocks
        need: dict[int, Block] = {}
        for so, ln in boxes:
            if geo.box_span_bytes(so, ln, sizes, esize) is not None:
                starts, run = geo.box_runs(list(so), list(ln), sizes)
                for b in geo.blocks_for_runs(blocks, starts * esize, run * esize):
                    need[b.raw_start] = b  # offsets repeat across files with references
        return list(need.values())

    def read_region(self, fqn: str, offsets: Sequence[int] | None = None,
                    sizes: Sequence[int] | None = None) -> torch.Tensor:
        """A box of a stored tensor (the whole tensor by default), reading only its blocks."""
        t = self.manifest.tensors[fqn]
        shape = list(t.shape)
        offsets = [0] * len(shape) if offsets is None else list(offsets)
        sizes = shape if sizes is None else list(sizes)
        dtype = dtype_from_name(t.dtype)
        out = torch.empty(sizes, dtype=dtype)
        for ch in t.chunks:
            lo = [max(a, c) for a, c in zip(offsets, ch.offsets)]
            hi = [min(a + n, c + m) for a, n, c, m in zip(offsets, sizes, ch.offsets, ch.sizes)]
            if any(h <= low for low, h in zip(lo, hi)) and shape:
                continue
            lengths = [h - low for low, h in zip(lo, hi)]
            rel = [low - c for low, c in zip(lo, ch.offsets)]
            (src,) = self.chunk_regions(fqn, ch, dtype, [(rel, lengths)])
            if src is None:
                continue
            dst = out
            for d, (low, a, n) in enumerate(zip(lo, offsets, lengths)):
                dst = dst.narrow(d, low - a, n)
            dst.copy_(src)
        return out

    # ---------------------------------------------------------------- objects

    def object_bytes(self, fqn: str) -> bytes:
        """The stored bytes (torch.save output) of a non-tensor value; never unpickled here."""
        o = self.manifest.objects[fqn]
        return self.read_range(fqn, o, 0, o.nbytes).numpy().tobytes()

    def read_object(self, fqn: str) -> Any:
        """A stored non-tensor value, under weights_only rules."""
        from ..dcp.safety import safe_torch_load

        return safe_torch_load(io.BytesIO(self.object_bytes(fqn)), path=self.path, key=fqn)

    # ---------------------------------------------------------------- blocks

    def read_range(self, fqn: str, item: StoredItem, start: int, end: int) -> torch.Tensor:
        blocks = item.block_list()
        buf, base = self.read_blocks(fqn, item, blocks, geo.blocks_for_range(blocks, start, end),
                                     lo=start)
        return buf[start - base:end - base]

    def read_into(self, fqn: str, item: StoredItem, out: torch.Tensor) -> None:
        """Decode a whole item straight into `out` (uint8, exactly nbytes long)."""
        blocks = item.block_list()
        self.read_blocks(fqn, item, blocks, blocks, out=out)

    def read_blocks(self, fqn: str, item: StoredItem, blocks: list[Block], wanted: list[Block],
                    out: torch.Tensor | None = None, lo: int = 0) -> tuple[torch.Tensor, int]:
        """Read, verify and decode `wanted` blocks of an item; returns (buffer, raw offset of
        buffer[0]). The buffer spans the first to the last of them (bytes of blocks not
        wanted stay unset); `out`, if given, is a uint8 buffer for the whole item."""
        if item.refs:
            return self._bases.read_blocks(self, fqn, item, blocks, wanted, out, lo)
        chosen = sorted(wanted, key=lambda b: b.raw_start)
        if not chosen:
            return torch.empty(0, dtype=torch.uint8), lo
        out, base, outmv = decode_target(chosen, out)
        path = os.path.join(self.path, item.file)
        rank = self.manifest.file_rank(item.file)
        f = self.data_file_for(fqn, item.file)
        index_of = {b.offset: i for i, b in enumerate(blocks)}
        for off, length, run in read_pieces(chosen):
            key = (item.file, off, length)
            got = self._prefetch.take(key) if self._prefetch else None
            if got is not None and self._prefetch.into_place(key):
                # Raw blocks read into place: only their crc32s are left to check.
                self.bytes_read += len(got)
                self._check_in_place(got, run, path=path, rank=rank, tensor=fqn,
                                     first_index=index_of[run[0].offset])
                continue
            # Never ask for more than the file holds: a short read is reported as
            # truncation of the block that runs past the end, by the codec.
            data = got if got is not None else f.pread(max(0, min(length, f.size - off)), off)
            self.bytes_read += len(data)
            first = run[0]
            raw_end = run[-1].raw_start + run[-1].raw_len
            # Blocks of one run are consecutive blocks of one item: one batch call
            # decodes them in parallel (native: GIL released) straight into place.
            codec.decode_item_blocks(
                memoryview(data), [b.record for b in run],
                outmv[first.raw_start - base: raw_end - base], self.threads, self.verify,
                path=path, rank=rank, tensor=fqn, first_index=index_of[first.offset])
        return out, base

    def _check_in_place(self, got: memoryview, run: list[Block], *, path: str,
                        rank: int | None, tensor: str, first_index: int) -> None:
        pos = 0
        for i, b in enumerate(run):
            data = got[pos:pos + b.stored_len]
            # A short read (file truncated) is always reported; crc32s only with verify.
            if len(data) < b.stored_len or self.verify:
                codec.check_block(data, b.record, path=path, rank=rank, tensor=tensor,
                                  index=first_index + i)
            pos += b.stored_len
