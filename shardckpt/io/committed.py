"""Manifests this process committed, remembered so that the manager need not parse them again.

`commit.Commit.finalize` calls `remember_committed`; the manager (listing,
retention, refcounts, choosing the next base) and `base_index.BaseIndex` read
through `read_committed`, which falls back to `reader.read_manifest`.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict

from .. import codec
from ..format import Manifest
from ..format.names import MANIFEST_NAME

# Manifests this process committed, by checkpoint path, with the digest of the
# bytes they were written as. The manager reads the manifest it has just written
# right after the commit (pointers, retention, refcounts, the next save's base);
# parsing and validating it again costs ~10-20 ms a save, reading and hashing its
# bytes well under 1 ms. Matched by content, not by timestamps: a manifest replaced,
# rewritten or damaged since (by anyone) is read and validated afresh.
_RECENT: OrderedDict[str, tuple[bytes, Manifest]] = OrderedDict()
_RECENT_MAX = 8
_RECENT_LOCK = threading.Lock()
_MAX_MANIFEST = 1 << 30  # larger ones are left to the reader (and its typed errors)


def _digest(data: bytes) -> bytes:
    # XXH3-128, the block hash (~20 GB/s; blake2b took 0.3 ms per 350 KB manifest, read
    # ~8 times a manager save). It tells "still the bytes written" from any rewrite; a
    # collision could only make a file pass for a manifest this process wrote itself.
    h = codec.hash_buffer(memoryview(data), max(1, len(data)))
    return (h[0] if h else b"") + len(data).to_bytes(8, "little")


def _manifest_digest(final: str) -> bytes | None:
    """Digest of `final`/manifest.json, reached without following a symlink, or None."""
    try:
        if not stat.S_ISDIR(os.lstat(final).st_mode):
            return None  # a symlinked checkpoint is read (and refused) by the reader
        fd = os.open(os.path.join(final, MANIFEST_NAME),
                     os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST:
            return None
        chunks, left = [], st.st_size + 1
        while left > 0:
            b = os.read(fd, left)
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return _digest(b"".join(chunks))
    except OSError:
        return None
    finally:
        os.close(fd)


def remember_committed(final: str, manifest: Manifest, data: bytes) -> None:
    """Keep the manifest just committed at `final` (written as `data`) for `read_committed`."""
    final = os.path.abspath(final)
    with _RECENT_LOCK:
        _RECENT.pop(final, None)
        _RECENT[final] = (_digest(data), manifest)
        while len(_RECENT) > _RECENT_MAX:
            _RECENT.popitem(last=False)


def read_committed(path: str | os.PathLike) -> Manifest:
    """`reader.read_manifest(path)`, without reading a manifest this process committed
    there itself while the file is still the one it wrote."""
    from .reader import read_manifest
    from .storage import is_url

    if is_url(os.fspath(path)):
        return read_manifest(path)
    key = os.path.abspath(os.fspath(path))
    with _RECENT_LOCK:
        hit = _RECENT.get(key)
    if hit is not None:
        if _manifest_digest(key) == hit[0]:
            return hit[1]
        with _RECENT_LOCK:
            if _RECENT.get(key) is hit:
                del _RECENT[key]
    return read_manifest(path)
