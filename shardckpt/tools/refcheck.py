"""`verify` of an incremental checkpoint's references: every block a base holds for it."""

from __future__ import annotations

from typing import Any

from .. import codec
from ..errors import ShardckptError
from ..format.refs import RefBlock
from ..io.dedupe import block_hashes
from ..io.reader import CheckpointReader


def check_references(reader: CheckpointReader, deep: bool, problem: Any,
                     ) -> tuple[list[Any], int, int]:
    """(problems, blocks checked, bytes checked) over the referenced blocks: present,
    crc32 of the stored bytes; `deep` also decodes each and checks its content hash."""
    m = reader.manifest
    problems: list[Any] = []
    nblocks = nbytes = 0
    items = [(k, c) for k, t in m.tensors.items() for c in t.chunks]
    items += list(m.objects.items())
    bs = int(m.codec.get("block_size", 0)) or None
    for fqn, item in items:
        for i, b in enumerate(item.block_list()):
            if not isinstance(b, RefBlock):
                continue
            base_dir = reader.bases.dir_of(b.base)
            rel = f"{b.base}/{b.file}"  # as the manifest names it, relative to this checkpoint
            rank = m.bases[b.base][b.file].rank
            where = f"in base checkpoint {base_dir}"
            try:
                f = reader.bases.open_data(b.base, b.file, fqn)
            except ShardckptError as e:
                problems.append(problem(rel, rank, fqn, i, str(e)))
                continue
            data = f.pread(b.stored_len, b.offset) if b.offset < f.size else b""
            nblocks += 1
            nbytes += len(data)
            if len(data) != b.stored_len:
                problems.append(problem(rel, rank, fqn, i, f"block is truncated {where}"))
                continue
            if codec.crc32(data) != b.crc:
                problems.append(problem(rel, rank, fqn, i, f"checksum mismatch {where}"))
                continue
            if deep:
                out = bytearray(b.raw_len)
                try:
                    codec.decode_block(memoryview(data), b.record, memoryview(out))
                except Exception as e:  # any decode failure is damage to report
                    problems.append(problem(rel, rank, fqn, i, f"does not decode {where}: {e}"))
                    continue
                if item.hashes and bs and block_hashes(memoryview(out), bs)[0].hex() != \
                        item.hashes[i]:
                    problems.append(problem(rel, rank, fqn, i,
                                            f"content differs from its hash {where} (the base "
                                            f"was replaced?)"))
    return problems, nblocks, nbytes
