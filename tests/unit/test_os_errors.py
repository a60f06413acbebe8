"""typed_os_error: an OSError of a save becomes the typed error whose advice fits it."""

from __future__ import annotations

import errno

import pytest

from shardckpt.errors import InsufficientSpaceError, SaveFailedError
from shardckpt.io.fsutil import typed_os_error

WHO = "/ckpt/step_1: /ckpt/.step_1.partial-ab/data/r00000.bin (rank 0)"


@pytest.mark.parametrize("code, kind, advice", [
    (errno.ENOSPC, InsufficientSpaceError, "Free space and retry."),
    (errno.EDQUOT, InsufficientSpaceError, "Free space and retry."),
    (errno.ENOMEM, SaveFailedError, "Free memory (or lower SHARDCKPT_THREADS), then retry."),
    (errno.EIO, SaveFailedError, "Check the disk and permissions, then retry."),
    (errno.EACCES, SaveFailedError, "Check the disk and permissions, then retry."),
])
def test_each_errno_gets_its_type_and_advice(code, kind, advice):
    cause = OSError(code, "boom", "/ckpt/.step_1.partial-ab/data/r00000.bin")
    err = typed_os_error(cause, WHO, "writing the checkpoint")
    assert type(err) is kind
    text = str(err)
    assert WHO in text and text.endswith(advice)  # an OSError subclass adds "[Errno N] "
    assert "nothing was committed and earlier checkpoints are intact" in text
    assert "r00000.bin" in text and err.__cause__ is cause
