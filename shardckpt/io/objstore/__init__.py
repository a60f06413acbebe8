"""Checkpoints in object storage: the second implementation of the Storage protocol.

S3 (and S3-compatible stores) go through boto3 (`s3.py`); any other fsspec URL
(`gs://`, `az://`, `memory://`, `file://`) through fsspec (`fsspec_store.py`).
Both sit behind one small object-store interface (`store.py`), on which the
checkpoint layout and the rename-free commit protocol (`remote.py`, `commit.py`)
are written once. Imported only when a URL is used: local users never pay for
boto3 or fsspec.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from .urls import split_url

_lock = threading.Lock()
_bound: dict[str, dict] = {}  # "scheme://bucket" -> storage_options given for it
_cache: dict[tuple, Any] = {}
_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION", "AWS_DEFAULT_REGION")


def _key(options: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def remote_storage(url: str, storage_options: dict | None = None) -> Any:
    """The RemoteStorage for `url`; options given for a bucket are remembered for it, so
    the manager, the reader and the tools reach it the same way within this process."""
    from .remote import RemoteStorage

    scheme, bucket, _ = split_url(url)
    where = f"{scheme}://{bucket}"
    with _lock:
        if storage_options is not None:
            _bound[where] = dict(storage_options)
        options = _bound.get(where, {})
        # The endpoint variables are part of the key: a process that changes them (tests,
        # a tool pointed elsewhere) gets a client for the new endpoint.
        env = tuple(os.environ.get(v) for v in _ENV)
        k = (scheme, bucket if scheme in ("s3", "s3a") else "", _key(options), env)
        st = _cache.get(k)
        if st is None:
            st = _cache[k] = RemoteStorage(_make_store(scheme, options))
        return st


def _make_store(scheme: str, options: dict) -> Any:
    if scheme in ("s3", "s3a"):
        from .s3 import S3Store

        return S3Store(options)
    from .fsspec_store import FsspecStore

    return FsspecStore(scheme, options)
