"""URLs of checkpoints in object storage: scheme, bucket, key; joins without os.path."""

from __future__ import annotations

from ...errors import CheckpointNotFoundError


def split_url(url: str) -> tuple[str, str, str]:
    """'s3://bucket/a/b' -> ('s3', 'bucket', 'a/b'); the key has no leading/trailing '/'."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(f"{url!r}: not a URL")
    rest = rest.strip("/")
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise CheckpointNotFoundError(f"{url}: no bucket in the URL; write "
                                      f"{scheme}://BUCKET/PREFIX/NAME.")
    return scheme.lower(), bucket, key.strip("/")


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])
