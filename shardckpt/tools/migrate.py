"""`shardckpt migrate`: rewrite an older checkpoint's manifest in the current format version.

Only the manifest changes (data files are never touched): it is parsed and
migrated in memory by the format layer (`parse_manifest`, which also validates
it), written as the current version to a temporary file in the checkpoint
directory, fsynced, renamed over `manifest.json`, and the directory fsynced. A
crash at any moment leaves either the old manifest or the new one, both valid.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptCheckpointError
from ..format import FORMAT_VERSION, MANIFEST_NAME, parse_manifest
from ..io.fsutil import write_file_durable
from ..io.reader import check_committed
from ..io.storage import storage_for


@dataclass
class MigrateReport:
    path: str
    from_version: int
    to_version: int
    dry_run: bool = False

    @property
    def changed(self) -> bool:
        """Whether the manifest needs (dry run) or got a rewrite."""
        return self.from_version != self.to_version

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "from_version": self.from_version,
                "to_version": self.to_version, "changed": self.changed, "dry_run": self.dry_run}

    def __str__(self) -> str:
        if not self.changed:
            return f"{self.path}: already version {self.to_version}, nothing to do"
        verb = "would migrate" if self.dry_run else "migrated"
        return f"{self.path}: {verb} format version {self.from_version} -> {self.to_version}"


def _read_raw(path: str) -> bytes:
    ckpt = storage_for(path).open_checkpoint(path)  # no links, no FIFOs, bounded size
    try:
        return ckpt.read_manifest()
    finally:
        ckpt.close()


def migrate(path: str | os.PathLike, *, dry_run: bool = False) -> MigrateReport:
    """Bring `path`'s manifest to FORMAT_VERSION in place (atomically); a no-op when current."""
    path = os.fspath(path)
    check_committed(path)
    where = os.path.join(path, MANIFEST_NAME)
    try:
        raw = _read_raw(path)
    except OSError as e:
        raise CorruptCheckpointError(f"{where}: cannot be read ({e.strerror}).",
                                     path=where) from None
    manifest = parse_manifest(raw, where)  # validates; migrates in memory; typed errors
    version = json.loads(raw)["format_version"]  # parse_manifest accepted it: an int
    rep = MigrateReport(path=path, from_version=version, to_version=FORMAT_VERSION,
                        dry_run=dry_run)
    if not rep.changed or dry_run:
        return rep
    new = manifest.to_bytes()
    # The rewrite must describe exactly the same checkpoint.
    again = parse_manifest(new, where)
    if again.to_json() != manifest.to_json() or again.format_version != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{where}: the migrated manifest does not read back the "
                                     f"same; nothing was changed (please report).", path=where)
    write_file_durable(where, new)
    return rep
