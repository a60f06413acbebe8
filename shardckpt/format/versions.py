"""Format versions and the migrations between them.

Version history:
  1  first release
  2  the manifest carries a sha256 of its own content (`checksum`)
  3  incremental checkpoints: per-block content hashes (`hashes`), references to
     blocks of a sibling base checkpoint (`refs`, top-level `bases`)

A reader accepts every version up to FORMAT_VERSION: older manifests are
migrated in memory before validation; `shardckpt migrate` rewrites them on disk.
"""

from __future__ import annotations

from collections.abc import Callable

FORMAT_VERSION = 3

# MIGRATIONS[v] turns a version-v manifest dict into a version-(v + 1) one.
MIGRATIONS: dict[int, Callable[[dict], dict]] = {}


def migration(version: int) -> Callable[[Callable[[dict], dict]], Callable[[dict], dict]]:
    def register(fn: Callable[[dict], dict]) -> Callable[[dict], dict]:
        MIGRATIONS[version] = fn
        return fn
    return register


@migration(1)
def _v1_to_v2(d: dict) -> dict:
    # Only the checksum is new; it is computed when the manifest is written again.
    return {**d, "format_version": 2}


@migration(2)
def _v2_to_v3(d: dict) -> dict:
    # A v2 checkpoint is standalone: no bases, no hashes (it cannot serve as a base).
    return {**d, "bases": {}, "format_version": 3}


def migrate(d: dict) -> dict:
    """A manifest dict of any known version, brought to FORMAT_VERSION."""
    while d["format_version"] < FORMAT_VERSION:
        d = MIGRATIONS[d["format_version"]](d)
    return d


def runtime_versions() -> dict:
    import torch

    from .. import __version__
    from ..codec import active_path

    return {"shardckpt": __version__, "torch": torch.__version__,
            "cuda": torch.version.cuda, "codec_path": active_path()}
