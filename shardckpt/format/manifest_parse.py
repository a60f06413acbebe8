"""manifest.json bytes -> a validated Manifest: JSON, format version, checksum, migration,
with parses remembered by the digest of the exact bytes."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from ..errors import CorruptCheckpointError, NotACheckpointError, UnsupportedFormatError
from .manifest import CHECKSUM_FIELD, Manifest, content_checksum
from .names import FORMAT_NAME
from .versions import FORMAT_VERSION, migrate

# Validated manifests by a digest of their exact bytes (a changed file is never served
# from here): the manager, retention and the base index of an incremental save
# read the same few manifests again and again, and parsing is what costs.
_CACHE: OrderedDict[tuple[bytes, str], Manifest] = OrderedDict()
_CACHE_BYTES, _CACHE_MAX_BYTES = [0], 64 << 20


def parse_manifest(data: bytes, path: str) -> Manifest:
    """Bytes of manifest.json -> a validated Manifest, or a typed error naming `path`."""
    key = (hashlib.blake2b(data, digest_size=32).digest() + len(data).to_bytes(8, "little"),
           path)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    m = _parse_manifest(data, path)
    _CACHE[key] = m
    _CACHE_BYTES[0] += len(data)
    while _CACHE_BYTES[0] > _CACHE_MAX_BYTES and len(_CACHE) > 1:
        old, _ = _CACHE.popitem(last=False)
        _CACHE_BYTES[0] -= int.from_bytes(old[0][32:], "little")
    return m


def _parse_manifest(data: bytes, path: str) -> Manifest:
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptCheckpointError(
            f"{path}: manifest is not valid JSON ({str(e)[:120]}); the checkpoint is damaged, "
            f"load an earlier one.", path=path) from None
    if not isinstance(d, dict) or d.get("format") != FORMAT_NAME:
        raise NotACheckpointError(f"{path}: not a shardckpt manifest.")
    version = d.get("format_version")
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(f"{path}: format_version {version!r:.40} is not a version; "
                                     f"the checkpoint is damaged.", path=path)
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{path}: format version {version} is newer than this shardckpt "
            f"(reads up to {FORMAT_VERSION}); upgrade shardckpt.")
    # Checked whenever present, not by version alone: version 1 had no checksum, so a
    # version-1 manifest that carries one had its version altered (one bit: 3 -> 1).
    expected = _safe_checksum(d) if version >= 2 or CHECKSUM_FIELD in d else None
    if (version >= 2 or CHECKSUM_FIELD in d) and (expected is None
                                                   or d.get(CHECKSUM_FIELD) != expected):
        raise CorruptCheckpointError(
            f"{path}: manifest checksum mismatch (the file was altered or damaged after it was "
            f"written); load an earlier checkpoint.", path=path)
    return Manifest.from_json(migrate(d), path=path)


def _safe_checksum(d: dict) -> str | None:
    try:
        return content_checksum(d)
    except (ValueError, TypeError, RecursionError):
        return None
