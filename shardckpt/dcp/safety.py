"""The object-safety policy: non-tensor values load under `weights_only` rules only.

A checkpoint is data; loading one must never run code from it (invariant 3).
"""

from __future__ import annotations

import io
from typing import Any

import torch

from ..errors import UnsafeObjectError


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    # torch's message carries ANSI escapes and a paragraph of advice
    for esc in ("\x1b[1m", "\x1b[0m", "\x1b[31m"):
        text = text.replace(esc, "")
    return text[:200]


# Beyond torch's weights_only set: io.BytesIO, which DCP users put into states
# (DCP saves it pickled). Unpickling it builds a BytesIO from bytes and runs no code.
SAFE_GLOBALS = [io.BytesIO]


def weights_only_load(buf: io.BytesIO) -> Any:
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(buf, weights_only=True)


def safe_torch_load(buf: io.BytesIO, *, path: str, key: str) -> Any:
    """torch.load under weights_only rules: a checkpoint can never run code on load."""
    try:
        return weights_only_load(buf)
    except Exception as e:
        raise UnsafeObjectError(
            f"{path}: object {key!r} cannot be loaded under weights_only rules "
            f"({_one_line(e)}). shardckpt never unpickles arbitrary objects; store plain types "
            f"or tensors.") from e
